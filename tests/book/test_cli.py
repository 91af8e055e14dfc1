"""The command line: chapter discovery, bad input, and the run / refresh plumbing.

No model is loaded: the notebooks here are tiny throwaway chapters in a temporary
repository, whose ``parameters`` cell only sets ``model_name``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mechbook.book import cli
from mechbook.core.errors import MechbookError
from mechbook.book import results
from mechbook.core.loading import DEFAULT_MODEL, known_models
from mechbook.store.cache import cached_model_dir


def _chapter(path: Path, body: str = "print(model_name)", default: str = DEFAULT_MODEL) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [
        new_markdown_cell(f"# {path.stem}"),
        new_code_cell(f'model_name = "{default}"', metadata={"tags": ["parameters"]}),
        new_code_cell(body),
    ]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A throwaway repository: _toc.yml and book/ with chapters a1, a2, b1 and a non-chapter."""
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    book = tmp_path / "book"
    book.mkdir()
    (book / "intro.md").write_text("# intro\n")
    _chapter(book / "a1_first.ipynb")
    _chapter(book / "a2_second.ipynb", body="import sys\nprint(len(sys.argv) > 0)")
    _chapter(book / "b1_third.ipynb", body="print(model_name.upper())")
    _chapter(book / "scratch.ipynb")  # not a chapter: no a<N>/b<N> prefix
    return tmp_path


@pytest.fixture(autouse=True)
def _environ_restored(restore_environ):
    """The CLI sets kernel variables in os.environ; conftest's restore_environ undoes that after each test."""


def _cells_output(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


# ------------------------------------------------------------------------ discovery


def test_chapters_in_book_order(tmp_path: Path) -> None:
    for stem in ["c1_across", "b1_x", "a10_x", "a2_x", "a1_x", "intro", "ab_not", "d1_unknown_part"]:
        (tmp_path / f"{stem}.ipynb").write_text("{}")
    assert [c.key for c in cli.find_chapters(tmp_path)] == ["a1", "a2", "a10", "b1", "c1"]  # across-models last


def test_select_chapters_by_key_or_stem(repo: Path) -> None:
    chosen = cli.select_chapters(repo / "book", ["b1", "a1_first.ipynb"])
    assert [c.key for c in chosen] == ["a1", "b1"]  # book order, not argument order


def test_unknown_chapter_lists_the_chapters(repo: Path) -> None:
    with pytest.raises(MechbookError, match=r"unknown chapter 'a9'.*: a1, a2, b1$"):
        cli.select_chapters(repo / "book", ["a9"])


def test_find_root_walks_up(repo: Path) -> None:
    assert cli.find_root(repo / "book") == repo.resolve()


def test_parameters_cell_is_read_without_running(repo: Path) -> None:
    nb = nbformat.read(repo / "book" / "a1_first.ipynb", as_version=4)
    assert cli.parameters_cell_defaults(nb) == {"model_name": DEFAULT_MODEL}


# ----------------------------------------------------------------------- bad input


def test_unknown_model_is_one_line_exit_2(repo: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["--root", str(repo), "run", "--model", "gpt3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mechbook: error: unknown model 'gpt3'")
    assert all(name in err for name in known_models())


def test_a_folder_without_config_json_is_named_as_such(repo: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    code = cli.main(["--root", str(repo), "run", "--model", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "has no config.json" in err and "unknown model" not in err


def test_unknown_chapter_is_one_line_exit_2(repo: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["--root", str(repo), "run", "--model", "smollm2-135m", "--chapters", "a1", "zz"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "mechbook: error: unknown chapter 'zz'; chapters in " + str(repo / "book") + ": a1, a2, b1\n"


def test_chapter_without_parameters_cell(repo: Path, capsys: pytest.CaptureFixture) -> None:
    nb = nbformat.read(repo / "book" / "a1_first.ipynb", as_version=4)
    nb.cells[1].metadata["tags"] = []
    nbformat.write(nb, repo / "book" / "a1_first.ipynb")
    assert cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1"]) == 2
    assert "no code cell tagged 'parameters'" in capsys.readouterr().err


def test_python_dash_m_prints_no_traceback(repo: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mechbook", "--root", str(repo), "run", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


# --------------------------------------------------------------------------- models


def test_models_lists_every_model_with_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MECHBOOK_CACHE", str(tmp_path))
    cached_model_dir("smollm2-135m").mkdir(parents=True)  # looks dequantized already
    assert cli.main(["models"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    for name in known_models():
        assert name in rows
    assert rows["smollm2-135m"] == ["cached", "yes"]
    assert rows["gemma3-270m"][0] == "packaged"
    assert rows["gpt2"][0] == "hub"


# -------------------------------------------------------------------- run / refresh


def test_run_writes_one_notebook_per_chapter(repo: Path, capsys: pytest.CaptureFixture) -> None:
    out = repo / "runs"
    code = cli.main(["--root", str(repo), "run", "--model", "smollm2-135m", "--chapters", "a1", "b1", "--out", str(out)])
    summary = capsys.readouterr().out
    assert code == 0, summary
    folder = out / "smollm2-135m"
    assert sorted(p.name for p in folder.iterdir()) == ["a1_first.ipynb", "b1_third.ipynb"]
    assert "smollm2-135m" in _cells_output(folder / "a1_first.ipynb")  # the parameter reached the notebook
    assert "SMOLLM2-135M" in _cells_output(folder / "b1_third.ipynb")
    header, rule, *rows = summary.strip().splitlines()
    assert header.split() == ["chapter", "status", "seconds", "output"]
    assert [row.split()[:2] for row in rows] == [["a1", "ok"], ["b1", "ok"]]


def test_failed_chapter_is_reported_and_later_ones_run(repo: Path, capsys: pytest.CaptureFixture) -> None:
    _chapter(repo / "book" / "a2_second.ipynb", body="raise RuntimeError('broken chapter')")
    out = repo / "runs"
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--out", str(out)])
    summary = capsys.readouterr().out
    assert code == 1
    rows = summary.strip().splitlines()[2:]
    assert [row.split()[:2] for row in rows] == [["a1", "ok"], ["a2", "failed:"], ["b1", "ok"]]
    assert "RuntimeError: broken chapter" in rows[1]
    folder = out / DEFAULT_MODEL
    assert sorted(p.name for p in folder.iterdir()) == ["a1_first.ipynb", "a2_second.failed.ipynb", "b1_third.ipynb"]


def test_interrupted_run_leaves_no_notebook(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import papermill

    def killed_midway(input_path, output_path, **kwargs):
        Path(output_path).write_text('{"cells": [')  # half a notebook, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", killed_midway)
    chapter = repo / "book" / "a1_first.ipynb"
    before = chapter.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        cli.execute_notebook(chapter, chapter, cwd=repo / "book", parameters=None, label="a1")
    assert chapter.read_bytes() == before
    assert sorted(p.name for p in (repo / "book").iterdir()) == sorted(
        ["intro.md", "a1_first.ipynb", "a2_second.ipynb", "b1_third.ipynb", "scratch.ipynb"]
    )


def test_refresh_in_place_is_stable(repo: Path, capsys: pytest.CaptureFixture) -> None:
    chapter = repo / "book" / "a1_first.ipynb"
    assert cli.main(["--root", str(repo), "refresh", "--chapters", "a1"]) == 0
    first = chapter.read_bytes()
    assert cli.main(["--root", str(repo), "refresh", "--chapters", "a1"]) == 0
    assert chapter.read_bytes() == first  # unchanged code, unchanged file: git diff stays empty
    nb = json.loads(first)
    assert "papermill" not in nb["metadata"]
    assert all("papermill" not in c["metadata"] and "execution" not in c["metadata"] for c in nb["cells"])
    assert _cells_output(chapter) == f"{DEFAULT_MODEL}\n"
    assert len(nb["cells"]) == 3  # no injected-parameters cell
    assert not (repo / "book" / cli.TEMP_DIR_NAME).exists()


def test_refresh_refuses_a_non_default_model(repo: Path, capsys: pytest.CaptureFixture) -> None:
    _chapter(repo / "book" / "b1_third.ipynb", default="smollm2-135m")
    assert cli.main(["--root", str(repo), "refresh"]) == 2
    assert f'set model_name = "{DEFAULT_MODEL}"' in capsys.readouterr().err


def test_refresh_keeps_the_committed_notebook_when_a_chapter_fails(repo: Path, capsys: pytest.CaptureFixture) -> None:
    chapter = _chapter(repo / "book" / "a2_second.ipynb", body="1 / 0")
    before = chapter.read_bytes()
    assert cli.main(["--root", str(repo), "refresh", "--chapters", "a2"]) == 1
    assert chapter.read_bytes() == before
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_strip_volatile() -> None:
    nb = new_notebook()
    nb.metadata.update(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        papermill={"duration": 1.5, "start_time": "2026-01-01T00:00:00"},
    )
    nb.cells = [
        new_markdown_cell("# t", metadata={"tags": [], "papermill": {"status": "completed"}}),
        new_code_cell(
            "x = 1",
            metadata={
                "tags": ["parameters"],
                "execution": {"iopub.status.busy": "2026-01-01T00:00:00Z"},
                "papermill": {"duration": 0.1, "exception": False},
                "ExecuteTime": {"end_time": "2026-01-01"},
            },
        ),
    ]
    stripped = cli.strip_volatile(nb)
    assert stripped.metadata == {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    assert stripped.cells[0].metadata == {}
    assert stripped.cells[1].metadata == {"tags": ["parameters"]}
    assert cli.strip_volatile(stripped) == stripped  # idempotent


# ---------------------------------------------------------------------------- build


def test_build_runs_jupyter_book_with_warnings_as_errors(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, **kw: calls.append((command, kw)) or 0)
    assert cli.main(["--root", str(repo), "build"]) == 0
    (command, kwargs), = calls
    assert Path(command[0]).name == "jupyter-book"
    assert command[1:] == ["build", ".", "-W", "-n", "--keep-going"]
    assert kwargs["cwd"] == repo.resolve()


# ------------------------------------------------------------ parameters from -p


def test_parameter_reaches_only_the_chapters_that_take_it(repo: Path, capsys: pytest.CaptureFixture) -> None:
    nb = nbformat.read(repo / "book" / "a1_first.ipynb", as_version=4)
    nb.cells[1].source += "\nn_prompts = 8"
    nb.cells[2].source = "print(model_name, n_prompts + 1)"
    nbformat.write(nb, repo / "book" / "a1_first.ipynb")
    out = repo / "runs"
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "b1",
                     "--out", str(out), "-p", "n_prompts=16"])
    assert code == 0, capsys.readouterr().out
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == f"{DEFAULT_MODEL} 17\n"
    b1 = nbformat.read(out / DEFAULT_MODEL / "b1_third.ipynb", as_version=4)
    assert "n_prompts" not in "".join(c.source for c in b1.cells)  # b1 does not take it: not injected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("n_prompts=many", "mechbook: error: chapter a1: parameter n_prompts = 'many' is not an integer like its "
                           "default; pass e.g. -p n_prompts=8\n"),
        ("n_prompts=True", "is not an integer like its default; pass e.g. -p n_prompts=8\n"),
        ("threshold=0.5", "no chosen chapter takes parameter 'threshold'; they take: n_prompts, seed\n"),
        ("n_prompts", "parameter 'n_prompts' is not NAME=VALUE; write e.g. -p n_prompts=16\n"),
        ("model_name=gpt2", "set the model with --model, not -p model_name=...\n"),
    ],
)
def test_parameters_papermill_cannot_use_are_one_line_errors(
    repo: Path, capsys: pytest.CaptureFixture, given: str, message: str
) -> None:
    nb = nbformat.read(repo / "book" / "a1_first.ipynb", as_version=4)
    nb.cells[1].source += "\nn_prompts = 8\nseed = 0"
    nbformat.write(nb, repo / "book" / "a1_first.ipynb")
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "-p", given])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mechbook: error: ") and err.endswith(message)
    assert not (repo / "runs").exists()  # refused before any notebook ran


def test_a_parameter_with_an_expression_default_is_passed_as_given(repo: Path) -> None:
    nb = nbformat.read(repo / "book" / "a1_first.ipynb", as_version=4)
    nb.cells[1].source += "\nthreshold = 1 / 5"
    nbformat.write(nb, repo / "book" / "a1_first.ipynb")
    chapters = cli.select_chapters(repo / "book", ["a1"])
    assert cli.chapter_parameters(chapters, "m", ["threshold=0.3"]) == {"a1": {"model_name": "m", "threshold": 0.3}}


def test_coerce_parameter_follows_the_default() -> None:
    assert cli.coerce_parameter("x", 3, 0.5, "c") == 3.0 and isinstance(cli.coerce_parameter("x", 3, 0.5, "c"), float)
    assert cli.coerce_parameter("x", 7, "abc", "c") == "7"  # a string parameter takes any text
    assert cli.coerce_parameter("x", [1, 2], (0,), "c") == (1, 2)
    assert cli.coerce_parameter("x", "anything", None, "c") == "anything"
    with pytest.raises(MechbookError, match="pass e.g. -p x=False"):
        cli.coerce_parameter("x", 1, False, "c")


# ------------------------------------------------------------- across-models chapters


def _results_reader(path: Path) -> Path:
    """An across-models chapter: lists the models with results, as c1 does."""
    return _chapter(path, body="from mechbook.book import results\nprint(sorted(results.complete_runs()))")


def _a1_writing_results(repo: Path) -> None:
    _chapter(repo / "book" / "a1_first.ipynb",
             body="from mechbook.book import results\nresults.ChapterResults('a1_first', model_name).finish()")


def test_across_models_chapter_runs_last_and_the_book_copy_is_updated(
    repo: Path, capsys: pytest.CaptureFixture
) -> None:
    _results_reader(repo / "book" / "c1_across.ipynb")
    _a1_writing_results(repo)
    out = repo / "runs"
    code = cli.main(["--root", str(repo), "run", "--model", "smollm2-135m", "--chapters", "c1", "a1", "--out", str(out)])
    summary = capsys.readouterr().out
    assert code == 0, summary
    rows = [row.split() for row in summary.strip().splitlines()[2:]]
    assert [(r[0], r[1], Path(r[3]).parent.name) for r in rows] == [
        ("a1", "ok", "smollm2-135m"), ("c1", "ok", "smollm2-135m"), ("c1", "ok", "book")]
    assert (repo / "results" / "smollm2-135m" / "a1_first" / "_complete.json").exists()
    assert _cells_output(out / "smollm2-135m" / "c1_across.ipynb") == "['smollm2-135m']\n"
    assert _cells_output(repo / "book" / "c1_across.ipynb") == "['smollm2-135m']\n"  # what `mechbook build` shows
    assert "papermill" not in json.loads((repo / "book" / "c1_across.ipynb").read_text())["metadata"]


def test_no_book_update(repo: Path, capsys: pytest.CaptureFixture) -> None:
    book_copy = _results_reader(repo / "book" / "c1_across.ipynb")
    before = book_copy.read_bytes()
    _a1_writing_results(repo)
    assert cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1",
                     "--out", str(repo / "runs"), "--no-book-update"]) == 0
    assert book_copy.read_bytes() == before
    assert [row.split()[0] for row in capsys.readouterr().out.strip().splitlines()[2:]] == ["a1"]


def test_results_of_an_older_version_stop_an_across_models_run(
    repo: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "hub_unreachable", lambda: None)  # as if gpt2 could be downloaded (these chapters load no model)
    _results_reader(repo / "book" / "c1_across.ipynb")
    old = repo / "results" / "gpt2" / "a2_second"
    old.mkdir(parents=True)
    (old / "accuracy.csv").write_text("task,accuracy\ncapitals,0.5\n")  # no _complete.json: before markers existed
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "c1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "written by an older mechbook" in err and "python -m mechbook run --model gpt2 --chapters a2" in err
    # the run that rewrites it is allowed
    _chapter(repo / "book" / "a2_second.ipynb",
             body="from mechbook.book import results\nresults.ChapterResults('a2_second', model_name).finish()")
    code = cli.main(["--root", str(repo), "run", "--model", "gpt2", "--chapters", "a2", "c1", "--out", str(repo / "runs")])
    assert code == 0, capsys.readouterr()
    assert _cells_output(repo / "runs" / "gpt2" / "c1_across.ipynb") == "['gpt2']\n"


def test_refresh_of_an_across_models_chapter_checks_the_results(repo: Path, capsys: pytest.CaptureFixture) -> None:
    _results_reader(repo / "book" / "c1_across.ipynb")
    saved = repo / "results" / "smollm2-135m" / "b1_third"
    saved.mkdir(parents=True)
    (saved / "_complete.json").write_text(json.dumps({"model": "smollm2-135m", "chapter": "b1_third", "format": 0}))
    assert cli.main(["--root", str(repo), "refresh", "--chapters", "c1"]) == 2
    assert f"(format 0, now {results.FORMAT})" in capsys.readouterr().err


# ---------------------------------------------------------------- backends and --resume


def _takes_backend(path: Path, body: str = "print(model_name, backend)") -> Path:
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source += '\nbackend = "local"'
    nb.cells[2].source = body
    nbformat.write(nb, path)
    return path


def test_backend_reaches_every_chapter_that_takes_it(repo: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("nnsight")
    _takes_backend(repo / "book" / "a1_first.ipynb")
    _takes_backend(repo / "book" / "b1_third.ipynb", body="print(backend.upper())")
    out = repo / "runs"
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "b1", "--out", str(out),
                     "--backend", "nnsight"])
    assert code == 0, capsys.readouterr().out
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == f"{DEFAULT_MODEL} nnsight\n"
    assert _cells_output(out / DEFAULT_MODEL / "b1_third.ipynb") == "NNSIGHT\n"


def test_a_chapter_without_a_backend_parameter_is_refused_off_local(repo: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("nnsight")
    _takes_backend(repo / "book" / "a1_first.ipynb")
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "a2",
                     "--out", str(repo / "runs"), "--backend", "nnsight"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "chapter a2 takes no backend parameter" in err
    assert not (repo / "runs" / DEFAULT_MODEL).exists() or not any((repo / "runs" / DEFAULT_MODEL).iterdir())


def test_backend_is_set_with_its_option_not_a_parameter(repo: Path, capsys: pytest.CaptureFixture) -> None:
    _takes_backend(repo / "book" / "a1_first.ipynb")
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "-p", "backend=ndif"])
    assert code == 2 and capsys.readouterr().err.endswith("set the backend with --backend, not -p backend=...\n")


def _no_nnsight(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nnsight" else real(name, *a))


@pytest.mark.parametrize(
    ("backend", "model", "setup", "message"),
    [
        ("ndif", "gpt2", "no key", "needs an NDIF API key and NDIF_API_KEY is not set; export NDIF_API_KEY=<your key>"),
        ("ndif", "gpt2", "no nnsight", "needs nnsight, which is not installed; run: bash scripts/setup.sh (nnsight is in requirements.lock)"),
        ("nnsight", DEFAULT_MODEL, "no nnsight", "needs nnsight, which is not installed; run: bash scripts/setup.sh (nnsight is in requirements.lock)"),
        ("ndif", DEFAULT_MODEL, "key", f"NDIF does not serve '{DEFAULT_MODEL}'; it serves gpt2, EleutherAI/gpt-j-6B"),
        ("ndif", "EleutherAI/gpt-j-6b", "key, closed port",
         "NDIF cannot be reached (http://127.0.0.1:9/status cannot be reached (URLError)); check the network, or use "
         "--backend nnsight to run the chapters here"),
    ],
)
def test_a_backend_that_cannot_run_now_stops_the_run_before_any_chapter(
    repo: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, backend: str, model: str, setup: str,
    message: str,
) -> None:
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    if "key" in setup and setup != "no key":
        monkeypatch.setenv("NDIF_API_KEY", "test-key")
    if setup == "no nnsight":
        _no_nnsight(monkeypatch)
    elif "nnsight" not in setup:
        pytest.importorskip("nnsight")
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9")  # nothing listens on the discard port: refused at once
    for chapter in ("a1_first", "b1_third"):
        _takes_backend(repo / "book" / f"{chapter}.ipynb")
    out = repo / "runs"
    code = cli.main(["--root", str(repo), "run", "--model", model, "--chapters", "a1", "b1", "--out", str(out),
                     "--backend", backend])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("mechbook: error: "), err
    assert message in err
    assert not out.exists() and not (repo / "results").exists()  # nothing written


def test_resume_skips_the_chapters_with_complete_results(repo: Path, capsys: pytest.CaptureFixture) -> None:
    out = repo / "runs"
    _a1_writing_results(repo)
    args = ["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "b1", "--out", str(out),
            "--no-book-update"]
    assert cli.main(args) == 0
    capsys.readouterr()
    _chapter(repo / "book" / "a1_first.ipynb", body="raise RuntimeError('a1 ran again')")
    _chapter(repo / "book" / "b1_third.ipynb", body="print('b1 ran again')")
    assert cli.main([*args, "--resume"]) == 0
    rows = [row.split(maxsplit=1) for row in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [(key, rest.split()[0]) for key, rest in rows] == [("a1", "skipped:"), ("b1", "ok")]
    assert _cells_output(out / DEFAULT_MODEL / "b1_third.ipynb") == "b1 ran again\n"
    # results changed since they were written count as missing: the chapter runs again
    marker = repo / "results" / DEFAULT_MODEL / "a1_first" / results.MARKER
    (marker.parent / "extra.csv").write_text("x\n1\n")
    info = json.loads(marker.read_text())
    info["files"]["extra.csv"] = {"bytes": 1, "sha256": "0"}
    marker.write_text(json.dumps(info))
    assert cli.main([*args, "--resume"]) == 1
    assert "a1 ran again" in capsys.readouterr().out


def test_resume_reruns_a_chapter_whose_results_were_made_with_other_parameters(
    repo: Path, capsys: pytest.CaptureFixture
) -> None:
    _chapter(repo / "book" / "a1_first.ipynb", body=(
        "from mechbook.book import results\nresults.ChapterResults('a1_first', model_name).finish()\n"
        "print('a1 ran', n_prompts)"))
    nb = nbformat.read(repo / "book" / "a1_first.ipynb", as_version=4)
    nb.cells[1].source += "\nn_prompts = 8\nseed = 0"
    nbformat.write(nb, repo / "book" / "a1_first.ipynb")
    out = repo / "runs"
    args = ["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "--out", str(out),
            "--no-book-update", "--resume"]
    assert cli.main([*args, "-p", "n_prompts=16"]) == 0
    marker = repo / "results" / DEFAULT_MODEL / "a1_first" / results.MARKER
    # the defaults that applied are recorded beside the value given
    assert json.loads(marker.read_text())["parameters"] == {"model_name": DEFAULT_MODEL, "n_prompts": 16, "seed": 0}
    capsys.readouterr()
    assert cli.main(args) == 0  # the default n_prompts = 8 now: not the results' 16
    printed = capsys.readouterr().out
    assert "a1: its complete results were made with other parameters (n_prompts: 16 -> 8); running it again" in printed
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == "a1 ran 8\n"
    assert cli.main(args) == 0
    assert "skipped: complete (--resume)" in capsys.readouterr().out  # same parameters: skipped
    info = json.loads(marker.read_text())
    del info["parameters"]  # as an older mechbook wrote it
    marker.write_text(json.dumps(info))
    assert cli.main(args) == 0
    assert "(no parameters recorded); running it again" in capsys.readouterr().out


@pytest.mark.parametrize(("cell", "given", "message"), [
    ("threshold = 0.2", "threshold=0", "chapter a1: parameter threshold = 0.0 is out of range: it must be a fraction of "
                                       "the full model's score (> 0 and <= 1); pass e.g. -p threshold=0.2\n"),
    ("tasks = ['capitals']", "tasks=[]", "chapter a1: parameter tasks = [] is out of range: it must be a list of task "
                                         "names (a non-empty list of distinct names); pass e.g. -p tasks=['capitals']\n"),
    ("tasks = ['capitals']", "tasks=['capitals','kapitals']", "chapter a1: parameter tasks = ['capitals', 'kapitals'] "
                                                              "names unknown 'kapitals'; known: capitals, "),
])
def test_values_the_library_would_refuse_are_refused_before_any_chapter(
    repo: Path, capsys: pytest.CaptureFixture, cell: str, given: str, message: str
) -> None:
    """The CLI checks with the library's own table: nothing passes here to fail minutes into a chapter."""
    nb = nbformat.read(repo / "book" / "a1_first.ipynb", as_version=4)
    nb.cells[1].source += f"\n{cell}"
    nbformat.write(nb, repo / "book" / "a1_first.ipynb")
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "-p", given])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message.rstrip("\n") in err and err.endswith("\n")
    assert not (repo / "runs").exists()


def test_models_says_which_backends_run_each_model(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["model", "source", "loads", "now", "backends"]
    rows = {line.split()[0]: line for line in lines[2:] if line.strip() and not line.startswith(("Any", "backends"))}
    assert "local, nnsight " in rows[DEFAULT_MODEL] and "ndif" not in rows[DEFAULT_MODEL]
    assert "local, nnsight, ndif" in rows["EleutherAI/gpt-j-6B"]
    assert "bigscience/bloom-560m" in rows and "nnsight" not in rows["bigscience/bloom-560m"]  # no module layout
    assert rows["meta-llama/Llama-3.1-405B"].split()[1:4] == ["ndif", "no", "ndif"]


def _ndif_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nnsight")
    from mechbook.nnsight_backend import ndif

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setattr(ndif, "ndif_unreachable", lambda timeout=2.0: None)  # as if NDIF answered


def test_ndif_needs_only_the_config_and_tokenizer_here_and_says_so(repo: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mechbook.store import hub

    _ndif_answers(monkeypatch)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "no network in the tests")
    _takes_backend(repo / "book" / "a1_first.ipynb")
    code = cli.main(["--root", str(repo), "run", "--model", "meta-llama/Llama-3.1-405B", "--chapters", "a1",
                     "--out", str(repo / "runs"), "--backend", "ndif"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--backend ndif needs the config and tokenizer of 'meta-llama/Llama-3.1-405B' (no weights)" in err
    assert not (repo / "runs").exists()


def test_ndif_runs_without_loading_weights_here(repo: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A model NDIF serves but the registry does not know runs; nothing looks for or loads its weights here."""
    from mechbook.core import loading
    from mechbook.nnsight_backend import weightless

    _ndif_answers(monkeypatch)
    config_only = repo / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    asked = []
    monkeypatch.setattr(weightless, "config_folder", lambda hub_id: asked.append(hub_id) or config_only)
    for name in ("check_model_name", "in_hub_cache", "model_status"):
        monkeypatch.setattr(cli, name, lambda *a, **k: pytest.fail("the CLI looked for the weights"))
    monkeypatch.setattr(loading, "_load_with_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    _takes_backend(repo / "book" / "a1_first.ipynb")
    code = cli.main(["--root", str(repo), "run", "--model", "meta-llama/Llama-3.1-8B", "--chapters", "a1",
                     "--out", str(repo / "runs"), "--backend", "ndif", "--no-book-update"])
    assert code == 0, capsys.readouterr()
    assert asked == ["meta-llama/Llama-3.1-8B"]
    out = repo / "runs" / results.safe_name("meta-llama/Llama-3.1-8B") / "a1_first.ipynb"
    assert _cells_output(out) == "meta-llama/Llama-3.1-8B ndif\n"  # the name as given, not made a path


def test_a_chapter_that_fails_midway_publishes_nothing_and_resume_reruns_it(
    repo: Path, capsys: pytest.CaptureFixture
) -> None:
    """As when NDIF drops the connection halfway: the staged tables are never published."""
    _chapter(repo / "book" / "a1_first.ipynb", body=(
        "import pandas as pd\nfrom mechbook.book import results\nfrom mechbook import MechbookError\n"
        "out = results.ChapterResults('a1_first', model_name)\nout.save('half', pd.DataFrame({'x': [1]}))\n"
        "raise MechbookError('NDIF could not run the request: connection dropped')"))
    args = ["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "--out", str(repo / "runs"),
            "--no-book-update", "--resume"]
    assert cli.main(args) == 1
    assert "NDIF could not run the request: connection dropped" in capsys.readouterr().out
    model_dir = repo / "results" / DEFAULT_MODEL
    assert not (model_dir / "a1_first").exists()
    assert not results.is_complete(DEFAULT_MODEL, "a1_first", repo / "results")
    _a1_writing_results(repo)
    assert cli.main(args) == 0  # not skipped: it had no complete results
    assert "a1       ok" in capsys.readouterr().out
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == ["a1_first"]


# ------------------------------------------------------------------------- device and dtype


def _takes_placement(path: Path, body: str = "print(model_name, device, dtype)") -> Path:
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source += '\ndevice = "cpu"\ndtype = "float32"'
    nb.cells[2].source = body
    nbformat.write(nb, path)
    return path


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """torch in this process sees ``count`` CUDA GPUs (the chapters run in kernels of their own)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_and_dtype_reach_every_chapter_that_takes_them(repo: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 1)
    _takes_placement(repo / "book" / "a1_first.ipynb")
    _takes_placement(repo / "book" / "b1_third.ipynb", body="print(device.upper(), dtype.upper())")
    out = repo / "runs"
    args = ["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--out", str(out), "--chapters", "a1", "b1"]
    assert cli.main([*args, "--device", "cuda:0", "--dtype", "bfloat16"]) == 0, capsys.readouterr().out
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == f"{DEFAULT_MODEL} cuda:0 bfloat16\n"
    assert _cells_output(out / DEFAULT_MODEL / "b1_third.ipynb") == "CUDA:0 BFLOAT16\n"
    assert cli.main([*args, "a2"]) == 0, capsys.readouterr().out  # the defaults: auto (load_model picks), float32
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == f"{DEFAULT_MODEL} auto float32\n"
    assert _cells_output(out / DEFAULT_MODEL / "a2_second.ipynb") == "True\n"  # takes neither: auto asks nothing


def test_dtype_reaches_load_model_through_the_chapter(repo: Path, capsys: pytest.CaptureFixture,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """CLI -> papermill parameter -> the chapter's load_model: the weights are bfloat16 and provenance says so."""
    from conftest import build_tiny_model

    tiny = build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2-cli"))
    _takes_placement(repo / "book" / "a1_first.ipynb", body=(
        "import mechbook\nfrom mechbook.book import provenance\n"
        "model = mechbook.load_model(model_name, device=device, dtype=dtype)\n"
        "print(model.device, model.dtype, sorted(provenance.placement(model).items()))"))
    out = repo / "runs"
    code = cli.main(["--root", str(repo), "run", "--model", str(tiny), "--chapters", "a1", "--out", str(out),
                     "--device", "cpu", "--dtype", "bfloat16", "--no-book-update"])
    assert code == 0, capsys.readouterr().out
    printed = _cells_output(out / results.safe_name(str(tiny)) / "a1_first.ipynb")
    assert printed == "cpu torch.bfloat16 [('device', 'cpu'), ('dtype', 'bfloat16')]\n"


@pytest.mark.parametrize(
    ("gpus", "given", "message"),
    [
        (0, ["--device", "cuda"], "--device cuda: this machine has no CUDA GPU that torch "),
        (0, ["--device", "cuda:0"], "--device cuda:0: this machine has no CUDA GPU that torch "),
        (1, ["--device", "cuda:1"], "--device cuda:1: this machine has 1 CUDA GPU (cuda:0..cuda:0); pick one of them"),
        (0, ["--device", "gpu"], "--device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        (1, ["--device", "cuda", "--backend", "ndif"], "--device cuda does not apply to --backend ndif"),
        (0, ["--dtype", "float16", "--backend", "ndif"], "--dtype float16 does not apply to --backend ndif"),
        (0, ["--dtype", "float16", "--chapters", "a1", "a2"],
         'chapter a2 takes no dtype parameter, so it cannot run with --dtype float16; add dtype = "float32" to its '
         "parameters cell, or leave it out"),
        (0, ["-p", "device=cuda"], "set the device with --device, not -p device=..."),
    ],
)
def test_a_device_or_dtype_that_cannot_run_stops_the_run_before_any_chapter(
    repo: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, gpus: int, given: list[str],
    message: str,
) -> None:
    _gpus(monkeypatch, gpus)
    for chapter in ("a1_first", "b1_third"):
        _takes_placement(repo / "book" / f"{chapter}.ipynb")
    out = repo / "runs"
    chosen = [] if "--chapters" in given else ["--chapters", "a1", "b1"]
    code = cli.main(["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--out", str(out), *chosen, *given])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("mechbook: error: "), err
    assert message in err
    assert not out.exists() and not (repo / "results").exists()  # nothing ran, nothing written


def test_refresh_and_the_committed_chapters_keep_the_cpu_in_float32() -> None:
    """refresh takes no --device: the chapters run on their defaults, with which the committed outputs were made;
    every chapter that loads a model takes device and dtype and hands them to load_model."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["refresh", "--device", "cuda"])
    root = Path(__file__).resolve().parents[2]
    loading = 0
    for chapter in cli.find_chapters(root / "book"):
        nb = nbformat.read(chapter.path, as_version=4)
        code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
        if "load_model(" not in code:
            continue
        loading += 1
        defaults = cli.parameters_cell_defaults(nb)
        assert (defaults.get("device"), defaults.get("dtype")) == ("cpu", "float32"), chapter.key
        assert "device=device, dtype=dtype)" in code, f"chapter {chapter.key} does not pass device and dtype"
    assert loading >= 13


def test_a_root_or_build_folder_that_is_a_file_is_one_line_exit_2(repo: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert cli.main(["--root", str(afile), "models"]) == 2  # the models table printed before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the mechbook project" in err
    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: pytest.fail("jupyter-book started"))
    assert cli.main(["--root", str(repo), "build", "--path-output", str(afile)]) == 2  # a Sphinx traceback before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--path-output" in err and "is a file" in err


def test_recompute_and_resume_reach_the_chapters_kernels(repo: Path, capsys: pytest.CaptureFixture) -> None:
    """--recompute and --resume tell each chapter's kernel (mechbook.book.searches reads them); unset otherwise."""
    from mechbook.book import searches

    _chapter(repo / "book" / "a1_first.ipynb", body=(
        "import os\nprint(os.environ.get('MECHBOOK_RECOMPUTE'), os.environ.get('MECHBOOK_RESUME'))"))
    out = repo / "runs"
    args = ["--root", str(repo), "run", "--model", DEFAULT_MODEL, "--chapters", "a1", "--out", str(out),
            "--no-book-update"]
    assert cli.main([*args, "--recompute"]) == 0
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == "1 None\n"
    assert cli.main([*args, "--resume"]) == 0
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == "None 1\n"
    assert cli.main(args) == 0
    assert _cells_output(out / DEFAULT_MODEL / "a1_first.ipynb") == "None None\n"
    assert searches.RECOMPUTE_ENV not in os.environ and searches.RESUME_ENV not in os.environ
    assert cli.build_parser().parse_args(["refresh", "--recompute"]).recompute
    # refresh takes --resume too: the chapter re-executed in place sees it
    assert cli.main(["--root", str(repo), "refresh", "--chapters", "a1", "--resume"]) == 0
    assert _cells_output(repo / "book" / "a1_first.ipynb") == "None 1\n"
    assert searches.RESUME_ENV not in os.environ
