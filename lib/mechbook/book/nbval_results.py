"""A pytest plugin: what each re-executed chapter publishes must equal the committed results.

With ``$MECHBOOK_RESULTS`` set (``scripts/test.sh`` points it at a temporary copy of
``results/``), every chapter nbval re-executes publishes its results there. The plugin
adds one item after the last cell of each notebook, ``<notebook>::published results``,
which compares every ``<model>/<chapter>`` folder whose ``_complete.json`` changed
while the notebook ran (the chapter re-published it) with the committed folder under
the repository's ``results/`` (:func:`mechbook.book.result_diff.compare_chapter`: float
noise passes, every real change fails) and fails naming each difference: file,
column, row and both values. A notebook that ran every cell without error but
re-published none of its committed results fails too.

Enable with ``pytest -p mechbook.book.nbval_results`` (``scripts/test.sh`` does). Without
``$MECHBOOK_RESULTS`` it adds nothing: the chapters then publish into ``results/`` itself,
and there is no separate copy to compare.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest

from mechbook.book.result_diff import Difference, compare_chapter
from mechbook.book.results import CHAPTER_FOLDER, MARKER, RESULTS_ENV

SHOWN = 25  # differences listed in a failure; the rest are counted by file and column
ITEM_NAME = "published results"


def marker_fingerprints(root: Path) -> dict[str, tuple]:
    """``<model>/<chapter>`` -> what identifies its marker file: a re-published chapter changes it."""
    found = {}
    for marker in root.glob(f"*/*/{MARKER}"):
        folder = marker.parent
        if folder.name.startswith(".") or folder.parent.name.startswith("."):
            continue
        try:
            stat = marker.stat()
            digest = hashlib.sha256(marker.read_bytes()).hexdigest()
        except OSError:  # being replaced right now
            continue
        found[f"{folder.parent.name}/{folder.name}"] = (stat.st_ino, stat.st_mtime_ns, digest)
    return found


def committed_root(notebook: Path) -> Path:
    """The repository's ``results/``: beside the ``_toc.yml`` above the notebook."""
    for folder in notebook.resolve().parents:
        if (folder / "_toc.yml").is_file():
            return folder / "results"
    return notebook.resolve().parent.parent / "results"


class ResultsDiffer(Exception):
    """A chapter's fresh results differ from the committed ones; the message lists how."""


class PublishedResults(pytest.Item):
    """Compares what one notebook published with the committed results (module docstring)."""

    def __init__(self, *, n_cells: int, fresh_root: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fresh_root = fresh_root  # $MECHBOOK_RESULTS
        self.n_cells = n_cells  # cells of the notebook selected for this run
        self.before: dict[str, tuple] | None = None  # marker fingerprints when its first cell started
        self.failed: list[str] = []  # cells that failed

    def runtest(self) -> None:
        fresh_root = self.fresh_root
        committed = committed_root(self.path)
        if committed.resolve() == fresh_root.resolve():
            pytest.skip(f"{RESULTS_ENV} is the committed results folder: nothing to compare the chapter's "
                        "results with")
        if self.before is None:
            pytest.skip("the notebook's first cell did not run: cannot tell what it published")
        after = marker_fingerprints(fresh_root)
        changed = sorted(k for k, v in after.items() if self.before.get(k) != v)
        if not changed:
            self._published_nothing(committed)
            return
        report = []
        for folder in changed:
            diffs = compare_chapter(committed / folder, fresh_root / folder)
            if diffs:
                report.append(_describe(folder, committed / folder, diffs))
        if report:
            chapter = CHAPTER_FOLDER.match(self.path.stem)
            rerun = f"python -m mechbook refresh --chapters {chapter['key'] if chapter else self.path.stem}"
            raise ResultsDiffer(f"{self.path.name} published results that differ from the committed ones:\n"
                                + "\n".join(report) + f"\nIf the change is meant, re-execute the chapter ({rerun}; "
                                f"on another model: python -m mechbook run) and commit results/.")

    def _published_nothing(self, committed: Path) -> None:
        if self.failed:
            pytest.skip(f"{len(self.failed)} cell(s) failed and nothing was re-published: no results to compare")
        if self.n_cells < _code_cells(self.parent):
            pytest.skip("only some cells of the notebook ran: no results to compare")
        mine = sorted(p.relative_to(committed).as_posix() for p in committed.glob(f"*/{self.path.stem}")
                      if p.is_dir() and not p.parent.name.startswith("_"))
        if mine:
            raise ResultsDiffer(f"{self.path.name} ran every cell but re-published none of its committed results "
                                f"({', '.join(mine)}): it no longer publishes them, or publishes them elsewhere")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ResultsDiffer):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{ITEM_NAME} of {self.path.stem}"  # no '.': pytest would show it as '::'


def _describe(folder: str, committed: Path, diffs: list[Difference]) -> str:
    """A failure's paragraph for one chapter folder: the first differences, then the rest counted."""
    lines = [f"{folder}: {len(diffs)} difference(s) from {committed}"]
    lines += [f"  {d}" for d in diffs[:SHOWN]]
    if len(diffs) > SHOWN:
        rest = Counter((d.file, d.column) for d in diffs[SHOWN:])
        counted = ", ".join(f"{f} {c!r}: {n}" if c else f"{f}: {n}" for (f, c), n in rest.most_common())
        lines.append(f"  ... and {len(diffs) - SHOWN} more ({counted})")
    return "\n".join(lines)


def _code_cells(notebook) -> int:
    return sum(cell.cell_type == "code" for cell in getattr(notebook, "nb", {"cells": []})["cells"])


class _Plugin:
    """The hooks, registered only when ``$MECHBOOK_RESULTS`` is set."""

    def __init__(self, fresh_root: Path) -> None:
        self.fresh_root = fresh_root
        self.checks: dict[str, PublishedResults] = {}  # nodeid of a notebook's cell -> the item after the notebook

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        """One ``published results`` item after the last selected cell of each notebook, in the final order."""
        try:
            from nbval.plugin import IPyNbFile
        except ImportError:
            return
        cells: dict[object, list] = {}
        for item in items:
            if isinstance(item.parent, IPyNbFile):
                cells.setdefault(item.parent, []).append(item)
        after_last = {}
        for notebook, its_cells in cells.items():
            check = PublishedResults.from_parent(notebook, name=ITEM_NAME, n_cells=len(its_cells),
                                                 fresh_root=self.fresh_root)
            self.checks.update((cell.nodeid, check) for cell in its_cells)
            after_last[its_cells[-1].nodeid] = check
        ordered = []
        for item in items:
            ordered.append(item)
            if item.nodeid in after_last:
                ordered.append(after_last[item.nodeid])
        items[:] = ordered

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item) -> None:
        """At a notebook's first cell, note which results exist and how (what it re-publishes changes them)."""
        check = self.checks.get(item.nodeid)
        if check is not None and check.before is None:
            check.before = marker_fingerprints(self.fresh_root)

    def pytest_runtest_logreport(self, report) -> None:
        """Note the notebook's cells that failed."""
        check = self.checks.get(report.nodeid)
        if check is not None and report.failed:
            check.failed.append(report.nodeid)


def pytest_configure(config) -> None:
    fresh = os.environ.get(RESULTS_ENV)
    if fresh:
        config.pluginmanager.register(_Plugin(Path(fresh)), "mechbook-nbval-results")
