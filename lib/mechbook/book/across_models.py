"""Setting models side by side: the chapters' saved results, stacked, beside the papers' numbers.

Reads whatever complete chapter results exist under the results folder (one folder per
model, see :mod:`mechbook.book.results`), so a new run on another model shows up without
code changes. Numbers the papers report for their own models are kept here, each with
where it comes from, and are always marked as the paper's ("GPT-2 small (paper)").

Every ``*_table`` function returns a tidy DataFrame with a ``model`` column, or None when
no model has the chapter's results (or they lack the columns this module reads);
:func:`missing_note` then says which command writes them. A results root that does not
exist is refused (:func:`mechbook.book.results.existing_root`): a mistyped path is not
"no model has results".
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from mechbook.book.provenance import PACKAGES, duration, link, weights_text
from mechbook.book.results import MARKER, complete_markers, default_root, load_json, load_table
from mechbook.core import stats
from mechbook.core.errors import MechbookError
from mechbook.papers.seqcont import reported as seqcont_reported
from mechbook.papers.seqcont import stability as seqcont_stability
from mechbook.papers.vector_arithmetic import reported as vector_arithmetic_reported

PAPER_SUFFIX = " (paper)"

# The papers' numbers, as (quantity, task, condition, model, value, source), from each paper's ``reported`` module.
PAPER_NUMBERS = pd.concat([vector_arithmetic_reported.NUMBERS, seqcont_reported.NUMBERS], ignore_index=True)
GPT2_SMALL_HEADS = seqcont_reported.GPT2_SMALL_HEADS
PAPER_TASK_NAMES = {"number words": "numwords", "numerals": "numerals"}
BOOK_TASK = vector_arithmetic_reported.BOOK_TASKS  # the book's stand-in tasks for the paper's


def paper_rows(quantity_prefix: str) -> pd.DataFrame:
    """The papers' numbers whose quantity starts with ``quantity_prefix``."""
    return PAPER_NUMBERS[PAPER_NUMBERS.quantity.str.startswith(quantity_prefix)].reset_index(drop=True)


def is_paper(model: str) -> bool:
    return model.endswith(PAPER_SUFFIX)


# ------------------------------------------------------------------------ reading


def collect(chapter: str, name: str, root: str | Path | None = None, columns: Sequence[str] = ()) -> pd.DataFrame | None:
    """A chapter's table across every model that has complete results, or None if no model has.

    Models whose table lacks one of ``columns`` (results of another version of the
    chapter) are left out, so that one odd folder does not hide the others.
    """
    try:
        table = load_table(chapter, name, root=root)
    except MechbookError as exc:
        if "no complete results" in str(exc):
            return None
        raise
    if columns:
        complete = table.groupby("model", sort=False)[list(columns)].apply(lambda t: t.notna().any().all()) \
            if set(columns) <= set(table.columns) else pd.Series(False, index=table.model.unique())
        table = table[table.model.isin(complete[complete].index)]
    return table.reset_index(drop=True) if len(table) else None


def chapter_key(chapter: str) -> str:
    """``b2_node_pruning`` -> ``b2``."""
    match = re.match(r"^([a-z]\d+)", chapter)
    return match[1] if match else chapter


def missing_note(chapter: str, model_name: str = "gemma3-270m") -> str:
    """The one line shown where a chapter's results are absent for every model."""
    return (f"No model has results of chapter `{chapter}` yet: `python -m mechbook run --model {model_name} "
            f"--chapters {chapter_key(chapter)}` writes them (any model name from `python -m mechbook models`).")


def order_models(models: Sequence[str], first: str | None = None) -> list[str]:
    """Measured models (``first`` leading, the rest by name), then the papers' models."""
    unique = list(dict.fromkeys(models))
    measured = sorted(m for m in unique if not is_paper(m))
    if first in measured:
        measured = [first] + [m for m in measured if m != first]
    return measured + sorted(m for m in unique if is_paper(m))


def model_palette(models: Sequence[str]) -> dict[str, object]:
    """Colours for measured models, greys for the papers' models, the same in every figure."""
    measured = [m for m in models if not is_paper(m)]
    papers = [m for m in models if is_paper(m)]
    colours = dict(zip(measured, sns.color_palette("deep", max(len(measured), 1))))
    greys = sns.color_palette("Greys", len(papers) + 2)[2:] if papers else []
    return colours | dict(zip(papers, greys))


# ------------------------------------------------------------------- the sections


def icl_accuracy_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper A, chapter a2: in-context accuracy per task (all items of a task)."""
    table = collect("a2_tasks_accuracy", "accuracy", root, ["task", "group", "accuracy", "n"])
    if table is None:
        return None
    table = table[table.group == "all"]
    keep = [c for c in ["model", "task", "n_shots", "n", "accuracy", "ci_low", "ci_high"] if c in table.columns]
    return table[keep].reset_index(drop=True)


def function_layer_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper A, chapters a3/a4: where the function is applied, as a fraction of depth, with the paper's 2/3."""
    frames = []
    stages = collect("a3_three_stages", "stages", root, ["task", "stage", "median_layer", "fraction_of_depth", "n_layers"])
    if stages is not None:
        stages = stages[stages.stage == "function_application"]
        frames.append(stages.assign(measure="a3: answer overtakes the argument (logit lens)"))
    update = collect("a4_ffn_update", "function_layer", root, ["task", "median_layer", "fraction_of_depth", "n_layers"])
    if update is not None:
        frames.append(update.assign(measure="a4: the MLP that raises the answer most"))
    if not frames:
        return None
    cols = ["model", "task", "measure", "median_layer", "n_layers", "fraction_of_depth"]
    measured = pd.concat([f[cols] for f in frames], ignore_index=True)
    paper = paper_rows("function layer").assign(median_layer=float("nan"), n_layers=float("nan"),
                                                 fraction_of_depth=lambda t: t.value)
    # The paper's one number stands beside each measure.
    paper = pd.concat([paper.assign(measure=measure) for measure in measured.measure.unique()], ignore_index=True)
    return pd.concat([measured, paper[cols]], ignore_index=True)


TRANSPLANT_METHOD = "replace FFNs with o"  # the paper's set-up: o stands in for the later FFNs


def transplant_table(root: str | Path | None = None, method: str = TRANSPLANT_METHOD) -> pd.DataFrame | None:
    """Paper A, chapter a5: how often transplanting o has no effect, with the paper's failure rates."""
    table = collect("a5_transplant", "transplant", root, ["task", "domain", "method", "failure_rate"])
    if table is None:
        return None
    table = table[table.method == method]
    keep = [c for c in ["model", "task", "domain", "failure_rate", "median_rank_before", "median_rank_after",
                        "top1_rate_after", "n"] if c in table.columns]
    paper = paper_rows("transplant failure")
    paper = pd.DataFrame({"model": paper.model, "task": paper.task.replace(BOOK_TASK),
                          "domain": paper.quantity.str.split(", ").str[1],
                          "failure_rate": paper.value})
    return pd.concat([table[keep], paper], ignore_index=True)


def ffn_ablation_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper A, chapter a6: accuracy as the top FFNs are removed, abstractive vs extractive."""
    table = collect("a6_abstractive_extractive", "ffn_ablation", root,
                    ["task", "variant", "fraction_removed", "accuracy"])
    if table is None:
        return None
    return table[[c for c in ["model", "task", "variant", "layers_removed", "fraction_removed", "n_layers", "accuracy", "n"]
                  if c in table.columns]]


def ffn_ablation_drop(ablation: pd.DataFrame, fraction: float = 1 / 3) -> pd.DataFrame:
    """Accuracy lost when the top ``fraction`` of FFNs is removed (the ablation step nearest it), beside the paper's.

    BLOOM-176B in the paper: 24 of 70 FFNs (about 1/3).
    """
    rows = []
    for (model, task, variant), group in ablation.groupby(["model", "task", "variant"], sort=False):
        intact = group.loc[group.fraction_removed.idxmin()]
        step = group.loc[(group.fraction_removed - fraction).abs().idxmin()]
        row = {"model": model, "task": task, "variant": variant, "fraction_removed": step.fraction_removed,
               "accuracy_intact": intact.accuracy, "accuracy_after": step.accuracy,
               "drop": intact.accuracy - step.accuracy}
        if "n" in group.columns:
            row["n_intact"], row["n_after"] = int(intact.n), int(step.n)
        rows.append(row)
    paper = paper_rows("FFN ablation")
    paper = pd.DataFrame({"model": paper.model, "task": paper.task.replace(BOOK_TASK), "variant": paper.condition,
                          "fraction_removed": 24 / 70, "drop": paper.value})
    return pd.concat([pd.DataFrame(rows), paper], ignore_index=True)


def sequence_behaviour_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper B, chapter b1: how often the model continues the sequence, per task (templates pooled)."""
    table = collect("b1_sequence_data", "behaviour", root, ["task", "n", "top1_accuracy"])
    if table is None:
        return None
    measures = [c for c in ["top1_accuracy", "solved_fraction"] if c in table.columns]
    weighted = table[measures].multiply(table.n, axis=0).assign(model=table.model, task=table.task, n=table.n)
    pooled = weighted.groupby(["model", "task"], sort=False).sum()
    pooled[measures] = pooled[measures].divide(pooled.n, axis=0)
    pooled = pooled.reset_index()
    # 95% Wilson interval of the top-1 accuracy over the task's prompts
    bounds = [stats.wilson_interval(round(r.top1_accuracy * r.n), int(r.n)) for r in pooled.itertuples()]
    pooled["ci_low"], pooled["ci_high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return pooled


def with_interval(value, low, high, fmt: str = ".2f") -> list:
    """``"value (low–high)"`` for each value and its 95% interval; the value alone where there is no
    interval, NaN where there is no value (a paper's row lacking that number), so tables can drop it."""
    return [np.nan if pd.isna(v) else f"{v:{fmt}}" + (f" ({lo:{fmt}}–{hi:{fmt}})" if pd.notna(lo) and pd.notna(hi) else "")
            for v, lo, hi in zip(value, low, high)]


def circuit_size_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper B, chapter b2: circuit size per task, also as a share of all heads, with the paper's head counts."""
    table = collect("b2_node_pruning", "summary", root, ["task", "n_heads", "n_mlps"])
    if table is None:
        return None
    # score_low/score_high: the score's 95% bootstrap interval over the task's prompts (NaN for results saved
    # before b2 computed it)
    table = table.reindex(columns=[c for c in ["model", "task", "n_heads", "n_mlps", "score", "score_low", "score_high",
                                               "threshold", "n_prompts", "draws", "kept_in"]
                                   if c in table.columns or c.startswith("score_")])
    totals = {model: info.get("n_layers", 0) * info.get("n_heads", 0)
              for model, info in load_json("b5_components", "key_heads", root).items()}
    table["share_of_heads"] = [row.n_heads / totals[row.model] if totals.get(row.model) else float("nan")
                               for row in table.itertuples()]
    paper = paper_rows("circuit heads")
    paper = pd.DataFrame({"model": paper.model, "task": paper.task, "n_heads": paper.value,
                          "share_of_heads": paper.value / GPT2_SMALL_HEADS})
    both = pd.concat([table, paper], ignore_index=True)
    return both.astype({c: "Int64" for c in ["n_heads", "n_mlps"] if c in both.columns})


def circuit_choices(sizes: pd.DataFrame) -> dict[str, str]:
    """How chapter b2 chose each measured model's circuits, from :func:`circuit_size_table`: model -> ``"kept in at
    least 60% of 5 draws of 512 prompts"`` or ``"one pruning on 16 prompts"`` (results saved before b2 pruned several
    draws: one pruning)."""
    measured = sizes[~sizes.model.map(is_paper)]
    out = {}
    for model, rows in measured.groupby("model", sort=False):
        draws = int(rows.draws.max()) if "draws" in rows and rows.draws.notna().any() else 1
        share = float(rows.kept_in.max()) if "kept_in" in rows and rows.kept_in.notna().any() else 1.0
        out[model] = seqcont_stability.selection_phrase(draws, share, int(rows.n_prompts.max()))
    return out


def circuit_overlap_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper B, chapters b2/b4: heads and MLPs shared between the tasks' circuits (b2's circuits.json).

    One row per model and pair of tasks (and one for all tasks): shared nodes and the
    Jaccard index (shared / in either). The paper's row counts what all three share.
    """
    circuits = load_json("b2_node_pruning", "circuits", root)
    rows = []
    for model, by_task in circuits.items():
        tasks = [t for t in by_task if isinstance(by_task[t], dict) and "heads" in by_task[t]]
        groups = [tuple(pair) for pair in combinations(tasks, 2)] + ([tuple(tasks)] if len(tasks) > 2 else [])
        for group in groups:
            for kind in ("heads", "mlps"):
                sets = [set(map(_node_label, by_task[t].get(kind, []))) for t in group]
                union = set.union(*sets)
                shared = set.intersection(*sets)
                rows.append({"model": model, "tasks": " & ".join(group) if len(group) < 3 else "all",
                             "kind": kind, "shared": len(shared), "in_either": len(union),
                             "jaccard": len(shared) / len(union) if union else float("nan"),
                             "shared_nodes": " ".join(sorted(shared, key=_node_order))})
    if not rows:
        return None
    paper = [{"model": row.model, "tasks": "all", "kind": "heads" if "heads" in row.quantity else "mlps",
              "shared": row.value} for row in PAPER_NUMBERS[PAPER_NUMBERS.quantity.str.contains("in all three")].itertuples()]
    both = pd.concat([pd.DataFrame(rows), pd.DataFrame(paper)], ignore_index=True)
    return both.astype({"shared": "Int64", "in_either": "Int64"})


def _node_label(node) -> str:
    """A head saved as [layer, head] (b2's circuits.json, the paper's file shape) -> "layer.head"; an MLP -> its layer."""
    return ".".join(map(str, node)) if isinstance(node, (list, tuple)) else str(node)


def _node_order(label: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.]", label))


def cross_task_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper B, chapter b4: each task's circuit scored on each task (% of the full model), with the paper's table."""
    table = collect("b4_shared_circuit", "cross_task", root, ["circuit_task", "eval_task", "score"])
    if table is None:
        return None
    keep = [c for c in ["model", "circuit_task", "eval_task", "score", "score_low", "score_high", "n_prompts",
                        "random_mean", "random_std", "n_random"] if c in table.columns]
    paper = paper_rows("circuit score on")
    paper = pd.DataFrame({
        "model": paper.model,
        "circuit_task": paper.task.str.removesuffix(" circuit"),
        "eval_task": paper.quantity.str.extract(r"circuit score on (.*) \(%\)")[0].map(PAPER_TASK_NAMES),
        "score": paper.value,
    })
    return pd.concat([table[keep], paper], ignore_index=True)


def subcircuit_effects_table(root: str | Path | None = None) -> pd.DataFrame | None:
    """Paper B, chapter b6: accuracy and logit difference per prompt family and ablation condition."""
    table = collect("b6_beyond_tasks", "effects", root, ["family", "condition", "accuracy"])
    if table is None:
        return None
    return table[[c for c in ["model", "family", "condition", "accuracy", "logit_diff", "n_prompts"] if c in table.columns]]


# ------------------------------------------------------------------------ figures


def model_bars(data: pd.DataFrame, *, x: str, y: str, title: str, ylabel: str, xlabel: str | None = None,
               models: Sequence[str] | None = None, col: str | None = None, ylim: tuple | None = None,
               reference: float | None = None, height: float = 3.6, sharey: bool = True):
    """Bars per ``x`` with one colour per model (the papers' models in grey); one panel per ``col``."""
    models = list(models or order_models(data.model))
    data = data[data.model.isin(models)]
    panels = list(dict.fromkeys(data[col])) if col else [None]
    ncols = min(3, len(panels))  # more panels wrap onto further rows
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(min(11, 1.5 + 4.2 * ncols), height * nrows), sharey=sharey,
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    palette = model_palette(models)
    long_labels = data[x].astype(str).str.len().max() > 10
    for ax, panel in zip(axes.flat, panels):
        part = data if panel is None else data[data[col] == panel]
        present = [m for m in models if m in set(part.model)]
        sns.barplot(data=part, x=x, y=y, hue="model", hue_order=present, palette=palette, ax=ax,
                    order=list(dict.fromkeys(part[x])), errorbar=None)
        if reference is not None:
            ax.axhline(reference, color="black", linewidth=0.8, linestyle="--")
        ax.set(xlabel=xlabel if xlabel is not None else x, ylabel=ylabel, title=f"{col}: {panel}" if panel is not None else "")
        if ylim:
            ax.set_ylim(*ylim)
        if long_labels:
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[m]) for m in models]
    fig.legend(handles, models, title="model", loc="upper left", bbox_to_anchor=(1.0, 0.9), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def model_lines(data: pd.DataFrame, *, x: str, y: str, col: str, style: str, title: str, xlabel: str, ylabel: str,
                models: Sequence[str] | None = None, height: float = 3.6):
    """Lines over ``x``, one colour per model and one dash per ``style`` value; one panel per ``col``."""
    models = list(models or order_models(data.model))
    data = data[data.model.isin(models)]
    panels = list(dict.fromkeys(data[col]))
    fig, axes = plt.subplots(1, len(panels), figsize=(11, height), sharey=True, squeeze=False)
    palette = model_palette(models)
    for ax, panel in zip(axes[0], panels):
        sns.lineplot(data=data[data[col] == panel], x=x, y=y, hue="model", hue_order=models, palette=palette, style=style,
                     marker="o", markersize=4, errorbar=None, ax=ax, legend=ax is axes[0][-1])
        ax.set(title=f"{col}: {panel}", xlabel="", ylabel=ylabel, ylim=(-0.02, 1.02))
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.supxlabel(xlabel, fontsize="medium")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------- verdicts


def _rate_row(model: str, claim: str, task: str, condition: str, value: float, low: float, high: float,
              n: int, paper_model: str, paper: float, *, scale: float = 1.0) -> dict:
    """One verdict row; ``scale`` is the top of the number's scale (1 for rates, 100 for scores in percent)."""
    return {"model": model, "claim": claim, "task": task, "condition": condition, "ours": value,
            "ci_low": low, "ci_high": high, "n": n, "paper": paper, "paper_model": paper_model,
            "verdict": stats.verdict(paper, low, high, widest=stats.WIDEST * scale)}


def verdicts_table(tables: dict[str, pd.DataFrame | None]) -> pd.DataFrame | None:
    """Each measured number that has a paper's number beside it, with its 95% interval over prompts and a verdict.

    The verdict (:func:`mechbook.core.stats.verdict`) says whether the paper's number
    lies inside our interval: "holds", "does not hold here", or "cannot tell" (an
    interval half the scale wide or wider). Intervals: Wilson for the transplant
    failure rates (chapter a5, ``n`` prompts per task and domain), Newcombe's hybrid
    score interval for the accuracy lost when the top third of the FFNs is removed
    (chapter a6, ``n`` items before and after), a percentile bootstrap over the task's
    prompts for the cross-task circuit scores (chapter b4, in percent: "cannot tell"
    from 50 points wide).
    """
    rows = []
    transplant = tables.get("transplant")
    if transplant is not None and "n" in transplant.columns:
        paper = transplant[transplant.model.map(is_paper)]
        for r in transplant[~transplant.model.map(is_paper)].itertuples():
            match = paper[(paper.task == r.task) & (paper.domain == r.domain)]
            if not len(match) or not r.n > 0:
                continue
            n = int(r.n)
            low, high = stats.wilson_interval(round(r.failure_rate * n), n)
            rows.append(_rate_row(r.model, "transplant failure rate", r.task, r.domain, r.failure_rate, low, high, n,
                                  match.model.iloc[0], float(match.failure_rate.iloc[0])))
    drop = tables.get("ffn_drop")
    if drop is not None and {"n_intact", "n_after"} <= set(drop.columns):
        paper = drop[drop.model.map(is_paper)]
        for r in drop[~drop.model.map(is_paper)].itertuples():
            match = paper[(paper.task == r.task) & (paper.variant == r.variant)]
            if not len(match) or not (r.n_intact > 0 and r.n_after > 0):
                continue
            n1, n2 = int(r.n_intact), int(r.n_after)
            low, high = stats.difference_interval(round(r.accuracy_intact * n1), n1, round(r.accuracy_after * n2), n2)
            rows.append(_rate_row(r.model, "accuracy lost, top third of FFNs removed", r.task, r.variant, r.drop,
                                  low, high, n1, match.model.iloc[0], float(match["drop"].iloc[0])))
    cross = tables.get("cross_task")
    if cross is not None and {"score_low", "score_high", "n_prompts"} <= set(cross.columns):
        paper = cross[cross.model.map(is_paper)]
        for r in cross[~cross.model.map(is_paper)].itertuples():
            match = paper[(paper.circuit_task == r.circuit_task) & (paper.eval_task == r.eval_task)]
            if not len(match) or not np.isfinite([r.score_low, r.score_high]).all():
                continue
            rows.append(_rate_row(r.model, "circuit score on a task, % of the full model", f"{r.circuit_task} circuit",
                                  f"on {r.eval_task}", r.score, r.score_low, r.score_high, int(r.n_prompts),
                                  match.model.iloc[0], float(match.score.iloc[0]), scale=100.0))
    return pd.DataFrame(rows) if rows else None


# The verdicts as they stood before chapter b2 pruned at the paper's size: every row of verdicts_table() on the
# results committed at e002d3a, where b2 (and so b4's cross-task scores) rested on 16 prompts per task.
EARLIER_VERDICTS = Path(__file__).resolve().parent / "earlier" / "verdicts_b2_16_prompts.csv"
VERDICT_KEY = ["model", "claim", "task", "condition"]


def verdict_changes(verdicts: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
    """Each verdict beside the one the same claim got in ``earlier`` (a table of :func:`verdicts_table`).

    One row per (model, claim, task, condition) in both tables: the number, its interval,
    its ``n`` and its verdict before (``*_before``) and now; ``moved`` where the number or
    its ``n`` differs (it was measured again), ``changed`` where the verdict differs.
    """
    need = [*VERDICT_KEY, "ours", "ci_low", "ci_high", "n", "verdict"]
    for name, table in (("verdicts", verdicts), ("earlier", earlier)):
        if not isinstance(table, pd.DataFrame) or not set(need) <= set(table.columns):
            raise MechbookError(f"{name} must be a table of verdicts_table() (columns {', '.join(need)})")
    for name, table in (("verdicts", verdicts), ("earlier", earlier)):
        twice = table[table.duplicated(VERDICT_KEY)]
        if len(twice):
            raise MechbookError(f"{name} holds {len(twice)} rows twice, e.g. {dict(twice[VERDICT_KEY].iloc[0])}")
    both = earlier[need].merge(verdicts[[*need, "paper"]], on=VERDICT_KEY, suffixes=("_before", ""))
    both["moved"] = (both.n != both.n_before) | ~np.isclose(both.ours, both.ours_before, rtol=1e-4, atol=1e-6)
    both["changed"] = both.verdict != both.verdict_before
    return both[[*VERDICT_KEY, "paper", "n_before", "ours_before", "ci_low_before", "ci_high_before",
                 "verdict_before", "n", "ours", "ci_low", "ci_high", "verdict", "moved", "changed"]]


# ------------------------------------------------------------------ what held here


def _by_model(table: pd.DataFrame, value: str, fmt: str, by: str = "task") -> str:
    parts = []
    for model, group in table.groupby("model", sort=False):
        parts.append(f"{model}: " + ", ".join(f"{getattr(r, by)} {format(getattr(r, value), fmt)}" for r in group.itertuples()))
    return "; ".join(parts)


SECTION_LABELS = {
    "icl_accuracy": "in-context accuracy (a2)", "function_layer": "function-application layer (a3/a4)",
    "transplant": "transplanting o (a5)", "ffn_drop": "FFN removal (a6)", "sequence_behaviour": "sequence continuation (b1)",
    "circuit_size": "circuit size (b2)", "circuit_overlap": "circuit overlap (b2)", "cross_task": "cross-task scores (b4)",
    "subcircuit_effects": "sub-circuit ablation (b6)", "verdicts": "verdicts (a5/a6/b4)",
}


def what_held(tables: dict[str, pd.DataFrame | None], first: str | None = None) -> list[str]:
    """Markdown bullet lines that read the side-by-side tables (keys as in the chapter)."""
    lines = []
    acc = tables.get("icl_accuracy")
    if acc is not None:
        acc = _ordered(acc, first)
        lines.append("- In-context accuracy (Paper A tasks): " + _by_model(acc, "accuracy", ".0%") + ".")
    layer = tables.get("function_layer")
    if layer is not None:
        measured = _ordered(layer[~layer.model.map(is_paper)], first)
        a4 = measured[measured.measure.str.startswith("a4")]
        use = a4 if len(a4) else measured
        if len(use):
            lo, hi = use.fraction_of_depth.min(), use.fraction_of_depth.max()
            lines.append(f"- The function-application layer sits between {lo:.0%} and {hi:.0%} of the depth across "
                         f"models and tasks ({_by_model(use, 'fraction_of_depth', '.2f')}); "
                         f"the paper puts it about {2 / 3:.0%} of the way through GPT-2 medium.")
    transplant = tables.get("transplant")
    if transplant is not None:
        measured = _ordered(transplant[~transplant.model.map(is_paper)], first)
        paper = transplant[transplant.model.map(is_paper)]
        if len(measured):
            parts = []
            for model, group in measured.groupby("model", sort=False):
                merged = group.merge(paper[["task", "domain", "failure_rate"]], on=["task", "domain"], suffixes=("", "_paper"))
                lower = int((merged.failure_rate < merged.failure_rate_paper).sum())
                parts.append(f"{model} fails less often than the paper's GPT-2 in {lower} of {len(merged)} task × domain cells "
                             f"(failure rate {group.failure_rate.min():.0%}–{group.failure_rate.max():.0%})")
            lines.append(f"- Transplanting o ({TRANSPLANT_METHOD}): " + "; ".join(parts) + ".")
    drop = tables.get("ffn_drop")
    if drop is not None:
        measured = _ordered(drop[~drop.model.map(is_paper)], first)
        if len(measured):
            wide = measured.pivot_table(index=["model", "task"], columns="variant", values="drop", sort=False)
            if {"abstractive", "extractive"} <= set(wide.columns):
                more = int((wide.abstractive > wide.extractive).sum())
                lines.append(f"- Removing the top third of the FFNs costs abstractive prompts more accuracy than extractive "
                             f"ones in {more} of {len(wide)} model × task cells; in BLOOM-176B the paper reports "
                             f"drops of 73 vs 17 points.")
    behaviour = tables.get("sequence_behaviour")
    if behaviour is not None:
        lines.append("- Sequence continuation, top-1 accuracy on the paper's prompts: "
                     + _by_model(_ordered(behaviour, first), "top1_accuracy", ".0%") + ".")
    size = tables.get("circuit_size")
    if size is not None:
        measured = _ordered(size[~size.model.map(is_paper)], first)
        if len(measured):
            lines.append("- Circuit heads found by node pruning: " + _by_model(measured, "n_heads", ".0f")
                         + "; the paper's GPT-2 small circuits have 14 (numerals), 19 (number words) and 13 (months).")
    overlap = tables.get("circuit_overlap")
    if overlap is not None:
        shared = _ordered(overlap[(overlap.tasks == "all") & (overlap.kind == "heads") & ~overlap.model.map(is_paper)], first)
        if len(shared):
            lines.append("- Heads in all three tasks' circuits: " + "; ".join(
                f"{r.model}: {r.shared:.0f} of {r.in_either:.0f}" for r in shared.itertuples()) + " (the paper: 8 in GPT-2 small).")
    cross = tables.get("cross_task")
    if cross is not None:
        measured = _ordered(cross[~cross.model.map(is_paper)], first)
        if len(measured):
            off = measured[measured.circuit_task != measured.eval_task]
            own = measured[measured.circuit_task == measured.eval_task]
            lines.append(f"- Cross-task scores: circuits keep {own.score.median():.0f}% of the full model's logit difference on "
                         f"their own task and {off.score.median():.0f}% on the other tasks (medians over models and pairs; "
                         "the paper's GPT-2 small numerals circuit: 81.0% / 48.4% on number words).")
    effects = tables.get("subcircuit_effects")
    if effects is not None:
        parts = []
        for model, group in _ordered(effects, first).groupby("model", sort=False):
            means = group.groupby("condition", sort=False).accuracy.mean()
            parts.append(f"{model}: " + ", ".join(f"{cond} {acc:.0%}" for cond, acc in means.items()))
        lines.append(f"- Sub-circuit ablation on other sequences, accuracy averaged over the "
                     f"{effects.family.nunique()} prompt families: " + "; ".join(parts) + ".")
    judged = tables.get("verdicts")
    if judged is not None:
        parts = []
        for model, group in _ordered(judged, first).groupby("model", sort=False):
            counts = group.verdict.value_counts()
            parts.append(f"{model}: " + ", ".join(f"{label} {counts.get(label, 0)}" for label in
                                                    (stats.HOLDS, stats.DOES_NOT_HOLD, stats.CANNOT_TELL))
                         + f" (of {len(group)})")
        lines.append("- Verdicts on the paper's numbers that have an interval here (transplant failure rates, accuracy "
                     "lost without the top FFNs, cross-task circuit scores; the paper's number inside our 95% "
                     "interval: holds): "
                     + "; ".join(parts) + ".")
    missing = [SECTION_LABELS.get(name, name) for name, table in tables.items() if table is None]
    if missing:
        lines.append(f"- Not yet measured on any model: {', '.join(missing)} (each section above names the command).")
    return lines


def _ordered(table: pd.DataFrame, first: str | None) -> pd.DataFrame:
    order = {m: i for i, m in enumerate(order_models(table.model, first))}
    return table.sort_values("model", key=lambda s: s.map(order), kind="stable")


# --- what produced each model's results -----------------------------------------------------------


def runs(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per model and chapter with complete results: the provenance in its marker, flattened."""
    root = Path(root) if root else default_root()
    rows = []
    for folder, info in complete_markers(root):
        found = info.get("provenance") or {}
        model = found.get("model") or {}
        software = found.get("versions") or {}
        code = found.get("mechbook") or {}
        rows.append({
            "model": info["model"], "chapter": info["chapter"], "date": str(found.get("finished", "–"))[:10],
            "wall time": duration(found.get("wall_seconds")),
            "searches": (info.get("searches") or {}).get("outcome", "–"),
            "weights sha256": (model.get("sha256") or model.get("revision") or "–")[:12],
            "commit": (code.get("commit") or "–")[:10] + (" (dirty)" if code.get("dirty") else ""),
            **{name: software.get(name) or "–" for name in PACKAGES},
            "CPU": (found.get("cpu") or {}).get("name", "–"),
            "weights": weights_text(model).split(": ", 1)[-1] if model else "not recorded (older results)",
            "marker": folder / MARKER,
        })
    return rows


@dataclass
class RunsTable:
    """Provenance per model (weights) and per chapter (date, wall time, commit, versions, CPU)."""

    rows: list[dict[str, Any]]

    COLUMNS = ("chapter", "date", "wall time", "searches", "commit", *PACKAGES, "CPU")

    def _repr_html_(self) -> str:
        parts = []
        for model in dict.fromkeys(r["model"] for r in self.rows):
            mine = [r for r in self.rows if r["model"] == model]
            weights = dict.fromkeys(r["weights"] for r in mine)
            head = "".join(f"<th>{html.escape(c)}</th>" for c in self.COLUMNS)
            body = "".join(
                "<tr>" + "".join(
                    f'<td><a href="{html.escape(link(r["marker"]))}" download>{html.escape(r[c])}</a></td>'
                    if c == "chapter" else f"<td>{html.escape(str(r[c]))}</td>" for c in self.COLUMNS) + "</tr>"
                for r in mine)
            parts.append(f"<p><strong>{html.escape(model)}</strong>: " + "; ".join(map(html.escape, weights))
                         + f'</p><table class="dataframe">{f"<thead><tr>{head}</tr></thead>"}<tbody>{body}</tbody></table>')
        return f'<div class="mechbook-provenance" style="font-size:0.85em">{"".join(parts)}</div>'

    def __repr__(self) -> str:
        lines = []
        for r in self.rows:
            lines.append("  ".join(f"{r[c]}" for c in ("model", *self.COLUMNS)))
        return "\n".join(lines) or "no complete results"


def runs_table(root: str | Path | None = None) -> RunsTable:
    """What produced each model's results, chapter by chapter (each chapter links to its marker)."""
    return RunsTable(runs(root))
