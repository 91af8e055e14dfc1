"""The task circuits and what they share (Paper B, chapters b2 and b4): tables, records, overlap, batched scores."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch

from conftest import random_circuit_task
from mechbook import MechbookError
from mechbook.core.circuits import Circuit, score_circuit, score_circuits
from mechbook.papers.seqcont import reported
from mechbook.papers.seqcont.task_circuits import (
    TaskSet,
    circuit_grid,
    circuit_nodes,
    circuit_summary,
    circuits_from_record,
    circuits_record,
    component_overlap,
    cross_task_table,
    score_intervals,
    find_task_circuits,
    overlap_regions,
    paper_circuits,
    shared_circuit,
    size_comparison,
)

pytestmark = pytest.mark.usefixtures("one_thread")

THREE = {
    "numerals": Circuit([(0, 1), (1, 0), (1, 1)], [0, 1], score=81.234567),
    "numwords": Circuit([(0, 1), (1, 1)], [1], score=90.0),
    "months": Circuit([(0, 1), (0, 0)], [1, 0], score=70.0),
}


def _taskset(model, name: str, seed: int) -> TaskSet:
    clean, _, means, metric = random_circuit_task(model, n_prompts=5, length=8, seed=seed)
    return TaskSet(name, None, None, clean, means, metric, metric.answer_ids)


def test_tables_of_circuits():
    record = circuits_record(THREE)
    assert record["numerals"] == {"heads": [[0, 1], [1, 0], [1, 1]], "mlps": [0, 1], "score": 81.235}
    assert json.loads(json.dumps(record)) == record

    nodes = circuit_nodes(THREE)
    assert list(nodes.columns) == ["task", "component", "kind", "layer", "head"]
    assert len(nodes) == sum(len(c) for c in THREE.values())
    assert nodes[nodes.task == "numwords"].component.tolist() == ["0.1", "1.1", "MLP 1"]

    summary = circuit_summary(THREE, threshold=0.2, n_prompts={"numerals": 8, "numwords": 7, "months": 8})
    assert list(summary.columns) == ["task", "n_heads", "n_mlps", "size", "score", "threshold", "n_prompts"]
    assert summary.set_index("task").loc["numwords"].tolist() == [2, 1, 3, 90.0, 0.2, 7]

    grid = circuit_grid(THREE["months"], n_layers=2, n_heads=2)
    assert grid.columns.tolist() == ["0", "1", "MLP"]
    assert grid.values.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_overlap_and_shared_subcircuit():
    overlap = component_overlap(THREE)
    assert overlap.component.tolist() == ["0.0", "0.1", "1.0", "1.1", "MLP 0", "MLP 1"]
    assert overlap.set_index("component").n_tasks.to_dict() == {"0.0": 1, "0.1": 3, "1.0": 1, "1.1": 2, "MLP 0": 2, "MLP 1": 3}

    shared = shared_circuit(THREE)
    assert shared == Circuit([(0, 1)], [1])

    regions = overlap_regions(THREE).set_index("tasks")
    assert regions.loc["numerals & numwords & months", "components"] == "0.1, MLP 1"
    assert regions.loc["numerals & numwords", "components"] == "1.1"
    assert regions.loc["numerals & months", "components"] == "MLP 0"
    assert regions.loc["numerals only", "components"] == "1.0"
    assert regions.loc["months only", "components"] == "0.0"
    assert regions.loc["numwords only", "components"] == ""
    # every component of the union sits in exactly one region
    assert (regions.n_heads + regions.n_mlps).sum() == len(overlap)

    with pytest.raises(MechbookError, match="load_task_circuits"):
        shared_circuit({})
    with pytest.raises(MechbookError, match="load_task_circuits"):
        component_overlap({})


def test_paper_circuits_and_sizes(tiny_gpt2):
    paper = paper_circuits()
    assert (7, 11) in paper["numerals"].heads and (9, 1) in paper["months"].heads
    assert shared_circuit(paper).heads[:2] == [(0, 1), (4, 4)]
    sizes = size_comparison(THREE, tiny_gpt2)
    assert sizes[sizes.model == "gpt2-small (paper)"].heads.tolist() == [len(paper[t].heads) for t in THREE]
    assert set(reported.CROSS_TASK.values()) == {81.0, 48.4, 87.3, 81.1, 43.7, 32.4}


def test_score_circuits_equals_score_circuit(tiny_model):
    task = _taskset(tiny_model, "a", seed=0)
    l = tiny_model.n_layers
    circuits = [Circuit.full(tiny_model), Circuit([], []), Circuit([(0, 1), (l - 1, 0)], [0]), Circuit([(1, 0)], [])]
    batched = score_circuits(tiny_model, task.batch, circuits, task.means, task.metric, max_rows=10,
                             tokens=task.tokens)  # two circuits per pass
    for c, s in zip(circuits, batched.tolist()):
        assert s == pytest.approx(score_circuit(tiny_model, task.batch, c, task.means, task.metric), abs=1e-3)
    with pytest.raises(MechbookError, match="no circuits"):
        score_circuits(tiny_model, task.batch, [], task.means, task.metric)


def test_cross_task_table(tiny_gpt2):
    tasks = {"a": _taskset(tiny_gpt2, "a", 0), "b": _taskset(tiny_gpt2, "b", 1)}
    circuits = {"a": Circuit.full(tiny_gpt2), "b": Circuit([(0, 0), (1, 1)], [0])}
    table = cross_task_table(tiny_gpt2, circuits, tasks, n_random=4, seed=0)
    assert list(table.columns[:8]) == ["circuit_task", "eval_task", "score", "score_low", "score_high", "random_mean",
                                       "random_std", "n_random"]
    assert len(table) == 4 and (table.n_prompts == 5).all()
    full = table[table.circuit_task == "a"]
    assert full.score.tolist() == pytest.approx([100.0, 100.0], abs=1e-3)
    # the full circuit equals the full model on every prompt, so every resample scores 100
    assert full.score_low.tolist() == pytest.approx([100.0, 100.0], abs=1e-3)
    assert full.score_high.tolist() == pytest.approx([100.0, 100.0], abs=1e-3)
    part = table[table.circuit_task == "b"]
    assert (part.score_low < part.score).all() and (part.score < part.score_high).all()
    # random circuits of the full model's size are the full model
    assert full.random_mean.tolist() == pytest.approx([100.0, 100.0], abs=1e-3)
    assert (table[table.circuit_task == "b"].random_std > 0).all()
    assert table.paper_gpt2_small.isna().all()
    again = cross_task_table(tiny_gpt2, circuits, tasks, n_random=4, seed=0)
    pd.testing.assert_frame_equal(table, again)


def test_score_intervals(tiny_gpt2):
    tasks = {"a": _taskset(tiny_gpt2, "a", 0), "b": _taskset(tiny_gpt2, "b", 1)}
    circuits = {"a": Circuit.full(tiny_gpt2), "b": Circuit([(0, 0), (1, 1)], [0])}
    table = score_intervals(tiny_gpt2, circuits, tasks, seed=0)
    assert list(table.columns) == ["task", "score", "score_low", "score_high", "n_prompts"]
    assert table.task.tolist() == ["a", "b"] and (table.n_prompts == 5).all()
    full, part = table.iloc[0], table.iloc[1]
    assert [full.score, full.score_low, full.score_high] == pytest.approx([100.0] * 3, abs=1e-3)
    b = tasks["b"]
    # the score node pruning reports (its own scoring path), and the same interval as b4's cross-task table
    # (a batched scoring path: equal up to float rounding, relative to a score of about -1700 here)
    assert part.score == pytest.approx(score_circuit(tiny_gpt2, b.batch, circuits["b"], b.means, b.metric), abs=1e-3)
    assert part.score_low < part.score < part.score_high
    cross = cross_task_table(tiny_gpt2, {"b": circuits["b"]}, {"b": b}, n_random=2, seed=0).iloc[0]
    assert [part.score_low, part.score_high] == pytest.approx([cross.score_low, cross.score_high], rel=1e-5)
    with pytest.raises(MechbookError, match="no prompts for the 'c' circuit"):
        score_intervals(tiny_gpt2, {"c": circuits["b"]}, tasks)


def test_find_task_circuits(tiny_gpt2):
    task = _taskset(tiny_gpt2, "a", 0)
    found = find_task_circuits(tiny_gpt2, {"a": task}, threshold=0.3, max_rounds=1)
    assert found["a"].score > 70.0 and len(found["a"]) < tiny_gpt2.n_layers * (tiny_gpt2.n_heads + 1)
    with pytest.raises(MechbookError, match="no tasks"):
        find_task_circuits(tiny_gpt2, {})
    with pytest.raises(MechbookError, match="threshold"):
        find_task_circuits(tiny_gpt2, {"a": task}, threshold=1.5)


def test_circuits_round_trip_through_their_record():
    record = json.loads(json.dumps(circuits_record(THREE)))  # as chapter b2 saves it
    back = circuits_from_record(record)
    assert back == THREE and back["numerals"].score == pytest.approx(81.235)
    with pytest.raises(MechbookError, match="could not read circuits"):
        circuits_from_record({"numerals": {"mlps": []}})
    with pytest.raises(MechbookError, match="could not read circuits"):
        circuits_from_record([["numerals"]])
    with pytest.raises(MechbookError, match="holds no circuits"):
        circuits_from_record({})


def test_b2s_prompts_are_recorded_and_rebuilt_exactly(tiny_model):
    """Later chapters score circuits on chapter b2's own prompts: the record rebuilds the same batch and means."""
    from mechbook.papers.seqcont import sequences
    from mechbook.papers.seqcont.components import concat_prompts
    from mechbook.papers.seqcont.task_circuits import prompts_record, task_set, task_sets_from_record

    clean = [sequences.tokenize_prompts(sequences.load_paper_prompts("months", t), tiny_model.tokenizer).select([3, 1])
             for t in ("done", "names")]
    prompts = concat_prompts(clean)
    corrupted = sequences.tokenize_prompts(sequences.load_paper_prompts("months", "corrupted"), tiny_model.tokenizer)
    corrupted = corrupted.select([5, 0, 9])
    original = {"months": task_set(tiny_model, prompts, corrupted)}
    record = json.loads(json.dumps(prompts_record(original)))
    back = task_sets_from_record(tiny_model, record)["months"]
    assert back.prompts.text == prompts.text and back.prompts.template == prompts.template
    assert torch.equal(back.batch.input_ids, original["months"].batch.input_ids)
    assert all(torch.equal(back.means[k], v) for k, v in original["months"].means.items())
    with pytest.raises(MechbookError, match="could not read the prompts record"):
        task_sets_from_record(tiny_model, {"months": {"clean": [["done", 3]]}})
    with pytest.raises(MechbookError, match=r"rows \[99999\] are not among"):
        task_sets_from_record(tiny_model, {"months": {"clean": [["done", 99999]], "corrupted": [0]}})


def test_grids_summaries_and_paper_circuits_refuse_bad_input(tiny_gpt2):
    from mechbook.papers.seqcont.task_circuits import circuit_grid, circuit_summary, paper_circuits, size_comparison

    with pytest.raises(MechbookError, match="lies outside a grid"):  # dropped silently before
        circuit_grid(Circuit([(9, 9)], []), 3, 4)
    with pytest.raises(MechbookError, match="n_layers and n_heads"):
        circuit_grid(Circuit([(0, 1)], []), 3, 0)
    for tasks in ([], "numerals"):
        with pytest.raises(MechbookError, match="non-empty list of tasks"):
            paper_circuits(tasks)
    with pytest.raises(MechbookError, match="no circuits"):
        size_comparison({}, tiny_gpt2)
    with pytest.raises(MechbookError, match="threshold"):
        circuit_summary({"a": Circuit([(0, 1)], [])}, threshold=5, n_prompts=4)
    assert circuit_grid(Circuit([(2, 3)], [1]), 3, 4).loc[2, "3"] == 1.0


def test_cross_task_table_through_searches_is_the_same_computed_or_checked(tiny_gpt2, tmp_path, monkeypatch):
    """b4's scores as Searches.circuit_metrics units: the same table computed, then loaded and a sample re-scored."""
    from mechbook.book.results import ChapterResults
    from mechbook.book.searches import RECOMPUTE_ENV, Searches

    monkeypatch.delenv(RECOMPUTE_ENV, raising=False)
    tasks = {"a": _taskset(tiny_gpt2, "a", 0), "b": _taskset(tiny_gpt2, "b", 1)}
    circuits = {"a": Circuit.full(tiny_gpt2), "b": Circuit([(0, 0), (1, 1)], [0])}
    plain = cross_task_table(tiny_gpt2, circuits, tasks, n_random=12, seed=0)
    for outcome in ("computed", "checked"):
        s = Searches("b4_test", tiny_gpt2, root=tmp_path)
        table = cross_task_table(tiny_gpt2, circuits, tasks, n_random=12, seed=0, metrics=s.circuit_metrics)
        assert s.outcome == outcome and set(s.units) == {"a", "b"}
        pd.testing.assert_frame_equal(table, plain)
        saved = ChapterResults("b4_test", tiny_gpt2.name, tmp_path)
        s.save(saved)
        saved.finish()
    assert list(s.report().checked) == [2, 2]  # 26 circuits a task: a twentieth allows one; the first and the last all the same
