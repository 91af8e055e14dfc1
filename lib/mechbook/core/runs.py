"""Running a hooked model: tokenized batches, restricted caches, temporary hooks.

Everything here keeps transformer-lens hook names (``blocks.3.attn.hook_z``,
``blocks.12.hook_resid_post``) as the one vocabulary for places in the network.

Prompts of different lengths are batched with *right* padding: under causal
attention no real token attends to a pad token that follows it, so every real
position computes exactly what it would alone, and each prompt's answer is read at
its own last position. Logits are computed only there (the unembedding of a
262k-token vocabulary is most of a small model's cost).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel

HookFn = Callable[[Tensor, object], Tensor | None]


@dataclass
class TokenBatch:
    """Right-padded token ids of several prompts and each prompt's true length."""

    input_ids: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, "batch"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def last_pos(self) -> Int[Tensor, "batch"]:
        return self.lengths - 1

    @property
    def same_length(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    def select(self, index: slice | Sequence[int] | Tensor) -> "TokenBatch":
        ids, lengths = self.input_ids[index], self.lengths[index]
        width = int(lengths.max()) if len(lengths) else 0
        return TokenBatch(ids[:, :width], lengths)

    def repeat(self, n: int) -> "TokenBatch":
        """The batch stacked ``n`` times (variant-major), for batched patch variants."""
        return TokenBatch(self.input_ids.repeat(n, 1), self.lengths.repeat(n))

    def tokens(self, i: int) -> list[int]:
        return self.input_ids[i, : int(self.lengths[i])].tolist()


def tokenize(model: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]]) -> TokenBatch:
    """Tokenize prompts as the model sees them (its own BOS convention), right-padded.

    Accepts strings, or lists of token ids already built by a task module.
    """
    if isinstance(prompts, str):
        raise MechbookError("tokenize takes a list of prompts; wrap a single prompt in a list")
    if len(prompts) == 0:
        raise MechbookError("no prompts to tokenize; check the task's filters (every prompt was dropped?)")
    if isinstance(prompts[0], str):
        rows = [model.tokenizer(p).input_ids for p in prompts]
    else:
        rows = [list(map(int, p)) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise MechbookError("an empty prompt tokenizes to no tokens; remove it")
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return TokenBatch(ids.to(model.device), lengths.to(model.device))


def check_hook_names(model: LoadedModel, names: Sequence[str]) -> None:
    """Raise a clear error for a hook name the model does not have, with close matches."""
    known = model.bridge.hook_dict
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise MechbookError(f"{model.name} has no hook named {name!r}{hint}")


@contextlib.contextmanager
def temporary_hooks(model: LoadedModel, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[LoadedModel]:
    """Attach forward hooks for the duration of a ``with`` block; always removed, errors included.

    Hook functions follow transformer-lens: ``fn(activation, hook) -> activation | None``.
    """
    check_hook_names(model, [name for name, _ in fwd_hooks])
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        yield model


def _final_residual_name(model: LoadedModel) -> str:
    return "ln_final.hook_in"


def run_last(
    model: LoadedModel,
    batch: TokenBatch,
    *,
    names: Sequence[str] = (),
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    last_only: bool = False,
) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """One forward pass: logits at each prompt's last position, plus a restricted cache.

    ``names`` are the hook names to cache (nothing else is kept). With
    ``last_only`` each cached activation is cut to the prompt's last position
    (for activations whose second axis is position).
    """
    from mechbook.core.decoding import unembed

    check_hook_names(model, names)
    cache: dict[str, Tensor] = {}
    rows = torch.arange(len(batch), device=batch.input_ids.device)
    final = _final_residual_name(model)

    def saver(name: str, store_as: str) -> HookFn:
        def hook(act: Tensor, hook: object) -> None:
            act = act.detach()
            cache[store_as] = act[rows, batch.last_pos] if last_only or store_as == "__final__" else act.clone()

        return hook

    hooks = [*fwd_hooks, *((n, saver(n, n)) for n in names), (final, saver(final, "__final__"))]
    with torch.inference_mode(), temporary_hooks(model, hooks):
        model.bridge(batch.input_ids, logits_to_keep=1)
    final_resid = cache.pop("__final__")
    return unembed(model, final_resid), cache


def run_last_batched(
    model: LoadedModel,
    batch: TokenBatch,
    *,
    names: Sequence[str] = (),
    last_only: bool = True,
    batch_size: int = 32,
    desc: str | None = None,
) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """:func:`run_last` over a large batch in chunks, concatenating results.

    With ``last_only=False`` the chunks' activations are padded to the longest prompt.
    """
    logits, caches = [], []
    for start in tqdm(range(0, len(batch), batch_size), desc=desc, disable=None, leave=False):
        chunk = batch.select(slice(start, start + batch_size))
        lg, cache = run_last(model, chunk, names=names, last_only=last_only)
        logits.append(lg)
        caches.append(cache)
    merged = {}
    for name in names:
        parts = [c[name] for c in caches]
        if not last_only:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1])) for p in parts]
        merged[name] = torch.cat(parts)
    return torch.cat(logits), merged
