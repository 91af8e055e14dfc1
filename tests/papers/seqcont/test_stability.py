"""How many prompts a circuit needs (Paper B, chapter b7): runs by size and seed, agreement, the stable size."""

from __future__ import annotations

import pytest

from conftest import random_circuit_task
from mechbook import MechbookError
from mechbook.core.circuits import Circuit, prune_nodes, score_circuit
from mechbook.core.stats import jaccard
from mechbook.papers.seqcont import stability
from mechbook.papers.seqcont.task_circuits import TaskSet

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_prepare(model):
    """prepare_task on a random task (tiny models solve none of the paper's prompts): n prompts drawn by seed."""

    def prepare(m, task, *, n_prompts, n_corrupted, seed, corrupted_seed=None):
        clean, _, means, metric = random_circuit_task(model, n_prompts=n_prompts, length=8, seed=seed)
        return TaskSet(task, None, None, clean, means, metric, metric.answer_ids)

    return prepare


def test_circuits_by_size_prunes_each_task_size_and_seed(tiny_gpt2, monkeypatch):
    monkeypatch.setattr(stability, "prepare_task", _fake_prepare(tiny_gpt2))
    runs, found = stability.circuits_by_size(tiny_gpt2, ["a", "b"], [6, 4], [0, 1], threshold=0.3)
    assert list(runs[["task", "n_prompts", "seed"]].itertuples(index=False, name=None)) == [
        (t, n, s) for t in ["a", "b"] for n in [4, 6] for s in [0, 1]]
    assert set(found) == {(t, n, s) for t in "ab" for n in (4, 6) for s in (0, 1)}
    # each circuit is prune_nodes on that draw, and its score the circuit's score on it
    task = stability.prepare_task(tiny_gpt2, "a", n_prompts=6, n_corrupted=64, seed=1)
    again = prune_nodes(tiny_gpt2, task.batch, task.means, task.metric, threshold=0.3, tokens=task.tokens)
    assert found[("a", 6, 1)] == again
    row = runs[(runs.task == "a") & (runs.n_prompts == 6) & (runs.seed == 1)].iloc[0]
    assert row.score == pytest.approx(score_circuit(tiny_gpt2, task.batch, again, task.means, task.metric), abs=1e-3)
    assert row.score_low <= row.score <= row.score_high
    assert row.n_heads == len(again.heads) and row.heads.split() == [c.label for c in again.components
                                                                     if c.kind == "head"]
    with pytest.raises(MechbookError, match=r"sizes = \[1\] is out of range: .*prompt counts \(>= 2, each\)"):
        stability.circuits_by_size(tiny_gpt2, ["a"], [1], [0])
    with pytest.raises(MechbookError, match=r"tasks = \[\] is out of range"):
        stability.circuits_by_size(tiny_gpt2, [], [4], [0])


def _circuits(table):
    return {key: Circuit(heads, mlps) for key, (heads, mlps) in table.items()}


def test_agreement_and_the_smallest_stable_size():
    a, b = [(0, 0), (0, 1), (1, 0)], [(0, 0), (0, 1), (1, 1)]
    found = _circuits({
        ("t", 8, 0): (a, [0]), ("t", 8, 1): (b, [0]),
        ("t", 16, 0): (a, [0, 1]), ("t", 16, 1): (a, [0, 1]),
        ("t", 32, 0): (a, [0, 1]), ("t", 32, 1): (a, [0, 1]),
    })
    table = stability.agreement(found).set_index(["n_prompts", "comparison"])
    assert table.loc[(8, "across seeds"), "heads"] == pytest.approx(0.5)  # 2 shared of 4
    assert table.loc[(8, "with next size"), "heads"] == pytest.approx((1.0 + 0.5) / 2)
    assert table.loc[(8, "with next size"), "heads_lowest"] == pytest.approx(0.5)
    assert table.loc[(8, "with next size"), "mlps"] == pytest.approx(0.5)
    assert table.loc[(16, "across seeds"), "heads"] == 1.0 and table.loc[(16, "with next size"), "mlps"] == 1.0
    assert (32, "with next size") not in table.index  # the largest size has no next one
    assert stability.smallest_stable_size(table.reset_index()) == 16
    assert stability.smallest_stable_size(table.reset_index(), at_least=1.01) is None
    # only the largest size agrees: nothing above it to confirm it, so no stable size
    unstable = stability.agreement(_circuits({("t", 8, 0): (a, []), ("t", 8, 1): (b, []),
                                              ("t", 16, 0): (a, []), ("t", 16, 1): (a, [])}))
    assert stability.smallest_stable_size(unstable) is None


def test_jaccard():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert jaccard([], []) == 1.0 and jaccard([1], []) == 0.0
    assert jaccard([(0, 1), (0, 1)], [(0, 1)]) == 1.0


def test_agreement_tables_refuse_empty_input():
    import pandas as pd

    with pytest.raises(MechbookError, match="no circuits to compare"):
        stability.agreement({})
    for table in (pd.DataFrame(), pd.DataFrame({"size": [1], "jaccard": [1.0]})):
        with pytest.raises(MechbookError, match="reads the table of agreement"):
            stability.smallest_stable_size(table)


def test_decision_margins_are_each_heads_last_decision_against_the_bar(tiny_gpt2, monkeypatch):
    monkeypatch.setattr(stability, "prepare_task", _fake_prepare(tiny_gpt2))
    _, found = stability.circuits_by_size(tiny_gpt2, ["a"], [6], [0, 1, 2], threshold=0.3)
    table = stability.decision_margins(found, threshold=0.3)
    kept = {s: {c.label for c in found[("a", 6, s)].components if c.kind == "head"} for s in (0, 1, 2)}
    union, every = set.union(*kept.values()), set.intersection(*kept.values())
    assert len(table) == 3 * len(union) and set(table["head"]) == union
    for s in (0, 1, 2):  # by hand: walk the log, the last score each head was decided on
        last = {}
        for row in found[("a", 6, s)].log.itertuples():
            if row.kind == "head":
                last[row.component] = row.score_without
        for r in table[table.seed == s].itertuples():
            assert r.margin == pytest.approx(last[r.head] - 70.0, abs=1e-9)
            assert r.in_circuit == (r.head in kept[s]) == (r.margin <= 0)  # kept: the score without it fell to the bar
            assert r.kept_by == ("every seed" if r.head in every else "some seeds")
    with pytest.raises(MechbookError, match="no decision log"):
        stability.decision_margins({("a", 6, 0): Circuit([(0, 0)], [])}, threshold=0.3)
