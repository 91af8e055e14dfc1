"""Chapter a4's o vectors as files among its results: where each lies, written byte-stable, read checked.

Chapter a4 keeps each task's FFN update o (Paper A, §3-4; the record is
:class:`mechbook.papers.vector_arithmetic.ffn_update.OVector`) with its published
results; chapter a5 reads them back to transplant o (§4.1). A file is safetensors:
the vector under ``"o"`` and the record's metadata beside it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from jaxtyping import Float
from torch import Tensor

from mechbook.book.results import checked_file, default_root, safe_name, sort_safetensors_header
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.papers.vector_arithmetic.ffn_update import OVector, o_vector

CHAPTER = "a4_ffn_update"  # the chapter that publishes the o vectors among its results


def o_vector_path(model_name: str, name: str, root: str | Path | None = None) -> Path:
    """Where the book keeps a model's o vectors: ``results/<model>/a4_ffn_update/o_vectors/<name>.safetensors``.

    Chapter a4 writes one per task (``capitals``, ...) and one from a single prompt
    (``capitals_one_prompt``) among its results, so its marker lists their hashes.
    """
    root = Path(root) if root else default_root()
    return root / safe_name(model_name) / CHAPTER / "o_vectors" / f"{name}.safetensors"


def save_o_vector(
    path: str | Path,
    vector: Float[Tensor, "d_model"],
    *,
    model: LoadedModel,
    layer: int,
    task: str,
    source: str,
    items: Sequence[str],
) -> Path:
    """Write o as safetensors with its record's metadata (model, layer, hook, task, width, source items).

    Written under a temporary name and renamed, so a reader never sees half a file; the
    header's keys are sorted, so the same vector and metadata give the same bytes.
    """
    from safetensors.torch import save_file

    record = o_vector(vector, model=model, layer=layer, task=task, source=source, items=items)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"o": record.vector}, tmp, metadata=record.metadata())
        sort_safetensors_header(tmp)  # the writer's metadata order changes from run to run
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_o_vector(path: str | Path, model: LoadedModel | None = None, *, allow_other_model: bool = False) -> OVector:
    """Read a saved o; with ``model``, check that it fits (same width, a valid layer, same model).

    A vector among a chapter's published results is first checked against that chapter's marker.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MechbookError(
            f"no saved o vector at {path}; run chapter a4_ffn_update for this model first "
            "(python -m mechbook run --model MODEL --chapters a4) or write one with o_vectors.save_o_vector"
        )
    checked_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            vector = fh.get_tensor("o")
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise MechbookError(
            f"{path} is not an o vector file written by save_o_vector ({exc}); recompute and save it"
        ) from exc
    found = OVector.from_metadata(vector, meta, where=str(path))
    return found if model is None else found.check_fits(model, allow_other_model=allow_other_model,
                                                        where=f"the o vector in {path}")
