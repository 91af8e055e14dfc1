"""Tidy results a chapter writes for other chapters (and other people) to read.

Each chapter writes its key tables under ``<root>/<model>/<chapter>/`` as CSV or
JSON (and other files through :meth:`ChapterResults.staged`). Files go to a staging
folder first; :meth:`ChapterResults.finish` writes a ``_complete.json`` marker listing
every file with its size and sha256, the chapter's parameters (``parameters``: what
``mechbook run`` passes in :data:`PARAMETERS_ENV`, None when the chapter ran some other
way) and what produced them (``provenance``: :func:`mechbook.book.provenance.record`),
then swaps the folder into place. ``run --resume`` skips a chapter only when its
recorded parameters are the ones asked for (:func:`parameter_changes`). Readers check
each listed file against the marker and name the chapter to rerun when one is missing
or changed; the provenance is shown, never checked.

Publishing moves the previous copy aside (``.<chapter>.old-<pid>``), renames the new
one into place and deletes the old one. A run that dies in between leaves the old
copy under that name; the next run or read of the model's results puts it back (its
process is gone) and deletes staging folders of dead runs, so a death never loses the
last complete results. (A pointer swapped between versioned folders would avoid the
step, but git and the book build would then see symbolic links.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mechbook.core.errors import MechbookError
from mechbook.store.cache import process_alive

RESULTS_ENV = "MECHBOOK_RESULTS"
# Set by ``mechbook run`` for each chapter's kernel: {"chapter": notebook stem, "parameters": every papermill
# parameter the chapter ran with, its parameters cell's defaults included}.
PARAMETERS_ENV = "MECHBOOK_CHAPTER_PARAMETERS"
MARKER = "_complete.json"
CSV_FLOAT_FORMAT = "%.5g"
FORMAT = 2  # 2: the marker lists each file's size and sha256
CHAPTER_FOLDER = re.compile(r"^(?P<key>[a-z]\d+)_")  # a chapter's results folder: a2_tasks_accuracy, b2_...
# What a run leaves beside the chapter folders while it publishes: .<chapter>.staging-<pid>-<random>, .<chapter>.old-<pid>
LEFTOVER = re.compile(r"^\.(?P<chapter>[^/]+)\.(?P<kind>staging|old)-(?P<pid>\d+)(?:-[^/]*)?$")


def safe_name(model_name: str) -> str:
    """A model name usable as a folder name (hub ids contain '/'); names that would leave the results folder are refused."""
    name = model_name.replace("/", "--")
    if not name or name.startswith(".") or "\\" in name or "\0" in name:
        raise MechbookError(f"model name {model_name!r} cannot name a results folder (empty, starting with '.', or "
                            "holding a backslash); use the registry name or the model folder's full path")
    return name


def parameters_record(parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Parameters as the marker stores them (JSON: tuples become lists, other values their repr)."""
    if parameters is None:
        return None
    return json.loads(json.dumps(dict(parameters), default=repr, sort_keys=True))


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


def _integral_as_int(table: pd.DataFrame) -> pd.DataFrame:
    """Float columns holding only whole numbers (ranks or counts with a gap: NaN) written as integers.

    ``%.5g`` would otherwise print a rank of 123456 as ``1.2346e+05``.
    """
    table = table.copy()
    for column in table.columns:
        values = table[column]
        if pd.api.types.is_float_dtype(values):
            finite = values[values.notna()]
            if len(finite) and (finite == finite.round()).all() and finite.abs().max() < 2**53:
                table[column] = values.astype("Int64")
    return table


def _unwritable(folder: Path, exc: OSError) -> MechbookError:
    return MechbookError(f"cannot write results to {folder} ({exc.strerror or type(exc).__name__}); make it writable, "
                         f"or set {RESULTS_ENV} to a folder that is")


def _run_parameters(chapter: str) -> dict[str, Any] | None:
    """The parameters ``mechbook run`` started this chapter with (:data:`PARAMETERS_ENV`), or None."""
    try:
        given = json.loads(os.environ.get(PARAMETERS_ENV) or "null")
    except ValueError:
        return None
    if isinstance(given, dict) and given.get("chapter") == chapter and isinstance(given.get("parameters"), dict):
        return given["parameters"]
    return None


class ChapterResults:
    """Collects one chapter's tables for one model and publishes them atomically.

    ``parameters`` are recorded in the marker; by default, the ones ``mechbook run``
    started the chapter with (none when it ran another way).
    ``model`` is the loaded model the chapter ran on: the provenance records its backend
    and where its weights are (without it: the local backend, no device).
    """

    @property
    def marker(self) -> Path:
        """The marker of the published results (``<root>/<model>/<chapter>/_complete.json``), once finished."""
        return self.final / MARKER

    def __init__(self, chapter: str, model_name: str, root: str | Path | None = None, *,
                 parameters: dict[str, Any] | None = None, model: Any = None) -> None:
        if not chapter or chapter.startswith(".") or any(c in chapter for c in "/\\\0"):
            raise MechbookError(f"chapter {chapter!r} is not a folder name; use the notebook's name, e.g. 'a2_tasks_accuracy'")
        self.chapter = chapter
        self.model_name = model_name
        self.model = model  # the loaded model the chapter ran on: its backend and device go into the provenance
        self.root = Path(root) if root else default_root()
        if ".." in self.root.parts:
            raise MechbookError(f"results root {str(self.root)!r} contains '..', which would publish outside it; pass "
                                f"the folder itself (e.g. {str(self.root.resolve())!r})")
        self.final = self.root / safe_name(model_name) / chapter
        self.parameters = parameters_record(parameters if parameters is not None else _run_parameters(chapter))
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            tidy(self.final.parent)
            self._staging = Path(tempfile.mkdtemp(prefix=f".{chapter}.staging-{os.getpid()}-", dir=self.final.parent))
        except OSError as exc:
            raise _unwritable(self.final.parent, exc) from None
        self.written: list[str] = []
        # more for the marker (``searches``: what this run computed or checked, mechbook.book.searches), and what
        # to do once the results are published (delete the searches' checkpoints)
        self.extra: dict[str, Any] = {}
        self.after_publish: list = []

    def save(self, name: str, data: pd.DataFrame | dict | list) -> Path:
        """Stage a table (CSV) or a JSON-able object under ``name``."""
        if isinstance(data, pd.DataFrame):
            path = self._staging / f"{name}.csv"
            # Five significant digits: what the computation supports across CPUs (probabilities differ by
            # up to ~5e-6 between x86-64 machines), so float noise does not churn the committed files.
            _integral_as_int(data).to_csv(path, index=False, float_format=CSV_FLOAT_FORMAT)
        else:
            path = self._staging / f"{name}.json"
            path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
        self.written.append(path.name)
        return self.final / path.name

    def staged(self, filename: str) -> Path:
        """Where to write a file of another format (safetensors, ...): published and hashed with the tables.

        ``filename`` is relative to the chapter's folder and may have one sub-folder
        (``o_vectors/capitals.safetensors``).
        """
        parts = Path(filename).parts
        if not parts or len(parts) > 2 or Path(filename).is_absolute() or any(p in ("..", ".") for p in parts) \
                or filename == MARKER:
            raise MechbookError(f"{filename!r} is not a file name inside the chapter's folder; use e.g. 'vectors/o.safetensors'")
        path = self._staging / filename
        path.parent.mkdir(exist_ok=True)
        return path

    def finish(self) -> Path:
        """Publish the staged files as the chapter's complete results."""
        from mechbook import __version__

        if not self._staging.is_dir():
            raise MechbookError(f"the results of {self.chapter} were already published; make a new ChapterResults")
        files = {p.relative_to(self._staging).as_posix(): _fingerprint(p)
                 for p in sorted(self._staging.rglob("*")) if p.is_file()}
        # The files carry no timestamp: re-running unchanged code leaves them byte for byte the same. What
        # produced them (date, wall time, versions, ...) goes beside the file list, which readers check.
        marker = {"model": self.model_name, "chapter": self.chapter, "format": FORMAT, "mechbook": __version__,
                  "files": files, "parameters": self.parameters, **self.extra,
                  "provenance": _provenance(self.model_name, self.model)}
        try:
            (self._staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            self._publish()
        except OSError as exc:
            raise _unwritable(self.final.parent, exc) from None
        for then in self.after_publish:
            then()
        return self.final

    def _publish(self) -> None:
        """Old copy aside, new copy in, old copy gone; a death between the renames is undone by :func:`tidy`."""
        old = self.final.with_name(f".{self.chapter}.old-{os.getpid()}")
        for _ in range(5):
            moved = self.final.exists()
            if moved:
                if old.exists():  # an earlier attempt's copy, since replaced by another run's: not the latest
                    shutil.rmtree(old)
                os.replace(self.final, old)
            try:
                os.replace(self._staging, self.final)
                break
            except OSError:
                if self.final.exists():  # another run published (or a reader restored) in between: again
                    continue
                if moved:  # a real error: the previous copy goes back before we fail
                    os.replace(old, self.final)
                raise
        else:
            raise MechbookError(f"{self.final} kept being replaced by other runs; run the chapter again")
        shutil.rmtree(old, ignore_errors=True)


def tidy(model_dir: Path, *, wait: float = 2.0) -> None:
    """Finish what runs that died left in a model's results folder.

    An old copy moved aside by a dead run whose new copy never arrived goes back in
    place; other leftovers of dead runs (staging folders, old copies already replaced)
    are deleted. A live run that is between its two renames gets ``wait`` seconds.
    """
    if not model_dir.is_dir():
        return
    deadline = time.monotonic() + wait
    for path in sorted(model_dir.iterdir()):
        match = LEFTOVER.match(path.name)
        if not match or not path.is_dir():
            continue
        final = model_dir / match["chapter"]
        while match["kind"] == "old" and not final.exists() and process_alive(int(match["pid"])) and path.exists():
            if time.monotonic() > deadline:
                raise MechbookError(f"{final} is being replaced by process {match['pid']}; read it when that run ends")
            time.sleep(0.01)
        if process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):  # a read-only results folder, or another reader got there first
            if match["kind"] == "old" and not final.exists():
                os.replace(path, final)
            else:
                shutil.rmtree(path)


def _provenance(model_name: str, model: Any = None) -> dict[str, Any]:
    """What produced the results (:func:`mechbook.book.provenance.record`); a failure to tell is recorded, not raised."""
    from mechbook.book import provenance

    try:
        return provenance.record(model_name, model)
    except Exception as exc:  # provenance describes the results; it must never cost them
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def _fingerprint(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as the marker lists them."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _rerun_command(model: str, chapter: str) -> str:
    match = CHAPTER_FOLDER.match(chapter)
    return f"python -m mechbook run --model {model} --chapters {match['key'] if match else chapter}"


def _model_of(folder: Path) -> str:
    """The model whose results a chapter folder holds (from the model folder's name)."""
    return folder.parent.name.replace("--", "/")


def _read_marker(marker: Path, model: str) -> dict[str, Any]:
    """A chapter's ``_complete.json``, or a MechbookError naming the rerun command if it is unreadable or old."""
    folder = marker.parent
    rerun = _rerun_command(model, folder.name)
    try:
        info = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise MechbookError(f"{marker} is unreadable ({reason}): the results in {folder} are damaged; "
                            f"rerun that chapter ({rerun})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise MechbookError(
            f"{folder} was written by an older mechbook (format {found}, now {FORMAT}); rerun that "
            f"chapter ({rerun}) or delete the folder"
        )
    files = info.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()) \
            or not isinstance(info.get("model"), str) or not isinstance(info.get("chapter"), str):
        raise MechbookError(f"{marker} does not list the model, chapter and files: the results in {folder} are "
                            f"damaged; rerun that chapter ({rerun})")
    return info


def _check_file(folder: Path, name: str, info: dict[str, Any]) -> Path:
    """``folder/name`` after checking it against the marker ``info``; a MechbookError naming the rerun if not."""
    path = folder / name
    rerun = _rerun_command(info["model"], info["chapter"])
    expected = info["files"].get(name)
    if expected is None:
        raise MechbookError(f"the complete results in {folder} have no {name} (another version of the chapter "
                            f"wrote them); rerun that chapter ({rerun})")
    if not path.is_file():
        raise MechbookError(f"{path} is missing from complete results; rerun that chapter ({rerun})")
    found = _fingerprint(path)
    if found["bytes"] != expected.get("bytes"):
        change = f"has {found['bytes']} bytes, not the {expected.get('bytes')} its marker lists"
    elif found["sha256"] != expected.get("sha256"):
        change = "does not match the sha256 its marker lists"
    else:
        return path
    raise MechbookError(f"{path} {change}: it changed after the chapter wrote it; rerun that chapter ({rerun})")


def _check_chapter(folder: Path, info: dict[str, Any]) -> None:
    for name in info["files"]:
        _check_file(folder, name, info)


def check_results(root: str | Path | None = None, *, skip: set[tuple[str, str]] = frozenset()) -> None:
    """Refuse results that are old or damaged, naming the folder and the command that rewrites it.

    Old means a marker of another format, or a chapter folder with no marker at all
    (written before markers existed; a run that dies now leaves only hidden staging
    folders). Damaged means a marker that is not valid JSON, or a file missing or
    changed since the marker was written. ``skip`` holds (model folder, chapter) pairs
    about to be rewritten anyway.
    """
    root = Path(root) if root else default_root()
    if not root.is_dir():
        return
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        tidy(model_dir)
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".")):
        model_dir, chapter = folder.parent.name, folder.name
        if not CHAPTER_FOLDER.match(chapter) or (model_dir, chapter) in skip:
            continue
        marker = folder / MARKER
        if not marker.exists():
            raise MechbookError(
                f"{folder} has no {MARKER}: it was written by an older mechbook; rerun that chapter "
                f"({_rerun_command(_model_of(folder), chapter)}) or delete the folder"
            )
        _check_chapter(folder, _read_marker(marker, _model_of(folder)))


def existing_root(root: str | Path | None) -> Path:
    """The results folder to read: ``root`` when given (it must exist: a mistyped path is not "no results"), else
    :func:`default_root` (missing there means no chapter has run yet)."""
    if root is None or root == "":
        return default_root()
    root = Path(root)
    if not root.is_dir():
        raise MechbookError(f"results root {str(root)!r} is not a folder; pass the folder that holds "
                            "<model>/<chapter>/ results (e.g. results/ at the repository root), or None for the default")
    return root


def complete_markers(root: Path, chapter: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, marker) of every complete chapter under ``root``; the files of ``chapter`` (all if None) checked."""
    if not root.is_dir():
        return []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        tidy(model_dir)
    found = []
    for marker in sorted(root.glob(f"*/*/{MARKER}")):
        if marker.parent.name.startswith("."):  # a copy being published or replaced right now
            continue
        info = _read_marker(marker, _model_of(marker.parent))
        if chapter is None or marker.parent.name == chapter:
            _check_chapter(marker.parent, info)
        found.append((marker.parent, info))
    return found


def complete_runs(root: str | Path | None = None, chapter: str | None = None) -> dict[str, list[str]]:
    """Model -> chapters with complete results under ``root``.

    Every marker is read; the files of ``chapter`` (of every chapter if None) are
    checked against theirs.
    """
    found: dict[str, list[str]] = {}
    for _, info in complete_markers(existing_root(root), chapter):
        found.setdefault(info["model"], []).append(info["chapter"])
    return found


def is_complete(model_name: str, chapter: str, root: str | Path | None = None) -> bool:
    """Whether ``chapter`` has complete, intact results of ``model_name`` (``run --resume`` skips it then).

    Results that are old or damaged count as missing: the chapter runs again and rewrites them.
    """
    folder = (Path(root) if root else default_root()) / safe_name(model_name) / chapter
    if not (folder / MARKER).is_file():
        return False
    try:
        _check_chapter(folder, _read_marker(folder / MARKER, model_name))
    except MechbookError:
        return False
    return True


def parameter_changes(model_name: str, chapter: str, wanted: dict[str, Any],
                      root: str | Path | None = None) -> list[str]:
    """How the parameters of a chapter's complete results differ from ``wanted``: one "name: there -> now" each.

    A marker that records no parameters (an older mechbook, or a chapter run outside
    ``mechbook run``) differs from any: ``run --resume`` reruns such a chapter.
    """
    folder = (Path(root) if root else default_root()) / safe_name(model_name) / chapter
    recorded = _read_marker(folder / MARKER, model_name).get("parameters")
    if not isinstance(recorded, dict):
        return ["no parameters recorded"]
    wanted = parameters_record(wanted)
    return [f"{name}: {recorded.get(name, '(unset)')!r} -> {wanted.get(name, '(unset)')!r}"
            for name in sorted((set(recorded) | set(wanted)) - HOW_NOT_WHAT)
            if recorded.get(name, _UNSET) != wanted.get(name, _UNSET)]


# Parameters that change how a chapter gets its results, not what they are: recompute (search again rather than
# load and check the committed searches, mechbook.book.searches) gives the same results either way.
HOW_NOT_WHAT = frozenset({"recompute"})


_UNSET = object()


def chapter_file(chapter: str, filename: str, model_name: str, root: str | Path | None = None) -> Path:
    """One file of a model's complete results of a chapter, checked against its marker.

    Raises a MechbookError naming the command that writes it when the chapter has no
    complete results for the model, or when the file is missing or changed.
    """
    root = Path(root) if root else default_root()
    folder = root / safe_name(model_name) / chapter
    tidy(folder.parent)
    if not (folder / MARKER).is_file():
        raise MechbookError(f"no complete results of chapter {chapter} for {model_name} in {folder}; run: "
                            f"{_rerun_command(model_name, chapter)}")
    return _check_file(folder, filename, _read_marker(folder / MARKER, model_name))


def checked_file(path: str | Path) -> Path:
    """``path``, checked against the marker of the chapter folder it lies in (if any, up to two levels up)."""
    path = Path(path)
    for folder in path.parents[:2]:
        if (folder / MARKER).is_file():
            info = _read_marker(folder / MARKER, _model_of(folder))
            return _check_file(folder, path.relative_to(folder).as_posix(), info)
    return path


def load_table(chapter: str, name: str, root: str | Path | None = None) -> pd.DataFrame:
    """One table from every model's complete results of a chapter, stacked with a ``model`` column."""
    root = existing_root(root)
    frames = [pd.read_csv(_check_file(folder, f"{name}.csv", info)).assign(model=info["model"])
              for folder, info in complete_markers(root, chapter) if folder.name == chapter]
    if not frames:
        raise MechbookError(f"no complete results of chapter {chapter!r} ({name}) under {root}; run the chapter first")
    return pd.concat(frames, ignore_index=True)


def load_json(chapter: str, name: str, root: str | Path | None = None) -> dict[str, Any]:
    """One JSON result of a chapter for every model that has complete results: model -> content."""
    root = existing_root(root)
    return {info["model"]: json.loads(_check_file(folder, f"{name}.json", info).read_text())
            for folder, info in complete_markers(root, chapter) if folder.name == chapter}


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
