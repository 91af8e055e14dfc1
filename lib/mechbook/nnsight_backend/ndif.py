"""What a run on NDIF needs, and what its refusals mean: the models it serves, the key, the server's answer.

NDIF (the National Deep Inference Fabric) runs nnsight traces on its own copies of large
models. Before a run :func:`check_ndif` finds what would stop it (nnsight missing, no
``NDIF_API_KEY``, a model NDIF does not serve, no answer); during it :func:`remote_failure`
turns the server's refusals into one line naming the fix. Nothing here imports nnsight.
"""

from __future__ import annotations

import importlib.util
import os

from mechbook.core.errors import MechbookError

NDIF_KEY_ENV = "NDIF_API_KEY"
INSTALL_HINT = "bash scripts/setup.sh (nnsight is in requirements.lock)"
NDIF_HOST = "https://api.ndif.us"  # nnsight's default (nnsight.schema.config); NDIF_HOST overrides it, as in nnsight
# Models NDIF serves that the papers use or that are their larger kin, taken from
# https://ndif.us/models and not checked against NDIF from here (it cannot be reached); nnsight's own docs
# name GPT-2 openai-community/gpt2. NDIF's live list: python -c "import nnsight; print(nnsight.status())".
# Name -> the hub id NDIF knows it by; hub ids compare case-insensitively.
NDIF_MODELS = {
    "gpt2": "openai-community/gpt2",
    "EleutherAI/gpt-j-6B": "EleutherAI/gpt-j-6b",
    "meta-llama/Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.1-405B": "meta-llama/Llama-3.1-405B",
}
PIN_HINT = ("update the nnsight pin in pyproject.toml ([project.optional-dependencies] ndif) to the server's "
            "version (python -c \"import nnsight; print(nnsight.compare())\"), then: "
            "bash scripts/lock.sh --upgrade-package nnsight && bash scripts/setup.sh")


def ndif_hub_id(name: str) -> str | None:
    """The hub id under which NDIF serves model ``name`` (a registry name or hub id), or None if it does not."""
    wanted = name.lower()
    for known, hub_id in NDIF_MODELS.items():
        if wanted in (known.lower(), hub_id.lower()):
            return hub_id
    return None


def ndif_unreachable(timeout: float = 2.0) -> str | None:
    """Why NDIF cannot be reached now (no answer, a name that does not resolve), or None; in about ``timeout`` s."""
    import threading
    import urllib.error
    import urllib.request

    url = f"{os.environ.get('NDIF_HOST', NDIF_HOST).rstrip('/')}/status"
    answer: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError:  # any HTTP answer: reachable
            answer.append(None)
        except Exception as exc:  # DNS, refused connection, proxy, timeout
            answer.append(f"{url} cannot be reached ({type(exc).__name__})")

    thread = threading.Thread(target=probe, daemon=True)  # name lookups ignore the timeout: the thread does not
    thread.start()
    thread.join(timeout + 0.5)
    return answer[0] if answer else f"{url} did not answer within {timeout:g} s"


def require_nnsight(what: str) -> None:
    """A one-line MechbookError naming the install command if nnsight is not installed (``what`` needs it)."""
    if importlib.util.find_spec("nnsight") is None:
        raise MechbookError(f"{what} needs nnsight, which is not installed; run: {INSTALL_HINT}")


def require_key(what: str, instead: str) -> None:
    """A one-line MechbookError if ``NDIF_API_KEY`` is not set, naming where to get one and ``instead``."""
    if not os.environ.get(NDIF_KEY_ENV):
        raise MechbookError(f"{what} needs an NDIF API key and {NDIF_KEY_ENV} is not set; "
                            f"export {NDIF_KEY_ENV}=<your key> (get one at https://login.ndif.us), "
                            f"or use {instead} to run here")


def served_hub_id(name: str, instead: str = "--backend nnsight") -> str:
    """The hub id NDIF serves ``name`` under, else a one-line MechbookError listing what it serves and ``instead``."""
    hub_id = ndif_hub_id(name)
    if hub_id is None:
        raise MechbookError(f"NDIF does not serve {name!r}; it serves {', '.join(NDIF_MODELS)} "
                            f"(see: python -m mechbook models), or use {instead} to run it here")
    return hub_id


def check_ndif(name: str, *, timeout: float = 2.0) -> str:
    """Everything a run on NDIF needs before it starts, else a one-line MechbookError naming the fix; the hub id.

    In order: nnsight installed, ``NDIF_API_KEY`` set, the model served by NDIF, NDIF reachable.
    """
    require_nnsight("--backend ndif")
    require_key("--backend ndif", "--backend nnsight")
    hub_id = served_hub_id(name)
    why = ndif_unreachable(timeout)
    if why is not None:
        raise MechbookError(f"NDIF cannot be reached ({why}); check the network, or use --backend nnsight to run "
                            "the chapters here")
    return hub_id


def remote_failure(exc: BaseException) -> MechbookError | None:
    """nnsight's error from a remote request as one line naming the fix, or None if ``exc`` is not one.

    NDIF refuses a client whose nnsight version differs from the server's (it reads the version nnsight
    sends with every request); the refusal names the version.
    """
    if type(exc).__name__ != "RemoteError":
        return None
    text = " ".join(str(exc).split())
    if "version" in text.lower():
        return MechbookError(f"NDIF refused this nnsight version (nnsight {_nnsight_version()}, pinned in "
                             f"pyproject.toml): {text}; {PIN_HINT}")
    return MechbookError(f"NDIF could not run the request: {text}; if it keeps failing, rerun with --resume "
                         "later, or use --backend nnsight to run here")


def _nnsight_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("nnsight")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_ndif_client(backend: str = "ndif") -> None:
    """nnsight installed and, for ``ndif``, ``NDIF_API_KEY`` set; else a one-line MechbookError naming the fix."""
    require_nnsight(f"backend={backend!r}")
    if backend == "ndif":
        require_key("backend='ndif'", "backend='nnsight'")
