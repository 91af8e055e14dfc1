"""Removing the top feed-forward sublayers: abstractive vs extractive prompts (Paper A, section 5).

Merullo et al. 2024 remove the FFN (MLP) sublayers of the top of the network, in
steps of 1/6 of the depth, and compare in-context accuracy when the answer must be
recalled from the weights (*abstractive*: "Q: What is the capital of Poland?\\nA:")
with accuracy when it is stated in the prompt (*extractive*: "The capital of Poland
is Warsaw. ..." before the same question). Their claim: recall needs the upper FFNs,
copying does not (BLOOM-176B, colored objects: -17 points extractive, -73 abstractive).

Removing an MLP here means zero-ablating ``blocks.L.hook_mlp_out`` at every
position: the sublayer's write to the residual stream is skipped, so after layer L
the residual is the attention output added to the stream and nothing else. For
Gemma 3 that hook sits after the post-feed-forward norm, and the norm of a zero
vector is zero, so the skip is exact for every architecture.

The layers below the top k are the same at every step, so a sweep makes one clean
pass that caches the residual stream where each step starts, then runs each step
from there with :func:`mechbook.core.runs.run_from_layer`, so each step reruns only
its top k layers, on every architecture. Chapter a6 writes the removal out as plain
hooks on a full forward pass and checks :func:`logits_without_top_mlps` against it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm

from mechbook.core.checks import check
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import edit_hooks, zero_ablation
from mechbook.core.loading import LoadedModel
from mechbook.core.names import Component, act_name
from mechbook.core.runs import (
    TokenBatch,
    chunk_starts,
    run_from_layer,
    run_last,
    tokenize,
)
from mechbook.papers.vector_arithmetic import reported
from mechbook.papers.vector_arithmetic.prompts import PromptSet, build_prompts

PAPER_STEPS = reported.FFN_REMOVAL_STEPS  # the paper removes FFNs top-down in steps of 1/6 of the layers


# --- which layers -------------------------------------------------------------------


def top_down_layer_counts(n_layers: int, steps: int = PAPER_STEPS) -> list[int]:
    """How many top MLPs to remove at each step: ceil(i * n_layers / steps) for i = 0..steps.

    Rounded up, so BLOOM-176B's 70 layers give 24 at 2/6, the point the paper reports
    ("removing the top 24 FFN sublayers"); 18 layers give 0, 3, ..., 18.
    """
    n_layers = int(n_layers) if isinstance(n_layers, np.integer) else n_layers
    steps = int(steps) if isinstance(steps, np.integer) else steps
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise MechbookError(f"n_layers must be a positive integer, not {n_layers!r}")
    if not isinstance(steps, int) or steps < 1:
        raise MechbookError(f"steps must be a positive integer (the paper uses {PAPER_STEPS}), not {steps!r}")
    return sorted({math.ceil(i * n_layers / steps) for i in range(steps + 1)})


def top_mlps(model: LoadedModel, k: int) -> list[Component]:
    """The MLPs of the top ``k`` layers, the set removed at one step of the sweep."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= model.n_layers:
        raise MechbookError(
            f"cannot remove the top {k!r} MLPs of {model.name}: pass a whole number from 0 to {model.n_layers} "
            f"(its number of layers), e.g. from top_down_layer_counts({model.n_layers})"
        )
    return [Component("mlp", layer) for layer in range(model.n_layers - int(k), model.n_layers)]


# --- prompts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedPrompts:
    """Abstractive and extractive prompts of the same items, in the same order."""

    task: str
    abstractive: PromptSet
    extractive: PromptSet
    counts: dict[str, int]  # usable abstractive / extractive, paired, drawn

    def __iter__(self):
        return iter((self.abstractive, self.extractive))

    def __len__(self) -> int:
        return len(self.abstractive)


def _select(prompts: PromptSet, items: Sequence[str]) -> PromptSet:
    """The prompt set cut to ``items``, in that order (each item's row kept whole)."""
    index = {item: i for i, item in enumerate(prompts.items)}
    rows = [index[item] for item in items]
    per_item = ["items", "groups", "prompts", "token_ids", "answers", "answer_ids", "answer_tokens",
                "answer_n_tokens", "argument_ids", "argument_tokens"]
    fields = {name: [getattr(prompts, name)[i] for i in rows] for name in per_item}
    return replace(prompts, **fields, usable_by_group=dict(Counter(fields["groups"])))


def paired_prompts(
    task: str,
    model: LoadedModel,
    *,
    max_items: int | None = None,
    seed: int = 0,
    n_shots: int | None = None,
) -> PairedPrompts:
    """Abstractive and extractive prompts of one task, kept only for items usable in both (section 5).

    Both variants are built with the same seed, so an item's extractive prompt is its
    abstractive prompt preceded by the stated facts; items whose answer token differs
    between the two are dropped. ``max_items`` draws at most that many pairs (seeded).
    """
    abstractive = build_prompts(task, model, seed=seed, n_shots=n_shots, variant="abstractive")
    extractive = build_prompts(task, model, seed=seed, n_shots=n_shots, variant="extractive")
    answer_ext = dict(zip(extractive.items, extractive.answer_ids))
    prompt_ext = dict(zip(extractive.items, extractive.prompts))
    paired = []
    for item, answer, prompt in zip(abstractive.items, abstractive.answer_ids, abstractive.prompts):
        if item not in answer_ext or answer_ext[item] != answer:
            continue
        if not prompt_ext[item].endswith(prompt):
            raise MechbookError(
                f"the extractive prompt of {item!r} does not end with its abstractive prompt; the two variants "
                "no longer pair up: check build_prompts in mechbook.papers.vector_arithmetic.prompts"
            )
        paired.append(item)
    if not paired:
        raise MechbookError(f"no item of task {task!r} is usable in both variants for {model.name}; try another task")
    n_paired = len(paired)
    if max_items is not None:
        max_items = check("n_prompts", max_items, argument="max_items")
        if max_items < len(paired):
            drawn = set(random.Random(f"{seed}|{task}|pairs").sample(paired, max_items))
            paired = [item for item in paired if item in drawn]
    counts = {"usable_abstractive": len(abstractive), "usable_extractive": len(extractive),
              "paired": n_paired, "drawn": len(paired)}
    return PairedPrompts(task, _select(abstractive, paired), _select(extractive, paired), counts)


# --- the sweep ----------------------------------------------------------------------------


def ffn_removal_sweep(
    model: LoadedModel,
    prompt_sets: PromptSet | Iterable[PromptSet],
    *,
    layers_removed: Sequence[int] | None = None,
    per_item: bool = False,
    prompts_per_pass: int = 32,
) -> pd.DataFrame:
    """Accuracy with the top k MLPs removed (zero-ablated at every position), for every k and prompt set.

    ``layers_removed`` defaults to the paper's steps of 1/6 of the depth
    (:func:`top_down_layer_counts`). One row per prompt set x k: task, variant,
    layers_removed, fraction_removed (k / n_layers), n_layers, accuracy, n; with
    ``per_item`` one row per prompt x k with ``correct`` instead.
    Prompts run ``prompts_per_pass`` at a time, grouped by token length to pad little;
    how the steps share work is in the module docstring.
    """
    sets = [prompt_sets] if isinstance(prompt_sets, PromptSet) else list(prompt_sets)
    if not sets or not all(isinstance(p, PromptSet) for p in sets):
        raise MechbookError("pass a PromptSet or a list of them (from build_prompts or paired_prompts)")
    if isinstance(prompts_per_pass, bool) or not isinstance(prompts_per_pass, int) or prompts_per_pass < 1:
        raise MechbookError(f"prompts_per_pass must be a positive integer, not {prompts_per_pass!r}")
    ks = top_down_layer_counts(model.n_layers) if layers_removed is None else list(layers_removed)
    if not ks:
        raise MechbookError("layers_removed is empty; pass the numbers of top MLPs to remove, e.g. [0, 3, 6]")
    for k in ks:
        top_mlps(model, k)  # refuse a bad k before any forward pass
    ks = [int(k) for k in ks]
    frames = []
    for prompts in sets:
        correct = _correct_per_step(model, prompts, ks, prompts_per_pass)
        for k, row in zip(ks, correct):
            frames.append(pd.DataFrame({
                "task": prompts.task,
                "variant": prompts.variant,
                "item": prompts.items,
                "layers_removed": int(k),
                "fraction_removed": int(k) / model.n_layers,
                "n_layers": model.n_layers,
                "correct": row.numpy(),
            }))
    items = pd.concat(frames, ignore_index=True)
    return items if per_item else accuracy_by_step(items)


def _correct_per_step(model: LoadedModel, prompts: PromptSet, ks: Sequence[int], prompts_per_pass: int) -> Tensor:
    """[k, prompt] top-1 correctness, prompts run in length-sorted groups, back in their own order."""
    batch = tokenize(model, prompts.token_ids)
    answers = torch.tensor(prompts.answer_ids, dtype=torch.long)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts.token_ids[i]), i))
    correct = torch.zeros(len(ks), len(prompts), dtype=torch.bool)
    for begin in tqdm(chunk_starts(len(order), prompts_per_pass, "prompts_per_pass"), desc=prompts.task, disable=None, leave=False):
        rows = order[begin : begin + prompts_per_pass]
        logits = logits_without_top_mlps(model, batch.select(rows), ks)
        correct[:, rows] = (logits.argmax(-1).cpu() == answers[rows][:, None]).T
    return correct


def logits_without_top_mlps(model: LoadedModel, batch: TokenBatch, ks: Sequence[int]) -> Float[Tensor, "batch k d_vocab"]:
    """Last-position logits with the top k MLPs removed (zero-ablated), for each k in ``ks``.

    One clean pass caches the residual entering each layer where a step starts, and
    each step then runs only its top k layers: the layers below are the same in every step.
    """
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise MechbookError(f"ks takes a list of MLP counts, e.g. top_down_layer_counts({model.n_layers}), got {ks!r}")
    ks = list(ks)
    if not ks:
        raise MechbookError(f"ks=[] removes nothing; pass counts of top MLPs, e.g. top_down_layer_counts({model.n_layers})")
    removed = [top_mlps(model, k) for k in ks]
    starts = [model.n_layers - int(k) for k in ks]
    names = sorted({act_name("resid_pre", s) for s in starts if s < model.n_layers})
    intact, cache = run_last(model, batch, names=names)
    out = []
    for start, mlps in zip(starts, removed):
        if not mlps:
            out.append(intact)
            continue
        resid = cache[act_name("resid_pre", start)]
        out.append(run_from_layer(model, resid, start, batch.last_pos, fwd_hooks=edit_hooks(zero_ablation(mlps)))[0])
    return torch.stack(out, dim=1)


def accuracy_by_step(items: pd.DataFrame) -> pd.DataFrame:
    """Per-prompt rows of :func:`ffn_removal_sweep` (``per_item=True``) averaged per task, variant and k."""
    keys = ["task", "variant", "layers_removed", "fraction_removed", "n_layers"]
    if not {*keys, "correct"} <= set(items.columns):
        raise MechbookError("accuracy_by_step needs the per-prompt table of ffn_removal_sweep(..., per_item=True)")
    return items.groupby(keys, sort=False)["correct"].agg(accuracy="mean", n="size").reset_index()


# --- reading the curves -------------------------------------------------------------------


def collapse_summary(table: pd.DataFrame, *, at_fraction: float = 2 / PAPER_STEPS) -> pd.DataFrame:
    """Per task and variant: how fast accuracy falls as top MLPs are removed.

    ``accuracy_intact``: with nothing removed. ``drop_at``: accuracy lost (in points of
    accuracy, as the paper reports) at the step nearest ``at_fraction`` of the depth;
    the default 2/6 is the paper's BLOOM-176B point (24 of 70 layers).
    ``retained_area``: area under accuracy / intact accuracy over the fraction
    removed (0 to 1); 1 means nothing is lost, smaller means an earlier collapse.
    """
    need = {"task", "variant", "fraction_removed", "layers_removed", "accuracy"}
    if not need <= set(table.columns):
        raise MechbookError(f"collapse_summary needs the columns {sorted(need)} of ffn_removal_sweep's table")
    rows = []
    for (task, variant), curve in table.groupby(["task", "variant"], sort=False):
        curve = curve.sort_values("fraction_removed")
        if curve.fraction_removed.iloc[0] != 0:
            raise MechbookError(f"the sweep of {task!r} ({variant}) has no k=0 step; include 0 in layers_removed")
        intact = curve.accuracy.iloc[0]
        at = curve.iloc[(curve.fraction_removed - at_fraction).abs().argmin()]
        retained = curve.accuracy / intact if intact > 0 else curve.accuracy * 0
        x = curve.fraction_removed.to_numpy()
        area = float(np.sum(np.diff(x) * (retained.to_numpy()[1:] + retained.to_numpy()[:-1]) / 2)) / (x[-1] - x[0]) \
            if x[-1] > x[0] else float("nan")
        rows.append({
            "task": task,
            "variant": variant,
            "accuracy_intact": intact,
            "layers_removed_at": int(at.layers_removed),
            "fraction_at": at.fraction_removed,
            "accuracy_at": at.accuracy,
            "drop_at": intact - at.accuracy,
            "retained_area": area,
        })
    return pd.DataFrame(rows)
