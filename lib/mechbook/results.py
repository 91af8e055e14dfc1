"""Tidy results a chapter writes for other chapters (and other people) to read.

Each chapter writes its key tables under ``<root>/<model>/<chapter>/`` as CSV or
JSON. Files go to a staging folder first and the folder is swapped into place by
:meth:`ChapterResults.finish`, so a chapter that dies halfway leaves the previous
complete results untouched and never a half-written set. A ``_complete.json``
marker, written last, records the model, chapter, library version and files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from mechbook.errors import MechbookError

RESULTS_ENV = "MECHBOOK_RESULTS"
MARKER = "_complete.json"
FORMAT = 1


def safe_name(model_name: str) -> str:
    """A model name usable as a folder name (hub ids contain '/')."""
    return model_name.replace("/", "--")


def default_root() -> Path:
    """``$MECHBOOK_RESULTS``, else ``results/`` at the repository root (found from the cwd)."""
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").exists():
            return folder / "results"
    return here / "results"


class ChapterResults:
    """Collects one chapter's tables for one model and publishes them atomically."""

    def __init__(self, chapter: str, model_name: str, root: str | Path | None = None) -> None:
        self.chapter = chapter
        self.model_name = model_name
        self.root = Path(root) if root else default_root()
        self.final = self.root / safe_name(model_name) / chapter
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix=f".{chapter}.", dir=self.final.parent))
        self.written: list[str] = []

    def save(self, name: str, data: pd.DataFrame | dict | list) -> Path:
        """Stage a table (CSV) or a JSON-able object under ``name``."""
        if isinstance(data, pd.DataFrame):
            path = self._staging / f"{name}.csv"
            data.to_csv(path, index=False)
        else:
            path = self._staging / f"{name}.json"
            path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
        self.written.append(path.name)
        return self.final / path.name

    def finish(self) -> Path:
        """Publish the staged files as the chapter's complete results."""
        from mechbook import __version__

        # No timestamp: re-running unchanged code must leave committed results unchanged.
        marker = {"model": self.model_name, "chapter": self.chapter, "format": FORMAT,
                  "mechbook": __version__, "files": sorted(self.written)}
        (self._staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.chapter}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self._staging, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def complete_runs(root: str | Path | None = None) -> dict[str, list[str]]:
    """Model folder -> chapters with complete results under ``root``."""
    root = Path(root) if root else default_root()
    found: dict[str, list[str]] = {}
    for marker in sorted(root.glob(f"*/*/{MARKER}")):
        info = json.loads(marker.read_text())
        if info.get("format") != FORMAT:
            raise MechbookError(
                f"{marker.parent} was written by an older mechbook (format {info.get('format')}, now {FORMAT}); "
                f"rerun that chapter: python -m mechbook run --model {info.get('model')} --chapters {info.get('chapter')}"
            )
        found.setdefault(info["model"], []).append(info["chapter"])
    return found


def load_table(chapter: str, name: str, root: str | Path | None = None) -> pd.DataFrame:
    """One table from every model's complete results of a chapter, stacked with a ``model`` column."""
    root = Path(root) if root else default_root()
    frames = []
    for model, chapters in complete_runs(root).items():
        path = root / safe_name(model) / chapter / f"{name}.csv"
        if chapter in chapters and path.exists():
            frames.append(pd.read_csv(path).assign(model=model))
    if not frames:
        raise MechbookError(f"no complete results of chapter {chapter!r} ({name}) under {root}; run the chapter first")
    return pd.concat(frames, ignore_index=True)
