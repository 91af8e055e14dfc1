"""Paper A's figures draw from hand-made tidy tables, and each chapter's figure cell calls one of them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from mechbook.core.errors import MechbookError
from mechbook.papers.vector_arithmetic import figures, stages

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def lens_of(argument_ranks, answer_ranks, prompt=0, **extra) -> pd.DataFrame:
    """A hand-made lens table for one prompt: ranks per layer of argument and answer."""
    rows = []
    for layer, (arg, ans) in enumerate(zip(argument_ranks, answer_ranks)):
        for target, rank in (("argument", arg), ("answer", ans)):
            rows.append({"prompt": prompt, "layer": layer, "target": target, "rank": rank,
                         "reciprocal_rank": 1 / rank, "prob": 0.9 if rank == 1 else 0.01, **extra})
    return pd.DataFrame(rows)


def test_lens_figures_draw_from_tidy_tables():
    lens = pd.concat(
        [lens_of([5, 1, 2, 2], [9, 3, 1, 1], prompt=p, task=t) for t in ("capitals", "past_tense") for p in range(3)]
    )
    fig = figures.lens_over_layers(lens, model_name="hand-made", n_layers=4)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlim() == (-0.5, 3.5)
    assert fig._suptitle.get_text() == "Logit lens at the last position, hand-made"
    per_prompt = stages.stage_layers(lens, by=["task"])
    summary = stages.summarize_stages(per_prompt, by=["task"])
    fig = figures.lens_by_task(lens, model_name="hand-made", n_layers=4, summary=summary,
                               task_labels={"past_tense": "past tense"})
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes[:2]] == ["capitals (3 prompts)", "past tense (3 prompts)"]
    fig = figures.stage_distribution(per_prompt, model_name="hand-made", n_layers=4)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["capitals", "past_tense"]
    with pytest.raises(MechbookError, match="'task' column"):
        figures.lens_by_task(lens.drop(columns="task"), model_name="x")
    with pytest.raises(MechbookError, match="'task' column"):
        figures.stage_distribution(per_prompt.drop(columns="task"), model_name="x")


def test_accuracy_bars():
    table = pd.DataFrame(
        {"task": ["capitals", "past_tense", "past_tense", "past_tense"], "group": ["all", "all", "irregular", "regular"],
         "n": [10, 8, 4, 4], "accuracy": [0.5, 0.25, 0.25, 0.25]}
    )
    table[["ci_low", "ci_high"]] = [stages.wilson_interval(round(a * n), n) for a, n in zip(table.accuracy, table.n)]
    fig = figures.accuracy_bars(table, model_name="hand-made", task_labels={"past_tense": "past tense"})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["capitals", "past tense"]
    assert len(fig.axes[0].patches) == 4  # one bar per task and group


def test_ffn_update_figures():
    tasks = ["capitals", "past_tense"]
    effects = pd.DataFrame([{"task": t, "prompt": p, "layer": layer, "rr_jump": 0.1 * layer}
                            for t in tasks for p in range(3) for layer in range(4)])
    per_prompt = pd.DataFrame({"task": ["capitals"] * 3 + ["past_tense"] * 3, "layer": [2, 2, 3, 1, 2, 2]})
    function_layer = pd.DataFrame({"task": tasks, "median_layer": [2, 2]})
    fig = figures.function_layers(effects, per_prompt, function_layer, model_name="hand-made", n_layers=4)
    assert len(fig.axes) == 2 and fig.axes[1].get_xlim() == (-0.5, 3.5)
    cosine = pd.DataFrame(
        [{"layer": layer, "task": t, "comparison": "within task", "mean_cosine": 0.5} for t in tasks for layer in range(4)]
        + [{"layer": layer, "task": "capitals vs past_tense", "comparison": "across tasks", "mean_cosine": 0.1}
           for layer in range(4)]
    )
    fig = figures.o_cosine_by_layer(cosine, function_layer, model_name="hand-made", n_layers=4)
    assert "hand-made" in fig.axes[0].get_title()


def test_transplant_and_ffn_removal_figures():
    prompts = pd.DataFrame([{"task": t, "domain": d, "method": m, "rank_before": 10, "rank_after": r}
                            for t in ("capitals", "past_tense") for d in ("in-domain", "out-of-domain")
                            for m, r in (("add o", 3), ("replace FFNs with o", 1))])
    fig = figures.transplant_ranks(prompts, model_name="hand-made")
    assert [ax.get_title() for ax in fig.axes] == ["add o", "replace FFNs with o"]
    assert fig.axes[0].get_xscale() == "log"
    items = pd.DataFrame([{"task": t, "variant": v, "item": i, "layers_removed": k, "fraction_removed": k / 4,
                           "n_layers": 4, "correct": bool((i + k) % 2)}
                          for t in ("capitals", "past_tense") for v in ("abstractive", "extractive")
                          for i in range(3) for k in (0, 2, 4)])
    fig = figures.ffn_removal_curves(items, model_name="hand-made")
    assert [ax.get_title() for ax in fig.axes] == ["capitals (n=3)", "past_tense (n=3)"]
    assert np.isclose(fig.axes[0].lines[-1].get_xdata()[0], figures.PAPER_POINT)


def _figure_cells(path: Path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code" and any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
            yield cell


@pytest.mark.parametrize("chapter", sorted(p.name for p in (ROOT / "book").glob("a*.ipynb")))
def test_each_figure_cell_calls_one_function_of_figures_and_stays_collapsed(chapter):
    cells = list(_figure_cells(ROOT / "book" / chapter))
    for cell in cells:
        source = "".join(cell["source"])
        assert "hide-input" in cell["metadata"].get("tags", []), f"{chapter}: a figure cell is not collapsed"
        body = ast.parse(source).body
        assert len(body) == 1, f"{chapter}: a figure cell does more than draw:\n{source}"
        call = body[0].value
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute), source
        assert isinstance(call.func.value, ast.Name) and call.func.value.id == "figures", source
        assert callable(getattr(figures, call.func.attr, None)), f"{chapter}: figures.{call.func.attr} is not a figure"


def test_the_jittered_stage_figure_is_the_same_on_every_run_and_leaves_numpy_alone():
    lens = pd.concat([lens_of([5, 1, 2, 2], [9, 3, 1, 1], prompt=p, task="capitals") for p in range(5)])
    per_prompt = stages.stage_layers(lens, by=["task"])

    def dots():
        fig = figures.stage_distribution(per_prompt, model_name="hand-made", n_layers=4)
        return np.concatenate([c.get_offsets() for c in fig.axes[0].collections if len(c.get_offsets())])

    np.random.seed(1)
    expected_next = np.random.random()
    np.random.seed(1)
    first = dots()
    assert np.random.random() == expected_next  # the caller's generator goes on as if no figure had been drawn
    np.random.seed(2)
    assert np.array_equal(first, dots())  # the same dots whatever the global state
