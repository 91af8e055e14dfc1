"""The figures of Paper B's chapters (Lan, Torr & Barez 2024), drawn from the tables the chapters compute.

One function per figure, grouped by chapter; each takes tidy tables (or circuits)
and a title, draws with seaborn and returns the figure (or figures). The chapters
compute; these only draw, so a figure can be redrawn from a chapter's saved results.

- b1 "Sequence continuation: data and behaviour": :func:`behaviour_bars`, :func:`solved_by_member`;
- b2 "Circuit discovery by iterative node pruning": :func:`pruning_progress`, :func:`circuit_heatmaps`;
- b3 "Edges by path patching": :func:`edge_scores`, :func:`circuit_diagram`;
- b4 "The shared sub-circuit": :func:`overlap_heatmap`, :func:`cross_task_heatmaps`;
- b5 "What the components do": :func:`effect_heatmaps`, :func:`mlp_effects`,
  :func:`attention_heatmaps`, :func:`attention_by_task`, :func:`member_attention_bars`,
  :func:`successor_bars`, :func:`lens_ranks`;
- b6 "Beyond the three tasks": :func:`knockout_bars`, :func:`drops_against_random`;
- b7 "How many prompts a circuit needs": :func:`agreement_lines`, :func:`sizes_and_scores`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D

from mechbook.core.circuits import RESID, Circuit
from mechbook.core.errors import MechbookError
from mechbook.core.stats import seeded_numpy
from mechbook.core.loading import LoadedModel
from mechbook.papers.seqcont.components import member_index
from mechbook.papers.seqcont.task_circuits import circuit_grid





# --- b1: behaviour ------------------------------------------------------------------------------------


def behaviour_bars(behaviour: pd.DataFrame, *, ratio: float, title: str):
    """Solved fraction and top-1 accuracy per task and template, side by side (section 3's filter and a stricter test).

    ``behaviour`` is :func:`mechbook.papers.seqcont.components.behaviour_table`'s table.
    """
    long = behaviour.melt(id_vars=["task", "template"], value_vars=["solved_fraction", "top1_accuracy"],
                          var_name="measure", value_name="fraction")
    titles = {"solved_fraction": f"solved: p(next) > {ratio:g} x p(last shown)",
              "top1_accuracy": "top-1 token is the next member"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (measure, part) in zip(axes, long.groupby("measure", sort=False)):
        sns.barplot(data=part, x="task", y="fraction", hue="template", ax=ax)
        ax.set(title=titles[measure], xlabel="", ylim=(0, 1.02))
    axes[0].set_ylabel("fraction of prompts")
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.01, 1), title="template")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def solved_by_member(scores: pd.DataFrame, tasks: Sequence[str], *, title: str):
    """Solved fraction by the member to predict, one panel per task, members in sequence order.

    ``scores`` is :func:`mechbook.papers.seqcont.sequences.score_prompts` output with a ``task`` column.
    """
    scores = scores.assign(next=scores["corr"].str.strip())
    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 3.6), sharey=True)
    for ax, task in zip(axes, tasks):
        part = scores[scores.task == task]
        order = sorted(part["next"].unique(), key=lambda m: member_index(task, m))
        sns.barplot(data=part, x="next", y="solved", order=order, errorbar=None, color="#4C72B0", ax=ax)
        ax.set(title=task, xlabel="next member", ylim=(0, 1.02))
        ax.tick_params(axis="x", rotation=60)
    axes[0].set_ylabel("solved fraction")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- b2: node pruning -----------------------------------------------------------------------------------


def pruning_progress(logs: Mapping[str, pd.DataFrame], *, title: str):
    """The circuit's size after each decision of node pruning, one line per task and pass (section 3).

    ``logs`` maps a task to its pruning's decision log (``Circuit.log`` of
    :func:`mechbook.core.circuits.prune_nodes`: round, pass, circuit_size per decision).
    """
    log = pd.concat([part.assign(task=task) for task, part in logs.items()], ignore_index=True)
    log["decision"] = log.groupby("task").cumcount() + 1
    log["pass"] = "round " + log["round"].astype(str) + ", " + log["pass"]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    sns.lineplot(data=log, x="decision", y="circuit_size", hue="task", style="pass", ax=ax)
    ax.set(xlabel="tentative removal (in the order the passes visit components)",
           ylabel="components in the circuit", title=title)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def _grid_axes(n_panels: int, n_layers: int, n_heads: int):
    width = min(11.0, 1.6 + n_panels * (0.45 * (n_heads + 1) + 0.9))
    height = min(2.2 + 0.26 * n_layers, 10.0)
    fig, axes = plt.subplots(1, n_panels, figsize=(width, height), sharey=True)
    return fig, np.atleast_1d(axes)


def _mark_mlp_column(ax, n_heads: int) -> None:
    ax.axvline(n_heads, color="black", linewidth=1.2)


def circuit_heatmaps(circuits: Mapping[str, Circuit], n_layers: int, n_heads: int, *, title: str):
    """The circuits as layer x head grids (MLPs as an extra column), one panel per task; kept components dark."""
    fig, axes = _grid_axes(len(circuits), n_layers, n_heads)
    cmap = ListedColormap(["#F2F2F2", "#4C72B0"])
    for k, (ax, (task, c)) in enumerate(zip(axes, circuits.items())):
        grid = circuit_grid(c, n_layers, n_heads)
        sns.heatmap(grid, ax=ax, cmap=cmap, vmin=0, vmax=1, cbar=False, linewidths=0.5, linecolor="white")
        _mark_mlp_column(ax, n_heads)
        score = "" if c.score is None else f", score {c.score:.0f}%"
        ax.set(title=f"{task}\n{len(c.heads)} heads, {len(c.mlps)} MLPs{score}", xlabel="head",
               ylabel="layer" if k == 0 else "")
        ax.tick_params(axis="y", rotation=0)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- b3: edges ------------------------------------------------------------------------------------------

EDGE_COLORS = {"q": "#4C72B0", "k": "#DD8452", "v": "#55A868", "resid": "#8C8C8C"}
_BEND = {"q": -0.25, "k": 0.0, "v": 0.25, "resid": 0.0}


def edge_scores(edges: pd.DataFrame, tasks: Sequence[str], *, threshold: float, title: str):
    """Every edge's score without it, one dot per edge colored by input; the threshold dashed, each circuit in red.

    ``edges`` is the edge tables of :func:`mechbook.core.circuits.prune_edges` stacked,
    with ``task`` and ``circuit_score`` columns.
    """
    fig, ax = plt.subplots(figsize=(11, 3.6))
    with seeded_numpy():
        sns.stripplot(data=edges, x="score", y="task", hue="input", dodge=True, jitter=0.25, size=3.5, ax=ax,
                      palette=EDGE_COLORS, hue_order=list(EDGE_COLORS))
    ax.axvline(100 * threshold, color="black", linewidth=1, linestyle="--")
    for i, task in enumerate(tasks):
        ax.plot([edges.loc[edges.task == task, "circuit_score"].iloc[0]] * 2, [i - 0.45, i + 0.45],
                color="#C44E52", linewidth=2)
    ax.set(xlabel="circuit score without the edge (% of full model)", ylabel=None, title=title)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="edge into")
    fig.tight_layout()
    return fig


def _node_xy(label: str, layer: int, head: int | None, n_heads: int) -> tuple[float, float]:
    if head is None:  # an MLP sits left of its layer's heads; resid_post at the top centre
        return (-1.2, layer) if label != RESID else ((n_heads - 1) / 2, layer)
    return float(head), float(layer)


def circuit_diagram(
    edges: pd.DataFrame,
    model: LoadedModel,
    *,
    tasks: Sequence[str] | None = None,
    circuits: Mapping[str, Circuit] | None = None,
    title: str,
):
    """One panel per task: the circuit's heads at (head, layer), the kept edges as arrows colored by input.

    A q/k/v edge ends at its receiver head (q bends one way, v the other, k runs
    straight); a ``resid`` edge ends at ``resid_post`` above the last layer. Heads
    of ``circuits`` without a kept edge are drawn hollow. Line width grows with
    the edge's effect (100 minus its score). The paper draws its edge-pruned circuits so (section 3).
    """
    if "task" not in edges.columns:
        raise MechbookError("circuit_diagram draws one panel per task: the edge table needs a task column")
    tasks = list(tasks or dict.fromkeys(edges["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.7 * len(tasks), 0.32 * model.n_layers + 2.2), sharey=True,
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = edges[edges["task"] == task]
        kept = rows[rows["kept"]]
        nodes: dict[str, tuple[float, float]] = {}
        heads = circuits[task].heads if circuits and task in circuits else sorted(
            {(int(r.sender_layer), int(r.sender_head)) for r in rows.itertuples() if r.sender_kind == "head"})
        for l, h in heads:
            nodes[f"{l}.{h}"] = _node_xy("", l, h, model.n_heads)
        for r in rows.itertuples():
            if r.sender_kind == "mlp":
                nodes.setdefault(r.sender, _node_xy(r.sender, r.sender_layer, None, model.n_heads))
        nodes[RESID] = _node_xy(RESID, model.n_layers, None, model.n_heads)
        used = set(kept["sender"]) | set(kept["receiver"])
        strength = (100.0 - kept["score"]).clip(lower=0)
        scale = float(strength.max()) if len(strength) and strength.max() > 0 else 1.0
        for r, s in zip(kept.itertuples(), strength):
            (x0, y0), (x1, y1) = nodes[r.sender], nodes[r.receiver]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                        arrowprops=dict(arrowstyle="-|>", color=EDGE_COLORS[r.input], lw=0.8 + 2.4 * s / scale,
                                        alpha=0.8, shrinkA=7, shrinkB=7, mutation_scale=9,
                                        connectionstyle=f"arc3,rad={_BEND[r.input]}"))
        for label, (x, y) in nodes.items():
            on = label in used
            ax.scatter([x], [y], s=150 if label != RESID else 260, zorder=2, marker="o" if label != RESID else "s",
                       facecolor="#F2C2C2" if on else "white", edgecolor="#444444" if on else "#AAAAAA", linewidth=1)
            ax.annotate(label.replace("MLP ", "M") if label != RESID else "logits", (x, y),
                        xytext=(0, -1) if label != RESID else (0, 9), textcoords="offset points", ha="center",
                        va="center" if label != RESID else "bottom", fontsize=6.5 if label != RESID else 8, zorder=3,
                        color="black" if on else "#888888")
        n_kept = len(kept)
        ax.set(title=f"{task}: {n_kept} of {len(rows)} edges kept", xlabel="head",
               xlim=(-1.8, model.n_heads - 0.4), ylim=(-0.8, model.n_layers + 0.8))
        ax.set_xticks(range(model.n_heads))
        ax.grid(axis="x", visible=False)
    axes[0][0].set_ylabel("layer")
    axes[0][0].set_yticks(list(range(0, model.n_layers, max(1, model.n_layers // 10))) + [model.n_layers])
    axes[0][0].set_yticklabels([str(t) for t in axes[0][0].get_yticks()[:-1]] + ["out"])
    handles = [plt.Line2D([0], [0], color=c, lw=2, label=k if k != "resid" else "to logits")
               for k, c in EDGE_COLORS.items()]
    fig.legend(handles=handles, title="edge into", loc="upper right", bbox_to_anchor=(1.0, 0.93), fontsize=8,
               title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    return fig


# --- b4: the shared sub-circuit -------------------------------------------------------------------------


def overlap_heatmap(circuits: Mapping[str, Circuit], n_layers: int, n_heads: int, *, title: str):
    """One layer x head grid (MLPs as an extra column) colored by how many circuits hold each component (section 4)."""
    counts = sum(circuit_grid(c, n_layers, n_heads) for c in circuits.values())
    n = len(circuits)
    fig, axes = _grid_axes(1, n_layers, n_heads)
    ax = axes[0]
    colors = ["#F2F2F2"] + sns.color_palette("Blues", n)
    labels = counts.apply(lambda col: col.map(lambda v: f"{v:.0f}" if v > 0 else "")).to_numpy()
    sns.heatmap(counts, ax=ax, cmap=ListedColormap(colors), vmin=-0.5, vmax=n + 0.5, annot=labels,
                fmt="", linewidths=0.5, linecolor="white",
                cbar_kws={"label": "number of task circuits", "ticks": list(range(n + 1))})
    _mark_mlp_column(ax, n_heads)
    ax.set(title=title, xlabel="head", ylabel="layer")
    ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def cross_task_heatmaps(cross: pd.DataFrame, tasks: Sequence[str], *, n_random: int, title: str):
    """Each circuit's score on each task beside the mean of random circuits of its size (section 4's cross-task table).

    ``cross`` is :func:`mechbook.papers.seqcont.task_circuits.cross_task_table`'s table,
    with the circuits of ``tasks`` and a "shared" one.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    limit = max(100.0, float(cross[["score", "random_mean"]].abs().max().max()))
    panels = [("score", "circuit"), ("random_mean", f"random circuits of its size (mean of {n_random})")]
    for k, (ax, (column, label)) in enumerate(zip(axes, panels)):
        grid = cross.pivot(index="circuit_task", columns="eval_task", values=column)
        grid = grid.loc[[*tasks, "shared"], list(tasks)]
        sns.heatmap(grid, ax=ax, annot=True, fmt=".0f", cmap="RdBu", center=0, vmin=-limit, vmax=limit,
                    cbar=k == 1, cbar_kws={"label": "score (% of full model)"})
        ax.set(title=label, xlabel="scored on task", ylabel="circuit found on" if k == 0 else "")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- b5: the components ---------------------------------------------------------------------------------


def effect_heatmaps(effects: pd.DataFrame, *, title: str, annotate: bool | None = None):
    """Layer x head heatmaps of single-head ablation effects (% of the full model's score), one panel per task.

    ``effects`` is :func:`mechbook.papers.seqcont.components.single_ablation_effects`'s
    table with a ``task`` column (section 4's single ablations).
    """
    heads = effects[effects["kind"] == "head"]
    tasks = list(dict.fromkeys(heads["task"]))
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    annotate = n_layers * n_heads <= 120 if annotate is None else annotate
    limit = max(float(heads["effect"].abs().max()), 1.0)
    fig, axes = plt.subplots(1, len(tasks), figsize=(11, min(3.2 + 0.28 * n_layers, 12)), sharey=True)
    axes = np.atleast_1d(axes)
    for k, (ax, task) in enumerate(zip(axes, tasks)):
        grid = heads[heads["task"] == task].pivot(index="layer", columns="head", values="effect")
        grid.columns = grid.columns.astype(int)
        sns.heatmap(grid, ax=ax, cmap="RdBu", center=0, vmin=-limit, vmax=limit, annot=annotate, fmt=".0f",
                    annot_kws={"fontsize": 7}, cbar=k == len(tasks) - 1,
                    cbar_kws={"label": "effect on the score (% of full model)"})
        ax.set(title=task, xlabel="head", ylabel="layer" if k == 0 else "")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def mlp_effects(effects: pd.DataFrame, *, title: str):
    """Each MLP's single-ablation effect per layer, one bar per task."""
    mlps = effects[effects.kind == "mlp"]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    sns.barplot(data=mlps, x="layer", y="effect", hue="task", ax=ax)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="MLP layer", ylabel="effect on the score (%)", title=title)
    fig.tight_layout()
    return fig


def attention_heatmaps(frames: Mapping[str, pd.DataFrame], *, title: str):
    """Last-position attention over the source tokens, one panel per condition; member tokens in bold red.

    Each frame is :func:`mechbook.papers.seqcont.components.attention_frame`'s table for one prompt.
    """
    n_heads = frames[next(iter(frames))]["head"].nunique()
    fig, axes = plt.subplots(len(frames), 1, figsize=(11, 1.6 + 1.3 * len(frames) * max(n_heads, 2) / 2))
    axes = np.atleast_1d(axes)
    for ax, (label, frame) in zip(axes, frames.items()):
        grid = frame.pivot(index="head", columns="position", values="attention")
        grid = grid.loc[list(dict.fromkeys(frame["head"]))]
        tokens = frame.drop_duplicates("position").sort_values("position")
        sns.heatmap(grid, ax=ax, cmap="Blues", vmin=0, vmax=1, annot=True, fmt=".1f", annot_kws={"fontsize": 6},
                    cbar_kws={"label": "attention", "shrink": 0.8})
        ax.set_xticks(np.arange(len(tokens)) + 0.5)
        ax.set_xticklabels(tokens["token"].map(repr), rotation=70, fontsize=7)
        for tick, member in zip(ax.get_xticklabels(), tokens["is_member"]):
            if member:
                tick.set_color("#C44E52")
                tick.set_fontweight("bold")
        ax.set(title=label, xlabel="", ylabel="head")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_by_task(frames: Mapping[str, Mapping[str, pd.DataFrame]], *, model_name: str) -> list:
    """:func:`attention_heatmaps` for each task (``frames``: task -> condition -> frame), one figure each."""
    return [attention_heatmaps(by_condition,
                               title=f"{task}: attention of the last position, key heads of {model_name}")
            for task, by_condition in frames.items()]


def member_attention_bars(attention: pd.DataFrame, tasks: Sequence[str], heads: Sequence[str], *, title: str):
    """Per task and key head: the last position's attention on the member tokens, in order and shuffled (section 4).

    ``attention`` is :func:`mechbook.papers.seqcont.components.member_attention`'s table
    with ``task`` and ``order`` columns; ``heads`` the head labels in their order on the axis.
    """
    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 3.6), sharey=True)
    for ax, task in zip(axes, tasks):
        sns.barplot(data=attention[attention.task == task], x="head", y="on_members", hue="order",
                    order=list(heads), ax=ax, seed=0)  # the bootstrap of the 95% intervals, seeded
        ax.set(title=task, xlabel="key head", ylim=(0, 1))
        if ax is not axes[-1]:
            ax.get_legend().remove()
    axes[0].set_ylabel("attention on member tokens")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def successor_bars(summary: pd.DataFrame, heads: Sequence[str], *, top_k: int, title: str):
    """For the given heads, per task: the next member in the OV circuit's top k, and the next member as the top member.

    ``summary`` is :func:`mechbook.papers.seqcont.components.successor_summary`'s table
    (section 5's successor heads).
    """
    measures = {"successor_top_k": f"next member in the top {top_k}",
                "next_top_among_members": "next member is the top member"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (measure, label) in zip(axes, measures.items()):
        sns.barplot(data=summary[summary["head"].isin(heads)], x="head", y=measure, hue="task", order=list(heads),
                    ax=ax)
        ax.set(ylim=(0, 1.02), title=label,
               xlabel=f"head (the {len(heads)} best in the top {top_k}, mean over tasks)", ylabel="fraction of members")
        ax.tick_params(axis="x", rotation=45)
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.01, 1), title="task")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def lens_ranks(lens: pd.DataFrame, tasks: Sequence[str], *, title: str):
    """Logit lens at the last position: median reciprocal rank (and IQR) of the last shown and next member per layer.

    ``lens`` is :func:`mechbook.papers.seqcont.components.sequence_lens`'s table with a ``task`` column (section 5).
    """
    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 3.6), sharey=True)
    for ax, task in zip(axes, tasks):
        sns.lineplot(data=lens[lens.task == task], x="layer", y="reciprocal_rank", hue="target", estimator="median",
                     errorbar=("pi", 50), marker="o", markersize=4, ax=ax, legend=ax is axes[0])
        ax.set(title=task, xlabel="layer (residual after the block)", ylim=(-0.02, 1.02))
    axes[0].set_ylabel("reciprocal rank (median, IQR)")
    axes[0].legend(title=None, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- b6: beyond the three tasks -------------------------------------------------------------------------

KNOCKOUT_COLORS = ["#8C8C8C", "#C44E52", "#E8A5A7", "#4C72B0", "#A5BCDD"]  # full, shared, random, heads, random heads


def knockout_bars(effects: pd.DataFrame, families: Sequence[str], conditions: Sequence[str], *, n_random: int,
                  title: str):
    """Accuracy and logit difference per family under each condition; random sets as mean with a one-sd whisker.

    ``effects`` stacks :func:`mechbook.papers.seqcont.other_sequences.knockout_summary`
    per family (a ``family`` column); ``conditions`` are full, shared, random, shared
    heads, random heads, in that order.
    """
    labels = {
        "full": "full model",
        "shared": "shared sub-circuit ablated",
        "random": f"random sets of its size (mean of {n_random})",
        "shared heads": "its heads only ablated",
        "random heads": f"random heads, as many (mean of {n_random})",
    }
    palette = dict(zip(labels.values(), KNOCKOUT_COLORS))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [("accuracy", "accuracy (top-1 is the answer)"),
              ("logit_diff", "logit difference (answer − last shown)")]
    for ax, (column, ylabel) in zip(axes, panels):
        data = effects.assign(condition=effects.condition.map(labels))
        sns.barplot(data=data, x="family", y=column, hue="condition", hue_order=[labels[c] for c in conditions],
                    order=list(families), palette=palette, ax=ax)
        for k, kind in enumerate(conditions):
            if kind.startswith("random"):
                rows = effects[effects.condition == kind].set_index("family").loc[list(families)]
                ax.errorbar([bar.get_x() + bar.get_width() / 2 for bar in ax.containers[k]], rows[column],
                            yerr=rows[f"{column}_sd"], fmt="none", ecolor="black", capsize=2, linewidth=1)
        ax.set(xlabel="", ylabel=ylabel)
        ax.tick_params(axis="x", rotation=20)
        ax.legend_.remove()
    axes[0].set_ylim(0, 1.05)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def drops_against_random(per_set: pd.DataFrame, families: Sequence[str], shared: Circuit, *, n_random: int,
                         title: str):
    """The accuracy drop of each random set (dots) beside the shared sub-circuit's (a bar): whole, and heads alone.

    ``per_set`` stacks :func:`mechbook.papers.seqcont.other_sequences.per_set_table` per family.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    panels = [("shared", "random", "#C44E52", f"whole sub-circuit ({len(shared)} components)"),
              ("shared heads", "random heads", "#4C72B0", f"its {len(shared.heads)} heads only")]
    for ax, (target, control, color, panel_title) in zip(axes, panels):
        with seeded_numpy():
            sns.stripplot(data=per_set[per_set.kind == control], x="family", y="accuracy_drop",
                          order=list(families), color="#8C8C8C", size=6, jitter=0.15, ax=ax)
        drop = per_set[per_set.kind == target].set_index("family").loc[list(families), "accuracy_drop"]
        ax.scatter(range(len(families)), drop, marker="_", s=900, linewidths=3, color=color, zorder=3)
        ax.legend(handles=[
            Line2D([], [], marker="o", linestyle="", color="#8C8C8C", label=f"random set ({n_random})"),
            Line2D([], [], marker="_", linestyle="", markersize=18, markeredgewidth=3, color=color, label=target),
        ], loc="upper right", fontsize=9)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xlabel="", ylabel="accuracy drop (full − ablated)", title=panel_title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- b7: how many prompts -------------------------------------------------------------------------------


def agreement_lines(agree: pd.DataFrame, sizes: Sequence[int], *, stable: float, title: str):
    """Jaccard index of heads (left) and MLPs (right) against the sample size: across seeds and with the next size.

    ``agree`` is :func:`mechbook.papers.seqcont.stability.agreement`'s table; ``stable`` the bar drawn in grey.
    """
    long = agree.melt(id_vars=["task", "n_prompts", "comparison"], value_vars=["heads", "mlps"], var_name="kind",
                      value_name="jaccard")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (kind, label) in zip(axes, [("heads", "heads"), ("mlps", "MLPs")]):
        sns.lineplot(data=long[long.kind == kind], x="n_prompts", y="jaccard", hue="task", style="comparison",
                     markers=True, ax=ax)
        ax.axhline(stable, color="grey", linewidth=1)
        ax.set(xscale="log", xticks=sizes, xticklabels=[str(s) for s in sizes], ylim=(0, 1.05),
               xlabel="prompts per task", ylabel="Jaccard index", title=label)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # no 2x10^1 labels between the sizes
        ax.legend_.remove()
    axes[1].legend(*axes[0].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sizes_and_scores(runs: pd.DataFrame, sizes: Sequence[int], seeds: Sequence[int], *, threshold: float):
    """Circuit heads and MLPs per size (one point per seed), and each circuit's score with its bootstrap interval.

    ``runs`` is :func:`mechbook.papers.seqcont.stability.circuits_by_size`'s table; the
    grey line is the pruning's bar, 100 x (1 - ``threshold``).
    """
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), width_ratios=[1, 1, 1.4])
    for ax, (column, label) in zip(axes, [("n_heads", "heads"), ("n_mlps", "MLPs")]):
        with seeded_numpy():
            sns.stripplot(data=runs, x="n_prompts", y=column, hue="task", dodge=True, ax=ax, legend=False)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="prompts per task", ylabel=f"{label} in the circuit", title=f"{label}, one point per seed")
    for k, (task, part) in enumerate(runs.groupby("task", sort=False)):
        x = np.log2(part.n_prompts) + 0.12 * (k - 1) + 0.03 * (part.seed - np.mean(seeds))
        axes[2].errorbar(x, part.score, yerr=[part.score - part.score_low, part.score_high - part.score], fmt="o",
                         label=task, capsize=2)
    axes[2].axhline(100 * (1 - threshold), color="grey", linewidth=1)
    axes[2].set(xticks=np.log2(sizes), xticklabels=[str(s) for s in sizes], xlabel="prompts per task",
                ylabel="circuit score (% of full model)", title="score, 95% bootstrap interval")
    axes[2].legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def decision_margins(margins: pd.DataFrame, tasks: Sequence[str], *, title: str):
    """Each kept head's last decision against the pruning's bar, by task and sample size: the heads every seed keeps
    against those only some keep (one point per head and seed).

    ``margins`` is :func:`mechbook.papers.seqcont.stability.decision_margins`' table; 0 (grey) is the bar, below
    it the head was kept. The axis is linear within 5 points of the bar and logarithmic beyond.
    """
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.8), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        with seeded_numpy():
            sns.stripplot(data=margins[margins.task == task], x="n_prompts", y="margin", hue="kept_by",
                          hue_order=["every seed", "some seeds"], dodge=True, size=3, ax=ax)
        ax.axhline(0, color="grey", linewidth=1)
        # linear within 5 points of the bar, where the heads that move lie; logarithmic beyond, where the margins
        # of the heads every seed keeps run to tens of points
        ax.set_yscale("symlog", linthresh=5)
        ax.set_yticks([-50, -20, -5, 0, 5, 20])
        ax.set_yticklabels(["−50", "−20", "−5", "0", "5", "20"])
        ax.set(xlabel="prompts per task", ylabel="score without the head − bar (points)", title=task)
        if ax.legend_ is not None:
            ax.legend_.remove()
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), title="kept by", loc="upper left",
                       bbox_to_anchor=(1.01, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig
