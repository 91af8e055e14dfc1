"""Where a model's forward passes run, chosen once when it is loaded: here on the bridge, through nnsight, on NDIF.

- ``local`` (the default): the transformer-lens bridge, run by the core
  (:class:`mechbook.core.runs.LocalRunner`).
- ``nnsight``: the same weights run by nnsight (:mod:`mechbook.nnsight_backend`, optional);
  ``remote="local"`` sends every trace through nnsight's remote path in this process, with
  no network: the stand-in for NDIF in the tests.
- ``ndif``: the traces sent to NDIF (``NDIF_API_KEY``). ``load_model(name, backend="ndif")``
  reads only the config and tokenizer: the weights stay on NDIF.

Every function of the core runs on whichever runner the model carries, so a sweep, an
ablation or a circuit runs on any backend unchanged. A chapter hands its model to its
results (:class:`mechbook.book.results.ChapterResults`), whose provenance records the backend.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from mechbook.core.errors import MechbookError
from mechbook.core.loading import DEFAULT_MODEL, LoadedModel, check_dtype
from mechbook.core.loading import load_model as load_here

BACKENDS = ("local", "nnsight", "ndif")


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
    """Load a model (:func:`mechbook.core.loading.load_model`) and put it on ``backend``.

    ``backend="ndif"`` reads only the config and tokenizer (from the local Hugging Face
    cache, else downloaded), builds the model on the meta device without weights, and
    runs every forward pass and decoding on NDIF; the placement arguments do not apply.
    """
    if backend not in BACKENDS:
        raise MechbookError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "ndif":
        # the chapters' defaults (device "cpu", dtype float32) pass: what stays here is on the CPU
        placement = {"dtype": check_dtype(dtype) != torch.float32, "device": device not in (None, "cpu", "auto"),
                     "device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        given = [key for key, value in placement.items() if value is not None and value is not False]
        if given:
            raise MechbookError(f"{given[0]}= does not apply to backend='ndif': NDIF holds the weights and chooses their "
                                "dtype and devices; leave it unset, or use backend='nnsight' to run here")
        from mechbook.nnsight_backend.ndif import check_ndif_client
        from mechbook.nnsight_backend.weightless import load_weightless

        check_ndif_client()
        return use_backend(load_weightless(name), "ndif")
    model = load_here(name, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                      offload_folder=offload_folder)
    return use_backend(model, backend)


def use_backend(model, backend: str = "nnsight", *, remote: bool | str = False):
    """``model`` with its forward passes run on ``backend`` (same weights, same tokenizer).

    ``remote="local"`` (nnsight only) runs every trace through nnsight's remote
    serialization in-process. ``backend="ndif"`` needs ``NDIF_API_KEY`` and sends each
    trace to NDIF. A model loaded without weights (``load_model(name, backend="ndif")``)
    runs on NDIF only.
    """
    if backend not in BACKENDS:
        raise MechbookError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not model.weights_here and backend != "ndif":
        raise MechbookError(f"{model.name} was loaded for NDIF without its weights, so it cannot run on backend "
                            f"{backend!r}; load it with mechbook.load_model({model.name!r}, backend={backend!r})")
    if backend == "local":
        if remote:
            raise MechbookError("remote= applies to the nnsight backend; the local backend runs here")
        return model if model.backend == "local" else dataclasses.replace(model, backend="local", runner=None)
    if backend == "ndif" and model.backend == "ndif":
        return model
    from mechbook.nnsight_backend.ndif import check_ndif_client, served_hub_id
    from mechbook.nnsight_backend.runner import NnsightRunner

    check_ndif_client(backend)
    if backend == "ndif":
        if model.source != "hub":
            raise MechbookError(f"NDIF runs models of the Hugging Face hub (e.g. gpt2, EleutherAI/gpt-j-6B); "
                                f"{model.name} is a {model.source} model: use backend='nnsight' to run it here")
        served_hub_id(model.name, "backend='nnsight'")
        remote = True
    elif remote not in (False, "local"):
        raise MechbookError(f"remote={remote!r}: the nnsight backend takes remote='local' (a dry run of the "
                            "remote path here); use backend='ndif' to run on NDIF")
    return dataclasses.replace(model, backend=backend, runner=NnsightRunner(model, remote))
