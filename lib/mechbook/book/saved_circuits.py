"""The circuits and prompts Paper B's chapters save, read back for the chapters after them.

Chapter b2 ("Circuit discovery by iterative node pruning") saves its node circuits
(``circuits.json``) and the paper's prompt rows it pruned on (``prompts.json``);
chapter b4 ("The shared sub-circuit") saves the shared sub-circuit (``shared.json``).
Chapters b3, b4 and b6 read them here, each file checked against its chapter's
marker (:func:`mechbook.book.results.chapter_file`), and rebuild them with the paper
module's record functions (:func:`mechbook.papers.seqcont.task_circuits.circuits_from_record`,
:func:`~mechbook.papers.seqcont.task_circuits.task_sets_from_record`). Every error
names the command that writes the missing or damaged results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mechbook.book import results
from mechbook.book.searches import Searches
from mechbook.core.checks import check
from mechbook.core.circuits import Circuit
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.papers.seqcont import components, stability, task_circuits

NODE_CHAPTER = "b2_node_pruning"
SHARED_CHAPTER = "b4_shared_circuit"


@dataclass(frozen=True)
class PruningSize:
    """How chapter b2 prunes a model: solved prompts per task, corrupted prompts behind the means, one draw per seed."""

    n_prompts: int
    n_corrupted: int
    seeds: tuple[int, ...]


# The sizes at which the book pruned each model, its searches published with b2's results (searching/README.md):
# on gemma3-270m the paper's 512 prompts per task (its code: 512 per template), five draws. Any other model gets
# ELSEWHERE, which a 2-core CPU prunes in minutes: a size of its own is a campaign of hours, run once.
PRUNED_AT = {"gemma3-270m": PruningSize(512, 512, (0, 1, 2, 3, 4))}
ELSEWHERE = PruningSize(16, 64, (0,))


def pruning_size(model_name: str, *, n_prompts: int | None = None, n_corrupted: int | None = None,
                 seeds: Sequence[int] | None = None) -> PruningSize:
    """Chapter b2's sizes for ``model_name``: each one given, else the book's for that model (:data:`PRUNED_AT`,
    :data:`ELSEWHERE` for a model not in it). Out-of-range values get the one-line error of ``mechbook run``."""
    book = PRUNED_AT.get(model_name, ELSEWHERE)
    return PruningSize(
        book.n_prompts if n_prompts is None else check("n_prompts", n_prompts),
        book.n_corrupted if n_corrupted is None else check("n_corrupted", n_corrupted),
        book.seeds if seeds is None else tuple(check("seeds", seeds)))


def _rerun(model_name: str, *chapters: str) -> str:
    return f"python -m mechbook run --model {model_name} --chapters {' '.join(chapters)}"


def _read_b2(filename: str, model_name: str, root: str | Path | None) -> tuple[Any, Path]:
    """One of chapter b2's JSON files for ``model_name``, checked against its marker, and its path."""
    path = results.chapter_file(NODE_CHAPTER, filename, model_name, root)
    try:
        return json.loads(path.read_text()), path
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MechbookError(f"could not read {path} ({type(exc).__name__}: {exc}); rerun: "
                            f"{_rerun(model_name, 'b2')}") from exc


def load_task_circuits(model: LoadedModel | str, root: str | Path | None = None) -> dict[str, Circuit]:
    """The node circuits chapter b2 saved for a model (``<root>/<model>/b2_node_pruning/circuits.json``), with scores.

    Raises a MechbookError naming the command that makes them if they are missing,
    changed since b2 wrote them, or do not fit ``model`` (circuits of another model).
    """
    name = model if isinstance(model, str) else model.name
    record, path = _read_b2("circuits.json", name, root)
    try:
        circuits = task_circuits.circuits_from_record(record)
        if not isinstance(model, str):
            for c in circuits.values():
                c.validate(model)
    except MechbookError as exc:
        raise MechbookError(f"{path}: {exc}; rerun: {_rerun(name, 'b2')}") from exc
    return circuits


def load_task_sets(model: LoadedModel, root: str | Path | None = None, *,
                   n_prompts: int | None = None) -> dict[str, task_circuits.TaskSet]:
    """The task sets of chapter b2 for ``model``, rebuilt from the prompts it saved (``prompts.json``).

    The same prompts in the same order as b2 scored them, so a circuit scores here
    what it scored there. ``n_prompts`` keeps each task's first ``n_prompts`` (b2's order
    takes the templates in turn, so they stay mixed), for a chapter that cannot afford
    them all; the corrupted means are b2's, over all its corrupted prompts.
    """
    record, path = _read_b2("prompts.json", model.name, root)
    try:
        sets = task_circuits.task_sets_from_record(model, record)
    except MechbookError as exc:
        raise MechbookError(f"{path}: {exc}; rerun: {_rerun(model.name, 'b2')}") from exc
    return sets if n_prompts is None else first_prompts(model, sets, n_prompts)


def first_prompts(model: LoadedModel, sets: dict[str, task_circuits.TaskSet],
                  n_prompts: int) -> dict[str, task_circuits.TaskSet]:
    """Each task set with its first ``n_prompts`` solved prompts (b2's order takes the templates in turn, so they
    stay mixed) and its means as they were, over all its corrupted prompts."""
    fewest = min(len(t) for t in sets.values())
    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or not 2 <= n_prompts <= fewest:
        raise MechbookError(f"n_prompts = {n_prompts!r} is out of range: chapter b2 saved {fewest} prompts for its "
                            f"smallest task on {model.name}; pass 2 to {fewest}, or None for all")
    out = {}
    for task, t in sets.items():
        prompts = t.prompts.select(range(n_prompts))
        out[task] = task_circuits.TaskSet(task, prompts, t.corrupted, components.batch_of(model, prompts), t.means,
                                          components.answer_metric(prompts), task_circuits.answer_tokens(prompts))
    return out


def selection(model_name: str, root: str | Path | None = None) -> str:
    """How chapter b2 chose its circuits for a model, as a phrase for the tables and figures that use them:
    ``"kept in at least 60% of 5 draws of 512 prompts"``, or ``"one pruning on 16 prompts"`` for one draw."""
    path = results.chapter_file(NODE_CHAPTER, "summary.csv", model_name, root)
    summary = pd.read_csv(path)
    try:
        draws, share, n = int(summary.draws.max()), float(summary.kept_in.max()), int(summary.n_prompts.max())
    except (AttributeError, ValueError) as exc:
        raise MechbookError(f"{path} has no draws, kept_in and n_prompts columns ({exc}); rerun: "
                            f"{_rerun(model_name, 'b2')}") from exc
    return stability.selection_phrase(draws, share, n)


def load_shared_circuit(model: LoadedModel, root: str | Path | None = None) -> tuple[Circuit, str]:
    """The shared sub-circuit for ``model`` and where it came from.

    Chapter b4's ``shared.json`` when that chapter finished, else the intersection
    (:func:`mechbook.papers.seqcont.task_circuits.shared_circuit`) of chapter b2's
    circuits (:func:`load_task_circuits`). Raises when the circuit does not fit the
    model or is empty.
    """
    folder = (Path(root) if root else results.default_root()) / results.safe_name(model.name) / SHARED_CHAPTER
    if (folder / results.MARKER).is_file():  # b4 finished: its file, checked against its marker
        circuit = Circuit.load(results.chapter_file(SHARED_CHAPTER, "shared.json", model.name, root))
        source = f"{SHARED_CHAPTER}/shared.json"
    else:
        circuits = load_task_circuits(model, root)
        circuit = task_circuits.shared_circuit(circuits)
        source = f"intersection of the {', '.join(circuits)} circuits in {NODE_CHAPTER}/circuits.json"
    if len(circuit) == 0:
        raise MechbookError(f"the shared sub-circuit of {model.name} ({source}) is empty: the task circuits have no "
                            "component in common, so there is nothing to ablate; rerun b2 with a lower threshold "
                            f"({_rerun(model.name, 'b2', 'b4')})")
    try:
        return circuit.validate(model), source
    except MechbookError as exc:
        raise MechbookError(f"{exc} (read from {source}); rerun: {_rerun(model.name, 'b2', 'b4')}") from exc


def drawn_task(searches: Searches, task: str, *, n_prompts: int, n_corrupted: int | None, seed: int,
               corrupted_seed: int | None = None) -> task_circuits.TaskSet:
    """:func:`~mechbook.papers.seqcont.task_circuits.prepare_task` as one of ``searches``' units (key
    ``draw <task>/<n_prompts>/<seed>``, ``/c<corrupted_seed>`` when the corrupted draw is apart).

    Drawing scores twice the prompts it keeps; the unit records the rows it chose, so a later
    run rebuilds the set from them (the corrupted means computed again) and re-scores a
    sample of the choices (:func:`~mechbook.papers.seqcont.task_circuits.check_draw`).
    """
    model = searches.model
    corrupted_seed = None if corrupted_seed == seed else corrupted_seed  # the same draw as corrupted_seed=None
    args = {"n_prompts": int(n_prompts), "n_corrupted": None if n_corrupted is None else int(n_corrupted),
            "seed": int(seed), "corrupted_seed": None if corrupted_seed is None else int(corrupted_seed)}
    key = f"draw {task}/{n_prompts}/{seed}" + ("" if corrupted_seed is None else f"/c{corrupted_seed}")

    def record(ts: task_circuits.TaskSet) -> dict:
        per_template = -(-int(n_prompts) // len(components.PAPER_CLEAN_TEMPLATES))
        return {**task_circuits.prompts_record({task: ts})[task],
                "size": 2 * per_template * len(components.PAPER_CLEAN_TEMPLATES)}

    return searches.drawn(
        key, {"task": task, **args},
        draw=lambda: task_circuits.prepare_task(model, task, **args),
        record=record,
        rebuild=lambda rec: task_circuits.task_sets_from_record(model, {task: rec})[task],
        check=lambda ts: task_circuits.check_draw(model, ts, **args),
    )
