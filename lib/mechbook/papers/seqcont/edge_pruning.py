"""The kept edges of the task circuits as tables and a diagram (Paper B, section 3; chapter b3).

Edge pruning itself is :func:`mechbook.core.circuits.prune_edges`; this module counts
its kept edges per input type (:func:`edge_counts`) and draws them, heads placed by
layer (:func:`circuit_diagram`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from mechbook.core.circuits import INPUTS, RESID, Circuit
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel


def edge_counts(edges: pd.DataFrame, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Tested and kept edges per input type (q, k, v, resid) and in total: one row per group x input."""
    by = list(by)
    missing = [c for c in [*by, "input", "kept"] if c not in edges.columns]
    if missing:
        raise MechbookError(f"the edge table lacks {', '.join(missing)}; pass the table of prune_edges "
                            "(with a task column when counting per task)")
    order = [i for i in INPUTS if i in set(edges["input"])]
    counts = (edges.assign(input=pd.Categorical(edges["input"], order + ["all"]))
              .groupby([*by, "input"], observed=True, sort=False)["kept"].agg(tested="size", kept="sum").reset_index())
    total = edges.groupby(by, sort=False)["kept"].agg(tested="size", kept="sum").reset_index().assign(input="all")
    out = pd.concat([counts, total], ignore_index=True)
    out["input"] = pd.Categorical(out["input"], order + ["all"])
    out = out.sort_values([*by, "input"], kind="stable", key=lambda s: s if s.name == "input" else s.map(
        {v: i for i, v in enumerate(dict.fromkeys(edges[s.name]))})).reset_index(drop=True)
    out["input"] = out["input"].astype(str)
    out["share_kept"] = out["kept"] / out["tested"]
    return out


# --- the diagram ----------------------------------------------------------------------------------------

EDGE_COLORS = {"q": "#4C72B0", "k": "#DD8452", "v": "#55A868", "resid": "#8C8C8C"}
_BEND = {"q": -0.25, "k": 0.0, "v": 0.25, "resid": 0.0}


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
    the edge's effect (100 minus its score).
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
    handles = [plt.Line2D([0], [0], color=c, lw=2, label=k if k != "resid" else "to logits") for k, c in EDGE_COLORS.items()]
    fig.legend(handles=handles, title="edge into", loc="upper right", bbox_to_anchor=(1.0, 0.93), fontsize=8,
               title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    return fig
