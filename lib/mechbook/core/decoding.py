"""Reading vectors as tokens: the logit lens and top tokens of any residual-space vector.

The logit lens (nostalgebraist 2020) decodes the residual stream after a layer with
the model's own final norm and unembedding, as if the network stopped there. Both
pieces come from the model itself, so the lens is right for every architecture:
LayerNorm for GPT-2, RMSNorm with (1 + w) for Gemma, and Gemma 2's final-logit
softcapping where the config sets it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.names import layer_names


def check_resid(model: LoadedModel, resid, what: str) -> Tensor:
    """``resid`` if it is a tensor of residual vectors of ``model`` (width ``d_model``, the weights' dtype), else a
    one-line error naming ``what``. Reads the shape and dtype only, never the values: it costs nothing per pass."""
    if not isinstance(resid, Tensor):
        raise MechbookError(f"{what} must be a torch tensor of residual vectors [..., {model.d_model}], got "
                            f"{type(resid).__name__}; e.g. torch.as_tensor(x, dtype={model.dtype})")
    if resid.dim() == 0 or resid.shape[-1] != model.d_model:
        raise MechbookError(f"{what} must be residual vectors [..., {model.d_model}] of {model.name}, got shape "
                            f"{tuple(resid.shape)}; use vectors computed on this model")
    if not resid.dtype.is_floating_point or (model.weights_here and resid.dtype != model.dtype):  # NDIF: its own
        raise MechbookError(f"{what} is {resid.dtype} but {model.name}'s weights are {model.dtype}; "
                            f"pass it as .to({model.dtype})")
    return resid


def final_norm(model: LoadedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The model's final normalization (``ln_final``), applied to any residual vector."""
    model.need_weights("final_norm (the final norm alone, outside a forward pass)")
    with torch.inference_mode():
        return model.bridge.ln_final(resid)


def _unembedding(model: LoadedModel) -> torch.nn.Module:
    """The plain output linear map (under the bridge's wrapper, if any)."""
    head = model.hf_model.get_output_embeddings()
    return getattr(head, "original_component", head)


def softcap(model: LoadedModel, logits: Tensor) -> Tensor:
    """The final-logit softcap ``cap * tanh(logits / cap)`` where the config sets one (Gemma 2/3), else the logits."""
    cap = model.final_logit_softcap
    return torch.tanh(logits / cap) * cap if cap else logits


def unembed(model: LoadedModel, resid: Float[Tensor, "... d_model"], *, normalize: bool = True,
            tokens: Int[Tensor, "k"] | None = None) -> Float[Tensor, "... d_vocab"]:
    """Logits of residual vectors: final norm (unless ``normalize=False``), unembedding, softcap.

    With ``tokens`` only those vocabulary columns are computed; the others come back NaN,
    so that anything reading them fails loudly (see :func:`check_finite`). The model's
    runner computes them (:func:`unembed_here`, or, for a model whose weights are on
    NDIF, a forward pass on its server).
    """
    check_resid(model, resid, "the residual vectors to unembed")
    if tokens is not None:
        tokens = check_unembed_tokens(model, tokens)
    if model.runner is not None:  # a runner of another backend: it decodes where the weights are
        return model.runner.unembed(model, resid, normalize=normalize, tokens=tokens)
    return unembed_here(model, resid, normalize=normalize, tokens=tokens)


def unembed_here(model: LoadedModel, resid: Float[Tensor, "... d_model"], *, normalize: bool = True,
                 tokens: Int[Tensor, "k"] | None = None) -> Float[Tensor, "... d_vocab"]:
    """:func:`unembed` with the weights held here (arguments checked by the caller)."""
    with torch.inference_mode():
        x = final_norm(model, resid) if normalize else resid
        if tokens is None:
            return softcap(model, model.hf_model.get_output_embeddings()(x))
        linear = _unembedding(model)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=x.device)
        bias = None if getattr(linear, "bias", None) is None else linear.bias[tokens]
        part = softcap(model, torch.nn.functional.linear(x, linear.weight[tokens], bias))
        logits = torch.full((*x.shape[:-1], model.d_vocab), float("nan"), dtype=part.dtype, device=part.device)
        logits[..., tokens] = part
        return logits


def check_unembed_tokens(model: LoadedModel, tokens) -> Int[Tensor, "k"]:
    """``tokens`` (the vocabulary ids a restricted unembedding computes) as integer ids, or a one-line error.

    Ids held on the host are checked against the vocabulary (negative ones would fill
    another token's column); a tensor already on an accelerator is checked for its dtype
    only, so that a pass never waits on the device.
    """
    if isinstance(tokens, Tensor) and tokens.device.type != "cpu":
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dtype.is_complex:
            raise MechbookError(f"tokens= must be integer token ids, got {tokens.dtype}; pass e.g. metric.answer_ids")
        ids = tokens
    else:
        ids = as_token_ids(tokens, "tokens= (the ids to unembed)", model.d_vocab)
    if ids.numel() == 0:
        raise MechbookError("tokens= is empty, so no logit would be computed; pass the ids the metric reads "
                            "(metric.answer_ids), or None for every logit")
    if ids.dim() != 1:
        raise MechbookError(f"tokens= is a flat list of vocabulary ids, got shape {tuple(ids.shape)}; pass e.g. "
                            "metric.answer_ids")
    return ids


def token_logits(
    model: LoadedModel, resid: Float[Tensor, "... d_model"], token_ids: Int[Tensor, "..."]
) -> Float[Tensor, "..."]:
    """The logit of one token per residual vector (final norm, its unembedding row and bias, softcap).

    Equal to ``unembed(model, resid).gather(-1, ids)`` without the whole vocabulary.
    """
    check_resid(model, resid, "the residual vectors of token_logits")
    ids = as_token_ids(token_ids, "token_logits's ids", model.d_vocab).to(resid.device)
    if model.runner is not None:
        return model.runner.token_logits(model, resid, ids)
    return token_logits_here(model, resid, ids)


def token_logits_here(model: LoadedModel, resid: Float[Tensor, "... d_model"],
                      ids: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
    """:func:`token_logits` with the weights held here (arguments checked by the caller)."""
    linear = _unembedding(model)
    with torch.inference_mode():
        x = final_norm(model, resid)
        logits = (x * linear.weight[ids]).sum(-1)
        if getattr(linear, "bias", None) is not None:
            logits = logits + linear.bias[ids]
        return softcap(model, logits)


def check_finite(values: Tensor, what: str) -> Tensor:
    """``values``, or a one-line error naming ``what`` holds NaN or infinite entries."""
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise MechbookError(
            f"{what} holds {bad} non-finite value(s) (NaN or inf); check the vectors or edits that produced it "
            "(e.g. an o vector with NaN, or logits of ids a restricted unembedding did not compute)"
        )
    return values


def as_token_ids(values, what: str, vocab: int | None = None) -> Int[Tensor, "..."]:
    """``values`` as a long tensor of vocabulary ids, or a one-line error naming ``what``.

    Refused: floats and bools (a cast would truncate them silently), negative ids (they
    would index from the end of the vocabulary) and, given ``vocab``, ids at or past it.
    """
    try:
        ids = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MechbookError(f"{what} must be token ids (integers), one per row; could not read {values!r} "
                            f"({' '.join(str(exc).split())})") from None
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise MechbookError(f"{what} must be integer token ids, got {ids.dtype}; pass ids from the tokenizer")
    ids = ids.long()
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0:
            raise MechbookError(f"{what} holds the negative token id {low}; ids count from 0 (a negative one would "
                                "read a token from the end of the vocabulary)")
        if vocab is not None and high >= vocab:
            raise MechbookError(f"{what} holds the token id {high}, past the vocabulary of {vocab} tokens (0..{vocab - 1}); "
                                "use ids of this model's tokenizer")
    return ids


def check_logits(logits: Float[Tensor, "... d_vocab"], what: str) -> Float[Tensor, "... d_vocab"]:
    """``logits``, unless they are degenerate: a one-line error when an entry is not finite or a row gives every token
    the same logit.

    No rank, top token or probability can be read from such a row (every token ties), e.g.
    when an added vector is so large that float32 overflows in the final norm and every
    logit comes out 0. One pass of min and max per row.
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.dtype.is_floating_point:
        raise MechbookError(f"{what} must be a float tensor of logits [..., d_vocab], got "
                            f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}")
    check_finite(logits, what)
    if logits.shape[-1] > 1 and logits.numel():
        low, high = torch.aminmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        same = low == high
        if same.any():
            row = int(same.nonzero()[0, 0])
            raise MechbookError(
                f"{what}: {int(same.sum())} of {len(same)} rows (the first is row {row}) give all {logits.shape[-1]} "
                f"tokens the same logit ({float(low[row]):.4g}), so every token ties and no rank or probability means "
                "anything; the run is degenerate (e.g. an added vector so large that the final norm overflowed): "
                "use a smaller scale or check the edits"
            )
    return logits


def token_ranks(logits: Float[Tensor, "... d_vocab"], token_ids: Int[Tensor, "..."]) -> Int[Tensor, "..."]:
    """1-based rank of each target token in its row of logits: how many tokens score at least as high.

    Ties count against the target (the target itself included, so a unique top token has
    rank 1 and a token tied with one other for the top has rank 2): a tie never makes a
    token look better than it is. Degenerate rows (non-finite, or every logit equal) are
    refused (:func:`check_logits`).
    """
    check_logits(logits, "the logits to rank")
    token_ids = as_token_ids(token_ids, "the target ids to rank", logits.shape[-1]).to(logits.device)
    if token_ids.shape != logits.shape[:-1]:
        raise MechbookError(f"token_ranks needs one target id per row: {tuple(token_ids.shape)} ids for logits "
                            f"of shape {tuple(logits.shape)}")
    target = logits.gather(-1, token_ids.unsqueeze(-1))
    return (logits >= target).sum(-1)


def to_str(model: LoadedModel, token_id: int) -> str:
    """A token as text, with its leading space visible, for tables."""
    from mechbook.core.names import as_index

    token_id = as_index(token_id, "token id")
    if not 0 <= token_id < model.d_vocab:
        raise MechbookError(f"token id {token_id} is outside {model.name}'s vocabulary (0..{model.d_vocab - 1}); "
                            "use ids of this model's tokenizer")
    return model.tokenizer.decode([token_id])


def resid_post_names(model: LoadedModel) -> list[str]:
    """``blocks.L.hook_resid_post`` for every layer: what the logit lens reads."""
    return layer_names("resid_post", model.n_layers)


def logit_lens(
    model: LoadedModel,
    resid: Float[Tensor, "batch layer d_model"],
    targets: Mapping[str, Int[Tensor, "batch"]],
    *,
    chunk: int = 8,
) -> pd.DataFrame:
    """Rank, reciprocal rank and probability of target tokens after every layer.

    ``resid`` holds one residual vector per prompt and layer (usually the last
    position's ``hook_resid_post``); ``targets`` names token ids per prompt, e.g.
    ``{"argument": ..., "answer": ...}``. Returns one row per prompt x layer x target.
    """
    from mechbook.core.checks import chunk_starts

    rows = []
    check_resid(model, resid, "the logit lens's resid")
    if resid.dim() != 3 or resid.shape[-1] != model.d_model:
        raise MechbookError(f"the logit lens reads resid as [prompt, layer, {model.d_model}], got {tuple(resid.shape)}")
    n_prompts, n_layers = resid.shape[:2]
    if n_prompts == 0 or n_layers == 0:
        raise MechbookError(f"the logit lens got resid of shape {tuple(resid.shape)}: no prompt or no layer to read; "
                            "pass at least one of each")
    if not isinstance(targets, Mapping) or not targets:
        raise MechbookError(f"the logit lens needs targets as a dict of names to token ids, e.g. "
                            f"{{'answer': answer_ids}}, got {targets!r}"[:300])
    check_finite(resid, "the residual vectors given to the logit lens")
    targets = {name: as_token_ids(ids, f"target {name!r}", model.d_vocab) for name, ids in targets.items()}
    for name, ids in targets.items():
        if ids.dim() != 1 or len(ids) != n_prompts:
            raise MechbookError(f"target {name!r} has {tuple(ids.shape)} ids for {n_prompts} prompts; pass one per prompt")
    for start in chunk_starts(n_prompts, chunk, "chunk"):
        logits = check_logits(unembed(model, resid[start : start + chunk]), "the logit lens's logits")  # [b, layer, vocab]
        logprobs = logits.log_softmax(-1)
        top = logits.argmax(-1)
        top = top.tolist()  # each chunk's numbers come to the host at once, not one by one
        for name, ids in targets.items():
            ids_b = ids[start : start + chunk].to(logits.device).unsqueeze(1).expand(-1, n_layers)
            ranks = token_ranks(logits, ids_b).tolist()
            probs = logprobs.gather(-1, ids_b.unsqueeze(-1)).squeeze(-1).exp().tolist()
            ids_b = ids_b.tolist()
            for i in range(len(ranks)):
                for layer in range(n_layers):
                    rows.append(
                        {
                            "prompt": start + i,
                            "layer": layer,
                            "target": name,
                            "token": to_str(model, ids_b[i][layer]),
                            "rank": int(ranks[i][layer]),
                            "reciprocal_rank": 1.0 / float(ranks[i][layer]),
                            "prob": float(probs[i][layer]),
                            "top_token": to_str(model, top[i][layer]),
                        }
                    )
    return pd.DataFrame(rows)


def top_tokens(
    model: LoadedModel, vector: Float[Tensor, "d_model"], k: int = 10, *, normalize: bool = True
) -> pd.DataFrame:
    """The k tokens a residual-space vector promotes most (an MLP output, a difference of residuals).

    ``normalize`` applies the final norm first, as the logit lens does; turn it off
    to read the raw direction through the unembedding alone.
    """
    from mechbook.core.names import as_index

    k = as_index(k, "k")
    if not 1 <= k <= model.d_vocab:
        raise MechbookError(f"k={k} top tokens asked for, but {model.name} has {model.d_vocab}; use 1..{model.d_vocab}")
    if not isinstance(vector, Tensor):
        raise MechbookError(f"the vector to decode must be a torch tensor [{model.d_model}], got "
                            f"{type(vector).__name__}; e.g. torch.as_tensor(v, dtype={model.dtype})")
    vector = check_finite(vector.reshape(-1), "the vector to decode")
    if vector.shape[0] != model.d_model:
        raise MechbookError(f"the vector has width {vector.shape[0]}, but {model.name} has d_model={model.d_model}")
    logits = check_logits(unembed(model, vector, normalize=normalize), "the logits of the vector to decode")
    values, ids = logits.topk(k)
    return pd.DataFrame(
        {"rank": range(1, k + 1), "token": [to_str(model, i) for i in ids.tolist()], "logit": values.tolist()}
    )


def top_tokens_per_layer(model: LoadedModel, resid: Float[Tensor, "layer d_model"], k: int = 5) -> pd.DataFrame:
    """For one prompt: the top-k tokens of the logit lens after every layer, one row per layer and rank."""
    from mechbook.core.names import as_index

    k = as_index(k, "k")
    if not 1 <= k <= model.d_vocab:
        raise MechbookError(f"k={k} top tokens per layer asked for, but {model.name} has {model.d_vocab}; "
                            f"use 1..{model.d_vocab}")
    check_resid(model, resid, "top_tokens_per_layer's resid")
    if resid.dim() != 2 or resid.shape[-1] != model.d_model or resid.shape[0] == 0:
        raise MechbookError(f"top_tokens_per_layer reads one prompt's resid as [layer, {model.d_model}] (at least one "
                            f"layer), got {tuple(resid.shape)}")
    logits = check_logits(unembed(model, check_finite(resid, "the residual vectors to decode")),
                          "the logit lens's logits")
    probs = logits.softmax(-1)
    values, ids = probs.topk(k, dim=-1)
    values, ids = values.tolist(), ids.tolist()  # to the host at once, not one number at a time
    rows = []
    for layer in range(resid.shape[0]):
        for r in range(k):
            rows.append(
                {"layer": layer, "rank": r + 1, "token": to_str(model, ids[layer][r]), "prob": float(values[layer][r])}
            )
    return pd.DataFrame(rows)


def single_token_id(model: LoadedModel, text: str) -> int:
    """The id of ``text`` if it is exactly one token (no BOS), else a clear error."""
    if not isinstance(text, str):
        raise MechbookError(f"single_token_id takes the token's text as a str, e.g. ' Paris', got {text!r}")
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise MechbookError(
            f"{text!r} is {len(ids)} tokens for {model.name} ({pieces}); use a single-token answer "
            "or score it on its first token"
        )
    return ids[0]


def stack_layers(cache: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Stack per-layer cached vectors ``[batch, d]`` into ``[batch, layer, d]``."""
    missing = [n for n in names if n not in cache]
    if missing or not names:
        raise MechbookError(f"the cache has no {missing[0]!r}; run with names= including it (e.g. "
                            "resid_post_names(model))" if missing else "no names to stack; pass the per-layer hook names")
    return torch.stack([cache[n] for n in names], dim=1)
