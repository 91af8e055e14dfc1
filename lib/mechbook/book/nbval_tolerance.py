"""A pytest plugin: nbval passes float noise in printed outputs and fails every real change.

nbval compares a re-executed cell's output with the committed one as text, so a float
printed as ``3257.3701`` on the machine that wrote the outputs and ``3257.3684`` on
another x86-64 CPU (other SIMD kernels, another thread count: sums are added in another
order) fails the test although nothing changed. Here the comparison is made tolerant,
and only for floats that are printed as floats:

* The text around the numbers must be identical: a different top token, word, column,
  row count or sign character still fails.
* Identities compare exactly. A whole number is one (counts, ranks, layer and head
  indices, token ids), also before a full stop: ``246.`` ends a sentence, it is not the
  float 246.0. So is a dotted version (``2.13.0``: three or more dotted parts), any
  digit inside a word or a dotted name (``L3H4``, ``blocks.3``) and any number with
  fewer than :data:`MIN_DIGITS` significant digits: a head label such as ``4.10`` (head
  10 of layer 4, the papers' notation) or ``12.0`` is never read as a decimal, nor are
  coarse numbers such as ``0.5``, ``12.5%`` or ``(0.81, 0.93)``.
* A float with at least :data:`MIN_DIGITS` significant digits on both sides (``3257.3701``,
  ``0.12346``, ``1.2346e-05``, a zero written ``0.0000``) may differ from the committed
  one by at most ``RTOL * max(|committed|, |fresh|) + ATOL``, and keeps its sign unless
  both are within ``ATOL`` of zero. There is no "one unit in the last digit" clause:
  how coarsely a number is printed never widens what it accepts.

The constants:

* :data:`MIN_DIGITS` = 5. Layer and head indices stay below 100, so a head label has at
  most 4 digits; a float printed with 5 significant digits (the book's rule, STYLE.md:
  "float noise touches only its last digit") has a last digit worth at most 1e-4 of its
  value, so a rounding flip caused by noise stays within ``RTOL``.
* :data:`RTOL` = 1e-4, the project's float-noise figure. The models run in float32
  (eps 1.2e-7); summing hundreds to thousands of terms in another order moves a result
  by about 1e-6 relative, and differences of nearby values (logit differences, effects
  of an ablation) and logs of small probabilities magnify that by up to about 100.
  Anything larger is a real change.
* :data:`ATOL` = 1e-6, the floor for values that are zero in exact arithmetic. Such a
  value, computed in float32 from terms of order one (probabilities, fractions, cosines,
  normalized effects), comes out as a few float32 eps times the square root of the
  number of terms: well under 1e-6. It is small enough that no printed quantity of the
  book's scale (a probability of 1e-4, an effect of 1e-3) can move and still pass.

DataFrames are shown rounded to 3 decimals, for the reader. Their display carries the
frame's unrounded content in the output's metadata (:mod:`mechbook.book.tables`), and
the check reads it: every table a committed cell shows with its content must come back
with content that agrees (labels, text and whole numbers exactly, floats by the rule
above without a digit count, as the values are unrounded, and with the floor at zero
widened to ``RTOL`` times the column's largest magnitude: a cell near zero in a column
of large values is computed from terms of that size and carries their absolute noise),
even where the rounded text is identical. When a table's rounded text (HTML or plain)
differs, it passes only if both outputs carry the content, the two texts differ only in
numbers, and the contents agree. A committed table without that metadata is compared by
the text rule alone.

nbval's own comparison runs first; the text rule is consulted only when it fails (nbval's
report of the first difference stands when both fail), and the tables' content is read
after either passes (a failure names the table, row, column and both values). Enable with
``pytest -p mechbook.book.nbval_tolerance`` (``scripts/test.sh`` does).

The plugin also runs the across-models chapter (``c1``) before the other chapters, so
that it checks the committed results of every model, not the ones the other chapters
have just re-published into the test's results folder.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mechbook.book.tables import METADATA_KEY

RTOL = 1e-4
ATOL = 1e-6
MIN_DIGITS = 5
# A number token, never inside a word or a dotted name (the lookarounds): a dotted version
# (three or more parts), a float (digits on both sides of the point, optional exponent, or
# digits with an exponent), or a whole number. A full stop after digits is punctuation.
NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?:\d+(?:\.\d+){2,}"
    r"|[-+]?\d+\.\d+(?:[eE][-+]?\d+)?"
    r"|[-+]?\d+[eE][-+]?\d+"
    r"|[-+]?\d+)"
    r"(?![\w]|\.\d)"
)
FLOAT = re.compile(r"[-+]?(?:\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)")
FIRST_CHAPTER = "c1_"


def significant_digits(text: str) -> int:
    """Significant digits of a printed float: its mantissa's digits after leading zeros.

    A zero (``0.0000``) counts all its digits: it is printed to that resolution.
    """
    digits = re.sub(r"\D", "", text.lower().partition("e")[0])
    return len(digits.lstrip("0")) or len(digits)


def values_close(committed: float, fresh: float, scale: float = 0.0) -> bool:
    """Two floats the same up to float noise: ``RTOL`` relative, ``ATOL`` at zero, same sign.

    ``scale`` (a table column's largest magnitude) widens the floor at zero to
    ``RTOL * scale + ATOL``: a cell near zero in a column of large values is computed from
    terms of that size, and carries their absolute noise.
    """
    if not (math.isfinite(committed) and math.isfinite(fresh)):
        return committed == fresh or (math.isnan(committed) and math.isnan(fresh))
    floor = RTOL * scale + ATOL
    if max(abs(committed), abs(fresh)) > floor and (committed < 0) != (fresh < 0):
        return False
    return abs(committed - fresh) <= (RTOL * max(abs(committed), abs(fresh)) + floor) * (1 + 1e-9)


def is_float(text: str) -> bool:
    """A number token printed as a float with enough digits to be compared within noise."""
    return FLOAT.fullmatch(text) is not None and significant_digits(text) >= MIN_DIGITS


def numbers_close(committed: str, fresh: str) -> bool:
    """Two printed number tokens the same up to float noise (see the module docstring)."""
    if committed == fresh:
        return True
    if not (is_float(committed) and is_float(fresh)):
        return False  # an identity (whole number, label, version, coarse number): exact only
    return values_close(float(committed), float(fresh))


def same_skeleton(committed: str, fresh: str) -> bool:
    """The same text once every number token is taken out (same words, same number of numbers)."""
    return NUMBER.split(committed) == NUMBER.split(fresh)


def outputs_agree(committed: str, fresh: str) -> bool:
    """The same text with every number close (:func:`numbers_close`)."""
    if committed == fresh:
        return True
    if not same_skeleton(committed, fresh):
        return False
    return all(numbers_close(a, b) for a, b in zip(NUMBER.findall(committed), NUMBER.findall(fresh)))


def cells_agree(committed: Any, fresh: Any, scale: float = 0.0, *, text: bool = False) -> bool:
    """Two unrounded table cells or labels (JSON values): floats within noise, all else exactly.

    With ``text``, a cell holding text is read by the printed-text rule (:func:`outputs_agree`):
    a chapter that formats numbers into a cell ("-4.0010 ± 6.8051", "'Paris' 0.028890") prints
    them with 5 or more significant digits, which may move by float noise; the words and
    labels around them compare exactly. Labels (index and columns) are never read so.
    """
    if isinstance(committed, list) and isinstance(fresh, list):
        return len(committed) == len(fresh) and all(cells_agree(a, b, scale, text=text)
                                                    for a, b in zip(committed, fresh))
    if type(committed) is float and type(fresh) is float:
        return values_close(committed, fresh, scale)
    if text and type(committed) is str and type(fresh) is str:
        return outputs_agree(committed, fresh)
    return type(committed) is type(fresh) and committed == fresh


def _column_scales(rows: list) -> list[float]:
    """Per column, the largest finite float magnitude in it (0 for a column without floats)."""
    width = max((len(row) for row in rows), default=0)
    return [max((abs(row[j]) for row in rows if j < len(row) and type(row[j]) is float
                 and math.isfinite(row[j])), default=0.0) for j in range(width)]


def table_difference(committed: dict, fresh: dict) -> str | None:
    """The first difference between two :func:`mechbook.book.tables.table_content` records, or None.

    Labels and names compare exactly, cells by :func:`cells_agree`, each float judged
    against its column's scale (the committed column's largest magnitude); the answer
    names the row and column and both values.
    """
    for key in ("index_names", "column_names", "index", "columns"):
        if not cells_agree(committed.get(key), fresh.get(key)):
            return f"the table's {key.replace('_', ' ')} differ: committed {committed.get(key)}, now {fresh.get(key)}"
    rows_a, rows_b = committed.get("data"), fresh.get("data")
    if not (isinstance(rows_a, list) and isinstance(rows_b, list) and len(rows_a) == len(rows_b)):
        return "the table's shape differs"
    scales = _column_scales(rows_a)
    for label, row_a, row_b in zip(committed["index"], rows_a, rows_b):
        if len(row_a) != len(row_b):
            return "the table's shape differs"
        for column, scale, a, b in zip(committed["columns"], scales, row_a, row_b):
            if not cells_agree(a, b, scale, text=True):
                return f"table row {label!r}, column {column!r}: committed {a!r}, now {b!r}"
    return None


def tables_agree(committed: dict, fresh: dict) -> bool:
    """Two :func:`mechbook.book.tables.table_content` records: the same labels and cells up to float noise."""
    return table_difference(committed, fresh) is None


def tables_differ(test, ref) -> str | None:
    """Where a cell's tables (unrounded, from the outputs' metadata) differ beyond float noise, or None.

    Read even when the rounded text is identical: a change that rounding hides is still a
    change. Only when the committed outputs carry tables: older outputs have none.
    """
    committed = [table for table in map(table_of, ref) if table is not None]
    if not committed:
        return None
    fresh = [table for table in map(table_of, test) if table is not None]
    if len(fresh) != len(committed):
        return f"the cell shows {len(fresh)} tables with their content, the committed outputs {len(committed)}"
    for number, (a, b) in enumerate(zip(committed, fresh), start=1):
        problem = table_difference(a, b)
        if problem:
            return f"table {number} of the cell: {problem}"
    return None


def table_of(output) -> dict | None:
    """The unrounded table a display output carries in its metadata, if any."""
    metadata = output.get("metadata") or {}
    for value in metadata.values():
        if isinstance(value, dict) and isinstance(value.get(METADATA_KEY), dict):
            return value[METADATA_KEY]
    return None


def _flatten(cell, outputs) -> dict[str, list]:
    """nbval's view of a cell's outputs, one list of (sanitized value, table) per key.

    Data is flattened by MIME type as nbval does; each value keeps the unrounded table
    its output carries (None for streams and other outputs).
    """
    from nbval.plugin import transform_streams_for_comparison

    skip = cell.parent.skip_compare
    flat: dict[str, list] = {}
    for output in transform_streams_for_comparison(outputs):
        table = table_of(output)
        for key, value in output.items():
            if key in skip:
                continue
            if key == "data":
                for mime, data in value.items():
                    if mime not in skip:
                        flat.setdefault(mime, []).append((cell.sanitize(data), table))
            else:
                flat.setdefault(key, []).append((cell.sanitize(value), table))
    return flat


def values_agree(committed: Any, fresh: Any, committed_table: dict | None, fresh_table: dict | None) -> bool:
    """One output value: the same, close by the text rule, or a table whose unrounded content agrees."""
    if committed == fresh:
        return True
    if not (isinstance(committed, str) and isinstance(fresh, str)):
        return False
    if outputs_agree(committed, fresh):
        return True
    return (committed_table is not None and fresh_table is not None and same_skeleton(committed, fresh)
            and tables_agree(committed_table, fresh_table))


def tolerant_compare(cell, test, ref) -> bool:
    fresh, committed = _flatten(cell, test), _flatten(cell, ref)
    if fresh.keys() != committed.keys():
        return False
    for key, values in committed.items():
        if len(values) != len(fresh[key]):
            return False
        for (a, table_a), (b, table_b) in zip(values, fresh[key]):
            if not values_agree(a, b, table_a, table_b):
                return False
    return True


def pytest_configure(config) -> None:
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to make tolerant
        return
    if getattr(IPyNbCell.compare_outputs, "_mechbook_tolerant", False):
        return
    exact = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        if exact(self, test, ref, skip_compare):
            agree = True
        elif skip_compare is None and tolerant_compare(self, test, ref):
            agree = True
        else:
            return False  # nbval's report of the first difference stands
        problem = tables_differ(test, ref) if skip_compare is None else None
        if problem:
            self.comparison_traceback = [problem]
            return False
        self.comparison_traceback = []
        return agree

    compare_outputs._mechbook_tolerant = True
    IPyNbCell.compare_outputs = compare_outputs


def pytest_collection_modifyitems(session, config, items) -> None:
    """The across-models chapter first, so that it reads the committed results (see the module docstring)."""
    first = [item for item in items if item.fspath.basename.startswith(FIRST_CHAPTER)
             and item.fspath.ext == ".ipynb"]
    if first:
        rest = [item for item in items if item not in first]
        items[:] = first + rest
