"""Independent references for the core: plain torch hooks on a fresh Hugging Face model, and the slow loops.

Nothing here imports the engine under test (``mechbook.core``): each quantity is
computed the obvious way, one full forward per variant, with ``register_forward_hook``
/ ``register_forward_pre_hook`` on the transformers modules of a model loaded with
``AutoModelForCausalLM`` (no transformer-lens bridge). Module paths differ per
architecture; :data:`PATHS` lists them, so this file is the second, independent place
that knows them.

Places:
- a head's output ``z``: the input of the attention's output projection, split per head;
- an MLP's output: what the block adds to the residual stream (Gemma 2/3: after the
  post-feed-forward norm);
- ``resid_pre`` of layer L: the hidden states entering decoder layer L; ``resid_post``:
  what layer L returns;
- q, k, v: the outputs of the projections (fused ones split per architecture).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

# model_type -> dotted paths relative to the decoder layer (and the layer list, final norm)
_DECODER = dict(layers="model.layers", norm="model.norm", o="self_attn.o_proj", mlp="mlp", qkv=("split", "self_attn"))
PATHS = {
    "gpt2": dict(layers="transformer.h", norm="transformer.ln_f", o="attn.c_proj", mlp="mlp",
                 qkv=("gpt2", "attn.c_attn")),
    "gptj": dict(layers="transformer.h", norm="transformer.ln_f", o="attn.out_proj", mlp="mlp", qkv=("split", "attn")),
    # BloomMLP.forward(hidden, residual) returns residual + its write: the write is the difference
    "bloom": dict(layers="transformer.h", norm="transformer.ln_f", o="self_attention.dense", mlp="mlp",
                  qkv=("bloom", "self_attention.query_key_value"), mlp_adds_residual=True),
    "gpt_neox": dict(layers="gpt_neox.layers", norm="gpt_neox.final_layer_norm", o="attention.dense", mlp="mlp",
                     qkv=("neox", "attention.query_key_value")),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "gemma2": {**_DECODER, "mlp": "post_feedforward_layernorm"},
    "gemma3_text": {**_DECODER, "mlp": "post_feedforward_layernorm"},
}


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class Ref:
    """A fresh Hugging Face model with hook helpers: the reference side of the architecture matrix."""

    def __init__(self, directory) -> None:
        self.hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        cfg = self.hf.config
        self.arch = cfg.model_type
        self.paths = PATHS[self.arch]
        self.layers = _get(self.hf, self.paths["layers"])
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model = cfg.hidden_size
        self.d_head = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads

    # --- places -------------------------------------------------------------------------------
    def o_proj(self, layer: int):
        return _get(self.layers[layer], self.paths["o"])

    def mlp(self, layer: int):
        return _get(self.layers[layer], self.paths["mlp"])

    # --- runs ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, handles_makers: Iterable[Callable[[], object]]):
        handles = [make() for make in handles_makers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def lens(self, resid: Tensor) -> Tensor:
        """Logits of residual vectors: the final norm, the unembedding, the final softcap where there is one."""
        with torch.no_grad():
            logits = self.hf.lm_head(_get(self.hf, self.paths["norm"])(resid))
            cap = getattr(self.hf.config, "final_logit_softcapping", None)
            return torch.tanh(logits / cap) * cap if cap else logits

    def logits(self, ids: Tensor, lengths: Tensor, makers: Sequence[Callable[[], object]] = ()) -> Tensor:
        """Last-position logits of right-padded prompts (no attention mask: causal attention needs none)."""
        with torch.no_grad(), self.hooks(makers):
            out = self.hf(input_ids=ids, use_cache=False).logits
        return out[torch.arange(len(ids)), lengths - 1]

    # hook makers: each returns a function that registers the hook and gives back its handle
    def edit_z(self, layer: int, fn: Callable[[Tensor], Tensor]):
        """``fn`` maps z ``[b, pos, head, d_head]`` to a new z, at the input of the output projection."""
        def pre(module, args):
            z = args[0].reshape(*args[0].shape[:-1], self.n_heads, self.d_head)
            return (fn(z.clone()).reshape(args[0].shape), *args[1:])
        return lambda: self.o_proj(layer).register_forward_pre_hook(pre)

    def edit_mlp(self, layer: int, fn: Callable[[Tensor], Tensor]):
        """``fn`` maps what the MLP adds to the residual stream ``[b, pos, d_model]`` to a new write."""
        def post(module, args, out):
            if self.paths.get("mlp_adds_residual"):
                return args[1] + fn((out - args[1]).clone())
            return fn(out.clone())
        return lambda: self.mlp(layer).register_forward_hook(post)

    def edit_resid_pre(self, layer: int, fn: Callable[[Tensor], Tensor]):
        def pre(module, args, kwargs):
            if args:
                return (fn(args[0].clone()), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"].clone())}
        return lambda: self.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)

    def edit_resid_post(self, layer: int, fn: Callable[[Tensor], Tensor]):
        def post(module, args, out):
            if isinstance(out, tuple):
                return (fn(out[0].clone()), *out[1:])
            return fn(out.clone())
        return lambda: self.layers[layer].register_forward_hook(post)

    def cache(self, ids: Tensor, makers: Sequence = ()) -> dict:
        """z, mlp_out, resid_pre and resid_post of every layer on a run (with extra hooks ``makers``)."""
        store: dict = {}

        def keep(key):
            def fn(x):
                store[key] = x.clone()
                return x
            return fn

        grab = []
        for l in range(self.n_layers):
            grab += [self.edit_z(l, keep(("z", l))), self.edit_mlp(l, keep(("mlp", l))),
                     self.edit_resid_pre(l, keep(("resid_pre", l))), self.edit_resid_post(l, keep(("resid_post", l)))]
        # edits first, then the cache sees their result
        with torch.no_grad(), self.hooks([*makers, *grab]):
            self.hf(input_ids=ids, use_cache=False)
        return store

    # --- q, k, v --------------------------------------------------------------------------------
    def edit_qkv(self, layer: int, kind: str, fn: Callable[[Tensor], Tensor]):
        """``fn`` maps the ``kind`` projection ``[b, pos, heads, d_head]`` (kv heads for k, v) to a new one."""
        style, path = self.paths["qkv"]
        block = self.layers[layer]
        if style == "split":
            module = _get(block, f"{path}.{kind}_proj")

            def post(m, args, out):
                x = out.reshape(*out.shape[:-1], -1, self.d_head)
                return fn(x.clone()).reshape(out.shape)
            return lambda: module.register_forward_hook(post)
        module = _get(block, path)
        i = "qkv".index(kind)
        h, d = self.n_heads, self.d_head

        def post(m, args, out):
            b, p = out.shape[:2]
            if style == "gpt2":  # [q | k | v], each [heads, d_head]
                parts = list(out.clone().split(h * d, dim=-1))
                parts[i] = fn(parts[i].reshape(b, p, h, d)).reshape(b, p, h * d)
                return torch.cat(parts, dim=-1)
            if style == "neox":  # per head [q, k, v]
                x = out.clone().reshape(b, p, h, 3 * d)
                x[..., i * d : (i + 1) * d] = fn(x[..., i * d : (i + 1) * d].clone())
                return x.reshape(b, p, -1)
            x = out.clone().reshape(b, p, h, 3, d)  # bloom: [heads, 3, d_head]
            x[:, :, :, i] = fn(x[:, :, :, i].clone())
            return x.reshape(b, p, -1)
        return lambda: module.register_forward_hook(post)

    def qkv_inputs(self, ids: Tensor, layer: int, kind: str, makers: Sequence = ()) -> Tensor:
        """The ``kind`` projection at ``layer`` on a run (with ``makers``), per head."""
        box = {}

        def keep(x):
            box["x"] = x.clone()
            return x
        with torch.no_grad(), self.hooks([*makers, self.edit_qkv(layer, kind, keep)]):
            self.hf(input_ids=ids, use_cache=False)
        return box["x"]


def means_over(ref: Ref, ids: Tensor, lengths: Tensor) -> dict:
    """Per-position means of z and MLP outputs over the prompts, padding excluded."""
    cache = ref.cache(ids)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).float()
    out = {}
    for key, act in cache.items():
        if key[0] in ("z", "mlp"):
            m = mask.reshape(mask.shape + (1,) * (act.dim() - 2))
            out[key] = (act * m).sum(0) / m.sum(0).clamp(min=1)
    return out


def ablation_makers(ref: Ref, means: dict, heads: Iterable[tuple[int, int]], mlps: Iterable[int]) -> list:
    """Hooks that mean-ablate the given heads and MLPs at every position."""
    heads, mlps = list(heads), list(mlps)
    makers = []
    for l in range(ref.n_layers):
        hs = [h for (ll, h) in heads if ll == l]
        if hs:
            def fn(z, l=l, hs=hs):
                z[:, :, hs] = means[("z", l)][: z.shape[1], hs]
                return z
            makers.append(ref.edit_z(l, fn))
        if l in mlps:
            makers.append(ref.edit_mlp(l, lambda x, l=l: means[("mlp", l)][: x.shape[1]].expand_as(x).clone()))
    return makers


def complement(ref: Ref, heads: Iterable[tuple[int, int]], mlps: Iterable[int]) -> tuple[list, list]:
    keep_h, keep_m = set(map(tuple, heads)), set(mlps)
    return ([(l, h) for l in range(ref.n_layers) for h in range(ref.n_heads) if (l, h) not in keep_h],
            [l for l in range(ref.n_layers) if l not in keep_m])


def literal_node_pruning(score_without: Callable[[list, list], float], n_layers: int, n_heads: int,
                         threshold: float, max_rounds: int | None = None) -> tuple[list, list, list]:
    """The paper's node pruning written out: one forward per candidate, in the paper's visiting order.

    ``score_without(heads, mlps)`` scores a circuit (% of the full model). Returns the
    kept heads, kept MLPs and the decision log [(component, score, removed)].
    """
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    mlps = list(range(n_layers))
    log = []
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        changed = {}
        for direction in ("backward", "forward"):
            changed[direction] = False
            layers = range(n_layers - 1, -1, -1) if direction == "backward" else range(n_layers)
            for l in layers:
                order = [("mlp", l)] + [("head", (l, h)) for h in range(n_heads)]
                if direction == "forward":
                    order = order[1:] + order[:1]
                for kind, c in order:
                    if (kind == "head" and c not in heads) or (kind == "mlp" and c not in mlps):
                        continue
                    trial_h = [x for x in heads if x != c] if kind == "head" else heads
                    trial_m = [x for x in mlps if x != c] if kind == "mlp" else mlps
                    s = score_without(trial_h, trial_m)
                    remove = (100.0 - s) < 100.0 * threshold
                    log.append((kind, c, s, remove))
                    if remove:
                        heads, mlps = trial_h, trial_m
                        changed[direction] = True
            if not changed[direction]:
                break
        if not all(changed.values()):
            break
    return heads, mlps, log
