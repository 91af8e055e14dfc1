"""Running a hooked model: token batches, last-position runs, runs from a layer, stacked variants.

Everything here keeps transformer-lens hook names (:mod:`mechbook.core.names`) as the
one vocabulary for places in the network.

Prompts of different lengths are batched with *right* padding: under causal
attention no real token attends to a pad token that follows it, so every real
position computes exactly what it would alone, and each prompt's answer is read at
its own last position. Logits are computed only there (the unembedding of a
262k-token vocabulary is most of a small model's cost).

- :func:`run_last`: one forward pass, last-position logits and a restricted cache;
- :func:`run_from_layer`: finish a forward pass from the residual stream entering a
  layer (a patch at layer L then costs only the layers from L on);
- :func:`run_variants`: the one variant runner, running a batch once per variant
  (each with its own edits) stacked along the batch axis.

Every run attaches its hooks through :func:`temporary_hooks`, which also skips work
that cannot matter: an MLP whose whole output the first hook on ``hook_mlp_out``
writes over (mean ablation outside a circuit, FFN removal) is not computed. The
numbers are the same bit for bit (``tests/core/test_architecture_matrix.py``).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core.checks import check_count, chunk_starts
from mechbook.core.decoding import check_resid
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
    if isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__len__"):
        raise MechbookError(f"tokenize takes a list of prompts (strings, or lists of token ids), got "
                            f"{type(prompts).__name__}; e.g. tokenize(model, ['The capital of France is'])")
    if len(prompts) == 0:
        raise MechbookError("no prompts to tokenize; check the task's filters (every prompt was dropped?)")
    texts = [isinstance(p, str) for p in prompts]
    if any(texts) and not all(texts):
        raise MechbookError(f"tokenize got prompt {texts.index(not texts[0])} of another kind than prompt 0: pass "
                            "all strings or all lists of token ids")
    if any(isinstance(p, (bytes, bytearray)) for p in prompts):
        raise MechbookError("tokenize got a bytes prompt; decode it to str first (bytes would be read as token ids)")
    if texts[0]:
        rows = [model.tokenizer(p).input_ids for p in prompts]
    else:
        from mechbook.core.names import as_index

        try:
            rows = [[as_index(t, "token id") for t in p] for p in prompts]
        except TypeError:
            raise MechbookError("tokenize takes strings or lists of token ids; got a prompt that is neither") from None
    if any(len(r) == 0 for r in rows):
        raise MechbookError("an empty prompt tokenizes to no tokens; remove it")
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    batch = TokenBatch(ids.to(model.device), lengths.to(model.device))
    check_token_ids(model, batch)
    return batch


def check_token_ids(model: LoadedModel, batch: TokenBatch) -> None:
    """Refuse a batch whose ids lie outside the model's vocabulary (the embedding would fail, or read another token),
    or whose lengths do not fit its ids (each prompt's answer is read at position ``length - 1``)."""
    if not isinstance(batch, TokenBatch):
        raise MechbookError(f"expected a TokenBatch of prompts, got {type(batch).__name__}; build it with "
                            "tokenize(model, prompts)")
    ids = batch.input_ids
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise MechbookError(f"a TokenBatch holds integer ids [batch, pos], got {getattr(ids, 'dtype', type(ids))} "
                            f"{tuple(getattr(ids, 'shape', ()))}; build it with tokenize(model, prompts)")
    if ids.numel():
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= model.d_vocab:
            bad = int(low) if int(low) < 0 else int(high)
            raise MechbookError(f"token id {bad} is outside {model.name}'s vocabulary of {model.d_vocab} tokens "
                                f"(0..{model.d_vocab - 1}); build prompts with this model's tokenizer")
    lengths = batch.lengths
    if (not isinstance(lengths, Tensor) or lengths.dim() != 1 or len(lengths) != ids.shape[0]
            or lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dtype.is_complex):
        raise MechbookError(f"a TokenBatch's lengths are one integer per prompt ({ids.shape[0]} here), got "
                            f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}; "
                            "build it with tokenize(model, prompts)")
    if len(lengths):
        low, high = torch.aminmax(lengths)
        if int(low) < 1 or int(high) > ids.shape[1]:
            raise MechbookError(f"a TokenBatch's lengths must lie in 1..{ids.shape[1]} (its width), got "
                                f"{int(low) if int(low) < 1 else int(high)}; build it with tokenize(model, prompts)")


def check_hook_names(model: LoadedModel, names: Sequence[str]) -> None:
    """Raise a clear error for a hook name the model does not have, with close matches."""
    if isinstance(names, (str, bytes)):
        raise MechbookError(f"names takes a list of hook names, got the string {names!r}; wrap it in a list: "
                            f"names=[{names!r}]")
    known = model.bridge.hook_dict
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise MechbookError(f"{model.name} has no hook named {name!r}{hint}")


HOOK_SIGNATURE = "hook(tensor, hook) -> tensor | None"


def check_hook_fns(fwd_hooks: Sequence[tuple[str, HookFn]]) -> list[tuple[str, HookFn]]:
    """``fwd_hooks`` as a list of (hook name, function) pairs whose functions can be called as transformer-lens calls
    them, ``fn(activation, hook=hook_point)``; anything else is a one-line error naming :data:`HOOK_SIGNATURE`."""
    if isinstance(fwd_hooks, (str, bytes)) or not isinstance(fwd_hooks, Iterable):
        raise MechbookError(f"fwd_hooks is a list of (hook name, function) pairs, got {type(fwd_hooks).__name__}")
    pairs = []
    for pair in fwd_hooks:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise MechbookError(f"fwd_hooks holds {pair!r}; pass (hook name, function) pairs, e.g. "
                                "[(act_name('mlp_out', 0), fn)] with fn defined as " + HOOK_SIGNATURE)
        name, fn = pair
        pairs.append((name, fn))
        if not callable(fn):
            raise MechbookError(f"the hook on {name} is a {type(fn).__name__}, not a function; pass a function "
                                + HOOK_SIGNATURE)
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: trust it
            continue
        try:
            signature.bind(None, hook=None)
        except TypeError:
            raise MechbookError(f"the hook on {name}, {getattr(fn, '__name__', type(fn).__name__)}{signature}, cannot be "
                                f"called as transformer-lens calls hooks; define it as {HOOK_SIGNATURE} (the activation, "
                                "then the hook point passed as hook=)") from None
    return pairs


def check_hook_output(out: object, act: Tensor, name: str) -> None:
    """Refuse what a hook returned unless it is None (the activation unchanged) or a tensor of the activation's shape."""
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise MechbookError(f"the hook on {name} returned a {type(out).__name__}; a hook returns a tensor of the "
                            f"activation's shape {tuple(act.shape)} or None ({HOOK_SIGNATURE})")
    if act.dtype.is_floating_point and not out.dtype.is_floating_point:
        raise MechbookError(f"the hook on {name} returned {out.dtype} values for a {act.dtype} activation; return "
                            f"floats (e.g. torch.zeros_like(act)), or None ({HOOK_SIGNATURE})")
    if out.shape != act.shape:
        raise MechbookError(f"the hook on {name} returned a tensor of shape {tuple(out.shape)} for an activation of "
                            f"shape {tuple(act.shape)}; return one of the same shape, or None ({HOOK_SIGNATURE})")


def _returns_checked(name: str, fn: HookFn) -> HookFn:
    """``fn``, its return value checked (:func:`check_hook_output`) every time it runs."""

    def hook(act: Tensor, hook: object) -> Tensor | None:
        out = fn(act, hook=hook)
        check_hook_output(out, act, name)
        return out

    return hook


@contextlib.contextmanager
def temporary_hooks(model: LoadedModel, fwd_hooks: Sequence[tuple[str, HookFn]], *, skip_mlps: bool = True,
                    skip_heads: bool = True) -> Iterator[LoadedModel]:
    """Attach forward hooks for the duration of a ``with`` block; always removed, errors included.

    Hook functions follow transformer-lens: ``fn(activation, hook) -> activation | None``
    (:data:`HOOK_SIGNATURE`); another signature, or a return value of another shape, is
    a one-line error. What the hooks' edits write over entirely is not computed
    (:func:`skips`; ``skip_mlps``, ``skip_heads`` switch each part off); the numbers are
    the same bit for bit.
    """
    from mechbook.core.architectures import replaced_forwards, skip_forwards

    fwd_hooks = check_hook_fns(fwd_hooks)
    check_hook_names(model, [name for name, _ in fwd_hooks])
    checked = [(name, _returns_checked(name, fn)) for name, fn in fwd_hooks]
    plan = skips(model, fwd_hooks, mlps=skip_mlps, heads=skip_heads)
    with model.bridge.hooks(fwd_hooks=checked), replaced_forwards(skip_forwards(model, plan)):
        yield model


@dataclass(frozen=True)
class Skips:
    """What a run leaves uncomputed: MLPs whose whole output, and per layer the heads whose output, edits write over."""

    mlps: tuple[int, ...] = ()
    heads: Mapping[int, frozenset[int]] = field(default_factory=dict)


def skips(model: LoadedModel, fwd_hooks: Sequence[tuple[str, HookFn]], *, mlps: bool = True,
          heads: bool = True) -> Skips:
    """What the edits among ``fwd_hooks`` make it pointless to compute; a pure function of the hooks and their edits.

    An MLP is left out when the first hook on its ``hook_mlp_out`` is an edit hook
    (:class:`~mechbook.core.interventions.EditHook`) that writes over the whole output
    and no hook reads inside that MLP: mean ablation of a circuit's complement, removing
    an FFN. A head's query (and the key and value of a key/value head none of whose query
    heads is read) is left out when the first hook on its layer's ``hook_z`` writes over
    the head's output in every row and position and no hook reads inside that attention.
    Only the first hook on a name counts: it is the one that sees the activation as computed.
    ``mlps=False`` / ``heads=False`` leave that part out of the plan.
    """
    from mechbook.core.interventions import EditHook
    from mechbook.core.names import act_name, inside_attention, inside_mlp

    first: dict[str, HookFn] = {}
    for name, fn in fwd_hooks:
        first.setdefault(name, fn)

    def written_over(name: str) -> tuple[bool, frozenset[int]]:
        fn = first.get(name)
        return fn.written_over if isinstance(fn, EditHook) else (False, frozenset())

    read_mlp = {inside_mlp(name) for name in first}
    read_attention = {inside_attention(name) for name in first}
    left_mlps, left_heads = [], {}
    for layer in range(model.n_layers):
        if mlps and written_over(act_name("mlp_out", layer))[0] and layer not in read_mlp:
            left_mlps.append(layer)
        gone = written_over(act_name("z", layer))[1] if heads else frozenset()
        if gone and layer not in read_attention:
            left_heads[layer] = gone
    return Skips(tuple(left_mlps), left_heads)


def run_last(
    model: LoadedModel,
    batch: TokenBatch,
    *,
    names: Sequence[str] = (),
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    last_only: bool = False,
    tokens: Int[Tensor, "k"] | None = None,
) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """One forward pass: logits at each prompt's last position, plus a restricted cache.

    ``names`` are the hook names to cache (nothing else is kept). With
    ``last_only`` each cached activation is cut to the prompt's last position
    (for activations whose second axis is position). ``tokens`` restricts the
    unembedding to those ids (see :func:`mechbook.core.decoding.unembed`).
    """
    from mechbook.core.decoding import unembed
    from mechbook.core.names import act_name

    check_token_ids(model, batch)
    fwd_hooks = check_hook_fns(fwd_hooks)
    return runner(model).run_last(model, batch, names=names, fwd_hooks=fwd_hooks, last_only=last_only,
                                  tokens=tokens)


def run_last_batched(
    model: LoadedModel,
    batch: TokenBatch,
    *,
    names: Sequence[str] = (),
    last_only: bool = True,
    batch_size: int = 32,
    desc: str | None = None,
    chunk_hooks: Callable[[TokenBatch, slice], Sequence[tuple[str, HookFn]]] | None = None,
) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """:func:`run_last` over a large batch in chunks of ``batch_size`` prompts, concatenating results.

    With ``last_only=False`` the chunks' activations are padded to the longest prompt.
    ``chunk_hooks(chunk, rows)`` builds the hooks of each chunk (``rows``: its slice of ``batch``).
    """
    logits, caches = [], []
    for start in tqdm(chunk_starts(len(batch), batch_size), desc=desc, disable=None, leave=False):
        rows = slice(start, start + batch_size)
        chunk = batch.select(rows)
        hooks = chunk_hooks(chunk, rows) if chunk_hooks is not None else ()
        lg, cache = run_last(model, chunk, names=names, last_only=last_only, fwd_hooks=hooks)
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


# --- running from a layer ---------------------------------------------------------------------------


def embeddings(model: LoadedModel, batch: TokenBatch) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering layer 0 (embeddings, positions, scaling as the model does them); no layer runs."""
    check_token_ids(model, batch)
    return runner(model).embeddings(model, batch)


def check_last_pos(last_pos, n: int, width: int) -> Int[Tensor, "n"]:
    """``last_pos`` as a long tensor of one position per row inside ``0..width-1``, or a one-line error.

    A negative position would count from the end of the right-padded rows and read a pad
    token of every shorter prompt, so it is refused; pass ``batch.last_pos``, each prompt's
    own last real token.
    """
    try:
        pos = torch.as_tensor(last_pos)
    except (TypeError, ValueError, RuntimeError):
        raise MechbookError(f"last_pos must be one integer position per row, got {last_pos!r}; pass batch.last_pos") from None
    if pos.dtype == torch.bool or pos.dtype.is_floating_point or pos.dtype.is_complex:
        raise MechbookError(f"last_pos must hold integer positions, got {pos.dtype}; pass batch.last_pos")
    if pos.dim() != 1 or len(pos) != n:
        raise MechbookError(f"last_pos needs one position per row of resid: {tuple(pos.shape)} for {n} rows; "
                            "pass batch.last_pos")
    pos = pos.long()
    if len(pos) and int(pos.min()) < 0:
        raise MechbookError(f"last position {int(pos.min())} is negative: it would count from the end of the padded "
                            "rows and read a pad token of a shorter prompt; pass batch.last_pos")
    if len(pos) and int(pos.max()) >= width:
        raise MechbookError(f"a last position ({int(pos.max())}) lies past the {width} positions of resid; "
                            "pass batch.last_pos")
    return pos


def run_from_layer(
    model: LoadedModel,
    resid: Float[Tensor, "batch pos d_model"],
    layer: int,
    last_pos: Int[Tensor, "batch"],
    *,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    names: Sequence[str] = (),
    tokens: Int[Tensor, "k"] | None = None,
    prefix=None,
) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
    """Finish a forward pass from ``layer``, given the residual stream entering it.

    ``resid`` is ``blocks.{layer}.hook_resid_pre`` of a (possibly patched) run; the
    result equals a full forward's last-position logits whenever nothing before
    ``layer`` was meant to change, at a fraction of the cost. Hooks (and cached
    ``names``) on layers before ``layer`` never fire. ``layer = n_layers`` only
    applies the final norm and unembedding. ``tokens`` restricts the unembedding to
    those vocabulary ids (other logits come back NaN): enough for a logit
    difference, and much cheaper with Gemma's 262k-token vocabulary. Works on every
    architecture (:func:`mechbook.core.architectures.run_layers`); ``prefix`` is a
    :class:`~mechbook.core.architectures.SharedPrefix` of the hand-written loops.
    """
    layer = model.check_layer(layer, allow_end=True)
    check_resid(model, resid, "resid")
    if resid.dim() != 3:
        raise MechbookError(f"resid must be [batch, pos, {model.d_model}], got {tuple(resid.shape)}")
    last_pos = check_last_pos(last_pos, resid.shape[0], resid.shape[1])
    fwd_hooks = check_hook_fns(fwd_hooks)
    run = runner(model)
    if prefix is not None and not run.joins_rows:
        raise MechbookError(f"a shared-prefix cache runs on the local backend only, not {run.name!r}; run without one")
    return run.run_from_layer(model, resid, layer, last_pos, fwd_hooks=fwd_hooks, names=names, tokens=tokens,
                              prefix=prefix)


def run_joining(
    model: LoadedModel,
    joins: Sequence[tuple[int, Float[Tensor, "n pos d_model"]]],
    last_pos: Int[Tensor, "n"],
    *,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    tokens: Int[Tensor, "k"] | None = None,
) -> Float[Tensor, "rows d_vocab"]:
    """One forward pass in which groups of rows join at their own layers; last-position logits of every row.

    ``joins[k] = (layer, resid)``: ``n`` rows whose residual stream entering ``layer``
    is ``resid``, in order of ``layer``. Group ``k`` holds rows ``k*n .. (k+1)*n-1`` from
    the moment it joins, and its rows run only the blocks from its own layer on, so
    the result equals one :func:`run_from_layer` per group, stacked, with no block run
    for rows that do not need it. The local backend's decoder loops only.
    """
    from mechbook.core.architectures import run_layers
    from mechbook.core.decoding import unembed

    run = runner(model)
    if not run.joins_rows:
        raise MechbookError(f"run_joining runs on the local backend only, not {run.name!r}")
    if not joins:
        raise MechbookError("no rows to run; pass at least one (layer, resid)")
    layers = [model.check_layer(layer, allow_end=True) for layer, _ in joins]
    if layers != sorted(layers):
        raise MechbookError(f"groups must join in order of their layers; got layers {layers}")
    shape = joins[0][1].shape
    if any(resid.shape != shape for _, resid in joins) or len(shape) != 3:
        raise MechbookError(f"every group's resid must be [n, pos, {model.d_model}] like the first; "
                            f"got {[tuple(r.shape) for _, r in joins]}")
    last_pos = check_last_pos(last_pos, shape[0], shape[1])
    fwd_hooks = check_hook_fns(fwd_hooks)
    bounds = sorted(set(layers)) + [model.n_layers]
    hidden = None
    with torch.inference_mode(), temporary_hooks(model, fwd_hooks, **run.skipping):
        for here, upto in zip(bounds, bounds[1:]):
            new = [resid for layer, resid in joins if layer == here]
            hidden = torch.cat(([] if hidden is None else [hidden]) + new)
            hidden = run_layers(model, hidden, here, stop=upto)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logits = unembed(model, hidden[rows, last_pos.to(hidden.device).repeat(len(joins))], tokens=tokens)
    return logits


# --- the variant runner ------------------------------------------------------------------------------

HooksFor = Callable[[int, int], Sequence[tuple[str, HookFn]]]


def run_variants(
    model: LoadedModel,
    batch: TokenBatch,
    n_variants: int,
    hooks_for: HooksFor,
    reduce: Callable[[Tensor], Tensor],
    *,
    layer: int = 0,
    resid: Float[Tensor, "batch pos d_model"] | None = None,
    prefix=None,
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
    progress=None,
) -> Tensor:
    """Run ``batch`` once per variant, the variants stacked along the batch axis; ``reduce`` each run's logits.

    The one mechanism behind every patching and ablation sweep: a pass holds up to
    ``max_rows // len(batch)`` variants, variant ``v`` of a pass in rows
    ``v*n:(v+1)*n``; ``hooks_for(first, count)`` returns the hooks that apply
    variants ``first .. first+count-1`` to their rows. Each pass starts at ``layer``
    from ``resid`` (the residual stream entering that layer; default: the embeddings,
    a full forward), so a variant that edits layer L or later costs only the layers
    from ``layer`` on. ``reduce`` maps logits ``[count, n, d_vocab]`` to a tensor with
    leading axes ``[count, n]`` (a metric); the results of all passes come back
    concatenated: ``[n_variants, n, ...]``. ``progress`` is a tqdm bar to advance.
    """
    from mechbook.core.names import as_index

    n = len(batch)
    max_rows = check_count(max_rows, "max_rows")
    n_variants = as_index(n_variants, "n_variants")
    if n_variants < 1:
        raise MechbookError(f"n_variants must be at least 1, got {n_variants}: there is nothing to run")
    if not callable(hooks_for) or not callable(reduce):
        raise MechbookError("run_variants needs hooks_for(first, count) -> hooks and reduce(logits) -> tensor, both "
                            f"functions; got {type(hooks_for).__name__} and {type(reduce).__name__}")
    if resid is None:
        if layer != 0:
            raise MechbookError("run_variants from a later layer needs resid= (the residual stream entering it)")
        resid = embeddings(model, batch)
    if resid.shape[0] != n:
        raise MechbookError(f"resid has {resid.shape[0]} rows for a batch of {n} prompts")
    per_pass = max(1, max_rows // n)
    last_pos = batch.last_pos if prefix is None or prefix.recording else batch.last_pos - prefix.length
    out = []
    for first in range(0, n_variants, per_pass):
        count = min(per_pass, n_variants - first)
        if prefix is not None:
            prefix.repeat = count
        logits, _ = run_from_layer(model, resid.repeat(count, 1, 1), layer, last_pos.repeat(count),
                                   fwd_hooks=hooks_for(first, count), tokens=tokens, prefix=prefix)
        reduced = reduce(logits.reshape(count, n, -1))
        if not isinstance(reduced, Tensor) or reduced.shape[:2] != (count, n):
            raise MechbookError(f"reduce must map logits [{count}, {n}, d_vocab] to a tensor with leading axes "
                                f"[{count}, {n}] (variants, prompts), got {type(reduced).__name__} "
                                f"{tuple(getattr(reduced, 'shape', ()))}")
        out.append(reduced)
        if progress is not None:
            progress.update(count)
    return torch.cat(out)


# --- the runners: where a model's forward passes run ------------------------------------------------


@dataclass(frozen=True)
class LocalRunner:
    """Forward passes here, on the transformer-lens bridge, through its hooks.

    The interface every runner has (the nnsight runner of :mod:`mechbook.nnsight_backend`
    too): ``run_last``, ``run_from_layer``, ``embeddings`` and ``unembed`` with the
    arguments of the functions of this module, which check them and hand them over;
    ``name``; ``joins_rows`` (rows may join a run at their own layers and share a prefix
    cache: :func:`run_joining`); ``fast_loops`` (the hand-written decoder loops may run).

    ``skip_mlps`` / ``skip_heads``: leave out the MLPs / heads that edits write over entirely
    (:func:`skips`); False computes them (the reference the benchmarks time). ``fast_loops``:
    False runs from a layer through the model's own forward (the generic path the loops
    are tested against). Another setting is another runner on the same model:
    ``dataclasses.replace(model, runner=LocalRunner(skip_mlps=False))``.
    """

    skip_mlps: bool = True
    skip_heads: bool = True
    fast_loops: bool = True
    name: ClassVar[str] = "local"
    joins_rows: ClassVar[bool] = True

    @property
    def skipping(self) -> dict[str, bool]:
        return {"skip_mlps": self.skip_mlps, "skip_heads": self.skip_heads}

    def run_last(self, model: LoadedModel, batch: TokenBatch, *, names: Sequence[str],
                 fwd_hooks: Sequence[tuple[str, HookFn]], last_only: bool,
                 tokens: Int[Tensor, "k"] | None) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
        from mechbook.core.decoding import unembed
        from mechbook.core.names import act_name

        check_hook_names(model, names)
        cache: dict[str, Tensor] = {}
        rows = torch.arange(len(batch), device=batch.input_ids.device)
        final = act_name("final")

        def saver(name: str, store_as: str) -> HookFn:
            def hook(act: Tensor, hook: object) -> None:
                act = act.detach()
                cache[store_as] = act[rows, batch.last_pos] if last_only or store_as == "__final__" else act.clone()

            return hook

        hooks = [*fwd_hooks, *((n, saver(n, n)) for n in names), (final, saver(final, "__final__"))]
        with torch.inference_mode(), temporary_hooks(model, hooks, **self.skipping):
            model.bridge(batch.input_ids, logits_to_keep=1)
        final_resid = cache.pop("__final__")
        return unembed(model, final_resid, tokens=tokens), cache

    def run_from_layer(self, model: LoadedModel, resid: Float[Tensor, "batch pos d_model"], layer: int,
                       last_pos: Int[Tensor, "batch"], *, fwd_hooks: Sequence[tuple[str, HookFn]],
                       names: Sequence[str], tokens: Int[Tensor, "k"] | None,
                       prefix=None) -> tuple[Float[Tensor, "batch d_vocab"], dict[str, Tensor]]:
        from mechbook.core.architectures import run_layers
        from mechbook.core.decoding import unembed

        cache: dict[str, Tensor] = {}

        def saver(name: str) -> HookFn:
            def hook(act: Tensor, hook: object) -> None:
                cache[name] = act.detach().clone()

            return hook

        rows = torch.arange(resid.shape[0], device=resid.device)
        hooks = [*fwd_hooks, *((n, saver(n)) for n in names)]
        with torch.inference_mode(), temporary_hooks(model, hooks, **self.skipping):
            if prefix is not None:
                prefix.used.clear()
            hidden = run_layers(model, resid, layer, prefix=prefix)
            if prefix is not None:
                prefix.check_used(layer, model.n_layers)
            logits = unembed(model, hidden[rows, last_pos.to(resid.device)], tokens=tokens)
        missing = [n for n in names if n not in cache]
        if missing:
            raise MechbookError(f"{', '.join(missing)} did not fire: they lie before layer {layer}, where this run "
                                "starts")
        return logits, cache

    def embeddings(self, model: LoadedModel, batch: TokenBatch) -> Float[Tensor, "batch pos d_model"]:
        from mechbook.core.architectures import StopForward
        from mechbook.core.names import act_name

        box: dict[str, Tensor] = {}

        def grab(act: Tensor, hook: object) -> None:
            box["resid"] = act.detach().clone()
            raise StopForward

        try:
            with torch.inference_mode(), temporary_hooks(model, [(act_name("resid_pre", 0), grab)], **self.skipping):
                model.bridge(batch.input_ids)
        except StopForward:
            pass
        return box["resid"]

    def unembed(self, model: LoadedModel, resid: Float[Tensor, "... d_model"], *, normalize: bool,
                tokens: Int[Tensor, "k"] | None) -> Float[Tensor, "... d_vocab"]:
        from mechbook.core.decoding import unembed_here

        return unembed_here(model, resid, normalize=normalize, tokens=tokens)

    def token_logits(self, model: LoadedModel, resid: Float[Tensor, "... d_model"],
                     ids: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
        from mechbook.core.decoding import token_logits_here

        return token_logits_here(model, resid, ids)


LOCAL = LocalRunner()


def runner(model: LoadedModel):
    """The runner of ``model``'s forward passes: the one its backend put on it, else :data:`LOCAL`."""
    return LOCAL if model.runner is None else model.runner
