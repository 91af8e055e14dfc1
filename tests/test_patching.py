"""Patching and ablation, checked against transformer-lens's own patching functions."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tl_patching

from mechbook.core import patching as P
from mechbook.core.errors import MechbookError
from mechbook.core.runs import run_last, tokenize

CLEAN = ["one two three four five six", "January February March April May June"]


def _setup(model):
    """Two clean prompts cut to equal length, and corrupted copies with their tokens shuffled."""
    rows = [model.tokenizer(p).input_ids for p in CLEAN]
    width = min(len(r) for r in rows)
    clean_ids = [r[:width] for r in rows]
    start = 1 if model.prepend_bos else 0
    order = list(range(start, width))
    shuffled = order[1::2] + order[0::2]
    corrupt_ids = [r[:start] + [r[i] for i in shuffled] for r in clean_ids]
    clean, corrupt = tokenize(model, clean_ids), tokenize(model, corrupt_ids)
    correct = clean.input_ids[:, -1]
    incorrect = clean.input_ids[:, -2]
    return clean, corrupt, P.logit_diff(correct, incorrect)


def _tl_metric(metric):
    return lambda logits: metric(logits[:, -1]).mean()


def test_head_patching_equals_transformer_lens(tiny_model):
    clean, corrupt, metric = _setup(tiny_model)
    ours = P.patch_head_outputs(tiny_model, clean, corrupt, metric)
    with torch.inference_mode():
        _, clean_cache = tiny_model.bridge.run_with_cache(clean.input_ids)
        theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
            tiny_model.bridge, corrupt.input_ids, clean_cache, _tl_metric(metric)
        )
    diff = (torch.as_tensor(theirs).reshape(-1) - torch.tensor(ours.metric.values, dtype=torch.float32)).abs().max()
    print(f"head patching, max |ours - transformer-lens| = {float(diff):.2e}")
    assert diff <= 1e-4
    assert list(ours.columns) == ["component", "kind", "layer", "head", "position", "metric"]


def test_mlp_patching_by_position_equals_transformer_lens(tiny_model):
    clean, corrupt, metric = _setup(tiny_model)
    ours = P.patch_mlp_outputs(tiny_model, clean, corrupt, metric, by_position=True)
    with torch.inference_mode():
        _, clean_cache = tiny_model.bridge.run_with_cache(clean.input_ids)
        theirs = tl_patching.get_act_patch_mlp_out(tiny_model.bridge, corrupt.input_ids, clean_cache, _tl_metric(metric))
    diff = (torch.as_tensor(theirs).reshape(-1) - torch.tensor(ours.metric.values, dtype=torch.float32)).abs().max()
    assert diff <= 1e-4


def test_residual_patching_equals_transformer_lens(tiny_model):
    clean, corrupt, metric = _setup(tiny_model)
    ours = P.patch_residual(tiny_model, clean, corrupt, metric)
    with torch.inference_mode():
        _, clean_cache = tiny_model.bridge.run_with_cache(clean.input_ids)
        theirs = tl_patching.get_act_patch_resid_pre(tiny_model.bridge, corrupt.input_ids, clean_cache, _tl_metric(metric))
    diff = (torch.as_tensor(theirs).reshape(-1) - torch.tensor(ours.metric.values, dtype=torch.float32)).abs().max()
    assert diff <= 1e-4


def test_patching_everything_at_the_last_layer_input_restores_clean(tiny_model):
    clean, corrupt, metric = _setup(tiny_model)
    clean_logits, _ = run_last(tiny_model, clean)
    last = tiny_model.n_layers - 1
    comps = [P.Component("resid", last)]
    values = P.cache_components(tiny_model, clean, comps)
    patched = P.run_variants(tiny_model, corrupt, [comps], metric, mode="patch", values=values)[0]
    assert torch.allclose(patched, metric(clean_logits), atol=1e-4)


def test_zero_ablation_matches_a_hand_written_hook(tiny_model):
    clean, _, metric = _setup(tiny_model)
    ablated = P.ablate(tiny_model, clean, [P.Component("head", 0, 1), P.Component("mlp", 1)], metric, mode="zero")

    def zero_head(act, hook):
        act = act.clone()
        act[:, :, 1] = 0
        return act

    def zero_mlp(act, hook):
        return torch.zeros_like(act)

    logits, _ = run_last(tiny_model, clean, fwd_hooks=[("blocks.0.attn.hook_z", zero_head), ("blocks.1.hook_mlp_out", zero_mlp)])
    assert torch.allclose(ablated, metric(logits), atol=1e-5)


def test_mean_ablation_with_its_own_means_of_one_prompt_is_a_no_op(tiny_model):
    clean, _, metric = _setup(tiny_model)
    one = clean.select([0])
    comps = P.all_heads(tiny_model) + P.all_mlps(tiny_model)
    means = P.mean_activations(tiny_model, one, comps)
    logits, _ = run_last(tiny_model, one)
    reference = P.logit_diff(one.input_ids[:, -1], one.input_ids[:, -2])
    assert torch.allclose(P.ablate(tiny_model, one, comps, reference, means=means), reference(logits), atol=1e-4)


def test_ablation_sweep_batches_variants_like_separate_runs(tiny_model):
    clean, corrupt, metric = _setup(tiny_model)
    comps = P.all_heads(tiny_model)[:4]
    means = P.mean_activations(tiny_model, corrupt, comps)
    sets = [[comps[0]], [comps[1], comps[2]], comps]
    batched = P.ablation_sweep(tiny_model, clean, sets, metric, means=means, max_rows=4)
    separate = torch.stack([P.ablate(tiny_model, clean, s, metric, means=means).mean() for s in sets])
    assert torch.allclose(batched, separate, atol=1e-5)


def test_bad_components_and_pairs_are_explained(tiny_model):
    clean, corrupt, metric = _setup(tiny_model)
    with pytest.raises(MechbookError, match="heads per layer"):
        P.patch_head_outputs(tiny_model, clean, corrupt, metric, heads=[P.Component("head", 0, 99)])
    with pytest.raises(MechbookError, match="layers"):
        P.patch_mlp_outputs(tiny_model, clean, corrupt, metric, layers=[7])
    with pytest.raises(MechbookError, match="equal token lengths"):
        P.patch_head_outputs(tiny_model, clean.select([0]), corrupt, metric)
    with pytest.raises(MechbookError, match="unknown component kind"):
        P.Component("neuron", 0)
