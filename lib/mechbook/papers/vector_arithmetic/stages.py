"""The three stages of processing in the logit lens: argument formation, function application, saturation.

Merullo, Eickhoff & Pavlick 2024, section 3: decoded after every layer at the last
position, the residual stream of an in-context query ("...capital of Poland?\\nA:")
first shows the **argument** (" Poland") at the top, then one layer's update turns
the top token into the **answer** (" Warsaw"), which then **saturates** (stays on
top, more and more probable) to the end. In GPT-2 medium the argument is top-1 at
layers 14-18 and the answer from layer 19 of 24.

Everything here works on the tidy lens table of :func:`mechbook.core.decoding.logit_lens`
(or :func:`mechbook.papers.vector_arithmetic.icl.lens_table`): one row per prompt x layer x target, with
columns ``prompt, layer, target, rank, reciprocal_rank, prob`` and targets
``"argument"`` and ``"answer"``. Per prompt the stage layers are defined as:

* **function application**: the first layer at which the answer is the top-1 token
  (NaN if never). ``flip`` marks prompts where the argument was top-1 just one layer
  earlier, the paper's clean argument -> answer hand-over.
* **argument formation**: searched in the layers *before* function application (all
  layers if the answer never tops): the first layer at which the argument is the
  top-1 token; if it never is there, the layer where its reciprocal rank peaks
  (earliest of ties). ``argument_rule`` says which rule applied ("top-1", "peak", or
  "none" when function application is at layer 0 and nothing precedes it) and
  ``argument_best_rank`` the argument's rank at that layer. An argument that becomes
  top-1 only after the answer did is not an argument stage; ``argument_top1_after``
  flags it.
* **saturation**: the first layer from which the answer stays top-1 *and* its
  probability stays at or above a threshold through the last layer. The threshold is
  ``saturation_threshold`` times the answer's last-layer probability
  (``relative_to_final=True``, the default: "has reached half of its final
  probability", comparable across tasks and models of very different confidence),
  or the plain probability ``saturation_threshold`` (``relative_to_final=False``;
  NaN where the last layer falls short).

The stage analysis uses only prompts the model answers correctly (the lens of a
wrong answer has no answer stage to find): :func:`accuracy_by_group` and
:func:`error_kinds` describe the in-context accuracy that filters them, and
:func:`correct_lens` decodes the kept prompts.

Layers are 0-based block indices (the residual after block ``layer``); the fraction
of depth of a layer is ``(layer + 1) / n_layers``, as in :func:`mechbook.papers.vector_arithmetic.icl.lens_table`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechbook.core import decoding
from mechbook.core.checks import check
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.stats import wilson_interval
from mechbook.papers.vector_arithmetic import reported
from mechbook.papers.vector_arithmetic.prompts import PromptSet

STAGES = ("argument_formation", "function_application", "saturation")
STAGE_LABELS = {
    "argument_formation": "argument formation",
    "function_application": "function application",
    "saturation": "saturation",
}
STAGE_DETAILS = ("argument_rule", "argument_best_rank", "argument_top1_after", "flip")
DEFAULT_SATURATION_THRESHOLD = 0.5
LENS_COLUMNS = ("prompt", "layer", "target", "rank", "reciprocal_rank", "prob")

# GPT-2 medium (24 layers) in the paper, section 3: argument top-1 at layers 14-18, answer from layer 19.
PAPER_GPT2_MEDIUM = reported.GPT2_MEDIUM_STAGES


def fraction_of_depth(layer: float | pd.Series | np.ndarray, n_layers: int):
    """Where a layer sits in the network: ``(layer + 1) / n_layers`` (the last layer is 1.0)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise MechbookError(f"n_layers must be the model's number of layers (a whole number >= 1), got {n_layers!r}")
    return (layer + 1) / n_layers


def accuracy_by_group(accuracy: pd.DataFrame, prompts: PromptSet) -> pd.DataFrame:
    """In-context accuracy of one task per group and overall, beside the items the tokenizer check dropped.

    ``accuracy`` is :func:`mechbook.papers.vector_arithmetic.icl.accuracy_table` of ``prompts``. One row per
    group plus an "all" row (only "all" when the task has one group): ``task, group,
    n`` (prompts scored; ``dropped`` counts items, not drawn prompts, so with a sample
    ``n`` plus ``dropped`` is less than the word list), ``accuracy``, ``dropped`` (items dropped, mostly for
    multi-token answers), ``dropped_multi_token``, ``median_answer_rank``, the
    ``n_shots`` of the prompts and a 95% Wilson interval ``ci_low, ci_high``.
    """
    if len(accuracy) != len(prompts):
        raise MechbookError(
            f"the accuracy table has {len(accuracy)} rows for {len(prompts)} prompts; pass the table of this prompt set"
        )
    summary = prompts.summary().set_index("group")
    groups = sorted(set(prompts.groups))
    rows = []
    for group in ["all", *groups] if len(groups) > 1 else ["all"]:
        scored = accuracy if group == "all" else accuracy[accuracy["group"] == group]
        info = summary.loc[group] if group in summary.index else None
        rows.append(
            {
                "task": prompts.task,
                "group": group,
                "n_shots": prompts.n_shots,
                "n": len(scored),
                "accuracy": float(scored["correct"].mean()),
                "dropped": int(info["dropped"]) if info is not None else 0,
                "dropped_multi_token": int(info["dropped_answer_multi_token"] + info["dropped_argument_multi_token"])
                if info is not None
                else 0,
                "median_answer_rank": float(scored["answer_rank"].median()),
                **dict(zip(("ci_low", "ci_high"), wilson_interval(int(scored["correct"].sum()), len(scored)))),
            }
        )
    return pd.DataFrame(rows)


def error_kinds(accuracy: pd.DataFrame, prompts: PromptSet) -> pd.DataFrame:
    """What the model says when it is wrong: the argument again, another word of the prompt, or something else.

    One row per wrong prompt (``item, group, predicted, kind``). "argument" is the
    query's own word (" walk" for "Yesterday I"), "copied from the prompt" a word of
    the in-context example (" cried" from "Yesterday I cried."), "other" the rest.
    """
    wrong = accuracy.index[~accuracy["correct"].astype(bool)]
    rows = []
    for i in wrong:
        predicted = accuracy.at[i, "predicted"]
        word = predicted.strip()
        if predicted == prompts.argument_tokens[i]:
            kind = "argument"
        elif word and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompts.prompts[i]):
            kind = "copied from the prompt"
        else:
            kind = "other"
        rows.append({"item": prompts.items[i], "group": prompts.groups[i], "predicted": predicted, "kind": kind})
    return pd.DataFrame(rows, columns=["item", "group", "predicted", "kind"])


def correct_lens(
    model: LoadedModel,
    prompts: PromptSet,
    resid: Float[Tensor, "batch layer d_model"],
    correct: Sequence[bool],
) -> pd.DataFrame:
    """Logit lens of argument and answer for the prompts the model answers correctly.

    Like :func:`mechbook.papers.vector_arithmetic.icl.lens_table`, but decodes only the selected prompts (the
    unembedding is most of the cost); ``prompt`` keeps each prompt's index in the
    full prompt set, so the table joins back to the accuracy table.
    """
    keep = torch.as_tensor(list(correct), dtype=torch.bool)
    if keep.numel() != len(prompts) or resid.shape[0] != len(prompts):
        raise MechbookError(
            f"correct has {keep.numel()} entries and resid {resid.shape[0]} rows for {len(prompts)} prompts; "
            "pass the accuracy table's 'correct' column of the same prompt set"
        )
    index = torch.nonzero(keep).flatten()
    if len(index) == 0:
        raise MechbookError(f"the model answers none of the {len(prompts)} {prompts.task!r} prompts; nothing to decode")
    targets = {name: ids[index] for name, ids in prompts.target_ids().items()}
    lens = decoding.logit_lens(model, resid[index.to(resid.device)], targets)
    lens["prompt"] = index.numpy()[lens["prompt"].to_numpy()]
    lens["item"] = [prompts.items[i] for i in lens["prompt"]]
    lens["group"] = [prompts.groups[i] for i in lens["prompt"]]
    lens["depth"] = fraction_of_depth(lens["layer"], model.n_layers)
    return lens


def _check_lens(lens: pd.DataFrame, by: Sequence[str]) -> None:
    missing = [c for c in (*LENS_COLUMNS, *by) if c not in lens.columns]
    if missing:
        raise MechbookError(
            f"the lens table lacks columns {missing}; pass the output of mechbook.core.decoding.logit_lens "
            "or mechbook.papers.vector_arithmetic.icl.lens_table (and only grouping columns it has)"
        )
    targets = set(lens["target"].unique())
    if not {"argument", "answer"} <= targets:
        raise MechbookError(
            f"the lens table has targets {sorted(targets)}; stage detection needs both 'argument' and 'answer'"
        )


def _grid(lens: pd.DataFrame, keys: list[str], target: str, column: str) -> pd.DataFrame:
    """One row per prompt, one column per layer, of ``column`` for ``target``."""
    rows = lens[lens["target"] == target]
    if rows.duplicated([*keys, "layer"]).any():
        raise MechbookError(
            f"the lens table has several {target!r} rows for the same prompt and layer; if it stacks "
            "several tasks, pass by=['task'] so prompts are told apart"
        )
    return rows.pivot(index=keys, columns="layer", values=column).sort_index(axis=1)


def stage_layers(
    lens: pd.DataFrame,
    *,
    saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD,
    relative_to_final: bool = True,
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Per prompt, the layer of each of the three stages (definitions in the module docstring).

    ``by`` names columns that together with ``prompt`` identify a prompt (e.g.
    ``["task"]`` for a table stacking several tasks). Returns one row per prompt:
    the keys, ``argument_formation``, ``argument_rule``, ``argument_best_rank``,
    ``argument_top1_after``, ``function_application``, ``flip``, ``saturation``, ``n_layers``.
    """
    saturation_threshold = check("saturation_threshold", saturation_threshold)
    by = list(by)
    _check_lens(lens, by)
    keys = [*by, "prompt"]
    arg_rank = _grid(lens, keys, "argument", "rank")
    ans_rank = _grid(lens, keys, "answer", "rank")
    ans_prob = _grid(lens, keys, "answer", "prob")
    if not (arg_rank.index.equals(ans_rank.index) and arg_rank.columns.equals(ans_rank.columns)):
        raise MechbookError("argument and answer rows cover different prompts or layers; decode both for every prompt")
    if arg_rank.isna().any().any() or ans_rank.isna().any().any():
        raise MechbookError("some prompts lack some layers in the lens table; decode every layer for every prompt")

    layers = arg_rank.columns.to_numpy()
    n_layers = len(layers)
    positions = np.arange(n_layers)
    arg_top = arg_rank.to_numpy() == 1
    ans_top = ans_rank.to_numpy() == 1
    arg_rr = 1.0 / arg_rank.to_numpy()

    def first(mask: np.ndarray) -> np.ndarray:
        """Position of the first True per row, -1 where there is none."""
        return np.where(mask.any(1), mask.argmax(1), -1)

    fa = first(ans_top)
    # Argument: in the layers before function application, its first top-1, else the peak of its reciprocal rank.
    before = positions[None, :] < np.where(fa >= 0, fa, n_layers)[:, None]
    peak = np.where(before, arg_rr, -np.inf).argmax(1)  # earliest of ties
    arg_first = first(arg_top & before)
    arg_pos = np.where(arg_first >= 0, arg_first, np.where(before.any(1), peak, -1))
    probs = ans_prob.to_numpy()
    floor = saturation_threshold * (probs[:, -1:] if relative_to_final else 1.0)
    held = ans_top & (probs >= floor)
    holds_to_end = np.logical_and.accumulate(held[:, ::-1], axis=1)[:, ::-1]
    sat = first(holds_to_end)
    rows = np.arange(len(fa))
    flip = (fa > 0) & arg_top[rows, np.maximum(fa - 1, 0)]

    def as_layer(pos: np.ndarray) -> np.ndarray:
        return np.where(pos >= 0, layers[np.maximum(pos, 0)].astype(float), np.nan)

    out = arg_rank.index.to_frame(index=False)
    out["argument_formation"] = as_layer(arg_pos)
    out["argument_rule"] = np.where(arg_first >= 0, "top-1", np.where(arg_pos >= 0, "peak", "none"))
    out["argument_best_rank"] = np.where(arg_pos >= 0, arg_rank.to_numpy()[rows, np.maximum(arg_pos, 0)], np.nan)
    out["argument_top1_after"] = (arg_top & ~before).any(1)
    out["function_application"] = as_layer(fa)
    out["flip"] = flip
    out["saturation"] = as_layer(sat)
    out["n_layers"] = n_layers
    # Prompts in the order they first appear in the lens table (pivot sorts them).
    order = lens[keys].drop_duplicates()
    return order.merge(out, on=keys, how="left").reset_index(drop=True)


def stages_long(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """The per-prompt stage table in long form: one row per prompt x stage (layer NaN where undefined)."""
    keys = [c for c in per_prompt.columns if c not in (*STAGES, *STAGE_DETAILS)]
    long = per_prompt.melt(id_vars=keys, value_vars=list(STAGES), var_name="stage", value_name="layer")
    long["stage"] = pd.Categorical(long["stage"], categories=list(STAGES), ordered=True)
    return long.sort_values([*[k for k in keys if k != "n_layers"], "stage"], kind="stable").reset_index(drop=True)


def summarize_stages(per_prompt: pd.DataFrame, *, by: Sequence[str] = ()) -> pd.DataFrame:
    """Median and interquartile range of each stage's layer over prompts, also as a fraction of depth.

    One row per group of ``by`` x stage with ``n_prompts`` (prompts in the group),
    ``n_defined`` (prompts where the stage has a layer), ``median_layer``, ``q25``,
    ``q75`` and ``fraction_of_depth`` (of the median layer).
    """
    by = list(by)
    if "n_layers" not in per_prompt.columns:
        raise MechbookError("pass the output of stage_layers (it carries n_layers)")
    rows = []
    groups = per_prompt.groupby(by, sort=False) if by else [((), per_prompt)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        n_layers = int(group["n_layers"].iloc[0])
        for stage in STAGES:
            layers = group[stage].dropna()
            median = float(layers.median()) if len(layers) else np.nan
            rows.append(
                {
                    **dict(zip(by, key)),
                    "stage": stage,
                    "n_prompts": len(group),
                    "n_defined": len(layers),
                    "median_layer": median,
                    "q25": float(layers.quantile(0.25)) if len(layers) else np.nan,
                    "q75": float(layers.quantile(0.75)) if len(layers) else np.nan,
                    "fraction_of_depth": fraction_of_depth(median, n_layers),
                    "n_layers": n_layers,
                }
            )
    return pd.DataFrame(rows)


def paper_reference() -> pd.DataFrame:
    """The paper's GPT-2 medium stage layers (section 3) as layer and fraction of depth."""
    n = PAPER_GPT2_MEDIUM["n_layers"]
    return pd.DataFrame(
        [
            {"stage": stage, "paper_layer": PAPER_GPT2_MEDIUM[stage],
             "paper_fraction": fraction_of_depth(PAPER_GPT2_MEDIUM[stage], n)}
            for stage in ("argument_formation", "function_application")
        ]
    )
