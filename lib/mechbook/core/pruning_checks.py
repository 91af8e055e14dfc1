"""Re-checking a pruning from its log: a fixed sample of decisions, each recomputed alone, in few stacked passes.

A node pruning (:func:`~mechbook.core.circuits.prune_nodes`) is a sequence of decisions,
and its log fixes the circuit before each one: replaying the removals gives it. So any
decision can be recomputed alone (the circuit before it, minus the candidate, scored in
one run) and compared with what the log says. An edge pruning
(:func:`~mechbook.core.circuits.prune_edges`) judges every edge alone inside a fixed
circuit, so each edge is such a unit already. A search is computed once and saved with
its log; later runs re-check it here on a fixed sample, at most a tenth of its cost.

- :func:`check_node_decisions` / :func:`check_edge_decisions`: one row per checked unit;
- :func:`sample_units`: the sample rule (first, last, both verdicts, the rest spread);
- :func:`assert_agrees`: a one-line failure that names every unit that does not agree.

A metric agrees when it lies within float noise
(:data:`~mechbook.core.circuits.FLOAT_NOISE`, relative) of the logged one. A verdict
whose metric lies within float noise of the threshold is reported ``"at threshold"``:
another CPU could take it either way, so it is neither a pass nor a failure.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechbook.core.checks import check
from mechbook.core.circuits import (FLOAT_NOISE, Circuit, circuit_metrics, digest, edge_cost, means_fingerprint,
                                    pass_order, same_means)
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.names import Component
from mechbook.core.patching import Metric
from mechbook.core.path_patching import QKV, Edge, circuit_edges, patch_paths, patch_paths_to_logits
from mechbook.core.runs import TokenBatch

COLUMNS = ["unit", "check", "logged", "recomputed", "difference", "verdict_logged", "verdict_recomputed", "status",
           "note"]
STATUSES = ("agrees", "differs", "at threshold")
SHARE = 10  # a check costs at most 1/SHARE of the search it checks, in wall time
# The sample is sized on the search's recorded work (forward passes, prompt-blocks) at 1/BUDGET of it: a check's runs
# carry every variant's own ablations (the search's share one circuit), so a unit of its work takes longer; at a
# twentieth of the work a check stays within a tenth of the time (benchmarks/README.md, check_cost.py).
BUDGET = 2 * SHARE


# --- the sample ---------------------------------------------------------------------------------------


def log_seed(frame: pd.DataFrame, columns: Sequence[str]) -> int:
    """A seed drawn from a log's own content (``columns``, row by row): the same log, the same sample, anywhere."""
    text = json.dumps([[str(v) for v in row] for row in frame[list(columns)].itertuples(index=False)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


def sample_units(verdicts: Sequence[bool], seed: int, fits: Callable[[list[int]], bool]) -> list[int]:
    """Which units of a log to re-check (indices, sorted): the fixed rule, as large as ``fits`` allows.

    Always the first and the last unit, and one unit of each verdict where both occur
    (drawn with ``seed`` among that verdict's units when neither end has it). Then ``k``
    more, spread over the log: the other units cut into ``k`` runs of consecutive units
    of (nearly) equal length, one drawn from each. ``k`` grows from 1 for as long as
    ``fits(sample)`` holds (the caller's cost budget). The mandatory units are checked
    even when they alone do not fit: a check of nothing is no check.
    """
    n = len(verdicts)
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = list(dict.fromkeys([0, n - 1]))
    for verdict in (True, False):
        pool = [i for i in range(n) if bool(verdicts[i]) == verdict]
        if pool and not any(bool(verdicts[i]) == verdict for i in chosen):
            chosen.append(pool[int(rng.integers(len(pool)))])
    taken = set(chosen)
    rest = [i for i in range(n) if i not in taken]
    draws = rng.random(len(rest))  # a run starting at position p of ``rest`` picks with draw p
    best = sorted(chosen)
    for k in range(1, len(rest) + 1):
        spread = [rest[int(part[0] + int(draws[part[0]] * len(part)))]
                  for part in np.array_split(np.arange(len(rest)), k)]
        candidate = sorted(chosen + spread)
        if not fits(candidate):
            break
        best = candidate
    return best


# --- results ------------------------------------------------------------------------------------------


def _status(logged: float, recomputed: float, tol: float, *, boundary: float | None = None,
            verdicts: tuple[bool, bool] | None = None) -> str:
    if not (math.isfinite(logged) and math.isfinite(recomputed)) or abs(logged - recomputed) > tol:
        return "differs"
    if boundary is not None and min(abs(logged - boundary), abs(recomputed - boundary)) <= tol:
        return "at threshold"
    if verdicts is not None and verdicts[0] != verdicts[1]:
        return "differs"
    return "agrees"


def check_row(unit: str, check: str, logged=None, recomputed=None, *, verdicts=(None, None), status: str,
              note: str = "") -> dict:
    """One checked unit as a row of :data:`COLUMNS` (the difference computed when both values are given)."""
    diff = recomputed - logged if logged is not None and recomputed is not None else None
    return {"unit": unit, "check": check, "logged": logged, "recomputed": recomputed, "difference": diff,
            "verdict_logged": verdicts[0], "verdict_recomputed": verdicts[1], "status": status, "note": note}


def checks_table(rows: list[dict], attrs: dict) -> pd.DataFrame:
    """The rows of :func:`check_row` as a check's table, typed, with ``attrs`` (what was checked, its cost)."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("logged", "recomputed", "difference"):
        table[c] = table[c].astype(float)
    for c in ("verdict_logged", "verdict_recomputed"):
        table[c] = table[c].astype("boolean")
    table.attrs.update(attrs)
    return table


def assert_agrees(table: pd.DataFrame, what: str = "the log") -> None:
    """Raise one line naming every unit whose status is ``"differs"`` (``"at threshold"`` units are not failures)."""
    bad = table[table["status"] == "differs"]
    if len(bad):
        parts = []
        for r in bad.itertuples():
            value = (f": {r.check} logged {r.logged:.6g}, recomputed {r.recomputed:.6g}"
                     if pd.notna(r.logged) and pd.notna(r.recomputed) else f": {r.check}")
            verdict = (f", verdict logged {r.verdict_logged}, recomputed {r.verdict_recomputed}"
                       if pd.notna(r.verdict_logged) and r.verdict_logged != r.verdict_recomputed else "")
            parts.append(f"{r.unit}{value}{verdict}{f' ({r.note})' if r.note else ''}")
        raise MechbookError(f"{what} does not check: {len(bad)} of {len(table)} checked units differ: "
                            f"{'; '.join(parts)}; recompute it")


def _refuse_other_inputs(attrs: Mapping, here: Mapping, what: str) -> None:
    """A log is checked only against the inputs it was made from (those its attrs record)."""
    differ = [k for k, v in here.items()
              if k in attrs and not (same_means(attrs[k], v) if k == "means" else attrs[k] == v)]
    if differ:
        shown = "; ".join(f"{k} {attrs[k]!r} in the log, {here[k]!r} here" for k in differ)
        raise MechbookError(f"{what} was made with other inputs ({shown}); check it with the ones it was made from")


def _score_tol(*values: float) -> float:
    """Float noise of a score in percent of the full model: relative to 100 (the full model), or to the score."""
    return FLOAT_NOISE * max([100.0] + [abs(v) for v in values if math.isfinite(v)])


# --- node pruning -------------------------------------------------------------------------------------


def _replay_nodes(model: LoadedModel, log: pd.DataFrame, start: Circuit, max_rounds: int | None,
                  threshold: float) -> tuple[list[Circuit], Circuit, list[tuple[str, str]]]:
    """The circuit before each decision (the logged removals applied in order) and what does not follow the rule.

    Checked for every decision, without a forward pass: steps count 1, 2, ...; each row's
    component label matches its kind, layer and head and is in the circuit; the verdict
    follows from the logged score; ``circuit_size`` is the size after the decision; the
    rounds, passes and components come in the order the search visits them (given the
    logged verdicts), and the log ends where the search ends.
    """
    rows = log.to_dict("records")
    cutoff = 100.0 * threshold
    problems: list[tuple[str, str]] = []
    befores: list[Circuit] = []
    circuit = start
    for i, r in enumerate(rows):
        unit = _node_unit(r)
        befores.append(circuit)
        if r["step"] != i + 1:
            problems.append((unit, f"step {r['step']} is row {i + 1} of the log"))
        try:
            c = _component(r)
        except (MechbookError, TypeError, ValueError):
            problems.append((unit, f"kind {r['kind']!r}, layer {r['layer']!r}, head {r['head']!r} name no component"))
            continue
        if c.label != r["component"]:
            problems.append((unit, f"component {r['component']} but kind, layer and head say {c.label}"))
        if c not in circuit:
            problems.append((unit, f"{c.label} is not in the circuit before this decision"))
        if bool(r["removed"]) != ((100.0 - float(r["score_without"])) < cutoff):
            problems.append((unit, f"removed={bool(r['removed'])} does not follow from its logged score "
                                   f"{float(r['score_without']):.6g} at threshold {threshold}"))
        if bool(r["removed"]) and c in circuit:
            circuit = Circuit.from_components(x for x in circuit.components if x != c)
        if r["circuit_size"] != len(circuit):
            problems.append((unit, f"circuit_size {r['circuit_size']}, but the replayed circuit has {len(circuit)}"))
    problems += _order_problems(model, rows, start, max_rounds)
    return befores, circuit, problems


def _order_problems(model, rows, start: Circuit, max_rounds) -> list[tuple[str, str]]:
    """The first place where the log's (round, pass, component) leaves the search's visiting order, if any."""
    circuit, i, round_ = start, 0, 0
    while max_rounds is None or round_ < max_rounds:
        round_ += 1
        changed = {}
        for direction in ("backward", "forward"):
            changed[direction] = False
            for c in pass_order(circuit, model, direction):
                if i == len(rows):
                    return [("decision log", f"it ends after step {len(rows)}, but the search goes on: round "
                                             f"{round_}, {direction} pass, {c.label}")]
                r = rows[i]
                if (r["round"], r["pass"], r["component"]) != (round_, direction, c.label):
                    return [(_node_unit(r), f"the search visits {c.label} in round {round_}'s {direction} pass here")]
                if bool(r["removed"]):
                    circuit = Circuit.from_components(x for x in circuit.components if x != c)
                    changed[direction] = True
                i += 1
            if not changed[direction]:
                break
        if not all(changed.values()):
            break
    if i < len(rows):
        return [(_node_unit(rows[i]), "the search has ended before this decision")]
    return []


def _component(r: Mapping) -> Component:
    if r["kind"] == "mlp":
        return Component("mlp", int(r["layer"]))
    return Component(r["kind"], int(r["layer"]), int(r["head"]))


def _node_unit(r: Mapping) -> str:
    return f"step {r['step']}: {r['component']} (round {r['round']}, {r['pass']})"


def node_sample(log: pd.DataFrame, *, n_prompts: int, n_layers: int, max_rows: int = 64) -> list[int]:
    """Rows of a node pruning log to re-check: :func:`sample_units` within a twentieth of the search's work.

    The check scores the full model and, per sampled decision, the circuit before it
    minus the candidate: one variant of the ``n_prompts`` prompts through all
    ``n_layers`` blocks each, ``max_rows // n_prompts`` variants stacked per pass. The
    sample is the largest that keeps both the check's forward passes and its
    prompt-blocks (prompts x blocks run, the work however it is stacked) within a twentieth
    (:data:`BUDGET`; the wall time then stays within a tenth)
    of the search's, as ``log.attrs`` records them (``forward_passes``,
    ``prompt_blocks``); a log without them is taken as a search of one full forward
    per decision. The seed is the log's own decisions (:func:`log_seed`).
    """
    per_pass = max(1, max_rows // n_prompts)
    literal = len(log) + 1
    passes = log.attrs.get("forward_passes", literal)
    blocks = log.attrs.get("prompt_blocks", literal * n_prompts * n_layers)

    def fits(sample: list[int]) -> bool:
        variants = len(sample) + 1
        return BUDGET * math.ceil(variants / per_pass) <= passes and BUDGET * variants * n_prompts * n_layers <= blocks

    seed = log_seed(log, ["round", "pass", "step", "component", "removed"])
    return sample_units(list(log["removed"]), seed, fits)


PROMPT_SHARE = 32  # a check on published prompt values recomputes a thirty-second of the prompts


def prompt_sample(n: int, *, seed: int, share: int = PROMPT_SHARE) -> list[int]:
    """Which of ``n`` prompts a check on published prompt values recomputes: the first, the last and a spread,
    ``n // share`` of them and at least 4 (:func:`sample_units`)."""
    want = max(4, n // share)
    return sample_units([False] * n, seed, lambda s: len(s) <= want)


def _variants_of(model: LoadedModel, befores: Sequence[Circuit], records: Sequence[dict],
                 picked: Sequence[int]) -> list[Circuit]:
    """The full model, then for each picked decision the circuit before it (``befores``, from
    :func:`_replay_nodes`) minus its candidate."""
    return [Circuit.full(model)] + [Circuit.from_components(x for x in befores[i].components
                                                            if x != _component(records[i])) for i in picked]


def _variants(model: LoadedModel, log: pd.DataFrame, picked: Sequence[int]) -> list[Circuit]:
    """:func:`_variants_of` from a log replayed here; a log that does not replay is refused."""
    start = Circuit(**log.attrs["start"]) if "start" in log.attrs else Circuit.full(model)
    befores, _, problems = _replay_nodes(model, log, start, log.attrs.get("max_rounds"), float(log.attrs["threshold"]))
    if problems:
        raise MechbookError(f"the decision log does not replay ({problems[0][1]}); recompute the search")
    return _variants_of(model, befores, log.to_dict("records"), picked)


def node_material(model: LoadedModel, batch: TokenBatch, means: Mapping[str, Tensor], metric: Metric,
                  log: pd.DataFrame, *, max_rows: int = 64, tokens: Int[Tensor, "k"] | None = None) -> dict:
    """Each prompt's metric under the full model and under each decision the fixed sample picks (:func:`node_sample`):
    what a check on some of the prompts compares with (``check_node_decisions(..., material=...)``).

    Computed once, after the search, at the cost of one check on every prompt. Returns
    ``{"steps": [...], "full": [n values], "values": [[n values] per step]}``.
    """
    picked = node_sample(log, n_prompts=len(batch), n_layers=model.n_layers, max_rows=max_rows)
    values = circuit_metrics(model, batch, _variants(model, log, picked), means, metric, max_rows=max_rows,
                             tokens=tokens).float().cpu()
    steps = [int(log["step"].iloc[i]) for i in picked]
    return {"steps": steps, "full": values[0].tolist(), "values": [v.tolist() for v in values[1:]]}


def _score_rows(log: pd.DataFrame, picked: Sequence[int], scores: Sequence[float], full: float, *, threshold: float,
                note: str = "") -> list[dict]:
    """The full model's metric against the logged one, and each picked decision's recomputed metric (``scores``, the
    mean over the prompts with its candidate removed) as a score in percent of ``full``, against the logged score
    and verdict."""
    rows = []
    logged_full = log.attrs.get("full_metric")
    if logged_full is not None:
        tol = FLOAT_NOISE * max(abs(logged_full), abs(full))
        rows.append(check_row("full model", "metric", float(logged_full), full, status=_status(logged_full, full, tol),
                              note=note))
    if not full > 0:
        raise MechbookError(f"the full model's mean metric is {full:.4g} on these prompts, not positive: scores in "
                            "percent of it mean nothing; check the prompts and metric")
    boundary = 100.0 - 100.0 * threshold
    records = log.to_dict("records")
    for i, value in zip(picked, scores):
        r = records[i]
        logged, score = float(r["score_without"]), 100.0 * value / full
        verdicts = (bool(r["removed"]), (100.0 - score) < 100.0 * threshold)
        rows.append(check_row(_node_unit(r), "score_without", logged, score, verdicts=verdicts,
                              status=_status(logged, score, _score_tol(logged, score), boundary=boundary,
                                             verdicts=verdicts), note=note))
    return rows


def _check_attrs(log: pd.DataFrame, picked: Sequence[int], *, passes: int, blocks: int, began: float,
                 **more) -> dict:
    """A node check's ``attrs``: the steps it checked, its cost beside the search's, its seconds."""
    return {"steps_checked": [int(log["step"].iloc[i]) for i in picked], "decisions": len(log), **more,
            "forward_passes": passes, "prompt_blocks": blocks,
            "search_forward_passes": log.attrs.get("forward_passes"),
            "search_prompt_blocks": log.attrs.get("prompt_blocks"),
            "seconds": time.perf_counter() - began}


def _material_rows(model, batch, means, metric, log, material, picked, *, threshold, max_rows, tokens):
    """The check's rows from published prompt values: each picked decision's score from them, and a sample of the
    prompts recomputed under every variant (the full model and each decision's circuit)."""
    records = log.to_dict("records")
    steps = [int(records[i]["step"]) for i in picked]
    if list(material.get("steps", [])) != steps:
        return [check_row("prompt values", "replay", status="differs",
                          note=f"published for steps {material.get('steps')}, the fixed sample is {steps}")], 0
    full_values = torch.tensor(material["full"], dtype=torch.float64)
    table = torch.tensor(material["values"], dtype=torch.float64).reshape(len(steps), -1)
    if len(full_values) != len(batch) or table.shape[1] != len(batch):
        return [check_row("prompt values", "replay", status="differs",
                          note=f"{len(full_values)} prompt values published for {len(batch)} prompts")], 0
    rows = _score_rows(log, picked, [float(v.mean()) for v in table], float(full_values.mean()),
                       threshold=threshold, note="from the published prompt values")
    prompts = prompt_sample(len(batch), seed=log_seed(log, ["round", "pass", "step", "component", "removed"]))
    if not hasattr(metric, "rows"):
        raise MechbookError("a check on some of the prompts needs a metric that can be restricted to them (the core's "
                            "LogitDiff or AnswerProb, whose rows(index) does it); pass one, or check without material")
    index = torch.tensor(prompts)
    again = circuit_metrics(model, batch.select(prompts), _variants(model, log, picked), means,
                            metric.rows(index), max_rows=max_rows, tokens=tokens).double().cpu()
    published = torch.cat([full_values[None], table])[:, index]
    for name, a, b in zip(["full model"] + [_node_unit(records[i]) for i in picked], published, again):
        worst = float((a - b).abs().max())
        tol = FLOAT_NOISE * max(1.0, float(a.abs().max()), float(b.abs().max()))
        rows.append(check_row(name, "prompt values", float(a.mean()), float(b.mean()),
                              status="agrees" if worst <= tol else "differs",
                              note=f"{len(prompts)} of {len(batch)} prompts recomputed"
                                   + ("" if worst <= tol else f"; a prompt's value moved by {worst:.3g}")))
    return rows, len(prompts)


def check_node_decisions(
    model: LoadedModel,
    batch: TokenBatch,
    means: Mapping[str, Tensor],
    metric: Metric,
    log: pd.DataFrame | Circuit,
    *,
    threshold: float,
    sample: str | Sequence[int] = "rule",
    max_rows: int = 64,
    tokens: Int[Tensor, "k"] | None = None,
    material: Mapping | None = None,
) -> pd.DataFrame:
    """Re-check a node pruning (:func:`~mechbook.core.circuits.prune_nodes`) from its decision log.

    ``log`` is the pruning's log, or the :class:`~mechbook.core.circuits.Circuit` it
    returned (then its heads, MLPs and score are checked too). Every decision is
    replayed without a forward pass (:func:`_replay_nodes`: order, verdicts, sizes, the
    final circuit). The sampled decisions (``sample="rule"``: :func:`node_sample`;
    ``"all"``; or a list of steps) are recomputed: the circuit before each, minus its
    candidate, stacked as variants with the full model in as few passes as
    :func:`~mechbook.core.circuits.circuit_metrics` needs; the full model's metric is
    checked too. One row per checked unit (``COLUMNS``); ``attrs`` holds the check's
    passes and prompt-blocks, the search's, the steps checked and the seconds taken.

    With ``material`` (:func:`node_material`: every prompt's metric under each sampled
    decision, published with the log), the sampled decisions' scores are read from it and
    only a sample of the prompts is recomputed (:func:`prompt_sample`, a thirty-second),
    each prompt's value compared within float noise: a check at large sizes, where one
    forward pass of every prompt per decision would pass CI's budget.
    """
    began = time.perf_counter()
    found = log if isinstance(log, Circuit) else None
    if found is not None:
        if found.log is None:
            raise MechbookError("this Circuit carries no decision log; pass the circuit prune_nodes returned")
        log = found.log
    if not isinstance(log, pd.DataFrame) or "score_without" not in log.columns:
        raise MechbookError("pass the decision log of prune_nodes (a DataFrame with score_without, removed, ...) "
                            "or the Circuit it returned")
    threshold = check("threshold", threshold)
    _refuse_other_inputs(log.attrs, {"threshold": threshold, "model": model.name,
                                     "prompts": digest(batch.input_ids, batch.lengths),
                                     "means": means_fingerprint(means)}, "this node pruning log")
    start = Circuit(**log.attrs["start"]) if "start" in log.attrs else Circuit.full(model)
    befores, final, problems = _replay_nodes(model, log, start, log.attrs.get("max_rounds"), threshold)
    rows = [check_row(u, "replay", status="differs", note=note) for u, note in problems]
    if not problems:
        rows.append(check_row("decision log", "replay", status="agrees",
                         note=f"{len(log)} decisions replay: visiting order, verdicts, circuit sizes"))
    if found is not None:
        rows.append(_final_circuit_row(found, final, log))

    if isinstance(sample, str) and sample == "rule":
        picked = node_sample(log, n_prompts=len(batch), n_layers=model.n_layers, max_rows=max_rows)
    elif isinstance(sample, str) and sample == "all":
        picked = list(range(len(log)))
    elif isinstance(sample, str):
        raise MechbookError(f"sample={sample!r}: pass 'rule' (the fixed sample), 'all', or a list of steps")
    else:
        steps = list(log["step"])
        missing = [s for s in sample if s not in steps]
        if missing:
            raise MechbookError(f"steps {missing} are not in the log (steps 1..{len(log)}); pass steps it has")
        picked = sorted({steps.index(s) for s in sample})
    if material is not None:
        if not (isinstance(sample, str) and sample == "rule"):
            raise MechbookError("published prompt values are for the fixed sample; pass sample='rule' with material")
        more, n_rows = _material_rows(model, batch, means, metric, log, material, picked, threshold=threshold,
                                      max_rows=max_rows, tokens=tokens)
        return checks_table(rows + more, _check_attrs(
            log, picked, prompts_checked=n_rows, began=began,
            passes=math.ceil((len(picked) + 1) / max(1, max_rows // max(1, n_rows))),
            blocks=(len(picked) + 1) * n_rows * model.n_layers))
    variants = _variants_of(model, befores, log.to_dict("records"), picked)
    values = circuit_metrics(model, batch, variants, means, metric, max_rows=max_rows, tokens=tokens).mean(1)
    rows += _score_rows(log, picked, values[1:].tolist(), float(values[0]), threshold=threshold)
    n, per_pass = len(batch), max(1, max_rows // len(batch))
    return checks_table(rows, _check_attrs(log, picked, began=began, passes=math.ceil(len(variants) / per_pass),
                                           blocks=len(variants) * n * model.n_layers))


def _final_circuit_row(found: Circuit, final: Circuit, log: pd.DataFrame) -> dict:
    extra = sorted(set(found.labels()) - set(final.labels()))
    missing = sorted(set(final.labels()) - set(found.labels()))
    notes = ([f"has {', '.join(extra)} that the log removed or never held"] if extra else []) + \
            ([f"lacks {', '.join(missing)} that the log keeps"] if missing else [])
    removed = log[log["removed"]]
    if len(removed) and found.score is not None:
        last = float(removed["score_without"].iloc[-1])
        if found.score != last:
            notes.append(f"score {found.score!r}, but the log's last removal left {last!r}")
    return check_row("final circuit", "members", status="differs" if notes else "agrees",
                note="; ".join(notes) or f"{len(final)} components, as the log's replay")


# --- edge pruning -------------------------------------------------------------------------------------


def _edge_unit(r: Mapping) -> str:
    return f"edge {r['edge']}"


def edge_sample(edges: pd.DataFrame, *, n_prompts: int, n_layers: int, max_rows: int = 256) -> list[int]:
    """Rows of an edge pruning table to re-check: :func:`sample_units` within a twentieth of the search's prompt-blocks.

    Edge pruning runs each receiver layer's edges as one stacked sweep, so the search
    has few forward passes and a check could not keep to a tenth of them; it keeps to
    a twentieth of the work (:data:`BUDGET`), prompt-blocks (``edges.attrs["prompt_blocks"]``, else
    estimated from the table by :func:`edge_cost`). The seed is the table's edges and
    verdicts (:func:`log_seed`).
    """
    source = bool(edges.attrs.get("source", False))
    qkv = (edges["input"] != "resid").to_numpy()
    layers = edges["receiver_layer"].to_numpy()
    search = edges.attrs.get("prompt_blocks")
    if search is None:
        search = edge_cost(n_prompts, n_layers, list(layers[qkv]), int((~qkv).sum()), source=source,
                           max_rows=max_rows, full_runs=2)[1]

    def fits(sample: list[int]) -> bool:
        cost = edge_cost(n_prompts, n_layers, [layers[i] for i in sample if qkv[i]],
                         sum(1 for i in sample if not qkv[i]), source=source, max_rows=max_rows, full_runs=0)[1]
        return BUDGET * (cost + 2 * n_prompts * n_layers) <= search

    return sample_units(list(edges["kept"]), log_seed(edges, ["edge", "kept"]), fits)


def check_edge_decisions(
    model: LoadedModel,
    batch: TokenBatch,
    means: Mapping[str, Tensor],
    metric: Metric,
    edges: pd.DataFrame,
    *,
    threshold: float,
    source: TokenBatch | None = None,
    circuit: Circuit | None = None,
    sample: str | Sequence[int] = "rule",
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> pd.DataFrame:
    """Re-check an edge pruning (:func:`~mechbook.core.circuits.prune_edges`) from its table, edge by edge.

    Without a forward pass: the table lists exactly the circuit's edges, in the order
    ``prune_edges`` tests them, and every ``kept`` follows from its score. Then the
    sampled edges (``sample="rule"``: :func:`edge_sample`; ``"all"``; or a list of row
    positions) are path-patched again inside the circuit (everything else
    mean-ablated, the sender's value from ``source`` or its mean, as the pruning ran),
    with the full model's metric and the circuit's score. The circuit is the one the
    table's attrs record (``circuit`` must match it, or stands in for it when absent).
    One row per checked unit (``COLUMNS``); ``attrs`` as :func:`check_node_decisions`.
    """
    began = time.perf_counter()
    if not isinstance(edges, pd.DataFrame) or not {"edge", "score", "kept", "input"} <= set(edges.columns):
        raise MechbookError("pass the edge table of prune_edges (edge, score, kept, input, ...)")
    threshold = check("threshold", threshold)
    attrs = edges.attrs
    _refuse_other_inputs(attrs, {"threshold": threshold, "model": model.name, "source": source is not None,
                                 "prompts": digest(batch.input_ids, batch.lengths),
                                 "means": means_fingerprint(means)}, "this edge table")
    logged_circuit = Circuit(**attrs["circuit"]) if "circuit" in attrs else None
    if logged_circuit is None and circuit is None:
        raise MechbookError("the edge table's attrs name no circuit; pass circuit= (the node circuit it was pruned in)")
    if circuit is not None and logged_circuit is not None and circuit != logged_circuit:
        raise MechbookError(f"circuit= {circuit.labels()} is not the table's circuit {logged_circuit.labels()}; "
                            "pass the circuit the edges were pruned in")
    circuit = (logged_circuit or circuit).validate(model)

    records = edges.to_dict("records")
    rows = [check_row(u, "replay", status="differs", note=note) for u, note in _edge_problems(records, circuit, attrs,
                                                                                       threshold)]
    if not rows:
        rows.append(check_row("edge table", "replay", status="agrees",
                         note=f"{len(edges)} edges: the circuit's edges in order, verdicts from scores"))
    if isinstance(sample, str) and sample == "rule":
        picked = edge_sample(edges, n_prompts=len(batch), n_layers=model.n_layers, max_rows=max_rows)
    elif isinstance(sample, str) and sample == "all":
        picked = list(range(len(edges)))
    elif isinstance(sample, str):
        raise MechbookError(f"sample={sample!r}: pass 'rule' (the fixed sample), 'all', or a list of row positions")
    else:
        bad = [i for i in sample if not 0 <= i < len(edges)]
        if bad:
            raise MechbookError(f"rows {bad} are not in the table (0..{len(edges) - 1}); pass row positions it has")
        picked = sorted(set(sample))

    values = circuit_metrics(model, batch, [Circuit.full(model), circuit], means, metric, max_rows=max_rows,
                             tokens=tokens).mean(1)
    full = float(values[0])
    if "full_metric" in attrs:
        rows.append(check_row("full model", "metric", float(attrs["full_metric"]), full,
                         status=_status(attrs["full_metric"], full, FLOAT_NOISE * max(abs(attrs["full_metric"]),
                                                                                       abs(full)))))
    if not full > 0:
        raise MechbookError(f"the full model's mean metric is {full:.4g} on these prompts, not positive: scores in "
                            "percent of it mean nothing; check the prompts and metric")
    own = 100.0 * float(values[1]) / full
    if "circuit_score" in attrs:
        logged = float(attrs["circuit_score"])
        rows.append(check_row("circuit", "circuit_score", logged, own, status=_status(logged, own, _score_tol(logged, own))))

    ablate = circuit.complement(model)
    qkv = [i for i in picked if records[i]["input"] != "resid"]
    resid = [i for i in picked if records[i]["input"] == "resid"]
    scores: dict[int, float] = {}
    if qkv:
        found = patch_paths(model, batch, [_edge(records[i]) for i in qkv], metric, source=source, means=means,
                            ablate=ablate, max_rows=max_rows, tokens=tokens)
        scores.update(zip(qkv, (100.0 * found.mean(1) / full).tolist()))
    if resid:
        found = patch_paths_to_logits(model, batch, [_sender(records[i]) for i in resid], metric, source=source,
                                      means=means, ablate=ablate, tokens=tokens)
        scores.update(zip(resid, (100.0 * found.mean(1) / full).tolist()))
    boundary = 100.0 * threshold
    for i in picked:
        r = records[i]
        logged, score = float(r["score"]), scores[i]
        verdicts = (bool(r["kept"]), score < boundary)
        rows.append(check_row(_edge_unit(r), "score", logged, score, verdicts=verdicts,
                         status=_status(logged, score, _score_tol(logged, score), boundary=boundary,
                                        verdicts=verdicts)))
    passes, blocks = edge_cost(len(batch), model.n_layers, [records[i]["receiver_layer"] for i in qkv], len(resid),
                               source=source is not None, max_rows=max_rows, full_runs=0)
    passes += math.ceil(2 / max(1, max_rows // len(batch)))
    blocks += 2 * len(batch) * model.n_layers
    return checks_table(rows, {
        "rows_checked": picked, "decisions": len(edges), "forward_passes": passes, "prompt_blocks": blocks,
        "search_forward_passes": attrs.get("forward_passes"), "search_prompt_blocks": attrs.get("prompt_blocks"),
        "seconds": time.perf_counter() - began})


def _sender(r: Mapping) -> Component:
    if r["sender_kind"] == "mlp":
        return Component("mlp", int(r["sender_layer"]))
    return Component("head", int(r["sender_layer"]), int(r["sender_head"]))


def _edge(r: Mapping) -> Edge:
    return Edge(_sender(r), Component("head", int(r["receiver_layer"]), int(r["receiver_head"])), r["input"])


def _edge_problems(records: list[dict], circuit: Circuit, attrs: Mapping, threshold: float) -> list[tuple[str, str]]:
    """Rows whose edge is not the circuit's next one (in prune_edges' order), or whose verdict does not follow."""
    problems = []
    inputs = attrs.get("inputs", list(QKV))
    mlp_senders = attrs.get("mlp_senders", False)
    expected = [e.label for e in circuit_edges(circuit.heads, circuit.mlps, inputs=inputs, mlp_senders=mlp_senders)]
    if attrs.get("to_logits", True):
        senders = [Component("head", l, h) for l, h in circuit.heads]
        senders += [Component("mlp", l) for l in circuit.mlps] if mlp_senders else []
        expected += [f"{s.label} -> resid_post" for s in senders]
    for i, r in enumerate(records):
        unit = _edge_unit(r)
        try:
            label = (f"{_sender(r).label} -> resid_post" if r["input"] == "resid" else _edge(r).label)
        except (MechbookError, TypeError, ValueError):
            problems.append((unit, "its sender and receiver columns name no edge"))
            continue
        if label != r["edge"]:
            problems.append((unit, f"its sender and receiver columns say {label}"))
        if i >= len(expected) or expected[i] != label:
            want = expected[i] if i < len(expected) else "nothing (the circuit has no more edges)"
            problems.append((unit, f"row {i} of the table, where the circuit's edge is {want}"))
        if bool(r["kept"]) != (float(r["score"]) < 100.0 * threshold):
            problems.append((unit, f"kept={bool(r['kept'])} does not follow from its logged score "
                                   f"{float(r['score']):.6g} at threshold {threshold}"))
    if len(records) < len(expected):
        problems.append(("edge table", f"it has {len(records)} edges, the circuit {len(expected)}; first missing: "
                                       f"{expected[len(records)]}"))
    return problems
