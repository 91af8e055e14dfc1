"""The circuits of the three sequence tasks and what they share (Paper B: Lan, Torr & Barez 2024, sections 3-4).

Built on :mod:`mechbook.core.circuits` (the node-pruning engine) for the chapters
"Circuit discovery by iterative node pruning" (b2) and "The shared sub-circuit" (b4):

- :func:`prepare_task`: a task's solved prompts, the means of its corrupted prompts,
  its logit-difference metric and answer tokens, in one :class:`TaskSet`;
- :func:`find_task_circuits`: node pruning on each task;
- tidy tables of circuits (:func:`circuits_record`, :func:`circuit_nodes`,
  :func:`circuit_summary`) and their layer x head grids (:func:`circuit_grid`);
- the records chapter b2 saves and later chapters rebuild from (:func:`circuits_record`
  and :func:`circuits_from_record`, :func:`prompts_record` and :func:`task_sets_from_record`;
  :mod:`mechbook.book.saved_circuits` reads them from the results);
- overlap across tasks (:func:`component_overlap`, :func:`overlap_regions`,
  :func:`shared_circuit`);
- the cross-task table with a random-circuit control (:func:`cross_task_table`),
  several circuits scored in one batched forward pass (:func:`score_circuits`).

The figures are in :mod:`mechbook.papers.seqcont.figures`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechbook.core.circuits import (
    FLOAT_NOISE,
    Circuit,
    circuit_metrics,
    full_model_metric,
    prune_nodes,
    random_circuits,
    run_circuit,
    score_circuits,
)
from mechbook.core.checks import check
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.names import all_heads, all_mlps
from mechbook.core.patching import Metric, mean_activations
from mechbook.core.pruning_checks import BUDGET, check_row, checks_table, log_seed, sample_units
from mechbook.core.runs import TokenBatch, run_last
from mechbook.core.stats import bootstrap_ratio_interval
from mechbook.papers.seqcont import components, reported, sequences


# --- a task's prompts, means and metric ------------------------------------------------------------


@dataclass
class TaskSet:
    """What node pruning and circuit scores need for one task: clean prompts, corrupted means, metric, answer ids."""

    task: str
    prompts: sequences.SeqPromptSet
    corrupted: sequences.SeqPromptSet
    batch: TokenBatch
    means: dict[str, Tensor]
    metric: Metric
    tokens: Int[Tensor, "k"]

    def __len__(self) -> int:
        return len(self.batch)


def answer_tokens(prompts: sequences.SeqPromptSet) -> Int[Tensor, "k"]:
    """The vocabulary ids a logit difference reads (next and last shown member), for a restricted unembedding."""
    corr, incorr = prompts.answer_tensors()
    return torch.unique(torch.cat([corr, incorr]))


def task_set(model: LoadedModel, prompts: sequences.SeqPromptSet, corrupted: sequences.SeqPromptSet) -> TaskSet:
    """A task's clean prompts, the means of its corrupted prompts (every head and MLP output), its metric."""
    means = mean_activations(model, components.batch_of(model, corrupted), all_heads(model) + all_mlps(model))
    return TaskSet(prompts.task, prompts, corrupted, components.batch_of(model, prompts), means,
                   components.answer_metric(prompts), answer_tokens(prompts))


def prepare_task(model: LoadedModel, task: str, *, n_prompts: int, n_corrupted: int | None = 64,
                 seed: int = 0, corrupted_seed: int | None = None) -> TaskSet:
    """A task's solved paper prompts (one token length), the per-position means of its corrupted prompts, its metric.

    ``seed`` draws the clean prompts and, unless ``corrupted_seed`` draws them apart, the
    corrupted prompts behind the means (chapter b7 moves one draw and holds the other).
    """
    prompts = components.solved_paper_prompts(model, task, n_prompts=n_prompts, seed=seed)
    return task_set(model, prompts, _corrupted_draw(model, task, prompts, n_corrupted,
                                                    seed if corrupted_seed is None else corrupted_seed))


def _corrupted_draw(model: LoadedModel, task: str, prompts: sequences.SeqPromptSet, n_corrupted: int | None,
                    drawn: int) -> sequences.SeqPromptSet:
    """The corrupted prompts behind the means: the paper's, drawn with seed ``drawn`` (the corrupted draw's seed,
    the clean draw's when it has none of its own)."""
    pool = sequences.tokenize_prompts(sequences.load_paper_prompts(task, "corrupted"), model.tokenizer)
    return components.corrupted_sample(pool, prompts, n_prompts=n_corrupted, seed=drawn)


def check_draw(model: LoadedModel, ts: TaskSet, *, n_prompts: int, n_corrupted: int | None, seed: int,
               corrupted_seed: int | None = None, ratio: float = 2.0) -> pd.DataFrame:
    """Is ``ts`` the draw :func:`prepare_task` makes with these arguments? The check's table, rows as
    :func:`~mechbook.core.pruning_checks.check_row` writes them.

    Without a model run: the clean rows are the templates' seeded candidates
    (:func:`~mechbook.papers.seqcont.components.paper_candidates`), kept in their order and
    interleaved as drawn, and the corrupted rows are the seeded corrupted sample. That fixes,
    for every candidate up to a template's last kept one, whether the draw found it solved:
    kept ones were, passed-over ones were not. A sample of those verdicts is scored again
    (:func:`~mechbook.core.pruning_checks.sample_units`: the first and last, both verdicts, a
    spread within a twentieth of the candidates). A score within float noise of the ratio is
    ``at threshold``.
    """
    per_template, pools = components.paper_candidates(model, ts.task, n_prompts=n_prompts, seed=seed)
    chosen = list(zip(ts.prompts.template, (int(i) for i in ts.prompts.source_index)))
    rows, decided = [], []  # decided: (candidate set, position in it, kept)
    kept_by = {t: [r for tt, r in chosen if tt == t] for t in dict.fromkeys(t for t, _ in chosen)}
    unknown = sorted(set(kept_by) - set(components.PAPER_CLEAN_TEMPLATES))
    problems = [f"rows of templates {unknown} that it does not draw from"] if unknown else []
    truncated = len(chosen) == n_prompts  # the last turn may have lost prompts to the cut at n_prompts
    expected_turns: list[list[tuple[str, int]]] = []
    for template, candidates in zip(components.PAPER_CLEAN_TEMPLATES, pools):
        mine = kept_by.get(template, [])
        if candidates is None:
            if mine:
                problems.append(f"{template} rows where the template has no prompt of the common length")
            expected_turns.append([])
            continue
        order = [int(i) for i in candidates.source_index]
        where = {r: k for k, r in enumerate(order)}
        at = [where.get(r) for r in mine]
        if None in at or at != sorted(set(at)):
            problems.append(f"{template} rows {mine[:5]}... are not its seeded candidates in their order")
            expected_turns.append([(template, r) for r in mine])
            continue
        expected_turns.append([(template, r) for r in mine])
        # up to where the draw decided: the last kept candidate if the template's share may have been full
        full = len(mine) == per_template or (truncated and len(mine) == per_template - 1)
        upto = (at[-1] + 1 if at else 0) if full else len(order)
        kept_at = set(at)
        decided += [(candidates, k, k in kept_at) for k in range(upto)]
    interleaved = [p[turn] for turn in range(per_template) for p in expected_turns if turn < len(p)][:n_prompts]
    if interleaved != chosen:
        problems.append("the clean prompts are not in the order the templates take turns")
    drawn = seed if corrupted_seed is None else corrupted_seed
    expected = _corrupted_draw(model, ts.task, ts.prompts, n_corrupted, drawn)
    if [int(i) for i in expected.source_index] != [int(i) for i in ts.corrupted.source_index]:
        problems.append(f"the corrupted rows are not the seeded sample of {n_corrupted} (seed {drawn})")
    rows.append(check_row(f"{ts.task}: rows drawn", "draw", status="differs" if problems else "agrees",
                          note="; ".join(problems)))
    labels = pd.DataFrame({"row": [f"{c.template[k]}/{c.source_index[k]}" for c, k, _ in decided],
                           "kept": [kept for *_, kept in decided]})
    picked = sample_units([kept for *_, kept in decided], log_seed(labels, ["row", "kept"]),
                          lambda s: BUDGET * len(s) <= len(decided))
    if picked:
        again = sequences.score_prompts(
            model, components.concat_prompts([decided[i][0].select([decided[i][1]]) for i in picked]), ratio=ratio)
        for i, (p_corr, p_incorr) in zip(picked, zip(again["p_corr"], again["p_incorr"])):
            kept, solved = decided[i][2], bool(p_corr > ratio * p_incorr)
            noise = FLOAT_NOISE * max(p_corr, ratio * p_incorr)
            status = ("agrees" if kept == solved
                      else "at threshold" if abs(p_corr - ratio * p_incorr) <= noise else "differs")
            rows.append(check_row(f"{ts.task}: {labels.row[i]}", "solved", None, float(p_corr / max(p_incorr, 1e-30)),
                                  verdicts=(kept, solved), status=status,
                                  note="" if status == "agrees" else f"p(next) / p(last shown) vs the ratio {ratio}"))
    return checks_table(rows, {"rows_checked": picked, "candidates_decided": len(decided)})


def prompts_record(tasks: Mapping[str, TaskSet]) -> dict[str, dict]:
    """Which of the paper's prompts each task used: ``{task: {"clean": [[template, row], ...], "corrupted": [row, ...]}}``.

    Rows index the paper's files (``data/<task>_<template>.json``); chapter b2 saves this
    so that later chapters score circuits on exactly its prompts (:func:`task_sets_from_record`).
    """
    return {task: {"clean": [[t, int(i)] for t, i in zip(ts.prompts.template, ts.prompts.source_index)],
                   "corrupted": [int(i) for i in ts.corrupted.source_index]}
            for task, ts in tasks.items()}


def _rows(prompts: sequences.SeqPromptSet, rows: Sequence[int], what: str) -> sequences.SeqPromptSet:
    where = {int(i): k for k, i in enumerate(prompts.source_index)}
    missing = [r for r in rows if r not in where]
    if missing:
        raise MechbookError(f"{what}: rows {missing[:5]} are not among the paper's usable prompts for this tokenizer "
                            "(the record was made for another model)")
    return prompts.select([where[r] for r in rows])


def task_sets_from_record(model: LoadedModel, record: Mapping[str, Mapping]) -> dict[str, TaskSet]:
    """The task sets a :func:`prompts_record` names, rebuilt for ``model``: the same prompts, in the same order.

    The corrupted means are computed again from the recorded corrupted rows, so a
    circuit scores on these sets what it scored where the record was made.
    """
    out = {}
    try:
        entries = {task: ([(str(t), int(row)) for t, row in entry["clean"]], [int(r) for r in entry["corrupted"]])
                   for task, entry in record.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MechbookError(f"could not read the prompts record ({type(exc).__name__}: {exc}); expected "
                            '{task: {"clean": [[template, row], ...], "corrupted": [row, ...]}} as prompts_record '
                            "writes it") from exc
    for task, (clean_rows, corrupted_rows) in entries.items():
        pools = {t: sequences.tokenize_prompts(sequences.load_paper_prompts(task, t), model.tokenizer)
                 for t in {*(t for t, _ in clean_rows), "corrupted"}}
        clean = components.concat_prompts([_rows(pools[t], [row], f"{task}/{t}") for t, row in clean_rows])
        out[task] = task_set(model, clean, _rows(pools["corrupted"], corrupted_rows, f"{task}/corrupted"))
    return out


def find_task_circuits(model: LoadedModel, tasks: Mapping[str, TaskSet], *, threshold: float = 0.2,
                       max_rounds: int | None = None) -> dict[str, Circuit]:
    """Iterative node pruning (:func:`mechbook.core.circuits.prune_nodes`) on each task: task -> circuit (with score and log)."""
    if not tasks:
        raise MechbookError("no tasks to prune; pass e.g. {'numerals': prepare_task(model, 'numerals', n_prompts=8)}")
    return {name: prune_nodes(model, t.batch, t.means, t.metric, threshold=threshold, max_rounds=max_rounds,
                              tokens=t.tokens)
            for name, t in tasks.items()}


# --- tables of circuits --------------------------------------------------------------------------------


def circuits_record(circuits: Mapping[str, Circuit]) -> dict[str, dict]:
    """``{task: {"heads": [[l, h], ...], "mlps": [...], "score": float}}``: the JSON other chapters read."""
    return {task: {**c.to_dict(), "score": None if c.score is None else round(float(c.score), 3)}
            for task, c in circuits.items()}


def circuit_nodes(circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """One row per component of each circuit: task, component (``4.4`` / ``MLP 3``), kind, layer, head."""
    rows = [{"task": task, "component": comp.label, "kind": comp.kind, "layer": comp.layer, "head": comp.head}
            for task, c in circuits.items() for comp in c.components]
    df = pd.DataFrame(rows, columns=["task", "component", "kind", "layer", "head"])
    df["head"] = df["head"].astype("Int64")
    return df


def circuit_summary(circuits: Mapping[str, Circuit], *, threshold: float,
                    n_prompts: Mapping[str, int] | int) -> pd.DataFrame:
    """One row per task: n_heads, n_mlps, size, score (% of full model), threshold, n_prompts."""
    threshold = check("threshold", threshold)
    return pd.DataFrame([
        {"task": task, "n_heads": len(c.heads), "n_mlps": len(c.mlps), "size": len(c),
         "score": None if c.score is None else round(float(c.score), 3), "threshold": threshold,
         "n_prompts": n_prompts[task] if isinstance(n_prompts, Mapping) else n_prompts}
        for task, c in circuits.items()
    ])


def circuit_scores_per_prompt(model: LoadedModel, task: TaskSet, circuit: Circuit) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the metric with everything outside ``circuit`` mean-ablated, and the full model's metric."""
    full, _ = run_last(model, task.batch)
    ablated = run_circuit(model, task.batch, circuit, task.means)
    return task.metric(ablated).float().cpu().numpy(), task.metric(full).float().cpu().numpy()


def score_intervals(model: LoadedModel, circuits: Mapping[str, Circuit], tasks: Mapping[str, TaskSet], *,
                    n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Each task's circuit scored on its own prompts, with a 95% bootstrap interval over them.

    One row per task: score (100 x mean metric with everything outside the circuit
    mean-ablated / the full model's mean metric, the score node pruning reports),
    score_low, score_high (:func:`mechbook.core.stats.bootstrap_ratio_interval`: the
    prompts resampled with replacement ``n_boot`` times, circuit and full model on the
    same resample), n_prompts. Chapter b7 scores its circuits the same way.
    """
    rows = []
    for name, circuit in circuits.items():
        if name not in tasks:
            raise MechbookError(f"no prompts for the {name!r} circuit; pass a TaskSet for each of {sorted(circuits)}")
        kept, full = circuit_scores_per_prompt(model, tasks[name], circuit)
        low, high = bootstrap_ratio_interval(kept, full, n_boot=n_boot, seed=seed)
        rows.append({"task": name, "score": float(100.0 * kept.mean() / full.mean()), "score_low": low,
                     "score_high": high, "n_prompts": len(tasks[name])})
    return pd.DataFrame(rows, columns=["task", "score", "score_low", "score_high", "n_prompts"])


def paper_circuits(tasks: Sequence[str] = sequences.PAPER_TASKS) -> dict[str, Circuit]:
    """The paper's GPT-2 small node circuits (threshold 20%), shipped with the package."""
    if isinstance(tasks, str) or not tasks:
        raise MechbookError(f"paper_circuits takes a non-empty list of tasks, e.g. {list(sequences.PAPER_TASKS)}, "
                            f"got {tasks!r}")
    out = {}
    for task in tasks:
        raw = sequences.paper_gpt2small_circuit(task)
        out[task] = Circuit([tuple(h) for h in raw["heads"]], raw["mlps"])
    return out


def size_comparison(circuits: Mapping[str, Circuit], model: LoadedModel) -> pd.DataFrame:
    """Circuit sizes here beside the paper's GPT-2 small circuits (12 layers x 12 heads), absolute and as a share."""
    if not circuits:
        raise MechbookError("no circuits to compare; load them with saved_circuits.load_task_circuits(model)")
    known = [t for t in circuits if t in sequences.PAPER_TASKS]
    paper = paper_circuits(known) if known else {}
    rows = []
    for task, c in circuits.items():
        rows.append({"task": task, "model": model.name, "heads": len(c.heads), "of heads": model.n_layers * model.n_heads,
                     "mlps": len(c.mlps), "of mlps": model.n_layers})
        if task in paper:
            rows.append({"task": task, "model": "gpt2-small (paper)", "heads": len(paper[task].heads), "of heads": 144,
                         "mlps": len(paper[task].mlps), "of mlps": 12})
    df = pd.DataFrame(rows)
    df["share of heads"] = df["heads"] / df["of heads"]
    df["share of mlps"] = df["mlps"] / df["of mlps"]
    return df


def circuit_grid(circuit: Circuit, n_layers: int, n_heads: int, *, value: float = 1.0) -> pd.DataFrame:
    """A layer x (head 0..H-1, "MLP") table: ``value`` where the component is in the circuit, else 0."""
    if isinstance(n_layers, bool) or isinstance(n_heads, bool) or not (isinstance(n_layers, (int, np.integer))
                                                                       and isinstance(n_heads, (int, np.integer))
                                                                       and n_layers >= 1 and n_heads >= 1):
        raise MechbookError(f"circuit_grid needs n_layers and n_heads of the model (whole numbers >= 1), got "
                            f"{n_layers!r} and {n_heads!r}; pass model.n_layers, model.n_heads")
    outside = [f"head {l}.{h}" for l, h in circuit.heads if l >= n_layers or h >= n_heads] + \
        [f"MLP {l}" for l in circuit.mlps if l >= n_layers]
    if outside:
        raise MechbookError(f"{outside[0]} lies outside a grid of {n_layers} layers x {n_heads} heads; pass the "
                            "n_layers and n_heads of the model the circuit was found on")
    columns = [str(h) for h in range(n_heads)] + ["MLP"]
    grid = pd.DataFrame(0.0, index=pd.RangeIndex(n_layers, name="layer"), columns=columns)
    for l, h in circuit.heads:
        grid.loc[l, str(h)] = value
    for l in circuit.mlps:
        grid.loc[l, "MLP"] = value
    return grid


def circuits_from_record(record: Mapping[str, Mapping]) -> dict[str, Circuit]:
    """The circuits, with their scores, of a :func:`circuits_record` (``{task: {"heads", "mlps", "score"}}``)."""
    try:
        circuits = {task: Circuit([tuple(h) for h in entry["heads"]], entry["mlps"], score=entry.get("score"))
                    for task, entry in record.items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise MechbookError(f"could not read circuits from the record ({type(exc).__name__}: {exc}); expected "
                            '{task: {"heads": [[layer, head], ...], "mlps": [layer, ...], "score": ...}} as '
                            "circuits_record writes it") from exc
    if not circuits:
        raise MechbookError("the record holds no circuits")
    return circuits


# --- overlap across tasks -------------------------------------------------------------------------------


def component_overlap(circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """One row per component in any circuit: component, kind, layer, head, one True/False column per task, n_tasks."""
    if not circuits:
        raise MechbookError("no circuits to compare; load them with saved_circuits.load_task_circuits(model)")
    seen = {}
    for c in circuits.values():
        for comp in c.components:
            seen[(comp.kind != "head", comp.layer, -1 if comp.head is None else comp.head)] = comp
    rows = []
    for _, comp in sorted(seen.items()):
        row = {"component": comp.label, "kind": comp.kind, "layer": comp.layer, "head": comp.head}
        row.update({task: comp in c for task, c in circuits.items()})
        row["n_tasks"] = sum(comp in c for c in circuits.values())
        rows.append(row)
    df = pd.DataFrame(rows)
    df["head"] = df["head"].astype("Int64")
    return df


def overlap_regions(circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """A Venn diagram as a table: for each combination of tasks, the components in exactly those circuits."""
    overlap = component_overlap(circuits)
    tasks = list(circuits)
    rows = []
    for k in range(len(tasks), 0, -1):
        for combo in combinations(tasks, k):
            inside = overlap[list(combo)].all(axis=1)
            outside = ~overlap[[t for t in tasks if t not in combo]].any(axis=1) if k < len(tasks) else True
            part = overlap[inside & outside]
            rows.append({"tasks": " & ".join(combo) + ("" if k > 1 else " only"), "n_tasks": k,
                         "n_heads": int((part.kind == "head").sum()), "n_mlps": int((part.kind == "mlp").sum()),
                         "components": ", ".join(part.component)})
    return pd.DataFrame(rows)


def shared_circuit(circuits: Mapping[str, Circuit]) -> Circuit:
    """The components in every circuit (the paper's shared sub-circuit)."""
    if not circuits:
        raise MechbookError("no circuits to intersect; load them with saved_circuits.load_task_circuits(model)")
    sets = list(circuits.values())
    heads = set.intersection(*(set(c.heads) for c in sets))
    mlps = set.intersection(*(set(c.mlps) for c in sets))
    return Circuit(sorted(heads), sorted(mlps))


# --- scores on other tasks -------------------------------------------------------------------------------


def cross_task_table(
    model: LoadedModel,
    circuits: Mapping[str, Circuit],
    tasks: Mapping[str, TaskSet],
    *,
    n_random: int = 10,
    seed: int = 0,
    metrics: Callable | None = None,
) -> pd.DataFrame:
    """Each circuit scored on each task, beside random circuits of its size (Paper B's cross-task table plus a control).

    One row per (circuit_task, eval_task): score with its 95% bootstrap interval over
    the task's prompts (score_low, score_high; :func:`mechbook.core.stats.bootstrap_ratio_interval`),
    random_mean, random_std (over ``n_random`` random circuits with as many heads and
    MLPs, the same ones on every task), n_random, n_prompts, and the paper's GPT-2
    small score where it gives one.

    ``metrics(eval_task, batch, circuits, means, metric, tokens=...)`` gives every
    circuit's metric on every prompt of one task (default:
    :func:`mechbook.core.circuits.circuit_metrics`); a chapter passes
    :meth:`mechbook.book.searches.Searches.circuit_metrics` to load and re-check them.
    """
    if metrics is None:
        def metrics(name, batch, these, means, metric, *, tokens=None):
            return circuit_metrics(model, batch, these, means, metric, tokens=tokens)

    if not circuits or not tasks:
        raise MechbookError("need at least one circuit and one task to score it on")
    controls = {name: random_circuits(model, c, n_random, seed=seed) for name, c in circuits.items()}
    rows = []
    for eval_task, task in tasks.items():
        full_logits, _ = run_last(model, task.batch)
        full = task.metric(full_logits).float().cpu()
        if not float(full.mean()) > 0:
            full_model_metric(model, task.batch, task.metric)  # raises its one-line error
        names = list(circuits)
        batch_circuits = [circuits[nm] for nm in names] + [r for nm in names for r in controls[nm]]
        per_prompt = metrics(eval_task, task.batch, batch_circuits, task.means, task.metric, tokens=task.tokens)
        scores = (100.0 * per_prompt.mean(1) / full.mean()).tolist()
        own, rand = scores[: len(names)], np.array(scores[len(names) :]).reshape(len(names), n_random)
        for i, name in enumerate(names):
            low, high = bootstrap_ratio_interval(per_prompt[i].numpy(), full.numpy(), seed=seed)
            rows.append({"circuit_task": name, "eval_task": eval_task, "score": own[i], "score_low": low,
                         "score_high": high, "random_mean": float(rand[i].mean()),
                         "random_std": float(rand[i].std(ddof=1)) if n_random > 1 else float("nan"),
                         "n_random": n_random, "n_prompts": len(task), "n_heads": len(circuits[name].heads),
                         "n_mlps": len(circuits[name].mlps),
                         "paper_gpt2_small": reported.CROSS_TASK.get((name, eval_task), float("nan"))})
    return pd.DataFrame(rows)
