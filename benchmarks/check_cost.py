"""What a check of a committed search costs beside the search itself, per chapter, measured side by side.

Each chapter of Paper B computes its costly searches once and re-checks them on later runs
(:mod:`mechbook.book.searches`). For one unit of each chapter, on the chapter's own inputs,
this script computes the unit (as a chapter with no committed results does), publishes it
into a temporary results folder, then loads and checks it (as a chapter with committed
results does), in one process, one after the other:

- b2: the node pruning of the first task (``numerals``) on b2's prompts and means;
- b3: the edge pruning of the first task inside b2's circuit;
- b4: every circuit's metric (the three task circuits, the shared sub-circuit and 10 random
  controls each) on the first task's prompts;
- b6: the knockouts of the numerals family (13 conditions on 2 token lengths);
- b7: one pruning of b7's (numerals, 8 prompts, seed 0).

It prints, per chapter, the seconds to compute and to check, their ratio, and the forward
passes and prompt-blocks (prompts x transformer blocks run) of each where the check
records them. The issue's bar: a check costs at most a tenth of the search. Usage:

    python benchmarks/check_cost.py                         # gemma3-270m, every chapter
    python benchmarks/check_cost.py --model smollm2-135m --chapters b2 b4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

import mechbook
from mechbook.book.results import ChapterResults
from mechbook.book.searches import Searches
from mechbook.core.circuits import Circuit
from mechbook.book import saved_circuits
from mechbook.papers.seqcont import other_sequences, sequences, stability, task_circuits

CHAPTERS = ("b2", "b3", "b4", "b6", "b7")
SHARE = 10  # the bar: a check costs at most 1/SHARE of the search it checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", default="gemma3-270m", help="a model with committed results of b2 and b4")
    parser.add_argument("--chapters", nargs="+", choices=CHAPTERS, default=list(CHAPTERS))
    return parser.parse_args(argv)


def side_by_side(model, chapter: str, unit) -> dict:
    """Compute ``unit(searches)`` into a fresh results folder, publish it, then load and check it: timings."""
    with tempfile.TemporaryDirectory() as root:
        times = {}
        for mode in ("compute", "check"):
            searches = Searches(chapter, model, root=root)
            start = time.perf_counter()
            unit(searches)
            times[mode] = time.perf_counter() - start
            expected = "computed" if mode == "compute" else "checked"
            if searches.outcome != expected:
                raise SystemExit(f"{chapter}: expected the {mode} pass to be {expected}, it was {searches.outcome}")
            saved = ChapterResults(chapter, model.name, root)
            searches.save(saved)
            saved.finish()
        check = next(iter(searches.checks.values()))
        return {"chapter": chapter, "compute_s": times["compute"], "check_s": times["check"],
                "ratio": times["check"] / times["compute"], "units": searches.rows[0]["checked"],
                "of": searches.rows[0]["of"], "check_passes": check.attrs.get("forward_passes"),
                "search_passes": check.attrs.get("search_forward_passes"),
                "check_blocks": check.attrs.get("prompt_blocks"),
                "search_blocks": check.attrs.get("search_prompt_blocks")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=sequences.SeqPromptWarning)
    torch.manual_seed(0)
    model = mechbook.load_model(args.model)
    sets = saved_circuits.load_task_sets(model)
    task = next(iter(sets))
    t = sets[task]
    found = saved_circuits.load_task_circuits(model)
    units = {
        "b2": lambda s: s.node_pruning(task, t.batch, t.means, t.metric, threshold=0.2, tokens=t.tokens),
        "b3": lambda s: s.edge_pruning(task, t.batch, found[task], t.means, t.metric, threshold=0.8,
                                       tokens=t.tokens),
    }
    if "b4" in args.chapters:
        named = {**found, "shared": task_circuits.shared_circuit(found)}
        units["b4"] = lambda s: task_circuits.cross_task_table(model, named, {task: t}, n_random=10, seed=0,
                                                               metrics=s.circuit_metrics)
    if "b6" in args.chapters:
        shared = task_circuits.shared_circuit(found)
        clean = sequences.tokenize_prompts(other_sequences.family_prompts("numerals", n_members=4), model.tokenizer)
        corrupted = sequences.tokenize_prompts(
            other_sequences.family_prompts("numerals", corrupted=True, n_members=4, repeats=4), model.tokenizer)
        kept = other_sequences.common_lengths(clean, corrupted, n_lengths=2)
        heads = Circuit(shared.heads, [])
        ablations = {"shared": shared, **other_sequences.random_ablations(model, shared, 5),
                     "shared heads": heads, **other_sequences.random_ablations(model, heads, 5, name="random heads")}
        units["b6"] = lambda s: other_sequences.knockout_runs(model, kept, corrupted, ablations,
                                                              values=partial(s.values, "numerals"))
    if "b7" in args.chapters:
        small = stability.prepare_task(model, task, n_prompts=8, n_corrupted=64, seed=0)
        units["b7"] = lambda s: s.node_pruning(f"{task}/8/0", small.batch, small.means, small.metric,
                                               threshold=0.2, tokens=small.tokens)
    rows = []
    for chapter in args.chapters:
        row = side_by_side(model, f"{chapter}_check_cost", units[chapter])
        row["chapter"] = chapter
        rows.append(row)
        passes = (f"; forward passes {row['check_passes']} of {row['search_passes']}, prompt-blocks "
                  f"{row['check_blocks']} of {row['search_blocks']}" if row["search_passes"] else "")
        print(f"{chapter}: compute {row['compute_s']:.1f} s, check {row['check_s']:.1f} s: ratio {row['ratio']:.3f} "
              f"({row['units']} of {row['of']} units re-computed{passes})", flush=True)
    over = [r["chapter"] for r in rows if r["ratio"] > 1 / SHARE]
    print(f"{args.model}: every check within a tenth of its search" if not over
          else f"{args.model}: over a tenth: {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
