"""Head-output patching sweep: mechbook against transformer-lens, same prompts, same model, one run.

Patches every head's output (``hook_z``, all positions) from clean numerals prompts
into their shuffled twins and measures Paper B's logit difference, three ways:

- transformer-lens ``patching.get_act_patch_attn_head_out_all_pos`` (the peer): one
  full forward per head, logits at every position;
- ``mechbook.core.patching.patch_head_outputs``: heads stacked along the batch axis, each
  layer's heads run from that layer on, starting from the cached residual stream; on
  the hand-written decoder loops (GPT-2, Llama, Gemma 3) the prompt prefix that clean and
  corrupted share is computed once (its keys and values reused); only the answer ids'
  logits are computed;
- the same through the generic run-from-a-layer path every other architecture uses
  (a ``LocalRunner(fast_loops=False)``): no prefix cache.

Prints the times, the speed-up over transformer-lens, the largest difference between
the result grids and the forward throughput. Usage:

    python benchmarks/patching_speed.py                      # gemma3-270m, 32 prompts
    python benchmarks/patching_speed.py --model smollm2-135m --prompts 16
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import io
import time
import warnings

import torch

import mechbook
from mechbook.core.architectures import has_fast_loop
from mechbook.core.patching import logit_diff, patch_head_outputs
from mechbook.core.runs import LocalRunner, TokenBatch, run_last, tokenize
from mechbook.papers.seqcont.sequences import make_prompts


def numerals_pairs(model, n_prompts: int, seed: int = 0) -> tuple[TokenBatch, TokenBatch, torch.Tensor, torch.Tensor]:
    """``n_prompts`` clean numerals prompts ("Van done in 1. ... Sun done in") and shuffled twins, all one token length."""
    kwargs = dict(template="done", n_prompts=4 * n_prompts, seed=seed, tokenizer=model.tokenizer)
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # answers of several tokens are reported; numerals have none that matter here
        clean = make_prompts("numerals", **kwargs)
        corrupted = make_prompts("numerals", corrupted="shuffle", **kwargs)
    twin = {s: i for i, s in enumerate(corrupted.source_index)}
    pairs = [(i, twin[s]) for i, s in enumerate(clean.source_index) if s in twin]
    lengths = [clean.n_tokens[i] for i, j in pairs if clean.n_tokens[i] == corrupted.n_tokens[j]]
    common = max(set(lengths), key=lengths.count)
    pairs = [(i, j) for i, j in pairs if clean.n_tokens[i] == corrupted.n_tokens[j] == common][:n_prompts]
    if len(pairs) < n_prompts:
        raise SystemExit(f"only {len(pairs)} prompt pairs of one length; ask for fewer --prompts")
    clean, corrupted = clean.select([i for i, _ in pairs]), corrupted.select([j for _, j in pairs])
    corr, incorr = clean.answer_tensors()
    return tokenize(model, clean.prompt_ids), tokenize(model, corrupted.prompt_ids), corr, incorr


def timed(fn, *args, **kwargs):
    """Result, wall-clock seconds and CPU seconds of this process (the CPU time barely moves when other
    processes load the machine, so the ratios are read from it)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, loaded CPU extra threads mostly spin)")
    parser.add_argument("--without-generic", action="store_true",
                        help="skip timing the generic run-from-a-layer path")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = mechbook.load_model(args.model)
    clean, corrupted, corr, incorr = numerals_pairs(model, args.prompts)
    metric = logit_diff(corr, incorr)
    n, pos = corrupted.input_ids.shape
    print(f"model {model.name}: {model.n_layers} layers x {model.n_heads} heads "
          f"({model.n_kv_heads} key/value heads); {n} prompts x {pos} tokens; torch threads {torch.get_num_threads()}")

    # forward throughput (one warm-up each)
    run_last(model, corrupted)
    _, wall, cpu = timed(run_last, model, corrupted)
    with torch.no_grad():
        model.bridge(corrupted.input_ids)
        _, tl_wall, tl_cpu = timed(model.bridge, corrupted.input_ids)
    print(f"forward throughput: mechbook run_last (last-position logits) {n * pos / wall:,.0f} tokens/s "
          f"({n * pos / cpu:,.0f} per CPU second); transformer-lens bridge forward (logits at every position) "
          f"{n * pos / tl_wall:,.0f} tokens/s ({n * pos / tl_cpu:,.0f} per CPU second)")

    # the peer: transformer-lens, clean cache included in its time
    from transformer_lens import patching

    def peer():
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
            _, clean_cache = model.bridge.run_with_cache(clean.input_ids, names_filter=lambda name: name.endswith("attn.hook_z"))
            return patching.get_act_patch_attn_head_out_all_pos(
                model.bridge, corrupted.input_ids, clean_cache, lambda logits: metric(logits[:, -1]).mean()
            )

    expected, peer_wall, peer_cpu = timed(peer)
    print(f"transformer-lens get_act_patch_attn_head_out_all_pos: {peer_wall:.1f} s wall, {peer_cpu:.1f} s CPU "
          f"({model.n_layers * model.n_heads} forwards)")

    def compare(table) -> float:
        grid = torch.tensor(table.metric.to_numpy(), dtype=torch.float32).reshape(model.n_layers, model.n_heads)
        return float((grid - expected.cpu()).abs().max())

    answers = torch.cat([corr, incorr]).unique()
    shared = int((clean.input_ids != corrupted.input_ids).any(0).nonzero()[0]) if has_fast_loop(model) else 0
    fast, wall, cpu = timed(patch_head_outputs, model, clean, corrupted, metric, tokens=answers)
    print(f"mechbook patch_head_outputs (each layer's heads from that layer, {shared}-token shared prefix "
          f"computed once, logits of the {len(answers)} answer ids only): {wall:.1f} s wall, {cpu:.1f} s CPU")
    if not args.without_generic and has_fast_loop(model):
        slow = dataclasses.replace(model, runner=LocalRunner(fast_loops=False))
        generic, g_wall, g_cpu = timed(patch_head_outputs, slow, clean, corrupted, metric, tokens=answers)
        print(f"the same through the generic run-from-a-layer path (no prefix cache): {g_wall:.1f} s wall, "
              f"{g_cpu:.1f} s CPU; the hand-written loop is {g_cpu / cpu:.2f}x faster (CPU); "
              f"max |difference| {compare(generic):.2e}")
    print(f"speed-up over transformer-lens: {peer_wall / wall:.1f}x wall-clock, {peer_cpu / cpu:.1f}x CPU time "
          "(target >= 5x)")
    print(f"largest |difference| between the result grids: {compare(fast):.2e} (target <= 1e-4; "
          f"metric range {float(expected.min()):.3f} .. {float(expected.max()):.3f})")


if __name__ == "__main__":
    main()
