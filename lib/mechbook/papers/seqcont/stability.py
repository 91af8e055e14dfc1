"""How many prompts a node circuit needs (Paper B: Lan, Torr & Barez 2024, section 3; chapter b7).

Node pruning decides on the mean metric over ``n_prompts`` prompts, so a circuit found
on a small sample partly reflects which prompts were drawn. This module finds each
task's circuit at several sample sizes, each with several seeds (a seed draws both the
clean prompts and the corrupted prompts whose means ablate), and measures how much
the circuits agree:

- :func:`circuits_by_size`: one pruning run per task, size and seed, with the circuit's
  score and a bootstrap interval of it over the prompts;
- :func:`agreement`: Jaccard indices of heads and of MLPs between seeds at one size,
  and between a size and the next one (same seed);
- :func:`smallest_stable_size`: the smallest size at which every task's circuit
  agrees at least ``at_least`` across seeds and with the next size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from tqdm import tqdm

from mechbook.core.circuits import Circuit, prune_nodes
from mechbook.core.checks import check
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.stats import bootstrap_ratio_interval, jaccard
from mechbook.papers.seqcont.task_circuits import circuit_scores_per_prompt, prepare_task

STABLE = 0.9  # the bar: Jaccard at least this across seeds and against the next size


def circuits_by_size(
    model: LoadedModel,
    tasks: Sequence[str],
    sizes: Sequence[int],
    seeds: Sequence[int],
    *,
    threshold: float = 0.2,
    n_corrupted: int = 64,
    prune: Callable | None = None,
) -> tuple[pd.DataFrame, dict[tuple[str, int, int], Circuit]]:
    """Node pruning on each task at each sample size with each seed.

    Returns one row per run (task, n_prompts, seed, n_heads, n_mlps, score with its
    95% bootstrap interval over prompts, seconds) and the circuits keyed by
    ``(task, n_prompts, seed)``. ``prune(key, task_set, threshold=...)`` runs one pruning
    (default :func:`~mechbook.core.circuits.prune_nodes`; a chapter passes
    :meth:`mechbook.book.searches.Searches.node_pruning` to load and re-check committed
    ones); ``seconds`` is the pruning's, as ``log.attrs["seconds"]`` gives it when set.
    """
    if prune is None:
        def prune(key, t, *, threshold):
            return prune_nodes(model, t.batch, t.means, t.metric, threshold=threshold, tokens=t.tokens)

    tasks = check("tasks", list(tasks) if isinstance(tasks, (list, tuple)) else tasks)
    sizes, seeds = check("sizes", sizes), check("seeds", seeds)  # a size of 2 at least: an interval needs two prompts
    threshold = check("threshold", threshold)
    rows, found = [], {}
    runs = [(task, int(n), int(seed)) for task in tasks for n in sorted(sizes) for seed in seeds]
    for task, n, seed in tqdm(runs, desc="circuits by sample size", disable=None):
        t = prepare_task(model, task, n_prompts=n, n_corrupted=n_corrupted, seed=seed)
        start = time.perf_counter()
        circuit = prune(f"{task}/{n}/{seed}", t, threshold=threshold)
        seconds = circuit.log.attrs.get("seconds", time.perf_counter() - start)
        num, den = circuit_scores_per_prompt(model, t, circuit)
        low, high = bootstrap_ratio_interval(num, den, seed=seed)
        found[(task, n, seed)] = circuit
        rows.append({"task": task, "n_prompts": n, "solved": len(t), "seed": seed, "n_heads": len(circuit.heads),
                     "n_mlps": len(circuit.mlps), "score": 100.0 * num.mean() / den.mean(), "score_low": low,
                     "score_high": high, "seconds": seconds,
                     "heads": " ".join(c.label for c in circuit.components if c.kind == "head"),
                     "mlps": " ".join(str(l) for l in circuit.mlps)})
    return pd.DataFrame(rows), found


def agreement(circuits: Mapping[tuple[str, int, int], Circuit]) -> pd.DataFrame:
    """Jaccard indices of heads and MLPs: between every two seeds at one size, and between a size and the next.

    One row per (task, n_prompts, comparison): ``comparison`` is "across seeds" (the
    mean over pairs of seeds at this size, with the lowest pair) or "with next size"
    (the same seed at this size and the next larger one, mean and lowest over seeds).
    """
    if not circuits:
        raise MechbookError("no circuits to compare; pass {(task, n_prompts, seed): Circuit} from circuits_by_size")
    tasks = sorted({t for t, _, _ in circuits}, key=[t for t, _, _ in circuits].index)
    rows = []
    for task in tasks:
        sizes = sorted({n for t, n, _ in circuits if t == task})
        for k, n in enumerate(sizes):
            seeds = sorted(s for t, m, s in circuits if t == task and m == n)
            pairs = {"across seeds": [(circuits[(task, n, a)], circuits[(task, n, b)])
                                      for a, b in combinations(seeds, 2)]}
            if k + 1 < len(sizes):
                nxt = sizes[k + 1]
                pairs["with next size"] = [(circuits[(task, n, s)], circuits[(task, nxt, s)])
                                           for s in seeds if (task, nxt, s) in circuits]
            for comparison, these in pairs.items():
                if not these:
                    continue
                heads = [jaccard(a.heads, b.heads) for a, b in these]
                mlps = [jaccard(a.mlps, b.mlps) for a, b in these]
                rows.append({"task": task, "n_prompts": n, "comparison": comparison, "pairs": len(these),
                             "heads": float(np.mean(heads)), "heads_lowest": float(np.min(heads)),
                             "mlps": float(np.mean(mlps)), "mlps_lowest": float(np.min(mlps))})
    return pd.DataFrame(rows)


def smallest_stable_size(table: pd.DataFrame, *, at_least: float = STABLE) -> int | None:
    """The smallest size at which every task's circuits agree at least ``at_least`` (lowest pair, heads and MLPs)
    across seeds and with the next size; None if no size measured does (the largest size has no next size to meet).
    """
    need = {"task", "n_prompts", "comparison", "heads_lowest", "mlps_lowest"}
    if not isinstance(table, pd.DataFrame) or table.empty or not need <= set(table.columns):
        raise MechbookError(f"smallest_stable_size reads the table of agreement() (columns {sorted(need)}), got "
                            f"{'an empty table' if isinstance(table, pd.DataFrame) and table.empty else 'another'}")
    for n in sorted(table.n_prompts.unique()):
        here = table[table.n_prompts == n]
        tasks = table.task.unique()
        complete = all(set(here[here.task == t].comparison) == {"across seeds", "with next size"} for t in tasks)
        if complete and (here[["heads_lowest", "mlps_lowest"]] >= at_least).all().all():
            return int(n)
    return None
