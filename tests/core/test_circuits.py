"""Circuits (Paper B): circuit files, scores, random controls, node pruning, edge pruning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mechbook
from conftest import build_tiny_model, random_circuit_task, sharpen
from mechbook import MechbookError
from mechbook.core.circuits import (
    Circuit,
    cross_task_scores,
    prune_edges,
    prune_nodes,
    random_circuits,
    score_circuit,
    score_circuits,
)
from mechbook.core.names import Component
from mechbook.core.path_patching import circuit_edges

PAPER_DATA = Path(mechbook.__file__).parent / "papers" / "seqcont" / "data"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def sharp(request, tmp_path_factory):
    return mechbook.load_model(str(sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"sharp-{request.param}")))))


# --- circuits, scores, files -----------------------------------------------------------------------------


def test_circuit_save_load_round_trip(tmp_path, tiny_gpt2):
    circuit = Circuit(heads=[(4, 4), (0, 1), (4, 4)], mlps=[3, 0], score=81.0)
    assert circuit.heads == [(0, 1), (4, 4)] and circuit.mlps == [0, 3]
    path = circuit.save(tmp_path / "c.json")
    assert json.loads(path.read_text()) == {"heads": [[0, 1], [4, 4]], "mlps": [0, 3]}
    assert Circuit.load(path) == circuit

    paper = Circuit.load(PAPER_DATA / "numerals_gpt2small_circuit.json")
    assert len(paper.heads) == 14 and (9, 1) in paper.heads and paper.mlps == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert paper.labels()[:2] == ["0.1", "1.5"]
    again = paper.save(tmp_path / "p.json")
    assert json.loads(again.read_text()) == json.loads((PAPER_DATA / "numerals_gpt2small_circuit.json").read_text())

    with pytest.raises(MechbookError, match="does not fit"):
        paper.validate(tiny_gpt2)  # GPT-2 small's head 4.10 is not in a 3-layer, 4-head model
    (tmp_path / "bad.json").write_text('{"heads": [[0, 1]]}')
    with pytest.raises(MechbookError, match="could not read a circuit"):
        Circuit.load(tmp_path / "bad.json")
    with pytest.raises(MechbookError, match="layer, head"):
        Circuit(heads=[1, 2], mlps=[])


def test_score_circuit_and_random_control(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    assert score_circuit(sharp, clean, Circuit.full(sharp), means, metric) == pytest.approx(100.0, abs=1e-4)
    empty = score_circuit(sharp, clean, Circuit([], []), means, metric)
    assert empty != pytest.approx(100.0, abs=1e-2)

    like = Circuit([(0, 1), (1, 2), (2, 3)], [0])
    randoms = random_circuits(sharp, size_like=like, n=5, seed=3)
    assert all(len(r.heads) == 3 and len(r.mlps) == 1 for r in randoms)
    assert [r.heads for r in randoms] == [r.heads for r in random_circuits(sharp, size_like=like, n=5, seed=3)]
    assert len({tuple(r.heads) for r in randoms}) > 1

    batched = score_circuits(sharp, clean, [like, Circuit.full(sharp), *randoms], means, metric, max_rows=12)
    one_by_one = [score_circuit(sharp, clean, c, means, metric) for c in [like, Circuit.full(sharp), *randoms]]
    assert (batched - torch.tensor(one_by_one)).abs().max() < 1e-3

    table = cross_task_scores(sharp, {"found": like, "all": Circuit.full(sharp)}, {"task": (clean, means, metric)})
    assert list(table.columns[:3]) == ["circuit", "task", "score"] and len(table) == 2
    assert table.set_index("circuit").score["all"] == pytest.approx(100.0, abs=1e-4)


# --- node pruning ------------------------------------------------------------------------------------------


def _sequential_reference(model, batch, means, metric, threshold):
    """The paper's loop, literally: one full forward per tentative removal."""
    circuit = Circuit.full(model)
    decisions = []
    while True:
        changed = {}
        for direction in ("backward", "forward"):
            changed[direction] = False
            layers = range(model.n_layers - 1, -1, -1) if direction == "backward" else range(model.n_layers)
            for layer in layers:
                heads = [Component("head", layer, h) for h in range(model.n_heads)]
                order = [Component("mlp", layer), *heads] if direction == "backward" else [*heads, Component("mlp", layer)]
                for c in order:
                    if c not in circuit:
                        continue
                    without = Circuit.from_components(x for x in circuit.components if x != c)
                    score = score_circuit(model, batch, without, means, metric)
                    removed = (100 - score) < 100 * threshold
                    decisions.append((direction, c.label, removed))
                    if removed:
                        circuit, changed[direction] = without, True
            if not changed[direction]:
                break
        if not all(changed.values()):
            return circuit, decisions


@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_prune_nodes_matches_the_papers_sequential_loop(sharp, threshold):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    found = prune_nodes(sharp, clean, means, metric, threshold=threshold)
    reference, decisions = _sequential_reference(sharp, clean, means, metric, threshold)
    log = found.log
    assert list(zip(log["pass"], log.component, log.removed)) == decisions
    assert found == reference
    assert found.score == pytest.approx(score_circuit(sharp, clean, found, means, metric), abs=1e-3)
    # fewer forward passes than one per decision, even counting refreshes
    assert log.attrs["forward_passes"] <= len(log) + 1
    cheap = prune_nodes(sharp, clean, means, metric, threshold=threshold, tokens=metric.answer_ids)
    assert cheap == found and (cheap.log.score_without - log.score_without).abs().max() < 1e-3


def test_prune_nodes_decision_log_is_complete(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp, seed=1)
    found = prune_nodes(sharp, clean, means, metric, threshold=0.3)
    log = found.log
    assert list(log.columns) == ["round", "pass", "step", "component", "kind", "layer", "head", "score_without",
                                 "removed", "circuit_size"]
    assert list(log.step) == list(range(1, len(log) + 1))
    assert (log.removed == (100 - log.score_without < 30.0)).all()
    # every pass visits every component still in the circuit when the pass starts, in the paper's order
    alive = set(Circuit.full(sharp).labels())
    for (_, direction), visits in log.groupby(["round", "pass"], sort=False):
        assert set(visits.component) == alive
        layers = list(visits.layer)
        assert layers == sorted(layers, reverse=direction == "backward")
        alive -= set(visits.component[visits.removed])
    assert set(found.labels()) == alive
    assert len(found) > 0 and not visits.removed.any()  # the loop stops after a pass without removals
    assert list(log.circuit_size)[-1] == len(found)


def test_prune_nodes_max_rounds_and_start(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    one = prune_nodes(sharp, clean, means, metric, threshold=0.3, max_rounds=1)
    assert set(one.log["round"]) == {1}
    start = Circuit([(l, h) for l in range(sharp.n_layers) for h in range(2)], list(range(sharp.n_layers)))
    sub = prune_nodes(sharp, clean, means, metric, threshold=0.3, start=start)
    assert set(sub.labels()) <= set(start.labels())
    assert set(sub.log.component[sub.log["round"] == 1]) <= set(start.labels())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 20, True, "0.2", None])
def test_threshold_validation(tiny_gpt2, bad):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match=r"must be a fraction of the full model's score \(> 0 and <= 1\)"):
        prune_nodes(tiny_gpt2, clean, means, metric, threshold=bad)
    with pytest.raises(MechbookError, match=r"must be a fraction of the full model's score \(> 0 and <= 1\)"):
        prune_edges(tiny_gpt2, clean, Circuit.full(tiny_gpt2), means, metric, threshold=bad)


def test_numpy_numbers_are_thresholds_and_round_counts(tiny_gpt2):
    """A threshold read from a numpy array or a pandas table is a number like any other."""
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    plain = prune_nodes(tiny_gpt2, clean, means, metric, threshold=0.25, max_rounds=1)
    numpy = prune_nodes(tiny_gpt2, clean, means, metric, threshold=np.float32(0.25), max_rounds=np.int64(1))
    assert numpy.labels() == plain.labels() and numpy.log.attrs["threshold"] == pytest.approx(0.25)
    with pytest.raises(MechbookError, match=r"max_rounds = 0 is out of range: .*\(>= 1\) or None"):
        prune_nodes(tiny_gpt2, clean, means, metric, max_rounds=0)


def test_prune_nodes_needs_a_positive_full_metric(tiny_gpt2):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match="not positive"):
        prune_nodes(tiny_gpt2, clean, means, lambda logits: -metric(logits))


def test_prune_edges(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    circuit = Circuit([(0, 0), (0, 1), (1, 2), (2, 3)], [0, 1, 2])
    edges = prune_edges(sharp, clean, circuit, means, metric, threshold=0.8)
    cheap = prune_edges(sharp, clean, circuit, means, metric, threshold=0.8, tokens=metric.answer_ids)
    assert (cheap.score - edges.score).abs().max() < 1e-3
    qkv = edges[edges.input != "resid"]
    assert len(qkv) == len(circuit_edges(circuit.heads)) == 3 * (2 + 3)  # (1.2 <- 0.x) + (2.3 <- 0.x, 1.2), x q/k/v
    assert list(edges[edges.input == "resid"].sender) == ["0.0", "0.1", "1.2", "2.3"]
    assert (edges.kept == (edges.score < 80.0)).all()
    assert edges.attrs["circuit_score"] == pytest.approx(score_circuit(sharp, clean, circuit, means, metric))
    patched = prune_edges(sharp, clean, circuit, means, metric, source=corrupted, mlp_senders=True, inputs=("v",),
                          to_logits=False)
    assert set(patched.input) == {"v"} and "mlp" in set(patched.sender_kind)


def test_prune_edges_tables(tiny_model):
    clean, corrupted, means, metric = random_circuit_task(tiny_model)
    circuit = Circuit([(0, 0), (0, 1), (1, 2), (2, 3)], [0, 1, 2])
    edges = prune_edges(tiny_model, clean, circuit, means, metric, threshold=0.8)
    qkv = edges[edges["input"] != "resid"]
    assert len(qkv) == len(circuit_edges(circuit.heads)) == 3 * (2 + 3)
    resid = edges[edges["input"] == "resid"]
    assert list(resid["sender"]) == ["0.0", "0.1", "1.2", "2.3"] and set(resid["receiver"]) == {"resid_post"}
    assert (edges["kept"] == (edges["score"] < 80.0)).all()
    assert {"sender", "receiver", "input", "score", "kept", "sender_layer", "receiver_layer"} <= set(edges.columns)
    assert edges.attrs["threshold"] == 0.8 and edges.attrs["circuit_score"] is not None
    loose = prune_edges(tiny_model, clean, circuit, means, metric, threshold=1.0)
    assert torch.allclose(torch.tensor(loose["score"].values), torch.tensor(edges["score"].values))
    assert loose["kept"].sum() >= edges["kept"].sum()
    with_mlps = prune_edges(tiny_model, clean, circuit, means, metric, mlp_senders=True, to_logits=False)
    assert "mlp" in set(with_mlps["sender_kind"]) and "resid" not in set(with_mlps["input"])


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, True, "0.8"])
def test_prune_edges_threshold_validation(tiny_gpt2, bad):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match="threshold=0.8"):
        prune_edges(tiny_gpt2, clean, Circuit([(0, 0), (1, 1)], []), means, metric, threshold=bad)


def test_prune_edges_needs_heads_and_a_fitting_circuit(tiny_gpt2):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match="no heads"):
        prune_edges(tiny_gpt2, clean, Circuit([], [0, 1]), means, metric)
    with pytest.raises(MechbookError, match="does not fit"):
        prune_edges(tiny_gpt2, clean, Circuit([(0, 0), (9, 1)], []), means, metric)
    with pytest.raises(MechbookError, match="no edges"):
        prune_edges(tiny_gpt2, clean, Circuit([(1, 0), (1, 1)], []), means, metric, to_logits=False)


def test_a_circuit_refuses_negative_fractional_and_out_of_range_indices(tiny_gpt2):
    """A negative index never matches the complement's (the circuit would ablate its own head); 1.7 is not head 1."""
    import numpy as np

    with pytest.raises(MechbookError, match="count from 0, but it has head -1.0"):
        Circuit([(-1, 0)], [])
    with pytest.raises(MechbookError, match="count from 0, but it has MLP -1"):
        Circuit([], [-1])
    with pytest.raises(MechbookError, match="head index 1.7 is not an integer"):
        Circuit([(0, 1.7)], [])
    with pytest.raises(MechbookError, match="MLP layer True is a bool"):
        Circuit([], [True])
    assert Circuit([(np.int64(0), np.int32(1))], [np.int64(2)]) == Circuit([(0, 1)], [2])
    with pytest.raises(MechbookError, match="does not fit .*: MLP 3 lies past its 3 layers"):
        Circuit([], [3]).validate(tiny_gpt2)
    with pytest.raises(MechbookError, match="does not fit .*head 4 is out of range"):
        Circuit([(0, 4)], []).complement(tiny_gpt2)


# --- bad input ------------------------------------------------------------------------------------------


def test_circuit_functions_refuse_what_is_not_a_circuit_and_bad_full_metrics(tiny_gpt2):
    from mechbook.core.circuits import circuit_means, circuit_metrics, cross_task_scores, prune_edges, score_circuits
    from mechbook.core.patching import logit_diff
    from mechbook.core.runs import tokenize

    clean = tokenize(tiny_gpt2, [[5, 6, 7, 8], [9, 10, 11, 12]])
    means = circuit_means(tiny_gpt2, tokenize(tiny_gpt2, [[6, 5, 8, 7], [10, 9, 12, 11]]))
    metric = logit_diff(torch.tensor([3, 4]), torch.tensor([20, 21]))
    empty = Circuit([], [])
    for full in (0, -2.0, float("nan"), "1"):  # a ZeroDivisionError, a negative score, nan, a TypeError before
        with pytest.raises(MechbookError, match="full"):
            score_circuit(tiny_gpt2, clean, empty, means, metric, full_metric=full)
    with pytest.raises(MechbookError, match="full"):
        score_circuits(tiny_gpt2, clean, [empty], means, metric, full_metric=0.0)  # inf before
    with pytest.raises(MechbookError, match="must be a Circuit"):
        score_circuit(tiny_gpt2, clean, [(0, 1)], means, metric)
    with pytest.raises(MechbookError, match="list of Circuit"):
        circuit_metrics(tiny_gpt2, clean, Circuit([(0, 1)], []), means, metric)
    with pytest.raises(MechbookError, match="start must be a Circuit"):
        prune_nodes(tiny_gpt2, clean, means, metric, start=[(0, 1)])
    with pytest.raises(MechbookError, match="max_rows must be at least 1"):
        prune_nodes(tiny_gpt2, clean, means, metric, max_rows=0)
    with pytest.raises(MechbookError, match="max_rows must be at least 1"):
        prune_edges(tiny_gpt2, clean, Circuit([(0, 1), (1, 1)], []), means, metric, max_rows=0)
    with pytest.raises(MechbookError, match="size_like must be a Circuit"):
        random_circuits(tiny_gpt2, [(0, 1)], 2)
    for seed in (-1, 1.5):
        with pytest.raises(MechbookError, match="seed"):
            random_circuits(tiny_gpt2, Circuit([(0, 1)], []), 2, seed=seed)
    with pytest.raises(MechbookError, match="non-empty dict"):
        cross_task_scores(tiny_gpt2, {}, {})
    with pytest.raises(MechbookError, match="clean batch, means over its corrupted set, metric"):
        cross_task_scores(tiny_gpt2, {"x": empty}, {"t": (clean, means)})
    with pytest.raises(MechbookError, match="head 99.0 lies past"):
        Circuit([(99, 0)], []).validate(tiny_gpt2)
    with pytest.raises(MechbookError, match="could not write the circuit"):
        Circuit([(0, 1)], []).save("/nonexistent/dir/c.json")
