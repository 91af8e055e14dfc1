"""Places in the network: transformer-lens hook names, built in this one module, and components.

Every activation the library reads or edits is named as transformer-lens names it
(``blocks.3.attn.hook_z``, ``blocks.12.hook_resid_post``): :func:`act_name` builds
those strings, in the spirit of transformer-lens's ``utils.get_act_name``. A
:class:`Component` is a head, an MLP or the residual stream entering a layer, optionally
at one position: the unit that patching, ablation and circuits work with.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from mechbook.core.errors import MechbookError

# kind -> hook name; "{layer}" is filled in by act_name
_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",  # residual stream entering block L
    "resid_mid": "blocks.{layer}.hook_resid_mid",  # after the attention's write (sequential blocks only)
    "resid_post": "blocks.{layer}.hook_resid_post",  # leaving block L
    "attn_out": "blocks.{layer}.hook_attn_out",  # what the attention adds to the stream
    "mlp_out": "blocks.{layer}.hook_mlp_out",  # what the MLP adds to the stream (after Gemma's post-norm)
    "z": "blocks.{layer}.attn.hook_z",  # per-head outputs before the output projection [b, pos, head, d_head]
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "pattern": "blocks.{layer}.attn.hook_pattern",  # [b, head, query, key]
    "final": "ln_final.hook_in",  # the residual stream entering the final norm
}
KINDS = tuple(_HOOKS)


def act_name(kind: str, layer: int | None = None) -> str:
    """The hook name of an activation: ``act_name("z", 3) == "blocks.3.attn.hook_z"``.

    ``layer`` is a non-negative layer index (validate it with ``model.check_layer``
    first); ``"final"`` takes none.
    """
    if kind not in _HOOKS:
        raise MechbookError(f"unknown activation kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "final":
        if layer is not None:
            raise MechbookError('act_name("final") takes no layer: it is the input of the final norm')
        return _HOOKS[kind]
    if layer is None:
        raise MechbookError(f"act_name({kind!r}) needs a layer, e.g. act_name({kind!r}, 0)")
    layer = as_index(layer, "layer")
    if layer < 0:
        raise MechbookError(f"act_name({kind!r}, {layer}): hook names take the layer counted from 0; resolve a "
                            "negative layer with model.check_layer(layer) first")
    return _HOOKS[kind].format(layer=layer)


def parse_act_name(name: str) -> tuple[str, int | None]:
    """The kind and layer of a hook name: ``parse_act_name("blocks.3.attn.hook_z") == ("z", 3)``.

    The inverse of :func:`act_name`, for backends that place activations by kind and layer.
    """
    for kind, template in _HOOKS.items():
        head, _, tail = template.partition("{layer}")
        if not tail:
            if name == template:
                return kind, None
        elif name.startswith(head) and name.endswith(tail) and name[len(head) : len(name) - len(tail)].isdigit():
            return kind, int(name[len(head) : len(name) - len(tail)])
    raise MechbookError(f"{name!r} is not a hook name of mechbook's vocabulary ({', '.join(KINDS)}); "
                        "build names with act_name")


def inside_mlp(name: str) -> int | None:
    """The layer whose MLP holds hook ``name`` (``blocks.3.mlp.hook_post`` -> 3); None for a hook outside every MLP."""
    head, _, rest = name.partition(".")
    layer, _, tail = rest.partition(".")
    return int(layer) if head == "blocks" and layer.isdigit() and tail.startswith("mlp.") else None


def inside_attention(name: str) -> int | None:
    """The layer whose attention computes hook ``name`` before its per-head outputs (``blocks.3.attn.hook_q`` -> 3).

    Every hook under ``blocks.<L>.attn.`` except ``hook_z`` (the per-head outputs
    themselves) and ``hook_in`` (the attention's input); None for any other hook.
    """
    head, _, rest = name.partition(".")
    layer, _, tail = rest.partition(".")
    if head != "blocks" or not layer.isdigit() or not tail.startswith("attn.") or tail in ("attn.hook_z", "attn.hook_in"):
        return None
    return int(layer)


def layer_names(kind: str, n_layers: int) -> list[str]:
    """``act_name(kind, l)`` for every layer ``l`` of a model with ``n_layers`` layers."""
    return [act_name(kind, layer) for layer in range(n_layers)]


def spans(indices) -> list[tuple[int, int]]:
    """Distinct indices as half-open runs of consecutive ones, in order: ``[0, 1, 2, 5]`` -> ``[(0, 3), (5, 6)]``.

    Slicing run by run reads the elements a list index reads, but builds no index tensor:
    on a GPU a list index is copied from the host, and waited for, on every call.
    """
    out: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def as_index(value, what: str) -> int:
    """``value`` as a plain int (numpy integers included); bools and floats are refused."""
    if isinstance(value, bool):
        raise MechbookError(f"{what} {value!r} is a bool; pass an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise MechbookError(f"{what} {value!r} is not an integer; pass an int") from None


# --- components -----------------------------------------------------------------------------

COMPONENT_KINDS = ("head", "mlp", "resid", "q", "k", "v")
_COMPONENT_HOOK = {"head": "z", "mlp": "mlp_out", "resid": "resid_pre", "q": "q", "k": "k", "v": "v"}
_HEADED = ("head", "q", "k", "v")


@dataclass(frozen=True, order=True)
class Component:
    """A place in the network: an attention head, an MLP, or the residual stream entering a layer.

    A head's output is its slice of ``hook_z`` (before the output projection, so
    editing it is exact for every architecture); an MLP's output is ``hook_mlp_out``;
    the residual stream is ``hook_resid_pre``. Path patching also edits a head's query,
    key or value input (kinds ``"q"``, ``"k"``, ``"v"``; for keys and values ``head``
    indexes the key/value heads of grouped-query attention). ``position`` restricts an
    edit to one token position (``None``: every position). Negative layers count from
    the end and are resolved by :meth:`validate`.
    """

    kind: str  # "head", "mlp", "resid", or a head's input "q", "k", "v"
    layer: int
    head: int | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPONENT_KINDS:
            raise MechbookError(f"unknown component kind {self.kind!r}; use 'head', 'mlp' or 'resid'")
        if (self.kind in _HEADED) != (self.head is not None):
            raise MechbookError("a head component needs head=...; mlp and resid components take none")
        object.__setattr__(self, "layer", as_index(self.layer, "layer"))
        if self.head is not None:
            object.__setattr__(self, "head", as_index(self.head, "head"))
        if self.position is not None:
            object.__setattr__(self, "position", as_index(self.position, "position"))

    @property
    def hook_name(self) -> str:
        if self.layer < 0:
            raise MechbookError(f"{self.label} has a negative layer; resolve it with component.validate(model)")
        return act_name(_COMPONENT_HOOK[self.kind], self.layer)

    @property
    def label(self) -> str:
        """Short name: ``4.10`` for a head (layer.head), ``MLP 3``, ``resid 5``."""
        if self.kind == "head":
            return f"{self.layer}.{self.head}"
        if self.kind in _HEADED:
            return f"{self.layer}.{self.head} ({self.kind})"
        return f"{'MLP' if self.kind == 'mlp' else 'resid'} {self.layer}"

    def validate(self, model) -> "Component":
        """This component on ``model``: the layer made non-negative, the head and position checked."""
        layer = model.check_layer(self.layer)
        n = model.n_kv_heads if self.kind in ("k", "v") else model.n_heads
        if self.head is not None and not 0 <= self.head < n:
            raise MechbookError(
                f"head {self.head} is out of range for {model.name}, which has {n} "
                f"{'key/value ' if self.kind in ('k', 'v') else ''}heads per layer"
            )
        if self.position is not None and self.position < 0:
            raise MechbookError(f"position {self.position} is negative; positions count from the prompt's start")
        return self if layer == self.layer else replace(self, layer=layer)

    def slot(self) -> tuple:
        """Index of the component inside its hook's activation, after the batch axis."""
        pos = slice(None) if self.position is None else self.position
        return (pos, self.head) if self.head is not None else (pos,)


def all_heads(model) -> list[Component]:
    return [Component("head", layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]


def all_mlps(model) -> list[Component]:
    return [Component("mlp", layer) for layer in range(model.n_layers)]


def check_components(components, what: str, kinds: Sequence[str] = COMPONENT_KINDS) -> list[Component]:
    """``components`` as a non-empty list of :class:`Component` of ``kinds``, or a one-line error naming ``what``."""
    if isinstance(components, (Component, str, bytes)) or not isinstance(components, Iterable):
        raise MechbookError(f"{what} takes a list of components, e.g. [Component('head', 0, 1)], "
                            f"got {type(components).__name__}")
    components = list(components)
    if not components:
        raise MechbookError(f"{what} got no components; pass at least one, e.g. [Component('head', 0, 1)]")
    for c in components:
        if not isinstance(c, Component) or c.kind not in kinds:
            raise MechbookError(f"{what} takes {' or '.join(repr(k) for k in kinds)} components, e.g. "
                                f"Component({kinds[0]!r}, 0{', 1' if kinds[0] in _HEADED else ''}), got {c!r}")
    return components


def check_positions(components, width: int) -> None:
    """Refuse a component whose position lies past the prompts (``width`` tokens)."""
    for c in components:
        if c.position is not None and c.position >= width:
            raise MechbookError(
                f"{c.label} is set at position {c.position}, but the prompts have {width} tokens "
                f"(positions 0..{width - 1})"
            )
