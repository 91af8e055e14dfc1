"""The benchmark scripts parse their arguments (they are run by hand, not under pytest)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


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
    assert chapter_times.BUDGETS_SECONDS == {"a": 600, "b": 1200}
    assert chapter_times.parse_args(["--in-place", "--chapters", "b2"]).in_place
    for wrong in (["--in-place", "--model", "smollm2-135m"], ["--in-place", "--keep", "x"]):
        with pytest.raises(SystemExit):
            chapter_times.parse_args(wrong)
    assert "--in-place refreshes" in capsys.readouterr().err


def test_chapter_times_runs_chapters_into_a_temporary_results_folder(monkeypatch, tmp_path, capsys):
    """time_chapters: a-chapters by default, MECHBOOK_RESULTS set for the kernels, totals against the budget."""
    from mechbook.book import cli
    from mechbook.book import results

    chapter_times = _load("chapter_times")
    seen = {}

    def fake_run(chapters, *, book_dir, out_dir, parameters, strip, stop_on_failure):
        seen["chapters"] = [c.key for c in chapters]
        seen["results_env"] = os.environ[results.RESULTS_ENV]
        seen["parameters"] = parameters
        return [cli.ChapterResult(c.key, "ok", 700.0 if c.key == "a1" else 1.0, "") for c in chapters]

    monkeypatch.setattr(cli, "run_chapters", fake_run)
    monkeypatch.setenv(results.RESULTS_ENV, "before")  # recorded, so the value time_chapters sets is undone
    assert chapter_times.time_chapters("gemma3-270m", None, tmp_path / "kept") == 0
    out = capsys.readouterr().out
    assert seen["chapters"] and all(key.startswith("a") for key in seen["chapters"])
    assert seen["results_env"] == str(tmp_path / "kept" / "results")
    assert all(p["model_name"] == "gemma3-270m" for p in seen["parameters"].values())
    assert "OVER by" in out  # 700 s for a1 alone exceeds Paper A's 600 s


def test_chapter_times_borrows_the_committed_results_of_chapters_not_run(monkeypatch, tmp_path, capsys):
    """b7 alone reads b2's circuits: the temporary results folder holds b2's committed results, never b7's."""
    from mechbook.book import cli
    from mechbook.book import results

    chapter_times = _load("chapter_times")
    committed = cli.find_root() / "results" / "gemma3-270m"
    seen = {}

    def fake_run(chapters, *, book_dir, out_dir, parameters, strip, stop_on_failure):
        folder = Path(os.environ[results.RESULTS_ENV]) / "gemma3-270m"
        seen["folders"] = sorted(p.name for p in folder.iterdir())
        seen["b2"] = {p.name: p.read_bytes() for p in (folder / "b2_node_pruning").iterdir()}
        return [cli.ChapterResult(c.key, "ok", 1.0, "") for c in chapters]

    monkeypatch.setattr(cli, "run_chapters", fake_run)
    monkeypatch.setenv(results.RESULTS_ENV, "before")
    assert chapter_times.time_chapters("gemma3-270m", ["b3", "b7"], tmp_path) == 0
    assert seen["b2"] == {p.name: p.read_bytes() for p in (committed / "b2_node_pruning").iterdir()}
    assert "b2_node_pruning" in seen["folders"] and "a1_logit_lens_capitals" in seen["folders"]
    assert not {"b3_path_patching", "b7_circuit_stability"} & set(seen["folders"])
    assert "committed results copied for the chapters to read: a1, a2" in capsys.readouterr().out
    # --on-committed: the chapters run find their own committed results too, and check their searches
    assert chapter_times.time_chapters("gemma3-270m", ["b3", "b7"], tmp_path / "on", on_committed=True) == 0
    assert {"b3_path_patching", "b7_circuit_stability"} <= set(seen["folders"])
    assert "committed results copied for the chapters to read and check: a1" in capsys.readouterr().out
    assert chapter_times.parse_args(["--on-committed"]).on_committed
    # a model with no committed results borrows nothing
    assert chapter_times.borrow_results(tmp_path / "none", tmp_path / "out", "gemma3-270m", ["b7"]) == []


def test_chapter_times_in_place_and_the_budgets(monkeypatch, capsys):
    """--in-place runs as refresh does (book/, no parameters, stripped); b7 is outside Paper B's budget."""
    from mechbook.book import cli
    from mechbook.book import results

    chapter_times = _load("chapter_times")
    monkeypatch.setenv(results.RESULTS_ENV, "before")  # the run without --in-place sets it
    seen = {}

    def fake_run(chapters, *, book_dir, out_dir, parameters, strip, stop_on_failure):
        seen.update(out_dir=out_dir, parameters=parameters, strip=strip)
        return [cli.ChapterResult(c.key, "ok", 2000.0 if c.key == "b7" else 100.0, "") for c in chapters]

    monkeypatch.setattr(cli, "run_chapters", fake_run)
    assert chapter_times.time_chapters("gemma3-270m", ["b1", "b2", "b7"], None, in_place=True) == 0
    out = capsys.readouterr().out
    assert seen == {"out_dir": None, "parameters": None, "strip": True}
    assert "Paper B: 2 chapter(s), 200 s" in out and "-> within" in out
    assert chapter_times.time_chapters("smollm2-135m", ["b2", "b7"], None) == 0
    out = capsys.readouterr().out
    assert "every chapter run here: 2 chapter(s), 2100 s" in out and "OVER by 300 s" in out


def test_patching_speed_imports_and_parses():
    """The patching benchmark loads against the current library and takes its arguments."""
    patching_speed = _load("patching_speed")
    args = patching_speed.parse_args([])
    assert args.model == "gemma3-270m" and args.prompts == 32 and not args.without_generic
    assert patching_speed.parse_args(["--without-generic", "--prompts", "8"]).prompts == 8


def test_a_runner_without_fast_loops_takes_the_generic_path(tiny_model):
    import dataclasses

    from mechbook.core.architectures import has_fast_loop
    from mechbook.core.names import act_name
    from mechbook.core.runs import LocalRunner, run_from_layer, run_last, tokenize

    batch = tokenize(tiny_model, ["1 2 3 4 5", "one two"])
    full, cache = run_last(tiny_model, batch, names=[act_name("resid_pre", 1)])
    slow = dataclasses.replace(tiny_model, runner=LocalRunner(fast_loops=False))
    assert not has_fast_loop(slow)
    generic, _ = run_from_layer(slow, cache[act_name("resid_pre", 1)], 1, batch.last_pos)
    assert (generic - full).abs().max() < 1e-5


def test_node_pruning_benchmark_arguments_and_its_literal_loop(tiny_gpt2, capsys):
    from conftest import random_circuit_task
    from mechbook.core.circuits import prune_nodes
    from mechbook.papers.seqcont.task_circuits import TaskSet

    node_pruning = _load("node_pruning")
    args = node_pruning.parse_args([])
    assert (args.model, args.task, args.sizes, args.threads) == ("gemma3-270m", "numerals", [8, 32, 128], 1)
    assert node_pruning.parse_args(["--sizes", "4", "16", "--task", "months"]).sizes == [4, 16]
    with pytest.raises(SystemExit):
        node_pruning.parse_args(["--sizes", "0"])
    with pytest.raises(SystemExit):
        node_pruning.parse_args(["--task", "letters"])
    # the loop the benchmark times takes the paper's decisions, the ones prune_nodes takes
    clean, _, means, metric = random_circuit_task(tiny_gpt2, n_prompts=5, length=8, seed=0)
    task = TaskSet("t", None, None, clean, means, metric, metric.answer_ids)
    found = prune_nodes(tiny_gpt2, clean, means, metric, threshold=0.3)
    decisions = node_pruning.literal_loop(tiny_gpt2, task, 0.3)
    assert decisions == list(zip(found.log.component, found.log.removed)) and any(r for _, r in decisions)


def test_ablated_mlps_benchmark_arguments_and_its_comparisons(tiny_gpt2):
    from conftest import random_circuit_task
    from mechbook.core import runs
    from mechbook.core.circuits import Circuit
    from mechbook.core.path_patching import circuit_edges
    from mechbook.papers.seqcont.task_circuits import TaskSet

    bench = _load("ablated_mlps")
    args = bench.parse_args([])
    assert (args.model, args.task, args.edges, args.threads) == ("gemma3-270m", "numerals", 200, 1)
    assert bench.parse_args(["--edges", "0", "--task", "months"]).edges == 0
    assert args.only is None and bench.parse_args(["--only", "edges"]).only == "edges"
    with pytest.raises(SystemExit):
        bench.parse_args(["--edges", "-1"])
    # the three runs it times give the same numbers, and the switches are back on afterwards
    clean, _, means, metric = random_circuit_task(tiny_gpt2, n_prompts=4, length=8, seed=1)
    task = TaskSet("t", None, None, clean, means, metric, metric.answer_ids)
    circuit = Circuit([(0, 0), (0, 2), (1, 1), (1, 3)], [1])
    edges = bench.compare_edges(tiny_gpt2, task, circuit, circuit_edges(circuit.heads, circuit.mlps))
    nodes = bench.compare_nodes(tiny_gpt2, task)
    assert edges["same"] and nodes["same"] and runs.runner(tiny_gpt2) == runs.LocalRunner()
    assert nodes["every"] == nodes["mlps"] == nodes["skipped"] and "speed-up" not in bench.row("x", nodes)
    assert len(edges["seconds"]) == 3 and bench.row("x", edges).count("|") == bench.HEADER.count("|")
    assert bench.row("x", edges).endswith("| yes |")


def test_check_cost_arguments(capsys):
    check_cost = _load("check_cost")
    args = check_cost.parse_args([])
    assert args.model == "gemma3-270m" and args.chapters == ["b2", "b3", "b4", "b6", "b7"]
    assert check_cost.parse_args(["--chapters", "b4", "--model", "smollm2-135m"]).chapters == ["b4"]
    with pytest.raises(SystemExit):
        check_cost.parse_args(["--chapters", "a1"])
    assert check_cost.SHARE == 10
