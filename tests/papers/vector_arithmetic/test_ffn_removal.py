"""Top-down FFN removal (Paper A, section 5) on the tiny models."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch

from mechbook.papers.vector_arithmetic import ffn_removal as ablation
from mechbook.core.errors import MechbookError
from mechbook.core.runs import run_last, tokenize
from mechbook.papers.vector_arithmetic.prompts import build_prompts


@pytest.fixture(scope="module")
def capitals(tiny_model):
    """Capitals prompts whose "answers" are the tiny model's own top tokens, so intact accuracy is 1."""
    prompts = build_prompts("capitals", tiny_model, n=6, n_shots=1, multi_token="first")
    logits, _ = run_last(tiny_model, tokenize(tiny_model, prompts.token_ids))
    return replace(prompts, answer_ids=logits.argmax(-1).tolist())


def _hook_count(model) -> int:
    return sum(len(hp.fwd_hooks) for hp in model.bridge.hook_dict.values())


def test_layer_counts_follow_sixths_of_the_depth():
    assert ablation.top_down_layer_counts(18) == [0, 3, 6, 9, 12, 15, 18]
    assert ablation.top_down_layer_counts(30) == [0, 5, 10, 15, 20, 25, 30]
    # BLOOM-176B: 2/6 of 70 layers rounds up to the paper's "top 24 FFN sublayers"
    assert ablation.top_down_layer_counts(70)[2] == 24
    assert ablation.top_down_layer_counts(3) == [0, 1, 2, 3]  # shallow: repeated steps collapse


def test_top_mlps_are_the_top_layers(tiny_model):
    n = tiny_model.n_layers
    assert ablation.top_mlps(tiny_model, 0) == []
    assert [c.layer for c in ablation.top_mlps(tiny_model, 2)] == [n - 2, n - 1]
    assert all(c.hook_name.endswith("hook_mlp_out") for c in ablation.top_mlps(tiny_model, n))


@pytest.mark.parametrize("bad", [-1, 99, 1.5, "2", True])
def test_bad_k_is_refused_with_the_fix(tiny_model, capitals, bad):
    with pytest.raises(MechbookError, match="whole number from 0 to"):
        ablation.top_mlps(tiny_model, bad)
    with pytest.raises(MechbookError, match="whole number from 0 to"):
        ablation.ffn_removal_sweep(tiny_model, capitals, layers_removed=[0, bad])


def test_bad_inputs_name_the_fix(tiny_model, capitals):
    with pytest.raises(MechbookError, match="layers_removed is empty"):
        ablation.ffn_removal_sweep(tiny_model, capitals, layers_removed=[])
    with pytest.raises(MechbookError, match="PromptSet"):
        ablation.ffn_removal_sweep(tiny_model, ["Q: What is the capital of France?\nA:"])
    with pytest.raises(MechbookError, match="positive integer"):
        ablation.top_down_layer_counts(0)


def test_removing_nothing_is_the_plain_accuracy(tiny_model, capitals):
    logits, _ = run_last(tiny_model, tokenize(tiny_model, capitals.token_ids))
    plain = (logits.argmax(-1).cpu() == torch.tensor(capitals.answer_ids)).float().mean().item()
    table = ablation.ffn_removal_sweep(tiny_model, capitals)
    assert list(table.columns) == ["task", "variant", "layers_removed", "fraction_removed", "n_layers", "accuracy", "n"]
    assert table.layers_removed.tolist() == ablation.top_down_layer_counts(tiny_model.n_layers)
    assert plain == 1.0
    assert table.loc[table.layers_removed == 0, "accuracy"].item() == pytest.approx(plain)
    assert (table.n == len(capitals)).all()


def test_batched_steps_equal_one_run_each(tiny_model, capitals):
    """Each k of the batched sweep equals a separate run with those MLP outputs zeroed by hand."""
    batch = tokenize(tiny_model, capitals.token_ids)
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    items = ablation.ffn_removal_sweep(tiny_model, capitals, per_item=True)
    for k, rows in items.groupby("layers_removed"):
        hooks = [(c.hook_name, zero) for c in ablation.top_mlps(tiny_model, int(k))]
        logits, _ = run_last(tiny_model, batch, fwd_hooks=hooks)
        expected = (logits.argmax(-1).cpu() == torch.tensor(capitals.answer_ids)).tolist()
        assert rows.correct.tolist() == expected
    # the comparison has teeth: removing the MLPs does move the logits
    plain, _ = run_last(tiny_model, batch)
    assert not torch.allclose(plain, logits)


def test_grouping_prompts_by_length_keeps_their_order(tiny_model, capitals):
    one_pass = ablation.ffn_removal_sweep(tiny_model, capitals, per_item=True, prompts_per_pass=100)
    in_pairs = ablation.ffn_removal_sweep(tiny_model, capitals, per_item=True, prompts_per_pass=2)
    pd.testing.assert_frame_equal(one_pass, in_pairs)
    assert in_pairs["item"].tolist()[: len(capitals)] == capitals.items
    with pytest.raises(MechbookError, match="prompts_per_pass"):
        ablation.ffn_removal_sweep(tiny_model, capitals, prompts_per_pass=0)


def test_restarting_from_the_cut_equals_full_forwards(tiny_model, capitals):
    """The fast path (clean pass, then only the top layers per step) matches a full forward per step."""
    ks = ablation.top_down_layer_counts(tiny_model.n_layers)
    batch = tokenize(tiny_model, capitals.token_ids)
    fast = ablation.logits_without_top_mlps(tiny_model, batch, ks)
    assert fast.shape == (len(capitals), len(ks), tiny_model.d_vocab)
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    for i, k in enumerate(ks):
        full, _ = run_last(tiny_model, batch, fwd_hooks=[(c.hook_name, zero) for c in ablation.top_mlps(tiny_model, k)])
        assert torch.allclose(fast[:, i], full, atol=1e-4), (k, (fast[:, i] - full).abs().max())
    plain, _ = run_last(tiny_model, batch)
    assert torch.allclose(fast[:, 0], plain, atol=1e-5)  # k = 0 is the intact model
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    top = ablation.top_mlps(tiny_model, ks[2])
    by_hand, _ = run_last(tiny_model, batch, fwd_hooks=[(c.hook_name, zero) for c in top])
    assert torch.allclose(fast[:, 2], by_hand, atol=1e-4)


def test_removing_an_mlp_skips_its_write(tiny_model, capitals):
    """With MLP L removed the residual after block L is the residual after its attention."""
    batch = tokenize(tiny_model, capitals.token_ids)
    last = tiny_model.n_layers - 1
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    names = [f"blocks.{last}.hook_resid_mid", f"blocks.{last}.hook_resid_post"]
    _, cache = run_last(tiny_model, batch, names=names, fwd_hooks=[(f"blocks.{last}.hook_mlp_out", zero)])
    assert torch.equal(cache[names[0]], cache[names[1]])


def test_hooks_are_removed_afterwards(tiny_model, capitals):
    batch = tokenize(tiny_model, capitals.token_ids)
    before, _ = run_last(tiny_model, batch)
    hooks_before = _hook_count(tiny_model)
    ablation.ffn_removal_sweep(tiny_model, capitals)
    assert _hook_count(tiny_model) == hooks_before
    after, _ = run_last(tiny_model, batch)
    assert torch.equal(before, after)


def test_paired_prompts_share_items_and_answers(tiny_model):
    paired = ablation.paired_prompts("capitals", tiny_model, max_items=3, seed=1, n_shots=1)
    abstractive, extractive = paired
    assert abstractive.items == extractive.items and len(paired) == 3
    assert abstractive.answer_ids == extractive.answer_ids
    assert abstractive.variant == "abstractive" and extractive.variant == "extractive"
    assert all(e.endswith(a) and e != a for a, e in zip(abstractive.prompts, extractive.prompts))
    assert paired.counts["drawn"] == 3 and paired.counts["paired"] >= 3
    again = ablation.paired_prompts("capitals", tiny_model, max_items=3, seed=1, n_shots=1)
    assert again.abstractive.items == abstractive.items
    with pytest.raises(MechbookError, match="max_items"):
        ablation.paired_prompts("capitals", tiny_model, max_items=0, n_shots=1)


def test_collapse_summary_reads_the_curves():
    table = pd.DataFrame({
        "task": "t",
        "variant": ["abstractive"] * 3 + ["extractive"] * 3,
        "layers_removed": [0, 3, 6] * 2,
        "fraction_removed": [0.0, 0.5, 1.0] * 2,
        "accuracy": [0.8, 0.2, 0.0, 1.0, 0.9, 0.0],
    })
    summary = ablation.collapse_summary(table, at_fraction=0.5).set_index("variant")
    assert summary.loc["abstractive", "drop_at"] == pytest.approx(0.6)
    assert summary.loc["extractive", "drop_at"] == pytest.approx(0.1)
    # trapezoids of 1, 0.25, 0 and 1, 0.9, 0 over [0, 1]
    assert summary.loc["abstractive", "retained_area"] == pytest.approx(0.375)
    assert summary.loc["extractive", "retained_area"] == pytest.approx(0.7)
    with pytest.raises(MechbookError, match="k=0"):
        ablation.collapse_summary(table[table.layers_removed > 0])


def test_removal_counts_are_a_list_and_numpy_layer_counts_work(tiny_gpt2):
    batch = tokenize(tiny_gpt2, [[5, 6, 7, 8]])
    for ks, match in (([], "removes nothing"), (2, "list of MLP counts")):
        with pytest.raises(MechbookError, match=match):
            ablation.logits_without_top_mlps(tiny_gpt2, batch, ks)
    import numpy as np

    assert ablation.top_down_layer_counts(np.int64(6)) == ablation.top_down_layer_counts(6)
