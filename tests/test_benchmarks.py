"""The benchmark scripts parse their arguments (they are run by hand, not under pytest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chapter_times_arguments(capsys):
    chapter_times = _load("chapter_times")
    args = chapter_times.parse_args([])
    assert args.model == "gemma3-270m" and args.chapters is None and not args.skip_throughput
    args = chapter_times.parse_args(["--chapters", "a1", "a2", "--model", "smollm2-135m", "--skip-throughput"])
    assert args.chapters == ["a1", "a2"] and args.model == "smollm2-135m" and args.skip_throughput
    with pytest.raises(SystemExit) as exit_:
        chapter_times.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "MECHBOOK_RESULTS" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        chapter_times.parse_args(["--prompts", "0"])
    assert chapter_times.BUDGETS_SECONDS == {"a": 600, "b": 900}
