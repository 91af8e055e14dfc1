"""The model cache: folders written once with a manifest, checked against it on every read.

A cached folder holds a model's files and a manifest of every file's size and sha256,
the manifest hashed whole so that no entry of it can change unnoticed. A folder is
built in a temporary folder beside its place and renamed into place, so a process
killed mid-write never leaves a folder that a later read would use; what such a
process left is swept away by the next build. :mod:`mechbook.core.loading` fills the
folders (it knows the model formats) and reads them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from mechbook.core.errors import MechbookError

CACHE_ENV = "MECHBOOK_CACHE"
CACHE_FORMAT = 2  # bump when the layout of a cached model directory changes (2: manifest of sha256s)
CACHE_MANIFEST = "mechbook_manifest.json"
MANIFEST_HASH = "manifest_sha256"  # the manifest's own entry: sha256 of every other entry
SHA256_CACHE = "sha256.json"  # in cache_dir(): file path -> size, mtime and sha256, so a file is hashed once


def cache_dir() -> Path:
    """Where dequantized models are kept: ``$MECHBOOK_CACHE`` or the user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mechbook"))


def cached_model_dir(name: str) -> Path:
    """The folder of a model's cached copy (it may not exist yet)."""
    return cache_dir() / "models" / f"{name}-v{CACHE_FORMAT}"


class DamagedCache(MechbookError):
    """A cached model folder whose files do not match the manifest written with them."""


# --- sha256 of files -----------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    """A file's sha256, read now."""
    # sha256 rather than blake2b or md5: CPUs with SHA instructions hash it fastest.
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while size := fh.readinto(buffer):
            digest.update(view[:size])  # releases the GIL: a load in another thread goes on meanwhile
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """A file's sha256, hashed once: kept in the cache with its size and mtime, recomputed when either changes."""
    path = Path(path).resolve()
    stat = path.stat()
    store = cache_dir() / SHA256_CACHE
    try:
        known = json.loads(store.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, dict) and entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256(path)
    known[str(path)] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache: the hash is still right, only not kept
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{SHA256_CACHE}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, store)
    return digest


# --- manifests -------------------------------------------------------------------------------------------


def file_list(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a cache folder but the manifest: name -> size and sha256."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir()) if p.name != CACHE_MANIFEST
    }


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's entries but its own hash, as canonical JSON (sorted keys, no spaces)."""
    body = {key: value for key, value in manifest.items() if key != MANIFEST_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` into ``folder`` with the sha256 of all of it, so that no entry (the tokenizer settings
    included, which no file hash covers) can change unnoticed."""
    manifest = {**manifest, MANIFEST_HASH: _manifest_digest(manifest)}
    (folder / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    """A cached model folder's manifest, or :class:`DamagedCache` if it is missing, unreadable, or any entry of it
    no longer matches the manifest's own sha256."""
    try:
        manifest = json.loads((folder / CACHE_MANIFEST).read_text())
        if (manifest.get("format") != CACHE_FORMAT or not isinstance(manifest.get("files"), dict)
                or not isinstance(manifest.get("tokenizer"), dict)):
            raise ValueError
    except FileNotFoundError:
        raise DamagedCache(f"it has no {CACHE_MANIFEST}") from None
    except (OSError, ValueError, AttributeError):
        raise DamagedCache(f"its {CACHE_MANIFEST} is not a manifest of format {CACHE_FORMAT}") from None
    if MANIFEST_HASH not in manifest:
        raise DamagedCache(f"its {CACHE_MANIFEST} has no {MANIFEST_HASH} (an older mechbook wrote it)")
    if manifest[MANIFEST_HASH] != _manifest_digest(manifest):
        raise DamagedCache(f"its {CACHE_MANIFEST} was changed after it was written (an entry, e.g. the tokenizer "
                           f"settings, no longer matches its {MANIFEST_HASH})")
    return manifest


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`DamagedCache` unless the folder holds exactly the manifest's files, sizes and sha256s."""
    files = manifest["files"]
    on_disk = {p.name for p in folder.iterdir() if p.name != CACHE_MANIFEST}
    if on_disk != set(files):
        odd = sorted(on_disk ^ set(files))[0]
        raise DamagedCache(f"{odd} is {'missing' if odd in files else 'not one of the files written'}")
    for name, expected in files.items():
        try:
            size, digest = (folder / name).stat().st_size, sha256(folder / name)
        except OSError as exc:
            raise DamagedCache(f"{name} cannot be read ({exc.strerror})") from None
        if size != expected.get("bytes"):
            raise DamagedCache(f"{name} has {size} bytes, not the {expected.get('bytes')} written")
        if digest != expected.get("sha256"):
            raise DamagedCache(f"{name} does not match the sha256 recorded when it was written")


def verify_cache(folder: Path) -> dict[str, Any]:
    """The manifest of a cached model folder, after checking every file against it."""
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    return manifest


# --- building a folder: whole or not at all -------------------------------------------------------------


def build_folder(final: Path, fill: Callable[[Path], dict[str, Any]]) -> Path:
    """Build the cache folder ``final`` and put it in place whole, replacing any copy there.

    ``fill(tmp)`` writes the files into a temporary folder beside ``final`` and returns
    the manifest's entries (``"tokenizer"`` among them); the manifest adds the format and
    every file's size and sha256. An interrupted build leaves only a temporary folder,
    which no read uses and a later build sweeps away.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        entries = fill(tmp)
        write_manifest(tmp, {"format": CACHE_FORMAT, **entries, "files": file_list(tmp)})
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def process_alive(pid: int) -> bool:
    """Whether a process of this machine is running (a folder named after a dead one is a leftover)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sweep_leftovers(final: Path) -> None:
    """Delete the temporary and set-aside copies of ``final`` that processes no longer running left (a GB each)."""
    for left in final.parent.glob(f".{final.name}.*-*"):
        match = re.match(rf"^\.{re.escape(final.name)}\.(tmp|replaced)-(\d+)", left.name)
        if match and not process_alive(int(match[2])):
            shutil.rmtree(left, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete cache folder into place, moving aside (then deleting) any copy there."""
    for _ in range(3):
        if final.exists():
            aside = final.with_name(f".{final.name}.replaced-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, final)
            return
        except OSError:  # another process published its copy in between: ours goes
            if not final.exists():
                raise
            with contextlib.suppress(DamagedCache):
                verify_cache(final)
                return
    raise MechbookError(f"could not put the dequantized model in place at {final}: other processes kept replacing "
                        "it; load again")
