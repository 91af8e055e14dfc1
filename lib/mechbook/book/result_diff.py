"""Compare a chapter's freshly published results with the committed ones, file by file.

``scripts/test.sh`` re-executes every chapter, which publishes its results into a copy
of ``results/``; :func:`compare_chapter` says how that copy of one chapter folder
differs from the committed folder, and the test fails on any difference
(:mod:`mechbook.book.nbval_results`). Float noise (another CPU, thread count or SIMD
kernel) must pass; every real change must fail. The rules:

* **Files.** The same set of files. The marker ``_complete.json`` is skipped: it holds
  hashes (which float noise changes) and provenance. Other files compare exactly,
  except the numbers inside them, as below: in JSON, floats follow the float rule
  (with the largest magnitude at the same key as the scale: ``vectors[*].norm``) and
  keys named ``provenance`` or for a timing are skipped; in safetensors, names, dtypes,
  shapes and metadata compare exactly and float tensors follow the float rule (the
  tensor's largest magnitude as the scale).
* **CSV tables.** The same columns in the same order and the same number of rows,
  compared row by row. Each column is one of:

  - *timing* (:data:`TIMING_WORDS` in its name: b7's ``seconds``): not a result, skipped;
  - *text*: compared exactly. Tokens, names, booleans, and the head labels of the papers'
    notation (``4.10``, ``12.0``: columns :data:`LABEL_COLUMNS`, and any value the float
    writer could not have written, such as ``12.0`` for ``%.5g``), so that ``2.1`` never
    passes for ``2.10``;
  - *whole numbers*: counts, layers, head indices, token ids, seeds: exactly. Float noise
    moves a count or a layer only when a value lies within noise of a threshold or a tie;
    that changes what the chapter reports (a circuit edge, a stage's layer), so it fails;
  - *ranks* (a name containing ``rank``: a token's rank in the vocabulary, and medians of
    such ranks): the one kind of whole number that float noise moves routinely. Far
    from the top, tokens' logits lie closer together than the noise in them, so ties
    reorder: rebuilding the book on a fresh clone moved 81 ranks in a1's ``lens.csv``,
    all above 1,000, by at most 2 (0.2%). A rank may move by :data:`RANK_RTOL` (0.5%, 2.5
    times that) of the smaller of the two: ranks below 200 (top-1, top-10 and the
    medians the chapters report; a4's ``layer_rank`` and the positions in
    ``o_top_tokens.csv`` are never larger) stay exact, a rank of 1,000 may move by 5;
  - *floats*: ``|a - b| <= RTOL * |a| + ATOL * scale``, with ``scale`` the column's largest
    finite magnitude (in either file). NaN (an empty cell) equals only NaN, infinities
    only themselves, and a sign flip fails unless both values are within the noise floor
    ``ATOL * scale`` of zero.

:data:`RTOL` (1e-4) covers the rounding to 5 significant digits the tables are written
with: two values a hair apart can print one unit apart in the fifth digit, at most 1e-4 of
the value. :data:`ATOL` (5e-4 of the column's scale) covers cancellation: a value computed
as a difference of larger ones (a4's ``rr_jump``, ``margin_gain``) carries the noise of
the larger ones, and values near zero in a4's ``mlp_effects.csv`` moved by 1e-4 in columns
of order 1; 5e-4 is five times that, and still under 1/1,024, the smallest step of a rate
over up to 1,000 prompts, so one prompt changing in any rate (accuracy, solved fraction,
failure rate) fails.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mechbook.book.results import CSV_FLOAT_FORMAT, MARKER
from mechbook.core.errors import MechbookError

RTOL = 1e-4
ATOL = 5e-4
RANK_RTOL = 5e-3
# Columns holding head labels of the papers' notation (layer.head, or "MLP 3"): text, never decimals.
LABEL_COLUMNS = frozenset({"head", "component", "sender", "receiver"})
# A column or JSON key with one of these words in its name is a timing, not a result.
TIMING_WORDS = frozenset({"second", "seconds", "sec", "secs", "wall", "time", "times", "timing", "duration",
                          "elapsed", "date", "started", "finished", "timestamp"})
PROVENANCE_KEYS = frozenset({"provenance"})
WHOLE = re.compile(r"[-+]?\d+")
PLAIN = re.compile(r"[\w.+-]+")  # shown unquoted in a report
KEY_COLUMNS = 3  # how many identifying columns name a row in a report


@dataclass(frozen=True)
class Difference:
    """One way a fresh file differs from the committed one.

    ``column`` is a CSV column, a JSON key path or a tensor name (None for the whole
    file); ``row`` a CSV row (its index and identifying columns), a tensor element or a
    text line (None when not about one).
    """

    file: str
    column: str | None
    row: str | None
    committed: str
    fresh: str
    why: str

    def __str__(self) -> str:
        where = self.file
        if self.column is not None:
            where += f", column {self.column!r}"
        if self.row is not None:
            where += f", row {self.row}"
        return f"{where}: committed {_show(self.committed)}, fresh {_show(self.fresh)} ({self.why})"


def _show(value: str) -> str:
    """A value as a report shows it: numbers and plain words as they are, other text quoted (' Paris')."""
    return value if PLAIN.fullmatch(value) else repr(value)


def is_timing(name: str) -> bool:
    """Whether a column or key names a timing (wall seconds, a date), which is not a result."""
    return any(word in TIMING_WORDS for word in re.split(r"[^a-z0-9]+", name.lower()))


def is_rank(name: str) -> bool:
    """Whether a column holds ranks of tokens (or medians of them); a reciprocal rank is a float like any other."""
    return "rank" in name.lower() and "reciprocal" not in name.lower()


def _written_as_float(text: str) -> bool:
    """Whether the results' float format writes some float as exactly ``text`` (``12.0`` is not: it is a label)."""
    try:
        return CSV_FLOAT_FORMAT % float(text) == text
    except ValueError:
        return False


def column_kind(name: str, values: list[str]) -> str:
    """``timing``, ``text``, ``whole``, ``rank`` or ``float``: how a CSV column compares (module docstring).

    ``values`` are the column's cells in both files; empty cells (NaN) do not count.
    """
    if is_timing(name):
        return "timing"
    cells = [v for v in values if v != ""]
    if name.lower() in LABEL_COLUMNS or not cells:
        return "text"
    if all(WHOLE.fullmatch(v) for v in cells):
        return "rank" if is_rank(name) else "whole"
    if all(WHOLE.fullmatch(v) or _written_as_float(v) for v in cells):
        return "rank" if is_rank(name) else "float"
    return "text"


def _numbers(cells: pd.Series) -> np.ndarray:
    return np.array([float(v) if v != "" else math.nan for v in cells], dtype=float)


def float_mismatches(committed: np.ndarray, fresh: np.ndarray, scale: float | None = None) -> list[tuple[int, str]]:
    """(position, why) of each pair of floats further apart than float noise (module docstring).

    ``scale`` defaults to the largest finite magnitude in either array.
    """
    a, b = np.asarray(committed, dtype=float).ravel(), np.asarray(fresh, dtype=float).ravel()
    if scale is None:
        finite = np.abs(np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]]))
        scale = float(finite.max()) if finite.size else 0.0
    floor = ATOL * scale
    bad = []
    with np.errstate(invalid="ignore"):
        tol = RTOL * np.abs(a) + floor
        gap = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        close = np.isfinite(a) & np.isfinite(b) & (gap <= tol * (1 + 1e-9))
        flipped = (np.sign(a) * np.sign(b) < 0) & (np.maximum(np.abs(a), np.abs(b)) > floor)
    for i in np.flatnonzero(~same & (~close | flipped)):
        if np.isnan(a[i]) or np.isnan(b[i]):
            why = "a value on one side only (NaN on the other)"
        elif not (np.isfinite(a[i]) and np.isfinite(b[i])):
            why = "an infinity equals only itself"
        elif flipped[i]:
            why = f"sign flip beyond float noise ({floor:.3g}: {ATOL:g} of the largest magnitude {scale:.5g})"
        else:
            why = (f"differs by {gap[i]:.3g}, beyond float noise ({tol[i]:.3g}: {RTOL:g} of the value + {ATOL:g} "
                   f"of the largest magnitude {scale:.5g})")
        bad.append((int(i), why))
    return bad


def rank_mismatches(committed: np.ndarray, fresh: np.ndarray) -> list[tuple[int, str]]:
    """(position, why) of each pair of ranks further apart than :data:`RANK_RTOL` of the smaller one."""
    a, b = np.asarray(committed, dtype=float), np.asarray(fresh, dtype=float)
    bad = []
    for i in range(len(a)):
        x, y = a[i], b[i]
        if x == y or (math.isnan(x) and math.isnan(y)):
            continue
        if math.isnan(x) or math.isnan(y):
            bad.append((i, "a rank on one side only (empty on the other)"))
            continue
        allowed = math.floor(RANK_RTOL * min(abs(x), abs(y)))
        if not abs(x - y) <= allowed:
            bad.append((i, f"rank moved by {abs(x - y):g}, more than the {allowed:g} float noise allows "
                           f"({RANK_RTOL:.1%} of the rank; ranks below {1 / RANK_RTOL:.0f} exactly)"))
    return bad


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def compare_tables(name: str, committed: pd.DataFrame, fresh: pd.DataFrame) -> list[Difference]:
    """How a fresh CSV table (every cell a string, as written) differs from the committed one."""
    diffs = []
    old_cols, new_cols = list(committed.columns), list(fresh.columns)
    for col in old_cols:
        if col not in new_cols:
            diffs.append(Difference(name, col, None, "present", "missing", "the column is gone"))
    for col in new_cols:
        if col not in old_cols:
            diffs.append(Difference(name, col, None, "missing", "present", "a column the committed table lacks"))
    shared = [c for c in old_cols if c in new_cols]
    if not diffs and old_cols != new_cols:
        diffs.append(Difference(name, None, None, ", ".join(old_cols), ", ".join(new_cols), "columns in another order"))
    if len(committed) != len(fresh):
        diffs.append(Difference(name, None, None, f"{len(committed)} rows", f"{len(fresh)} rows",
                                "another number of rows"))
        return diffs
    kinds = {c: column_kind(c, [*committed[c], *fresh[c]]) for c in shared}
    keys = [c for c in old_cols if kinds.get(c) in ("text", "whole")][:KEY_COLUMNS]

    def row(i: int) -> str:
        label = ", ".join(f"{k}={_show(_short(committed[k].iat[i]))}" for k in keys)
        return f"{i} ({label})" if label else str(i)

    for col in shared:
        old, new = committed[col], fresh[col]
        if kinds[col] == "timing":
            continue
        if kinds[col] in ("text", "whole"):
            why = "text must be equal" if kinds[col] == "text" else "whole numbers must be equal"
            bad = [(int(i), why) for i in np.flatnonzero(old.to_numpy() != new.to_numpy())]
        elif kinds[col] == "rank":
            bad = rank_mismatches(_numbers(old), _numbers(new))
        else:
            bad = float_mismatches(_numbers(old), _numbers(new))
        diffs += [Difference(name, col, row(i), old.iat[i], new.iat[i], why) for i, why in bad]
    return diffs


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_floats(value: Any, path: str, found: dict[str, list[float]]) -> None:
    """Every float in a JSON value, grouped by key path with list positions as ``[*]`` (a float's scale)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _json_floats(v, f"{path}.{k}" if path else k, found)
    elif isinstance(value, list):
        for v in value:
            _json_floats(v, f"{path}[*]", found)
    elif isinstance(value, float) and math.isfinite(value):
        found.setdefault(path, []).append(abs(value))


def compare_json(name: str, committed: Any, fresh: Any) -> list[Difference]:
    """How a fresh JSON value differs from the committed one: floats within float noise, all else exactly."""
    floats: dict[str, list[float]] = {}
    _json_floats(committed, "", floats)
    _json_floats(fresh, "", floats)
    scales = {path: max(values) for path, values in floats.items()}
    diffs: list[Difference] = []

    def walk(a: Any, b: Any, path: str, pattern: str) -> None:
        here = path or "(top level)"
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a.keys() | b.keys(), key=str):
                if k in PROVENANCE_KEYS or is_timing(str(k)):
                    continue
                sub, sub_pattern = (f"{path}.{k}" if path else k), (f"{pattern}.{k}" if pattern else k)
                if k not in b:
                    diffs.append(Difference(name, sub, None, json.dumps(a[k])[:80], "missing", "the key is gone"))
                elif k not in a:
                    diffs.append(Difference(name, sub, None, "missing", json.dumps(b[k])[:80], "a new key"))
                else:
                    walk(a[k], b[k], sub, sub_pattern)
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                diffs.append(Difference(name, here, None, f"{len(a)} items", f"{len(b)} items",
                                        "another number of items"))
                return
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]", f"{pattern}[*]")
        elif _is_number(a) and _is_number(b) and (isinstance(a, float) or isinstance(b, float)):
            for _, why in float_mismatches(np.array([a]), np.array([b]), scales.get(pattern, 0.0)):
                diffs.append(Difference(name, here, None, json.dumps(a), json.dumps(b), why))
        elif type(a) is not type(b) or a != b:
            diffs.append(Difference(name, here, None, json.dumps(a)[:80], json.dumps(b)[:80], "must be equal"))

    walk(committed, fresh, "", "")
    return diffs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_safetensors(name: str, committed: Path, fresh: Path) -> list[Difference]:
    """Names, dtypes, shapes and metadata exactly; float tensors within float noise, others exactly."""
    from safetensors import safe_open

    diffs = []
    with safe_open(str(committed), framework="pt") as old, safe_open(str(fresh), framework="pt") as new:
        if old.metadata() != new.metadata():
            diffs.append(Difference(name, "(metadata)", None, json.dumps(old.metadata()), json.dumps(new.metadata()),
                                    "metadata must be equal"))
        old_keys, new_keys = set(old.keys()), set(new.keys())
        for key in sorted(old_keys ^ new_keys):
            diffs.append(Difference(name, key, None, "present" if key in old_keys else "missing",
                                    "present" if key in new_keys else "missing", "another set of tensors"))
        for key in sorted(old_keys & new_keys):
            a, b = old.get_tensor(key), new.get_tensor(key)
            if a.dtype != b.dtype or a.shape != b.shape:
                diffs.append(Difference(name, key, None, f"{a.dtype} {tuple(a.shape)}", f"{b.dtype} {tuple(b.shape)}",
                                        "dtype and shape must be equal"))
                continue
            x, y = a.double().numpy(), b.double().numpy()
            if a.is_floating_point():
                bad = float_mismatches(x, y)
            else:
                bad = [(int(i), "whole numbers must be equal") for i in np.flatnonzero(x.ravel() != y.ravel())]
            for i, why in bad:
                where = str(tuple(int(j) for j in np.unravel_index(i, x.shape)))
                diffs.append(Difference(name, key, where, f"{x.ravel()[i]:.8g}", f"{y.ravel()[i]:.8g}", why))
    return diffs


def compare_file(name: str, committed: Path, fresh: Path) -> list[Difference]:
    """How one fresh file differs from the committed one, by its kind (CSV, JSON, safetensors, other)."""
    suffix = committed.suffix.lower()
    if suffix == ".csv":
        return compare_tables(name, _read_csv(committed), _read_csv(fresh))
    if suffix == ".json":
        try:
            old, new = json.loads(committed.read_text()), json.loads(fresh.read_text())
        except ValueError:
            pass  # not JSON after all: compared as text below
        else:
            return compare_json(name, old, new)
    if suffix == ".safetensors":
        return compare_safetensors(name, committed, fresh)
    old_bytes, new_bytes = committed.read_bytes(), fresh.read_bytes()
    if old_bytes == new_bytes:
        return []
    try:
        old_lines, new_lines = old_bytes.decode().splitlines(), new_bytes.decode().splitlines()
    except UnicodeDecodeError:
        return [Difference(name, None, None, f"{len(old_bytes)} bytes", f"{len(new_bytes)} bytes",
                           "binary files must be equal")]
    for i, (a, b) in enumerate(zip(old_lines, new_lines)):
        if a != b:
            return [Difference(name, None, f"line {i + 1}", a, b, "text files must be equal")]
    return [Difference(name, None, None, f"{len(old_lines)} lines", f"{len(new_lines)} lines",
                       "another number of lines")]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MARKER}


def compare_chapter(committed: str | Path, fresh: str | Path) -> list[Difference]:
    """Every difference between a freshly published chapter folder and the committed one (module docstring).

    An empty list means the fresh results equal the committed ones up to float noise.
    """
    committed, fresh = Path(committed), Path(fresh)
    if not fresh.is_dir():
        raise MechbookError(f"{fresh} is not a chapter's results folder; pass the folder the chapter published")
    if not committed.is_dir():
        return [Difference(".", None, None, "missing", "present",
                           f"{committed} is not committed: commit the chapter's results")]
    old, new = _files(committed), _files(fresh)
    diffs = [Difference(f, None, None, "present", "missing", "the chapter no longer writes it")
             for f in sorted(old - new)]
    diffs += [Difference(f, None, None, "missing", "present", "the committed results have no such file")
              for f in sorted(new - old)]
    for f in sorted(old & new):
        diffs += compare_file(f, committed / f, fresh / f)
    return diffs
