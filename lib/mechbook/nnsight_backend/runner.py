"""The runner of the ``nnsight`` and ``ndif`` backends: the core's forward passes as nnsight traces.

An nnsight model wraps a plain Hugging Face model that shares the bridge's weights (or,
for NDIF without weights here, a meta-device model); hook names are mapped to its
modules by :func:`mechbook.core.architectures.hf_place`. ``remote="local"`` runs each
trace through nnsight's remote serialization in this process, with no network: the
stand-in for NDIF that the tests use; ``remote=True`` sends it to NDIF.

Hook functions keep transformer-lens's shape (``fn(activation, hook) -> activation | None``,
``hook.name`` the hook name) and see activations in transformer-lens's shapes
(``hook_z`` as ``[batch, pos, head, d_head]``). Attention patterns are not reachable.
A request over :data:`MAX_REQUEST_BYTES` is split (no edits) or refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbook.core.errors import MechbookError
from mechbook.core.runs import check_hook_output
from mechbook.nnsight_backend.ndif import ndif_hub_id, remote_failure

TRACE_COUNT_ENV = "MECHBOOK_COUNT_TRACES"  # a file: each trace appends a line "<batch> <positions>"
# mechbook's cap on one remote request: the tensors sent (token ids, a residual stream to start from) plus the
# tensors sent back (logits, cached activations). NDIF publishes no limit that we could check; this keeps a
# request well under what one HTTP upload and one download comfortably carry. A larger run without edits is
# split into smaller batches; one with edits (whose values may span the batch) is refused.
MAX_REQUEST_BYTES = 256 * 2**20


def plain_hf_model(model) -> torch.nn.Module:
    """A Hugging Face model without the bridge's wrappers, sharing the bridge's weights (no copy).

    The bridge rewires the model it wraps in place (each block becomes a wrapper whose
    ``_original_component`` is the Hugging Face block); nnsight needs the plain tree.
    """
    from transformers import AutoModelForCausalLM

    source = model.hf_model
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(source.config, dtype=next(source.parameters()).dtype)
    tensors = {**dict(source.named_parameters(remove_duplicate=False)),
               **dict(source.named_buffers(remove_duplicate=False))}
    wanted = {**dict(plain.named_parameters(remove_duplicate=False)),
              **dict(plain.named_buffers(remove_duplicate=False))}
    found = {name.replace("_original_component.", ""): t for name, t in tensors.items()}
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise MechbookError(f"the bridge of {model.name} has no tensor for {missing[0]} (and {len(missing) - 1} more); "
                            "the nnsight backend cannot rebuild the plain model: use backend='local'")
    for name in wanted:
        owner, _, attr = name.rpartition(".")
        module = plain.get_submodule(owner)
        value = found[name].detach()
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    return plain.eval()


class NnsightRunner:
    """An nnsight model on the plain Hugging Face model, and how its traces run (here, dry-run remote, NDIF)."""

    def __init__(self, model, remote: bool | str) -> None:
        from nnsight.modeling.transformers import TransformersModel

        self.remote = remote
        if remote:  # NDIF has no mechbook: the hook functions a trace calls ship as source, by value
            from nnsight.ndif import register

            register("mechbook")
        self.hf = plain_hf_model(model) if model.weights_here else model.hf_model  # else on the meta device
        meta = {} if model.weights_here else {"device": "meta"}  # else the pipeline would move the model to CPU
        self.lm = TransformersModel(self.hf, tokenizer=model.tokenizer, task="text-generation", **meta)
        if remote is True:  # NDIF finds its copy of the model by hub id
            self.lm.repo_id = ndif_hub_id(model.name)
        self.traces = 0  # traces run so far: what a chapter costs in requests on NDIF

    joins_rows = False  # the model's own forward runs: no rows joining at their layers, no shared prefix
    fast_loops = False

    @property
    def name(self) -> str:
        return "ndif" if self.remote is True else "nnsight"

    def run_last(self, model, batch, *, names, fwd_hooks, last_only, tokens):
        return run_last(model, batch, names=names, fwd_hooks=fwd_hooks, last_only=last_only, tokens=tokens)

    def run_from_layer(self, model, resid, layer, last_pos, *, fwd_hooks, names, tokens, prefix=None):
        return run_from_layer(model, resid, layer, last_pos, fwd_hooks=fwd_hooks, names=names, tokens=tokens)

    def embeddings(self, model, batch):
        return embeddings(model, batch)

    def unembed(self, model, resid, *, normalize, tokens):
        from mechbook.core.decoding import unembed_here

        if model.weights_here:
            return unembed_here(model, resid, normalize=normalize, tokens=tokens)
        if not normalize:
            model.need_weights("unembed(normalize=False) (the unembedding without the final norm)")
        return unembed(model, resid, tokens=tokens)

    def token_logits(self, model, resid, ids):
        from mechbook.core.decoding import token_logits_here

        if model.weights_here:
            return token_logits_here(model, resid, ids)
        logits = unembed(model, resid, tokens=ids.unique())  # the ids' columns only, decoded on the server
        return logits.gather(-1, ids.expand(resid.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    def trace(self, ids: Tensor):
        self.traces += 1
        count_file = os.environ.get(TRACE_COUNT_ENV)
        if count_file:
            with open(count_file, "a") as out:
                out.write(f"{ids.shape[0]} {ids.shape[1]}\n")
        return self.lm.trace(ids, remote=self.remote, use_cache=False)


# --- planning a run: hook names -> places in the Hugging Face modules, in forward order ------------------


def _plan(model, hooks: Sequence[tuple[str, Any]], names: Sequence[str], start: int) -> list[tuple]:
    """The places a run reads or edits, grouped per module input/output, in the order the forward reaches them.

    Each entry is ``(path, io, [(hook name, place, hook fns, cache?), ...])``; hooks
    before layer ``start`` are left out (they never fire in a run from ``start``).
    """
    from mechbook.core.architectures import hf_place
    from mechbook.core.names import parse_act_name

    fns: dict[str, list] = {}
    for name, fn in hooks:
        fns.setdefault(name, []).append(fn)
    groups: dict[tuple[str, str], list] = {}
    order: dict[tuple[str, str], tuple] = {}
    for name in dict.fromkeys([*fns, *names]):
        kind, layer = parse_act_name(name)
        if layer is not None:
            model.check_layer(layer)
        place = hf_place(model, kind, layer)
        if layer is not None and layer < start:
            continue
        key = (place.path, place.io)
        groups.setdefault(key, []).append((name, place, fns.get(name, []), name in names))
        order[key] = min(order.get(key, place.order), place.order)
    return [(path, io, groups[path, io]) for path, io in sorted(groups, key=lambda key: order[key])]


def _visit(envoy, io: str, entries: list, cache: dict, rows: Tensor, last_pos: Tensor, last_only: bool,
           given: Tensor | None = None) -> None:
    """Read one module input or output (or take it as ``given``), apply its hooks in transformer-lens shapes,
    cache, and write it back."""
    value = given if given is not None else envoy.output if io == "output" else envoy.input
    rest = None
    if isinstance(value, tuple):
        value, rest = value[0], value[1:]
    changed = given is not None
    for name, place, fns, keep in entries:
        act = value
        if place.part is not None:
            act = act.chunk(3, dim=-1)[place.part]
        if place.heads is not None:
            act = act.reshape(*act.shape[:-1], place.heads, -1)
        for fn in fns:
            out = fn(act, hook=SimpleNamespace(name=name))  # as transformer-lens calls hooks
            check_hook_output(out, act, name)  # None, or a tensor of the activation's shape
            if out is not None:
                act, changed = out, True
        if keep:
            act_kept = act.detach()
            cache[name] = act_kept[rows, last_pos] if last_only else act_kept.clone()
        if changed:
            flat = act.reshape(*act.shape[: -2 if place.heads is not None else -1], -1)
            if place.part is not None:
                parts = list(value.chunk(3, dim=-1))
                parts[place.part] = flat
                flat = torch.cat(parts, dim=-1)
            value = flat
    if changed:
        value = value if rest is None else (value, *rest)
        if io == "output":
            envoy.output = value
        else:
            envoy.input = value


def _trace(model, ids: Tensor, plan: list, last_pos: Tensor, *, start: int = 0, resid: Tensor | None = None,
           last_only: bool = False, tokens: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One nnsight trace: the plan's hooks and last-position logits; from ``start`` given ``resid`` entering it.

    Layers before ``start`` are skipped (each returns ``resid``) and layer ``start``
    (or the final norm) takes ``resid`` as its input. The logits are computed in the
    trace, at each row's last position only: the language-model head's input is
    replaced by the final norm's output there. With ``tokens`` only those columns come
    back (the others NaN, as the local backend's restricted unembedding returns them): a far
    smaller download.
    """
    import nnsight

    from mechbook.core.architectures import hf_layers_path, hf_place

    lm = model.runner.lm
    layers = lm.get(hf_layers_path(model))
    norm = lm.get(hf_place(model, "final", None).path)
    head = lm.get(_head_path(model.runner.hf))
    rows = torch.arange(len(last_pos))
    if resid is not None:  # the run starts at this input: first in the plan, given resid
        entry = hf_place(model, "resid_pre", start) if start < model.n_layers else hf_place(model, "final", None)
        key = (entry.path, entry.io)
        there = [entries for path, io, entries in plan if (path, io) == key]
        plan = [(*key, there[0] if there else [])] + [step for step in plan if step[:2] != key]
    try:
        with model.runner.trace(ids):
            cache = {}
            for layer in range(start):
                layers[layer].skip(resid)
            for i, (path, io, entries) in enumerate(plan):
                given = resid if i == 0 and resid is not None else None
                _visit(lm.get(path), io, entries, cache, rows, last_pos, last_only, given)
            head.input = norm.output[rows, last_pos][:, None]
            logits = lm.output.logits[:, 0].detach()
            logits = nnsight.save(logits if tokens is None else logits[:, tokens])
            cache = nnsight.save(cache)
    except Exception as exc:
        failure = remote_failure(exc)
        if failure is None:
            raise
        raise failure from None
    if tokens is not None:
        full = torch.full((len(logits), model.d_vocab), float("nan"), dtype=logits.dtype, device=logits.device)
        full[:, tokens] = logits
        logits = full
    return logits, cache


def request_bytes(model, ids: Tensor, plan: list, *, resid: Tensor | None = None, last_only: bool = False,
                  tokens: Tensor | None = None) -> int:
    """An estimate of one request's tensors: token ids and ``resid`` sent, logits and cached activations back.

    Each cached activation is counted at the residual width (or all heads' width, if larger), in float32.
    """
    width = max(model.d_model, model.n_heads * model.d_head)
    cached = sum(keep for _, _, entries in plan for *_, keep in entries)
    batch, positions = ids.shape
    sent = ids.numel() * 8 + (resid.numel() * resid.element_size() if resid is not None else 0)
    columns = model.d_vocab if tokens is None else len(tokens)
    back = batch * columns * 4 + cached * batch * (1 if last_only else positions) * width * 4
    return sent + back


def _check_size(model, ids: Tensor, plan: list, **kwargs) -> None:
    """Refuse a remote request over :data:`MAX_REQUEST_BYTES` in one line."""
    size = request_bytes(model, ids, plan, **kwargs)
    if model.runner.remote and size > MAX_REQUEST_BYTES:
        raise MechbookError(f"one request to NDIF would carry about {size / 2**20:.0f} MiB ({ids.shape[0]} prompts of "
                            f"{ids.shape[1]} tokens), over mechbook's cap of {MAX_REQUEST_BYTES / 2**20:.0f} MiB "
                            "(nnsight_backend.runner.MAX_REQUEST_BYTES); run fewer prompts at once (a smaller "
                            "batch_size or -p n_prompts=...)")


def _head_path(hf: torch.nn.Module) -> str:
    """The output embedding's module path (``lm_head`` in every supported family)."""
    head = hf.get_output_embeddings()
    return next(name for name, module in hf.named_modules() if module is head)


# --- the runner's passes -------------------------------------------------------------------------------------------------


def run_last(model, batch, *, names: Sequence[str] = (), fwd_hooks: Sequence = (), last_only: bool = False,
             tokens: Int[Tensor, "k"] | None = None) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """:func:`mechbook.core.runs.run_last` on an nnsight backend."""
    plan = _plan(model, fwd_hooks, names, 0)
    tokens = None if tokens is None else torch.as_tensor(tokens, dtype=torch.long, device=batch.input_ids.device)
    size = request_bytes(model, batch.input_ids, plan, last_only=last_only, tokens=tokens)
    if model.runner.remote and size > MAX_REQUEST_BYTES and not fwd_hooks and len(batch) > 1:
        half = len(batch) // 2  # no edits: the rows are independent, so two smaller requests give the same
        parts = [run_last(model, batch.select(rows), names=names, last_only=last_only, tokens=tokens)
                 for rows in (slice(0, half), slice(half, None))]
        return torch.cat([parts[0][0], parts[1][0]]), {name: _cat_rows(parts[0][1][name], parts[1][1][name], last_only)
                                                        for name in parts[0][1]}
    _check_size(model, batch.input_ids, plan, last_only=last_only, tokens=tokens)
    with torch.inference_mode():
        logits, cache = _trace(model, batch.input_ids, plan, batch.last_pos, last_only=last_only, tokens=tokens)
    return logits, cache


def _cat_rows(a: Tensor, b: Tensor, last_only: bool) -> Tensor:
    """Two halves of a batch's cached activation, the shorter padded to the longer's positions."""
    if not last_only and a.shape[1] != b.shape[1]:
        width = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in (a, b))
    return torch.cat([a, b])


def run_from_layer(model, resid: Float[Tensor, "batch pos d_model"], layer: int, last_pos: Int[Tensor, "batch"], *,
                   fwd_hooks: Sequence = (), names: Sequence[str] = (),
                   tokens: Int[Tensor, "k"] | None = None) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """:func:`mechbook.core.runs.run_from_layer` on an nnsight backend (arguments already checked there).

    The trace runs on placeholder tokens of ``resid``'s shape, so the model builds its
    own masks and positions; each layer before ``layer`` is skipped and returns ``resid``.
    """
    early = [n for n in names if _layer_of(n) is not None and _layer_of(n) < layer]
    if early:
        raise MechbookError(f"{', '.join(early)} did not fire: they lie before layer {layer}, where this run starts")
    plan = _plan(model, fwd_hooks, names, layer)
    from mechbook.core.architectures import placeholder_token

    ids = torch.full(resid.shape[:2], placeholder_token(model), dtype=torch.long, device=resid.device)
    tokens = None if tokens is None else torch.as_tensor(tokens, dtype=torch.long, device=resid.device)
    _check_size(model, ids, plan, resid=resid, tokens=tokens)
    with torch.inference_mode():
        logits, cache = _trace(model, ids, plan, last_pos.to(resid.device), start=layer, resid=resid, tokens=tokens)
    return logits, cache


def embeddings(model, batch) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering layer 0 on an nnsight backend."""
    from mechbook.core.names import act_name

    name = act_name("resid_pre", 0)
    _, cache = run_last(model, batch, names=[name])
    return cache[name]


def _layer_of(name: str) -> int | None:
    from mechbook.core.names import parse_act_name

    return parse_act_name(name)[1]


def unembed(model, resid: Float[Tensor, "... d_model"], *,
            tokens: Int[Tensor, "k"] | None = None) -> Float[Tensor, "... d_vocab"]:
    """:func:`mechbook.core.decoding.unembed` where the weights are not here: final norm, unembedding and softcap
    run in a trace on the server, each vector as a one-position row entering the final norm.

    The rows go in as few requests as fit under :data:`MAX_REQUEST_BYTES`.
    """
    flat = resid.reshape(-1, model.d_model)
    tokens = None if tokens is None else torch.as_tensor(tokens, dtype=torch.long, device=flat.device)
    one = request_bytes(model, torch.zeros(1, 1, dtype=torch.long), [], resid=flat[:1, None], tokens=tokens)
    rows = max(1, MAX_REQUEST_BYTES // one)
    zero = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
    parts = [run_from_layer(model, flat[i : i + rows, None], model.n_layers, zero[i : i + rows], tokens=tokens)[0]
             for i in range(0, len(flat), rows)]
    return torch.cat(parts).reshape(*resid.shape[:-1], -1)
