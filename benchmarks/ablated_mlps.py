"""What skipping ablated components buys: b2's node pruning and b3's path patching, three ways, in one run.

Inside a circuit every head and MLP outside it is mean-ablated: its output is written
over by its mean over the corrupted prompts, so computing it is wasted work.
``mechbook.core.runs.temporary_hooks`` therefore hands such an MLP zeros instead of
running it, and computes the query, key and value projections only for the heads still
read (the hook then writes the means, exactly as before). On chapter b2's saved
prompts and circuit for one task, this script times

- ``mechbook.core.circuits.prune_nodes`` (chapter b2's node pruning, from the full model);
- ``mechbook.core.path_patching.patch_paths`` on the circuit's edges (chapter b3's edge
  pruning; ``--edges`` of them drawn at random, 0 for all),

each three ways: everything computed (``LocalRunner(skip_mlps=False, skip_heads=False)``,
the engine before both changes), ablated MLPs skipped, and
ablated MLPs and heads skipped (the default), and checks that all three give the same
numbers, bit for bit. Prints seconds (wall and CPU) and the speed-up of each skip over
computing everything. Needs chapter b2's results for the model. Usage:

    python benchmarks/ablated_mlps.py                                  # gemma3-270m, numerals, 200 edges
    python benchmarks/ablated_mlps.py --model smollm2-135m --task months --edges 0   # every edge
    python benchmarks/ablated_mlps.py --only edges                     # path patching alone
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
import warnings

import torch

import mechbook
from mechbook.core.circuits import prune_nodes
from mechbook.core.path_patching import circuit_edges, patch_paths
from mechbook.core.runs import LocalRunner
from mechbook.book import saved_circuits
from mechbook.papers.seqcont import sequences, task_circuits


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--task", default="numerals", choices=sequences.PAPER_TASKS)
    parser.add_argument("--edges", type=int, default=200,
                        help="edges to patch, drawn at random from the circuit's (0: every edge)")
    parser.add_argument("--only", choices=("nodes", "edges"), help="time node pruning or path patching alone")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, loaded CPU extra threads mostly spin)")
    args = parser.parse_args(argv)
    if args.edges < 0 or args.threads < 1:
        parser.error("--edges must be at least 0 and --threads at least 1")
    return args


def timed(fn) -> tuple[object, float, float]:
    """Result, wall-clock seconds and CPU seconds of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


WAYS = ("every", "mlps", "skipped")  # everything computed; ablated MLPs skipped; ablated MLPs and heads skipped


RUNNERS = {"every": LocalRunner(skip_mlps=False, skip_heads=False), "mlps": LocalRunner(skip_heads=False),
           "skipped": LocalRunner()}


def three_ways(model, fn) -> dict:
    """``fn(model)`` with everything computed, with ablated MLPs skipped, then with ablated MLPs and heads skipped."""
    out: dict = {"seconds": []}
    for way in WAYS:
        result, wall, cpu = timed(lambda: fn(dataclasses.replace(model, runner=RUNNERS[way])))
        out[way] = result
        out["seconds"].append((wall, cpu))
    return out


def compare_nodes(model, task: task_circuits.TaskSet) -> dict:
    """Node pruning three ways; ``same``: the same decisions and scores."""
    out = three_ways(model, lambda on: prune_nodes(on, task.batch, task.means, task.metric, tokens=task.tokens))
    logs = [out[w].log for w in WAYS]
    out["same"] = all(a[["component", "removed"]].equals(b[["component", "removed"]])
                      and a.score_without.tolist() == b.score_without.tolist() for a, b in zip(logs, logs[1:]))
    return out


def compare_edges(model, task: task_circuits.TaskSet, circuit, edges) -> dict:
    """Path patching of ``edges`` inside ``circuit`` three ways; ``same``: equal bit for bit."""
    out = three_ways(model, lambda on: patch_paths(on, task.batch, edges, task.metric, means=task.means,
                                                   ablate=circuit.complement(model), tokens=task.tokens))
    out["same"] = torch.equal(out["every"], out["mlps"]) and torch.equal(out["every"], out["skipped"])
    return out


HEADER = ("| what | everything computed (s wall / CPU) | ablated MLPs skipped (s wall / CPU) | "
          "ablated MLPs and heads skipped (s wall / CPU) | speed-up (CPU): MLPs / both | same numbers |")


def row(what: str, out: dict) -> str:
    (e_wall, e_cpu), (m_wall, m_cpu), (s_wall, s_cpu) = out["seconds"]
    return (f"| {what} | {e_wall:.1f} / {e_cpu:.1f} | {m_wall:.1f} / {m_cpu:.1f} | {s_wall:.1f} / {s_cpu:.1f} | "
            f"{e_cpu / m_cpu:.2f}x / {e_cpu / s_cpu:.2f}x | {'yes' if out['same'] else 'NO'} |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=sequences.SeqPromptWarning)
    model = mechbook.load_model(args.model)
    task = saved_circuits.load_task_sets(model)[args.task]
    circuit = saved_circuits.load_task_circuits(model)[args.task]
    edges = circuit_edges(circuit.heads, circuit.mlps)
    if args.edges and args.edges < len(edges):
        edges = random.Random(0).sample(edges, args.edges)
    print(f"model {model.name}; task {args.task}: {len(task)} prompts; b2's circuit: {len(circuit.heads)} heads, "
          f"{len(circuit.mlps)} of {model.n_layers} MLPs; torch threads {torch.get_num_threads()}")
    print(HEADER)
    print("|---|---|---|---|---|---|")
    if args.only != "edges":
        print(row("node pruning (b2), from the full model", compare_nodes(model, task)), flush=True)
    if args.only != "nodes":
        print(row(f"path patching (b3), {len(edges)} edges in the circuit",
                  compare_edges(model, task, circuit, edges)))

if __name__ == "__main__":
    main()
