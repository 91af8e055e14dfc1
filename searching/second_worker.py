"""A second worker for a campaign: computes the plan's last units first, into the same checkpoints.

A campaign (scripts/paper_size.sh) runs its chapter, which prunes unit after unit on one thread.
On a 2-core machine a second process can take the plan from its other end: it computes units with
the chapter's own keys and calls (``Searches.node_pruning``, ``saved_circuits.drawn_task``) and
leaves each finished one as a checkpoint, which the chapter, run with ``--resume``, takes up when
it gets there (a unit's recorded inputs must equal the chapter's, or it is computed again). The
worker stops when it reaches a unit the chapter has finished or is working on. It never publishes.

    cd /work/campaign-b7 && OMP_NUM_THREADS=1 PYTHONPATH=$PWD/lib \
        MECHBOOK_RESULTS=/work/main/searching/results MECHBOOK_RESUME=1 \
        /work/main/.venv/bin/python /work/main/searching/second_worker.py gemma3-270m b7

Plans: those of scripts/paper_size.sh, with the chapters' own keys (b7: stability.circuits_by_size and
stability.draws_apart; b2: its pruning cell, ``<task>/<n_prompts>/<seed>``).
"""
from __future__ import annotations

import os
import sys
import time

import mechbook
from mechbook.book import saved_circuits
from mechbook.book.searches import Searches
from mechbook.papers.seqcont import sequences, stability

BUSY_SECONDS = 180  # a decisions checkpoint written this recently: the chapter is on that unit


def b7_units(sizes=(64, 128), seeds=(0, 1, 2), apart_size=64):
    """The b7 plan's units from its end: (key, task, n_prompts, seed, corrupted_seed)."""
    tasks = sequences.PAPER_TASKS
    units = []
    for task in reversed(tasks):
        for s in reversed(seeds[1:]):
            for moved in reversed(stability.DRAWS):
                clean, corrupted = (s, seeds[0]) if moved == stability.DRAWS[0] else (seeds[0], s)
                units.append((f"{task}/{apart_size}/clean {clean}/corrupted {corrupted}",
                              task, apart_size, clean, corrupted))
    for task in reversed(tasks):
        for n in sorted(sizes, reverse=True):
            for s in reversed(seeds):
                units.append((f"{task}/{n}/{s}", task, n, s, None))
    return units


def b2_units(n_prompts: int, seeds=(0, 1, 2, 3, 4)):
    """The b2 plan's units from its end (the last seed first): one pruning per task and seed."""
    return [(f"{task}/{n_prompts}/{s}", task, n_prompts, s, None)
            for s in reversed(seeds) for task in reversed(sequences.PAPER_TASKS)]


# (model, chapter): the chapter's results folder, its units from the end, the corrupted prompts per draw; as
# scripts/paper_size.sh plans them
PLANS = {
    ("gemma3-270m", "b7"): ("b7_circuit_stability", b7_units, 64),
    ("gemma3-270m", "b2"): ("b2_node_pruning", lambda: b2_units(512), 512),
    ("smollm2-135m", "b2"): ("b2_node_pruning", lambda: b2_units(128), 128),
}


def main(model_name: str, chapter: str) -> None:
    if (model_name, chapter) not in PLANS:
        sys.exit(f"second_worker: no plan for {model_name} {chapter}; plans: "
                 + ", ".join(" ".join(p) for p in PLANS))
    if os.environ.get("MECHBOOK_RESUME") != "1":
        sys.exit("second_worker: set MECHBOOK_RESUME=1, or the checkpoints of the chapter's run are deleted")
    folder, units, n_corrupted = PLANS[(model_name, chapter)]
    model = mechbook.load_model(model_name)
    searches = Searches(folder, model)
    started = False  # the units a restarted worker finished itself are passed over, up to its first unfinished one
    for key, task, n, clean, corrupted in units():
        stem = searches.checkpoints / key.replace("/", "--")
        done, under_way = stem.with_suffix(".unit.json"), stem.with_suffix(".decisions.json")
        if done.exists() and not started:
            continue
        if done.exists():
            print(f"second_worker: {key} is finished; the chapter has come this far, stopping", flush=True)
            return
        started = True
        if under_way.exists() and time.time() - under_way.stat().st_mtime < BUSY_SECONDS:
            print(f"second_worker: {key} is under way in the chapter, stopping", flush=True)
            return
        print(f"second_worker: {key}", flush=True)
        t = saved_circuits.drawn_task(searches, task, n_prompts=n, n_corrupted=n_corrupted, seed=clean,
                                      corrupted_seed=corrupted)
        searches.node_pruning(key, t.batch, t.means, t.metric, threshold=0.2, tokens=t.tokens)
    print("second_worker: every unit of the plan is done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
