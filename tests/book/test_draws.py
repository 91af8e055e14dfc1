"""A draw of prompts as a unit of a chapter's searches (mechbook.book.saved_circuits.drawn_task): computed,
published, rebuilt from its rows and re-checked; a draw that is not what its seed gives, or a choice that the
model does not make again, fails the check and is named."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

from mechbook import MechbookError
from mechbook.book import saved_circuits, searches
from mechbook.book.results import ChapterResults
from mechbook.book.searches import Searches
from mechbook.core.circuits import digest
from mechbook.papers.seqcont import components, sequences, task_circuits

pytestmark = pytest.mark.usefixtures("one_thread")
CHAPTER = "b9_draws"
ARGS = {"n_prompts": 8, "n_corrupted": 16, "seed": 3}


@pytest.fixture(autouse=True)
def no_flags(monkeypatch):
    monkeypatch.delenv(searches.RECOMPUTE_ENV, raising=False)
    monkeypatch.delenv(searches.RESUME_ENV, raising=False)
    warnings.filterwarnings("ignore", category=sequences.SeqPromptWarning)


@pytest.fixture(scope="module")
def drawn(gemma):
    return task_circuits.prepare_task(gemma, "numerals", **ARGS)


def test_a_draw_is_computed_published_then_rebuilt_and_checked(gemma, drawn, tmp_path):
    first = Searches(CHAPTER, gemma, root=tmp_path)
    made = saved_circuits.drawn_task(first, "numerals", **ARGS)
    saved = ChapterResults(CHAPTER, gemma.name, tmp_path)
    first.save(saved)
    saved.finish()
    assert first.report().outcome.tolist() == ["computed"]
    assert first.summary().startswith("computed 1 draw of prompts (")

    again = Searches(CHAPTER, gemma, root=tmp_path)
    rebuilt = saved_circuits.drawn_task(again, "numerals", **ARGS)
    row = again.report().loc["draw numerals/8/3"]
    assert row.outcome == "checked" and row.checked >= 2 and row.agree == row.checked
    assert again.summary().startswith(f"checked 1 committed draw of prompts ({row.checked} units re-computed")
    for t in (made, rebuilt):  # the same prompts and means as prepare_task's, bit for bit
        assert digest(t.batch.input_ids, t.batch.lengths) == digest(drawn.batch.input_ids, drawn.batch.lengths)
        assert all(torch.equal(t.means[k], drawn.means[k]) for k in drawn.means)
        assert torch.equal(t.tokens, drawn.tokens)


def test_the_check_agrees_with_the_draw_and_rescores_both_verdicts_where_both_occur(gemma, drawn):
    table = task_circuits.check_draw(gemma, drawn, **ARGS)
    assert (table.status == "agrees").all()
    assert table.check.tolist()[0] == "draw" and (table.check[1:] == "solved").all()
    assert table.attrs["candidates_decided"] >= len(drawn)
    rescored = table[table.check == "solved"]
    assert len(rescored) >= 2 and rescored.verdict_logged.all() == (table.attrs["candidates_decided"] == len(drawn))


def test_prompts_out_of_their_order_are_named(gemma, drawn):
    swapped = task_circuits.task_set(gemma, drawn.prompts.select([1, 0, *range(2, len(drawn))]), drawn.corrupted)
    table = task_circuits.check_draw(gemma, swapped, **ARGS)
    with pytest.raises(MechbookError, match="take turns"):
        searches.assert_agrees(table, "the draw")


def test_other_corrupted_rows_or_another_seed_are_named(gemma, drawn):
    table = task_circuits.check_draw(gemma, drawn, **{**ARGS, "n_corrupted": 15})
    assert "corrupted rows" in table.note.iloc[0]
    table = task_circuits.check_draw(gemma, drawn, **{**ARGS, "seed": 4})
    assert "seeded candidates" in table.note.iloc[0]


def test_a_choice_the_model_does_not_make_again_is_named(gemma, drawn, monkeypatch):
    """Scored again, every kept prompt comes out unsolved: each re-scored kept prompt differs, by name."""
    real = sequences.score_prompts

    def unsolved(model, prompts, **kw):
        scores = real(model, prompts, **kw)
        return scores.assign(p_corr=scores.p_incorr * 1.5)

    monkeypatch.setattr(sequences, "score_prompts", unsolved)
    table = task_circuits.check_draw(gemma, drawn, **ARGS)
    rescored = table[table.check == "solved"]
    kept = rescored[rescored.verdict_logged.astype(bool)]
    assert len(kept) >= 1 and (kept.status == "differs").all()
    with pytest.raises(MechbookError, match=r"numerals: (done|names|Done)?.*/\d+"):
        searches.assert_agrees(table, "the draw")


def test_the_candidates_are_those_solved_paper_prompts_scores(gemma, drawn):
    per_template, pools = components.paper_candidates(gemma, "numerals", n_prompts=8, seed=3)
    assert per_template == 3 and len(pools) == len(components.PAPER_CLEAN_TEMPLATES)
    rows = set(zip(drawn.prompts.template, drawn.prompts.source_index))
    candidates = {(t, int(i)) for pool in pools for t, i in zip(pool.template, pool.source_index)}
    assert rows <= candidates and all(len(p) == 2 * per_template for p in pools)
