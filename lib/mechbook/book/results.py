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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from mechbook.core.errors import MechbookError

RESULTS_ENV = "MECHBOOK_RESULTS"
MARKER = "_complete.json"
FORMAT = 1
CHAPTER_FOLDER = re.compile(r"^(?P<key>[a-z]\d+)_")  # a chapter's results folder: a2_tasks_accuracy, b2_...


def safe_name(model_name: str) -> str:
    """A model name usable as a folder name (hub ids contain '/')."""
    return model_name.replace("/", "--")


def default_root(start: str | Path | None = None) -> Path:
    """``$MECHBOOK_RESULTS``, else ``results/`` at the repository root (found from ``start``, default the cwd)."""
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env)
    here = Path(start or Path.cwd()).resolve()
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


def _rerun_command(model: str, chapter: str) -> str:
    match = CHAPTER_FOLDER.match(chapter)
    return f"python -m mechbook run --model {model} --chapters {match['key'] if match else chapter}"


def _read_marker(marker: Path, model: str) -> dict[str, Any]:
    """A chapter's ``_complete.json``; a MechbookError naming the rerun command if an older mechbook wrote it."""
    info = json.loads(marker.read_text())
    if info.get("format") != FORMAT:
        folder = marker.parent
        raise MechbookError(
            f"{folder} was written by an older mechbook (format {info.get('format')}, now {FORMAT}); rerun that "
            f"chapter ({_rerun_command(info.get('model', model), info.get('chapter', folder.name))}) "
            "or delete the folder"
        )
    return info


def check_results(root: str | Path | None = None, *, skip: set[tuple[str, str]] = frozenset()) -> None:
    """Refuse results written by an older mechbook, naming the folder and the command that rewrites it.

    Old means a marker of another format, or a chapter folder with no marker at all
    (written before markers existed; a run that dies now leaves only hidden staging
    folders). ``skip`` holds (model folder, chapter) pairs about to be rewritten anyway.
    """
    root = Path(root) if root else default_root()
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".")):
        model_dir, chapter = folder.parent.name, folder.name
        if not CHAPTER_FOLDER.match(chapter) or (model_dir, chapter) in skip:
            continue
        marker = folder / MARKER
        if not marker.exists():
            raise MechbookError(
                f"{folder} has no {MARKER}: it was written by an older mechbook; rerun that chapter "
                f"({_rerun_command(model_dir.replace('--', '/'), chapter)}) or delete the folder"
            )
        _read_marker(marker, model_dir.replace("--", "/"))


def complete_runs(root: str | Path | None = None) -> dict[str, list[str]]:
    """Model folder -> chapters with complete results under ``root``."""
    root = Path(root) if root else default_root()
    found: dict[str, list[str]] = {}
    for marker in sorted(root.glob(f"*/*/{MARKER}")):
        if marker.parent.name.startswith("."):  # an old copy being replaced right now
            continue
        info = _read_marker(marker, marker.parent.parent.name.replace("--", "/"))
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


def load_json(chapter: str, name: str, root: str | Path | None = None) -> dict[str, Any]:
    """One JSON result of a chapter for every model that has complete results: model -> content."""
    root = Path(root) if root else default_root()
    found = {}
    for model, chapters in complete_runs(root).items():
        path = root / safe_name(model) / chapter / f"{name}.json"
        if chapter in chapters and path.exists():
            found[model] = json.loads(path.read_text())
    return found


def sort_safetensors_header(path: str | Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place.

    The safetensors writer orders the metadata by a hash map that changes from process
    to process, so the same tensors and metadata give different bytes on every run:
    committed results would show a diff after every refresh. Sorting makes them stable.
    """
    path = Path(path)
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)  # keep the data 8-byte aligned, as the writer does
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
