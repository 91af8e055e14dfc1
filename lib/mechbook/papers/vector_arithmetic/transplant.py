"""Transplanting the FFN update o into prompts with no task context (Paper A, §4.1; chapter a5).

Merullo et al. put o, read from one task's prompts (chapter a4,
:mod:`mechbook.papers.vector_arithmetic.ffn_update`), into a prompt that only repeats
an argument ("table mug free China table mug free China ..."): added to the residual
stream after its layer, or replacing the outputs of every MLP from that layer on (the
paper's intervention). If o is the word2vec-style offset, the answer (" Beijing")
rises in the output. :func:`run_transplants` runs every :class:`Transplant` on every
prompt from the cached residual stream where it starts, so each costs only the
later layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm

from mechbook.core import decoding
from mechbook.core.checks import check
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import (
    Edit,
    add_vector,
    check_vector,
    edit_hooks,
    position_mask,
)
from mechbook.core.loading import LoadedModel
from mechbook.core.names import Component, act_name
from mechbook.core.runs import (
    TokenBatch,
    chunk_starts,
    run_from_layer,
    run_last,
    tokenize,
)
from mechbook.papers.vector_arithmetic.ffn_update import OVector
from mechbook.papers.vector_arithmetic.prompts import Pair, PromptSet, build_prompts

METHODS = ("add", "replace")


def _ids(values) -> Tensor:
    return torch.as_tensor(values, dtype=torch.long)

def _rank_table(model: LoadedModel, baseline: Tensor, after: Tensor, target: Tensor) -> pd.DataFrame:
    before_rank = decoding.token_ranks(baseline.cpu(), target)
    after_rank = decoding.token_ranks(after.cpu(), target)
    return pd.DataFrame(
        {
            "prompt": range(len(target)),
            "rank_before": before_rank.numpy(),
            "rank_after": after_rank.numpy(),
            "top_after": [decoding.to_str(model, t) for t in after.argmax(-1)],
            "improved": (after_rank < before_rank).numpy(),
            "top1_after": (after_rank == 1).numpy(),
        }
    )


@dataclass(frozen=True)
class Transplant:
    """One way of putting o into a prompt (§4.1); ``label`` names it in tables; see :meth:`edited_run`."""

    label: str
    o: Float[Tensor, "d_model"] | Float[Tensor, "batch d_model"]
    layer: int
    method: str = "add"
    positions: str | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise MechbookError(f"a Transplant's label names it in tables (a non-empty str), got {self.label!r}")
        if self.method not in METHODS:
            raise MechbookError(f"unknown transplant method {self.method!r}; use one of {list(METHODS)}")
        object.__setattr__(self, "scale", check("add_scale", self.scale, argument="scale"))

    def start(self) -> tuple[str, int]:
        """The cached residual a run from a layer starts from, and that layer."""
        if self.method == "add":  # o joins the residual after block L: only blocks L+1.. run again
            return act_name("resid_post", self.layer), self.layer + 1
        return act_name("resid_pre", self.layer), self.layer

    def edited_run(self, model: LoadedModel, chunk: TokenBatch, o: Tensor, resid: Tensor) -> Tensor:
        """Last-position logits of ``chunk`` with o put in, from the cached residual where the run starts.

        ``"add"``: ``scale * o`` added to the residual after block ``layer`` (last
        position by default). ``"replace"``: the paper's intervention, the outputs of MLPs
        ``layer``..last replaced by the constant ``scale * o`` (every position but BOS by
        default: its activations act as an attention sink in Gemma and Llama).
        """
        _, layer = self.start()
        if self.method == "add":
            mask = position_mask(chunk, self.positions or "last", skip_bos=model.prepend_bos)
            return run_from_layer(model, add_vector(resid, self.scale * o, mask), layer, chunk.last_pos)[0]
        mask = position_mask(chunk, self.positions or "all", skip_bos=model.prepend_bos)
        edits = [Edit(Component("mlp", l), "replace", self.scale * o, mask=mask) for l in range(self.layer, model.n_layers)]
        return run_from_layer(model, resid, layer, chunk.last_pos, fwd_hooks=edit_hooks(edits))[0]


def transplant_logits(
    model: LoadedModel, batch: TokenBatch, transplants: Sequence[Transplant], *, batch_size: int = 32
) -> tuple[Float[Tensor, "batch d_vocab"], list[Float[Tensor, "batch d_vocab"]]]:
    """Logits of the unedited prompts and after each transplant (:meth:`Transplant.edited_run`), cheaply.

    One full forward per chunk caches the residual stream where each transplant
    starts; each transplant then re-runs only the layers from its own on
    (:func:`mechbook.core.runs.run_from_layer`).
    """
    if isinstance(transplants, Transplant) or not isinstance(transplants, (list, tuple)) or not transplants:
        raise MechbookError("transplant_logits takes a non-empty list of Transplant, e.g. [Transplant('o', o, layer)]")
    if not all(isinstance(t, Transplant) for t in transplants):
        raise MechbookError("transplant_logits takes Transplant objects only, e.g. [Transplant('o', o, layer)]")
    # a negative layer counts from the end: resolved here, as everywhere else
    transplants = [replace(t, layer=model.check_layer(t.layer)) for t in transplants]
    for t in transplants:
        check_vector(model, t.o, len(batch), f"the o of transplant {t.label!r}")
    names = sorted({t.start()[0] for t in transplants})
    baseline, after = [], [[] for _ in transplants]
    for start in tqdm(chunk_starts(len(batch), batch_size), disable=None, leave=False):
        rows = slice(start, start + batch_size)
        chunk = batch.select(rows)
        logits, cache = run_last(model, chunk, names=names)
        baseline.append(logits)
        for k, t in enumerate(transplants):
            o = t.o[rows] if t.o.dim() == 2 else t.o
            after[k].append(t.edited_run(model, chunk, o, cache[t.start()[0]]))
    return torch.cat(baseline), [torch.cat(parts) for parts in after]


def no_context_targets(
    model: LoadedModel, task: str, *, exclude: Sequence[str] = (), groups: Sequence[str] | None = None,
    n: int | None = None, seed: int = 0,
) -> PromptSet:
    """No-context prompts of a task (§4.1, "table mug free China ..."), leaving out the items o was built from.

    ``groups`` keeps only items of those groups (past tense: "regular" / "irregular").
    ``n`` draws at most that many (seeded); the target is each prompt's ``answer_ids``.
    """
    full = build_prompts(task, model, variant="no_context", seed=seed)
    excluded = set(exclude)
    pairs = [
        Pair(item, answer, group)
        for item, answer, group in zip(full.items, full.answers, full.groups)
        if item not in excluded and (groups is None or group in groups)
    ]
    if not pairs:
        raise MechbookError(
            f"no no-context prompts of task {task!r} left (groups={groups}, {len(excluded)} items excluded); "
            "build o from fewer items or use another task"
        )
    return build_prompts(task, model, variant="no_context", pairs=pairs, seed=seed,
                         n=None if n is None else min(n, len(pairs)))


# task of the o vector -> domain -> (task whose no-context prompts receive it, groups kept or None for all).
# §4.1: in-domain = the same task's items not used to build o; out-of-domain = US state capitals for
# world capitals, words outside the colour/object list for (up)casing, irregular verbs for an o built
# from regular ones.
TRANSPLANT_DOMAINS: dict[str, dict[str, tuple[str, list[str] | None]]] = {
    "capitals": {"in-domain": ("capitals", None), "out-of-domain": ("us_state_capitals", None)},
    "capitalize": {"in-domain": ("capitalize", None), "out-of-domain": ("capitalize_unseen", None)},
    "uppercase": {"in-domain": ("uppercase", None), "out-of-domain": ("uppercase_unseen", None)},
    "past_tense": {"in-domain": ("past_tense", ["regular"]), "out-of-domain": ("past_tense", ["irregular"])},
}


def transplant_targets(model: LoadedModel, o: OVector, domain: str, *, n: int | None = None, seed: int = 0) -> PromptSet:
    """The no-context prompts a saved o is transplanted into, per :data:`TRANSPLANT_DOMAINS`, without o's own items."""
    if o.task not in TRANSPLANT_DOMAINS:
        raise MechbookError(f"no transplant domains for task {o.task!r}; known: {sorted(TRANSPLANT_DOMAINS)}")
    domains = TRANSPLANT_DOMAINS[o.task]
    if domain not in domains:
        raise MechbookError(f"unknown domain {domain!r}; use one of {list(domains)}")
    task, groups = domains[domain]
    return no_context_targets(model, task, exclude=o.items, groups=groups, n=n, seed=seed)


def run_transplants(
    model: LoadedModel, targets: PromptSet, transplants: Sequence[Transplant], *, batch_size: int = 32
) -> pd.DataFrame:
    """Every transplant on every no-context prompt: the target's rank before and after, one row per pair.

    ``argument_rank_before`` checks the set-up: the unedited model should be about
    to repeat the argument (" China").
    """
    batch = tokenize(model, targets.token_ids)
    baseline, after = transplant_logits(model, batch, transplants, batch_size=batch_size)
    argument_rank = decoding.token_ranks(baseline.cpu(), _ids(targets.argument_ids))
    top_before = [decoding.to_str(model, t) for t in baseline.argmax(-1)]
    frames = []
    for t, logits in zip(transplants, after):
        table = _rank_table(model, baseline, logits, _ids(targets.answer_ids))
        table.insert(0, "method", t.label)
        table.insert(1, "edit", t.method)
        table.insert(2, "layer", t.layer)
        table.insert(3, "item", targets.items)
        table.insert(4, "group", targets.groups)
        table.insert(5, "target", targets.answer_tokens)
        table.insert(6, "top_before", top_before)
        table.insert(7, "argument_rank_before", argument_rank.numpy())
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def transplant_summary(table: pd.DataFrame, by: Sequence[str] = ("task", "domain", "method")) -> pd.DataFrame:
    """Failure rate ("no effect": the target's rank does not improve) and median ranks per group."""
    grouped = table.groupby(list(by), sort=False)
    return grouped.agg(
        failure_rate=("improved", lambda s: 1.0 - s.mean()),
        median_rank_before=("rank_before", "median"),
        median_rank_after=("rank_after", "median"),
        top1_rate_after=("top1_after", "mean"),
        n=("improved", "size"),
    ).reset_index()


