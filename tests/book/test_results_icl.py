"""Chapter results are published whole or not at all; the in-context helpers on a tiny model."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from mechbook.papers.vector_arithmetic import icl
from mechbook.book import results
from mechbook.core.errors import MechbookError
from mechbook.papers.vector_arithmetic.prompts import build_prompts


def test_results_appear_only_when_finished(tmp_path):
    saved = results.ChapterResults("a1", "org/model", root=tmp_path)
    saved.save("table", pd.DataFrame({"x": [1, 2]}))
    saved.save("facts", {"layer": 3})
    final = tmp_path / "org--model" / "a1"
    assert not final.exists()
    assert results.complete_runs(tmp_path) == {}
    saved.finish()
    assert sorted(p.name for p in final.iterdir()) == ["_complete.json", "facts.json", "table.csv"]
    assert results.complete_runs(tmp_path) == {"org/model": ["a1"]}
    assert results.load_table("a1", "table", root=tmp_path)["model"].tolist() == ["org/model"] * 2


def test_a_dying_rerun_keeps_the_previous_results(tmp_path):
    first = results.ChapterResults("a1", "m", root=tmp_path)
    first.save("table", pd.DataFrame({"x": [1]}))
    first.finish()
    second = results.ChapterResults("a1", "m", root=tmp_path)
    second.save("table", pd.DataFrame({"x": [99]}))
    # never finished: the process died
    assert results.load_table("a1", "table", root=tmp_path)["x"].tolist() == [1]


def test_results_from_an_older_format_are_refused_with_the_fix(tmp_path):
    saved = results.ChapterResults("a1", "m", root=tmp_path)
    saved.finish()
    marker = tmp_path / "m" / "a1" / results.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 0}))
    with pytest.raises(MechbookError, match="rerun that chapter"):
        results.complete_runs(tmp_path)


def test_missing_results_name_the_chapter(tmp_path):
    with pytest.raises(MechbookError, match="run the chapter first"):
        results.load_table("a9", "table", root=tmp_path)


def test_accuracy_and_lens_tables_on_a_tiny_model(tiny_gpt2):
    prompts = build_prompts("capitals", tiny_gpt2, n=4, multi_token="first")
    logits, resid = icl.run_prompts(tiny_gpt2, prompts)
    assert resid.shape == (4, tiny_gpt2.n_layers, tiny_gpt2.d_model)
    acc = icl.accuracy_table(tiny_gpt2, prompts, logits)
    assert len(acc) == 4 and set(acc.columns) >= {"correct", "answer_rank", "answer_prob"}
    assert (acc.correct == (acc.answer_rank == 1)).all()
    lens = icl.lens_table(tiny_gpt2, prompts, resid)
    assert len(lens) == 4 * tiny_gpt2.n_layers * 2
    last = lens[lens.layer == tiny_gpt2.n_layers - 1].query("target == 'answer'")
    assert last["rank"].tolist() == acc.answer_rank.tolist()
    first = icl.first_top1_layer(lens)
    assert len(first) == 4


def test_the_marker_records_the_parameters_mechbook_run_passed(tmp_path, monkeypatch):
    monkeypatch.setenv(results.PARAMETERS_ENV, json.dumps({"chapter": "a1", "parameters": {"n_prompts": 16}}))
    results.ChapterResults("a1", "m", root=tmp_path).finish()
    results.ChapterResults("a2", "m", root=tmp_path).finish()  # another chapter's parameters are not its own
    results.ChapterResults("a3", "m", root=tmp_path, parameters={"sizes": (8, 16)}).finish()
    marker = {c: json.loads((tmp_path / "m" / c / results.MARKER).read_text()) for c in ("a1", "a2", "a3")}
    assert marker["a1"]["parameters"] == {"n_prompts": 16}
    assert marker["a2"]["parameters"] is None
    assert marker["a3"]["parameters"] == {"sizes": [8, 16]}
    assert results.parameter_changes("m", "a1", {"n_prompts": 16}, tmp_path) == []
    assert results.parameter_changes("m", "a1", {"n_prompts": 8, "seed": 0}, tmp_path) == [
        "n_prompts: 16 -> 8", "seed: '(unset)' -> 0"]
    assert results.parameter_changes("m", "a2", {}, tmp_path) == ["no parameters recorded"]


@pytest.mark.parametrize(("root", "model", "chapter", "message"), [
    ("{tmp}/results/../elsewhere", "m", "a1", "contains '..', which would publish outside it"),
    ("{tmp}/results", "..", "a1", "model name '..' cannot name a results folder"),
    ("{tmp}/results", "../../x", "a1", "model name '../../x' cannot name a results folder"),  # hidden: never read
    ("{tmp}/results", "org/../x", "a1", None),  # '/' becomes '--': one folder inside the root
    ("{tmp}/results", "m", "..", "chapter '..' is not a folder name"),
])
def test_nothing_is_published_outside_the_results_root(tmp_path, root, model, chapter, message):
    root = root.format(tmp=tmp_path)
    if message is None:
        assert results.ChapterResults(chapter, model, root=root).finish().parent.parent == tmp_path / "results"
        return
    with pytest.raises(MechbookError, match=re.escape(message)):
        results.ChapterResults(chapter, model, root=root)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_results_root_that_does_not_exist_is_not_no_results(tmp_path):
    missing = tmp_path / "nonexistent"
    for read in (lambda: results.complete_runs(missing), lambda: results.load_table("a1", "t", root=missing),
                 lambda: results.load_json("a1", "t", root=missing)):
        with pytest.raises(MechbookError, match=rf"^results root '{re.escape(str(missing))}' is not a folder; pass"):
            read()
    assert results.complete_runs(tmp_path) == {}  # an empty folder is "no results"
