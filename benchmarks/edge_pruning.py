"""Edge pruning (chapter b3): path patching inside a circuit, with and without computing the ablated MLPs.

Inside a node circuit every MLP outside the circuit is mean-ablated: its output is
written over by its mean over the corrupted prompts, so computing it is wasted work.
``mechbook.core.runs.temporary_hooks`` therefore hands such an MLP zeros instead of
running it (the hook then writes the mean, exactly as before). This script times
``mechbook.core.path_patching.patch_paths`` on the edges of chapter b2's saved circuit
for one task, on b2's saved prompts, twice in one run:

- every MLP computed (``mechbook.core.runs.every_mlp_computed``), the engine before the change;
- overwritten MLPs skipped (the default),

and checks that the two give the same numbers, bit for bit. Prints seconds (wall and
CPU) and the speed-up. Needs chapter b2's results for the model. Usage:

    python benchmarks/edge_pruning.py                                  # gemma3-270m, numerals, 200 edges
    python benchmarks/edge_pruning.py --model smollm2-135m --task months --edges 0   # every edge
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import torch

import mechbook
from mechbook.core.path_patching import circuit_edges, patch_paths
from mechbook.core.runs import every_mlp_computed
from mechbook.papers.seqcont import sequences, task_circuits


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--task", default="numerals", choices=sequences.PAPER_TASKS)
    parser.add_argument("--edges", type=int, default=200,
                        help="edges to patch, drawn at random from the circuit's (0: every edge)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, loaded CPU extra threads mostly spin)")
    args = parser.parse_args(argv)
    if args.edges < 0 or args.threads < 1:
        parser.error("--edges must be at least 0 and --threads at least 1")
    return args


def compare(model, task: task_circuits.TaskSet, circuit, edges) -> dict:
    """``patch_paths`` on ``edges`` with every MLP computed, then with overwritten MLPs skipped: times and results."""
    def run():
        wall, cpu = time.perf_counter(), time.process_time()
        values = patch_paths(model, task.batch, edges, task.metric, means=task.means,
                             ablate=circuit.complement(model), tokens=task.tokens)
        return values, time.perf_counter() - wall, time.process_time() - cpu

    with every_mlp_computed():
        every, e_wall, e_cpu = run()
    skipped, s_wall, s_cpu = run()
    return {"every": (e_wall, e_cpu), "skipped": (s_wall, s_cpu), "same": torch.equal(every, skipped),
            "largest_difference": float((every - skipped).abs().max())}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=sequences.SeqPromptWarning)
    model = mechbook.load_model(args.model)
    task = task_circuits.load_task_sets(model)[args.task]
    circuit = task_circuits.load_task_circuits(model)[args.task]
    edges = circuit_edges(circuit.heads, circuit.mlps)
    if args.edges and args.edges < len(edges):
        edges = random.Random(0).sample(edges, args.edges)
    ablated = model.n_layers - len(circuit.mlps)
    print(f"model {model.name}; task {args.task}: {len(task)} prompts, circuit of {len(circuit.heads)} heads and "
          f"{len(circuit.mlps)} of {model.n_layers} MLPs ({ablated} ablated); {len(edges)} edges; "
          f"torch threads {torch.get_num_threads()}")
    out = compare(model, task, circuit, edges)
    print("| every MLP computed (s wall / CPU) | ablated MLPs skipped (s wall / CPU) | speed-up (CPU) | same numbers |")
    print("|---|---|---|---|")
    (e_wall, e_cpu), (s_wall, s_cpu) = out["every"], out["skipped"]
    print(f"| {e_wall:.1f} / {e_cpu:.1f} | {s_wall:.1f} / {s_cpu:.1f} | {e_cpu / s_cpu:.2f}x | "
          f"{'yes, bit for bit' if out['same'] else 'NO: largest difference %g' % out['largest_difference']} |")


if __name__ == "__main__":
    main()
