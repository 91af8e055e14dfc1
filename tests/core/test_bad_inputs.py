"""Issue 11, the engine's side: no plausible number from bad input, and one-line errors instead of tracebacks.

Non-finite values are refused with the name of what holds them; shapes are contracts
(a metric built for some prompts refuses others, except stacked variants on a leading
axis); layer indices are plain integers (numpy integers and negative layers work the
same everywhere, bools do not); positions past the prompt, absurd ``k`` and zero batch
sizes are one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechbook import MechbookError
from mechbook.core import decoding
from mechbook.core.names import Component, act_name
from mechbook.core.patching import answer_prob, logit_diff, patch_mlp_outputs, patch_residual
from mechbook.core.runs import run_last, run_last_batched, tokenize
from mechbook.papers.vector_arithmetic import ffn_update, transplant

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(model):
    clean = tokenize(model, [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    corrupt = tokenize(model, [[5, 7, 6, 9, 8], [10, 12, 11, 14, 13]])
    return clean, corrupt, logit_diff(torch.tensor([3, 4]), torch.tensor([20, 21]))


# --- non-finite values ------------------------------------------------------------------------------


def test_nan_logits_never_rank_first():
    logits = torch.zeros(2, 10)
    logits[0] = float("nan")
    with pytest.raises(MechbookError, match="non-finite"):
        decoding.token_ranks(logits, torch.tensor([1, 2]))
    logits[0] = 0.0
    logits[1, 3] = float("inf")
    with pytest.raises(MechbookError, match="logits to rank"):
        decoding.token_ranks(logits, torch.tensor([1, 2]))


def test_the_logit_lens_and_top_tokens_refuse_nan(tiny_model):
    nan = torch.full((tiny_model.d_model,), float("nan"))
    with pytest.raises(MechbookError, match="vector to decode"):
        decoding.top_tokens(tiny_model, nan)
    with pytest.raises(MechbookError, match="logit lens"):
        decoding.logit_lens(tiny_model, nan.expand(1, 2, -1), {"t": torch.tensor([3])})
    with pytest.raises(MechbookError, match="residual vectors to decode"):
        decoding.top_tokens_per_layer(tiny_model, nan.expand(2, -1))


def test_a_transplant_of_a_nan_o_is_refused(tiny_model):
    batch = tokenize(tiny_model, [[5, 6, 7], [8, 9, 10, 11]])
    nan = torch.full((tiny_model.d_model,), float("nan"))
    for method in ("add", "replace"):
        with pytest.raises(MechbookError, match="non-finite"):
            transplant.transplant_logits(tiny_model, batch, [transplant.Transplant("bad", nan, 0, method)])


def test_metrics_refuse_what_a_restricted_unembedding_did_not_compute(tiny_model):
    clean, _, metric = _pair(tiny_model)
    logits, _ = run_last(tiny_model, clean, tokens=torch.tensor([3, 4, 20, 21]))
    assert torch.isfinite(metric(logits)).all()  # the logit difference reads only the computed ids
    with pytest.raises(MechbookError, match="non-finite"):
        answer_prob(torch.tensor([3, 4]))(logits)  # a softmax needs every logit
    with pytest.raises(MechbookError, match="non-finite"):
        logit_diff(torch.tensor([3, 5]), torch.tensor([20, 21]))(logits)


# --- shapes are contracts ------------------------------------------------------------------------------


def test_a_metric_for_two_prompts_refuses_four_but_takes_stacked_variants():
    metric = logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.raises(MechbookError, match="built for 2 prompts"):
        metric(torch.randn(4, 10))
    assert metric(torch.randn(3, 2, 10)).shape == (3, 2)  # three variants of the two prompts
    with pytest.raises(MechbookError, match="one correct and one incorrect id per prompt"):
        logit_diff(torch.tensor([1, 2]), torch.tensor([3]))


def test_targets_must_match_the_prompts(tiny_model):
    resid = torch.randn(2, tiny_model.n_layers, tiny_model.d_model)
    with pytest.raises(MechbookError, match="one per prompt"):
        decoding.logit_lens(tiny_model, resid, {"answer": torch.tensor([1, 2, 3])})
    with pytest.raises(MechbookError, match="one target id per row"):
        decoding.token_ranks(torch.randn(2, 10), torch.tensor([1, 2, 3]))


# --- indices are plain integers ---------------------------------------------------------------------------


def test_numpy_and_negative_layers_work_the_same_and_bools_do_not(tiny_model):
    last = tiny_model.n_layers - 1
    assert tiny_model.check_layer(np.int64(1)) == 1
    assert tiny_model.check_layer(-1) == last
    assert Component("mlp", np.int64(-1)).validate(tiny_model) == Component("mlp", last)
    assert Component("head", np.int32(0), np.int64(1)).hook_name == act_name("z", 0)
    for bad in (True, 1.0, "1"):
        with pytest.raises(MechbookError, match="layer"):
            tiny_model.check_layer(bad)
    with pytest.raises(MechbookError, match="out of range"):
        tiny_model.check_layer(tiny_model.n_layers)
    with pytest.raises(MechbookError, match="negative layer"):
        Component("mlp", -1).hook_name  # resolve it with validate(model) first


def test_a_negative_layer_patches_the_last_one(tiny_model):
    clean, corrupt, metric = _pair(tiny_model)
    by_negative = patch_mlp_outputs(tiny_model, clean, corrupt, metric, layers=[-1])
    by_index = patch_mlp_outputs(tiny_model, clean, corrupt, metric, layers=[tiny_model.n_layers - 1])
    assert by_negative.equals(by_index)


# --- one-line errors ------------------------------------------------------------------------------------


def test_a_position_past_the_prompt(tiny_model):
    clean, corrupt, metric = _pair(tiny_model)
    with pytest.raises(MechbookError, match="positions 0..4"):
        patch_residual(tiny_model, clean, corrupt, metric, layers=[0], positions=[5])


def test_top_tokens_asks_for_a_sensible_k(tiny_model):
    vector = torch.randn(tiny_model.d_model)
    for k in (10**7, 0):
        with pytest.raises(MechbookError, match="top tokens asked for"):
            decoding.top_tokens(tiny_model, vector, k=k)
    assert len(decoding.top_tokens(tiny_model, vector, k=np.int64(3))) == 3


def test_a_batch_size_of_zero(tiny_model):
    batch = tokenize(tiny_model, [[5, 6, 7], [8, 9]])
    with pytest.raises(MechbookError, match="batch_size must be at least 1"):
        run_last_batched(tiny_model, batch, batch_size=0)
    with pytest.raises(MechbookError, match="batch_size must be at least 1"):
        ffn_update.capture_mlp_outputs(tiny_model, batch, batch_size=0)
    o = torch.zeros(tiny_model.d_model)
    with pytest.raises(MechbookError, match="batch_size must be at least 1"):
        transplant.transplant_logits(tiny_model, batch, [transplant.Transplant("t", o, 0)], batch_size=0)


def test_a_transplant_that_overflows_the_final_norm_is_refused(tiny_model):
    """Chapter a5 with add_scale=1e20: float32 overflows in the final norm and every logit comes out equal, so
    every token would tie at rank 1; run_transplants refuses instead of publishing a failure rate of 0."""
    from types import SimpleNamespace

    targets = SimpleNamespace(token_ids=[[5, 6, 7], [8, 9, 10, 11]], argument_ids=[3, 4], answer_ids=[20, 21],
                              items=["a", "b"], groups=["g", "g"], answer_tokens=["x", "y"])
    o = torch.randn(tiny_model.d_model)
    table = transplant.run_transplants(tiny_model, targets, [transplant.Transplant("o", o, 0, "add")])
    assert (table.rank_after >= 1).all() and len(table) == 2
    huge = transplant.Transplant("o x 1e20", o * 1e20, 0, "add")  # (scale= itself stops at 100: core.checks)
    with pytest.raises(MechbookError, match="logits to rank.*same logit.*smaller scale"):
        transplant.run_transplants(tiny_model, targets, [huge])
