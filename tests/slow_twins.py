"""Slow twins of the library's fast paths: the same quantity, one full forward per variant, no shared work.

They exist only to check the fast paths (the fast ones are the library's API). They
run through the transformer-lens bridge with plain hook functions and no engine
helpers beyond a single forward pass (``run_last``).
"""

from __future__ import annotations

import pandas as pd
import torch

from mechbook.core.runs import run_last


def patch_head_outputs(model, source, target, metric, heads):
    """Each head's ``hook_z`` slice copied from the source run into the target run, one forward per head."""
    names = sorted({f"blocks.{c.layer}.attn.hook_z" for c in heads})
    _, src = run_last(model, source, names=names)
    values = []
    for c in heads:
        name = f"blocks.{c.layer}.attn.hook_z"

        def put(act, hook, c=c, name=name):
            act = act.clone()
            act[:, :, c.head] = src[name][:, :, c.head]
            return act

        logits, _ = run_last(model, target, fwd_hooks=[(name, put)])
        values.append(float(metric(logits).mean()))
    return pd.DataFrame({"component": [c.label for c in heads], "metric": values})


def transplant(model, batch, o, layer, *, method="add", positions=None, scale=1.0):
    """Last-position logits with o put in by a full forward: added after block ``layer`` at the last position
    (``positions="all"``: every real token), or written over every MLP output from ``layer`` on at every real
    token but a prepended BOS (``positions="last"``: the last position only)."""
    n, width = batch.input_ids.shape
    pos = torch.arange(width)[None, :]
    where = positions or ("last" if method == "add" else "all")
    if where == "last":
        mask = pos == batch.last_pos[:, None]
    else:
        mask = (pos < batch.lengths[:, None]) & (pos > 0 if model.prepend_bos else True)
    value = scale * (o if o.dim() == 2 else o.expand(n, -1))

    def add(act, hook):
        return act + mask[:, : act.shape[1], None] * value[:, None, :]

    def write(act, hook):
        return torch.where(mask[:, : act.shape[1], None], value[:, None, :].expand_as(act), act)

    if method == "add":
        hooks = [(f"blocks.{layer}.hook_resid_post", add)]
    else:
        hooks = [(f"blocks.{l}.hook_mlp_out", write) for l in range(layer, model.n_layers)]
    return run_last(model, batch, fwd_hooks=hooks)[0]
