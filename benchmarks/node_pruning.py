"""Node pruning: mechbook's ``prune_nodes`` against the paper's literal loop, same prompts, same model, one run.

Paper B's iterative node pruning (``run_node_ablation.py`` of apartresearch/seqcont_circuits)
tries every component still in the circuit in turn, with one full forward pass per try.
For each sample size this script prepares one task as chapter b2 does (solved prompts,
corrupted means), then times

- the literal loop: one full forward pass per tentative removal (every head and MLP
  outside the circuit, and the candidate, mean-ablated), decisions in the paper's order;
- ``mechbook.core.circuits.prune_nodes``: the same sequential decisions, the tentative
  removals of a window of candidates batched into one pass in which each candidate's
  rows join at the candidate's own layer, from the cached residual stream of the
  current circuit; scores of a circuit and candidate met before are reused.

and checks that both take every decision alike. Prints seconds per task (wall and
CPU), forward passes and the speed-up. Usage:

    python benchmarks/node_pruning.py                          # gemma3-270m, numerals, 8 32 128 prompts
    python benchmarks/node_pruning.py --sizes 8 32 --task months
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import mechbook
from mechbook.core.circuits import Circuit, full_model_metric, prune_nodes, score_circuit
from mechbook.core.names import Component
from mechbook.papers.seqcont import sequences, task_circuits


def literal_loop(model, task: task_circuits.TaskSet, threshold: float) -> list[tuple[str, bool]]:
    """The paper's loop: one full forward per candidate; returns (component, removed) in visiting order."""
    full = full_model_metric(model, task.batch, task.metric)
    circuit, decisions = Circuit.full(model), []
    while True:
        changed = {}
        for direction in ("backward", "forward"):
            changed[direction] = False
            layers = range(model.n_layers - 1, -1, -1) if direction == "backward" else range(model.n_layers)
            for layer in layers:
                heads = [Component("head", layer, h) for h in range(model.n_heads)]
                mlp = [Component("mlp", layer)]
                for c in (mlp + heads if direction == "backward" else heads + mlp):
                    if c not in circuit:
                        continue
                    without = Circuit.from_components(x for x in circuit.components if x != c)
                    score = score_circuit(model, task.batch, without, task.means, task.metric, full_metric=full)
                    removed = (100.0 - score) < 100.0 * threshold
                    decisions.append((c.label, removed))
                    if removed:
                        circuit, changed[direction] = without, True
            if not changed[direction]:
                break
        if not all(changed.values()):
            return decisions


def timed(fn, *args, **kwargs):
    """Result, wall-clock seconds and CPU seconds of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--task", default="numerals", choices=sequences.PAPER_TASKS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128], help="solved prompts per run")
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, loaded CPU extra threads mostly spin)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.threads < 1:
        parser.error("--sizes and --threads must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=sequences.SeqPromptWarning)
    model = mechbook.load_model(args.model)
    print(f"model {model.name}: {model.n_layers} layers x {model.n_heads} heads + {model.n_layers} MLPs; "
          f"task {args.task}; threshold {args.threshold}; torch threads {torch.get_num_threads()}")
    print("| prompts | tokens | decisions | literal loop (s wall / CPU) | prune_nodes (s wall / CPU) | "
          "forward passes (literal / prune_nodes) | speed-up (CPU) | same decisions |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        task = task_circuits.prepare_task(model, args.task, n_prompts=n, seed=0)
        found, wall, cpu = timed(prune_nodes, model, task.batch, task.means, task.metric, threshold=args.threshold,
                                 tokens=task.tokens)
        decisions, l_wall, l_cpu = timed(literal_loop, model, task, args.threshold)
        same = decisions == list(zip(found.log.component, found.log.removed))
        print(f"| {len(task)} | {task.batch.input_ids.shape[1]} | {len(decisions)} | {l_wall:.1f} / {l_cpu:.1f} | "
              f"{wall:.1f} / {cpu:.1f} | {len(decisions) + 1} / {found.log.attrs['forward_passes']} | "
              f"{l_cpu / cpu:.2f}x | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
