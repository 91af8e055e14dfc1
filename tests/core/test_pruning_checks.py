"""Re-checking prunings from their logs: the sample, agreement, tampering, cost; resuming a killed node pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mechbook
from conftest import build_tiny_model, random_circuit_task, sharpen
from mechbook import MechbookError
from mechbook.core import circuits, path_patching, pruning_checks, runs
from mechbook.core.circuits import FLOAT_NOISE, Circuit, prune_edges, prune_nodes
from mechbook.core.pruning_checks import (
    assert_agrees,
    check_edge_decisions,
    check_node_decisions,
    node_sample,
    sample_units,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parents[1]
EDGE_THRESHOLD = 0.995


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def sharp_dir(request, tmp_path_factory):
    return sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"sharp-{request.param}")))


@pytest.fixture(scope="module")
def sharp(sharp_dir):
    return mechbook.load_model(str(sharp_dir))


@pytest.fixture(scope="module")
def task(sharp):
    return random_circuit_task(sharp)


@pytest.fixture(scope="module")
def pruned(sharp, task):
    clean, _, means, metric = task
    return prune_nodes(sharp, clean, means, metric, threshold=0.3)


@pytest.fixture(scope="module")
def edge_table(sharp, task):
    """Every head and MLP of the tiny model: 156 edges, enough work for a check at a tenth of it.

    At the paper's 0.8 the tiny models keep no edge; at 0.995 both verdicts occur.
    """
    clean, _, means, metric = task
    return prune_edges(sharp, clean, Circuit.full(sharp), means, metric, threshold=EDGE_THRESHOLD)


class Passes:
    """Counts forward passes and prompt-blocks (prompts x transformer blocks) of every runner the engine uses."""

    def __init__(self, monkeypatch):
        self.passes = self.blocks = 0
        full = lambda model, batch, **kw: len(batch) * model.n_layers  # noqa: E731
        for module in (circuits, path_patching, runs):
            self._wrap(monkeypatch, module, "run_last", full)
        for module in (circuits, runs):
            self._wrap(monkeypatch, module, "run_from_layer",
                       lambda model, resid, layer, *a, **kw: resid.shape[0] * (model.n_layers - layer))
        self._wrap(monkeypatch, circuits, "run_joining",
                   lambda model, joins, *a, **kw: sum(r.shape[0] * (model.n_layers - l) for l, r in joins))

    def _wrap(self, monkeypatch, module, name, blocks):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.passes += 1
            self.blocks += blocks(*args, **kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    def since(self, mark=(0, 0)):
        return self.passes - mark[0], self.blocks - mark[1]

    def mark(self):
        return self.passes, self.blocks


# --- the sample ---------------------------------------------------------------------------------------------


def _fake_log(n: int, seed: int, *, passes: int, blocks: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    log = pd.DataFrame({"round": 1, "pass": "backward", "step": np.arange(1, n + 1),
                        "component": [f"{i // 8}.{i % 8}" for i in range(n)], "removed": rng.random(n) < 0.3})
    log.attrs.update(forward_passes=passes, prompt_blocks=blocks)
    return log


def test_the_sample_takes_both_ends_both_verdicts_and_a_tenth_of_the_search():
    n_prompts, n_layers = 16, 18
    log = _fake_log(300, 0, passes=240, blocks=300 * n_prompts * n_layers // 2)
    picked = node_sample(log, n_prompts=n_prompts, n_layers=n_layers, max_rows=64)
    assert picked == node_sample(log, n_prompts=n_prompts, n_layers=n_layers, max_rows=64)  # fixed by the log
    assert picked[0] == 0 and picked[-1] == 299
    assert set(log.removed.iloc[picked]) == {True, False}
    variants = len(picked) + 1  # and the full model
    assert 20 * variants * n_prompts * n_layers <= log.attrs["prompt_blocks"]  # a twentieth of the work
    assert 20 * -(-variants // (64 // n_prompts)) <= log.attrs["forward_passes"]
    assert len(picked) >= 6  # the budget is used: a twentieth of 150 full forwards holds 7 variants
    gaps = np.diff(picked)
    # spread over the log, not bunched: k = len - 4 runs of the other units, one drawn from each
    assert gaps.max() <= 2 * 300 / (len(picked) - 4) + 1
    other = log.copy()
    other.loc[5, "removed"] = not other.loc[5, "removed"]
    assert node_sample(other, n_prompts=n_prompts, n_layers=n_layers) != picked  # seeded by the log's content

    # too short a search for a tenth: the mandatory units all the same, nothing more
    short = _fake_log(30, 1, passes=12, blocks=30 * n_prompts * n_layers // 2)
    few = node_sample(short, n_prompts=n_prompts, n_layers=n_layers)
    assert few[0] == 0 and few[-1] == 29 and set(short.removed.iloc[few]) == {True, False} and len(few) <= 4
    assert sample_units([True] * 5, seed=3, fits=lambda s: True) == [0, 1, 2, 3, 4]
    assert sample_units([False], seed=3, fits=lambda s: False) == [0] and sample_units([], 0, lambda s: True) == []


# --- node pruning: agreement and cost ---------------------------------------------------------------------------


def test_a_node_pruning_checks_at_a_tenth_of_its_forward_passes(sharp, task, monkeypatch):
    clean, _, means, metric = task
    counter = Passes(monkeypatch)
    found = prune_nodes(sharp, clean, means, metric, threshold=0.3)
    search = counter.since()
    assert search == (found.log.attrs["forward_passes"], found.log.attrs["prompt_blocks"])
    mark = counter.mark()
    table = check_node_decisions(sharp, clean, means, metric, found, threshold=0.3)
    check = counter.since(mark)
    assert check == (table.attrs["forward_passes"], table.attrs["prompt_blocks"])
    assert 10 * check[0] <= search[0], (check, search)
    assert set(table.status) == {"agrees"} and set(table.status).issubset(pruning_checks.STATUSES)
    assert list(table.columns) == pruning_checks.COLUMNS
    assert {"decision log", "final circuit", "full model"} <= set(table.unit)
    log = found.log
    steps = table.attrs["steps_checked"]
    assert steps[0] == 1 and steps[-1] == len(log)
    assert set(log.set_index("step").removed[steps]) == {True, False}
    decided = table[table.check == "score_without"]
    assert len(decided) == len(steps) and (decided.difference.abs() <= FLOAT_NOISE * 100).all()
    assert_agrees(table)
    every = check_node_decisions(sharp, clean, means, metric, found, threshold=0.3, sample="all")
    assert set(every.status) == {"agrees"} and len(every[every.check == "score_without"]) == len(log)


def _tampered(kind: str, found: Circuit):
    """A copy of the pruning with one thing altered, and the unit the check must name."""
    log = found.log.copy()
    log.attrs = dict(found.log.attrs)
    last = len(log) - 1
    if kind == "metric":  # the last decision's score, moved away from the threshold: the verdict still follows
        log.loc[last, "score_without"] -= 1.0
        return Circuit(found.heads, found.mlps, score=found.score, log=log), f"step {len(log)}:"
    if kind == "verdict":  # a kept component now logged as removed (its circuit sizes follow)
        i = int(np.flatnonzero(~log.removed.to_numpy())[1])
        log.loc[i, "removed"] = True
        log.loc[i:, "circuit_size"] -= 1
        return log, f"step {i + 1}:"
    if kind == "member":  # the removed component of a decision named as another head that the circuit holds
        i = int(np.flatnonzero(log.removed.to_numpy())[0])
        row = log.loc[i]
        head = (int(row.layer), (int(row.head) + 1) % 4) if row.kind == "head" else (int(row.layer), 0)
        log.loc[i, ["component", "kind", "layer", "head"]] = [f"{head[0]}.{head[1]}", "head", head[0], head[1]]
        return log, f"step {i + 1}:"
    if kind == "circuit":  # the found circuit holds a head that the log removed
        removed = found.log[found.log.removed & (found.log.kind == "head")].iloc[0]
        heads = found.heads + [(int(removed["layer"]), int(removed["head"]))]
        return Circuit(heads, found.mlps, score=found.score, log=found.log), "final circuit"
    if kind == "full":
        log.attrs["full_metric"] *= 1.01
        return log, "full model"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["metric", "verdict", "member", "circuit", "full"])
def test_a_tampered_node_log_fails_and_names_the_unit(sharp, task, pruned, kind):
    clean, _, means, metric = task
    tampered, unit = _tampered(kind, pruned)
    table = check_node_decisions(sharp, clean, means, metric, tampered, threshold=0.3)
    bad = table[table.status == "differs"]
    assert len(bad) and bad.unit.str.startswith(unit).any(), table.to_string()
    with pytest.raises(MechbookError, match="does not check") as err:
        assert_agrees(table, "the node pruning")
    assert unit in str(err.value) and "\n" not in str(err.value)


def test_a_decision_at_the_threshold_is_reported_as_such(sharp, task, pruned):
    """A score within float noise of the threshold cannot be checked on another CPU: never "agrees"."""
    clean, _, means, metric = task
    first = float(pruned.log.score_without.iloc[0])  # the full model minus the last MLP, whatever the threshold
    threshold = (100.0 - first) / 100.0
    if not 0 < threshold <= 1:
        pytest.skip("the first decision's score lies outside 0..100 on this model")
    at = prune_nodes(sharp, clean, means, metric, threshold=threshold, max_rounds=1)
    table = check_node_decisions(sharp, clean, means, metric, at, threshold=threshold)
    row = table[table.unit.str.startswith("step 1:")].iloc[0]
    assert row.status == "at threshold" and abs(row.logged - first) == 0
    assert (table.status != "differs").all()
    assert_agrees(table)  # not a failure either


def test_a_log_is_checked_only_against_its_own_inputs(sharp, task, pruned):
    clean, corrupted, means, metric = task
    with pytest.raises(MechbookError, match=r"other inputs \(threshold 0.3 in the log, 0.2 here\)"):
        check_node_decisions(sharp, clean, means, metric, pruned, threshold=0.2)
    with pytest.raises(MechbookError, match="other inputs .*prompts"):
        check_node_decisions(sharp, corrupted, means, metric, pruned, threshold=0.3)
    with pytest.raises(MechbookError, match="'rule'"):
        check_node_decisions(sharp, clean, means, metric, pruned, threshold=0.3, sample="some")
    with pytest.raises(MechbookError, match="not in the log"):
        check_node_decisions(sharp, clean, means, metric, pruned, threshold=0.3, sample=[0])


# --- edge pruning ---------------------------------------------------------------------------------------------


def test_an_edge_pruning_checks_at_a_tenth_of_its_work(sharp, task, edge_table, monkeypatch):
    clean, _, means, metric = task
    counter = Passes(monkeypatch)
    again = prune_edges(sharp, clean, Circuit.full(sharp), means, metric, threshold=EDGE_THRESHOLD)
    search = counter.since()
    assert search == (again.attrs["forward_passes"], again.attrs["prompt_blocks"])
    mark = counter.mark()
    table = check_edge_decisions(sharp, clean, means, metric, edge_table, threshold=EDGE_THRESHOLD)
    check = counter.since(mark)
    assert check == (table.attrs["forward_passes"], table.attrs["prompt_blocks"])
    assert 10 * check[1] <= search[1], (check, search)  # prompt-blocks: the search is a few wide passes
    assert set(table.status) == {"agrees"}
    picked = table.attrs["rows_checked"]
    assert picked[0] == 0 and picked[-1] == len(edge_table) - 1
    assert set(edge_table.kept.iloc[picked]) == {True, False}
    assert {"edge table", "full model", "circuit"} <= set(table.unit)
    every = check_edge_decisions(sharp, clean, means, metric, edge_table, threshold=EDGE_THRESHOLD, sample="all")
    assert len(every[every.check == "score"]) == len(edge_table) and "differs" not in set(every.status)
    near = every[every.status == "at threshold"]  # an edge within float noise of the threshold is reported as such
    assert ((near.logged - 100 * EDGE_THRESHOLD).abs() <= FLOAT_NOISE * 100).all()
    assert (every[every.check == "score"].difference.abs() <= FLOAT_NOISE * 100).all()


@pytest.mark.parametrize("kind", ["metric", "verdict", "member", "circuit", "full"])
def test_a_tampered_edge_table_fails_and_names_the_unit(sharp, task, edge_table, kind):
    clean, _, means, metric = task
    edges = edge_table.copy()
    edges.attrs = json.loads(json.dumps(edge_table.attrs))
    last = len(edges) - 1
    if kind == "metric":  # the last edge's score, moved away from the threshold
        edges.loc[last, "score"] += 5.0 if edges.loc[last, "score"] >= 100 * EDGE_THRESHOLD else -5.0
        unit = f"edge {edges.loc[last, 'edge']}"
    elif kind == "verdict":
        i = len(edges) // 2
        edges.loc[i, "kept"] = not edges.loc[i, "kept"]
        unit = f"edge {edges.loc[i, 'edge']}"
    elif kind == "member":  # an edge's sender named as another head
        i = 5
        row = edges.loc[i]
        head = (int(row.sender_head) + 1) % 4
        edges.loc[i, ["sender", "sender_head"]] = [f"{row.sender_layer}.{head}", head]
        edges.loc[i, "edge"] = edges.loc[i, "edge"].replace(row.sender, f"{row.sender_layer}.{head}", 1)
        unit = f"edge {edges.loc[i, 'edge']}"
    elif kind == "circuit":  # the circuit the edges were pruned in, with a head fewer
        edges.attrs["circuit"]["heads"] = edges.attrs["circuit"]["heads"][1:]
        unit = "edge "
    else:
        edges.attrs["full_metric"] *= 0.99
        unit = "full model"
    table = check_edge_decisions(sharp, clean, means, metric, edges, threshold=EDGE_THRESHOLD)
    bad = table[table.status == "differs"]
    assert len(bad) and bad.unit.str.startswith(unit).any(), table.to_string()
    with pytest.raises(MechbookError, match="does not check") as err:
        assert_agrees(table, "the edge pruning")
    assert unit in str(err.value)


# --- checkpoints ----------------------------------------------------------------------------------------------


def test_a_node_pruning_resumes_from_any_decision_to_the_same_log(sharp, task, pruned, tmp_path, monkeypatch):
    """Every version of the checkpoint (one per decision: what a kill at any moment leaves) resumes to the same end."""
    clean, _, means, metric = task
    versions = []
    write = circuits.write_atomically
    monkeypatch.setattr(circuits, "write_atomically", lambda path, text: (versions.append(text), write(path, text)))
    path = tmp_path / "prune.json"
    whole = prune_nodes(sharp, clean, means, metric, threshold=0.3, checkpoint=path)
    assert whole == pruned and whole.log.equals(pruned.log) and whole.score == pruned.score
    assert len(versions) == len(pruned.log) + 1 and json.loads(path.read_text())["finished"]
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(circuits, "write_atomically", write)
    for i, text in enumerate(versions):
        path.write_text(text)
        again = prune_nodes(sharp, clean, means, metric, threshold=0.3, checkpoint=path)
        assert again == pruned and again.score == pruned.score, i
        pd.testing.assert_frame_equal(again.log, pruned.log, check_exact=True)
        assert json.loads(path.read_text())["rows"] == json.loads(versions[-1])["rows"]


def test_a_checkpoint_with_other_parameters_is_refused(sharp, task, tmp_path):
    clean, corrupted, means, metric = task
    path = tmp_path / "prune.json"
    prune_nodes(sharp, clean, means, metric, threshold=0.3, max_rounds=1, checkpoint=path)
    for kwargs, what in [({"threshold": 0.2, "max_rounds": 1}, "threshold 0.3 there, 0.2 here"),
                         ({"threshold": 0.3}, "max_rounds 1 there, null here"),
                         ({"threshold": 0.3, "max_rounds": 1, "batch": corrupted}, "prompts")]:
        batch = kwargs.pop("batch", clean)
        with pytest.raises(MechbookError, match="other parameters") as err:
            prune_nodes(sharp, batch, means, metric, checkpoint=path, **kwargs)
        assert what in str(err.value) and "\n" not in str(err.value)
    data = json.loads(path.read_text())
    data["params"]["model"] = "another-model"
    path.write_text(json.dumps(data))
    with pytest.raises(MechbookError, match="model \"another-model\" there"):
        prune_nodes(sharp, clean, means, metric, threshold=0.3, max_rounds=1, checkpoint=path)
    path.write_text("{not json")
    with pytest.raises(MechbookError, match="is not a node pruning checkpoint"):
        prune_nodes(sharp, clean, means, metric, threshold=0.3, checkpoint=path)
    with pytest.raises(MechbookError, match="does not exist"):
        prune_nodes(sharp, clean, means, metric, threshold=0.3, checkpoint=tmp_path / "no" / "prune.json")


KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import mechbook
from conftest import random_circuit_task
from mechbook.core.circuits import prune_nodes

model = mechbook.load_model({model!r})
clean, _, means, metric = random_circuit_task(model)

def slow(logits):  # the same metric, slowed so that the parent can kill the run half-way
    time.sleep(0.25)
    return metric(logits)

prune_nodes(model, clean, means, slow, threshold=0.3, checkpoint={path!r})
"""


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return sharpen(build_tiny_model("gpt2", tmp_path_factory.mktemp("sharp-gpt2-killed")))


def test_a_node_pruning_killed_with_sigkill_resumes_to_the_same_log(gpt2_dir, tmp_path):
    """A real kill -9 half-way through, in another process; the resumed run ends as an uninterrupted one."""
    model = mechbook.load_model(str(gpt2_dir))
    clean, _, means, metric = random_circuit_task(model)
    uninterrupted = prune_nodes(model, clean, means, metric, threshold=0.3)
    path = tmp_path / "prune.json"
    script = KILLED_RUN.format(tests=str(TESTS), model=str(gpt2_dir), path=str(path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mechbook.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and len(json.loads(path.read_text())["rows"]) >= 4:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed = json.loads(path.read_text())
    assert 4 <= len(killed["rows"]) < len(uninterrupted.log) and not killed["finished"]
    resumed = prune_nodes(model, clean, means, metric, threshold=0.3, checkpoint=path)
    assert resumed == uninterrupted and resumed.score == uninterrupted.score
    pd.testing.assert_frame_equal(resumed.log, uninterrupted.log, check_exact=True)
    after = json.loads(path.read_text())
    assert after["finished"]
    # the wall time counts both runs: the killed one's (at least the slowed full-model metric) and the resumed one's
    assert killed["seconds"] >= 0.25 and after["seconds"] >= killed["seconds"]


def test_the_float_noise_is_the_projects_one_figure():
    """The check's float noise is the notebooks' output tolerance: one figure for "the same number" in the book."""
    from mechbook.book.nbval_tolerance import RTOL

    assert FLOAT_NOISE == RTOL


def test_published_prompt_values_check_the_decisions_on_a_sample_of_prompts(sharp, task, pruned):
    """node_material publishes every prompt's metric under each sampled decision; a check with it recomputes a
    few prompts, reads the scores from the values, and names a moved value, a moved score or other steps."""
    from mechbook.core.pruning_checks import node_material, prompt_sample

    clean, _, means, metric = task
    material = node_material(sharp, clean, means, metric, pruned.log)
    full = check_node_decisions(sharp, clean, means, metric, pruned, threshold=0.3)
    table = check_node_decisions(sharp, clean, means, metric, pruned, threshold=0.3, material=material)
    assert not (table.status == "differs").any()
    assert table.attrs["steps_checked"] == full.attrs["steps_checked"] == material["steps"]
    assert table.attrs["prompts_checked"] == len(prompt_sample(len(clean), seed=0)) < len(clean)
    assert table.attrs["prompt_blocks"] < full.attrs["prompt_blocks"]
    # the scores read from the published values are those a full check recomputes
    a = table[table.check == "score_without"].set_index("unit").recomputed
    b = full[full.check == "score_without"].set_index("unit").recomputed
    assert ((a - b.loc[a.index]).abs() < 1e-4 * b.abs().clip(lower=1)).all()
    assert (table.check == "prompt values").sum() == len(material["steps"]) + 1

    first = table.attrs["steps_checked"][0]
    moved = {**material, "values": [list(v) for v in material["values"]]}
    for k in range(len(clean)):  # every prompt of the first sampled decision: the recomputed sample sees it
        moved["values"][0][k] += 1.0
    bad = check_node_decisions(sharp, clean, means, metric, pruned, threshold=0.3, material=moved)
    assert (bad[bad.check == "prompt values"].status == "differs").sum() == 1
    assert (bad[bad.check == "score_without"].status != "agrees").sum() >= 1  # and its mean no longer gives the score
    log = pruned.log.copy()
    log.attrs = dict(pruned.log.attrs)
    row = log.index[log.step == first][0]
    log.loc[row, "score_without"] += 5.0
    with pytest.raises(MechbookError, match="step"):
        assert_agrees(check_node_decisions(sharp, clean, means, metric, log, threshold=0.3, material=material))
    other = {**material, "steps": [s + 1 for s in material["steps"]]}
    with pytest.raises(MechbookError, match="published for steps"):
        assert_agrees(check_node_decisions(sharp, clean, means, metric, pruned, threshold=0.3, material=other))


def test_the_checked_variants_are_each_circuit_before_its_decision_less_its_candidate(sharp, pruned):
    """The circuits a check and its published prompt values run: the full model, then for each picked decision the
    circuit the log had before it with that decision's candidate out; a log that no longer replays is refused."""
    log = pruned.log
    picked = list(range(len(log)))
    variants = pruning_checks._variants(sharp, log, picked)
    assert variants[0] == Circuit.full(sharp) and len(variants) == len(log) + 1
    circuit = Circuit.full(sharp)  # the slow replay, written out
    for (_, r), variant in zip(log.iterrows(), variants[1:]):
        assert r.component not in variant.labels() and r.component in circuit.labels()
        assert set(variant.labels()) == set(circuit.labels()) - {r.component}
        circuit = variant if r.removed else circuit
    assert circuit == pruned
    broken = log.copy()
    broken.attrs = dict(log.attrs)
    broken["removed"] = ~broken["removed"]
    with pytest.raises(MechbookError, match="does not replay"):
        pruning_checks._variants(sharp, broken, picked)


def test_core_metrics_restrict_to_rows():
    import torch

    from mechbook.core.patching import answer_prob, logit_diff

    logits = torch.randn(2, 5, 11)
    d = logit_diff(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 0, 1, 1, 2]))
    p = answer_prob(torch.tensor([1, 2, 3, 4, 5]))
    rows = [4, 1]
    for metric in (d, p):
        assert torch.equal(metric.rows(rows)(logits[:, rows]), metric(logits)[:, rows])
        with pytest.raises(MechbookError, match="rows takes"):
            metric.rows([5])
