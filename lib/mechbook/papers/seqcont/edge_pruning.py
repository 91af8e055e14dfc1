"""The edges of a node circuit (Paper B: Lan, Torr & Barez 2024, section 3; the paper's ``run_edge_ablation.py``).

Node pruning (:func:`mechbook.core.circuits.prune_nodes`) says *which* heads and MLPs a
task needs; edge pruning says *how they talk*: each path from a sender to a
receiver head's query, key or value input (:func:`mechbook.core.circuits.patch_paths`),
and each sender's direct path to the final residual stream (the paper's
``resid_post``, :func:`patch_paths_to_logits`), is removed alone inside the circuit
model and kept if the circuit then falls below ``threshold`` of the full model.

- :func:`circuit_edge_scores` scores every edge of one circuit (one row per edge);
- :func:`edge_counts` counts the tested and kept edges per input type;
- :func:`circuit_diagram` draws the kept edges, heads placed by layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbook.core.circuits import (
    QKV,
    Circuit,
    _attention_write,
    _check_means,
    _check_threshold,
    _full_metric,
    _mean_ablation_hooks,
    _unembed,
    prune_edges,
)
from mechbook.core.errors import MechbookError
from mechbook.core.runs import TokenBatch, run_last
from mechbook.core.loading import LoadedModel
from mechbook.core.patching import Component, Metric, all_heads, all_mlps

RESID = "resid_post"  # the receiver of a sender's direct path to the logits (the paper's name)
INPUTS = (*QKV, "resid")  # what an edge enters: a head's q, k or v, or the final residual stream
FINAL_RESID = "ln_final.hook_in"


# --- sender -> final residual stream ----------------------------------------------------------------


def patch_paths_to_logits(
    model: LoadedModel,
    target: TokenBatch,
    senders: Sequence[Component],
    metric: Metric,
    *,
    source: TokenBatch | None = None,
    means: Mapping[str, Tensor] | None = None,
    ablate: Sequence[Component] = (),
    tokens: Int[Tensor, "k"] | None = None,
) -> Float[Tensor, "sender batch"]:
    """The metric with each sender's direct path to the logits patched, one sender at a time.

    The final residual stream (the input of the final norm) at the last position reads
    ``resid + delta`` where ``delta`` is the change the sender's new output (from
    ``source``, or its mean from ``means``) writes into the residual stream; no later
    component sees the change. This is the paper's sender -> ``resid_post`` edge, taken
    as a direct path like the q/k/v edges of :func:`mechbook.core.circuits.patch_paths`.
    ``ablate`` components are mean-ablated in every run (the circuit context).
    One forward pass in all (two with a source): the rest is a matrix product per sender.
    """
    if source is None and means is None:
        raise MechbookError("pass source= (patch the senders' values from another run) or means= (mean-ablate the paths)")
    if ablate and means is None:
        raise MechbookError("ablate= needs means= (from circuit_means) for the ablated components")
    if source is not None and (len(source) != len(target) or not torch.equal(source.lengths, target.lengths)):
        raise MechbookError("source and target prompts must pair up one to one with equal token lengths")
    senders = [c.validate(model) for c in senders]
    if not senders:
        raise MechbookError("no senders to patch; pass heads or MLPs, e.g. circuit.components")
    if any(c.kind not in ("head", "mlp") or c.position is not None for c in senders):
        raise MechbookError("senders are heads or MLPs at every position (no resid components, no position=)")
    ablate = list(ablate)
    if ablate:
        _check_means(model, target, means, ablate)
    if source is None:
        _check_means(model, target, means, senders)
    names = sorted({c.hook_name for c in senders})
    ablation = _mean_ablation_hooks(means, ablate) if ablate else []
    _, base = run_last(model, target, names=[*names, FINAL_RESID], fwd_hooks=ablation)
    if source is not None:
        _, src = run_last(model, source, names=names, fwd_hooks=ablation)
    rows = torch.arange(len(target))
    last = target.last_pos
    final = base[FINAL_RESID][rows, last]
    out = torch.empty(len(senders), len(target))
    with torch.inference_mode():
        for i, s in enumerate(senders):
            if source is not None:
                new = src[s.hook_name][rows, last]
            else:
                new = means[s.hook_name].to(final.device)[last]
            old = base[s.hook_name][rows, last]
            if s.kind == "head":
                z = old.clone()
                z[:, s.head] = new[:, s.head]
                delta = _attention_write(model, s.layer, z) - _attention_write(model, s.layer, old)
            else:
                delta = new - old
            out[i] = metric(_unembed(model, final + delta, tokens)).float().cpu()
    return out


# --- all edges of a circuit ------------------------------------------------------------------------


def circuit_edge_scores(
    model: LoadedModel,
    batch: TokenBatch,
    circuit: Circuit,
    means: Mapping[str, Tensor],
    metric: Metric,
    *,
    threshold: float = 0.8,
    mlp_senders: bool = False,
    to_logits: bool = True,
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> pd.DataFrame:
    """Edge pruning of one node circuit: every sender -> receiver (q, k, v) edge, and every sender -> ``resid_post``.

    Inside the circuit model (everything else mean-ablated), each edge is removed alone
    by patching the sender's mean over the corrupted prompts along that path only;
    ``score`` is then the circuit's metric in percent of the full model's, and the edge
    is kept when ``score < 100 x threshold`` (the paper's ``result < 0.8``). Senders are
    the circuit's heads (and MLPs with ``mlp_senders``); receivers its heads in later
    layers, and with ``to_logits`` the final residual stream. ``attrs`` holds the
    threshold and the circuit's own score.
    """
    threshold = _check_threshold(threshold, "edge", "the paper uses threshold=0.8")
    circuit.validate(model)
    if not circuit.heads:
        raise MechbookError("the circuit has no heads, so no edges; check the node circuit (chapter b2)")
    _check_means(model, batch, means, all_heads(model) + all_mlps(model))
    frames = []
    attrs = {}
    if len({l for l, _ in circuit.heads}) > 1 or (mlp_senders and circuit.mlps):
        qkv = prune_edges(model, batch, circuit, means, metric, threshold=threshold, mlp_senders=mlp_senders,
                          max_rows=max_rows, tokens=tokens)
        attrs = dict(qkv.attrs)
        frames.append(qkv.rename(columns={"score_without": "score"}))
    if to_logits:
        senders = [Component("head", l, h) for l, h in circuit.heads]
        senders += [Component("mlp", l) for l in circuit.mlps] if mlp_senders else []
        full = attrs.get("full_metric") or _full_metric(model, batch, metric)
        values = patch_paths_to_logits(model, batch, senders, metric, means=means, ablate=circuit.complement(model),
                                       tokens=tokens)
        frames.append(pd.DataFrame({
            "edge": [f"{s.label} -> {RESID}" for s in senders],
            "sender": [s.label for s in senders],
            "receiver": RESID,
            "input": "resid",
            "sender_kind": [s.kind for s in senders],
            "sender_layer": [s.layer for s in senders],
            "sender_head": [s.head for s in senders],
            "receiver_layer": model.n_layers,
            "receiver_head": None,
            "score": (100.0 * values.mean(1) / full).tolist(),
        }))
    if not frames:
        raise MechbookError("the circuit's heads all sit in one layer and to_logits=False: no edges to test")
    edges = pd.concat(frames, ignore_index=True)
    edges["receiver_head"] = edges["receiver_head"].astype("Int64")
    edges["sender_head"] = edges["sender_head"].astype("Int64")
    edges["kept"] = edges["score"] < 100.0 * threshold
    edges.attrs.update({"threshold": threshold, "circuit_score": attrs.get("circuit_score")})
    return edges


def edge_counts(edges: pd.DataFrame, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Tested and kept edges per input type (q, k, v, resid) and in total: one row per group x input."""
    by = list(by)
    missing = [c for c in [*by, "input", "kept"] if c not in edges.columns]
    if missing:
        raise MechbookError(f"the edge table lacks {', '.join(missing)}; pass the table of circuit_edge_scores "
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
