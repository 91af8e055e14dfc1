"""Which chapters run with ``backend="ndif"`` and no weights here, against a stand-in for NDIF.

NDIF cannot be reached from here. Each chapter's code cells run in this process (IPython) with
``model_name = "gemma3-270m"`` and ``backend = "ndif"``: gemma3-270m is added to the models NDIF serves
for the run, ``load_model`` reads only its config and tokenizer (from mechbook's cache), and every remote
trace goes to the stand-in server of ``tests/ndif_stand_in.py``, which holds the weights. The chapter
publishes into a temporary copy of results/; its tables are compared with the committed ones (written by
the local backend) as in tests/book/test_backend_chapters.py.

Printed: one line per chapter: ok (tables equal) / refused (the one-line error) / failed, the requests sent
and the seconds.

Usage (one chapter per process, as papermill would):

    python benchmarks/weightless_chapters.py a1 a4 b5
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma3-270m"


def run_one(key: str) -> None:
    import nbformat
    import pandas as pd
    from IPython.core.interactiveshell import InteractiveShell

    sys.path.insert(0, str(ROOT / "tests"))
    from ndif_stand_in import server_stand_in
    from nnsight.modeling.mixins.remotable import Remotable
    from transformers import AutoTokenizer

    from mechbook.book.results import MARKER, RESULTS_ENV
    from mechbook.core import loading
    from mechbook import backends
    from mechbook.nnsight_backend import ndif
    from mechbook.store.cache import cached_model_dir

    folder = cached_model_dir(MODEL)
    loading.load_model(MODEL)  # builds the cached copy if it is missing
    ndif.NDIF_MODELS[MODEL] = "google/gemma-3-270m"
    loading.config_folder = lambda hub_id: folder  # config and tokenizer files only are read from it
    stand_in = server_stand_in(folder, AutoTokenizer.from_pretrained(str(folder)))
    Remotable._remote_backend = lambda self, remote, *args: stand_in
    os.environ.setdefault("NDIF_API_KEY", "stand-in")
    os.environ["TQDM_DISABLE"] = "1"

    path = next((ROOT / "book").glob(f"{key}_*.ipynb"), None) or next((ROOT / "drafts").glob(f"{key}_*.ipynb"))
    nb = nbformat.read(path, as_version=4)
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(ROOT / "results", tmp / "results")
    shutil.rmtree(tmp / "results" / MODEL / path.stem, ignore_errors=True)
    os.environ[RESULTS_ENV] = str(tmp / "results")
    os.chdir(path.parent)
    shell = InteractiveShell.instance()
    traces, start, status = 0, time.time(), "ok"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = cell.source
        if "parameters" in cell.metadata.get("tags", []):
            source += f'\nmodel_name = "{MODEL}"\nbackend = "ndif"'
        with contextlib.redirect_stdout(io.StringIO()):  # the chapter's printed output: not this script's
            result = shell.run_cell(source, silent=True)
        model = shell.user_ns.get("model")
        traces = getattr(getattr(model, "runner", None), "traces", traces)
        if result.error_in_exec is not None:
            err = result.error_in_exec
            status = f"{'refused' if type(err).__name__ == 'MechbookError' else 'failed'}: {type(err).__name__}: {err}"
            break
    if status == "ok":
        committed, fresh = ROOT / "results" / MODEL / path.stem, tmp / "results" / MODEL / path.stem
        if not (fresh / MARKER).is_file():
            status = "failed: no results published"
        for table in sorted(committed.glob("*.csv")):
            try:
                pd.testing.assert_frame_equal(pd.read_csv(fresh / table.name), pd.read_csv(table), check_exact=False,
                                              rtol=1e-3, atol=1e-4)
            except (AssertionError, FileNotFoundError) as exc:
                status = f"failed: {table.name} differs: {' '.join(str(exc).split())[:200]}"
                break
    print(f"{key}\t{status}\t{traces} requests\t{time.time() - start:.0f} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        run_one(sys.argv[2])
    else:
        for key in sys.argv[1:]:
            subprocess.run([sys.executable, __file__, "--one", key], check=False)
