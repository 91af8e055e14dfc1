"""Intervals over prompts for rates and scores, and whether a reported number lies inside one."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from mechbook.core.errors import MechbookError

Z95 = 1.96  # the standard normal's 97.5% quantile, to two decimals: the value the committed results use


def _count(value, what: str) -> int:
    """A whole count (numpy integers too; bools and floats refused, as 2.5 successes is no count)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        hint = "; pass e.g. int(correct.sum())" if what in ("successes", "n") else ""
        raise MechbookError(f"{what} must be a whole number, got {value!r}{hint}")
    return int(value)


def _z(z) -> float:
    if isinstance(z, bool) or not isinstance(z, numbers.Real) or not math.isfinite(z) or z <= 0:
        raise MechbookError(f"z must be a positive quantile of the normal distribution, got {z!r}; e.g. z=1.96 for 95%")
    return float(z)


def _real(value, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise MechbookError(f"{what} must be a number, got {value!r}")
    return float(value)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible for small n and for 0 or n successes).

    ``(nan, nan)`` for ``n == 0``.
    """
    successes, n, z = _count(successes, "successes"), _count(n, "n"), _z(z)
    if n < 0 or not 0 <= successes <= n:
        raise MechbookError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}; "
                            "pass the count of successes and the number of trials")
    if n == 0:
        return (np.nan, np.nan)
    p = successes / n
    denom = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return (float(center - half), float(center + half))


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of ``k1/n1 - k2/n2``: Newcombe's hybrid score interval (his method 10, 1998).

    It combines the two Wilson intervals; for the same items measured twice (paired)
    it is conservative, i.e. at least as wide as a paired interval. ``(nan, nan)`` when
    either total is 0, as :func:`wilson_interval` gives for it: a proportion of no trials
    is undefined, and so is its difference from another (:func:`verdict` reads it as
    "cannot tell").
    """
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    if n1 == 0 or n2 == 0:
        return (np.nan, np.nan)
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold here", "cannot tell"
WIDEST = 0.5  # an interval at least this wide (on a 0-1 scale) cannot tell a reported number from most others


def verdict(paper: float, low: float, high: float, *, widest: float = WIDEST) -> str:
    """Whether a reported number ``paper`` lies inside our 95% interval.

    "holds" if it does, "does not hold here" if it does not, and "cannot tell" when
    there is no interval or it is ``widest`` or wider.
    """
    paper, low, high = _real(paper, "paper"), _real(low, "low"), _real(high, "high")
    widest = _real(widest, "widest")
    if not widest > 0:
        raise MechbookError(f"widest must be a positive width on the 0-1 scale, got {widest!r}; e.g. the default {WIDEST}")
    if low > high:
        raise MechbookError(f"the interval ({low:.4g}, {high:.4g}) has its low end above its high end; pass "
                            "verdict(paper, low, high)")
    if not all(np.isfinite([paper, low, high])) or high - low >= widest:
        return CANNOT_TELL
    return HOLDS if low <= paper <= high else DOES_NOT_HOLD


def bootstrap_ratio_interval(numerator: np.ndarray, denominator: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``100 x mean(numerator) / mean(denominator)`` over prompts.

    A circuit's score is such a ratio: per prompt, the metric with everything outside
    the circuit mean-ablated (numerator) and the full model's metric (denominator).
    Prompts are resampled with replacement, the same prompts for both means (they are
    paired); ``n_boot`` resamples from ``seed``. ``(nan, nan)`` for fewer than 2 prompts.
    """
    try:
        num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    except (TypeError, ValueError):
        raise MechbookError(f"numerator and denominator must be numbers per prompt, got {type(numerator).__name__} "
                            f"and {type(denominator).__name__}") from None
    if num.shape != den.shape or num.ndim != 1:
        raise MechbookError(f"numerator and denominator must be 1-d and paired, got {num.shape} and {den.shape}")
    n_boot, seed = _count(n_boot, "n_boot"), _count(seed, "seed")
    level = _real(level, "level")
    if not 0 < level < 1 or n_boot < 1 or seed < 0:
        raise MechbookError(f"level must lie in (0, 1), n_boot be at least 1 and seed at least 0, got {level}, "
                            f"{n_boot} and {seed}")
    if not (np.isfinite(num).all() and np.isfinite(den).all()):
        raise MechbookError("numerator or denominator holds NaN or inf; check the per-prompt metrics that made them")
    if len(den) and not den.mean() > 0:
        raise MechbookError(f"the denominator's mean is {den.mean():.4g}, not positive, so a ratio in percent of it "
                            "means nothing; check that the full model solves these prompts")
    if len(num) < 2:
        return (np.nan, np.nan)
    picks = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    ratios = 100.0 * num[picks].mean(1) / den[picks].mean(1)
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return (float(low), float(high))


def jaccard(a, b) -> float:
    """|a & b| / |a | b| of two sets (1.0 when both are empty: nothing to disagree on)."""
    try:
        a, b = set(a), set(b)
    except TypeError:
        raise MechbookError(f"jaccard compares two collections (sets, lists of labels), got {type(a).__name__} and "
                            f"{type(b).__name__}") from None
    return 1.0 if not a | b else len(a & b) / len(a | b)


@contextmanager
def seeded_numpy(seed: int = 0) -> Iterator[None]:
    """numpy's global generator seeded for the ``with`` block, and the caller's state restored after.

    For libraries that draw from it (seaborn's stripplot jitter and its bootstrap of error
    bars): inside the block they give the same result on every run.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
