"""Knocking out the shared sub-circuit beyond the three tasks (Paper B, chapter b6)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from mechbook import MechbookError
from mechbook.papers.seqcont.other_sequences import (
    FAMILIES,
    common_lengths,
    condition_kind,
    family_prompts,
    knockout_runs,
    knockout_summary,
    per_set_table,
    random_ablations,
    word_problem_prompts,
)
from mechbook.core.circuits import Circuit
from mechbook.core.runs import run_last, tokenize
from mechbook.papers.seqcont import sequences as seqcont

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenized(model, family: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", seqcont.SeqPromptWarning)  # multi-token members are dropped and counted
        return seqcont.tokenize_prompts(family_prompts(family, **kwargs), model.tokenizer)


# --- the prompt families --------------------------------------------------------------------------


def test_sequence_families_continue_their_pattern():
    intervals = family_prompts("intervals")
    k = intervals.text.index("2 4 6 8")
    assert intervals.corr[k] == " 10" and intervals.incorr[k] == " 8"
    spanish = family_prompts("spanish numbers")
    k = spanish.text.index("uno dos tres cuatro")
    assert spanish.corr[k] == " cinco" and spanish.incorr[k] == " cuatro"
    months = family_prompts("spanish months")
    k = months.text.index("enero, febrero, marzo, abril,")
    assert months.corr[k] == " mayo"
    for family in FAMILIES[:-1]:
        prompts = family_prompts(family)
        assert len(prompts) == len(set(prompts.text)) > 0  # every clean text once
        assert {t for t in prompts.template} >= {"{member}", "done"}


def test_corrupted_family_resamples_the_members():
    clean, corrupted = family_prompts("numerals"), family_prompts("numerals", corrupted=True, repeats=3)
    assert corrupted.kind == "corrupted" and len(corrupted) > len(clean)
    in_order = [m for m in corrupted.members if [int(x) for x in m] == list(range(int(m[0]), int(m[0]) + len(m)))]
    assert len(in_order) < len(corrupted) / 2


def test_word_problems_ask_for_one_more():
    problems = word_problem_prompts(n_per_template=7)
    assert len(problems) == 4 * 7
    for text, (shown,), corr, incorr in zip(problems.text, problems.members, problems.corr, problems.incorr):
        assert f" {shown} " in text and corr == f" {int(shown) + 1}" and incorr == f" {shown}"
        assert int(shown) >= 2  # "1 apples" never appears
    assert word_problem_prompts(seed=1).text != word_problem_prompts(seed=2).text


def test_bad_family_arguments():
    with pytest.raises(MechbookError, match="unknown prompt family 'roman'.*intervals"):
        family_prompts("roman")
    with pytest.raises(MechbookError, match=r"repeats = 0 is out of range: .*\(>= 1\)"):
        family_prompts("numerals", repeats=0)
    with pytest.raises(MechbookError, match="at least 1"):
        word_problem_prompts(n_per_template=0)


def test_common_lengths_keep_the_largest_groups(tiny_gpt2):
    clean = _tokenized(tiny_gpt2, "intervals")
    corrupted = _tokenized(tiny_gpt2, "intervals", corrupted=True, repeats=4)
    kept = common_lengths(clean, corrupted, n_lengths=2)
    lengths = pd.Series(clean.n_tokens).value_counts()
    assert set(kept.n_tokens) <= set(lengths.index) and len(set(kept.n_tokens)) <= 2
    assert len(kept) == lengths.loc[sorted(set(kept.n_tokens))].sum()
    with pytest.raises(MechbookError, match="corrupted prompts"):
        common_lengths(clean, corrupted, min_corrupted=10_000)


# --- knocking out ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def numerals(tiny_gpt2):
    clean = _tokenized(tiny_gpt2, "numerals")
    corrupted = _tokenized(tiny_gpt2, "numerals", corrupted=True, repeats=4)
    return common_lengths(clean, corrupted, n_lengths=2), corrupted


def test_knockout_full_condition_is_the_plain_model(tiny_gpt2, numerals):
    prompts, corrupted = numerals
    runs = knockout_runs(tiny_gpt2, prompts, corrupted, {"nothing": Circuit([], []), "all": Circuit.full(tiny_gpt2)})
    assert list(runs.condition.unique()) == ["full", "nothing", "all"]
    full = runs[runs.condition == "full"].sort_values("prompt")
    logits, _ = run_last(tiny_gpt2, tokenize(tiny_gpt2, [prompts.prompt_ids[i] for i in full.prompt]))
    corr, incorr = (t[full.prompt.tolist()] for t in prompts.answer_tensors())
    rows = torch.arange(len(full))
    expected = (logits[rows, corr] - logits[rows, incorr]).numpy()
    np.testing.assert_allclose(full.logit_diff.to_numpy(), expected, atol=1e-4)
    assert (full.top1_is_corr.to_numpy() == (logits.argmax(-1) == corr).numpy()).all()
    nothing = runs[runs.condition == "nothing"].sort_values("prompt")
    np.testing.assert_allclose(nothing.logit_diff.to_numpy(), expected, atol=1e-4)  # ablating nothing changes nothing
    everything = runs[runs.condition == "all"].sort_values("prompt")
    assert np.abs(everything.logit_diff.to_numpy() - expected).max() > 1e-3


def test_knockout_batches_do_not_change_results(tiny_gpt2, numerals):
    prompts, corrupted = numerals
    sets = {"shared": Circuit([(0, 1)], [1]), **random_ablations(tiny_gpt2, Circuit([(0, 1)], [1]), 3, seed=0)}
    wide = knockout_runs(tiny_gpt2, prompts, corrupted, sets)
    narrow = knockout_runs(tiny_gpt2, prompts, corrupted, sets, max_rows=1)
    np.testing.assert_allclose(wide.logit_diff.to_numpy(), narrow.logit_diff.to_numpy(), atol=1e-4)
    assert list(wide.condition.unique()) == ["full", "shared", "random 0", "random 1", "random 2"]


def test_knockout_bad_input(tiny_gpt2, numerals):
    prompts, corrupted = numerals
    with pytest.raises(MechbookError, match="ratio must be positive"):
        knockout_runs(tiny_gpt2, prompts, corrupted, {}, ratio=0)
    with pytest.raises(MechbookError, match='"full" names the unablated model'):
        knockout_runs(tiny_gpt2, prompts, corrupted, {"full": Circuit([], [])})
    with pytest.raises(MechbookError, match="ablation 'big'"):
        knockout_runs(tiny_gpt2, prompts, corrupted, {"big": Circuit([(40, 0)], [])})
    with pytest.raises(MechbookError, match="tokenize both"):
        knockout_runs(tiny_gpt2, family_prompts("numerals"), corrupted, {})


def test_summaries_arithmetic():
    runs = pd.DataFrame({
        "condition": ["full"] * 4 + ["shared"] * 4 + ["random 0"] * 4 + ["random 1"] * 4,
        "prompt": list(range(4)) * 4,
        "logit_diff": [2.0, 2.0, 2.0, 2.0] + [1.0, 0.0, 1.0, 0.0] + [2.0, 2.0, 1.0, 1.0] + [2.0, 2.0, 2.0, 0.0],
        "top1_is_corr": [True] * 4 + [True, False, False, False] + [True, True, True, False] + [True] * 4,
        "solved": [True] * 16,
    })
    per_set = per_set_table(runs).set_index("condition")
    assert per_set.loc["shared", "accuracy"] == 0.25 and per_set.loc["shared", "accuracy_drop"] == 0.75
    assert per_set.loc["random 0", "score"] == pytest.approx(75.0)
    assert list(per_set.kind) == ["full", "shared", "random", "random"]
    summary = knockout_summary(runs).set_index("condition")
    assert summary.loc["random", "accuracy"] == pytest.approx(0.875)
    assert summary.loc["random", "accuracy_sd"] == pytest.approx(np.std([0.75, 1.0], ddof=1))
    assert summary.loc["random", "n_sets"] == 2 and summary.loc["shared", "accuracy_sd"] == 0.0
    with pytest.raises(MechbookError, match="no runs"):
        per_set_table(runs.iloc[:0])


def test_heads_only_controls_are_their_own_kind(tiny_gpt2):
    heads = Circuit([(0, 1), (1, 0)], [])
    controls = random_ablations(tiny_gpt2, heads, 3, seed=0, name="random heads")
    assert list(controls) == ["random heads 0", "random heads 1", "random heads 2"]
    assert all(len(c.heads) == 2 and not c.mlps for c in controls.values())
    assert [condition_kind(c) for c in ["random 3", "random heads 12", "shared heads", "full"]] == \
        ["random", "random heads", "shared heads", "full"]


def test_knockouts_through_searches_are_the_same_computed_or_checked(tiny_gpt2, numerals, tmp_path, monkeypatch):
    """b6's knockouts as Searches.values units: the same table computed, then loaded and a sample re-run."""
    from functools import partial

    from mechbook.book.results import ChapterResults
    from mechbook.book.searches import RECOMPUTE_ENV, Searches

    monkeypatch.delenv(RECOMPUTE_ENV, raising=False)
    prompts, corrupted = numerals
    sets = {"shared": Circuit([(0, 1)], [1]), **random_ablations(tiny_gpt2, Circuit([(0, 1)], [1]), 3, seed=0)}
    plain = knockout_runs(tiny_gpt2, prompts, corrupted, sets)
    # top-1 and solved follow from the margin and the logit difference: log p(corr) - log p(incorr) = the difference
    assert (plain.solved == (plain.logit_diff > np.log(2.0))).all() and (plain.top1_is_corr == (plain.top1_margin > 0)).all()
    for outcome in ("computed", "checked"):
        s = Searches("b6_test", tiny_gpt2, root=tmp_path)
        runs = knockout_runs(tiny_gpt2, prompts, corrupted, sets, values=partial(s.values, "numerals"))
        assert s.outcome == outcome
        pd.testing.assert_frame_equal(runs, plain, check_exact=False, atol=1e-5)
        saved = ChapterResults("b6_test", tiny_gpt2.name, tmp_path)
        s.save(saved)
        saved.finish()
