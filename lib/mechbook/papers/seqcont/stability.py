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
  agrees at least ``at_least`` across seeds and with the next size;
- :func:`draws_apart`: the same with one draw moved and the other held, to tell
  whether the clean prompts or the corrupted means move the heads;
- :func:`decision_margins`: how far from the pruning's bar each head's decision fell,
  for the heads every seed keeps and for those only some keep;
- :func:`inclusion_frequency` and :func:`stable_circuits`: stability selection
  (Meinshausen & Bühlmann 2010) over draws at one size: how often each head and MLP
  is kept, and the circuit of the components kept in at least a stated share of draws.
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
from mechbook.core.names import Component
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
    prepare: Callable | None = None,
) -> tuple[pd.DataFrame, dict[tuple[str, int, int], Circuit]]:
    """Node pruning on each task at each sample size with each seed.

    Returns one row per run (task, n_prompts, seed, n_heads, n_mlps, score with its
    95% bootstrap interval over prompts, seconds) and the circuits keyed by
    ``(task, n_prompts, seed)``. ``prune(key, task_set, threshold=...)`` runs one pruning
    (default :func:`~mechbook.core.circuits.prune_nodes`; a chapter passes
    :meth:`mechbook.book.searches.Searches.node_pruning` to load and re-check committed
    ones); ``seconds`` is the pruning's, as ``log.attrs["seconds"]`` gives it when set.
    ``prepare(task, n_prompts, seed, corrupted_seed)`` draws one task set (default
    :func:`~mechbook.papers.seqcont.task_circuits.prepare_task` with ``n_corrupted``; a
    chapter passes :func:`mechbook.book.saved_circuits.drawn_task` to record and re-check the draws).
    """
    prune, prepare = _defaults(model, prune, prepare, n_corrupted)
    tasks = check("tasks", list(tasks) if isinstance(tasks, (list, tuple)) else tasks)
    sizes, seeds = check("sizes", sizes), check("seeds", seeds)  # a size of 2 at least: an interval needs two prompts
    threshold = check("threshold", threshold)
    rows, found = [], {}
    runs = [(task, int(n), int(seed)) for task in tasks for n in sorted(sizes) for seed in seeds]
    for task, n, seed in tqdm(runs, desc="circuits by sample size", disable=None):
        t = prepare(task, n, seed, None)
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
                if these:
                    rows.append({"task": task, "n_prompts": n, "comparison": comparison, **_jaccard_row(these)})
    return pd.DataFrame(rows)


def _jaccard_row(pairs: Sequence[tuple[Circuit, Circuit]]) -> dict[str, float | int]:
    """How alike the circuits of each pair are: the mean and lowest Jaccard index of their heads and of their MLPs."""
    heads = [jaccard(a.heads, b.heads) for a, b in pairs]
    mlps = [jaccard(a.mlps, b.mlps) for a, b in pairs]
    return {"pairs": len(pairs), "heads": float(np.mean(heads)), "heads_lowest": float(np.min(heads)),
            "mlps": float(np.mean(mlps)), "mlps_lowest": float(np.min(mlps))}


KEPT_BY = ("every seed", "some seeds")  # a head kept at one size by each seed's circuit, or by some only


def decision_margins(circuits: Mapping[tuple[str, int, int], Circuit], *, threshold: float) -> pd.DataFrame:
    """How far from the pruning's bar each head's decision fell: why the heads that move between seeds move.

    ``circuits`` as :func:`circuits_by_size` gives them, each with its decision log. For
    every (task, n_prompts), the heads kept by at least one seed's circuit, and for each
    seed the score of the circuit without the head at the last decision on it (the one that
    kept or removed it) minus the bar, 100 x (1 - ``threshold``): the ``margin`` in points
    of the full model's metric, negative where the head was kept. ``kept_by`` says whether
    every seed's circuit kept the head or only some did. One row per (task, n_prompts,
    seed, head).
    """
    if not circuits:
        raise MechbookError("no circuits; pass {(task, n_prompts, seed): Circuit} from circuits_by_size")
    missing = [key for key, c in circuits.items() if c.log is None]
    if missing:
        raise MechbookError(f"circuits {missing[:3]} carry no decision log; pass the circuits pruning returned")
    threshold = check("threshold", threshold)
    bar = 100.0 * (1.0 - threshold)
    rows = []
    for task, n in dict.fromkeys((t, m) for t, m, _ in circuits):
        seeds = [s for t, m, s in circuits if (t, m) == (task, n)]
        kept = {s: {c.label for c in circuits[(task, n, s)].components if c.kind == "head"} for s in seeds}
        every = set.intersection(*kept.values())
        heads = sorted(set.union(*kept.values()), key=lambda label: tuple(map(int, label.split("."))))
        for s in seeds:
            log = circuits[(task, n, s)].log
            last = log[log.kind == "head"].groupby("component", sort=False).score_without.last()
            for head in heads:
                rows.append({"task": task, "n_prompts": n, "seed": s, "head": head,
                             "kept_by": KEPT_BY[0] if head in every else KEPT_BY[1], "in_circuit": head in kept[s],
                             "margin": float(last[head]) - bar if head in last.index else float("nan")})
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


def inclusion_frequency(circuits: Mapping[tuple[str, int], Circuit]) -> pd.DataFrame:
    """How often each head and MLP is kept across draws, per task: stability selection's frequencies.

    ``circuits`` maps ``(task, seed)`` to the circuit pruning found on that seed's draw
    of prompts (clean prompts and the corrupted prompts behind the means). One row per
    task and component kept at least once: task, component (``4.10`` / ``MLP 3``), kind,
    layer, head, kept (draws that kept it), draws, frequency (kept / draws), sorted by
    task, then frequency (highest first), then position in the model. Meinshausen and
    Bühlmann (2010) select the variables whose frequency over subsamples reaches a
    threshold; :func:`stable_circuits` does that here.
    """
    if not circuits:
        raise MechbookError("no circuits; pass {(task, seed): Circuit}, one pruning per task and draw")
    tasks = list(dict.fromkeys(task for task, _ in circuits))
    rows = []
    for task in tasks:
        draws = [c for (t, _), c in circuits.items() if t == task]
        counts: dict[Component, int] = {}
        for c in draws:
            for comp in c.components:
                counts[comp] = counts.get(comp, 0) + 1
        for comp, kept in counts.items():
            rows.append({"task": task, "component": comp.label, "kind": comp.kind, "layer": comp.layer,
                         "head": comp.head, "kept": kept, "draws": len(draws), "frequency": kept / len(draws)})
    df = pd.DataFrame(rows, columns=["task", "component", "kind", "layer", "head", "kept", "draws", "frequency"])
    df["order"] = df.task.map({t: k for k, t in enumerate(tasks)})
    df["is_mlp"] = df.kind == "mlp"
    df = df.sort_values(["order", "frequency", "layer", "is_mlp", "head"], ascending=[True, False, True, True, True],
                        kind="stable").drop(columns=["order", "is_mlp"]).reset_index(drop=True)
    df["head"] = df["head"].astype("Int64")
    return df


def selection_phrase(draws: int, share: float, n_prompts: int) -> str:
    """How a task's circuit was chosen, for the tables and figures that show it: ``"kept in at least 60% of 5 draws
    of 512 prompts"`` (:func:`stable_circuits` over ``draws`` prunings), or ``"one pruning on 16 prompts"``."""
    if draws == 1:
        return f"one pruning on {n_prompts} prompts"
    return f"kept in at least {share:.0%} of {draws} draws of {n_prompts} prompts"


def stable_circuits(frequency: pd.DataFrame, *, share: float) -> dict[str, Circuit]:
    """Per task, the circuit of the components kept in at least ``share`` of the draws (stability selection).

    ``frequency`` is :func:`inclusion_frequency`'s table. The circuits carry no score:
    they were not found by one pruning, so they are scored on prompts by the caller.
    """
    need = {"task", "kind", "layer", "head", "frequency"}
    if not isinstance(frequency, pd.DataFrame) or not need <= set(frequency.columns):
        raise MechbookError(f"stable_circuits reads the table of inclusion_frequency() (columns {sorted(need)})")
    share = check("stable_share", share, argument="share")
    out = {}
    for task in dict.fromkeys(frequency.task):
        kept = frequency[(frequency.task == task) & (frequency.frequency >= share - 1e-12)]
        heads = kept[kept.kind == "head"]
        out[task] = Circuit([(int(l), int(h)) for l, h in zip(heads["layer"], heads["head"])],
                            [int(l) for l in kept[kept.kind == "mlp"]["layer"]])
    return out


def _defaults(model: LoadedModel, prune: Callable | None, prepare: Callable | None,
              n_corrupted: int) -> tuple[Callable, Callable]:
    """The pruning and the draw a study runs when the chapter passes none: prune_nodes and prepare_task."""
    def prune_here(key, t, *, threshold):
        return prune_nodes(model, t.batch, t.means, t.metric, threshold=threshold, tokens=t.tokens)

    def prepare_here(task, n_prompts, seed, corrupted_seed):
        return prepare_task(model, task, n_prompts=n_prompts, n_corrupted=n_corrupted, seed=seed,
                            corrupted_seed=corrupted_seed)

    return prune or prune_here, prepare or prepare_here


DRAWS = ("clean prompts", "corrupted means")  # the draw that moves; the other is held at the first seed


def draws_apart(
    model: LoadedModel,
    tasks: Sequence[str],
    n_prompts: int,
    seeds: Sequence[int],
    *,
    threshold: float = 0.2,
    n_corrupted: int = 64,
    prune: Callable | None = None,
    prepare: Callable | None = None,
) -> tuple[pd.DataFrame, dict[tuple[str, str, int], Circuit]]:
    """Which draw moves the circuit: node pruning with one draw moved over ``seeds`` and the other held.

    For each task: the clean prompts of each seed with the corrupted means of ``seeds[0]``
    ("clean prompts" moves), and the clean prompts of ``seeds[0]`` with the means of each
    seed ("corrupted means" moves). Returns the agreement across seeds for each (task,
    moved draw), in the columns of :func:`agreement`, and the circuits keyed by
    ``(task, moved draw, seed)``. ``prune(key, task_set, threshold=...)`` as in
    :func:`circuits_by_size`, and ``prepare`` too; the run with both draws at ``seeds[0]`` is shared.
    """
    prune, prepare = _defaults(model, prune, prepare, n_corrupted)
    seeds = check("seeds", seeds)
    if len(seeds) < 2:
        raise MechbookError(f"draws_apart compares seeds, so it needs at least two; got {list(seeds)}")
    threshold = check("threshold", threshold)
    first, found, done = int(seeds[0]), {}, {}
    runs = [(task, moved, int(s)) for task in tasks for moved in DRAWS for s in seeds]
    for task, moved, s in tqdm(runs, desc="one draw moved", disable=None):
        clean, corrupted = (s, first) if moved == DRAWS[0] else (first, s)
        # both draws at one seed: the key circuits_by_size gives that run, so a chapter running both prunes it once
        key = (f"{task}/{n_prompts}/{clean}" if clean == corrupted
               else f"{task}/{n_prompts}/clean {clean}/corrupted {corrupted}")
        if key not in done:
            t = prepare(task, n_prompts, clean, None if clean == corrupted else corrupted)
            done[key] = prune(key, t, threshold=threshold)
        found[(task, moved, s)] = done[key]
    rows = []
    for task in tasks:
        for moved in DRAWS:
            pairs = [(found[(task, moved, a)], found[(task, moved, b)]) for a, b in combinations(seeds, 2)]
            rows.append({"task": task, "n_prompts": n_prompts, "moved": moved, **_jaccard_row(pairs)})
    return pd.DataFrame(rows), found
