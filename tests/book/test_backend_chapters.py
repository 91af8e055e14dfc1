"""Chapters a1 and b1 run end to end with ``backend="nnsight"`` and publish the results the local backend did.

Each chapter runs through the CLI (``run --backend nnsight``) on gemma3-270m, publishing into a temporary
copy of results/; its tables must equal the committed ones (written by the local backend) to their five
printed digits, and every forward pass must have gone through nnsight (each trace is counted).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mechbook.book import cli
from mechbook.book.results import MARKER, RESULTS_ENV
from mechbook.nnsight_backend.runner import TRACE_COUNT_ENV
from mechbook.core.loading import DEFAULT_MODEL

pytest.importorskip("nnsight")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = {"a1": "a1_logit_lens_capitals", "b1": "b1_sequence_data"}


@pytest.fixture(autouse=True)
def _environ_restored(restore_environ):
    """The CLI sets kernel variables in os.environ; conftest's restore_environ undoes that after each test."""


@pytest.mark.parametrize("key", sorted(CHAPTERS))
def test_chapter_runs_on_nnsight_and_matches_the_local_results(key, tmp_path, monkeypatch, capsys):
    committed = ROOT / "results" / DEFAULT_MODEL / CHAPTERS[key]
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)
    shutil.rmtree(results / DEFAULT_MODEL / CHAPTERS[key])  # only this run can publish it again
    monkeypatch.setenv(RESULTS_ENV, str(results))
    monkeypatch.setenv(TRACE_COUNT_ENV, str(tmp_path / "traces"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = cli.main(["--root", str(ROOT), "run", "--model", DEFAULT_MODEL, "--chapters", key, "--backend", "nnsight",
                     "--out", str(tmp_path / "runs"), "--no-book-update", "--device", "cpu"])  # as committed
    assert code == 0, capsys.readouterr().out
    assert len((tmp_path / "traces").read_text().splitlines()) > 0  # the forward passes went through nnsight
    fresh = results / DEFAULT_MODEL / CHAPTERS[key]
    assert (fresh / MARKER).is_file()
    tables = sorted(p.name for p in committed.glob("*.csv"))
    assert tables and tables == sorted(p.name for p in fresh.glob("*.csv"))
    for name in tables:
        want, got = pd.read_csv(committed / name), pd.read_csv(fresh / name)
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-3, atol=1e-4, obj=name)
