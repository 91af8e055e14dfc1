"""Hub models on disk: the local Hugging Face cache, and the hub behind it when it can be reached.

Folders are returned as full paths into the Hugging Face cache, so a folder in the
working directory that shares a model's name is never read instead. Whether the hub
can be reached is asked once, briefly, before a download, so that an offline machine
gets a sentence saying what to do rather than a long wait and a connection error.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from mechbook.core.errors import MechbookError
from mechbook.store.quiet import quiet

HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]  # what a hub model needs to load
# What a model served by NDIF needs here: its config and tokenizer, no weights.
CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.*",
                "merges.txt", "*.model", "*.tiktoken"]


def hub_unreachable(timeout: float = 0.5) -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, no answer), or None; in under a second."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var} is set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = constants.ENDPOINT
    answer: list[str | None] = []

    def probe() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(url, timeout=timeout)  # any HTTP answer: reachable
            answer.append(None)
        except Exception as exc:  # a DNS, connection or proxy error of whichever HTTP library
            answer.append(f"{url} cannot be reached ({type(exc).__name__})")

    thread = threading.Thread(target=probe, daemon=True)  # name lookups ignore the timeout: the thread does not
    thread.start()
    thread.join(timeout + 0.2)
    return answer[0] if answer else f"{url} did not answer within {timeout} s"


def in_hub_cache(hub_id: str) -> Path | None:
    """The local Hugging Face cache's copy of a hub model (a full path), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):  # incomplete or absent
        return None
    return folder if (folder / "config.json").is_file() else None


def hub_model_dir(hub_id: str) -> Path:
    """A hub model's folder: its copy in the local Hugging Face cache, else downloaded into that cache."""
    from huggingface_hub import snapshot_download

    cached = in_hub_cache(hub_id)
    if cached is not None:
        return cached
    why = hub_unreachable()
    if why is not None:
        raise MechbookError(
            f"could not load {hub_id!r}: it is not in the local Hugging Face cache and the hub cannot be used "
            f"({why}); download it on a machine with access (huggingface-cli download {hub_id} --local-dir DIR) "
            "and pass that directory: load_model('DIR')"
        )
    try:
        with quiet():
            folder = Path(snapshot_download(hub_id, allow_patterns=HUB_FILES))
            if not any(folder.glob("*.safetensors")):  # older repositories ship only pytorch_model.bin
                folder = Path(snapshot_download(hub_id, allow_patterns=[*HUB_FILES, "pytorch_model*.bin"]))
    except Exception as exc:  # gated, not found, or the connection dropped: huggingface_hub's error types
        raise MechbookError(f"could not download {hub_id!r} from the hub ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from exc
    return folder


def config_folder(hub_id: str) -> Path:
    """A hub model's config and tokenizer files: from the local Hugging Face cache, else downloaded (only those)."""
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):  # absent or incomplete in the cache
        folder = Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=CONFIG_FILES))
        if (folder / "config.json").is_file():
            return folder
    why = hub_unreachable()
    if why is not None:
        raise MechbookError(f"--backend ndif needs the config and tokenizer of {hub_id!r} (no weights), which are not "
                            f"in the local Hugging Face cache, and the hub cannot be used ({why}); connect to the hub, "
                            f"or put them in the cache: huggingface-cli download {hub_id} --include "
                            + " ".join(f"'{pattern}'" for pattern in CONFIG_FILES))
    try:
        with quiet():
            return Path(snapshot_download(hub_id, allow_patterns=CONFIG_FILES))
    except Exception as exc:  # gated, not found, or the connection dropped: huggingface_hub's error types
        raise MechbookError(f"could not download the config and tokenizer of {hub_id!r} from the hub "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())}); a gated model needs "
                            "`huggingface-cli login` with an account that accepted its licence") from exc


def config_revision(hub_id: str) -> str | None:
    """The revision (commit) of a hub model's config in the local Hugging Face cache, or None if it is not there."""
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):
        return Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=CONFIG_FILES)).name
    return None
