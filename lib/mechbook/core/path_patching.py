"""Path patching: a sender's changed output along one direct path only.

An :class:`Edge` goes from a sender (a head or an MLP) to one receiver head's query,
key or value input; :func:`patch_paths` runs the target prompts with only that input
reading the changed residual stream: a :func:`~mechbook.core.patching.sweep` whose
variants are the edges, each starting at its receiver's layer.
:func:`patch_paths_to_logits` does the same for a sender's direct path to the final
residual stream (a ``resid_post`` receiver).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbook.core.architectures import attention_write, kv_head, project
from mechbook.core.decoding import unembed
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import Edit, edit_hooks, mean_ablation
from mechbook.core.loading import LoadedModel
from mechbook.core.names import Component, act_name, check_components
from mechbook.core.patching import Metric, check_means, check_pair, resid_names, sweep
from mechbook.core.runs import TokenBatch, run_last

QKV = ("q", "k", "v")


@dataclass(frozen=True, order=True)
class Edge:
    """A path from a sender (head or MLP) into one receiver head's query, key or value input."""

    sender: Component
    receiver: Component
    input: str  # "q", "k" or "v"

    def __post_init__(self) -> None:
        if not isinstance(self.sender, Component) or not isinstance(self.receiver, Component):
            raise MechbookError(f"an edge joins two Components, e.g. Edge(Component('head', 0, 1), "
                                f"Component('head', 2, 3), 'q'), got {self.sender!r} -> {self.receiver!r}")
        if self.input not in QKV:
            raise MechbookError(f"an edge enters a head's 'q', 'k' or 'v'; got {self.input!r}")
        if self.receiver.kind != "head" or self.sender.kind not in ("head", "mlp"):
            raise MechbookError("an edge goes from a head or MLP (sender) to a head (receiver)")
        if self.sender.position is not None or self.receiver.position is not None:
            raise MechbookError("edges patch every position; build the components without position=")
        # a negative layer counts from the end: the order is checked once patch_paths has resolved it (validate)
        if self.sender.layer >= 0 and self.receiver.layer >= 0 and self.sender.layer >= self.receiver.layer:
            raise MechbookError(
                f"the sender {self.sender.label} must sit in an earlier layer than the receiver {self.receiver.label}"
            )

    @property
    def label(self) -> str:
        return f"{self.sender.label} -> {self.receiver.label} ({self.input})"


def circuit_edges(heads: Sequence[tuple[int, int]], mlps: Sequence[int] = (), *, inputs: Sequence[str] = QKV,
                  mlp_senders: bool = False) -> list[Edge]:
    """Every edge among ``heads`` (and from ``mlps`` with ``mlp_senders``): each sender into each later head's q, k, v."""
    try:
        senders = [Component("head", l, h) for l, h in heads]
    except (TypeError, ValueError):
        raise MechbookError(f"circuit_edges takes heads as (layer, head) pairs, e.g. [(0, 1), (2, 3)], got {heads!r}"
                            ) from None
    if mlp_senders:
        senders += [Component("mlp", l) for l in mlps]
    receivers = [Component("head", l, h) for l, h in heads]
    return [Edge(s, r, x) for r in receivers for x in inputs for s in senders if s.layer < r.layer]


def _check_inputs(model, target, source, means, ablate, senders) -> list[Component]:
    if source is None and means is None:
        raise MechbookError("pass source= (patch the senders' values from another run) or means= (mean-ablate the paths)")
    if ablate and means is None:
        raise MechbookError("ablate= needs means= (from circuit_means) for the ablated components")
    if source is not None:
        check_pair(source, target)
    if not all(isinstance(c, Component) for c in ablate):
        raise MechbookError("ablate= takes components, e.g. circuit.complement(model) or [Component('head', 0, 1)]")
    ablate = [c.validate(model) for c in ablate]
    if ablate:
        check_means(model, target, means, ablate)
    if source is None:
        check_means(model, target, means, senders)
    return ablate


def _new_output(sender: Component, src: Mapping[str, Tensor] | None, means, n: int, width: int) -> Tensor:
    """The sender's new output: [batch, pos, d_head] for a head, [batch, pos, d_model] for an MLP."""
    if src is not None:
        value = src[sender.hook_name]
    else:
        mean = means[sender.hook_name][:width]
        value = mean.expand(n, *mean.shape)
    return value[:, :, sender.head] if sender.kind == "head" else value


def _write_change(model, sender: Component, base: Mapping[str, Tensor], new: Tensor,
                  base_writes: dict[int, Tensor]) -> Tensor:
    """How the residual stream changes when the sender's output becomes ``new`` (exact with post-attention norms)."""
    if sender.kind == "mlp":
        return new - base[sender.hook_name]
    if sender.layer not in base_writes:
        base_writes[sender.layer] = attention_write(model, sender.layer, base[sender.hook_name])
    z = base[sender.hook_name].clone()
    z[:, :, sender.head] = new
    return attention_write(model, sender.layer, z) - base_writes[sender.layer]


def patch_paths(
    model: LoadedModel,
    target: TokenBatch,
    edges: Sequence[Edge],
    metric: Metric,
    *,
    source: TokenBatch | None = None,
    means: Mapping[str, Tensor] | None = None,
    ablate: Sequence[Component] = (),
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> Float[Tensor, "edge batch"]:
    """The metric with each edge's path patched, one edge at a time (path patching).

    The run on ``target`` is left unchanged except for one receiver head's query (key,
    value) input: it reads ``resid + delta`` instead of ``resid``, where ``resid`` is
    the receiver layer's residual input and ``delta`` the exact change of the residual
    stream caused by replacing the sender's output (by its value on ``source``, or
    by its mean from ``means`` when no source is given) - only along the direct path
    sender -> receiver. For a head sender ``delta = write(z with the sender's slice
    replaced) - write(z)``, with ``write`` the output projection followed by the
    post-attention norm where there is one (Gemma 2/3), so it is exact there too; for
    an MLP sender it is the change of ``hook_mlp_out``.

    Grouped-query models share a key/value head between several query heads; a k or
    v edge is applied to that one query head only: the shared k (v) is recomputed,
    and the other heads of the group keep their unpatched outputs. ``ablate``
    components are mean-ablated in every run, the source run included (the circuit
    context of edge pruning). Equals transformer-lens's ``get_act_patch_direct_path``
    with ``target`` = corrupted and ``source`` = clean, where that function applies.
    ``tokens`` restricts the unembedding to the ids the metric reads.
    """
    if not edges:
        raise MechbookError("no edges to patch")
    if not all(isinstance(e, Edge) for e in edges):
        raise MechbookError(f"patch_paths takes a list of Edge, got {next(e for e in edges if not isinstance(e, Edge))!r}"
                            "; build them with Edge(sender, receiver, 'q') or circuit_edges(heads)")
    edges = [Edge(e.sender.validate(model), e.receiver.validate(model), e.input) for e in edges]
    ablate = _check_inputs(model, target, source, means, ablate, [e.sender for e in edges])
    n, width = len(target), target.input_ids.shape[1]
    sender_names = sorted({e.sender.hook_name for e in edges})
    starts = [e.receiver.layer for e in edges]
    names = sorted({*sender_names, *(act_name("z", l) for l in starts), *resid_names(model, starts)})
    ablation = edit_hooks(mean_ablation(ablate, means)) if ablate else []
    _, base = run_last(model, target, names=names, fwd_hooks=ablation)
    src = run_last(model, source, names=sender_names, fwd_hooks=ablation)[1] if source is not None else None

    deltas: dict[Component, Tensor] = {}
    base_writes: dict[int, Tensor] = {}
    with torch.inference_mode():
        for s in sorted({e.sender for e in edges}):
            deltas[s] = _write_change(model, s, base, _new_output(s, src, means, n, width), base_writes)
    group_size = model.n_heads // model.n_kv_heads

    def edits_for(i: int, rows: slice) -> list[Edit]:
        e = edges[i]
        layer = e.receiver.layer
        slot = e.receiver.head if e.input == "q" else kv_head(model, e.receiver.head)
        value = project(model, layer, e.input, base[act_name("resid_pre", layer)] + deltas[e.sender])
        edits = [Edit(Component(e.input, layer, slot), "patch", value, rows)]
        if e.input != "q" and group_size > 1:  # the group's other query heads keep their outputs
            first = slot * group_size
            edits += [Edit(Component("head", layer, h), "patch", base[act_name("z", layer)], rows)
                      for h in range(first, first + group_size) if h != e.receiver.head]
        return edits

    def context(layer: int) -> list[Edit]:
        return mean_ablation(ablate, means, first_layer=layer) if ablate else []

    return sweep(model, target, starts, edits_for, metric, base=base, context=context, max_rows=max_rows,
                 tokens=tokens, desc="paths")


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
    as a direct path like the q/k/v edges of :func:`patch_paths`. ``ablate`` components
    are mean-ablated in every run (the circuit context). One forward pass in all (two
    with a source): the rest is a matrix product per sender.
    """
    if not senders:
        raise MechbookError("no senders to patch; pass heads or MLPs, e.g. circuit.components")
    senders = [c.validate(model) for c in check_components(senders, "patch_paths_to_logits's senders")]
    if any(c.kind not in ("head", "mlp") or c.position is not None for c in senders):
        raise MechbookError("senders are heads or MLPs at every position (no resid components, no position=)")
    ablate = _check_inputs(model, target, source, means, ablate, senders)
    names = sorted({c.hook_name for c in senders})
    final_name = act_name("final")
    ablation = edit_hooks(mean_ablation(ablate, means)) if ablate else []
    _, base = run_last(model, target, names=[*names, final_name], fwd_hooks=ablation)
    src = run_last(model, source, names=names, fwd_hooks=ablation)[1] if source is not None else None
    last = target.last_pos
    rows = torch.arange(len(target), device=last.device)
    final = base[final_name][rows, last]
    out = []
    with torch.inference_mode():
        for s in senders:
            new = src[s.hook_name][rows, last] if src is not None else means[s.hook_name].to(final.device)[last]
            old = base[s.hook_name][rows, last]
            if s.kind == "head":
                z = old.clone()
                z[:, s.head] = new[:, s.head]
                delta = attention_write(model, s.layer, z) - attention_write(model, s.layer, old)
            else:
                delta = new - old
            out.append(metric(unembed(model, final + delta, tokens=tokens)))
    return torch.stack(out).float().cpu()  # copied to the host once, after the last sender
