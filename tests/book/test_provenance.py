"""What produced a chapter's results: recorded in its marker, shown in a box with download links; tables read cleanly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechbook.book import across_models, lock, provenance, results, site_results, tables
from mechbook.core import loading
from mechbook.core.errors import MechbookError
from mechbook.store import cache


@pytest.fixture
def local_model(tmp_path: Path) -> Path:
    """A 'model folder' as load_model takes it: its weights file is what provenance hashes."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"not really weights")
    return folder


def test_finish_records_provenance_beside_the_checked_files(tmp_path, local_model, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    saved = results.ChapterResults("a1_test", str(local_model), root=tmp_path / "results")
    saved.save("table", pd.DataFrame({"x": [1, 2]}))
    saved.finish()
    marker = json.loads((saved.final / results.MARKER).read_text())
    found = marker["provenance"]
    assert set(marker["files"]) == {"table.csv"}  # provenance is not one of the checked files
    assert found["model"]["source"] == "local"
    assert found["model"]["files"]["model.safetensors"] == cache.sha256(local_model / "model.safetensors")
    assert set(found["versions"]) >= {"python", "torch", "transformers", "transformer-lens"}
    assert found["versions"]["torch"] and found["cpu"]["name"]
    # the lock this checkout holds, every installed package, and how they differ from the lock
    assert found["versions"]["lock"] == lock.lock_sha256() and len(found["versions"]["lock"]) == len(lock.LOCK_FILES)
    assert found["versions"]["installed"]["torch"] == found["versions"]["torch"]
    assert found["versions"]["differs_from_lock"] == lock.differences(found["versions"]["installed"], lock.locked())
    assert found["mechbook"]["commit"] is None or len(found["mechbook"]["commit"]) == 40
    assert found["wall_seconds"] > 0 and found["finished"] >= found["started"]
    results.check_results(tmp_path / "results")  # readers still accept the marker


def test_box_links_every_saved_file_from_the_chapter_page(tmp_path, local_model, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    root = tmp_path / "results"
    book = tmp_path / "book"
    book.mkdir()
    saved = results.ChapterResults("a1_test", str(local_model), root=root)
    with pytest.raises(MechbookError, match="finish"):
        provenance.box(saved)
    saved.save("table", pd.DataFrame({"x": [1]}))
    saved.save("facts", {"layer": 3})
    saved.finish()
    monkeypatch.chdir(book)  # chapters run in book/
    box = provenance.box(saved)
    folder = f"../results/{results.safe_name(str(local_model))}/a1_test"
    assert [d.href for d in box.downloads] == [f"{folder}/facts.json", f"{folder}/table.csv", f"{folder}/_complete.json"]
    page = box._repr_html_()
    assert f'<a href="{folder}/table.csv" download>table.csv</a>' in page
    assert "sha256" in page and "wall time" in page and "transformer-lens" in page
    assert all((book / d.href).is_file() for d in box.downloads)


def test_box_says_when_results_have_no_provenance(tmp_path):
    saved = results.ChapterResults("a1_test", "m", root=tmp_path)
    saved.save("table", pd.DataFrame({"x": [1]}))
    saved.finish()
    marker = saved.final / results.MARKER
    info = json.loads(marker.read_text())
    del info["provenance"]
    marker.write_text(json.dumps(info))
    assert "rerun the chapter" in repr(provenance.box(saved))


def test_runs_table_lists_each_model_and_chapter(tmp_path, local_model, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    for chapter in ("a1_test", "b2_test"):
        saved = results.ChapterResults(chapter, str(local_model), root=tmp_path)
        saved.save("table", pd.DataFrame({"x": [1]}))
        saved.finish()
    rows = across_models.runs(tmp_path)
    assert [(r["model"], r["chapter"]) for r in rows] == [(str(local_model), "a1_test"), (str(local_model), "b2_test")]
    assert "a1_test" in across_models.runs_table(tmp_path)._repr_html_()


def test_file_sha256_is_kept_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"one")
    first = cache.file_sha256(path)
    assert json.loads((tmp_path / "cache" / cache.SHA256_CACHE).read_text())[str(path.resolve())]["sha256"] == first
    path.write_bytes(b"two!")  # another size: hashed again
    assert cache.file_sha256(path) == cache.sha256(path) != first


def test_the_box_says_whether_the_versions_were_the_locked_ones():
    headline = {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0", "transformer-lens": "4.3.0"}
    sha = {name: "ab" * 32 for name in lock.LOCK_FILES}
    as_locked = provenance.software_text({**headline, "lock": sha, "differs_from_lock": [], "installed": {"x": "1"}})
    assert as_locked == ("Python 3.11.7, torch 2.13.0+cpu, transformers 5.24.0, transformer-lens 4.3.0: the versions "
                         "locked in requirements.lock (sha256 abababababab), as was every package")
    other = provenance.software_text({**headline, "transformers": "5.25.0", "lock": sha,
                                      "differs_from_lock": ["transformers 5.25.0 (lock 5.24.0)"]})
    assert other == ("Python 3.11.7, torch 2.13.0+cpu, transformers 5.25.0, transformer-lens 4.3.0; the run differs "
                     "from requirements.lock in 1 package(s): transformers 5.25.0 (lock 5.24.0) (sha256 abababababab)")
    assert provenance.software_text(headline) == "Python 3.11.7, torch 2.13.0+cpu, transformers 5.24.0, transformer-lens 4.3.0"
    assert "no lock compared" in provenance.software_text({**headline, "lock": None, "differs_from_lock": None})


def test_an_uncommitted_lock_makes_the_run_dirty(tmp_path):
    """The lock is part of what made the results: a changed one is recorded as uncommitted, as a changed library is."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "m.py").write_text("x = 1\n")
    (tmp_path / "requirements.lock").write_text("torch==2.13.0+cpu\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert provenance.git_state(tmp_path)["dirty"] is False
    (tmp_path / "requirements.lock").write_text("torch==2.14.0+cpu\n")
    assert provenance.git_state(tmp_path)["dirty"] is True


def _committed_markers() -> list[tuple[str, dict]]:
    root = Path(__file__).resolve().parents[2] / "results"
    markers = sorted(root.glob(f"*/*/{results.MARKER}"))
    assert markers, f"no committed results under {root}"
    return [(f"{m.parent.parent.name}/{m.parent.name}", json.loads(m.read_text())) for m in markers]


def test_no_committed_result_was_made_from_uncommitted_code():
    """A dirty record's code is in no commit: re-execute the chapter from a clean checkout (python -m mechbook run)."""
    dirty = [where for where, info in _committed_markers()
             if ((info.get("provenance") or {}).get("mechbook") or {}).get("dirty") is not False]
    if dirty:
        pytest.fail(f"{len(dirty)} committed results were made from uncommitted code (or record no commit); "
                    f"re-execute them from a clean checkout: {', '.join(dirty)}", pytrace=False)


def test_committed_results_were_made_with_the_locked_versions():
    """The versions each committed result records are the lock's: else re-execute it (bash scripts/lock.sh lists them)."""
    root = Path(__file__).resolve().parents[2]
    stale = lock.stale(root / "results", lock.locked(root))
    if stale:
        pytest.fail(f"{len(stale)} committed results were made with other versions than requirements.lock; re-execute "
                    "them: " + "; ".join(f"{where} ({why})" for where, why in stale[:6])
                    + (f"; and {len(stale) - 6} more (bash scripts/lock.sh lists them all)" if len(stale) > 6 else ""),
                    pytrace=False)


def test_duration_reads_as_time():
    assert [provenance.duration(s) for s in (4.26, 245, 3720)] == ["4.3 s", "4 min 05 s", "1 h 02 min"]


# ------------------------------------------------------------------------------ tables


def test_missing_numbers_show_a_dash_and_the_papers_are_marked():
    pd.set_option("display.precision", 3)
    frame = pd.DataFrame({"gemma3-270m": [0.5, np.nan], "GPT-2 small (paper)": [81.0, np.nan]},
                         index=pd.Index(["numerals", "months"], name="task"))
    page = tables.to_html(frame)
    assert "NaN" not in page and page.count(">–<") == 2
    assert "81.000" in page and tables.CAPTION in page
    assert tables.paper_columns(frame) == [False, True]
    rows = pd.DataFrame({"task": ["capitals", "colored objects (paper, BLOOM-176B)"], "drop": [0.2, 0.73]})
    assert tables.paper_rows(rows) == [False, True]
    plain = tables.to_html(pd.DataFrame({"accuracy": [0.5, None]}))
    assert tables.CAPTION not in plain and ">–<" in plain


def test_a_long_table_is_cut_as_pandas_would():
    frame = pd.DataFrame({"x": [np.nan] * 500})
    page = tables.to_html(frame)
    assert "500 rows" in page and "NaN" not in page


# -------------------------------------------------------------------------- the site copy


def test_site_copy_holds_the_results_but_not_runs_in_progress(tmp_path):
    root = tmp_path / "results"
    (root / "m" / "a1_x").mkdir(parents=True)
    (root / "m" / "a1_x" / "table.csv").write_text("x\n1\n")
    (root / "m" / ".a1_x.staging-1-abc").mkdir()
    (root / "m" / ".a1_x.staging-1-abc" / "table.csv").write_text("half")
    out = tmp_path / "html"
    assert site_results.copy_results(root, out) == 1
    assert (out / "results" / "m" / "a1_x" / "table.csv").read_text() == "x\n1\n"
    assert not any(".staging" in str(p) for p in out.rglob("*"))


def test_the_backend_is_recorded_and_shown_only_off_local(tmp_path, local_model, monkeypatch):
    """The chapter's model gives the backend; the box shows it off local (committed local boxes stay as they are)."""
    from types import SimpleNamespace

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    saved = results.ChapterResults("a1_test", str(local_model), root=tmp_path / "results")
    saved.save("table", pd.DataFrame({"x": [1]}))
    saved.finish()
    box = provenance.box(saved)
    assert json.loads((saved.final / results.MARKER).read_text())["provenance"]["backend"] == "local"
    assert [k for k, _ in box.rows] == ["model", "code", "software", "CPU", "run"]
    monkeypatch.setattr(loading, "weights_origin", lambda name: pytest.fail("the weights here were looked up"))
    on_ndif = SimpleNamespace(backend="ndif", weights_here=False)
    saved = results.ChapterResults("a1_test", "meta-llama/Llama-3.1-8B", root=tmp_path / "results", model=on_ndif)
    saved.save("table", pd.DataFrame({"x": [1]}))
    saved.finish()
    found = json.loads((saved.final / results.MARKER).read_text())["provenance"]
    assert found["backend"] == "ndif" and found["model"]["source"] == "ndif"
    assert found["model"]["hub_id"] == "meta-llama/Llama-3.1-8B"
    rows = dict(provenance.box(saved).rows)
    assert rows["backend"].startswith("NDIF") and "NDIF's copy of meta-llama/Llama-3.1-8B (no weights here" in rows["model"]


def test_device_dtype_and_gpu_are_recorded_and_shown_off_cpu_float32(tmp_path, local_model, monkeypatch):
    """Where the chapter's model's weights are (device, dtype) goes into the marker, with the GPU's name on CUDA; the
    box shows a device row only off the CPU in float32 (the committed chapters' boxes stay as they are)."""
    from types import SimpleNamespace

    import torch

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"NVIDIA H100 80GB HBM3 #{device.index}")

    def published_on(device: str, dtype: torch.dtype):
        here = SimpleNamespace(backend="local", weights_here=True, device=torch.device(device), dtype=dtype)
        saved = results.ChapterResults("a1_test", str(local_model), root=tmp_path / "results", model=here)
        saved.save("table", pd.DataFrame({"x": [1]}))
        saved.finish()
        found = json.loads((saved.final / results.MARKER).read_text())["provenance"]
        return found["device"], dict(provenance.box(saved).rows)

    found, rows = published_on("cpu", torch.float32)
    assert found == {"device": "cpu", "dtype": "float32"} and "device" not in rows
    found, rows = published_on("cpu", torch.bfloat16)
    assert rows["device"] == "cpu, weights in bfloat16"
    found, rows = published_on("cuda:1", torch.float16)
    assert found == {"device": "cuda:1", "dtype": "float16", "gpu": "NVIDIA H100 80GB HBM3 #1"}
    assert rows["device"] == "NVIDIA H100 80GB HBM3 #1 (cuda:1), weights in float16"
    assert provenance.placement(SimpleNamespace(backend="ndif", weights_here=False)) is None  # NDIF's weights
    assert provenance.placement(None) is None  # a chapter without a model
