"""Edges of a node circuit (Paper B, chapter b3): sender -> logits paths, edge tables, counts, diagram, b2's file."""

from __future__ import annotations


import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from conftest import random_circuit_task
from mechbook import MechbookError
from mechbook.core.circuits import Circuit, circuit_edges
from mechbook.papers.seqcont.edge_pruning import (
    FINAL_RESID,
    RESID,
    circuit_diagram,
    circuit_edge_scores,
    edge_counts,
    patch_paths_to_logits,
)
from mechbook.core.runs import run_last
from mechbook.core.patching import Component

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, target, source, metric, sender):
    """By hand: the residual change from swapping the sender's output (read off the residual stream around it)
    added to the final residual stream at every position, in an otherwise unchanged run."""
    if sender.kind == "head":
        before, after = f"blocks.{sender.layer}.hook_resid_pre", f"blocks.{sender.layer}.hook_resid_mid"
    else:
        before, after = f"blocks.{sender.layer}.hook_resid_mid", f"blocks.{sender.layer}.hook_resid_post"
    _, src = run_last(model, source, names=[sender.hook_name])

    def swap(act, hook):
        act = act.clone()
        if sender.kind == "head":
            act[:, :, sender.head] = src[sender.hook_name][:, :, sender.head]
        else:
            act[:] = src[sender.hook_name]
        return act

    _, base = run_last(model, target, names=[before, after])
    _, swapped = run_last(model, target, names=[before, after], fwd_hooks=[(sender.hook_name, swap)])
    assert torch.allclose(swapped[before], base[before])  # the swap starts at the sender
    delta = swapped[after] - base[after]

    def add(act, hook):
        return act + delta

    logits, _ = run_last(model, target, fwd_hooks=[(FINAL_RESID, add)])
    return metric(logits)


def test_patch_paths_to_logits_equals_adding_the_residual_change(tiny_model):
    clean, corrupted, means, metric = random_circuit_task(tiny_model)
    senders = [Component("head", 0, 1), Component("head", 2, 3), Component("mlp", 1), Component("mlp", 2)]
    got = patch_paths_to_logits(tiny_model, corrupted, senders, metric, source=clean)
    unpatched = metric(run_last(tiny_model, corrupted)[0])
    for s, row in zip(senders, got):
        expected = _reference(tiny_model, corrupted, clean, metric, s)
        assert torch.allclose(row, expected, atol=1e-4), (s, row, expected)
    assert (got - unpatched).abs().max() > 1e-3  # the paths matter: the check has teeth
    same = patch_paths_to_logits(tiny_model, clean, senders, metric, source=clean)
    assert torch.allclose(same, metric(run_last(tiny_model, clean)[0]).expand_as(same), atol=1e-5)


def test_patch_paths_to_logits_with_means_and_tokens(tiny_model):
    clean, corrupted, means, metric = random_circuit_task(tiny_model)
    senders = [Component("head", 1, 0), Component("mlp", 0)]
    ablate = Circuit([(1, 0), (2, 1)], [0, 2]).complement(tiny_model)
    full = patch_paths_to_logits(tiny_model, clean, senders, metric, means=means, ablate=ablate)
    cheap = patch_paths_to_logits(tiny_model, clean, senders, metric, means=means, ablate=ablate,
                                  tokens=metric.answer_ids)
    assert torch.allclose(cheap, full, atol=1e-4)
    assert full.shape == (2, len(clean))


def test_patch_paths_to_logits_errors(tiny_gpt2):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    head = [Component("head", 0, 0)]
    with pytest.raises(MechbookError, match="source= .* or means="):
        patch_paths_to_logits(tiny_gpt2, clean, head, metric)
    with pytest.raises(MechbookError, match="no senders"):
        patch_paths_to_logits(tiny_gpt2, clean, [], metric, means=means)
    with pytest.raises(MechbookError, match="out of range"):
        patch_paths_to_logits(tiny_gpt2, clean, [Component("head", 0, 99)], metric, means=means)
    with pytest.raises(MechbookError, match="ablate= needs means="):
        patch_paths_to_logits(tiny_gpt2, clean, head, metric, source=corrupted, ablate=[Component("mlp", 1)])
    with pytest.raises(MechbookError, match="pair up"):
        patch_paths_to_logits(tiny_gpt2, clean, head, metric, source=corrupted.select(slice(0, 2)))


def test_circuit_edge_scores(tiny_model):
    clean, corrupted, means, metric = random_circuit_task(tiny_model)
    circuit = Circuit([(0, 0), (0, 1), (1, 2), (2, 3)], [0, 1, 2])
    edges = circuit_edge_scores(tiny_model, clean, circuit, means, metric, threshold=0.8)
    qkv = edges[edges["input"] != "resid"]
    assert len(qkv) == len(circuit_edges(tiny_model, circuit)) == 3 * (2 + 3)
    resid = edges[edges["input"] == "resid"]
    assert list(resid["sender"]) == ["0.0", "0.1", "1.2", "2.3"] and set(resid["receiver"]) == {RESID}
    assert (edges["kept"] == (edges["score"] < 80.0)).all()
    assert {"sender", "receiver", "input", "score", "kept", "sender_layer", "receiver_layer"} <= set(edges.columns)
    assert edges.attrs["threshold"] == 0.8 and edges.attrs["circuit_score"] is not None
    loose = circuit_edge_scores(tiny_model, clean, circuit, means, metric, threshold=1.0)
    assert torch.allclose(torch.tensor(loose["score"].values), torch.tensor(edges["score"].values))
    assert loose["kept"].sum() >= edges["kept"].sum()
    with_mlps = circuit_edge_scores(tiny_model, clean, circuit, means, metric, mlp_senders=True, to_logits=False)
    assert "mlp" in set(with_mlps["sender_kind"]) and "resid" not in set(with_mlps["input"])


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, True, "0.8"])
def test_circuit_edge_scores_threshold_validation(tiny_gpt2, bad):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match="threshold=0.8"):
        circuit_edge_scores(tiny_gpt2, clean, Circuit([(0, 0), (1, 1)], []), means, metric, threshold=bad)


def test_circuit_edge_scores_needs_heads_and_a_fitting_circuit(tiny_gpt2):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match="no heads"):
        circuit_edge_scores(tiny_gpt2, clean, Circuit([], [0, 1]), means, metric)
    with pytest.raises(MechbookError, match="does not fit"):
        circuit_edge_scores(tiny_gpt2, clean, Circuit([(0, 0), (9, 1)], []), means, metric)
    with pytest.raises(MechbookError, match="no edges"):
        circuit_edge_scores(tiny_gpt2, clean, Circuit([(1, 0), (1, 1)], []), means, metric, to_logits=False)


def _table():
    rows = [("numerals", "0.1", "2.0", "q", 70.0), ("numerals", "0.1", "2.0", "k", 90.0),
            ("numerals", "1.2", "2.0", "v", 50.0), ("numerals", "2.0", RESID, "resid", 40.0),
            ("months", "0.1", "1.2", "k", 95.0), ("months", "1.2", RESID, "resid", 60.0)]
    df = pd.DataFrame(rows, columns=["task", "sender", "receiver", "input", "score"])
    df["kept"] = df["score"] < 80
    df["sender_kind"] = "head"
    df["sender_layer"] = df["sender"].str.split(".").str[0].astype(int)
    df["sender_head"] = df["sender"].str.split(".").str[1].astype(int)
    return df


def test_edge_counts():
    counts = edge_counts(_table())
    assert list(counts["task"].unique()) == ["numerals", "months"]  # first-seen order of the tasks
    numerals = counts[counts.task == "numerals"].set_index("input")
    assert list(numerals.index) == ["q", "k", "v", "resid", "all"]
    assert numerals.loc["all", "tested"] == 4 and numerals.loc["all", "kept"] == 3
    assert numerals.loc["k", "kept"] == 0 and numerals.loc["v", "share_kept"] == 1.0
    with pytest.raises(MechbookError, match="task column"):
        edge_counts(_table().drop(columns="task"))


def test_circuit_diagram(tiny_gpt2):
    circuits = {"numerals": Circuit([(0, 1), (1, 2), (2, 0)], [0]), "months": Circuit([(0, 1), (1, 2)], [])}
    fig = circuit_diagram(_table(), tiny_gpt2, circuits=circuits, title="test")
    assert len(fig.axes) == 2 and fig.axes[0].get_title().startswith("numerals: 3 of 4")
    plt.close(fig)
    with pytest.raises(MechbookError, match="task column"):
        circuit_diagram(_table().drop(columns="task"), tiny_gpt2, title="x")
