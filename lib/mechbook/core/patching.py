"""Activation patching and ablation sweeps over heads, MLPs and the residual stream.

Every sweep goes through :func:`sweep`: a list of *variants* (one patched or ablated
component, or a set of them), each with the layer where its edits start. Variants
with the same start layer are stacked along the batch axis and run together through
:func:`mechbook.core.runs.run_variants` from that layer on, from the unedited run's
residual stream (nothing before a component's layer changes when it is edited). A
sweep over all heads of a model is a handful of passes over a fraction of the
layers, not one full forward per head. On the architectures with a hand-written
decoder loop, the positions that source and target prompts share (e.g.
``<bos>Van done in``) are also computed once and their keys and values reused.

The named sweeps (:func:`patch_head_outputs`, :func:`patch_mlp_outputs`,
:func:`patch_residual`, :func:`ablation_sweep`, and
:func:`mechbook.core.path_patching.patch_paths`) only say what each variant edits.
Components (:class:`~mechbook.core.names.Component`) name what is edited: a head's
output is its slice of ``hook_z``, an MLP's output is ``hook_mlp_out``, the residual
stream ``hook_resid_pre``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core.architectures import SharedPrefix, has_fast_loop
from mechbook.core.decoding import as_token_ids, check_finite, check_logits
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import Edit, edit_hooks, mean_ablation, zero_ablation
from mechbook.core.loading import LoadedModel
from mechbook.core.names import (
    Component,
    act_name,
    all_heads,
    all_mlps,
    check_components,
    check_positions,
)
from mechbook.core.runs import (
    TokenBatch,
    embeddings,
    run_from_layer,
    run_last,
    run_variants,
)

Metric = Callable[[Float[Tensor, "... batch d_vocab"]], Float[Tensor, "... batch"]]

__all__ = ["AnswerProb", "Component", "LogitDiff", "Metric", "ablate", "ablation_sweep", "all_heads", "all_mlps", "answer_prob",
           "cache_components", "check_pair", "check_whole", "logit_diff", "mean_activations", "patch_head_outputs",
           "patch_mlp_outputs", "patch_residual", "resid_names", "sweep"]


# --- metrics ------------------------------------------------------------------------------------


def _rows_of(logits: Tensor, n: int, what: str) -> None:
    if not isinstance(logits, Tensor):
        raise MechbookError(f"{what} scores a torch tensor of logits [..., {n}, d_vocab], got {type(logits).__name__}")
    if logits.dim() < 2 or logits.shape[-2] != n:
        raise MechbookError(
            f"{what} was built for {n} prompts but got logits of shape {tuple(logits.shape)}; "
            "build the metric from the same prompts it scores (stacked variants go on a leading axis)"
        )


def _vocab_of(logits: Tensor, high: int, what: str) -> None:
    if high >= logits.shape[-1]:
        raise MechbookError(f"{what} reads token id {high}, but the logits have {logits.shape[-1]} columns "
                            f"(ids 0..{logits.shape[-1] - 1}); use ids of this model's tokenizer")


def _ids_on_device(*ids: Tensor) -> Callable[[torch.device], tuple[Tensor, ...]]:
    """The row indices and ``ids`` on a device, copied there once: a metric runs once per pass of a sweep."""
    moved: dict[torch.device, tuple[Tensor, ...]] = {}

    def on(device: torch.device) -> tuple[Tensor, ...]:
        if device not in moved:
            moved[device] = (torch.arange(len(ids[0]), device=device), *(i.to(device) for i in ids))
        return moved[device]

    return on


def _row_index(rows: Sequence[int] | Tensor, n: int, what: str) -> Tensor:
    index = as_token_ids(rows, f"{what}'s rows")  # whole numbers >= 0, as a long tensor
    if index.dim() != 1 or len(index) == 0 or int(index.max()) >= n:
        raise MechbookError(f"{what}.rows takes a non-empty list of row indices below {n} (the prompts it was built "
                            f"for), got {index.tolist()[:8]}")
    return index


class LogitDiff:
    """Logit of the correct token minus logit of the incorrect one, per prompt.

    Takes logits ``[..., n, d_vocab]`` for the ``n`` prompts it was built for (leading
    axes: stacked variants) and returns ``[..., n]``; other shapes, ids outside the
    vocabulary, non-finite logits and degenerate rows (every id the metric reads has the
    same logit, as when every logit is equal) are refused. It reads only its own ids'
    columns (``answer_ids``), so a restricted unembedding (``tokens=metric.answer_ids``)
    suffices. ``rows(index)`` is the same metric for some of its prompts.
    """

    def __init__(self, correct: Int[Tensor, "batch"], incorrect: Int[Tensor, "batch"]) -> None:
        correct = as_token_ids(correct, "logit_diff's correct ids")
        incorrect = as_token_ids(incorrect, "logit_diff's incorrect ids")
        if correct.shape != incorrect.shape or correct.dim() != 1:
            raise MechbookError(f"logit_diff needs one correct and one incorrect id per prompt; got shapes "
                                f"{tuple(correct.shape)} and {tuple(incorrect.shape)}")
        if len(correct) == 0:
            raise MechbookError("logit_diff got no prompts (no ids); build it from at least one prompt's answer ids")
        self.correct, self.incorrect = correct, incorrect
        self.answer_ids = torch.unique(torch.cat([correct, incorrect]))
        self._high = int(self.answer_ids.max())
        self._on = _ids_on_device(correct, incorrect, self.answer_ids)

    def __call__(self, logits: Tensor) -> Tensor:
        _rows_of(logits, len(self.correct), "logit_diff")
        _vocab_of(logits, self._high, "logit_diff")
        rows, right, wrong, read = self._on(logits.device)
        value = logits[..., rows, right] - logits[..., rows, wrong]
        check_finite(value, "the logit difference")
        if len(self.answer_ids) > 1:  # the columns it reads, all equal in some row: every logit is (e.g. an overflow)
            check_logits(logits[..., read], "the logits of logit_diff's ids")
        return value

    def rows(self, index: Sequence[int] | Tensor) -> LogitDiff:
        index = _row_index(index, len(self.correct), "logit_diff")
        return LogitDiff(self.correct[index], self.incorrect[index])


class AnswerProb:
    """Probability of the answer token, per prompt (needs every logit: no restricted unembedding).

    Negative ids, ids past the vocabulary and degenerate logits (non-finite, or every
    logit of a row equal) are refused. ``rows(index)`` is the same metric for some of its prompts.
    """

    def __init__(self, answer: Int[Tensor, "batch"]) -> None:
        answer = as_token_ids(answer, "answer_prob's answer ids")
        if answer.dim() != 1:
            raise MechbookError(f"answer_prob needs one answer id per prompt, got shape {tuple(answer.shape)}")
        if len(answer) == 0:
            raise MechbookError("answer_prob got no prompts (no ids); build it from at least one prompt's answer id")
        self.answer = answer
        self._high = int(answer.max())
        self._on = _ids_on_device(answer)

    def __call__(self, logits: Tensor) -> Tensor:
        _rows_of(logits, len(self.answer), "answer_prob")
        _vocab_of(logits, self._high, "answer_prob")
        check_logits(logits, "the logits of answer_prob (a restricted unembedding leaves NaN)")
        rows, ids = self._on(logits.device)
        return logits.softmax(-1)[..., rows, ids]

    def rows(self, index: Sequence[int] | Tensor) -> AnswerProb:
        return AnswerProb(self.answer[_row_index(index, len(self.answer), "answer_prob")])


def logit_diff(correct: Int[Tensor, "batch"], incorrect: Int[Tensor, "batch"]) -> LogitDiff:
    """:class:`LogitDiff`: the logit of the correct token minus that of the incorrect one, per prompt."""
    return LogitDiff(correct, incorrect)


def answer_prob(answer: Int[Tensor, "batch"]) -> AnswerProb:
    """:class:`AnswerProb`: the probability of the answer token, per prompt."""
    return AnswerProb(answer)


# --- activations to patch in ---------------------------------------------------------------------


def cache_components(model: LoadedModel, batch: TokenBatch, components: Iterable[Component]) -> dict[str, Tensor]:
    """Cache the activations of the hooks the components live in, on one batch."""
    components = check_components(components, "cache_components")
    names = sorted({c.validate(model).hook_name for c in components})
    _, cache = run_last(model, batch, names=names)
    return cache


def mean_activations(model: LoadedModel, batch: TokenBatch, components: Iterable[Component]) -> dict[str, Tensor]:
    """Per-position means over a (corrupted) batch, for mean ablation.

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


def check_pair(source: TokenBatch, target: TokenBatch) -> None:
    """Source and target prompts must pair up row by row with equal token lengths."""
    if len(source) != len(target) or not torch.equal(source.lengths, target.lengths):
        raise MechbookError(
            "source and target prompts must pair up one to one with equal token lengths; "
            "build the corrupted prompts from the same template"
        )


# --- the sweep -----------------------------------------------------------------------------------


EditsFor = Callable[[int, slice], list[Edit]]


def resid_names(model: LoadedModel, layers: Iterable[int]) -> list[str]:
    """The hook names of the residual stream entering each of ``layers`` (the final norm's input for ``n_layers``).

    What a sweep's ``base`` cache must hold for its start layers.
    """
    return [_entering(model, l) for l in sorted(set(layers))]


def _entering(model: LoadedModel, layer: int) -> str:
    return act_name("resid_pre", layer) if layer < model.n_layers else act_name("final")


def sweep(
    model: LoadedModel,
    batch: TokenBatch,
    starts: Sequence[int],
    edits_for: EditsFor,
    metric: Metric,
    *,
    base: Mapping[str, Tensor],
    context: Callable[[int], list[Edit]] | None = None,
    prefix: SharedPrefix | None = None,
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
    desc: str | None = None,
) -> Float[Tensor, "variant batch"]:
    """The metric per prompt for each variant of a sweep, one variant's edits at a time.

    Variant ``i`` changes nothing before layer ``starts[i]``; ``edits_for(i, rows)``
    returns its edits, applied to ``rows``, the rows its copy of ``batch`` holds in a
    pass. ``context(layer)`` returns edits that every variant starting at ``layer``
    carries on all rows (a circuit's mean-ablated complement). Variants with the same
    start layer run together through :func:`~mechbook.core.runs.run_variants` from
    that layer on, starting from ``base``: the unedited run's cache, holding
    :func:`resid_names` of the start layers. With a ``prefix`` (recorded on that run)
    only the positions after it run, and ``edits_for`` edits those, counted from the
    prefix's end. One tqdm bar (``desc``) counts the variants. The rows come back in
    the variants' order, on the host.
    """
    starts = list(starts)
    if not starts:
        raise MechbookError("sweep got no variants; pass at least one start layer")
    missing = [name for name in resid_names(model, starts) if name not in base]
    if missing:
        raise MechbookError(f"the base cache has no {', '.join(missing)}; run the unedited batch with "
                            "names=resid_names(model, starts)")
    if prefix is not None:
        prefix.recording = False  # recorded on the base run: from here on its keys and values are replayed
    skip = 0 if prefix is None else prefix.length
    by_start: dict[int, list[int]] = defaultdict(list)
    for i, layer in enumerate(starts):
        by_start[layer].append(i)
    n = len(batch)
    out, found = torch.empty(len(starts), n), []
    progress = tqdm(total=len(starts), desc=desc, disable=None, leave=False)
    for layer, idx in sorted(by_start.items()):

        def hooks_for(first: int, count: int, idx=idx, layer=layer):
            with torch.inference_mode():
                edits = list(context(layer)) if context is not None else []
                for v, i in enumerate(idx[first : first + count]):
                    edits += edits_for(i, slice(v * n, (v + 1) * n))
            return edit_hooks(edits)

        resid = base[_entering(model, layer)][:, skip:]
        found.append((idx, run_variants(model, batch, len(idx), hooks_for, metric, layer=layer, resid=resid,
                                        prefix=prefix, max_rows=max_rows, tokens=tokens, progress=progress)))
    for idx, values in found:  # copied to the host after the last pass: the passes run without waiting for it
        out[idx] = values.float().cpu()
    progress.close()
    return out


# --- patching sweeps ------------------------------------------------------------------------------


def _shared_prefix(model: LoadedModel, source: TokenBatch, target: TokenBatch) -> int:
    """How many leading positions every source and target prompt share (0 without a hand-written loop)."""
    if not has_fast_loop(model):
        return 0
    differs = (source.input_ids != target.input_ids).any(0).nonzero()
    first = int(differs[0]) if len(differs) else target.input_ids.shape[1]
    return min(first, int(target.lengths.min()) - 1)  # keep every prompt's last position in the suffix


def _table(components: Sequence[Component], values: Sequence[float]) -> pd.DataFrame:
    return pd.DataFrame({
        "component": [c.label for c in components],
        "kind": [c.kind for c in components],
        "layer": [c.layer for c in components],
        "head": [c.head for c in components],
        "position": [c.position for c in components],
        "metric": list(values),
    })


def _patch_sweep(model, source, target, metric, components, max_rows, tokens, desc) -> pd.DataFrame:
    """Each component patched alone from ``source`` into ``target``: the metric averaged over prompts.

    With a hand-written loop the prefix that source and target share is run once, on
    the unedited target run (a patch inside it changes nothing).
    """
    check_pair(source, target)
    check_metric(metric)
    components = [c.validate(model) for c in check_components(components, f"patching {desc}")]
    check_positions(components, target.input_ids.shape[1])
    _, src = run_last(model, source, names=sorted({c.hook_name for c in components}))
    first = _shared_prefix(model, source, target)
    prefix = SharedPrefix(first) if first > 0 else None
    starts = [c.layer for c in components]
    _, base = run_from_layer(model, embeddings(model, target), 0, target.last_pos,
                             names=resid_names(model, starts), prefix=prefix)

    def edits_for(i: int, rows: slice) -> list[Edit]:
        c = components[i]
        if c.position is not None and c.position < first:  # inside the shared prefix: nothing to patch
            return []
        shifted = c if not first else Component(c.kind, c.layer, c.head,
                                                 None if c.position is None else c.position - first)
        return [Edit(shifted, "patch", src[c.hook_name][:, first:], rows)]

    values = sweep(model, target, starts, edits_for, metric, base=base, prefix=prefix, max_rows=max_rows,
                   tokens=tokens, desc=desc)
    return _table(components, values.mean(1).tolist())


def patch_head_outputs(
    model: LoadedModel, source: TokenBatch, target: TokenBatch, metric: Metric, *,
    heads: Sequence[Component] | None = None, max_rows: int = 256, tokens: Int[Tensor, "k"] | None = None,
) -> pd.DataFrame:
    """Patch each head's output (``hook_z``, all positions) from the source run into the target run.

    One row per head with the metric averaged over prompts; the quantity of
    transformer-lens's ``patching.get_act_patch_attn_head_out_all_pos``. ``tokens``
    (e.g. ``metric.answer_ids`` of a logit difference) restricts the unembedding to the
    ids the metric reads.
    """
    heads = check_components(heads, "patch_head_outputs", ("head",)) if heads is not None else all_heads(model)
    return _patch_sweep(model, source, target, metric, heads, max_rows, tokens, "heads")


def patch_mlp_outputs(
    model: LoadedModel, source: TokenBatch, target: TokenBatch, metric: Metric, *,
    layers: Sequence[int] | None = None, by_position: bool = False, max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> pd.DataFrame:
    """Patch each MLP's output from the source run into the target run.

    All positions at once, or with ``by_position`` one position at a time (the
    quantity of transformer-lens's ``get_act_patch_mlp_out``).
    """
    layers = range(model.n_layers) if layers is None else [model.check_layer(l) for l in _listed(layers, "layers")]
    if by_position:
        comps = [Component("mlp", l, position=p) for l in layers for p in range(target.input_ids.shape[1])]
    else:
        comps = [Component("mlp", l) for l in layers]
    return _patch_sweep(model, source, target, metric, comps, max_rows, tokens, "MLPs")


def patch_residual(
    model: LoadedModel, source: TokenBatch, target: TokenBatch, metric: Metric, *,
    layers: Sequence[int] | None = None, positions: Sequence[int] | None = None, max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> pd.DataFrame:
    """Patch the residual stream entering each layer, at each position, from source into target.

    Positions count from the start of the prompt and need prompts of equal length.
    """
    if not target.same_length:
        raise MechbookError("residual patching by position needs prompts of equal token length; group them by length")
    layers = range(model.n_layers) if layers is None else [model.check_layer(l) for l in _listed(layers, "layers")]
    positions = range(target.input_ids.shape[1]) if positions is None else _listed(positions, "positions")
    comps = [Component("resid", l, position=p) for l in layers for p in positions]
    return _patch_sweep(model, source, target, metric, comps, max_rows, tokens, "residual")


def _listed(values, what: str) -> list:
    """``values`` (layers, positions) as a list, or a one-line error for a single number or a string."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise MechbookError(f"{what} takes a list, e.g. {what}=[0, 1], got {values!r}; wrap a single one in a list")
    values = list(values)
    if not values:
        raise MechbookError(f"{what}=[] selects nothing to patch; pass e.g. {what}=[0, 1], or None for all")
    return values


def check_metric(metric) -> Metric:
    """``metric`` if it can be called on logits (e.g. logit_diff(...)), else a one-line error."""
    if not callable(metric):
        raise MechbookError(f"metric must be a function of logits, e.g. logit_diff(correct_ids, incorrect_ids), got "
                            f"{type(metric).__name__}")
    return metric


# --- ablation --------------------------------------------------------------------------------------


def ablation_sweep(
    model: LoadedModel,
    batch: TokenBatch,
    component_sets: Sequence[Sequence[Component]],
    metric: Metric,
    *,
    mode: str = "mean",
    means: Mapping[str, Tensor] | None = None,
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
    desc: str | None = None,
) -> Float[Tensor, "set batch"]:
    """The metric per prompt with each set of components ablated together (zero or mean ablation, all positions).

    A :func:`sweep` whose variants are the sets, each starting at its earliest layer.
    """
    if mode not in ("mean", "zero"):
        raise MechbookError(f"unknown ablation mode {mode!r}; use 'mean' or 'zero'")
    check_metric(metric)
    if isinstance(component_sets, (Component, str)) or not isinstance(component_sets, Iterable):
        raise MechbookError(f"ablation_sweep takes a list of sets of components, e.g. [[Component('head', 0, 1)]], "
                            f"got {type(component_sets).__name__}")
    component_sets = list(component_sets)
    if not component_sets:
        raise MechbookError("ablation_sweep got no sets of components; pass at least one, e.g. [[Component('mlp', 0)]]")
    sets = [check_whole([c.validate(model) for c in _component_set(s)]) for s in component_sets]
    if mode == "mean":
        if means is None:
            raise MechbookError("mean ablation needs means= (from mean_activations over the corrupted prompts)")
        check_means(model, batch, means, [c for s in sets for c in s])
    starts = [min((c.layer for c in s), default=model.n_layers) for s in sets]  # an empty set: the unablated model
    _, base = run_last(model, batch, names=resid_names(model, starts))

    def edits_for(i: int, rows: slice) -> list[Edit]:
        return zero_ablation(sets[i], rows=rows) if mode == "zero" else mean_ablation(sets[i], means, rows=rows)

    return sweep(model, batch, starts, edits_for, metric, base=base, max_rows=max_rows, tokens=tokens, desc=desc)


def _component_set(s) -> list[Component]:
    """One set of an ablation sweep: a list of components (possibly empty: the unablated model)."""
    if isinstance(s, (Component, str)) or not isinstance(s, Iterable):
        raise MechbookError(f"each set of ablation_sweep is a list of components, got {s!r}; wrap a single component "
                            "in a list: [[Component('head', 0, 1)]]")
    s = list(s)
    if not all(isinstance(c, Component) for c in s):
        raise MechbookError(f"a set of ablation_sweep holds {next(c for c in s if not isinstance(c, Component))!r}; "
                            "pass Component('head', l, h) or Component('mlp', l)")
    return s


def check_whole(components: Sequence[Component]) -> list[Component]:
    """Ablation removes whole heads and MLPs at every position; anything else is refused."""
    if any(c.kind not in ("head", "mlp") or c.position is not None for c in components):
        raise MechbookError("ablation removes whole heads and MLPs (every position); pass Component('head', l, h) "
                            "or Component('mlp', l)")
    return list(components)


def ablate(
    model: LoadedModel,
    batch: TokenBatch,
    components: Sequence[Component],
    metric: Metric,
    *,
    mode: str = "mean",
    means: Mapping[str, Tensor] | None = None,
) -> Float[Tensor, "batch"]:
    """The metric per prompt with all the given components ablated at once (zero or mean ablation)."""
    return ablation_sweep(model, batch, [components], metric, mode=mode, means=means)[0]


def check_means(model: LoadedModel, batch: TokenBatch, means: Mapping[str, Tensor],
                components: Iterable[Component]) -> None:
    """Means must cover every ablated component's hook and every position of the prompts."""
    if not isinstance(means, Mapping):
        raise MechbookError(f"means must be a dict of hook name to mean, got {type(means).__name__}; compute them "
                            "with circuit_means(model, corrupted)")
    width = batch.input_ids.shape[1]
    for c in components:
        name = c.validate(model).hook_name
        if name not in means:
            raise MechbookError(f"means have no entry for {name}; compute them with circuit_means(model, corrupted)")
        if means[name].shape[0] < width:
            raise MechbookError(
                f"the means cover {means[name].shape[0]} positions but the prompts have {width} tokens; "
                "compute the means on corrupted prompts at least as long as the clean ones"
            )

