"""The FFN update o of Paper A: find it, read it, remove it, keep it with its provenance (chapter a4).

Merullo, Eickhoff & Pavlick 2024 (arXiv 2305.16130). At the *function-application*
layer one feed-forward block (MLP) writes a vector o into the residual stream at the
last position that turns the argument (" Poland") into the answer (" Warsaw"), §3;
o is close to the same vector for every item of a task, which is what lets chapter a5
transplant it (:mod:`mechbook.papers.vector_arithmetic.transplant`).

An MLP's output is ``hook_mlp_out``: exactly what the block adds to the residual
stream (for Gemma, after its post-FFN norm). The residual stream after block L is
``hook_resid_post``; without its MLP's write it is ``resid_post - mlp_out`` (the
paper's demo subtracts mlp_19 from hidden_states[19] the same way).

- :func:`find_function_layer`: per prompt, the MLP that raises the answer's
  reciprocal rank in the logit lens the most; per task, the median of those layers.
- :func:`subtract_o`, :func:`o_cosine_table`, :func:`top_tokens_table`: remove o, compare
  it across prompts, read it as tokens.
- :class:`OVector`, :func:`o_vector`: o with its provenance, the record the book saves
  among chapter a4's results (``mechbook.book.o_vectors``) and chapter a5 loads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core import decoding
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import add_vector, check_vector, position_mask
from mechbook.core.loading import LoadedModel
from mechbook.core.names import act_name, layer_names
from mechbook.core.runs import (
    TokenBatch,
    chunk_starts,
    run_from_layer,
    run_last,
    tokenize,
)
from mechbook.papers.vector_arithmetic.prompts import PromptSet

VECTOR_FORMAT = 1  # the layout of OVector.metadata


# --- capturing what every MLP writes ----------------------------------------------------


def mlp_out_names(model: LoadedModel) -> list[str]:
    """``hook_mlp_out`` of every layer: what each MLP adds to the residual stream."""
    return layer_names("mlp_out", model.n_layers)


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
    for start in tqdm(chunk_starts(len(batch), batch_size), desc=desc, disable=None, leave=False):
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


def _ids(values: Sequence[int] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.long)


def _lens_ranks(
    model: LoadedModel, resid: Float[Tensor, "n d_model"], targets: Sequence[Tensor], *, chunk: int = 128
) -> list[Int[Tensor, "n"]]:
    """Logit-lens rank of several target tokens per residual vector, the vocabulary unembedded in chunks."""
    out: list[list[Tensor]] = [[] for _ in targets]
    for start in chunk_starts(len(resid), chunk, "chunk"):
        logits = decoding.unembed(model, resid[start : start + chunk])
        for k, ids in enumerate(targets):
            out[k].append(decoding.token_ranks(logits, ids[start : start + chunk].to(logits.device)).cpu())
    return [torch.cat(parts) for parts in out]


def mlp_effects(
    model: LoadedModel, run: FFNRun, answer_ids: Sequence[int] | Tensor, argument_ids: Sequence[int] | Tensor
) -> pd.DataFrame:
    """What each MLP's output does to the answer and the argument in the logit lens, per prompt and layer (§3).

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
        margin = decoding.token_logits(model, flat, ans) - decoding.token_logits(model, flat, arg)
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
    if values.dtype.kind not in "iu":
        raise MechbookError(f"lower_median takes whole numbers (layers), got {values.dtype} values; pass layer indices")
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
    if not tasks:
        raise MechbookError("no tasks to summarise; pass the find_function_layer result of at least one task "
                            "(a chapter's tasks list must name one, e.g. tasks=['capitals'])")
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
    """Remove o from the residual stream after block ``layer``: does the argument come back on top (§3)?

    Read before and after the subtraction in the logit lens at ``layer`` (the
    paper's demo: " Warsaw" -> " Poland" at layer 19 of GPT-2 medium) and, with
    ``forward``, in the model's output with the later layers run on the edited
    residual (:func:`mechbook.core.runs.run_from_layer` from the residual ``run``
    kept at every position). One row per prompt x readout.
    """
    layer = model.check_layer(layer)
    o = check_vector(model, o, len(batch), "o")
    answer, argument = _ids(answer_ids), _ids(argument_ids)
    readouts = [(
        f"logit lens at layer {layer}",
        decoding.unembed(model, run.resid_post[:, layer]).argmax(-1).cpu(),
        decoding.unembed(model, run.resid_post[:, layer] - o).argmax(-1).cpu(),
    )]
    if forward:
        if run.resid_positions is None:
            raise MechbookError("subtract_o(forward=True) needs the residual at every position: "
                                "capture_mlp_outputs(..., keep_positions=True)")
        edited = []
        for start in chunk_starts(len(batch), batch_size):
            rows = slice(start, start + batch_size)
            chunk = batch.select(rows)
            resid = run.resid_positions[rows, layer, : chunk.input_ids.shape[1]]
            removed = add_vector(resid, -1.0 * _rows_of(o, rows), position_mask(chunk, "last", skip_bos=False))
            edited.append(run_from_layer(model, removed, layer + 1, chunk.last_pos)[0])
        edited = torch.cat(edited)
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


def _rows_of(vector: Tensor, rows: slice) -> Tensor:
    return vector[rows] if vector.dim() == 2 else vector


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
    for x, name in ((a, "a"), (b, "b")):
        if name == "b" and x is None:
            continue
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
            raise MechbookError(f"pairwise_cosines takes {name} as float vectors [n, d], got "
                                f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if b is not None and a.shape[1] != b.shape[1]:
        raise MechbookError(f"pairwise_cosines compares vectors of one width, got {a.shape[1]} and {b.shape[1]}")
    if (len(a) < 2 if b is None else min(len(a), len(b)) < 1):
        raise MechbookError(f"pairwise_cosines has no pair to compare ({len(a)} vector(s)"
                            f"{'' if b is None else f' and {len(b)}'}); pass at least two vectors")
    a_n = torch.nn.functional.normalize(a.float(), dim=-1)
    if b is None:
        sims = a_n @ a_n.T
        i, j = torch.triu_indices(len(a), len(a), offset=1)
        return sims[i, j]
    b_n = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a_n @ b_n.T).reshape(-1)


def o_cosine_table(mlp_outs: Mapping[str, Float[Tensor, "batch layer d_model"]], *, center: bool = False) -> pd.DataFrame:
    """Cosine similarity of MLP outputs across prompts, per layer: within each task and across tasks (§4).

    The paper's claim is that o is nearly constant within a task (§4); the baseline
    is the same measure at the other layers, and across tasks at the same layer.
    MLP outputs at the last position share a large component at every layer
    whatever the prompt; ``center`` subtracts, per layer, the mean over all
    prompts of all tasks first, leaving what is particular to a task or a prompt.
    One row per layer x comparison with the mean and quartiles over pairs.
    """
    if not mlp_outs:
        raise MechbookError("no tasks' MLP outputs to compare; pass at least one, e.g. {'capitals': run.mlp_out}")
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
    if not isinstance(vectors, Mapping) or not vectors:
        raise MechbookError("top_tokens_table needs a non-empty dict of label -> vector, e.g. {'o': o_vector}")
    return pd.DataFrame(
        {label: decoding.top_tokens(model, v, k=k)["token"].map(repr).tolist() for label, v in vectors.items()},
        index=pd.RangeIndex(1, k + 1, name="rank"),
    )


# --- o as a record to save -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OVector:
    """An FFN update kept for reuse: the vector and where it came from (§4.1 transplants it, chapter a5).

    :meth:`metadata` is what a file keeps beside the vector; the book writes and reads
    the files (``mechbook.book.o_vectors``).
    """

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

    def metadata(self) -> dict[str, str]:
        """Model, layer, hook, task, width, source and items as strings (safetensors metadata)."""
        return {"model": self.model, "layer": str(self.layer), "task": self.task, "hook": self.hook,
                "d_model": str(self.d_model), "source": self.source, "items": json.dumps(list(self.items)),
                "format": str(VECTOR_FORMAT)}

    @classmethod
    def from_metadata(cls, vector: Float[Tensor, "d_model"], meta: Mapping[str, str], *, where: str) -> "OVector":
        """The record back from a vector and the :meth:`metadata` kept with it (``where``: the file, for errors)."""
        missing = {"model", "layer", "task", "hook", "d_model", "source", "items"} - set(meta)
        if missing:
            raise MechbookError(f"{where} lacks metadata {sorted(missing)}; write it with "
                                "mechbook.book.o_vectors.save_o_vector")
        return cls(vector, meta["model"], int(meta["layer"]), meta["task"], meta["hook"], meta["source"],
                   tuple(json.loads(meta["items"])))

    def check_fits(
        self, model: LoadedModel, *, allow_other_model: bool = False, where: str = "the o vector"
    ) -> "OVector":
        """The same record, refused unless it fits ``model``: same width, a valid layer, same model."""
        if self.d_model != model.d_model:
            raise MechbookError(
                f"{where} has width {self.d_model} (saved for {self.model}) but {model.name} has "
                f"d_model={model.d_model}; load a vector saved for {model.name}, or recompute it on this model "
                "(chapter a4_ffn_update, or ffn_update.find_function_layer then o_vectors.save_o_vector)"
            )
        model.check_layer(self.layer)
        if self.model != model.name and not allow_other_model:
            raise MechbookError(
                f"{where} was saved for {self.model}, not {model.name}; recompute it on {model.name} "
                "or pass allow_other_model=True if the two models share a residual basis"
            )
        return self


def o_vector(
    vector: Float[Tensor, "d_model"],
    *,
    model: LoadedModel,
    layer: int,
    task: str,
    source: str,
    items: Sequence[str],
) -> OVector:
    """o with its provenance, checked: one finite vector of the model's width, from a valid layer's ``hook_mlp_out``."""
    layer = model.check_layer(layer)
    vector = check_vector(model, vector.detach().reshape(-1), what="o")
    return OVector(vector.float().cpu().contiguous(), model.name, layer, task, act_name("mlp_out", layer), source,
                   tuple(items))
