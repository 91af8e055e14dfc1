"""Where forward passes run: the local transformer-lens bridge, or nnsight, locally or on NDIF.

- ``local`` (the default): the ``TransformerBridge`` with transformer-lens hooks.
- ``nnsight``: an ``nnsight`` model around a plain Hugging Face model that shares the
  bridge's weights; hook names are mapped to its modules by
  :func:`mechbook.core.architectures.hf_place`. ``remote="local"`` runs each trace
  through nnsight's remote serialization in this process, with no network: the stand-in
  for NDIF that the tests use.
- ``ndif``: the same traces sent to NDIF (``remote=True``); the key is ``NDIF_API_KEY``.
  ``load_model(name, backend="ndif")`` reads only the config and tokenizer and builds the
  model on the meta device (``weights_here`` False): decoding (:func:`unembed`) then runs
  in a trace on NDIF too, and what needs weight matrices here (a head's OV circuit, path
  patching's projections, the final norm alone) is refused in one line.

A model is put on a backend once, with :func:`use_backend`; :func:`mechbook.core.runs.run_last`,
``run_from_layer`` and ``embeddings``, the only places a forward pass runs, hand it to
the backend, so every sweep, ablation and circuit of the core runs on it unchanged.
Hook functions keep transformer-lens's shape (``fn(activation, hook) -> activation | None``,
``hook.name`` the hook name) and see activations in transformer-lens's shapes
(``hook_z`` as ``[batch, pos, head, d_head]``). Attention patterns are not reachable.

Before a run on NDIF, :func:`check_ndif` finds what would stop it (nnsight, the key, a model NDIF
does not serve, no answer); during it, :func:`remote_failure` turns the server's refusals into one
line naming the fix, and a request over :data:`MAX_REQUEST_BYTES` is split or refused.
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
from mechbook.core.runs import check_hook_output

BACKENDS = ("local", "nnsight", "ndif")
NDIF_KEY_ENV = "NDIF_API_KEY"
INSTALL_HINT = "bash scripts/setup.sh (nnsight is in requirements.lock)"
TRACE_COUNT_ENV = "MECHBOOK_COUNT_TRACES"  # a file: each trace appends a line "<batch> <positions>"
NDIF_HOST = "https://api.ndif.us"  # nnsight's default (nnsight.schema.config); NDIF_HOST overrides it, as in nnsight
# Models NDIF serves that the papers use or that are their larger kin: the list of issue 13, taken from
# https://ndif.us/models and not checked against NDIF from here (it cannot be reached); nnsight's own docs
# name GPT-2 openai-community/gpt2. NDIF's live list: python -c "import nnsight; print(nnsight.status())".
# Name -> the hub id NDIF knows it by; hub ids compare case-insensitively.
NDIF_MODELS = {
    "gpt2": "openai-community/gpt2",
    "EleutherAI/gpt-j-6B": "EleutherAI/gpt-j-6b",
    "meta-llama/Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.1-405B": "meta-llama/Llama-3.1-405B",
}
# mechbook's cap on one remote request: the tensors sent (token ids, a residual stream to start from) plus the
# tensors sent back (logits, cached activations). NDIF publishes no limit that we could check; this keeps a
# request well under what one HTTP upload and one download comfortably carry. A larger run without edits is
# split into smaller batches; one with edits (whose values may span the batch) is refused.
MAX_REQUEST_BYTES = 256 * 2**20
PIN_HINT = ("update the nnsight pin in pyproject.toml ([project.optional-dependencies] ndif) to the server's "
            "version (python -c \"import nnsight; print(nnsight.compare())\"), then: "
            "bash scripts/lock.sh --upgrade-package nnsight && bash scripts/setup.sh")


def ndif_hub_id(name: str) -> str | None:
    """The hub id under which NDIF serves model ``name`` (a registry name or hub id), or None if it does not."""
    wanted = name.lower()
    for known, hub_id in NDIF_MODELS.items():
        if wanted in (known.lower(), hub_id.lower()):
            return hub_id
    return None


def ndif_unreachable(timeout: float = 2.0) -> str | None:
    """Why NDIF cannot be reached now (no answer, a name that does not resolve), or None; in about ``timeout`` s."""
    import threading
    import urllib.error
    import urllib.request

    url = f"{os.environ.get('NDIF_HOST', NDIF_HOST).rstrip('/')}/status"
    answer: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError:  # any HTTP answer: reachable
            answer.append(None)
        except Exception as exc:  # DNS, refused connection, proxy, timeout
            answer.append(f"{url} cannot be reached ({type(exc).__name__})")

    thread = threading.Thread(target=probe, daemon=True)  # name lookups ignore the timeout: the thread does not
    thread.start()
    thread.join(timeout + 0.5)
    return answer[0] if answer else f"{url} did not answer within {timeout:g} s"


def require_nnsight(what: str) -> None:
    """A one-line MechbookError naming the install command if nnsight is not installed (``what`` needs it)."""
    if importlib.util.find_spec("nnsight") is None:
        raise MechbookError(f"{what} needs nnsight, which is not installed; run: {INSTALL_HINT}")


def require_key(what: str, instead: str) -> None:
    """A one-line MechbookError if ``NDIF_API_KEY`` is not set, naming where to get one and ``instead``."""
    if not os.environ.get(NDIF_KEY_ENV):
        raise MechbookError(f"{what} needs an NDIF API key and {NDIF_KEY_ENV} is not set; "
                            f"export {NDIF_KEY_ENV}=<your key> (get one at https://login.ndif.us), "
                            f"or use {instead} to run here")


def served_hub_id(name: str, instead: str = "--backend nnsight") -> str:
    """The hub id NDIF serves ``name`` under, else a one-line MechbookError listing what it serves and ``instead``."""
    hub_id = ndif_hub_id(name)
    if hub_id is None:
        raise MechbookError(f"NDIF does not serve {name!r}; it serves {', '.join(NDIF_MODELS)} "
                            f"(see: python -m mechbook models), or use {instead} to run it here")
    return hub_id


def check_ndif(name: str, *, timeout: float = 2.0) -> str:
    """Everything a run on NDIF needs before it starts, else a one-line MechbookError naming the fix; the hub id.

    In order: nnsight installed, ``NDIF_API_KEY`` set, the model served by NDIF, NDIF reachable.
    """
    require_nnsight("--backend ndif")
    require_key("--backend ndif", "--backend nnsight")
    hub_id = served_hub_id(name)
    why = ndif_unreachable(timeout)
    if why is not None:
        raise MechbookError(f"NDIF cannot be reached ({why}); check the network, or use --backend nnsight to run "
                            "the chapters here")
    return hub_id


def remote_failure(exc: BaseException) -> MechbookError | None:
    """nnsight's error from a remote request as one line naming the fix, or None if ``exc`` is not one.

    NDIF refuses a client whose nnsight version differs from the server's (it reads the version nnsight
    sends with every request); the refusal names the version.
    """
    if type(exc).__name__ != "RemoteError":
        return None
    text = " ".join(str(exc).split())
    if "version" in text.lower():
        return MechbookError(f"NDIF refused this nnsight version (nnsight {_nnsight_version()}, pinned in "
                             f"pyproject.toml): {text}; {PIN_HINT}")
    return MechbookError(f"NDIF could not run the request: {text}; if it keeps failing, rerun with --resume "
                         "later, or use --backend nnsight to run here")


def _nnsight_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("nnsight")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_in_use: str | None = None  # the backend the last load_model / use_backend put a model on (a run's provenance)
_placed: dict[str, str] | None = None  # that model's device and dtype, when its weights are here


def backend_in_use() -> str | None:
    """The backend of the model this process last loaded or moved (None before any): recorded with its results."""
    return _in_use


def placement_in_use() -> dict[str, str] | None:
    """The device (``cpu``, ``cuda:0``) and dtype (``float32``) of that model's weights; None if they are not here."""
    return _placed


def _note(model):
    global _in_use, _placed
    _in_use = model.backend
    _placed = None
    if model.weights_here:
        _placed = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
    return model


def check_ndif_client(backend: str = "ndif") -> None:
    """nnsight installed and, for ``ndif``, ``NDIF_API_KEY`` set; else a one-line MechbookError naming the fix."""
    require_nnsight(f"backend={backend!r}")
    if backend == "ndif":
        require_key("backend='ndif'", "backend='nnsight'")


def use_backend(model, backend: str = "nnsight", *, remote: bool | str = False):
    """``model`` with its forward passes run on ``backend`` (same weights, same tokenizer).

    ``remote="local"`` (nnsight only) runs every trace through nnsight's remote
    serialization in-process. ``backend="ndif"`` needs ``NDIF_API_KEY`` and sends each
    trace to NDIF. A model loaded without weights (``load_model(name, backend="ndif")``)
    runs on NDIF only.
    """
    if backend not in BACKENDS:
        raise MechbookError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not model.weights_here and backend != "ndif":
        raise MechbookError(f"{model.name} was loaded for NDIF without its weights, so it cannot run on backend "
                            f"{backend!r}; load it with mechbook.load_model({model.name!r}, backend={backend!r})")
    if backend == "local":
        if remote:
            raise MechbookError("remote= applies to the nnsight backend; the local backend runs here")
        return _note(model if model.backend == "local" else dataclasses.replace(model, backend="local", runner=None))
    if backend == "ndif" and model.backend == "ndif":
        return _note(model)
    check_ndif_client(backend)
    if backend == "ndif":
        if model.source != "hub":
            raise MechbookError(f"NDIF runs models of the Hugging Face hub (e.g. gpt2, EleutherAI/gpt-j-6B); "
                                f"{model.name} is a {model.source} model: use backend='nnsight' to run it here")
        served_hub_id(model.name, "backend='nnsight'")
        remote = True
    elif remote not in (False, "local"):
        raise MechbookError(f"remote={remote!r}: the nnsight backend takes remote='local' (a dry run of the "
                            "remote path here); use backend='ndif' to run on NDIF")
    return _note(dataclasses.replace(model, backend=backend, runner=NnsightRunner(model, remote)))


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
                            "(backends.MAX_REQUEST_BYTES); run fewer prompts at once (a smaller batch_size or "
                            "-p n_prompts=...)")


def _head_path(hf: torch.nn.Module) -> str:
    """The output embedding's module path (``lm_head`` in every supported family)."""
    head = hf.get_output_embeddings()
    return next(name for name, module in hf.named_modules() if module is head)


# --- the entry points runs.py hands over ---------------------------------------------------------------


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
