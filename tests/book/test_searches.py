"""Searched once, checked on every run (mechbook.book.searches): computed, published, loaded and re-checked.

Each kind of unit (a node pruning, as b2 and b7 run it; an edge pruning, as b3; values, as b4's circuit
scores and b6's knockouts) is computed, published, then loaded and checked; a committed unit whose metric,
verdict or circuit member was altered (with its marker's sha256 updated, so that only the check can see it)
fails the check and names the unit; other inputs, another lock or --recompute compute again; a run killed
with SIGKILL resumes from the last finished unit and ends with the logs of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechbook
from conftest import build_tiny_model, random_circuit_task, sharpen
from mechbook import MechbookError
from mechbook.book import provenance, results, searches
from mechbook.book.results import ChapterResults
from mechbook.book.searches import Searches
from mechbook.core.circuits import Circuit, circuit_metrics, prune_edges, prune_nodes, random_circuits

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parents[1]
CHAPTER = "b9_searches"
EDGE_THRESHOLD = 0.995  # the tiny models keep edges of both verdicts here (as in test_pruning_checks)


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return sharpen(build_tiny_model("gpt2", tmp_path_factory.mktemp("sharp")))


@pytest.fixture(scope="module")
def sharp(sharp_dir):
    return mechbook.load_model(str(sharp_dir))


@pytest.fixture(scope="module")
def task(sharp):
    return random_circuit_task(sharp)


@pytest.fixture
def no_flags(monkeypatch):
    monkeypatch.delenv(searches.RECOMPUTE_ENV, raising=False)
    monkeypatch.delenv(searches.RESUME_ENV, raising=False)


def run_chapter(model, task, root, **kw):
    """The chapter of these tests: one unit of each kind, published; returns (searches, what they gave)."""
    clean, _, means, metric = task
    s = Searches(CHAPTER, model, root=root, **kw)
    found = s.node_pruning("nodes", clean, means, metric, threshold=0.3)
    edges = s.edge_pruning("edges", clean, Circuit.full(model), means, metric, threshold=EDGE_THRESHOLD)
    controls = random_circuits(model, found, 30, seed=0)
    values = s.circuit_metrics("scores", clean, controls, means, metric)
    saved = ChapterResults(CHAPTER, model.name, root)
    s.save(saved)
    saved.finish()
    return s, (found, edges, values)


def record_path(model, root) -> Path:
    return root / results.safe_name(model.name) / CHAPTER / "searches.json"


def tamper(model, root, change) -> None:
    """Change the committed searches.json with ``change(record)`` and update the marker's size and sha256 to match."""
    path = record_path(model, root)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=2) + "\n")
    marker_path = path.parent / results.MARKER
    marker = json.loads(marker_path.read_text())
    data = path.read_bytes()
    marker["files"]["searches.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    marker_path.write_text(json.dumps(marker, indent=2) + "\n")
    assert results.is_complete(model.name, CHAPTER, root)  # only the check can tell


def test_computed_then_loaded_and_checked(sharp, task, tmp_path, no_flags):
    first, (found, edges, values) = run_chapter(sharp, task, tmp_path)
    assert first.outcome == "computed" and list(first.report().outcome) == ["computed"] * 3
    clean, _, means, metric = task
    # what the searches give equals the library's own functions
    direct = prune_nodes(sharp, clean, means, metric, threshold=0.3)
    assert found == direct and found.score == direct.score
    pd.testing.assert_frame_equal(found.log, direct.log, check_exact=True)
    pd.testing.assert_frame_equal(
        edges, prune_edges(sharp, clean, Circuit.full(sharp), means, metric, threshold=EDGE_THRESHOLD), check_exact=True)
    assert torch.equal(values, circuit_metrics(sharp, clean, random_circuits(sharp, found, 30, seed=0), means, metric))
    marker = json.loads((record_path(sharp, tmp_path).parent / results.MARKER).read_text())
    assert marker["searches"]["outcome"] == "computed"

    again, (found2, edges2, values2) = run_chapter(sharp, task, tmp_path)
    report = again.report()
    assert again.outcome == "checked" and list(report.outcome) == ["checked"] * 3
    assert (report.checked >= 2).all() and (report.agree + report["at threshold"] == report.checked).all()
    assert found2 == found and found2.score == found.score
    pd.testing.assert_frame_equal(found2.log, found.log, check_exact=True)
    pd.testing.assert_frame_equal(edges2, edges, check_exact=True)
    assert torch.equal(values2, values)
    # the sample: first and last decision, and a decision of each verdict
    steps = again.checks["nodes"].attrs["steps_checked"]
    assert steps[0] == 1 and steps[-1] == len(found.log)
    assert {bool(found.log.removed.iloc[s - 1]) for s in steps} == {True, False}
    marker = json.loads((record_path(sharp, tmp_path).parent / results.MARKER).read_text())
    assert marker["searches"]["outcome"] == "checked"
    assert set(marker["searches"]["computed"]) == {"nodes", "edges", "scores"}
    assert "checked, not recomputed: 3 searches" in provenance.searches_text(marker["searches"])
    assert "re-checking took" in again.summary() and again.summary().startswith("checked 3 committed searches (")


def test_the_checked_record_is_republished_byte_for_byte(sharp, task, tmp_path, no_flags):
    run_chapter(sharp, task, tmp_path)
    before = record_path(sharp, tmp_path).read_bytes()
    run_chapter(sharp, task, tmp_path)
    assert record_path(sharp, tmp_path).read_bytes() == before


def _add_back_a_removed_component(unit):
    row = next(r for r in unit["rows"] if r["removed"])
    if row["kind"] == "mlp":
        unit["circuit"]["mlps"] = sorted(unit["circuit"]["mlps"] + [row["layer"]])
    else:
        unit["circuit"]["heads"] = sorted(unit["circuit"]["heads"] + [[row["layer"], int(row["head"])]])


def _first_removed(record):
    return next(i for i, r in enumerate(record["units"]["nodes"]["rows"]) if r["removed"])


@pytest.mark.parametrize("alteration, names", [
    # a node pruning: the metric of its first decision (always re-checked), moved by 1 point
    (lambda r: r["units"]["nodes"]["rows"][0].__setitem__("score_without", r["units"]["nodes"]["rows"][0]
                                                           ["score_without"] + 1.0), "step 1:"),
    # a node pruning: a verdict flipped (with nothing else) no longer follows from its score
    (lambda r: r["units"]["nodes"]["rows"][_first_removed(r)].__setitem__("removed", False), "does not follow"),
    # a node pruning: a circuit member added that the log removed
    (lambda r: _add_back_a_removed_component(r["units"]["nodes"]), "final circuit"),
    # an edge pruning: the score of its first edge (always re-checked)
    (lambda r: r["units"]["edges"]["rows"][0].__setitem__("score", r["units"]["edges"]["rows"][0]["score"] - 3.0),
     "edge "),
    # an edge pruning: a verdict flipped
    (lambda r: r["units"]["edges"]["rows"][-1].__setitem__("kept", not r["units"]["edges"]["rows"][-1]["kept"]),
     "does not follow"),
    # values: one prompt's value of the first circuit (always re-checked)
    (lambda r: r["units"]["scores"]["values"][0].__setitem__(2, r["units"]["scores"]["values"][0][2] + 0.5),
     "circuit 0"),
])
def test_an_altered_unit_fails_the_check_and_is_named(sharp, task, tmp_path, no_flags, alteration, names):
    run_chapter(sharp, task, tmp_path)
    tamper(sharp, tmp_path, alteration)
    with pytest.raises(MechbookError, match="does not check") as err:
        run_chapter(sharp, task, tmp_path)
    assert names in str(err.value) and CHAPTER in str(err.value)


def test_b7s_prunings_one_unit_each_are_checked_and_an_altered_one_is_named(sharp, task, tmp_path, no_flags):
    """b7 runs many prunings in one chapter, each its own unit (task/size/seed): the altered one is named."""
    draws = {n: random_circuit_task(sharp, n_prompts=n, seed=n) for n in (4, 6)}

    def chapter():
        s = Searches(CHAPTER, sharp, root=tmp_path)
        out = [s.node_pruning(f"t/{n}/0", clean, means, metric, threshold=0.3)
               for n, (clean, _, means, metric) in draws.items()]
        saved = ChapterResults(CHAPTER, sharp.name, tmp_path)
        s.save(saved)
        saved.finish()
        return s, out

    _, first = chapter()
    s, second = chapter()
    assert s.outcome == "checked" and [c.labels() for c in first] == [c.labels() for c in second]
    tamper(sharp, tmp_path, lambda r: r["units"]["t/6/0"]["rows"][-1].__setitem__(
        "score_without", r["units"]["t/6/0"]["rows"][-1]["score_without"] * 0.5))
    with pytest.raises(MechbookError, match=r"'t/6/0'.*step \d+"):
        chapter()


def test_other_inputs_another_lock_or_recompute_compute_again(sharp, task, tmp_path, no_flags, monkeypatch):
    run_chapter(sharp, task, tmp_path)
    clean, _, means, metric = task
    s = Searches(CHAPTER, sharp, root=tmp_path)
    s.node_pruning("nodes", clean, means, metric, threshold=0.25)  # another threshold: another search
    assert s.rows[0]["outcome"] == "computed"
    s = Searches(CHAPTER, sharp, root=tmp_path)
    other, _, _, other_metric = random_circuit_task(sharp, seed=5)
    s.node_pruning("nodes", other, means, other_metric, threshold=0.3)  # other prompts
    assert s.rows[0]["outcome"] == "computed"
    s = Searches(CHAPTER, sharp, root=tmp_path)
    s.node_pruning("nodes", clean, {k: v * 1.01 for k, v in means.items()}, metric, threshold=0.3)  # other means
    assert s.rows[0]["outcome"] == "computed"
    # the same means up to float noise are the same means
    s = Searches(CHAPTER, sharp, root=tmp_path)
    s.node_pruning("nodes", clean, {k: v * (1 + 1e-7) for k, v in means.items()}, metric, threshold=0.3)
    assert s.rows[0]["outcome"] == "checked"
    assert Searches(CHAPTER, sharp, root=tmp_path, recompute=True).why_not == "recompute asked for"
    monkeypatch.setenv(searches.RECOMPUTE_ENV, "1")
    assert Searches(CHAPTER, sharp, root=tmp_path).committed == {}
    monkeypatch.delenv(searches.RECOMPUTE_ENV)
    monkeypatch.setattr(searches.lock, "lock_sha256", lambda root=None: {"requirements.lock": "0" * 64})
    other = Searches(CHAPTER, sharp, root=tmp_path)
    assert other.committed == {} and "another lock" in other.why_not


def test_a_model_without_results_computes(sharp, task, tmp_path, no_flags):
    s = Searches(CHAPTER, sharp, root=tmp_path)
    assert s.committed == {} and "no complete results" in s.why_not


def test_keys_are_unique_and_results_must_match(sharp, task, tmp_path, no_flags):
    clean, _, means, metric = task
    s = Searches(CHAPTER, sharp, root=tmp_path)
    s.circuit_metrics("a", clean, [Circuit([], [])], means, metric)
    with pytest.raises(MechbookError, match="used twice"):
        s.circuit_metrics("a", clean, [Circuit([], [])], means, metric)
    with pytest.raises(MechbookError, match="save each into its own chapter"):
        s.save(ChapterResults("b8_other", sharp.name, tmp_path))


RESUMABLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import mechbook
    from conftest import random_circuit_task
    from mechbook.book.results import ChapterResults
    from mechbook.book.searches import Searches
    from mechbook.core import circuits

    model = mechbook.load_model({model!r})
    slow = {slow}
    if slow:  # time for the parent to kill this run mid-search
        real = circuits._CircuitRunner.scores_without
        def scores_without(self, *a, **k):
            time.sleep(0.05)
            return real(self, *a, **k)
        circuits._CircuitRunner.scores_without = scores_without
    s = Searches("b9_searches", model, root={root!r})
    for key, n in (("first", 6), ("second", 5)):
        clean, _, means, metric = random_circuit_task(model, n_prompts=n, seed=n)
        s.node_pruning(key, clean, means, metric, threshold=0.3)
    saved = ChapterResults("b9_searches", model.name, {root!r})
    s.save(saved)
    saved.finish()
""")


def _script(sharp_dir, root, slow):
    return RESUMABLE.format(tests=str(TESTS), model=str(sharp_dir), root=str(root), slow=slow)


def test_a_killed_run_resumes_from_the_last_finished_unit(sharp_dir, sharp, tmp_path, no_flags):
    """SIGKILL mid-way through the second unit; --resume keeps the first and the second's decisions so far."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "lib"), os.environ.get("PYTHONPATH", "")]),
               TQDM_DISABLE="1")
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-c", _script(sharp_dir, plain, False)], env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    folder = killed / results.safe_name(sharp.name) / searches.CHECKPOINTS / CHAPTER
    proc = subprocess.Popen([sys.executable, "-c", _script(sharp_dir, killed, True)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            partial = folder / "second.decisions.json"
            if (folder / "first.unit.json").exists() and partial.exists() \
                    and len(json.loads(partial.read_text())["rows"]) >= 3:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (killed / results.safe_name(sharp.name) / CHAPTER).exists()  # nothing half-published
    partial = folder / "second.decisions.json"  # as if the killed run had worked on it for 1000 s
    partial.write_text(json.dumps({**json.loads(partial.read_text()), "seconds": 1000.0}))

    resumed = subprocess.run([sys.executable, "-c", _script(sharp_dir, killed, False)],
                             env=dict(env, **{searches.RESUME_ENV: "1"}), check=True, capture_output=True)
    assert resumed.returncode == 0
    a = json.loads((plain / results.safe_name(sharp.name) / CHAPTER / "searches.json").read_text())
    b = json.loads((killed / results.safe_name(sharp.name) / CHAPTER / "searches.json").read_text())
    for key in ("first", "second"):
        assert b["units"][key]["rows"] == a["units"][key]["rows"]
        assert b["units"][key]["circuit"] == a["units"][key]["circuit"]
        assert b["units"][key]["inputs"] == a["units"][key]["inputs"]
    marker = json.loads((killed / results.safe_name(sharp.name) / CHAPTER / results.MARKER).read_text())
    assert [u["outcome"] for u in marker["searches"]["units"]] == ["resumed", "computed"]
    assert b["units"]["second"]["computed"]["seconds"] >= 1000  # its time over both runs, not the last one's only
    assert not folder.exists()  # the checkpoints go once the results are published


def test_without_resume_a_run_starts_afresh(sharp, task, tmp_path, no_flags):
    folder = tmp_path / results.safe_name(sharp.name) / searches.CHECKPOINTS / CHAPTER
    folder.mkdir(parents=True)
    (folder / "nodes.unit.json").write_text("{}")
    Searches(CHAPTER, sharp, root=tmp_path)
    assert not folder.exists()


def test_value_sample_is_a_twentieth_with_both_ends():
    assert searches.value_sample(26, seed=0) == [0, 25]
    picked = searches.value_sample(100, seed=3)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 5
    assert searches.value_sample(1, seed=0) == [0]


def test_recompute_is_how_not_what(tmp_path):
    """--resume compares a chapter's parameters, but recompute changes how its results are got, not what they are."""
    saved = ChapterResults(CHAPTER, "m", tmp_path, parameters={"threshold": 0.2, "recompute": False})
    saved.save("t", {"a": 1})
    saved.finish()
    assert results.parameter_changes("m", CHAPTER, {"threshold": 0.2, "recompute": True}, tmp_path) == []
    assert results.parameter_changes("m", CHAPTER, {"threshold": 0.3, "recompute": False}, tmp_path) == [
        "threshold: 0.2 -> 0.3"]


def test_results_without_searches_compute(sharp, tmp_path, no_flags):
    """Complete results written before the chapter had searches: everything is computed, and the reason said."""
    saved = ChapterResults(CHAPTER, sharp.name, tmp_path)
    saved.save("summary", {"a": 1})
    saved.finish()
    s = Searches(CHAPTER, sharp, root=tmp_path)
    assert s.committed == {} and s.why_not == "the committed results hold no searches"


def test_a_large_pruning_publishes_prompt_values_and_is_checked_on_some_prompts(sharp, task, tmp_path, no_flags,
                                                                                monkeypatch):
    """From MATERIAL_FROM prompts on, the pruning's unit carries every prompt's metric under its sampled decisions;
    a later run checks a sample of the prompts against them, and an altered value fails and is named."""
    monkeypatch.setattr(searches, "MATERIAL_FROM", 2)
    first, (found, _, _) = run_chapter(sharp, task, tmp_path)
    record = json.loads(record_path(sharp, tmp_path).read_text())
    material = record["units"]["nodes"]["material"]
    clean = task[0]
    assert len(material["full"]) == len(clean) and len(material["values"]) == len(material["steps"]) >= 2

    again, (found2, _, _) = run_chapter(sharp, task, tmp_path)
    table = again.checks["nodes"]
    assert again.report().loc["nodes", "outcome"] == "checked" and found2 == found
    assert (table.check == "prompt values").sum() == len(material["steps"]) + 1
    assert table.attrs["prompts_checked"] < len(clean)

    def moved(record):
        for values in record["units"]["nodes"]["material"]["values"]:
            values[:] = [v + 1.0 for v in values]

    tamper(sharp, tmp_path, moved)
    with pytest.raises(MechbookError, match="'nodes'.*prompt values"):
        run_chapter(sharp, task, tmp_path)
