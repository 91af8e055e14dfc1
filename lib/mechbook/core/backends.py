"""Where forward passes run: the local transformer-lens bridge, or nnsight, locally or on NDIF.

- ``local`` (the default): the ``TransformerBridge`` with transformer-lens hooks.
- ``nnsight``: an ``nnsight`` model around a plain Hugging Face model that shares the
  bridge's weights; hook names are mapped to its modules by
  :func:`mechbook.core.architectures.hf_place`. ``remote="local"`` runs each trace
  through nnsight's remote serialization in this process, with no network: the stand-in
  for NDIF that the tests use.
- ``ndif``: the same traces sent to NDIF (``remote=True``); the key is ``NDIF_API_KEY``.

A model is put on a backend once, with :func:`use_backend`; :func:`mechbook.core.runs.run_last`,
``run_from_layer`` and ``embeddings``, the only places a forward pass runs, hand it to
the backend, so every sweep, ablation and circuit of the core runs on it unchanged.
Hook functions keep transformer-lens's shape (``fn(activation, hook) -> activation | None``,
``hook.name`` the hook name) and see activations in transformer-lens's shapes
(``hook_z`` as ``[batch, pos, head, d_head]``). Attention patterns are not reachable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbook.core.errors import MechbookError

BACKENDS = ("local", "nnsight", "ndif")
NDIF_KEY_ENV = "NDIF_API_KEY"
INSTALL_HINT = "pip install -e .[ndif]"


def use_backend(model, backend: str = "nnsight", *, remote: bool | str = False):
    """``model`` with its forward passes run on ``backend`` (same weights, same tokenizer).

    ``remote="local"`` (nnsight only) runs every trace through nnsight's remote
    serialization in-process. ``backend="ndif"`` needs ``NDIF_API_KEY`` and sends each
    trace to NDIF.
    """
    if backend not in BACKENDS:
        raise MechbookError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "local":
        if remote:
            raise MechbookError("remote= applies to the nnsight backend; the local backend runs here")
        return dataclasses.replace(model, backend="local", runner=None)
    if importlib.util.find_spec("nnsight") is None:
        raise MechbookError(f"backend={backend!r} needs nnsight, which is not installed; run: {INSTALL_HINT}")
    if backend == "ndif":
        if not os.environ.get(NDIF_KEY_ENV):
            raise MechbookError(f"backend='ndif' needs an NDIF API key and {NDIF_KEY_ENV} is not set; "
                                f"export {NDIF_KEY_ENV}=<your key> (or use backend='nnsight' to run here)")
        if model.source != "hub":
            raise MechbookError(f"NDIF runs models of the Hugging Face hub (e.g. gpt2, EleutherAI/gpt-j-6B); "
                                f"{model.name} is a {model.source} model: use backend='nnsight' to run it here")
        remote = True
    elif remote not in (False, "local"):
        raise MechbookError(f"remote={remote!r}: the nnsight backend takes remote='local' (a dry run of the "
                            "remote path here); use backend='ndif' to run on NDIF")
    return dataclasses.replace(model, backend=backend, runner=NnsightRunner(model, remote))


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
        self.hf = plain_hf_model(model)
        self.lm = TransformersModel(self.hf, tokenizer=model.tokenizer, task="text-generation")
        if remote is True:  # NDIF finds its copy of the model by hub id
            from mechbook.core.loading import REGISTRY

            self.lm.repo_id = REGISTRY[model.name].hub_id

    def trace(self, ids: Tensor):
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
            out = fn(act, SimpleNamespace(name=name))
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
           last_only: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """One nnsight trace: the plan's hooks and last-position logits; from ``start`` given ``resid`` entering it.

    Layers before ``start`` are skipped (each returns ``resid``) and layer ``start``
    (or the final norm) takes ``resid`` as its input. The logits are computed in the
    trace, at each row's last position only: the language-model head's input is
    replaced by the final norm's output there.
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
    with model.runner.trace(ids):
        cache = {}
        for layer in range(start):
            layers[layer].skip(resid)
        for i, (path, io, entries) in enumerate(plan):
            given = resid if i == 0 and resid is not None else None
            _visit(lm.get(path), io, entries, cache, rows, last_pos, last_only, given)
        head.input = norm.output[rows, last_pos][:, None]
        logits = nnsight.save(lm.output.logits[:, 0].detach())
        cache = nnsight.save(cache)
    return logits, cache


def _head_path(hf: torch.nn.Module) -> str:
    """The output embedding's module path (``lm_head`` in every supported family)."""
    head = hf.get_output_embeddings()
    return next(name for name, module in hf.named_modules() if module is head)


def _restrict(logits: Tensor, tokens: Tensor | None) -> Tensor:
    """Only the ``tokens`` columns, the others NaN, as the local backend's restricted unembedding returns them."""
    if tokens is None:
        return logits
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=logits.device)
    out = torch.full_like(logits, float("nan"))
    out[..., tokens] = logits[..., tokens]
    return out


# --- the entry points runs.py hands over ---------------------------------------------------------------


def run_last(model, batch, *, names: Sequence[str] = (), fwd_hooks: Sequence = (), last_only: bool = False,
             tokens: Int[Tensor, "k"] | None = None) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """:func:`mechbook.core.runs.run_last` on an nnsight backend."""
    plan = _plan(model, fwd_hooks, names, 0)
    with torch.inference_mode():
        logits, cache = _trace(model, batch.input_ids, plan, batch.last_pos, last_only=last_only)
    return _restrict(logits, tokens), cache


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
    with torch.inference_mode():
        logits, cache = _trace(model, ids, plan, last_pos.to(resid.device), start=layer, resid=resid)
    return _restrict(logits, tokens), cache


def embeddings(model, batch) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering layer 0 on an nnsight backend."""
    from mechbook.core.names import act_name

    name = act_name("resid_pre", 0)
    _, cache = run_last(model, batch, names=[name])
    return cache[name]


def _layer_of(name: str) -> int | None:
    from mechbook.core.names import parse_act_name

    return parse_act_name(name)[1]
