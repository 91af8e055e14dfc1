"""Activation patching and ablation of heads, MLPs and the residual stream, batched.

One mechanism serves every kind of intervention: a list of *variants*, each a set
of edits ``(component, replacement)``, is run in one forward pass with the prompts
stacked once per variant along the batch axis. A sweep over all heads of a model
is then a handful of forward passes rather than one per head.

Components are named by transformer-lens hook names: a head's output is its slice of
``blocks.L.attn.hook_z`` (before the output projection, so patching it is exact for
any architecture), an MLP's output is ``blocks.L.hook_mlp_out`` and the residual
stream is ``blocks.L.hook_resid_pre``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core.errors import MechbookError
from mechbook.core.runs import TokenBatch, run_last
from mechbook.core.loading import LoadedModel

Metric = Callable[[Float[Tensor, "batch d_vocab"]], Float[Tensor, "batch"]]


# --- components -----------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Component:
    """A place in the network: an attention head, an MLP, or the residual stream entering a layer.

    ``position`` restricts an edit to one token position (``None``: every position).
    """

    kind: str  # "head", "mlp" or "resid"
    layer: int
    head: int | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("head", "mlp", "resid"):
            raise MechbookError(f"unknown component kind {self.kind!r}; use 'head', 'mlp' or 'resid'")
        if (self.kind == "head") != (self.head is not None):
            raise MechbookError("a head component needs head=...; mlp and resid components take none")

    @property
    def hook_name(self) -> str:
        return {
            "head": f"blocks.{self.layer}.attn.hook_z",
            "mlp": f"blocks.{self.layer}.hook_mlp_out",
            "resid": f"blocks.{self.layer}.hook_resid_pre",
        }[self.kind]

    @property
    def label(self) -> str:
        """Short name as the papers write it: ``4.10`` for a head, ``MLP 3``, ``resid 5``."""
        if self.kind == "head":
            return f"{self.layer}.{self.head}"
        return f"{'MLP' if self.kind == 'mlp' else 'resid'} {self.layer}"

    def validate(self, model: LoadedModel) -> "Component":
        model.check_layer(self.layer)
        if self.kind == "head" and not 0 <= self.head < model.n_heads:
            raise MechbookError(f"head {self.head} is out of range for {model.name}, which has {model.n_heads} heads per layer")
        return self


def all_heads(model: LoadedModel) -> list[Component]:
    return [Component("head", layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]


def all_mlps(model: LoadedModel) -> list[Component]:
    return [Component("mlp", layer) for layer in range(model.n_layers)]


def _slot(component: Component) -> tuple:
    """Index of a component inside its hook's activation, after the batch axis."""
    pos = slice(None) if component.position is None else component.position
    return (pos, component.head) if component.kind == "head" else (pos,)


# --- metrics ----------------------------------------------------------------------


def logit_diff(correct: Int[Tensor, "batch"], incorrect: Int[Tensor, "batch"]) -> Metric:
    """Logit of the correct token minus logit of the incorrect one, per prompt (Paper B's metric)."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        c, i = correct.to(logits.device), incorrect.to(logits.device)
        reps = logits.shape[0] // len(c)
        return logits[rows, c.repeat(reps)] - logits[rows, i.repeat(reps)]

    return metric


def answer_prob(answer: Int[Tensor, "batch"]) -> Metric:
    """Probability of the answer token, per prompt."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        reps = logits.shape[0] // len(answer)
        return logits.softmax(-1)[rows, answer.to(logits.device).repeat(reps)]

    return metric


# --- activations to patch in -----------------------------------------------------------


def cache_components(model: LoadedModel, batch: TokenBatch, components: Iterable[Component]) -> dict[str, Tensor]:
    """Cache the activations of the hooks the components live in, on one batch."""
    names = sorted({c.hook_name for c in components})
    _, cache = run_last(model, batch, names=names)
    return cache


def mean_activations(model: LoadedModel, batch: TokenBatch, components: Iterable[Component]) -> dict[str, Tensor]:
    """Per-position means over a (corrupted) batch, for mean ablation (Paper B, section 3).

    Right padding is excluded: the mean at a position averages the prompts that reach it.
    """
    cache = cache_components(model, batch, components)
    positions = torch.arange(batch.input_ids.shape[1], device=batch.lengths.device)
    mask = (positions[None, :] < batch.lengths[:, None]).float()  # [batch, pos]
    means = {}
    for name, act in cache.items():
        m = mask.reshape(mask.shape + (1,) * (act.dim() - 2))
        means[name] = (act * m).sum(0) / m.sum(0).clamp(min=1)
    return means


# --- the variant runner ---------------------------------------------------------------




def run_variants(
    model: LoadedModel,
    batch: TokenBatch,
    variants: Sequence[Sequence[Component]],
    metric: Metric,
    *,
    mode: str,
    values: Mapping[str, Tensor] | None = None,
    max_rows: int = 256,
    desc: str | None = None,
) -> Float[Tensor, "variant batch"]:
    """Run ``batch`` once per variant, each with its components replaced; return the metric.

    ``mode`` says what a replaced component gets: ``"patch"`` (the activation from
    another run, ``values[hook] [batch, pos, ...]``), ``"mean"`` (``values[hook]
    [pos, ...]`` from :func:`mean_activations`) or ``"zero"``. Variants are stacked
    along the batch axis, at most ``max_rows`` rows per forward pass.
    """
    if mode not in ("patch", "mean", "zero"):
        raise MechbookError(f"unknown mode {mode!r}; use 'patch', 'mean' or 'zero'")
    if mode != "zero" and values is None:
        raise MechbookError(f"mode {mode!r} needs values= (from cache_components or mean_activations)")
    n = len(batch)
    per_pass = max(1, max_rows // n)
    out = []
    for start in tqdm(range(0, len(variants), per_pass), desc=desc, disable=None, leave=False):
        group = variants[start : start + per_pass]
        # hook name -> list of (variant index in group, component)
        edits: dict[str, list[tuple[int, Component]]] = defaultdict(list)
        for v, comps in enumerate(group):
            for c in comps:
                edits[c.hook_name].append((v, c))
        hooks = [(name, _edit_hook(todo, n, mode, values)) for name, todo in edits.items()]
        logits, _ = run_last(model, batch.repeat(len(group)), fwd_hooks=hooks)
        out.append(metric(logits).reshape(len(group), n))
    return torch.cat(out)


def _edit_hook(todo: list[tuple[int, Component]], n: int, mode: str, values: Mapping[str, Tensor] | None):
    def hook(act: Tensor, hook: object) -> Tensor:
        act = act.clone()
        for v, c in todo:
            rows = slice(v * n, (v + 1) * n)
            slot = _slot(c)
            if mode == "zero":
                act[(rows, *slot)] = 0.0
            elif mode == "mean":
                act[(rows, *slot)] = values[c.hook_name][: act.shape[1]][slot].to(act.dtype)
            else:
                act[(rows, *slot)] = values[c.hook_name][(slice(None), *slot)].to(act.dtype)
        return act

    return hook


# --- patching sweeps ---------------------------------------------------------------------


def _check_pair(source: TokenBatch, target: TokenBatch) -> None:
    if len(source) != len(target) or not torch.equal(source.lengths, target.lengths):
        raise MechbookError(
            "source and target prompts must pair up one to one with equal token lengths; "
            "build the corrupted prompts from the same template"
        )


def _sweep(model, source, target, metric, components, max_rows, desc) -> pd.DataFrame:
    _check_pair(source, target)
    components = [c.validate(model) for c in components]
    values = cache_components(model, source, components)
    scores = run_variants(model, target, [[c] for c in components], metric, mode="patch", values=values,
                          max_rows=max_rows, desc=desc)
    mean = scores.mean(1)
    return pd.DataFrame(
        {
            "component": [c.label for c in components],
            "kind": [c.kind for c in components],
            "layer": [c.layer for c in components],
            "head": [c.head for c in components],
            "position": [c.position for c in components],
            "metric": mean.tolist(),
        }
    )


def patch_head_outputs(
    model: LoadedModel, source: TokenBatch, target: TokenBatch, metric: Metric, *, heads: Sequence[Component] | None = None, max_rows: int = 256
) -> pd.DataFrame:
    """Patch each head's output (``hook_z``, all positions) from the source run into the target run.

    One row per head with the metric averaged over prompts; the same quantity as
    transformer-lens's ``patching.get_act_patch_attn_head_out_all_pos``.
    """
    return _sweep(model, source, target, metric, heads or all_heads(model), max_rows, "heads")


def patch_mlp_outputs(
    model: LoadedModel,
    source: TokenBatch,
    target: TokenBatch,
    metric: Metric,
    *,
    layers: Sequence[int] | None = None,
    by_position: bool = False,
    max_rows: int = 256,
) -> pd.DataFrame:
    """Patch each MLP's output from the source run into the target run.

    All positions at once, or with ``by_position`` one position at a time (the
    quantity of transformer-lens's ``get_act_patch_mlp_out``).
    """
    layers = range(model.n_layers) if layers is None else layers
    if by_position:
        positions = range(target.input_ids.shape[1])
        comps = [Component("mlp", l, position=p) for l in layers for p in positions]
    else:
        comps = [Component("mlp", l) for l in layers]
    return _sweep(model, source, target, metric, comps, max_rows, "MLPs")


def patch_residual(
    model: LoadedModel,
    source: TokenBatch,
    target: TokenBatch,
    metric: Metric,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    max_rows: int = 256,
) -> pd.DataFrame:
    """Patch the residual stream entering each layer, at each position, from source into target.

    Positions count from the start of the prompt and need prompts of equal length.
    """
    if not target.same_length:
        raise MechbookError("residual patching by position needs prompts of equal token length; group them by length")
    layers = range(model.n_layers) if layers is None else layers
    positions = range(target.input_ids.shape[1]) if positions is None else positions
    comps = [Component("resid", l, position=p) for l in layers for p in positions]
    return _sweep(model, source, target, metric, comps, max_rows, "residual")


def ablate(
    model: LoadedModel,
    batch: TokenBatch,
    components: Sequence[Component],
    metric: Metric,
    *,
    mode: str = "mean",
    means: Mapping[str, Tensor] | None = None,
) -> Float[Tensor, "batch"]:
    """The metric with all the given components ablated at once (zero or mean ablation)."""
    components = [c.validate(model) for c in components]
    return run_variants(model, batch, [components], metric, mode=mode, values=means)[0]


def ablation_sweep(
    model: LoadedModel,
    batch: TokenBatch,
    component_sets: Sequence[Sequence[Component]],
    metric: Metric,
    *,
    mode: str = "mean",
    means: Mapping[str, Tensor] | None = None,
    max_rows: int = 256,
    desc: str | None = None,
) -> Float[Tensor, "variant"]:
    """Mean metric for many ablations (each a set of components removed together), batched."""
    return run_variants(model, batch, component_sets, metric, mode=mode, values=means, max_rows=max_rows, desc=desc).mean(1)
