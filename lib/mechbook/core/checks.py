"""The values a run parameter may take, by name: one table that the library and the CLI both read.

A name means the same thing wherever it appears: ``threshold`` is a fraction of the
full model's score in node and edge pruning, ``n_prompts`` a count of prompts. The
library functions that take such a value call :func:`check`, and ``mechbook run -p``
checks a chapter's parameters against :data:`PARAMETERS` before any notebook starts, so
a value the library would refuse two minutes into a chapter is refused at once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Collection

from mechbook.core.errors import MechbookError
from mechbook.core.names import as_index


@dataclass(frozen=True)
class Allowed:
    """The values a parameter may take: a number from ``low`` to ``high`` (whole if ``whole``), or a list of them.

    Numpy numbers count as numbers; bools do not. ``low_open`` excludes ``low`` itself;
    ``each`` means a non-empty list every item of which must be such a number;
    ``names`` means a non-empty list of distinct names (task names, say); ``e_g`` is a value
    that fits, shown in errors.
    """

    low: float | None = None
    high: float | None = None
    whole: bool = False
    what: str = "a number"
    each: bool = False
    low_open: bool = False
    names: bool = False
    e_g: Any = None

    def describe(self) -> str:
        if self.names:
            return f"{self.what} (a non-empty list of distinct names)"
        low = f"{'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else ""
        high = f"<= {self.high:g}" if self.high is not None else ""
        return f"{self.what} ({' and '.join(b for b in (low, high) if b) or 'finite'}{', each' if self.each else ''})"

    def admits(self, value: Any) -> bool:
        if self.names:
            return (isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) and v for v in value)
                    and len(set(value)) == len(value))
        if self.each:
            return isinstance(value, (list, tuple)) and len(value) > 0 and all(self._number(v) for v in value)
        return self._number(value)

    def example(self) -> Any:
        """A value that fits, for error messages: ``e_g`` if given, else the lowest allowed (one above if open)."""
        if self.e_g is not None:
            return list(self.e_g) if isinstance(self.e_g, tuple) else self.e_g
        value = 0 if self.low is None else self.low + (1 if self.low_open else 0)
        value = int(value) if self.whole else float(value)
        return [value] if self.each else value

    def _number(self, value: Any) -> bool:
        kind = numbers.Integral if self.whole else numbers.Real
        if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, kind):
            return False
        value = float(value)
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)


# What each run parameter may be, by name. A chapter parameter with a numeric default must be listed
# (tests/test_faults.py checks the book). None stays allowed where a chapter's default is None ("every
# usable item", "repeat until nothing changes"): the CLI passes that on, the library's calls say so.
PARAMETERS: dict[str, Allowed] = {
    "n_prompts": Allowed(1, whole=True, what="a count of prompts"),
    "n_corrupted": Allowed(1, whole=True, what="a count of corrupted prompts"),
    "n_sequence_prompts": Allowed(1, whole=True, what="a count of prompts"),
    "n_shots": Allowed(0, whole=True, what="a count of solved examples"),
    "n_o": Allowed(1, whole=True, what="a count of prompts"),
    "n_random": Allowed(1, whole=True, what="a count of random circuits"),
    "n_key_heads": Allowed(1, whole=True, what="a count of heads"),
    "n_lengths": Allowed(1, whole=True, what="a count of token lengths"),
    "n_members": Allowed(1, whole=True, what="a count of sequence members"),
    "corrupted_repeats": Allowed(1, whole=True, what="a count of corrupted prompts per clean one"),
    "max_rounds": Allowed(1, whole=True, what="a count of pruning rounds"),
    "top_k": Allowed(1, whole=True, what="a count of tokens"),
    "seed": Allowed(0, whole=True, what="a seed"),
    "threshold": Allowed(0, 1, low_open=True, what="a fraction of the full model's score", e_g=0.2),
    "stable_share": Allowed(0, 1, low_open=True, what="a share of draws", e_g=0.6),
    "saturation_threshold": Allowed(0, 1, what="a share of the final probability", e_g=0.5),
    "ratio": Allowed(0, what="a ratio of probabilities", e_g=2.0),
    # Past about 100 the added vector swamps the residual stream, and far past it float32 overflows in the
    # final norm: every logit becomes equal and every token ties.
    "add_scale": Allowed(-100, 100, what="a weight", e_g=1.0),
    "sizes": Allowed(2, whole=True, each=True, what="a list of prompt counts", e_g=(8, 16)),
    "seeds": Allowed(0, whole=True, each=True, what="a list of seeds", e_g=(0, 1, 2)),
    "apart_size": Allowed(2, whole=True, what="a count of prompts (b7: one of its sizes)", e_g=64),
    "tasks": Allowed(names=True, what="a list of task names"),
}


def check(name: str, value: Any, *, argument: str | None = None, none: bool = False,
          known: Collection[str] | None = None) -> Any:
    """``value`` if :data:`PARAMETERS` allows it for ``name`` (numpy numbers as plain int or float), else a one-line error.

    ``argument`` is the name the caller's signature uses, shown in the error (default
    ``name``); ``none`` lets None through (a default meaning "all" or "until done");
    ``known`` lists the names a ``names`` parameter may hold.
    """
    allowed = PARAMETERS[name]
    shown = argument or name
    if value is None and none:
        return None
    if not allowed.admits(value):
        fits = (f"name some of: {', '.join(known)}" if known is not None else "pass a list of names") \
            if allowed.names else f"pass e.g. {shown}={allowed.example()!r}"
        raise MechbookError(f"{shown} = {value!r} is out of range: it must be {allowed.describe()}"
                            f"{' or None' if none else ''}; {fits}")
    if allowed.names:
        unknown = [v for v in value if known is not None and v not in known]
        if unknown:
            raise MechbookError(f"{shown} = {list(value)!r} names unknown {', '.join(map(repr, unknown))}; known: "
                                f"{', '.join(known)}")
        return list(value)
    if allowed.each:
        return [_plain(v, allowed) for v in value]
    return _plain(value, allowed)


def _plain(value: Any, allowed: Allowed) -> int | float:
    return int(value) if allowed.whole else float(value)


def check_count(value, what: str) -> int:
    """A positive whole number (batch sizes, row limits), or a one-line error."""
    value = as_index(value, what)
    if value < 1:
        raise MechbookError(f"{what} must be at least 1, got {value}")
    return value


def chunk_starts(n: int, size: int, what: str = "batch_size") -> range:
    """Start indices of chunks of ``size`` over ``n`` items; a size below 1 is a one-line error naming ``what``."""
    return range(0, n, check_count(size, what))
