"""A pytest plugin: nbval compares printed numbers to the precision a CPU can hold them to.

nbval compares a re-executed cell's output with the committed one as text, so a
float printed as ``3257.370`` on the machine that wrote the outputs and ``3257.368``
on another x86-64 CPU (other SIMD kernels, another thread count: the sums are added in
another order) fails the test although nothing changed. TransformerLens's demo tests
meet the same problem with a regex that rounds floats; here the comparison itself is
made tolerant, and only for numbers:

* The text around the numbers must be identical: a different top token, word, column
  or row count still fails.
* Whole numbers (counts, ranks, layer and head indices, token ids) must be identical.
* A number written with a decimal point or an exponent may differ from the committed
  one by at most ``max(RTOL * |committed|, one unit in its last printed digit)``:
  ``3257.370`` accepts ``3257.368`` (6e-7 relative) but not ``3300``, ``22.628``
  accepts ``22.627`` but not ``22.640``.

nbval's own comparison runs first; this one is consulted only when it fails. Enable
with ``pytest -p mechbook.book.nbval_tolerance`` (``scripts/test.sh`` does).

The plugin also runs the across-models chapter (``c1``) before the other chapters, so
that it checks the committed results of every model, not the ones the other chapters
have just re-published into the test's results folder.
"""

from __future__ import annotations

import math
import re

RTOL = 1e-4
# A number: optional sign, digits with an optional fraction, or a fraction alone, optional exponent.
# Digits inside names (L3H4, blocks.3) are numbers too, and whole numbers must match exactly.
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
FIRST_CHAPTER = "c1_"


def _decimals(text: str) -> int:
    mantissa, _, exponent = text.lower().partition("e")
    places = len(mantissa.partition(".")[2])
    return places - int(exponent or 0)


def numbers_close(committed: str, fresh: str) -> bool:
    """Two printed numbers the same up to float noise (see the module docstring)."""
    if committed == fresh:
        return True
    if not any(c in committed for c in ".eE") or not any(c in fresh for c in ".eE"):
        return False  # a whole number on either side: only the same text matches
    a, b = float(committed), float(fresh)
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    unit = 10.0 ** -_decimals(committed)
    return abs(a - b) <= max(RTOL * abs(a), unit) * (1 + 1e-9)


def outputs_agree(committed: str, fresh: str) -> bool:
    """The same text with every number close (:func:`numbers_close`)."""
    if committed == fresh:
        return True
    if NUMBER.split(committed) != NUMBER.split(fresh):
        return False
    return all(numbers_close(a, b) for a, b in zip(NUMBER.findall(committed), NUMBER.findall(fresh)))


def _flatten(cell, outputs) -> dict[str, list]:
    """nbval's view of a cell's outputs: one list of sanitized values per key (data is flattened by MIME type)."""
    from nbval.plugin import transform_streams_for_comparison

    skip = cell.parent.skip_compare
    flat: dict[str, list] = {}
    for output in transform_streams_for_comparison(outputs):
        for key, value in output.items():
            if key in skip:
                continue
            if key == "data":
                for mime, data in value.items():
                    if mime not in skip:
                        flat.setdefault(mime, []).append(cell.sanitize(data))
            else:
                flat.setdefault(key, []).append(cell.sanitize(value))
    return flat


def tolerant_compare(cell, test, ref) -> bool:
    fresh, committed = _flatten(cell, test), _flatten(cell, ref)
    if fresh.keys() != committed.keys():
        return False
    for key, values in committed.items():
        if len(values) != len(fresh[key]):
            return False
        for a, b in zip(values, fresh[key]):
            if a == b:
                continue
            if not (isinstance(a, str) and isinstance(b, str) and outputs_agree(a, b)):
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
            return True
        if skip_compare is None and tolerant_compare(self, test, ref):
            self.comparison_traceback = []
            return True
        return False  # nbval's report of the first difference stands

    compare_outputs._mechbook_tolerant = True
    IPyNbCell.compare_outputs = compare_outputs


def pytest_collection_modifyitems(session, config, items) -> None:
    """The across-models chapter first, so that it reads the committed results (see the module docstring)."""
    first = [item for item in items if item.fspath.basename.startswith(FIRST_CHAPTER)
             and item.fspath.ext == ".ipynb"]
    if first:
        rest = [item for item in items if item not in first]
        items[:] = first + rest
