"""The parity table: every core entry point on the nnsight backends against the local bridge.

For each model, the same prompts run on the local backend (the transformer-lens bridge), on
``nnsight`` (a plain Hugging Face model sharing the bridge's weights) and on ``nnsight`` with
``remote="local"`` (nnsight's remote serialization, run in this process: the stand-in for NDIF,
which this machine cannot reach). Entry points:

- ``run_last logits``: last-position logits;
- ``run_last cache``: every activation kind the nnsight backend reaches, every layer;
- ``edit <mode>``: last-position logits with a head, an MLP and the residual stream edited
  (patch from another prompt, the prompts' mean, zero) or vectors added or written at the last position;
- ``run_from_layer``: logits from the residual stream entering each layer (and the final norm).

Printed: one row per backend and entry point with the largest absolute difference from the
local backend over every value compared; for the edits, how far they move the local logits (so that
agreeing means something); and the wall time of the backend's runs beside the local ones.

Usage:

    python benchmarks/backend_parity.py                                # smollm2-135m and gemma3-270m
    python benchmarks/backend_parity.py --models smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

import mechbook
from mechbook.backends import use_backend
from mechbook.core.interventions import Edit, edit_hooks
from mechbook.core.names import Component, act_name, layer_names
from mechbook.core.runs import run_from_layer, run_last, tokenize

PROMPTS = ["The capital of France is Paris. The capital of Poland is", "One, two, three, four,",
           "Yesterday I walked. Today I"]
KINDS = ("resid_pre", "resid_mid", "attn_out", "z", "q", "k", "v", "mlp_out", "resid_post")


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).nan_to_num(0.0).abs().max())


def _edits(model, batch, source_cache, mode):
    layer = model.n_layers // 2
    head, mlp, resid = Component("head", layer, 1), Component("mlp", layer), Component("resid", layer + 1)
    if mode == "patch":
        return [Edit(c, "patch", source_cache[c.hook_name]) for c in (head, mlp, resid)]
    if mode == "mean":
        return [Edit(c, "mean", source_cache[c.hook_name].mean(0)) for c in (head, mlp, resid)]
    if mode == "zero":
        return [Edit(c, "zero") for c in (head, mlp, resid)]
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    mask[torch.arange(len(batch)), batch.last_pos] = True
    return [Edit(mlp, mode, torch.randn(model.d_model, generator=g), mask=mask),
            Edit(resid, mode, torch.randn(len(batch), model.d_model, generator=g), mask=mask)]


def entry_points(model, batch, source):
    """name -> a function of the model that returns the tensors to compare (in a fixed order)."""
    names = [n for kind in KINDS for n in layer_names(kind, model.n_layers)] + [act_name("final")]
    layer = model.n_layers // 2
    patched = [act_name("z", layer), act_name("mlp_out", layer), act_name("resid_pre", layer + 1)]
    _, source_cache = run_last(model, source, names=patched)
    starts = layer_names("resid_pre", model.n_layers) + [act_name("final")]
    _, start_cache = run_last(model, batch, names=starts)
    points = {
        "run_last logits": lambda m: [run_last(m, batch)[0]],
        "run_last cache": lambda m: (lambda out: [out[0], *(out[1][n] for n in names)])(run_last(m, batch, names=names)),
    }
    for mode in ("patch", "mean", "zero", "add", "replace"):
        hooks = edit_hooks(_edits(model, batch, source_cache, mode))
        points[f"edit {mode}"] = lambda m, hooks=hooks: [run_last(m, batch, fwd_hooks=hooks)[0]]
    points["run_from_layer"] = lambda m: [run_from_layer(m, start_cache[n], i, batch.last_pos)[0]
                                          for i, n in enumerate(starts)]
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | backend | entry point | largest abs difference | edit's effect (local) | seconds (backend / local) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        local = mechbook.load_model(name)
        # patches come from the same prompts in another order: the same width, other values in each row
        batch, source = tokenize(local, PROMPTS), tokenize(local, PROMPTS[1:] + PROMPTS[:1])
        points = entry_points(local, batch, source)
        unedited = run_last(local, batch)[0]
        backends = {"nnsight": use_backend(local, "nnsight"),
                    'nnsight, remote="local"': use_backend(local, "nnsight", remote="local")}
        for point, run in points.items():
            start = time.perf_counter()
            want = run(local)
            local_time = time.perf_counter() - start
            effect = f"{_diff(want[0], unedited):.2f}" if point.startswith("edit") else "–"
            for label, model in backends.items():
                start = time.perf_counter()
                got = run(model)
                seconds = time.perf_counter() - start
                largest = max(_diff(g, w) for g, w in zip(got, want, strict=True))
                print(f"| {name} | {label} | {point} | {largest:.2e} | {effect} | {seconds:.2f} / {local_time:.2f} |", flush=True)


if __name__ == "__main__":
    main()
