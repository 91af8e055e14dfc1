"""Patching and ablation, checked against transformer-lens's own patching functions; the one sweep under them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

import mechbook
import slow_twins
from conftest import build_tiny_model, random_circuit_task, sharpen
from mechbook.core import patching as P
from mechbook.core.patching import logit_diff
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import Edit, edit_hooks, mean_ablation
from mechbook.core.names import Component
from mechbook.core.runs import run_last, run_variants, tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

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
    edits = [Edit(comps[0], "patch", values[comps[0].hook_name])]
    patched = run_variants(tiny_model, corrupt, 1, lambda first, count: edit_hooks(edits), metric)[0]
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
    separate = torch.stack([P.ablate(tiny_model, clean, s, metric, means=means) for s in sets])
    assert batched.shape == (3, len(clean)) and torch.allclose(batched, separate, atol=1e-5)


def test_the_sweep_puts_variants_of_mixed_start_layers_back_in_order(tiny_model):
    """Variants listed out of layer order, with edits shared per start layer: each equals its own full run."""
    clean, corrupt, metric = _setup(tiny_model)
    comps = [P.Component("mlp", 2), P.Component("head", 0, 1), P.Component("mlp", 1), P.Component("head", 0, 3)]
    context = P.Component("head", 2, 2)  # mean-ablated in every variant that starts at or before its layer
    means = P.mean_activations(tiny_model, corrupt, comps + [context])

    def edits_for(i, rows):
        return mean_ablation([comps[i]], means, rows=rows)

    def around(layer):
        return mean_ablation([context], means, first_layer=layer)

    starts = [c.layer for c in comps]
    _, base = run_last(tiny_model, clean, names=P.resid_names(tiny_model, starts))
    swept = P.sweep(tiny_model, clean, starts, edits_for, metric, base=base, context=around, max_rows=2)
    separate = torch.stack([metric(run_last(tiny_model, clean, fwd_hooks=edit_hooks(
        mean_ablation([context], means) + mean_ablation([c], means)))[0]) for c in comps])
    assert swept.shape == (4, len(clean)) and torch.allclose(swept, separate, atol=1e-5)
    with pytest.raises(MechbookError, match="base cache has no blocks.1.hook_resid_pre"):
        P.sweep(tiny_model, clean, starts, edits_for, metric, base={k: v for k, v in base.items() if ".1." not in k})
    with pytest.raises(MechbookError, match="no variants"):
        P.sweep(tiny_model, clean, [], edits_for, metric, base=base)


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


@pytest.fixture(scope="module", params=["gpt2", "bloom", "llama", "gemma3"])
def sharp(request, tmp_path_factory):
    return mechbook.load_model(str(sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"sharp-{request.param}")))))


# --- the head sweep against one forward per head ----------------------------------------------------


@pytest.mark.slow
def test_head_patching_with_the_prefix_cache_on_gemma(gemma):
    """Numerals prompts and their shuffles share a prefix ("<bos>Van done in"): the prefix cache on the real model."""
    clean = tokenize(gemma, ["Van done in 1. Hat done in 2. Ring done in 3. Sun done in",
                             "Oil done in 4. Cup done in 5. Box done in 6. Pen done in"])
    corrupted = tokenize(gemma, ["Van done in 3. Hat done in 1. Ring done in 2. Sun done in",
                                 "Oil done in 6. Cup done in 4. Box done in 5. Pen done in"])
    answers = torch.tensor([gemma.tokenizer.convert_tokens_to_ids(t) for t in ("4", "7")]), \
        torch.tensor([gemma.tokenizer.convert_tokens_to_ids(t) for t in ("3", "6")])
    metric = logit_diff(*answers)
    heads = [Component("head", l, h) for l in (0, 8, 17) for h in range(gemma.n_heads)]
    slow = slow_twins.patch_head_outputs(gemma, clean, corrupted, metric, heads)
    fast = P.patch_head_outputs(gemma, clean, corrupted, metric, heads=heads, tokens=torch.cat(answers))
    assert (fast.metric - slow.metric).abs().max() < 1e-4


def test_head_patching_equals_one_forward_per_head(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    slow = slow_twins.patch_head_outputs(sharp, clean, corrupted, metric, P.all_heads(sharp))
    fast = P.patch_head_outputs(sharp, clean, corrupted, metric, max_rows=16)  # several passes per layer
    assert list(fast.component) == list(slow.component)
    assert (fast.metric - slow.metric).abs().max() < 1e-5


@pytest.mark.parametrize("shared", [5, 8])
def test_head_patching_with_a_shared_prefix(sharp, shared):
    """Prompts of several lengths whose first ``shared`` tokens agree: the prefix is computed once, results unchanged."""
    g = torch.Generator().manual_seed(2)
    lengths = [12, 12, 10, 11, 12, 9]
    clean = [torch.randint(3, 300, (n,), generator=g) for n in lengths]
    corrupted = [torch.cat([row[:shared], row[shared:][torch.randperm(len(row) - shared, generator=g)]]) for row in clean]
    clean, corrupted = tokenize(sharp, [r.tolist() for r in clean]), tokenize(sharp, [r.tolist() for r in corrupted])
    logits = run_last(sharp, clean)[0]
    ranked = logits.argsort(-1, descending=True)
    answers = (ranked[:, 0], ranked[:, 7])
    metric = logit_diff(*answers)
    slow = slow_twins.patch_head_outputs(sharp, clean, corrupted, metric, P.all_heads(sharp))
    fast = P.patch_head_outputs(sharp, clean, corrupted, metric, max_rows=12)
    cheap = P.patch_head_outputs(sharp, clean, corrupted, metric, tokens=torch.cat(answers).unique())
    assert (fast.metric - slow.metric).abs().max() < 1e-5
    assert (cheap.metric - slow.metric).abs().max() < 1e-5
    assert (slow.metric - slow.metric.mean()).abs().max() > 1e-3


def test_head_patching_refuses_a_prefix_cache_the_attention_never_saw(sharp, monkeypatch):
    """If the installed transformers/transformer-lens drop the cache keyword, the run fails instead of lying."""
    from mechbook.core import architectures

    g = torch.Generator().manual_seed(3)
    clean = [torch.randint(3, 300, (10,), generator=g) for _ in range(3)]
    corrupted = [torch.cat([row[:6], row[6:][torch.randperm(4, generator=g)]]) for row in clean]
    clean, corrupted = tokenize(sharp, [r.tolist() for r in clean]), tokenize(sharp, [r.tolist() for r in corrupted])
    metric = logit_diff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    if not architectures.has_fast_loop(sharp):
        pytest.skip("no prefix cache without a hand-written loop")
    monkeypatch.setattr(architectures, "_cache_kwargs", lambda prefix: {})  # as if the keyword were filtered out
    with pytest.raises(MechbookError, match="did not reach the attention of layer"):
        P.patch_head_outputs(sharp, clean, corrupted, metric)


# --- metrics and edits refuse bad input ----------------------------------------------------------


def test_answer_prob_refuses_negative_ids_and_ids_past_the_vocabulary():
    with pytest.raises(MechbookError, match="negative token id -3"):
        P.answer_prob(torch.tensor([-3, 1]))  # would read vocabulary id V-3
    with pytest.raises(MechbookError, match="reads token id 10, but the logits have 10 columns"):
        P.answer_prob(torch.tensor([1, 10]))(torch.randn(2, 10))
    logits = torch.randn(2, 10)
    assert torch.allclose(P.answer_prob([1, 9])(logits), logits.softmax(-1)[[0, 1], [1, 9]])


def test_logit_diff_refuses_negative_ids_and_ids_past_the_vocabulary():
    with pytest.raises(MechbookError, match="negative token id -1"):
        logit_diff(torch.tensor([1, -1]), torch.tensor([2, 3]))
    with pytest.raises(MechbookError, match="integer token ids"):
        logit_diff(torch.tensor([1.5, 2.0]), torch.tensor([2, 3]))
    with pytest.raises(MechbookError, match="reads token id 12"):
        logit_diff(torch.tensor([1, 12]), torch.tensor([2, 3]))(torch.randn(2, 10))


def test_metrics_refuse_logits_that_are_equal_for_every_token():
    """An overflowing final norm makes every logit 0: no probability or logit difference means anything then."""
    flat = torch.zeros(3, 2, 10)  # three stacked variants of two prompts
    with pytest.raises(MechbookError, match="same logit"):
        P.answer_prob(torch.tensor([1, 2]))(flat)
    with pytest.raises(MechbookError, match="same logit"):
        logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))(flat)
    good = torch.randn(3, 2, 10)
    assert logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))(good).shape == (3, 2)


def test_an_edit_that_does_not_fit_the_model_is_refused_naming_it(tiny_model):
    batch = tokenize(tiny_model, [[5, 6, 7], [8, 9, 10]])
    wide = Edit(Component("resid", 1), "add", torch.ones(tiny_model.d_model + 1))
    with pytest.raises(MechbookError, match="the 'add' edit of resid 1: the vector has width"):
        run_last(tiny_model, batch, fwd_hooks=edit_hooks([wide]))
    far = Edit(Component("head", 0, 99), "zero")
    with pytest.raises(MechbookError, match=f"the 'zero' edit of 0.99: head 99 is out of range; this layer has "
                                            f"{tiny_model.n_heads} heads"):
        run_last(tiny_model, batch, fwd_hooks=edit_hooks([far]))
    late = Edit(Component("mlp", 0, position=5), "zero")
    with pytest.raises(MechbookError, match="position 5 lies past the 3 positions"):
        run_last(tiny_model, batch, fwd_hooks=edit_hooks([late]))
    with pytest.raises(MechbookError, match="takes \\[d\\] or \\[n, d\\]"):
        Edit(Component("resid", 1), "add", torch.ones(1, 1, tiny_model.d_model))
    with pytest.raises(MechbookError, match="must be a float tensor"):
        Edit(Component("resid", 1), "replace", [0.0] * tiny_model.d_model)
    with pytest.raises(MechbookError, match="needs a Component"):
        Edit(("head", 0, 1), "zero")


# --- bad input ------------------------------------------------------------------------------------------


def test_sweeps_refuse_what_is_not_a_list_of_components_or_a_metric(tiny_gpt2):
    from mechbook.core.names import act_name

    clean = tokenize(tiny_gpt2, [[5, 6, 7, 8], [9, 10, 11, 12]])
    corrupt = tokenize(tiny_gpt2, [[6, 5, 8, 7], [10, 9, 12, 11]])
    metric = logit_diff(torch.tensor([3, 4]), torch.tensor([20, 21]))
    means = P.mean_activations(tiny_gpt2, corrupt, [Component("mlp", 0)])
    for heads, match in (([(0, 1)], "takes 'head' components"), ([], "got no components"),
                         ([Component("mlp", 0)], "takes 'head' components")):
        with pytest.raises(MechbookError, match=match):
            P.patch_head_outputs(tiny_gpt2, corrupt, clean, metric, heads=heads)
    with pytest.raises(MechbookError, match="metric must be a function"):
        P.patch_head_outputs(tiny_gpt2, corrupt, clean, None, heads=[Component("head", 0, 1)])
    with pytest.raises(MechbookError, match="takes a list"):
        P.patch_mlp_outputs(tiny_gpt2, corrupt, clean, metric, layers=2)
    for kwargs in ({"layers": [0], "positions": []}, {"layers": []}):
        with pytest.raises(MechbookError, match="selects nothing to patch"):
            P.patch_residual(tiny_gpt2, corrupt, clean, metric, **kwargs)
    for sets, match in (([], "no sets"), ([Component("mlp", 0)], "wrap a single component"),
                        (Component("mlp", 0), "list of sets")):
        with pytest.raises(MechbookError, match=match):
            P.ablation_sweep(tiny_gpt2, clean, sets, metric, means=means)
    with pytest.raises(MechbookError, match="dict of hook name"):
        P.ablation_sweep(tiny_gpt2, clean, [[Component("mlp", 0)]], metric, means=[1])
    with pytest.raises(MechbookError, match="got no components"):
        P.mean_activations(tiny_gpt2, corrupt, [])
    with pytest.raises(MechbookError, match="scores a torch tensor"):
        metric(np.zeros((2, tiny_gpt2.d_vocab)))
    for empty in (lambda: logit_diff(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)),
                  lambda: P.answer_prob(torch.tensor([], dtype=torch.long))):
        with pytest.raises(MechbookError, match="no prompts"):
            empty()
    assert act_name("mlp_out", 0) in means


def test_edits_refuse_bad_masks_rows_lists_and_negative_positions(tiny_gpt2):
    from mechbook.core.interventions import check_vector, mean_ablation
    from mechbook.core.names import act_name

    batch = tokenize(tiny_gpt2, [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    d = tiny_gpt2.d_model
    narrow = Edit(Component("resid", 0), "add", torch.ones(d), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(MechbookError, match="mask covers 3 positions"):
        run_last(tiny_gpt2, batch, fwd_hooks=edit_hooks([narrow]))
    with pytest.raises(MechbookError, match="position -1 is negative"):  # not "past the positions"
        run_last(tiny_gpt2, batch, fwd_hooks=edit_hooks([Edit(Component("mlp", 0, position=-1), "zero")]))
    with pytest.raises(MechbookError, match="step of at least 1"):
        Edit(Component("mlp", 0), "zero", rows=slice(0, 2, 0))
    for edits in (None, [1], Edit(Component("mlp", 0), "zero")):
        with pytest.raises(MechbookError, match="list of Edit"):
            edit_hooks(edits)
    with pytest.raises(MechbookError, match="dict of hook name"):
        mean_ablation([Component("mlp", 0)], None)
    with pytest.raises(MechbookError, match="float torch tensor"):
        check_vector(tiny_gpt2, np.zeros(d))
    with pytest.raises(MechbookError, match="negative layer"):
        act_name("z", -1)  # not a name of a hook that never fires
