"""Sphinx extension: a copy of every model's saved results in the built book, for download.

Each chapter's provenance box (:func:`mechbook.book.provenance.box`) links to the files
its run saved, as ``../results/<model>/<chapter>/<file>`` from the chapter's page in
``book/``. After an HTML build this extension copies the results folder
(:func:`mechbook.book.results.default_root`: ``results/`` at the project root, or
``$MECHBOOK_RESULTS``) to ``<html>/results/``, so that the links work on a server and
from the files on disk alike. Hidden folders (runs being published) are left out.

Listed in ``_config.yml`` under ``sphinx.config.extensions`` as ``mechbook.book.site_results``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

SITE_FOLDER = "results"  # <html>/results/ sits beside <html>/book/, as results/ sits beside book/


def results_files(root: Path) -> list[Path]:
    """Every file under ``root`` outside hidden files and folders and searches' checkpoints, relative to ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") or part == "_checkpoints"
                                             for part in p.relative_to(root).parts))


def copy_results(root: Path, outdir: Path) -> int:
    """Copy the results under ``root`` to ``outdir/results``; returns the number of files copied."""
    files = results_files(root)
    for relative in files:
        target = outdir / SITE_FOLDER / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, target)
    return len(files)


def _build_finished(app: Any, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    from mechbook.book.results import default_root

    copy_results(default_root(app.srcdir), Path(app.outdir))


def setup(app: Any) -> dict[str, Any]:
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
