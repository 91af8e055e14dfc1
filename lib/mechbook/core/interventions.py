"""Editing activations: patch, mean, zero, add and replace, all made by one hook factory.

An :class:`Edit` says what happens to one component's activation, in some rows of a
(possibly stacked) batch; :func:`edit_hooks` turns any list of edits into
transformer-lens hooks, one per hook name. Patching (values from another run), mean
ablation (per-position means over corrupted prompts), zero ablation (removing an FFN)
and adding or writing a vector (transplanting an FFN's update) are all edits, so every
sweep in the library runs through this one mechanism.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechbook.core.errors import MechbookError
from mechbook.core.names import Component, spans

MODES = ("patch", "mean", "zero", "add", "replace")
POSITIONS = ("last", "all")


@dataclass(frozen=True, eq=False)
class Edit:
    """A change to ``component``'s activation in rows ``rows`` of the batch (all rows if None).

    ``mode`` and ``value``:

    - ``"patch"``: ``value`` is the activation of another run of the same prompts
      (``[n, pos, ...]``, ``n`` the rows edited); the component's slot is copied over.
    - ``"mean"``: ``value`` is a per-position mean (``[pos, ...]``), copied into every row.
    - ``"zero"``: no value; the slot becomes 0.
    - ``"add"`` / ``"replace"``: ``value`` is a vector (``[d]``, or ``[n, d]`` one per
      row) added to, or written over, the activation at the positions ``mask``
      (``[n, pos]`` booleans) selects, or at the component's position.
    """

    component: Component
    mode: str
    value: Tensor | None = None
    rows: slice | None = None
    mask: Bool[Tensor, "n pos"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.component, Component):
            raise MechbookError(f"an Edit needs a Component, e.g. Component('head', 3, 1), got {self.component!r}")
        if self.mode not in MODES:
            raise MechbookError(f"unknown edit mode {self.mode!r}; use one of {', '.join(MODES)}")
        if (self.mode == "zero") != (self.value is None):
            raise MechbookError(f"a {self.mode!r} edit {'takes no' if self.mode == 'zero' else 'needs a'} value")
        if self.value is not None and not (isinstance(self.value, Tensor) and self.value.dtype.is_floating_point):
            raise MechbookError(f"{self.name}: the value must be a float tensor, got {type(self.value).__name__}")
        if self.mask is not None and self.mode not in ("add", "replace"):
            raise MechbookError("mask= selects positions for 'add' and 'replace' edits only")
        if self.mask is not None and not (isinstance(self.mask, Tensor) and self.mask.dtype == torch.bool
                                          and self.mask.dim() == 2):
            raise MechbookError(f"{self.name}: mask must be [n, pos] booleans, e.g. position_mask(batch, 'last', ...)")
        if self.rows is not None and not isinstance(self.rows, slice):
            raise MechbookError(f"{self.name}: rows must be a slice of the batch (or None for all rows), "
                                f"got {type(self.rows).__name__}")
        if self.rows is not None:
            try:
                range(*self.rows.indices(1))
            except (TypeError, ValueError):
                raise MechbookError(f"{self.name}: rows {self.rows} is not a slice of whole numbers with a step of "
                                    "at least 1; pass e.g. slice(0, 8)") from None
        want = {"mean": "[pos, ...] (a per-position mean)", "patch": "[n, pos, ...] (another run's activation)",
                "add": "[d] or [n, d] (a vector, or one per row)", "replace": "[d] or [n, d] (a vector, or one per row)"}
        if self.value is not None and not (self.value.dim() in ((1, 2) if self.mode in ("add", "replace") else
                                                                 (2, 3) if self.mode == "mean" else (3, 4))):
            raise MechbookError(f"{self.name}: the value has shape {tuple(self.value.shape)}; "
                                f"a {self.mode!r} edit takes {want[self.mode]}")

    @property
    def name(self) -> str:
        """The edit as errors name it: ``the 'add' edit of resid 3``."""
        return f"the {self.mode!r} edit of {self.component.label}"

    def check(self, act: Tensor, heads: Sequence[int] | None = None) -> None:
        """Refuse this edit (naming it) where it does not fit ``act``, the activation of its hook.

        A head past the layer's heads, a position past the prompts, a vector or value of
        another width, rows past the batch: one-line errors instead of an indexing
        traceback from inside the forward pass.
        """
        c = self.component
        if heads is not None or c.head is not None:
            n_heads = act.shape[2] if act.dim() == 4 else None
            for h in heads if heads is not None else [c.head]:
                if n_heads is None or not 0 <= h < n_heads:
                    raise MechbookError(f"{self.name}: head {h} is out of range; this layer has {n_heads} heads "
                                        f"(0..{(n_heads or 1) - 1})")
        if c.position is not None and c.position < 0:
            raise MechbookError(f"{self.name}: position {c.position} is negative; positions count from the prompt's "
                                "start (0 is the first token)")
        if c.position is not None and not 0 <= c.position < act.shape[1]:
            raise MechbookError(f"{self.name}: position {c.position} lies past the {act.shape[1]} positions of the prompts")
        n_rows = len(range(*(self.rows or slice(None)).indices(act.shape[0])))
        if n_rows == 0:
            raise MechbookError(f"{self.name}: rows {self.rows} select no row of the batch of {act.shape[0]}")
        value = self.value
        if self.mode in ("add", "replace"):
            if value.shape[-1] != act.shape[-1]:
                raise MechbookError(f"{self.name}: the vector has width {value.shape[-1]} but the activation has "
                                    f"{act.shape[-1]}; use a vector computed on this model")
            if value.dim() == 2 and value.shape[0] != n_rows:
                raise MechbookError(f"{self.name}: {value.shape[0]} vectors for {n_rows} rows; pass one, or one per row")
            if self.mask is not None and self.mask.shape[0] != n_rows:
                raise MechbookError(f"{self.name}: the mask has {self.mask.shape[0]} rows for {n_rows} rows edited")
            if self.mask is not None and self.mask.shape[1] < act.shape[1]:
                raise MechbookError(f"{self.name}: the mask covers {self.mask.shape[1]} positions but the prompts have "
                                    f"{act.shape[1]}; build it from the same batch, e.g. position_mask(batch, 'last', ...)")
        elif self.mode == "mean":
            if value.shape[1:] != act.shape[2:] or value.shape[0] < act.shape[1]:
                raise MechbookError(f"{self.name}: the mean has shape {tuple(value.shape)} but the activation is "
                                    f"{tuple(act.shape)}; use means over at least {act.shape[1]} positions of this model")
        elif self.mode == "patch":
            if value.shape[0] != n_rows or value.shape[2:] != act.shape[2:] or value.shape[1] < act.shape[1]:
                raise MechbookError(f"{self.name}: the patched value has shape {tuple(value.shape)} for {n_rows} rows "
                                    f"of an activation {tuple(act.shape)}; patch from a run of the same prompts")


def edit_hooks(edits: Iterable[Edit]) -> list[tuple[str, object]]:
    """Transformer-lens hooks applying ``edits`` in order: one hook per hook name.

    Edits of whole heads that share mode, rows and value (mean ablation of many heads
    of a layer) are applied as one indexing operation.
    """
    if isinstance(edits, Edit) or not isinstance(edits, Iterable):
        raise MechbookError(f"edit_hooks takes a list of Edit, got {type(edits).__name__}; e.g. "
                            "edit_hooks([Edit(Component('mlp', 0), 'zero')])")
    edits = list(edits)
    if not all(isinstance(e, Edit) for e in edits):
        bad = next(e for e in edits if not isinstance(e, Edit))
        raise MechbookError(f"edit_hooks takes a list of Edit, got {bad!r} in it; e.g. Edit(Component('mlp', 0), 'zero')")
    by_name: dict[str, list[Edit]] = defaultdict(list)
    for e in edits:
        by_name[e.component.hook_name].append(e)
    return [(name, EditHook(tuple(todo))) for name, todo in by_name.items()]


def _groups(todo: Sequence[Edit]) -> list[tuple[Edit, list[int] | None]]:
    """Edits in order, consecutive head edits with the same mode, rows, position and value merged into one."""
    out: list[tuple[Edit, list[int] | None]] = []
    index: dict[tuple, int] = {}
    for e in todo:
        c = e.component
        if c.head is not None and e.mode in ("patch", "mean", "zero") and e.mask is None:
            key = (e.mode, _rows_key(e.rows), c.position, id(e.value))
            if key in index and index[key] == len(out) - 1:
                out[-1][1].append(c.head)
                continue
            index[key] = len(out)
            out.append((e, [c.head]))
        else:
            out.append((e, None))
    return out


def _rows_key(rows: slice | None) -> tuple | None:
    return None if rows is None else (rows.start, rows.stop, rows.step)


def _overwrites(e: Edit, heads: list[int] | None) -> bool:
    """Whether the edit writes over the whole activation, every row and position (so its input is never read)."""
    return e.mode in ("zero", "mean", "patch") and e.rows is None and e.component.position is None and heads is None


@dataclass(frozen=True, eq=False)
class EditHook:
    """The hook that applies ``edits`` (all on one hook name) to an activation, in order.

    Called as transformer-lens calls hooks, ``hook(act, hook=hook_point)``. Its edits are
    its data: ``written_over``, worked out from them once, is what the hook writes over, which
    :func:`mechbook.core.runs.skips` uses to leave that work out of a run.
    """

    edits: tuple[Edit, ...]
    groups: list = field(init=False, repr=False)  # the edits merged once (:func:`_groups`), not on every call
    # what the edits write over (:func:`_written_over`), worked out once: every run's skip plan reads it
    written_over: tuple[bool, frozenset[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", _groups(self.edits))
        object.__setattr__(self, "written_over", _written_over(self.groups))

    def __call__(self, act: Tensor, hook: object) -> Tensor:
        groups = self.groups
        for e, heads in groups:
            e.check(act, heads)
        act = act.clone()
        for e, heads in groups:
            rows = slice(None) if e.rows is None else e.rows
            pos = slice(None) if e.component.position is None else e.component.position
            if e.mode not in ("zero", "mean", "patch"):
                _write_vector(act, e, rows)
                continue
            value = e.value[: act.shape[1]] if e.mode == "mean" else e.value  # mean [pos, ...], patch [n, pos, ...]
            # merged heads as runs of consecutive heads: slices, so no index tensor is copied to the device
            for part in [()] if heads is None else [(slice(a, b),) for a, b in spans(heads)]:
                if e.mode == "zero":
                    act[(rows, pos, *part)] = 0.0
                elif e.mode == "mean":
                    act[(rows, pos, *part)] = value[(pos, *part)].to(act.dtype)
                else:
                    act[(rows, pos, *part)] = value[(slice(None), pos, *part)].to(act.dtype)
        return act


def _written_over(groups: Sequence[tuple[Edit, list[int] | None]]) -> tuple[bool, frozenset[int]]:
    """What merged edits (:func:`_groups`) on one hook name write over in every row and position.

    ``(whole, heads)``: ``whole`` when some edit writes over the entire activation (a mean,
    zero or patch edit of a whole MLP's output), and the heads whose slice is written over
    when every edit is such a plain write (so that no edit reads what another leaves).
    """
    whole = any(_overwrites(e, heads) for e, heads in groups)
    plain = all(e.mode in ("zero", "mean", "patch") and e.mask is None for e, _ in groups)
    heads = frozenset(h for e, heads in groups
                      if plain and heads is not None and e.rows is None and e.component.position is None
                      for h in heads)
    return whole, heads


def _write_vector(act: Tensor, e: Edit, rows: slice) -> None:
    """An add or replace edit of a [d] or [n, d] vector at the positions its mask (or component) selects."""
    part = act[rows]
    if e.mask is not None:
        mask = e.mask
    else:
        mask = torch.zeros(part.shape[:2], dtype=torch.bool, device=act.device)
        mask[:, slice(None) if e.component.position is None else e.component.position] = True
    act[rows] = (add_vector if e.mode == "add" else write_vector)(part, e.value, mask)


def _broadcast(act: Tensor, vector: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    value = vector.to(act.device, act.dtype)
    value = value[:, None, :] if value.dim() == 2 else value[None, None, :]
    return value, mask[:, : act.shape[1], None].to(act.device)


def add_vector(act: Float[Tensor, "n pos d"], vector: Float[Tensor, "d"] | Float[Tensor, "n d"],
               mask: Bool[Tensor, "n pos"]) -> Float[Tensor, "n pos d"]:
    """``act`` plus ``vector`` (one, or one per row) at the positions ``mask`` selects."""
    value, mask = _broadcast(act, vector, mask)
    return act + mask.to(act.dtype) * value


def write_vector(act: Float[Tensor, "n pos d"], vector: Float[Tensor, "d"] | Float[Tensor, "n d"],
                 mask: Bool[Tensor, "n pos"]) -> Float[Tensor, "n pos d"]:
    """``act`` with ``vector`` (one, or one per row) written over the positions ``mask`` selects."""
    value, mask = _broadcast(act, vector, mask)
    return torch.where(mask, value.expand_as(act), act)


# --- common edits ------------------------------------------------------------------------------------


def mean_ablation(components: Iterable[Component], means: Mapping[str, Tensor], *, rows: slice | None = None,
                  first_layer: int = 0) -> list[Edit]:
    """Mean-ablate components at every position: their outputs become the means over corrupted prompts.

    Components in layers before ``first_layer`` are left out: a run that starts later
    never reaches them.
    """
    if not isinstance(means, Mapping):
        raise MechbookError(f"mean ablation needs means as a dict of hook name to mean, got {type(means).__name__}; "
                            "compute them with mean_activations (or circuit_means)")
    out = []
    for c in components:
        if c.layer < first_layer:
            continue
        if c.hook_name not in means:
            raise MechbookError(f"means have no entry for {c.hook_name}; compute them with mean_activations "
                                "(or circuit_means) over every head and MLP")
        out.append(Edit(c, "mean", means[c.hook_name], rows))
    return out


def zero_ablation(components: Iterable[Component], *, rows: slice | None = None) -> list[Edit]:
    """Zero-ablate components (e.g. remove MLPs: their write to the residual stream becomes 0)."""
    return [Edit(c, "zero", None, rows) for c in components]


def position_mask(batch, positions: str, *, skip_bos: bool) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` booleans: each prompt's last position, or every real position (BOS excepted if asked)."""
    if positions not in POSITIONS:
        raise MechbookError(f"unknown positions {positions!r}; use one of {list(POSITIONS)}")
    pos = torch.arange(batch.input_ids.shape[1], device=batch.lengths.device)
    if positions == "last":
        return pos[None, :] == batch.last_pos[:, None]
    mask = pos[None, :] < batch.lengths[:, None]
    if skip_bos:
        mask &= pos[None, :] > 0
    return mask


def check_vector(model, vector: Float[Tensor, "... d_model"], n: int | None = None, what: str = "the vector") -> Tensor:
    """A ``[d_model]`` vector or one per prompt (``[n, d_model]``), finite and of the model's width."""
    from mechbook.core.decoding import check_finite

    if not isinstance(vector, Tensor) or not vector.dtype.is_floating_point:
        got = vector.dtype if isinstance(vector, Tensor) else type(vector).__name__
        raise MechbookError(f"{what} must be a float torch tensor [d_model] or [batch, d_model], got {got}; "
                            "e.g. torch.as_tensor(v, dtype=torch.float32)")
    if vector.dim() not in (1, 2):
        raise MechbookError(f"expected {what} as [d_model] or [batch, d_model], got shape {tuple(vector.shape)}")
    if vector.shape[-1] != model.d_model:
        raise MechbookError(f"{what} has width {vector.shape[-1]} but {model.name} has d_model={model.d_model}; "
                            "use a vector computed on this model")
    if vector.dim() == 2 and n is not None and vector.shape[0] != n:
        raise MechbookError(f"{vector.shape[0]} vectors for {n} prompts; pass one vector, or one per prompt")
    return check_finite(vector, what)
