"""Circuits: scores, iterative node pruning, edge pruning, random controls.

A *circuit* is a set of attention heads and MLPs; everything outside it is
mean-ablated (its output replaced, at every position, by its mean over the corrupted
prompts) and the circuit's *score* is ``100 x mean metric(circuit) / mean
metric(full model)``, for whatever metric the caller passes (e.g. a logit difference at
the last position).

- :func:`score_circuit` / :func:`score_circuits`: one circuit, or many stacked in few passes;
- :func:`prune_nodes`: iterative node pruning, its sequential decisions in few batched passes;
- :func:`prune_edges`: each edge of a circuit removed alone by path patching
  (:mod:`mechbook.core.path_patching`);
- :func:`random_circuits`: the control, random circuits of a given size.

Both prunings record, with their results, what it takes to re-check each decision
alone (:mod:`mechbook.core.pruning_checks`); node pruning can checkpoint as it goes and
resume after a crash.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core.checks import PARAMETERS, check
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import edit_hooks, mean_ablation
from mechbook.core.loading import LoadedModel
from mechbook.core.names import Component, act_name, all_heads, all_mlps, as_index, layer_names
from mechbook.core.patching import Metric, check_means, mean_activations
from mechbook.core.path_patching import (
    QKV,
    circuit_edges,
    patch_paths,
    patch_paths_to_logits,
)
from mechbook.core.runs import (
    TokenBatch,
    check_count,
    embeddings,
    run_from_layer,
    run_joining,
    run_last,
    run_variants,
    runner,
)

# Float noise, relative: how far two runs of the same computation on different CPUs, thread counts or batch
# stackings may drift apart. The models run in float32 (eps 1.2e-7); summing hundreds to thousands of terms in
# another order moves a result by about 1e-6 relative, and differences of nearby values (a logit difference, a
# score with one component fewer) magnify that by up to about 100. The project's one figure for it, the same as
# the notebooks' output check (mechbook.book.nbval_tolerance.RTOL).
FLOAT_NOISE = 1e-4

RESID = "resid_post"  # the receiver of a sender's direct path to the logits: the final residual stream
INPUTS = (*QKV, "resid")  # what an edge enters: a head's q, k or v, or the final residual stream


# --- circuits ------------------------------------------------------------------------------------


@dataclass
class Circuit:
    """Heads ``(layer, head)`` and MLP layers kept un-ablated; everything else is mean-ablated.

    ``score`` is the circuit's score in percent of the full model (if known) and
    ``log`` the decision log of the pruning run that found it. Saved as JSON:
    ``{"heads": [[l, h], ...], "mlps": [...]}``.
    """

    heads: list[tuple[int, int]]
    mlps: list[int]
    score: float | None = field(default=None, compare=False)
    log: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Heads and MLPs as sorted, de-duplicated, non-negative ints (numpy integers too).

        Floats are refused (``1.7`` would silently become head 1), and so are negative
        indices: a circuit's layer ``-1`` would never match the complement's layer
        ``n_layers - 1``, so the circuit's own component would be ablated.
        """
        example = "e.g. Circuit(heads=[(0, 1), (4, 4)], mlps=[0, 1])"
        try:
            heads = [(as_index(l, "a circuit's head layer"), as_index(h, "a circuit's head index"))
                     for l, h in self.heads]
            mlps = [as_index(m, "a circuit's MLP layer") for m in self.mlps]
        except MechbookError as exc:
            raise MechbookError(f"{exc}; a circuit takes heads as (layer, head) pairs of integers and mlps as layer "
                                f"numbers, {example}") from None
        except (TypeError, ValueError):
            raise MechbookError(
                f"a circuit takes heads as (layer, head) pairs and mlps as layer numbers, {example}; "
                f"got heads={self.heads!r}, mlps={self.mlps!r}"
            ) from None
        negative = [f"head {l}.{h}" for l, h in heads if l < 0 or h < 0] + [f"MLP {m}" for m in mlps if m < 0]
        if negative:
            raise MechbookError(f"a circuit's layers and heads count from 0, but it has {negative[0]}; use "
                                "non-negative indices (layer n_layers - 1 for the last one)")
        self.heads = sorted(set(heads))
        self.mlps = sorted(set(mlps))

    @classmethod
    def full(cls, model: LoadedModel) -> "Circuit":
        """Every head and MLP of the model (score 100 by definition)."""
        return cls([(l, h) for l in range(model.n_layers) for h in range(model.n_heads)], list(range(model.n_layers)),
                   score=100.0)

    @classmethod
    def from_components(cls, components: Iterable[Component], **kwargs) -> "Circuit":
        comps = list(components)
        return cls([(c.layer, c.head) for c in comps if c.kind == "head"],
                   [c.layer for c in comps if c.kind == "mlp"], **kwargs)

    @property
    def components(self) -> list[Component]:
        return [Component("head", l, h) for l, h in self.heads] + [Component("mlp", l) for l in self.mlps]

    def __contains__(self, component: Component) -> bool:
        if component.kind == "head":
            return (component.layer, component.head) in set(self.heads)
        return component.kind == "mlp" and component.layer in set(self.mlps)

    def __len__(self) -> int:
        return len(self.heads) + len(self.mlps)

    def validate(self, model: LoadedModel) -> "Circuit":
        """Raise if a head or MLP does not exist in ``model`` (e.g. a GPT-2 circuit on Gemma)."""
        for c in self.components:
            try:
                if c.layer >= model.n_layers:
                    raise MechbookError(f"{'head ' if c.kind == 'head' else ''}{c.label} lies past its "
                                        f"{model.n_layers} layers (0..{model.n_layers - 1})")
                c.validate(model)
            except MechbookError as exc:
                raise MechbookError(f"this circuit does not fit {model.name}: {exc}") from exc
        return self

    def complement(self, model: LoadedModel) -> list[Component]:
        """The heads and MLPs of ``model`` outside the circuit: what gets mean-ablated."""
        self.validate(model)
        return [c for c in all_heads(model) + all_mlps(model) if c not in self]

    def to_dict(self) -> dict[str, list]:
        return {"heads": [[l, h] for l, h in self.heads], "mlps": list(self.mlps)}

    def save(self, path: str | Path) -> Path:
        """Write ``{"heads": [[l, h], ...], "mlps": [...]}`` (score and log are not kept)."""
        path = Path(path)
        try:
            path.write_text(json.dumps(self.to_dict(), indent=4) + "\n")
        except OSError as exc:
            raise MechbookError(f"could not write the circuit to {path} ({exc.strerror or exc}); pass a path in a "
                                "folder that exists and can be written") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        """Read a circuit file ``{"heads": [[l, h], ...], "mlps": [...]}``, as :meth:`save` writes it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls([tuple(h) for h in data["heads"]], data["mlps"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MechbookError(
                f"could not read a circuit from {path} ({type(exc).__name__}: {exc}); "
                'expected JSON like {"heads": [[0, 1], [4, 4]], "mlps": [0, 1]}'
            ) from exc

    def labels(self) -> list[str]:
        """Heads as ``layer.head`` (``4.4``), then ``MLP l``."""
        return [c.label for c in self.components]



def circuit_means(model: LoadedModel, corrupted: TokenBatch) -> dict[str, Tensor]:
    """Per-position means of every head output (``hook_z``) and MLP output over the corrupted prompts."""
    return mean_activations(model, corrupted, all_heads(model) + all_mlps(model))


def _check_threshold(threshold: float, what: str, example: str) -> float:
    """The pruning threshold as a float (numpy numbers too), checked against the shared table (:mod:`mechbook.core.checks`)."""
    allowed = PARAMETERS["threshold"]
    if not allowed.admits(threshold):
        raise MechbookError(f"{what} threshold {threshold!r} must be {allowed.describe()}; {example}")
    return float(threshold)


def check_circuit(circuit, what: str = "circuit") -> "Circuit":
    """``circuit`` if it is a :class:`Circuit`, else a one-line error naming ``what``."""
    if not isinstance(circuit, Circuit):
        raise MechbookError(f"{what} must be a Circuit, e.g. Circuit(heads=[(0, 1)], mlps=[0]), got "
                            f"{type(circuit).__name__}")
    return circuit


def _check_full(full: float) -> float:
    if isinstance(full, bool) or not isinstance(full, numbers.Real):
        raise MechbookError(f"full_metric must be the full model's mean metric (a number), got {full!r}; leave it "
                            "None to compute it (full_model_metric)")
    full = float(full)
    if not full > 0 or not math.isfinite(full):
        raise MechbookError(
            f"the full model's mean metric is {full:.4g}, not positive, so scores in percent of it mean nothing; "
            "check that the model solves these prompts (e.g. keep only solved prompts) and the answer tokens"
        )
    return full


def full_model_metric(model: LoadedModel, batch: TokenBatch, metric: Metric) -> float:
    """Mean metric of the unablated model: the denominator of every circuit score (must be positive)."""
    logits, _ = run_last(model, batch)
    return _check_full(float(metric(logits).mean()))


def run_circuit(
    model: LoadedModel, batch: TokenBatch, circuit: Circuit, means: Mapping[str, Tensor]
) -> Float[Tensor, "batch d_vocab"]:
    """Last-position logits with everything outside the circuit mean-ablated at every position."""
    ablated = check_circuit(circuit).complement(model)
    check_means(model, batch, means, ablated)
    logits, _ = run_last(model, batch, fwd_hooks=edit_hooks(mean_ablation(ablated, means)))
    return logits


def score_circuit(
    model: LoadedModel,
    batch: TokenBatch,
    circuit: Circuit,
    means: Mapping[str, Tensor],
    metric: Metric,
    *,
    full_metric: float | None = None,
) -> float:
    """A circuit's score: ``100 x mean metric(circuit) / mean metric(full model)``, in percent.

    Everything outside the circuit is mean-ablated at every position. Works for any
    circuit that fits the model, e.g. one found on another task or a random one
    (:func:`random_circuits`). Pass ``full_metric`` to skip the full-model run.
    """
    check_circuit(circuit)
    if full_metric is None:
        circuit.validate(model)
        full_metric = full_model_metric(model, batch, metric)
    else:
        full_metric = _check_full(full_metric)
    return 100.0 * float(metric(run_circuit(model, batch, circuit, means)).mean()) / full_metric


def circuit_metrics(
    model: LoadedModel,
    batch: TokenBatch,
    circuits: Sequence[Circuit],
    means: Mapping[str, Tensor],
    metric: Metric,
    *,
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> Float[Tensor, "n_circuits batch"]:
    """The metric of every prompt with everything outside each circuit mean-ablated, many circuits per pass.

    Each copy of the batch gets its own circuit's complement mean-ablated at every
    position. ``tokens`` restricts the unembedding to the ids the metric reads.
    """
    if isinstance(circuits, Circuit) or not isinstance(circuits, Iterable):
        raise MechbookError(f"circuits must be a list of Circuit, got {type(circuits).__name__}; wrap one in a list")
    circuits = [check_circuit(c, "each of circuits") for c in circuits]
    if not circuits:
        raise MechbookError("no circuits to score; pass a list of Circuit")
    complements = [c.complement(model) for c in circuits]
    check_means(model, batch, means, all_heads(model) + all_mlps(model))
    n = len(batch)

    def hooks_for(first: int, count: int):
        edits = []
        for v, comps in enumerate(complements[first : first + count]):
            edits += mean_ablation(comps, means, rows=slice(v * n, (v + 1) * n))
        return edit_hooks(edits)

    values = run_variants(model, batch, len(circuits), hooks_for, metric, resid=embeddings(model, batch),
                          max_rows=max_rows, tokens=tokens)
    return values.float().cpu()


def score_circuits(
    model: LoadedModel,
    batch: TokenBatch,
    circuits: Sequence[Circuit],
    means: Mapping[str, Tensor],
    metric: Metric,
    *,
    full_metric: float | None = None,
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> Float[Tensor, "n_circuits"]:
    """Scores (% of the full model) of several circuits on one batch, many circuits per forward pass.

    Same numbers as :func:`score_circuit` one by one (:func:`circuit_metrics`, averaged
    over prompts, over the full model's mean metric).
    """
    values = circuit_metrics(model, batch, circuits, means, metric, max_rows=max_rows, tokens=tokens)
    full = full_model_metric(model, batch, metric) if full_metric is None else _check_full(full_metric)
    return 100.0 * values.mean(1) / full


def random_circuits(model: LoadedModel, size_like: Circuit, n: int, seed: int = 0) -> list[Circuit]:
    """``n`` random circuits with as many heads and MLPs as ``size_like``, drawn uniformly (the control)."""
    n = check("n_random", n, argument="n")
    seed = check("seed", seed)
    check_circuit(size_like, "size_like")
    heads = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    if len(size_like.heads) > len(heads) or len(size_like.mlps) > model.n_layers:
        raise MechbookError(f"{model.name} has fewer heads or MLPs than the circuit to match")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pick = rng.choice(len(heads), size=len(size_like.heads), replace=False)
        mlps = rng.choice(model.n_layers, size=len(size_like.mlps), replace=False)
        out.append(Circuit([heads[i] for i in pick], mlps.tolist()))
    return out


def cross_task_scores(
    model: LoadedModel,
    circuits: Mapping[str, Circuit],
    tasks: Mapping[str, tuple[TokenBatch, Mapping[str, Tensor], Metric]],
) -> pd.DataFrame:
    """Score every circuit on every task: one row per circuit x task.

    ``tasks`` maps a task name to ``(clean batch, means over its corrupted set, metric)``.
    """
    if not isinstance(circuits, Mapping) or not circuits or not isinstance(tasks, Mapping) or not tasks:
        raise MechbookError("cross_task_scores needs circuits as a non-empty dict name -> Circuit and tasks as a "
                            "non-empty dict name -> (clean batch, means, metric)")
    for task, value in tasks.items():
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            raise MechbookError(f"task {task!r} must be (clean batch, means over its corrupted set, metric), got "
                                f"{type(value).__name__} of {len(value) if hasattr(value, '__len__') else '?'} items")
    for name, circuit in circuits.items():
        check_circuit(circuit, f"circuit {name!r}")
    rows = []
    for task, (batch, means, metric) in tasks.items():
        full = full_model_metric(model, batch, metric)
        for name, circuit in circuits.items():
            score = score_circuit(model, batch, circuit, means, metric, full_metric=full)
            rows.append({"circuit": name, "task": task, "score": score, "n_heads": len(circuit.heads),
                         "n_mlps": len(circuit.mlps)})
    return pd.DataFrame(rows)


# --- iterative node pruning ---------------------------------------------------------------------


class _CircuitRunner:
    """Scores ``circuit minus c`` for several candidates ``c`` at once, each from its own layer.

    Keeps the residual stream entering every layer under the *current* circuit;
    removing a component at layer L invalidates only the layers after L, which are
    recomputed (from L, not from the start) when a later candidate needs them. On the
    local backend each candidate's rows join the batched run at the candidate's own
    layer (:func:`~mechbook.core.runs.run_joining`), so no block runs for a row that
    nothing has changed yet; other backends run every candidate of a window from the
    window's earliest layer. A score already computed for the same circuit and
    candidate (a later pass meeting an unchanged circuit) is reused, not recomputed.
    """

    def __init__(self, model: LoadedModel, batch: TokenBatch, means: Mapping[str, Tensor], metric: Metric,
                 circuit: Circuit, max_rows: int, tokens: Tensor | None) -> None:
        self.model, self.batch, self.means, self.metric, self.tokens = model, batch, means, metric, tokens
        self.n = len(batch)
        self.max_variants = max(1, max_rows // self.n)
        names = layer_names("resid_pre", model.n_layers)
        ablated = circuit.complement(model)
        logits, cache = run_last(model, batch, names=names, fwd_hooks=edit_hooks(mean_ablation(ablated, means)))
        self.forwards = 1
        self.prompt_blocks = self.n * model.n_layers  # prompts x transformer blocks run: the work, however stacked
        self.reused = 0
        self.joining = runner(model).joins_rows
        self.known: dict[tuple[frozenset, str], float] = {}
        value = float(metric(logits).mean())
        # starting from the full model, this run is the full model: no separate denominator run
        self.full = _check_full(value) if not ablated else full_model_metric(model, batch, metric)
        if ablated:
            self.forwards += 1
            self.prompt_blocks += self.n * model.n_layers
        self.score = 100.0 * value / self.full
        self.resid = {l: cache[names[l]] for l in range(model.n_layers)}
        self.valid_upto = model.n_layers - 1  # resid[l] is current for every l <= valid_upto

    def removed(self, component: Component, score: float) -> None:
        self.valid_upto = min(self.valid_upto, component.layer)
        self.score = score

    def _refresh(self, circuit: Circuit) -> None:
        """Recompute the residual stream entering layers after ``valid_upto`` (a run from there to the end)."""
        start = self.valid_upto
        later = range(start + 1, self.model.n_layers)
        names = [act_name("resid_pre", l) for l in later]
        hooks = edit_hooks(mean_ablation(circuit.complement(self.model), self.means, first_layer=start))
        _, cache = run_from_layer(self.model, self.resid[start], start, self.batch.last_pos, names=names,
                                  fwd_hooks=hooks)
        self.forwards += 1
        self.prompt_blocks += self.n * (self.model.n_layers - start)
        for l, name in zip(later, names):
            self.resid[l] = cache[name]
        self.valid_upto = self.model.n_layers - 1

    def scores_without(self, circuit: Circuit, candidates: Sequence[Component]) -> list[float]:
        key = frozenset(circuit.labels())
        todo = [c for c in dict.fromkeys(candidates) if (key, c.label) not in self.known]
        self.reused += len(candidates) - len(todo)
        if todo:
            values = self._joined(circuit, todo) if self.joining else self._from_start(circuit, todo)
            self.known.update({(key, c.label): v for c, v in zip(todo, values)})
        return [self.known[(key, c.label)] for c in candidates]

    def _joined(self, circuit: Circuit, candidates: Sequence[Component]) -> list[float]:
        if max(c.layer for c in candidates) > self.valid_upto:
            self._refresh(circuit)
        order = sorted(range(len(candidates)), key=lambda i: candidates[i].layer)
        start = candidates[order[0]].layer
        n = self.n
        edits = mean_ablation(circuit.complement(self.model), self.means, first_layer=start)
        for v, i in enumerate(order):
            edits += mean_ablation([candidates[i]], self.means, rows=slice(v * n, (v + 1) * n))
        logits = run_joining(self.model, [(candidates[i].layer, self.resid[candidates[i].layer]) for i in order],
                             self.batch.last_pos, fwd_hooks=edit_hooks(edits), tokens=self.tokens)
        self.forwards += 1
        self.prompt_blocks += n * sum(self.model.n_layers - c.layer for c in candidates)
        values = (100.0 * self.metric(logits.reshape(len(order), n, -1)).mean(1) / self.full).tolist()
        out = [0.0] * len(candidates)
        for v, i in enumerate(order):
            out[i] = values[v]
        return out

    def _from_start(self, circuit: Circuit, candidates: Sequence[Component]) -> list[float]:
        start = min(c.layer for c in candidates)
        if start > self.valid_upto:
            self._refresh(circuit)
        common = mean_ablation(circuit.complement(self.model), self.means, first_layer=start)

        def hooks_for(first: int, count: int):
            own = [mean_ablation([c], self.means, rows=slice(v * self.n, (v + 1) * self.n))[0]
                   for v, c in enumerate(candidates[first : first + count])]
            return edit_hooks(common + own)

        values = run_variants(self.model, self.batch, len(candidates), hooks_for, self.metric, layer=start,
                              resid=self.resid[start], max_rows=self.max_variants * self.n, tokens=self.tokens)
        self.forwards += 1
        self.prompt_blocks += len(candidates) * self.n * (self.model.n_layers - start)
        return (100.0 * values.mean(1) / self.full).tolist()


def pass_order(circuit: Circuit, model: LoadedModel, direction: str) -> list[Component]:
    """The order a pruning pass visits the circuit's components: backward = layers last to first, MLP then
    heads 0..H-1; forward = layers first to last, heads 0..H-1 then MLP."""
    order = []
    layers = range(model.n_layers - 1, -1, -1) if direction == "backward" else range(model.n_layers)
    for l in layers:
        heads = [Component("head", l, h) for h in range(model.n_heads)]
        mlp = [Component("mlp", l)]
        order += mlp + heads if direction == "backward" else heads + mlp
    return [c for c in order if c in circuit]


def prune_nodes(
    model: LoadedModel,
    batch: TokenBatch,
    means: Mapping[str, Tensor],
    metric: Metric,
    *,
    threshold: float = 0.2,
    max_rounds: int | None = None,
    start: Circuit | None = None,
    max_rows: int = 64,
    tokens: Int[Tensor, "k"] | None = None,
    checkpoint: str | Path | None = None,
) -> Circuit:
    """Iterative node pruning: remove, one at a time, each head or MLP the circuit scores well without.

    Start from the full model (or ``start``). A *backward pass* visits layers from
    last to first (the MLP, then heads 0..H-1), a *forward pass* first to last (heads,
    then the MLP). Each component still in the circuit is tentatively mean-ablated on
    top of the current circuit and removed for good if ``100 - score_without < 100 x
    threshold``: the drop is counted in percentage points from the full model's 100,
    not from the current circuit's score. A round is a backward then a forward pass;
    rounds repeat until a pass changes nothing, or for ``max_rounds`` rounds.

    The decisions are sequential; only the forward passes are fewer. A window of the
    next candidates is scored in one batched run, each candidate's rows joining at its
    own layer from the cached residual stream of the current circuit (nothing before a
    component's layer changes when it is ablated). Scores up to and including the first
    removal are what the one-at-a-time loop computes; after it the rest of the window is
    scored again against the new circuit. The window doubles after a window without
    removals, up to ``max_rows // len(batch)`` candidates (64 rows keep a pass within the
    CPU's caches), and drops back to one after a removal; a score already computed for
    the same circuit and candidate is reused.

    ``tokens`` (the ids the metric reads) restricts the unembedding of the tentative
    runs. Returns the :class:`Circuit` with its score and a log of every decision;
    ``log.attrs`` holds the search's inputs (:func:`pruning_parameters`), the full
    model's metric and its cost (forward passes, prompt-blocks, scores reused): what
    :func:`mechbook.core.pruning_checks.check_node_decisions` needs to re-check any
    decision alone. ``checkpoint`` (a JSON file) is rewritten atomically after every
    decision; a run given an existing one replays it and goes on from its last
    decision (one written with other parameters is refused), its cost adding up that
    of every run that wrote it.
    """
    threshold = _check_threshold(threshold, "node", "e.g. threshold=0.2 (20 points of the full model's score)")
    max_rounds = check("max_rounds", max_rounds, none=True)  # None: until nothing changes
    check_count(max_rows, "max_rows")
    circuit = Circuit.full(model) if start is None else Circuit(list(check_circuit(start, "start").heads),
                                                                 list(start.mlps))
    circuit.validate(model)
    check_means(model, batch, means, all_heads(model) + all_mlps(model))
    params = pruning_parameters(model, batch, means, threshold=threshold, max_rounds=max_rounds, start=circuit,
                                max_rows=max_rows, tokens=tokens)
    saved = _Checkpoint.open(checkpoint, params) if checkpoint is not None else None
    runner = _CircuitRunner(model, batch, means, metric, circuit, max_rows, tokens)
    if saved is not None:
        saved.prime(runner, circuit)
    full = runner.full
    cutoff = 100.0 * threshold
    rows: list[dict] = []
    step = 0
    round_ = 0
    progress = tqdm(desc="node pruning", disable=None, leave=False)
    while max_rounds is None or round_ < max_rounds:
        round_ += 1
        changed = {}
        for direction in ("backward", "forward"):
            order = pass_order(circuit, model, direction)
            changed[direction] = False
            i, window = 0, 1
            while i < len(order):
                chunk = order[i : i + window]
                scores = runner.scores_without(circuit, chunk)
                progress.update(1)
                for j, (c, s) in enumerate(zip(chunk, scores)):
                    remove = (100.0 - s) < cutoff
                    if remove:
                        circuit = Circuit.from_components([x for x in circuit.components if x != c])
                        runner.removed(c, s)
                        changed[direction] = True
                    step += 1
                    rows.append({"round": round_, "pass": direction, "step": step, "component": c.label,
                                 "kind": c.kind, "layer": c.layer, "head": c.head, "score_without": s,
                                 "removed": remove, "circuit_size": len(circuit)})
                    if saved is not None:  # the rest of the window was scored against this circuit: kept too
                        rest = [] if remove else list(zip(chunk[j + 1 :], scores[j + 1 :]))
                        saved.record(rows, rest, runner)
                    if remove:
                        i += j + 1
                        window = 1
                        break
                else:
                    i += len(chunk)
                    window = min(2 * window, runner.max_variants)
            if not changed[direction]:
                break
        if not all(changed.values()):
            break
    progress.close()
    log = pd.DataFrame(rows, columns=["round", "pass", "step", "component", "kind", "layer", "head",
                                      "score_without", "removed", "circuit_size"])
    forwards, blocks = runner.forwards, runner.prompt_blocks
    if saved is not None:
        forwards, blocks = saved.finish(rows, runner)
    log.attrs.update({**params, "full_metric": full, "forward_passes": forwards, "prompt_blocks": blocks,
                      "scores_reused": runner.reused})
    return Circuit(circuit.heads, circuit.mlps, score=runner.score, log=log)


def digest(*tensors: Tensor) -> str:
    """A short sha256 of tensors' shapes and values: which prompts or means a search ran on."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())  # the raw bytes: bfloat16 has no numpy type
    return h.hexdigest()[:16]


def means_fingerprint(means: Mapping[str, Tensor]) -> list:
    """Which means a search ran on, robust to float noise: ``[name, sum, sum of magnitudes]`` per hook name.

    Means are activations averaged by a forward pass, so they differ in their last bits
    between CPUs and thread counts, and a digest of their bytes would too. Two
    fingerprints name the same means when :func:`same_means` says so.
    """
    return [[k, float(means[k].double().sum()), float(means[k].double().abs().sum())] for k in sorted(means)]


def same_means(a, b) -> bool:
    """Whether two :func:`means_fingerprint` values agree within float noise (1e-4 of each tensor's magnitude)."""
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        return False
    for (ka, sa, ma), (kb, sb, mb) in zip(a, b):
        scale = FLOAT_NOISE * max(abs(ma), abs(mb), 1e-12)
        if ka != kb or abs(sa - sb) > scale or abs(ma - mb) > scale:
            return False
    return True


def pruning_parameters(model: LoadedModel, batch: TokenBatch, means: Mapping[str, Tensor], *, threshold: float,
                       max_rounds: int | None, start: Circuit, max_rows: int, tokens: Tensor | None) -> dict:
    """What a node pruning's decisions depend on, as plain JSON values (the metric aside, which is code).

    A checkpoint is resumed, and a log re-checked, only under the same values.
    """
    return {"model": model.name, "threshold": float(threshold), "max_rounds": max_rounds, "start": start.to_dict(),
            "max_rows": int(max_rows), "tokens": None if tokens is None else [int(t) for t in tokens.tolist()],
            "prompts": digest(batch.input_ids, batch.lengths),
            "means": means_fingerprint(means)}


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``.

    A rename within a folder is atomic, so a process killed at any moment leaves either
    the old file or the new one, never half of one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Checkpoint:
    """A node pruning's decision log on disk, rewritten after every decision; what a resumed run replays.

    Besides the rows it keeps the scores of the current window that were computed but
    not yet decided on, so that a resumed run takes the same numbers instead of
    computing them again in another batch.
    """

    FORMAT = "mechbook node pruning checkpoint 1"

    def __init__(self, path: Path, params: dict, data: dict | None) -> None:
        self.path, self.params = path, params
        data = data or {}
        self.rows: list[dict] = data.get("rows", [])
        self.pending: list[list] = data.get("pending", [])
        self.full_metric: float | None = data.get("full_metric")
        self.earlier = (data.get("forward_passes", 0), data.get("prompt_blocks", 0))
        # wall time: that of the runs before this one (none in a checkpoint written before it was kept), and this one's
        self.earlier_seconds = float(data.get("seconds", 0.0))
        self.began = time.perf_counter()

    @classmethod
    def open(cls, path: str | Path, params: dict) -> "_Checkpoint":
        path = Path(path)
        if not path.exists():
            if not path.parent.is_dir():
                raise MechbookError(f"checkpoint folder {path.parent} does not exist; create it or pick another path")
            return cls(path, params, None)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != cls.FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            saved = data["params"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MechbookError(f"{path} is not a node pruning checkpoint ({type(exc).__name__}: {exc}); delete it "
                                "or pass another checkpoint path") from None
        differ = [k for k in sorted(set(params) | set(saved))
                  if not (same_means(saved.get(k), params.get(k)) if k == "means" else saved.get(k) == params.get(k))]
        if differ:
            shown = "; ".join(f"{k} {_short(saved.get(k))} there, {_short(params.get(k))} here" for k in differ)
            raise MechbookError(f"checkpoint {path} was written by a pruning with other parameters ({shown}); "
                                "pass the same ones to resume it, or delete it to start afresh")
        return cls(path, params, data)

    def prime(self, runner: _CircuitRunner, start: Circuit) -> None:
        """Give ``runner`` every score the checkpoint holds, keyed by the circuit it was computed against."""
        if self.full_metric is not None and abs(runner.full - self.full_metric) > FLOAT_NOISE * abs(self.full_metric):
            raise MechbookError(f"checkpoint {self.path} was written for a full-model metric of {self.full_metric!r}, "
                                f"this run's is {runner.full!r}: another metric or model; delete it to start afresh")
        alive = set(start.labels())
        for row in self.rows:
            runner.known[(frozenset(alive), row["component"])] = float(row["score_without"])
            if row["removed"]:
                alive.discard(row["component"])
        for label, score in self.pending:
            runner.known.setdefault((frozenset(alive), label), float(score))

    def record(self, rows: list[dict], rest: Sequence[tuple[Component, float]], runner: _CircuitRunner) -> None:
        """After a decision: check a replayed one against the file, or write the file with the new one."""
        step = len(rows)
        if step <= len(self.rows):
            if _plain_row(rows[-1]) != _plain_row(self.rows[step - 1]):
                raise MechbookError(f"checkpoint {self.path} does not replay at step {step} (it logs "
                                    f"{_plain_row(self.rows[step - 1])}, this run decides {_plain_row(rows[-1])}): "
                                    "it was altered or written by other code; delete it to start afresh")
            return
        self._write(rows, [[c.label, float(s)] for c, s in rest], runner, finished=False)

    def finish(self, rows: list[dict], runner: _CircuitRunner) -> tuple[int, int]:
        if len(rows) < len(self.rows):
            raise MechbookError(f"checkpoint {self.path} holds {len(self.rows)} decisions, this run ended after "
                                f"{len(rows)}: it was altered or written by other code; delete it to start afresh")
        self._write(rows, [], runner, finished=True)
        return self.earlier[0] + runner.forwards, self.earlier[1] + runner.prompt_blocks

    def seconds(self) -> float:
        """The search's wall time so far, over every run that worked on it."""
        return self.earlier_seconds + time.perf_counter() - self.began

    def _write(self, rows, pending, runner, *, finished: bool) -> None:
        data = {"format": self.FORMAT, "params": self.params, "full_metric": runner.full,
                "forward_passes": self.earlier[0] + runner.forwards,
                "prompt_blocks": self.earlier[1] + runner.prompt_blocks,
                "seconds": round(self.seconds(), 1), "finished": finished,
                "rows": [_plain_row(r) for r in rows], "pending": pending}
        write_atomically(self.path, json.dumps(data))


def _plain_row(row: Mapping) -> dict:
    """A log row as plain JSON values (numpy and pandas scalars to Python's)."""
    out = {}
    for k, v in row.items():
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            out[k] = None
        elif isinstance(v, (bool, np.bool_)):
            out[k] = bool(v)
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v)
        else:
            out[k] = v
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."




# --- edge pruning -------------------------------------------------------------------------------------


def _edge_frame(senders: Sequence[Component], receivers: Sequence[str], inputs: Sequence[str],
                receiver_layers: Sequence[int], receiver_heads: Sequence[int | None], scores: Sequence[float]):
    return pd.DataFrame({
        "edge": [f"{s.label} -> {r} ({x})" if x != "resid" else f"{s.label} -> {r}"
                 for s, r, x in zip(senders, receivers, inputs)],
        "sender": [s.label for s in senders],
        "receiver": list(receivers),
        "input": list(inputs),
        "sender_kind": [s.kind for s in senders],
        "sender_layer": [s.layer for s in senders],
        "sender_head": [s.head for s in senders],
        "receiver_layer": list(receiver_layers),
        "receiver_head": list(receiver_heads),
        "score": list(scores),
    })


def edge_cost(n_prompts: int, n_layers: int, receiver_layers: Sequence[int], n_resid: int, *, source: bool,
              max_rows: int, full_runs: int) -> tuple[int, int]:
    """Forward passes and prompt-blocks of an edge pruning or its check (:func:`prune_edges`).

    ``receiver_layers`` holds one entry per q/k/v edge: :func:`~mechbook.core.path_patching.patch_paths` runs its
    circuit once (and the source once) and each receiver layer's edges as stacked
    variants from that layer on; ``n_resid`` edges to the logits cost one run (and
    the source's) in all. ``full_runs`` full forwards come on top (the search: the
    full model and the circuit's score, one each; the check: both stacked in one pass).
    """
    runs = 1 + int(source)
    full = n_prompts * n_layers
    passes, blocks = full_runs, full_runs * full
    if receiver_layers:
        per_pass = max(1, max_rows // n_prompts)
        counts = pd.Series(list(receiver_layers)).value_counts()
        passes += runs + sum(math.ceil(c / per_pass) for c in counts)
        blocks += runs * full + sum(n_prompts * (n_layers - layer) for layer in receiver_layers)
    if n_resid:
        passes += runs
        blocks += runs * full
    return passes, blocks


def prune_edges(
    model: LoadedModel,
    batch: TokenBatch,
    circuit: Circuit,
    means: Mapping[str, Tensor],
    metric: Metric,
    *,
    threshold: float = 0.8,
    source: TokenBatch | None = None,
    inputs: Sequence[str] = QKV,
    mlp_senders: bool = False,
    to_logits: bool = True,
    max_rows: int = 256,
    tokens: Int[Tensor, "k"] | None = None,
) -> pd.DataFrame:
    """Edge pruning inside a node circuit: each edge removed alone by path patching, kept if it matters.

    In the circuit model (everything outside ``circuit`` mean-ablated), each edge is
    removed alone by path patching: sender -> receiver head (q, k or v,
    :func:`~mechbook.core.path_patching.patch_paths`) and, with ``to_logits``, sender ->
    final residual stream (``resid_post``, :func:`~mechbook.core.path_patching.patch_paths_to_logits`).
    The sender's value comes from ``source`` (paired row by row) or, without a
    source, is its mean. Senders are the circuit's heads (and MLPs with
    ``mlp_senders``). An edge is kept if removing it leaves less than ``threshold`` of
    the *full model's* metric (``score < 100 x threshold``), each edge judged on its
    own. One row per edge;
    ``attrs`` holds what the pruning ran on (model, threshold, circuit, inputs,
    mlp_senders, to_logits, whether a source was given, digests of the prompts and
    means), the full model's metric, the circuit's own score and the cost (forward
    passes and prompt-blocks, :func:`edge_cost`): what
    :func:`mechbook.core.pruning_checks.check_edge_decisions` needs to re-check any edge.
    """
    threshold = _check_threshold(threshold, "edge", "e.g. threshold=0.8 (80% of the full model)")
    check_circuit(circuit).validate(model)
    check_count(max_rows, "max_rows")
    if not circuit.heads:
        raise MechbookError("the circuit has no heads, so no edges; check the node circuit")
    check_means(model, batch, means, all_heads(model) + all_mlps(model))
    ablated = circuit.complement(model)
    full = full_model_metric(model, batch, metric)
    frames = []
    receiver_layers, n_resid = [], 0
    qkv = circuit_edges(circuit.heads, circuit.mlps, inputs=inputs, mlp_senders=mlp_senders)
    if qkv:
        values = patch_paths(model, batch, qkv, metric, source=source, means=means, ablate=ablated,
                             max_rows=max_rows, tokens=tokens)
        receiver_layers = [e.receiver.layer for e in qkv]
        frames.append(_edge_frame([e.sender for e in qkv], [e.receiver.label for e in qkv], [e.input for e in qkv],
                                  [e.receiver.layer for e in qkv], [e.receiver.head for e in qkv],
                                  (100.0 * values.mean(1) / full).tolist()))
    if to_logits:
        senders = [Component("head", l, h) for l, h in circuit.heads]
        senders += [Component("mlp", l) for l in circuit.mlps] if mlp_senders else []
        values = patch_paths_to_logits(model, batch, senders, metric, source=source, means=means, ablate=ablated,
                                       tokens=tokens)
        n_resid = len(senders)
        frames.append(_edge_frame(senders, [RESID] * len(senders), ["resid"] * len(senders),
                                  [model.n_layers] * len(senders), [None] * len(senders),
                                  (100.0 * values.mean(1) / full).tolist()))
    if not frames:
        raise MechbookError("the circuit's heads all sit in one layer and to_logits=False: no edges to test")
    edges = pd.concat(frames, ignore_index=True)
    edges["receiver_head"] = edges["receiver_head"].astype("Int64")
    edges["sender_head"] = edges["sender_head"].astype("Int64")
    edges["kept"] = edges["score"] < 100.0 * threshold
    passes, blocks = edge_cost(len(batch), model.n_layers, receiver_layers, n_resid, source=source is not None,
                               max_rows=max_rows, full_runs=2)
    edges.attrs.update({
        "model": model.name, "threshold": threshold, "circuit": circuit.to_dict(), "inputs": list(inputs),
        "mlp_senders": bool(mlp_senders), "to_logits": bool(to_logits), "source": source is not None,
        "max_rows": int(max_rows), "prompts": digest(batch.input_ids, batch.lengths),
        "means": means_fingerprint(means), "full_metric": full,
        "circuit_score": score_circuit(model, batch, circuit, means, metric, full_metric=full),
        "forward_passes": passes, "prompt_blocks": blocks})
    return edges
