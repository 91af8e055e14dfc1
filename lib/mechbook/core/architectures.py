"""Every architecture-specific branch of the library, and nowhere else.

The rest of the core talks to a model through transformer-lens hook names and the
bridge's generic sub-modules (``blocks[L].ln1``, ``attn.q/k/v/o``, ``ln1_post``), which
exist for every architecture transformer-lens supports. What differs between
architectures, and is handled here:

- **running the decoder layers from layer L** (:func:`run_layers`). For GPT-2, Llama
  and Gemma 3 a hand-written loop mirrors ``GPT2Model.forward``, ``LlamaModel.forward``
  and ``Gemma3TextModel.forward`` of transformers 5 and supports a shared-prefix cache.
  Every other causal LM runs the model's own forward with the blocks before L skipped
  (each replaced for the run by a pass-through) and the residual stream entering
  block L replaced by the given one: the same operations as a full forward from L
  on, whatever the architecture's masks, position encodings (rotary, ALiBi, learned)
  or parallel attention/MLP blocks.
- the layout of a linear map's weight (GPT-2's ``Conv1D`` stores ``x @ W``, ``nn.Linear``
  stores ``x @ W.T``), for reading a head's value and output maps;
- the post-attention norm of Gemma 2/3 (``ln1_post``), which makes a head's write to
  the residual stream non-additive;
- grouped-query attention: which key/value head a query head reads;
- where each hook name's activation lives in the plain Hugging Face module tree
  (:func:`hf_place`), for the nnsight backend, which runs the model without the bridge.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechbook.core.errors import MechbookError
from mechbook.core.names import act_name

# model_type -> hand-written decoder loop; each is checked against a full forward in the tests.
FAST_LOOPS = ("gpt2", "llama", "gemma3_text")


def has_fast_loop(model) -> bool:
    """Whether :func:`run_layers` uses a hand-written loop (and can share a prefix cache) for ``model``.

    Its runner says whether it may (``runner.fast_loops``: a local runner unless built with
    ``fast_loops=False``, the generic path the loops are compared with; never a runner that
    runs the model's own forward elsewhere), and the model's type whether there is one.
    """
    fast = model.runner is None or model.runner.fast_loops  # no runner: the local default
    return fast and model.hf_model.config.model_type in FAST_LOOPS


@contextlib.contextmanager
def replaced_forwards(replacements):
    """Each module's ``forward`` replaced by the given function for the ``with`` block, and restored after.

    ``replacements`` is a sequence of ``(module, forward)``. The function is set on the
    module object itself (``object.__setattr__``: a bridge wrapper would pass a plain
    ``setattr`` on to the module it wraps), so ``module(...)`` calls it with the
    module's hooks still firing; errors included, every module gets its own forward back.
    """
    replacements = list(replacements)
    saved = [module.__dict__.get("forward") for module, _ in replacements]
    for module, forward in replacements:
        object.__setattr__(module, "forward", forward)
    try:
        yield
    finally:
        for (module, _), before in zip(replacements, saved):
            if before is None:
                object.__delattr__(module, "forward")
            else:
                object.__setattr__(module, "forward", before)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class SharedPrefix:
    """Keys and values of the first ``length`` positions, shared by every row of later runs.

    Stands in for a Hugging Face cache in the hand-written loops: the bridge's
    attention hands it each layer's keys and values (after RoPE and norms) through
    ``update``. While recording it keeps the prefix part and returns them unchanged;
    afterwards it prepends the recorded prefix (tiled ``repeat`` times along the batch)
    to the suffix's own.

    It reaches the attention as the ``layer_past`` keyword: the decoder layers pass
    unknown keywords on to their attention untouched, and transformer-lens's attention
    reads ``layer_past`` when ``past_key_values`` is absent. (transformers 5.24's layers
    take their cache as ``cache``, not ``past_key_values``, and transformer-lens 4.3's
    attention does not read ``cache``: a cache handed over by either name is silently
    dropped.)
    ``used`` records the layers that called ``update``, so a run can check that.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.recording = True
        self.repeat = 1
        self.used: set[int] = set()

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.used.add(layer_idx)
        if self.recording:
            self.keys[layer_idx] = keys[..., : self.length, :]
            self.values[layer_idx] = values[..., : self.length, :]
            return keys, values
        tile = (self.repeat,) + (1,) * (keys.dim() - 1)
        return (torch.cat([self.keys[layer_idx].repeat(tile), keys], dim=-2),
                torch.cat([self.values[layer_idx].repeat(tile), values], dim=-2))

    def check_used(self, start: int, stop: int) -> None:
        """A prefix cache that some layer never saw gives wrong numbers silently: fail instead."""
        missing = sorted(set(range(start, stop)) - self.used)
        if missing:
            raise MechbookError(
                f"the shared-prefix cache did not reach the attention of layer(s) {missing}: this pair of "
                "transformers and transformer-lens versions does not hand mechbook's `layer_past` keyword to the "
                "attention (it does with transformers 5.24.0 and transformer-lens 4.3.0). Install those versions, "
                "or run without a shared prefix"
            )


# --- running the decoder layers from a layer -------------------------------------------------------


def run_layers(model, hidden: Float[Tensor, "batch pos d_model"], start: int, *,
               prefix: SharedPrefix | None = None, stop: int | None = None) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering the final norm, running blocks ``start..`` on ``hidden``.

    ``hidden`` is the residual stream entering block ``start`` at every position
    (right padding needs no padding mask). Hooks on blocks from ``start`` on fire as in
    a full forward; hooks on earlier blocks do not. With ``stop``, only blocks
    ``start .. stop-1`` run and the result is the residual stream entering block
    ``stop`` (hooks from ``stop`` on do not fire). A ``prefix`` (hand-written loops
    only) holds keys and values of the first positions: while recording, ``hidden``
    holds every position; afterwards only the positions after the prefix.
    """
    stop = model.n_layers if stop is None else stop
    if not 0 <= start <= stop <= model.n_layers:
        raise MechbookError(f"blocks {start}..{stop - 1} do not lie in 0..{model.n_layers - 1} in that order")
    if start >= stop:
        return hidden
    if has_fast_loop(model):
        return _FAST[model.hf_model.config.model_type](model, hidden, start, prefix, stop)
    if prefix is not None:
        raise MechbookError(f"a shared-prefix cache needs a hand-written decoder loop ({', '.join(FAST_LOOPS)}), "
                            f"not {model.hf_model.config.model_type!r}; run without one")
    return _generic(model, hidden, start, stop)


def _mask_args(model, hidden: Tensor, prefix: SharedPrefix | None) -> tuple[dict, Tensor, Tensor]:
    """Arguments of transformers' mask builders for a run of ``hidden``, its positions and the own positions."""
    from transformers.masking_utils import create_causal_mask

    offset = prefix.length if prefix is not None and not prefix.recording else 0
    width = offset + hidden.shape[1]
    positions = torch.arange(width, device=hidden.device)[None]
    shape_only = hidden.new_empty(hidden.shape[0], width, hidden.shape[2]) if offset else hidden
    # the mask builders' cache argument: ``cache`` from transformers 5.24 on, ``past_key_values`` in earlier releases
    cache_arg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    args = {"config": model.hf_model.config, "inputs_embeds": shape_only, "attention_mask": None, cache_arg: None,
            "position_ids": positions}
    return args, positions, positions[:, offset:]


def _cache_kwargs(prefix: SharedPrefix | None) -> dict:
    return {} if prefix is None else {"layer_past": prefix}


def _gpt2_loop(model, hidden, start, prefix, stop):
    """``GPT2Model.forward`` from block ``start``: causal mask, learned positions already in ``hidden``."""
    from transformers.masking_utils import create_causal_mask

    args, _, own = _mask_args(model, hidden, prefix)
    mask = create_causal_mask(**args)
    for block in model.hf_model.transformer.h[start:stop]:
        hidden = _first(block(hidden, None, mask, None, encoder_attention_mask=None, use_cache=False,
                              position_ids=own, **_cache_kwargs(prefix)))
    return hidden


def _rotary_loop(model, hidden, start, prefix, stop):
    """``LlamaModel.forward`` / ``Gemma3TextModel.forward`` from block ``start``.

    The causal mask (sliding-window mask for Gemma 3's local layers) and the rotary
    embeddings (Gemma 3: one per layer type) at the true positions.
    """
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    cfg = model.hf_model.config
    inner = model.hf_model.model
    args, _, own = _mask_args(model, hidden, prefix)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * model.n_layers)
    needed = set(types[start:stop])
    make_mask = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {t: make_mask[t](**args) for t in needed}
    if cfg.model_type == "gemma3_text":
        rope = {t: inner.rotary_emb(hidden, own, t) for t in needed}
    else:
        shared = inner.rotary_emb(hidden, position_ids=own)
        rope = {t: shared for t in needed}
    for i in range(start, stop):
        hidden = _first(inner.layers[i](hidden, attention_mask=masks[types[i]], position_embeddings=rope[types[i]],
                                        position_ids=own, use_cache=False, **_cache_kwargs(prefix)))
    return hidden


_FAST = {"gpt2": _gpt2_loop, "llama": _rotary_loop, "gemma3_text": _rotary_loop}


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is computed)."""


_TUPLE_BLOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()  # a memo


def _block_returns_tuple(model) -> bool:
    """Whether the model's decoder blocks return a tuple (BLOOM) or a tensor; probed once per Hugging Face model."""
    known = _TUPLE_BLOCKS.get(model.hf_model)
    if known is not None:
        return known
    seen = {}

    def grab(module, args, output):
        seen["tuple"] = isinstance(output, tuple)
        raise StopForward

    handle = model.bridge.blocks[0].register_forward_hook(grab)
    try:
        with torch.inference_mode():
            model.hf_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    _TUPLE_BLOCKS[model.hf_model] = seen["tuple"]
    return seen["tuple"]


def _generic(model, hidden: Tensor, start: int, stop: int | None = None) -> Tensor:
    """Blocks ``start..`` through the model's own forward: earlier blocks skipped, block ``start``'s input replaced.

    The forward runs on placeholder token ids of the right shape, so the model builds
    its own masks and position encodings; every block before ``start`` returns its
    input unchanged (no compute, no hooks), a pre-hook hands block ``start`` the given
    residual stream, and the run stops at the final norm's input.
    """
    blocks = model.bridge.blocks
    as_tuple = _block_returns_tuple(model)
    out: dict[str, Tensor] = {}

    def skip(hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.get("hidden_states")
        return (hidden_states, None) if as_tuple else hidden_states

    def enter(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def leave(module, args, output):
        out["final"] = output
        raise StopForward

    def leave_early(module, args, kwargs):
        out["final"] = args[0] if args else kwargs["hidden_states"]
        raise StopForward

    end = (model.bridge.hook_dict[act_name("final")].register_forward_hook(leave)
           if stop is None or stop >= len(blocks) else blocks[stop].register_forward_pre_hook(leave_early,
                                                                                             with_kwargs=True))
    handles = [blocks[start].register_forward_pre_hook(enter, with_kwargs=True), end]
    placeholder = torch.full(hidden.shape[:2], placeholder_token(model), dtype=torch.long, device=hidden.device)
    try:
        with replaced_forwards((block, skip) for block in blocks[:start]):
            model.hf_model(input_ids=placeholder, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out["final"]


# BLOOM's MLP adds the residual stream inside it, and its hook_mlp_out sits inside the MLP: no stand-in
_NO_MLP_SKIP = ("bloom",)


def skippable_mlp(model, layer: int) -> torch.nn.Module | None:
    """The Hugging Face module of ``layer``'s MLP when it may return zeros instead of computing, else None.

    That is when its output goes, unchanged or through Gemma's post-feedforward norm
    (which maps zeros to zeros), into ``hook_mlp_out``: a hook that writes over the
    whole of that activation then makes the result independent of the MLP
    (:func:`mechbook.core.runs.temporary_hooks`).
    """
    if model.hf_model.config.model_type in _NO_MLP_SKIP:
        return None
    bridge = model.bridge.blocks[layer].mlp
    if getattr(bridge, "_use_processed_weights", False) or bridge.original_component is None:
        return None  # the bridge computes from its own weights: nothing to stand in for
    return bridge.original_component


def head_projections(model, layer: int) -> dict[str, torch.nn.Linear] | None:
    """The Hugging Face q, k and v projections of ``layer``'s attention, when each head's rows can run alone.

    That is when the three are separate linear maps whose output rows go head by head
    (query head ``h``: rows ``h * d_head .. (h + 1) * d_head``; k and v per key/value
    head), as in GPT-J, Llama, Qwen2, Mistral and Gemma 2/3. A head whose output a hook
    writes over then needs no query (and a key/value head none of whose query heads is
    read, no key and value): :func:`mechbook.core.runs.temporary_hooks`. None for fused
    projections (GPT-2, GPT-NeoX, BLOOM), for a bridge computing from its own weights and
    for weights offloaded to disk.
    """
    attn = model.bridge.blocks[layer].attn
    # the model's own attention calls q, k and v as sub-modules of its own; a fused projection (GPT-2's c_attn,
    # GPT-NeoX's and BLOOM's query_key_value) computes all three in one map, which the bridge splits afterwards
    hf_attention = attn.original_component
    called = set() if hf_attention is None else {id(child) for child in hf_attention.children()}
    out = {}
    for kind, heads in (("q", model.n_heads), ("k", model.n_kv_heads), ("v", model.n_kv_heads)):
        bridge = getattr(attn, kind, None)
        if id(bridge) not in called:
            return None
        linear = getattr(bridge, "original_component", None)
        if (getattr(bridge, "_use_processed_weights", False) or not isinstance(linear, torch.nn.Linear)
                or linear.out_features != heads * model.d_head):
            return None
        if hasattr(linear, "_hf_hook") or linear.weight.device.type == "meta":
            return None  # offloaded by accelerate: its weights arrive only through its own forward
        out[kind] = linear
    return out


def skip_forwards(model, plan) -> list[tuple[torch.nn.Module, object]]:
    """The forwards that carry out a :class:`~mechbook.core.runs.Skips` plan, for :func:`replaced_forwards`.

    An MLP left out returns zeros (its hook then writes over them: :func:`skippable_mlp`);
    the q, k and v projections of a layer with heads left out compute only the rows of
    the heads still read (:func:`head_projections`). Where the architecture allows
    neither, nothing is replaced and the run computes everything.
    """

    def zeros(hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)

    out = [(m, zeros) for m in (skippable_mlp(model, layer) for layer in plan.mlps) if m is not None]
    d, group = model.d_head, model.n_heads // model.n_kv_heads
    for layer, gone in plan.heads.items():
        projections = head_projections(model, layer)
        if projections is None:
            continue
        keep = {"q": [h for h in range(model.n_heads) if h not in gone]}
        keep["k"] = keep["v"] = [g for g in range(model.n_kv_heads)
                                 if any(h not in gone for h in range(g * group, (g + 1) * group))]
        for kind, linear in projections.items():
            if len(keep[kind]) * d < linear.out_features:
                out.append((linear, _rows_only(linear, keep[kind], d)))
    return out


def _rows_only(linear: torch.nn.Linear, heads, d_head: int):
    """A forward for ``linear`` computing the output rows of ``heads`` only (zeros elsewhere).

    The kept rows are computed from the same weights and input, as their own matrix
    product; an overwritten head's zero query gives a finite attention pattern whose
    output the hook then writes over. The rows are taken as slices, runs of consecutive
    heads (:func:`~mechbook.core.names.spans`): no index tensor is built, so a run on a
    GPU copies nothing from the host.
    """
    from mechbook.core.names import spans

    parts = [slice(a * d_head, b * d_head) for a, b in spans(heads)]
    weight = torch.cat([linear.weight.detach()[p] for p in parts]) if parts else None
    bias = None if linear.bias is None or not parts else torch.cat([linear.bias.detach()[p] for p in parts])

    def forward(x, *args, **kwargs):
        out = x.new_zeros(*x.shape[:-1], linear.out_features)
        if parts:
            kept, start = torch.nn.functional.linear(x, weight, bias), 0
            for p in parts:
                out[..., p] = kept[..., start : start + p.stop - p.start]
                start += p.stop - p.start
        return out

    return forward


def placeholder_token(model) -> int:
    """A token id to fill a run whose residual stream is replaced: BOS or EOS, never pad (which warns)."""
    tok = model.tokenizer
    return next(t for t in (tok.bos_token_id, tok.eos_token_id, 0, 1) if t is not None and t != tok.pad_token_id)


# --- reading a head's maps -----------------------------------------------------------------------


def kv_head(model, head: int) -> int:
    """The key/value head a query head reads (grouped-query attention; the head itself otherwise)."""
    return head // (model.n_heads // model.n_kv_heads)


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module under a transformer-lens bridge wrapper (calling it fires no hooks)."""
    return getattr(module, "original_component", module)


def _weight_in_out(linear: torch.nn.Module) -> Tensor:
    """A linear map's weight as ``[in, out]`` (``x @ W``): GPT-2's Conv1D stores it so, nn.Linear transposed."""
    from transformers.pytorch_utils import Conv1D

    return linear.weight if isinstance(linear, Conv1D) else linear.weight.T


def attention_write(model, layer: int, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
    """What layer ``layer``'s attention adds to the residual stream for head outputs ``z``.

    The output projection of the concatenated heads, then the post-attention norm
    where the architecture has one (Gemma 2/3), so a head's share is not additive there.
    """
    model.need_weights("attention_write (an attention output map applied outside a forward pass: path patching)")
    block = model.bridge.blocks[layer]
    out = _plain(block.attn.o)(z.flatten(-2))
    post = getattr(block, "ln1_post", None)
    return _plain(post)(out) if post is not None else out


def project(model, layer: int, kind: str, resid: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """The ``kind`` ('q', 'k', 'v') input of layer ``layer``'s heads for a residual stream: [batch, pos, heads, d_head].

    The block's attention input norm and the q/k/v linear map, called directly (no hook
    fires); equals ``attn.hook_q`` (``hook_k``, ``hook_v``) for the same input. Keys and
    values have ``n_kv_heads`` heads.
    """
    model.need_weights("project (a head's q/k/v map applied outside a forward pass: path patching)")
    block = model.bridge.blocks[layer]
    out = _plain(getattr(block.attn, kind))(_plain(block.ln1)(resid))
    return out.reshape(*out.shape[:-1], -1, model.d_head)


@dataclass(frozen=True)
class OVCircuit:
    """One head's value and output maps, as the forward pass applies them.

    ``head_output(x) = (norm_in(x) @ W_V + b_V) @ W_O``, then ``norm_out`` where the
    architecture normalizes the attention output (Gemma 2/3's post-attention norm).
    The output bias, shared by all heads, is left out, as transformer-lens does.
    """

    layer: int
    head: int
    W_V: Float[Tensor, "d_model d_head"]
    b_V: Float[Tensor, "d_head"] | None
    W_O: Float[Tensor, "d_head d_model"]
    norm_in: torch.nn.Module
    norm_out: torch.nn.Module | None

    def __call__(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        with torch.inference_mode():
            v = self.norm_in(resid) @ self.W_V
            if self.b_V is not None:
                v = v + self.b_V
            out = v @ self.W_O
            # Gemma's post-attention norm acts on the sum of all heads' outputs, a non-linear map; applied to one
            # head's output alone it keeps the head's direction and rescales each coordinate by the norm's weight.
            return self.norm_out(out) if self.norm_out is not None else out


def ov_circuit(model, layer: int, head: int) -> OVCircuit:
    """A head's OV circuit, its weights read from the model's value and output maps (any architecture).

    Grouped-query attention: query head ``h`` reads value head :func:`kv_head`.
    """
    model.need_weights("ov_circuit (a head's value and output weights)")
    block = model.bridge.blocks[layer]
    d = model.d_head
    kv = kv_head(model, head)
    v_map, o_map = _plain(block.attn.v), _plain(block.attn.o)
    W_V = _weight_in_out(v_map)[:, kv * d : (kv + 1) * d]
    b_V = None if getattr(v_map, "bias", None) is None else v_map.bias[kv * d : (kv + 1) * d]
    W_O = _weight_in_out(o_map)[head * d : (head + 1) * d, :]
    post = getattr(block, "ln1_post", None)
    return OVCircuit(layer, head, W_V.detach(), None if b_V is None else b_V.detach(), W_O.detach(),
                     _plain(block.ln1), None if post is None else _plain(post))


# --- hook names in the plain Hugging Face module tree (the nnsight backend) --------------------------

# model_type -> the decoder-layer list, the final norm, and per activation kind the module (relative to a
# decoder layer) and whether the activation is its input or output; a third entry splits a fused [q | k | v]
# output. resid_pre / resid_post are every layer's input / output, "final" the final norm's input.
_DECODER = dict(layers="model.layers", norm="model.norm", resid_mid=("post_attention_layernorm", "input"),
                attn_out=("self_attn", "output"), mlp_out=("mlp", "output"), z=("self_attn.o_proj", "input"),
                q=("self_attn.q_proj", "output"), k=("self_attn.k_proj", "output"), v=("self_attn.v_proj", "output"))
# Gemma 2/3 normalise each sub-block's write before adding it (the bridge's hook_attn_out / hook_mlp_out follow)
_GEMMA = {**_DECODER, "resid_mid": ("pre_feedforward_layernorm", "input"),
          "attn_out": ("post_attention_layernorm", "output"), "mlp_out": ("post_feedforward_layernorm", "output")}
HF_PLACES = {
    "gpt2": dict(layers="transformer.h", norm="transformer.ln_f", resid_mid=("ln_2", "input"),
                 attn_out=("attn", "output"), mlp_out=("mlp", "output"), z=("attn.c_proj", "input"),
                 q=("attn.c_attn", "output", 0), k=("attn.c_attn", "output", 1), v=("attn.c_attn", "output", 2)),
    # parallel attention and MLP: no residual stream between them
    "gptj": dict(layers="transformer.h", norm="transformer.ln_f", attn_out=("attn", "output"),
                 mlp_out=("mlp", "output"), z=("attn.out_proj", "input"), q=("attn.q_proj", "output"),
                 k=("attn.k_proj", "output"), v=("attn.v_proj", "output")),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
}
# the order in which a forward pass reaches the places of one layer
FORWARD_ORDER = ("resid_pre", "q", "k", "v", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclass(frozen=True)
class HFPlace:
    """Where an activation is in a plain Hugging Face model: a module's input or output, maybe a slice of it.

    ``heads``: the last axis is split into that many heads (z, q, k, v, as transformer-lens shapes them);
    ``part``: which third of a fused [q | k | v] output; ``order``: when the forward pass gets there.
    """

    path: str
    io: str
    heads: int | None = None
    part: int | None = None
    order: tuple[int, int] = (0, 0)


def hf_layers_path(model) -> str:
    """The dotted path of the decoder-layer list (``model.layers``, ``transformer.h``)."""
    return _hf_places(model)["layers"]


def hf_place(model, kind: str, layer: int | None) -> HFPlace:
    """Where hook ``act_name(kind, layer)`` of the bridge is in ``model``'s plain Hugging Face modules."""
    places = _hf_places(model)
    if kind == "final":
        return HFPlace(places["norm"], "input", order=(model.n_layers, 0))
    block = f"{places['layers']}.{layer}"
    if kind in ("resid_pre", "resid_post"):
        return HFPlace(block, "input" if kind == "resid_pre" else "output", order=(layer, FORWARD_ORDER.index(kind)))
    if kind not in places:
        have = ["final", "resid_pre", "resid_post", *(k for k in FORWARD_ORDER if k in places)]
        arch = model.hf_model.config.model_type
        raise MechbookError(f"the nnsight backend cannot reach {kind!r} activations of {arch} models; it reaches "
                            f"{', '.join(sorted(set(have)))}. Use backend='local' for it")
    path, io, *part = places[kind]
    heads = {"z": model.n_heads, "q": model.n_heads, "k": model.n_kv_heads, "v": model.n_kv_heads}.get(kind)
    return HFPlace(f"{block}.{path}", io, heads, part[0] if part else None, (layer, FORWARD_ORDER.index(kind)))


def _hf_places(model) -> dict:
    arch = model.hf_model.config.model_type
    if arch not in HF_PLACES:
        raise MechbookError(f"the nnsight backend does not know the module layout of {arch!r} models (it knows "
                            f"{', '.join(HF_PLACES)}); use backend='local', or add the layout to HF_PLACES")
    return HF_PLACES[arch]
