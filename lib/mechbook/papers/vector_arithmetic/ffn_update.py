"""The FFN update o of Paper A: find it, read it, remove it, transplant it.

Merullo, Eickhoff & Pavlick 2024 (arXiv 2305.16130). At the *function-application*
layer one feed-forward block (MLP) writes a vector o into the residual stream at the
last position that turns the argument (" Poland") into the answer (" Warsaw"), §3;
o is close to the same vector for every item of a task, so putting it into a prompt
with no task context ("table mug free China table mug free China table mug free")
promotes " Beijing" (§4.1, "o vector interventions").

Places are transformer-lens hook names. An MLP's output is ``blocks.L.hook_mlp_out``:
exactly what the block adds to the residual stream (for Gemma, after its post-FFN
norm). The residual stream after block L is ``blocks.L.hook_resid_post``; without
its MLP's write it is ``resid_post - mlp_out`` (the paper's demo subtracts mlp_19
from hidden_states[19] the same way).

- :func:`find_function_layer`: per prompt, the MLP that raises the answer's
  reciprocal rank in the logit lens the most; per task, the median of those layers.
- :func:`subtract_o`, :func:`o_cosine_table`, :func:`top_tokens_table`: remove o, compare
  it across prompts, read it as tokens.
- :func:`transplant_o` / :func:`run_transplants`: add o after its layer, or replace every
  MLP output from that layer on with o (the paper's intervention), in no-context prompts.
- :func:`save_o_vector` / :func:`load_o_vector`: o as safetensors with its provenance.

Edits act at each prompt's last position unless said otherwise, as small hook
functions run through :func:`mechbook.core.runs.run_last` in batches; where only later
layers change, :func:`mechbook.core.circuits.run_from_layer` re-runs just those.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core import decoding
from mechbook.core.errors import MechbookError
from mechbook.core.runs import HookFn, TokenBatch, run_last, run_last_batched, tokenize
from mechbook.core.loading import LoadedModel
from mechbook.papers.vector_arithmetic.prompts import PromptSet

METHODS = ("add", "replace")
POSITIONS = ("last", "all")
VECTOR_FORMAT = 1
O_VECTOR_CHAPTER = "a4_ffn_update"  # the chapter that saves the o vectors among its results


# --- capturing what every MLP writes ----------------------------------------------------


def mlp_out_names(model: LoadedModel) -> list[str]:
    return [f"blocks.{layer}.hook_mlp_out" for layer in range(model.n_layers)]


@dataclass
class FFNRun:
    """Last-position activations of a batch of prompts: each block's MLP output and the residual after it.

    ``resid_positions`` optionally keeps the residual after every block at every
    position (right-padded), so an edit at layer L can re-run only the later layers.
    """

    logits: Float[Tensor, "batch d_vocab"]
    resid_post: Float[Tensor, "batch layer d_model"]
    mlp_out: Float[Tensor, "batch layer d_model"]
    resid_positions: Float[Tensor, "batch layer pos d_model"] | None = None

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def resid_mid(self) -> Float[Tensor, "batch layer d_model"]:
        """The residual stream after each block minus its MLP's write: the state the MLP acted on."""
        return self.resid_post - self.mlp_out

    def o(self, layer: int) -> Float[Tensor, "batch d_model"]:
        """Every prompt's FFN update o at ``layer``."""
        return self.mlp_out[:, layer]

    def select(self, rows: Sequence[int] | np.ndarray) -> "FFNRun":
        """The same run restricted to some prompts (indices)."""
        index = torch.as_tensor(np.array(rows, dtype=np.int64), dtype=torch.long)
        full = None if self.resid_positions is None else self.resid_positions[index]
        return FFNRun(self.logits[index], self.resid_post[index], self.mlp_out[index], full)


def capture_mlp_outputs(
    model: LoadedModel, batch: TokenBatch, *, keep_positions: bool = False, batch_size: int = 32, desc: str | None = None
) -> FFNRun:
    """One pass over the prompts caching, at the last position, every ``hook_mlp_out`` and ``hook_resid_post``.

    ``keep_positions`` also keeps every ``hook_resid_post`` at all positions
    (``n_layers x batch x pos x d_model`` floats).
    """
    mlp_names = mlp_out_names(model)
    resid_names = decoding.resid_post_names(model)
    logits, last, full = [], [], []
    for start in tqdm(range(0, len(batch), batch_size), desc=desc, disable=None, leave=False):
        chunk = batch.select(slice(start, start + batch_size))
        lg, cache = run_last(model, chunk, names=[*mlp_names, *resid_names], last_only=not keep_positions)
        if keep_positions:
            rows = torch.arange(len(chunk), device=chunk.last_pos.device)
            full.append(decoding.stack_layers(cache, resid_names))
            cache = {name: act[rows, chunk.last_pos] for name, act in cache.items()}
        logits.append(lg)
        last.append(cache)
    stacked = {name: torch.cat([c[name] for c in last]) for name in [*mlp_names, *resid_names]}
    positions = None
    if keep_positions:
        width = max(part.shape[2] for part in full)
        positions = torch.cat([torch.nn.functional.pad(part, (0, 0, 0, width - part.shape[2])) for part in full])
    return FFNRun(torch.cat(logits), decoding.stack_layers(stacked, resid_names),
                  decoding.stack_layers(stacked, mlp_names), positions)


# --- the function-application layer ----------------------------------------------------------


def lens_target_logits(
    model: LoadedModel, resid: Float[Tensor, "... d_model"], token_ids: Int[Tensor, "..."]
) -> Float[Tensor, "..."]:
    """The logit-lens logit of one token per residual vector, without the full vocabulary.

    Equal to ``decoding.unembed(model, resid).gather(-1, ids)``: final norm, the
    token's unembedding row (and bias), then the softcap if the model has one.
    """
    head = model.hf_model.get_output_embeddings()
    ids = token_ids.to(resid.device)
    with torch.inference_mode():
        x = decoding.final_norm(model, resid)
        logits = (x * head.weight[ids]).sum(-1)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids]
        cap = model.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits


def _ids(values: Sequence[int] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.long)


def _lens_ranks(
    model: LoadedModel, resid: Float[Tensor, "n d_model"], targets: Sequence[Tensor], *, chunk: int = 128
) -> list[Int[Tensor, "n"]]:
    """Logit-lens rank of several target tokens per residual vector, the vocabulary unembedded in chunks."""
    out: list[list[Tensor]] = [[] for _ in targets]
    for start in range(0, len(resid), chunk):
        logits = decoding.unembed(model, resid[start : start + chunk])
        for k, ids in enumerate(targets):
            out[k].append(decoding.token_ranks(logits, ids[start : start + chunk].to(logits.device)).cpu())
    return [torch.cat(parts) for parts in out]


def mlp_effects(
    model: LoadedModel, run: FFNRun, answer_ids: Sequence[int] | Tensor, argument_ids: Sequence[int] | Tensor
) -> pd.DataFrame:
    """What each MLP's output does to the answer and the argument in the logit lens, per prompt and layer.

    Compares the residual after block L with the same residual minus MLP L's output
    (``before``/``after``): the answer's and the argument's reciprocal rank, and the
    margin (answer logit minus argument logit). ``rr_jump`` is the rise of the
    answer's reciprocal rank. One row per prompt x layer.
    """
    answer, argument = _ids(answer_ids), _ids(argument_ids)
    n, n_layers = run.resid_post.shape[:2]
    if len(answer) != n or len(argument) != n:
        raise MechbookError(f"{n} prompts but {len(answer)} answer and {len(argument)} argument ids; pass one of each per prompt")
    ans = answer[:, None].expand(n, n_layers).reshape(-1)
    arg = argument[:, None].expand(n, n_layers).reshape(-1)
    columns: dict[str, np.ndarray] = {
        "prompt": np.repeat(np.arange(n), n_layers),
        "layer": np.tile(np.arange(n_layers), n),
    }
    for when, resid in (("before", run.resid_mid), ("after", run.resid_post)):
        flat = resid.reshape(n * n_layers, -1)
        margin = lens_target_logits(model, flat, ans) - lens_target_logits(model, flat, arg)
        ans_rank, arg_rank = _lens_ranks(model, flat, [ans, arg])
        columns[f"answer_rr_{when}"] = (1.0 / ans_rank.double()).numpy()
        columns[f"argument_rr_{when}"] = (1.0 / arg_rank.double()).numpy()
        columns[f"margin_{when}"] = margin.cpu().numpy()
    frame = pd.DataFrame(columns)
    frame["rr_jump"] = frame.answer_rr_after - frame.answer_rr_before
    frame["margin_gain"] = frame.margin_after - frame.margin_before
    return frame


def function_application_layers(effects: pd.DataFrame) -> pd.DataFrame:
    """Per prompt, the layer whose MLP output raises the answer's reciprocal rank most (§3).

    The paper's function-application stage is where one FFN update turns the top
    token of the logit lens from the argument into the answer (" Poland" ->
    " Warsaw", layer 19 of 24 in GPT-2 medium; its demo checks it by subtracting
    that FFN's output). Per prompt we take the layer with the largest ``rr_jump``
    in :func:`mlp_effects` (ties: the earliest) and record whether a clean flip is
    seen there: argument top-1 without that MLP's output, answer top-1 with it.
    """
    best = effects.loc[effects.groupby("prompt")["rr_jump"].idxmax()].reset_index(drop=True)
    best["argument_top1_before"] = best.argument_rr_before == 1.0
    best["answer_top1_after"] = best.answer_rr_after == 1.0
    best["flip"] = best.argument_top1_before & best.answer_top1_after
    return best[["prompt", "layer", "rr_jump", "margin_gain", "answer_rr_before", "answer_rr_after",
                 "argument_top1_before", "answer_top1_after", "flip"]]


def lower_median(values: Sequence[int] | np.ndarray) -> int:
    """The median of integers, taking the lower middle value for an even count: always an observed layer."""
    values = np.sort(np.asarray(values))
    if len(values) == 0:
        raise MechbookError("no values to take the median of; the prompt set is empty")
    return int(values[(len(values) - 1) // 2])


@dataclass
class TaskFFN:
    """One task's prompts run through the model, every MLP's effect and the function-application layer.

    MLP effects are measured on the prompts the model answers correctly (on all
    prompts if it answers none; ``basis`` says which): the paper reads the stages
    of the computation where the computation works. ``layers`` has one row per
    analysed prompt; ``layer`` is the task's function-application layer, the
    lower median of theirs.
    """

    task: str
    prompts: PromptSet
    batch: TokenBatch
    run: FFNRun
    correct: np.ndarray  # [prompt] the model's top next token is the answer
    effects: pd.DataFrame
    layers: pd.DataFrame
    layer: int
    basis: str

    @property
    def analysed(self) -> np.ndarray:
        """Indices of the prompts whose MLP effects were measured."""
        return self.layers["prompt"].to_numpy().copy()

    def o(self, rows: np.ndarray | None = None) -> Float[Tensor, "batch d_model"]:
        """Each prompt's o at the task's layer (only the prompts selected by a boolean mask ``rows``)."""
        o = self.run.o(self.layer)
        return o if rows is None else o[torch.as_tensor(rows, dtype=torch.bool)]

    def mean_o(self, rows: np.ndarray | None = None) -> Float[Tensor, "d_model"]:
        """The task's o: the mean MLP output at its function-application layer (over ``rows`` if given)."""
        return self.o(rows).mean(0)

    def example(self) -> int:
        """An illustrative prompt: the first analysed one with a clean flip at the task's layer, else the first analysed."""
        rows = self.layers
        mask = rows.flip & (rows.layer == self.layer)
        return int(rows.prompt[mask].iloc[0] if mask.any() else rows.prompt.iloc[0])

    def select(self, groups: Sequence[str] | None = None, *, n: int | None = None, seed: int = 0) -> np.ndarray:
        """A boolean mask over the prompts: those of ``groups`` (all if None), at most ``n`` of them drawn with ``seed``."""
        if groups is None:
            mask = np.ones(len(self.prompts), dtype=bool)
        else:
            unknown = set(groups) - set(self.prompts.groups)
            if unknown:
                raise MechbookError(
                    f"task {self.task!r} has no group {sorted(unknown)}; its groups: {sorted(set(self.prompts.groups))}"
                )
            mask = np.isin(self.prompts.groups, list(groups))
        if n is not None and mask.sum() > n:
            chosen = np.random.default_rng(seed).choice(np.flatnonzero(mask), size=n, replace=False)
            mask = np.zeros_like(mask)
            mask[chosen] = True
        return mask


def find_function_layer(model: LoadedModel, prompts: PromptSet, *, batch_size: int = 32) -> TaskFFN:
    """Run a task's prompts, measure every MLP's effect and find the task's function-application layer."""
    batch = tokenize(model, prompts.token_ids)
    run = capture_mlp_outputs(model, batch, keep_positions=True, batch_size=batch_size, desc=prompts.task)
    answer, argument = _ids(prompts.answer_ids), _ids(prompts.argument_ids)
    correct = (run.logits.argmax(-1).cpu() == answer).numpy()
    basis = "correct prompts" if correct.any() else "all prompts (none answered correctly)"
    rows = np.flatnonzero(correct) if correct.any() else np.arange(len(prompts))
    effects = mlp_effects(model, run.select(rows), answer[rows], argument[rows])
    effects["prompt"] = rows[effects["prompt"].to_numpy()]
    layers = function_application_layers(effects)
    layers.insert(0, "task", prompts.task)
    layers.insert(2, "item", [prompts.items[i] for i in layers.prompt])
    layers.insert(3, "group", [prompts.groups[i] for i in layers.prompt])
    layers.insert(4, "correct", correct[layers.prompt.to_numpy()])
    return TaskFFN(prompts.task, prompts, batch, run, correct, effects, layers, lower_median(layers["layer"]), basis)


def function_layer_summary(tasks: Sequence[TaskFFN], n_layers: int) -> pd.DataFrame:
    """Per task: the function-application layer (median over the analysed prompts), as a fraction of depth.

    ``fraction_of_depth`` is (layer + 1) / n_layers, the depth of the residual
    stream after that block (the paper's released GPT-2 medium o vectors come from
    layers 18 and 19 of 24: 0.79 and 0.83; its text says "about 2/3").
    """
    rows = []
    for t in tasks:
        rows.append(
            {
                "task": t.task,
                "median_layer": t.layer,
                "fraction_of_depth": (t.layer + 1) / n_layers,
                "layer_q25": float(t.layers["layer"].quantile(0.25)),
                "layer_q75": float(t.layers["layer"].quantile(0.75)),
                "share_at_median_layer": float((t.layers["layer"] == t.layer).mean()),
                "flip_rate": float(t.layers["flip"].mean()),
                "n": len(t.layers),
                "n_prompts": len(t.prompts),
                "accuracy": float(t.correct.mean()),
                "basis": t.basis,
            }
        )
    return pd.DataFrame(rows)


# --- hooks: small functions, one per kind of edit ---------------------------------------------


def _check_vector(model: LoadedModel, vector: Tensor, n: int | None = None) -> Tensor:
    if vector.dim() not in (1, 2):
        raise MechbookError(f"expected a [d_model] or [batch, d_model] vector, got shape {tuple(vector.shape)}")
    if vector.shape[-1] != model.d_model:
        raise MechbookError(
            f"the vector has width {vector.shape[-1]} but {model.name} has d_model={model.d_model}; "
            "use an o vector computed on this model (ffn.capture_mlp_outputs) or saved for it"
        )
    if vector.dim() == 2 and n is not None and vector.shape[0] != n:
        raise MechbookError(f"{vector.shape[0]} vectors for {n} prompts; pass one vector, or one per prompt")
    return vector


def _position_mask(batch: TokenBatch, positions: str, *, skip_bos: bool) -> Tensor:
    """[batch, pos] booleans: each prompt's last position, or every real position (BOS excepted if asked)."""
    if positions not in POSITIONS:
        raise MechbookError(f"unknown positions {positions!r}; use one of {list(POSITIONS)}")
    pos = torch.arange(batch.input_ids.shape[1], device=batch.lengths.device)
    if positions == "last":
        return pos[None, :] == batch.last_pos[:, None]
    mask = pos[None, :] < batch.lengths[:, None]
    if skip_bos:
        mask &= pos[None, :] > 0
    return mask


def add_vector_hook(
    model: LoadedModel, batch: TokenBatch, layer: int, vector: Float[Tensor, "d_model"] | Float[Tensor, "batch d_model"],
    *, scale: float = 1.0, positions: str = "last",
) -> tuple[str, HookFn]:
    """Add ``scale * vector`` to the residual stream after block ``layer`` (``blocks.L.hook_resid_post``).

    A negative ``scale`` subtracts it: ``scale=-1`` with a prompt's own o removes
    that MLP's update at the last position.
    """
    layer = model.check_layer(layer)
    vector = _check_vector(model, vector, len(batch))
    mask = _position_mask(batch, positions, skip_bos=model.prepend_bos)

    def hook(act: Tensor, hook: object) -> Tensor:
        delta = scale * vector.to(act.device, act.dtype)
        delta = delta[:, None, :] if delta.dim() == 2 else delta[None, None, :]
        return act + mask[:, : act.shape[1], None].to(act.dtype) * delta

    return f"blocks.{layer}.hook_resid_post", hook


def replace_mlp_outputs_hooks(
    model: LoadedModel, batch: TokenBatch, start_layer: int, vector: Float[Tensor, "d_model"] | Float[Tensor, "batch d_model"],
    *, positions: str = "all",
) -> list[tuple[str, HookFn]]:
    """Replace the output of every MLP from ``start_layer`` to the last with the constant ``vector``.

    The paper's o-vector intervention (§4.1; its demo swaps each FFN from layer 18 on
    for ``lambda x: o``, which broadcasts o to every position). ``positions="all"``
    does the same on every real token except a prepended BOS (its activations act as
    an attention sink in Gemma and Llama; GPT-2 prompts in the paper had none);
    ``"last"`` edits only the final position.
    """
    start_layer = model.check_layer(start_layer)
    vector = _check_vector(model, vector, len(batch))
    mask = _position_mask(batch, positions, skip_bos=model.prepend_bos)

    def hook(act: Tensor, hook: object) -> Tensor:
        value = vector.to(act.device, act.dtype)
        value = value[:, None, :] if value.dim() == 2 else value[None, None, :]
        m = mask[:, : act.shape[1], None]
        return torch.where(m, value.expand_as(act), act)

    return [(f"blocks.{layer}.hook_mlp_out", hook) for layer in range(start_layer, model.n_layers)]


HookMaker = Callable[[TokenBatch, slice], Sequence[tuple[str, HookFn]]]


def run_with_hooks(
    model: LoadedModel, batch: TokenBatch, make_hooks: HookMaker, *, batch_size: int = 32, desc: str | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """Last-position logits with hooks built per chunk of prompts (``make_hooks(chunk, rows)``)."""
    out = []
    for start in tqdm(range(0, len(batch), batch_size), desc=desc, disable=None, leave=False):
        rows = slice(start, start + batch_size)
        chunk = batch.select(rows)
        logits, _ = run_last(model, chunk, fwd_hooks=make_hooks(chunk, rows))
        out.append(logits)
    return torch.cat(out)


def _rows_of(vector: Tensor, rows: slice) -> Tensor:
    return vector[rows] if vector.dim() == 2 else vector


# --- subtracting o -----------------------------------------------------------------------


def subtract_o(
    model: LoadedModel,
    batch: TokenBatch,
    run: FFNRun,
    layer: int,
    o: Float[Tensor, "d_model"] | Float[Tensor, "batch d_model"],
    answer_ids: Sequence[int] | Tensor,
    argument_ids: Sequence[int] | Tensor,
    *,
    forward: bool = True,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Remove o from the residual stream after block ``layer``: does the argument come back on top?

    Read before and after the subtraction in the logit lens at ``layer`` (the
    paper's demo: " Warsaw" -> " Poland" at layer 19 of GPT-2 medium) and, with
    ``forward``, in the model's output with the later layers run on the edited
    residual (a hook on ``blocks.L.hook_resid_post``; from the kept residual with
    :func:`mechbook.core.circuits.run_from_layer` if ``run`` has ``resid_positions``).
    One row per prompt x readout.
    """
    layer = model.check_layer(layer)
    o = _check_vector(model, o, len(batch))
    answer, argument = _ids(answer_ids), _ids(argument_ids)
    readouts = [(
        f"logit lens at layer {layer}",
        decoding.unembed(model, run.resid_post[:, layer]).argmax(-1).cpu(),
        decoding.unembed(model, run.resid_post[:, layer] - o).argmax(-1).cpu(),
    )]
    if forward and run.resid_positions is not None:  # re-run only the blocks after ``layer``
        from mechbook.core.circuits import run_from_layer

        edited = []
        for start in range(0, len(batch), batch_size):
            rows = slice(start, start + batch_size)
            chunk = batch.select(rows)
            resid = run.resid_positions[rows, layer, : chunk.input_ids.shape[1]]
            _, remove = add_vector_hook(model, chunk, layer, _rows_of(o, rows), scale=-1.0)
            edited.append(run_from_layer(model, remove(resid, None), layer + 1, chunk.last_pos)[0])
        edited = torch.cat(edited)
    elif forward:
        edited = run_with_hooks(
            model, batch, lambda chunk, rows: [add_vector_hook(model, chunk, layer, _rows_of(o, rows), scale=-1.0)],
            batch_size=batch_size,
        )
    if forward:
        readouts.append(("model output", run.logits.argmax(-1).cpu(), edited.argmax(-1).cpu()))
    frames = []
    for readout, before, after in readouts:
        frames.append(
            pd.DataFrame(
                {
                    "prompt": range(len(batch)),
                    "readout": readout,
                    "top_before": [decoding.to_str(model, t) for t in before],
                    "top_after": [decoding.to_str(model, t) for t in after],
                    "argument_top1_before": (before == argument).numpy(),
                    "argument_top1_after": (after == argument).numpy(),
                    "answer_top1_before": (before == answer).numpy(),
                    "answer_top1_after": (after == answer).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def subtract_o_table(model: LoadedModel, task: TaskFFN, *, batch_size: int = 32) -> pd.DataFrame:
    """:func:`subtract_o` at the task's layer on its analysed prompts.

    Each prompt's own o is read in the lens and the model's output; the task's
    mean o (over all its prompts) in the lens only, a cheap test of how
    interchangeable o is.
    """
    rows = task.analysed
    batch, run = task.batch.select(torch.as_tensor(rows, dtype=torch.long)), task.run.select(rows)
    answer, argument = _ids(task.prompts.answer_ids)[rows], _ids(task.prompts.argument_ids)[rows]
    frames = []
    for label, o, forward in (("own o", run.o(task.layer), True), ("task mean o", task.mean_o(), False)):
        table = subtract_o(model, batch, run, task.layer, o, answer, argument, forward=forward, batch_size=batch_size)
        table["prompt"] = rows[table["prompt"].to_numpy()]
        table.insert(0, "o", label)
        table.insert(0, "task", task.task)
        table.insert(3, "item", [task.prompts.items[i] for i in table.prompt])
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def subtract_o_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Rates over prompts: argument / answer top-1 before and after removing o."""
    return (
        table.groupby(["task", "o", "readout"], sort=False)
        .agg(argument_top1_before=("argument_top1_before", "mean"), argument_top1_after=("argument_top1_after", "mean"),
             answer_top1_before=("answer_top1_before", "mean"), answer_top1_after=("answer_top1_after", "mean"),
             n=("prompt", "size"))
        .reset_index()
    )


# --- how constant is o -------------------------------------------------------------------------


def pairwise_cosines(a: Float[Tensor, "n d"], b: Float[Tensor, "m d"] | None = None) -> Float[Tensor, "pairs"]:
    """Cosine similarity of every pair: i < j within ``a``, or every (i, j) across ``a`` and ``b``."""
    a_n = torch.nn.functional.normalize(a.float(), dim=-1)
    if b is None:
        sims = a_n @ a_n.T
        i, j = torch.triu_indices(len(a), len(a), offset=1)
        return sims[i, j]
    b_n = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a_n @ b_n.T).reshape(-1)


def o_cosine_table(mlp_outs: Mapping[str, Float[Tensor, "batch layer d_model"]], *, center: bool = False) -> pd.DataFrame:
    """Cosine similarity of MLP outputs across prompts, per layer: within each task and across tasks.

    The paper's claim is that o is nearly constant within a task (§4); the baseline
    is the same measure at the other layers, and across tasks at the same layer.
    MLP outputs at the last position share a large component at every layer
    whatever the prompt; ``center`` subtracts, per layer, the mean over all
    prompts of all tasks first, leaving what is particular to a task or a prompt.
    One row per layer x comparison with the mean and quartiles over pairs.
    """
    rows = []
    tasks = list(mlp_outs)
    n_layers = next(iter(mlp_outs.values())).shape[1]
    if center:
        grand = torch.cat([v for v in mlp_outs.values()]).mean(0, keepdim=True)
        mlp_outs = {task: v - grand for task, v in mlp_outs.items()}

    def add(layer: int, label: str, comparison: str, sims: Tensor) -> None:
        q25, q50, q75 = torch.quantile(sims, torch.tensor([0.25, 0.5, 0.75])).tolist()
        rows.append({"layer": layer, "task": label, "comparison": comparison, "centered": center,
                     "mean_cosine": float(sims.mean()), "median_cosine": q50, "q25": q25, "q75": q75,
                     "n_pairs": len(sims)})

    for layer in range(n_layers):
        for task in tasks:
            if len(mlp_outs[task]) > 1:
                add(layer, task, "within task", pairwise_cosines(mlp_outs[task][:, layer]))
        for a, b in combinations(tasks, 2):
            add(layer, f"{a} vs {b}", "across tasks", pairwise_cosines(mlp_outs[a][:, layer], mlp_outs[b][:, layer]))
    return pd.DataFrame(rows)


def top_tokens_table(model: LoadedModel, vectors: Mapping[str, Float[Tensor, "d_model"]], k: int = 10) -> pd.DataFrame:
    """The top-k tokens of several vectors side by side, one column per vector (``decoding.top_tokens``)."""
    return pd.DataFrame(
        {label: decoding.top_tokens(model, v, k=k)["token"].map(repr).tolist() for label, v in vectors.items()},
        index=pd.RangeIndex(1, k + 1, name="rank"),
    )


# --- saving and loading o vectors ---------------------------------------------------------------------


@dataclass(frozen=True)
class OVector:
    """An FFN update saved for reuse: the vector and where it came from."""

    vector: Float[Tensor, "d_model"]
    model: str
    layer: int
    task: str
    hook: str
    source: str  # e.g. "mean over 60 prompts" or "prompt: Poland"
    items: tuple[str, ...]  # the arguments of the prompts o was built from

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[-1])


def o_vector_path(model_name: str, name: str, root: str | Path | None = None) -> Path:
    """Where the book keeps a model's o vectors: ``results/<model>/a4_ffn_update/o_vectors/<name>.safetensors``.

    Chapter a4 writes one per task (``capitals``, ...) and one from a single prompt
    (``capitals_one_prompt``) among its results, so its marker lists their hashes;
    chapter a5 reads them.
    """
    from mechbook.book.results import default_root, safe_name

    root = Path(root) if root else default_root()
    return root / safe_name(model_name) / O_VECTOR_CHAPTER / "o_vectors" / f"{name}.safetensors"


def save_o_vector(
    path: str | Path,
    vector: Float[Tensor, "d_model"],
    *,
    model: LoadedModel,
    layer: int,
    task: str,
    source: str,
    items: Sequence[str],
) -> Path:
    """Write o as safetensors; its metadata names the model, layer, hook, task, width and source items.

    Written under a temporary name and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    from mechbook.book.results import sort_safetensors_header

    layer = model.check_layer(layer)
    vector = _check_vector(model, vector.detach().reshape(-1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.name, "layer": str(layer), "task": task, "hook": f"blocks.{layer}.hook_mlp_out",
            "d_model": str(model.d_model), "source": source, "items": json.dumps(list(items)),
            "format": str(VECTOR_FORMAT)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"o": vector.float().cpu().contiguous()}, tmp, metadata=meta)
        sort_safetensors_header(tmp)  # same vector and metadata, same bytes: committed results stay put
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_o_vector(path: str | Path, model: LoadedModel | None = None, *, allow_other_model: bool = False) -> OVector:
    """Read a saved o; with ``model``, check that it fits (same width, a valid layer, same model).

    A vector among a chapter's published results is first checked against that chapter's marker.
    """
    from safetensors import safe_open

    from mechbook.book.results import checked_file

    path = Path(path)
    if not path.is_file():
        raise MechbookError(
            f"no saved o vector at {path}; run chapter a4_ffn_update for this model first "
            "(python -m mechbook run --model MODEL --chapters a4) or write one with ffn.save_o_vector"
        )
    checked_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            vector = fh.get_tensor("o")
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise MechbookError(f"{path} is not an o vector file written by save_o_vector ({exc}); recompute and save it") from exc
    missing = {"model", "layer", "task", "hook", "d_model", "source", "items"} - set(meta)
    if missing:
        raise MechbookError(f"{path} lacks metadata {sorted(missing)}; write it with mechbook.papers.vector_arithmetic.ffn_update.save_o_vector")
    found = OVector(vector, meta["model"], int(meta["layer"]), meta["task"], meta["hook"], meta["source"],
                    tuple(json.loads(meta["items"])))
    if model is not None:
        if found.d_model != model.d_model:
            raise MechbookError(
                f"the o vector in {path} has width {found.d_model} (saved for {found.model}) but {model.name} has "
                f"d_model={model.d_model}; load a vector saved for {model.name}, or recompute it on this model "
                "(chapter a4_ffn_update, or ffn.find_function_layer then ffn.save_o_vector)"
            )
        model.check_layer(found.layer)
        if found.model != model.name and not allow_other_model:
            raise MechbookError(
                f"the o vector in {path} was saved for {found.model}, not {model.name}; recompute it on {model.name} "
                "or pass allow_other_model=True if the two models share a residual basis"
            )
    return found


# --- transplanting o -----------------------------------------------------------------------------

def transplant_o(
    model: LoadedModel,
    batch: TokenBatch,
    o: Float[Tensor, "d_model"] | Float[Tensor, "batch d_model"],
    layer: int,
    *,
    method: str = "add",
    positions: str | None = None,
    scale: float = 1.0,
    batch_size: int = 32,
) -> Float[Tensor, "batch d_vocab"]:
    """Last-position logits with o put into the network at ``layer`` (§4.1).

    ``method="add"``: add ``scale * o`` to the residual stream after block ``layer``
    (last position by default). ``method="replace"``: the paper's intervention, the
    outputs of MLPs ``layer``..last replaced by the constant o (every position but
    BOS by default).
    """
    if method not in METHODS:
        raise MechbookError(f"unknown transplant method {method!r}; use one of {list(METHODS)}")
    o = _check_vector(model, o, len(batch))
    layer = model.check_layer(layer)
    if method == "add":
        where = positions or "last"

        def make(chunk: TokenBatch, rows: slice):
            return [add_vector_hook(model, chunk, layer, _rows_of(o, rows), scale=scale, positions=where)]
    else:
        where = positions or "all"

        def make(chunk: TokenBatch, rows: slice):
            return replace_mlp_outputs_hooks(model, chunk, layer, scale * _rows_of(o, rows), positions=where)

    return run_with_hooks(model, batch, make, batch_size=batch_size)


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


def transplant_ranks(
    model: LoadedModel,
    batch: TokenBatch,
    target_ids: Sequence[int] | Tensor,
    o: Float[Tensor, "d_model"] | Float[Tensor, "batch d_model"],
    layer: int,
    *,
    method: str = "add",
    positions: str | None = None,
    scale: float = 1.0,
    batch_size: int = 32,
) -> pd.DataFrame:
    """The target's rank in the model's output before and after a transplant, one row per prompt.

    ``improved`` is the paper's success criterion, the target moves up; a
    transplant with ``rank_after >= rank_before`` is a "no effect" failure (§4.1).
    """
    baseline, _ = run_last_batched(model, batch, batch_size=batch_size)
    after = transplant_o(model, batch, o, layer, method=method, positions=positions, scale=scale, batch_size=batch_size)
    return _rank_table(model, baseline, after, _ids(target_ids))


@dataclass(frozen=True)
class Transplant:
    """One way of putting o into a prompt (see :func:`transplant_o`); ``label`` names it in tables."""

    label: str
    o: Float[Tensor, "d_model"] | Float[Tensor, "batch d_model"]
    layer: int
    method: str = "add"
    positions: str | None = None
    scale: float = 1.0

    def start(self) -> tuple[str, int]:
        """The cached residual a run from a layer starts from, and that layer."""
        if self.method == "add":  # o joins the residual after block L: only blocks L+1.. run again
            return f"blocks.{self.layer}.hook_resid_post", self.layer + 1
        return f"blocks.{self.layer}.hook_resid_pre", self.layer


def transplant_logits(
    model: LoadedModel, batch: TokenBatch, transplants: Sequence[Transplant], *, batch_size: int = 32
) -> tuple[Float[Tensor, "batch d_vocab"], list[Float[Tensor, "batch d_vocab"]]]:
    """Logits of the unedited prompts and after each transplant, the same as :func:`transplant_o` but cheaper.

    One full forward per chunk caches the residual stream where each transplant
    starts; each transplant then re-runs only the layers from its own on
    (:func:`mechbook.core.circuits.run_from_layer`).
    """
    from mechbook.core.circuits import run_from_layer

    for t in transplants:
        if t.method not in METHODS:
            raise MechbookError(f"unknown transplant method {t.method!r}; use one of {list(METHODS)}")
        model.check_layer(t.layer)
        _check_vector(model, t.o, len(batch))
    names = sorted({t.start()[0] for t in transplants})
    baseline, after = [], [[] for _ in transplants]
    for start in tqdm(range(0, len(batch), batch_size), disable=None, leave=False):
        rows = slice(start, start + batch_size)
        chunk = batch.select(rows)
        logits, cache = run_last(model, chunk, names=names)
        baseline.append(logits)
        for k, t in enumerate(transplants):
            name, layer = t.start()
            o = _rows_of(t.o, rows)
            if t.method == "add":
                _, add = add_vector_hook(model, chunk, t.layer, o, scale=t.scale, positions=t.positions or "last")
                edited, _ = run_from_layer(model, add(cache[name], None), layer, chunk.last_pos)
            else:
                hooks = replace_mlp_outputs_hooks(model, chunk, t.layer, t.scale * o, positions=t.positions or "all")
                edited, _ = run_from_layer(model, cache[name], layer, chunk.last_pos, fwd_hooks=hooks)
            after[k].append(edited)
    return torch.cat(baseline), [torch.cat(parts) for parts in after]


def no_context_targets(
    model: LoadedModel, task: str, *, exclude: Sequence[str] = (), groups: Sequence[str] | None = None,
    n: int | None = None, seed: int = 0,
) -> PromptSet:
    """No-context prompts of a task (§4.1, "table mug free China ..."), leaving out the items o was built from.

    ``groups`` keeps only items of those groups (past tense: "regular" / "irregular").
    ``n`` draws at most that many (seeded); the target is each prompt's ``answer_ids``.
    """
    from mechbook.papers.vector_arithmetic.prompts import Pair, build_prompts

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


