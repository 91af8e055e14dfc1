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

from mechbook import cli
from mechbook.errors import MechbookError
from mechbook.models import DEFAULT_MODEL, known_models


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
def restore_environ():
    """The CLI sets kernel variables (TQDM_DISABLE, JUPYTER_PATH...) in os.environ; undo that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _cells_output(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


# ------------------------------------------------------------------------ discovery


def test_chapters_in_book_order(tmp_path: Path) -> None:
    for stem in ["b1_x", "a10_x", "a2_x", "a1_x", "intro", "ab_not", "c1_other_paper"]:
        (tmp_path / f"{stem}.ipynb").write_text("{}")
    assert [c.key for c in cli.find_chapters(tmp_path)] == ["a1", "a2", "a10", "b1"]


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
    (tmp_path / "models" / "smollm2-135m-v1").mkdir(parents=True)  # looks dequantized already
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
