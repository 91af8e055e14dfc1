"""A model NDIF serves, built here from its config and tokenizer alone: no weights, nothing to run locally.

Every forward pass and every decoding then runs on NDIF (:mod:`mechbook.nnsight_backend.runner`);
what needs weight matrices here (a head's OV circuit, path patching's projections, the
final norm alone) is refused in one line (:meth:`~mechbook.core.loading.LoadedModel.need_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechbook.core.errors import MechbookError
from mechbook.core.loading import REGISTRY, TOKENIZER_FILES, LoadedModel, tokenizer_adds_bos
from mechbook.nnsight_backend.ndif import ndif_hub_id, served_hub_id
from mechbook.store.hub import config_folder, config_revision
from mechbook.store.quiet import quiet


def _config_repo(name: str) -> str | None:
    """The hub repository a model's config and tokenizer come from: the registry's hub id, else NDIF's."""
    spec = REGISTRY.get(name)
    return spec.hub_id if spec is not None and spec.hub_id else ndif_hub_id(name)


def ndif_files(name: str) -> Path:
    """The folder of config and tokenizer files of a model NDIF serves (:func:`mechbook.store.hub.config_folder`)."""
    served_hub_id(name)
    return config_folder(_config_repo(name))


def load_weightless(name: str) -> LoadedModel:
    """A model NDIF serves, built here from its config alone: a meta-device Hugging Face model, no bridge."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = REGISTRY.get(name)
    folder = ndif_files(name)
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise MechbookError(f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); the hub repository of {name} "
                            "has none that mechbook reads")
    try:
        with quiet():
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
        d_vocab=int(hf_model.get_output_embeddings().weight.shape[0]), prepend_bos=tokenizer_adds_bos(tokenizer),
        notes="weights on NDIF; only the config and tokenizer are here", weights_here=False)


def ndif_origin(name: str) -> dict[str, Any]:
    """Where a run on NDIF got its weights: NDIF's copy under its hub id; the config's revision if it is cached here."""
    revision = config_revision(_config_repo(name) or name)
    return {"source": "ndif", "hub_id": ndif_hub_id(name) or name, "revision": revision}
