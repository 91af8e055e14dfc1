"""In-context tasks run through a model: accuracy and the logit lens over a prompt set.

Reproduces the measurements of Merullo et al. 2024, section 3: how often the model
answers the in-context query, and where in depth the argument (" Poland") and the
answer (" Warsaw") become readable from the residual stream at the last position.
"""

from __future__ import annotations

import pandas as pd
import torch

from mechbook.core import decoding
from mechbook.core.loading import LoadedModel
from mechbook.core.runs import run_last_batched, tokenize
from mechbook.papers.vector_arithmetic.prompts import PromptSet


def run_prompts(model: LoadedModel, prompts: PromptSet, *, batch_size: int = 16, desc: str | None = None):
    """Last-position logits and residual after every layer (``hook_resid_post``), for every prompt of a set (§3)."""
    batch = tokenize(model, prompts.token_ids)
    names = decoding.resid_post_names(model)
    logits, cache = run_last_batched(model, batch, names=names, last_only=True, batch_size=batch_size, desc=desc)
    return logits, decoding.stack_layers(cache, names)


def accuracy_table(model: LoadedModel, prompts: PromptSet, logits: torch.Tensor) -> pd.DataFrame:
    """One row per prompt: the model's top token, whether it is the answer, the answer's rank and probability.

    Greedy decoding of one token, the accuracy check that opens §3 (chapters a1 and a2).
    """
    answer = torch.tensor(prompts.answer_ids)
    ranks = decoding.token_ranks(logits, answer)
    probs = logits.softmax(-1).gather(-1, answer[:, None]).squeeze(-1)
    top = logits.argmax(-1)
    return pd.DataFrame(
        {
            "item": prompts.items,
            "group": prompts.groups,
            "answer": prompts.answer_tokens,
            "predicted": [decoding.to_str(model, t) for t in top],
            "correct": (top == answer).tolist(),
            "answer_rank": ranks.tolist(),
            "answer_prob": probs.tolist(),
        }
    )


def lens_table(model: LoadedModel, prompts: PromptSet, resid: torch.Tensor) -> pd.DataFrame:
    """Logit lens of argument and answer after every layer, one row per prompt x layer x target (§3, chapter a1).

    ``resid`` is :func:`run_prompts`'s; ``depth`` is the fraction ``(layer + 1) / n_layers``.
    """
    lens = decoding.logit_lens(model, resid, prompts.target_ids())
    lens["item"] = [prompts.items[i] for i in lens["prompt"]]
    lens["depth"] = (lens["layer"] + 1) / model.n_layers
    return lens


def first_top1_layer(lens: pd.DataFrame, target: str = "answer") -> pd.DataFrame:
    """Per prompt, the first layer at which ``target`` is the top token of the logit lens (NaN if never)."""
    rows = lens[lens.target == target]
    first = rows[rows["rank"] == 1].groupby("prompt")["layer"].min()
    out = pd.DataFrame({"prompt": sorted(rows.prompt.unique())})
    out["first_top1_layer"] = out.prompt.map(first)
    return out
