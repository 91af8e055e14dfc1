"""Paper B's figures (mechbook.papers.seqcont.figures) draw from small tables of the shapes the chapters compute."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from mechbook import MechbookError
from mechbook.core.circuits import Circuit
from mechbook.core.names import Component
from mechbook.papers.seqcont import components, figures, sequences

TASKS = ("numerals", "numwords", "months")
THREE = {"numerals": Circuit([(0, 1), (1, 0), (1, 1)], [0, 1], score=81.2),
         "numwords": Circuit([(0, 1), (1, 1)], [1], score=90.0), "months": Circuit([(0, 1), (0, 0)], [1, 0])}


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_b1_behaviour():
    behaviour = pd.DataFrame([{"task": t, "template": m, "solved_fraction": 0.5, "top1_accuracy": 0.25}
                              for t in TASKS for m in ("done", "names")])
    fig = figures.behaviour_bars(behaviour, ratio=2.0, title="behaviour")
    assert fig.axes[0].get_title() == "solved: p(next) > 2 x p(last shown)"
    scores = pd.DataFrame({"task": ["numerals", "numerals", "numwords", "months"],
                           "corr": [" 5", " 10", " five", " May"], "solved": [True, False, True, True]})
    fig = figures.solved_by_member(scores, TASKS, title="by member")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["5", "10"]  # in sequence order
    assert "next" not in scores.columns  # the caller's table is left as it was


def test_b2_pruning_and_circuits(tiny_gpt2):
    log = pd.DataFrame({"round": [1, 1, 1], "pass": ["backward", "backward", "forward"], "circuit_size": [9, 8, 8]})
    fig = figures.pruning_progress({"numerals": log, "months": log}, title="pruning")
    assert fig.axes[0].get_title() == "pruning"
    fig = figures.circuit_heatmaps(THREE, tiny_gpt2.n_layers, tiny_gpt2.n_heads, title="circuits")
    assert len(fig.axes) == 3 and fig.axes[0].get_title().endswith("score 81%")


def test_b3_edges(tiny_gpt2, edge_table):
    edges = edge_table.assign(circuit_score=85.0)
    fig = figures.edge_scores(edges, ["numerals", "months"], threshold=0.8, title="edges")
    assert fig.axes[0].get_xlabel().startswith("circuit score")
    circuits = {"numerals": Circuit([(0, 1), (1, 2), (2, 0)], [0]), "months": Circuit([(0, 1), (1, 2)], [])}
    fig = figures.circuit_diagram(edge_table, tiny_gpt2, circuits=circuits, title="test")
    assert len(fig.axes) == 2 and fig.axes[0].get_title().startswith("numerals: 3 of 4")
    with pytest.raises(MechbookError, match="task column"):
        figures.circuit_diagram(edge_table.drop(columns="task"), tiny_gpt2, title="x")


def test_b4_overlap_and_cross_task(tiny_gpt2):
    fig = figures.overlap_heatmap(THREE, tiny_gpt2.n_layers, tiny_gpt2.n_heads, title="overlap")
    assert fig.axes[0].get_title() == "overlap"
    cross = pd.DataFrame([{"circuit_task": c, "eval_task": e, "score": 50.0, "random_mean": -3.0}
                          for c in [*TASKS, "shared"] for e in TASKS])
    fig = figures.cross_task_heatmaps(cross, TASKS, n_random=10, title="cross")
    assert len(fig.axes) == 3 and "mean of 10" in fig.axes[1].get_title()


def test_b5_components(tiny_model):
    effects = pd.DataFrame([
        {"task": t, "kind": kind, "layer": l, "head": h if kind == "head" else None, "effect": float(l - (h or 0))}
        for t in ("a", "b") for l in range(3) for kind, heads in (("head", range(4)), ("mlp", [None])) for h in heads
    ])  # fmt: skip
    fig = figures.effect_heatmaps(effects, title="effects")
    assert len(fig.axes) == 3  # two panels and one colour bar
    figures.mlp_effects(effects, title="mlps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sequences.SeqPromptWarning)
        prompts = sequences.make_prompts("numwords", template="{member}", n_prompts=2, n_members=3, starts=[1, 2],
                                         tokenizer=tiny_model.tokenizer)
    heads = [Component("head", 0, 0), Component("head", 1, 1)]
    frames = {"in order": components.attention_frame(tiny_model, prompts, 0, heads),
              "again": components.attention_frame(tiny_model, prompts, 1, heads)}
    fig = figures.attention_heatmaps(frames, title="attention")
    assert len(fig.axes[0].get_xticklabels()) == len(prompts.prompt_ids[0])
    assert len(figures.attention_by_task({"a": frames, "b": frames}, model_name="tiny")) == 2
    attention = pd.DataFrame([{"task": t, "head": h, "order": o, "on_members": 0.5}
                              for t in TASKS for h in ("0.0", "1.1") for o in ("in order", "shuffled")])
    figures.member_attention_bars(attention, TASKS, ["0.0", "1.1"], title="members")
    summary = pd.DataFrame([{"task": t, "head": h, "successor_top_k": 0.5, "next_top_among_members": 0.25}
                            for t in TASKS for h in ("0.0", "1.1")])
    fig = figures.successor_bars(summary, ["1.1", "0.0"], top_k=5, title="successor")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1.1", "0.0"]
    lens = pd.DataFrame([{"task": t, "prompt": p, "layer": l, "target": g, "reciprocal_rank": 1 / (l + 1)}
                         for t in TASKS for p in range(2) for l in range(3) for g in ("last shown", "next")])
    figures.lens_ranks(lens, TASKS, title="lens")


def test_b6_knockouts():
    families = ["numerals", "intervals"]
    conditions = ["full", "shared", "random", "shared heads", "random heads"]
    effects = pd.DataFrame([{"family": f, "condition": c, "accuracy": 0.5, "accuracy_sd": 0.1, "logit_diff": 1.0,
                             "logit_diff_sd": 0.2} for f in families for c in conditions])
    fig = figures.knockout_bars(effects, families, conditions, n_random=5, title="knockouts")
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 5
    per_set = pd.DataFrame([{"family": f, "kind": k, "accuracy_drop": d} for f in families
                            for k, d in (("shared", 0.8), ("random", 0.1), ("random", 0.2), ("shared heads", 0.5),
                                         ("random heads", 0.0))])
    state = np.random.get_state()
    fig = figures.drops_against_random(per_set, families, THREE["numerals"], n_random=2, title="drops")
    assert fig.axes[0].get_title() == "whole sub-circuit (5 components)"
    again = figures.drops_against_random(per_set, families, THREE["numerals"], n_random=2, title="drops")
    # the jitter is the same on every run, and the global generator is left as it was
    assert np.array_equal(fig.axes[0].collections[0].get_offsets(), again.axes[0].collections[0].get_offsets())
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_b7_stability():
    agree = pd.DataFrame([{"task": t, "n_prompts": n, "comparison": c, "heads": 0.5, "mlps": 0.9}
                          for t in TASKS for n in (8, 16) for c in ("across seeds", "with next size")])
    figures.agreement_lines(agree, [8, 16], stable=0.9, title="agreement")
    runs = pd.DataFrame([{"task": t, "n_prompts": n, "seed": s, "n_heads": 3, "n_mlps": 2, "score": 85.0,
                          "score_low": 80.0, "score_high": 90.0} for t in TASKS for n in (8, 16) for s in (0, 1)])
    fig = figures.sizes_and_scores(runs, [8, 16], [0, 1], threshold=0.2)
    assert np.isclose(fig.axes[2].get_lines()[-1].get_ydata()[0], 80.0)
    margins = pd.DataFrame([{"task": t, "n_prompts": n, "seed": s, "head": h, "kept_by": by, "in_circuit": m <= 0,
                             "margin": m} for t in TASKS for n in (8, 16) for s in (0, 1)
                            for h, by, m in (("1.0", "every seed", -12.0), ("2.1", "some seeds", 0.5 - s))])
    fig = figures.decision_margins(margins, TASKS, title="margins")
    assert len(fig.axes) == len(TASKS) and fig.axes[0].get_title() == TASKS[0]
    # every head and seed is one point, the bar one grey line at 0
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 2 * 2 * 2
    assert fig.axes[0].get_lines()[-1].get_ydata()[0] == 0
