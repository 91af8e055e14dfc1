"""Transplanting o (Paper A §4.1): the edits, the runs from a layer against full forwards, targets, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import slow_twins
from mechbook.core import decoding
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import Edit, add_vector, edit_hooks, position_mask
from mechbook.core.names import Component, act_name
from mechbook.core.runs import run_last, tokenize
from mechbook.papers.vector_arithmetic import ffn_update as ffn
from mechbook.papers.vector_arithmetic import transplant
from mechbook.papers.vector_arithmetic.prompts import build_prompts

PROMPTS = [
    "The capital of France is Paris. The capital of Poland is",
    "one two three",
    "Today I walk. Yesterday I walked. Today I jump. Yesterday I",
]
POLAND = "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_subtracting_own_o_equals_zeroing_the_mlp_at_the_last_position(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    layer = 1

    def zero_last(act, hook):
        act = act.clone()
        act[torch.arange(len(batch)), batch.last_pos] = 0.0
        return act

    expected, _ = run_last(tiny_model, batch, fwd_hooks=[(act_name("mlp_out", layer), zero_last)])
    got = slow_twins.transplant(tiny_model, batch, -run.o(layer), layer, method="add")
    assert torch.allclose(got, expected, atol=1e-4)


def test_adding_a_vector_touches_only_the_last_position(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    name = act_name("resid_post", 0)
    _, clean = run_last(tiny_model, batch, names=[name])
    edited = add_vector(clean[name], torch.ones(tiny_model.d_model), position_mask(batch, "last", skip_bos=False))
    diff = (edited - clean[name]).abs().sum(-1)  # [batch, pos]
    for i in range(len(batch)):
        last = int(batch.last_pos[i])
        assert diff[i, last] > 0
        assert diff[i, :last].max() < 1e-5


def test_replacing_mlp_outputs_writes_the_constant_from_the_start_layer_on(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    o = torch.randn(tiny_model.d_model)
    names = ffn.mlp_out_names(tiny_model)
    mask = position_mask(batch, "all", skip_bos=tiny_model.prepend_bos)
    edits = [Edit(Component("mlp", l), "replace", o, mask=mask) for l in range(1, tiny_model.n_layers)]
    hooks = edit_hooks(edits)
    assert [n for n, _ in hooks] == names[1:]
    _, cache = run_last(tiny_model, batch, names=names, fwd_hooks=hooks)
    first = 1 if tiny_model.prepend_bos else 0
    for i in range(len(batch)):
        real = slice(first, int(batch.lengths[i]))
        for layer in range(1, tiny_model.n_layers):
            assert torch.allclose(cache[names[layer]][i, real], o.expand_as(cache[names[layer]][i, real]))
        assert not torch.allclose(cache[names[0]][i, real], o.expand_as(cache[names[0]][i, real]))
    if tiny_model.prepend_bos:  # BOS keeps its own MLP output
        assert not torch.allclose(cache[names[1]][0, 0], o)


def test_transplants_that_change_nothing_leave_the_logits_alone(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    last = tiny_model.n_layers - 1
    same = [transplant.Transplant("zero", torch.zeros(tiny_model.d_model), 1, "add"),
            transplant.Transplant("own", run.o(last), last, "replace", positions="last")]
    baseline, after = transplant.transplant_logits(tiny_model, batch, same)
    for logits in after:
        assert torch.allclose(logits, run.logits, atol=1e-4)


def test_transplant_ranks_and_failure_rate(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    target = run.logits.argmin(-1)  # the least likely token: a large push must raise it
    o = 50.0 * tiny_model.hf_model.get_output_embeddings().weight[target].detach().mean(0)
    baseline, (after,) = transplant.transplant_logits(
        tiny_model, batch, [transplant.Transplant("add", o, tiny_model.n_layers - 1, "add")])
    table = transplant._rank_table(tiny_model, baseline, after, target)
    assert (table.rank_before == tiny_model.d_vocab).all()
    assert list(table.columns) == ["prompt", "rank_before", "rank_after", "top_after", "improved", "top1_after"]
    table = table.assign(task="t", domain="in-domain", method="add")
    summary = transplant.transplant_summary(table)
    assert summary.loc[0, "failure_rate"] == pytest.approx(1.0 - table.improved.mean())
    assert summary.loc[0, "n"] == 3


def test_transplant_logits_from_a_layer_equal_full_forwards(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    torch.manual_seed(0)
    o = torch.randn(tiny_model.d_model)
    last = tiny_model.n_layers - 1
    transplants = [
        transplant.Transplant("add", o, 1, method="add", scale=2.0),
        transplant.Transplant("add at the last layer", torch.randn(3, tiny_model.d_model), last, method="add"),
        transplant.Transplant("replace", o, 1, method="replace"),
        transplant.Transplant("replace last position", o, 0, method="replace", positions="last"),
    ]
    baseline, after = transplant.transplant_logits(tiny_model, batch, transplants, batch_size=2)
    assert torch.allclose(baseline, run.logits, atol=1e-4)
    for t, logits in zip(transplants, after):
        full = slow_twins.transplant(tiny_model, batch, t.o, t.layer, method=t.method, positions=t.positions,
                                     scale=t.scale)
        assert torch.allclose(logits, full, atol=1e-4), t.label
        assert not torch.allclose(logits, baseline, atol=1e-4), t.label


def test_transplant_input_errors(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)

    def run(o, layer, **kwargs):
        return transplant.transplant_logits(tiny_model, batch, [transplant.Transplant("t", o, layer, **kwargs)])

    with pytest.raises(MechbookError, match=f"d_model={tiny_model.d_model}"):
        run(torch.zeros(tiny_model.d_model + 1), 0)
    with pytest.raises(MechbookError, match="out of range"):
        run(torch.zeros(tiny_model.d_model), tiny_model.n_layers)
    with pytest.raises(MechbookError, match="unknown transplant method"):
        run(torch.zeros(tiny_model.d_model), 0, method="swap")
    with pytest.raises(MechbookError, match="unknown positions"):
        run(torch.zeros(tiny_model.d_model), 0, positions="first")
    with pytest.raises(MechbookError, match="vectors for 3 prompts"):
        run(torch.zeros(2, tiny_model.d_model), 0)
    with pytest.raises(MechbookError, match="non-finite"):
        run(torch.full((tiny_model.d_model,), float("nan")), 0)


@pytest.fixture(scope="module")
def real_tokenizer():
    """A packaged model's tokenizer from the mechbook cache (no-context prompts need real single-token words)."""
    from mechbook.store.cache import cached_model_dir

    path = cached_model_dir("smollm2-135m")
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no cached tokenizer at {path}; run mechbook.load_model('smollm2-135m') once")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_no_context_targets_leave_out_the_items_o_came_from(real_tokenizer):
    everything = build_prompts("past_tense", real_tokenizer, variant="no_context")
    exclude = everything.items[:2]
    targets = transplant.no_context_targets(real_tokenizer, "past_tense", exclude=exclude)
    assert not set(exclude) & set(targets.items)
    assert len(targets) == len(everything) - 2
    same = dict(zip(everything.items, everything.prompts))
    assert all(same[item] == prompt for item, prompt in zip(targets.items, targets.prompts))
    irregular = transplant.no_context_targets(real_tokenizer, "past_tense", groups=["irregular"], n=5)
    assert len(irregular) == 5 and set(irregular.groups) == {"irregular"}
    with pytest.raises(MechbookError, match="no no-context prompts"):
        transplant.no_context_targets(real_tokenizer, "past_tense", exclude=everything.items)


@pytest.mark.slow
def test_gemma_capital_o_promotes_beijing_without_context(gemma):
    batch = tokenize(gemma, [POLAND])
    run = ffn.capture_mlp_outputs(gemma, batch)
    warsaw, poland = decoding.single_token_id(gemma, " Warsaw"), decoding.single_token_id(gemma, " Poland")
    layer = int(ffn.function_application_layers(ffn.mlp_effects(gemma, run, [warsaw], [poland])).layer[0])
    china = tokenize(gemma, ["table mug free China table mug free China table mug free"])
    beijing = decoding.single_token_id(gemma, " Beijing")
    baseline, (after,) = transplant.transplant_logits(
        gemma, china, [transplant.Transplant("replace", run.o(layer)[0], layer, "replace")])
    table = transplant._rank_table(gemma, baseline, after, torch.tensor([beijing]))
    assert table.rank_after[0] < table.rank_before[0]


@pytest.mark.parametrize("scale", [1e20, float("inf"), float("nan"), True])
def test_a_transplant_weight_outside_the_shared_range_is_refused(scale):
    """Far past the range, float32 overflows in the final norm: every logit ties and every rank reads 1."""
    with pytest.raises(MechbookError, match=r"^scale = .* is out of range: it must be a weight \(>= -100 and <= 100\)"):
        transplant.Transplant("add", torch.ones(4), 1, scale=scale)
    assert transplant.Transplant("add", torch.ones(4), 1, scale=np.float32(2.0)).scale == 2.0


def test_transplants_are_checked_and_a_negative_layer_counts_from_the_end(tiny_gpt2):
    batch = tokenize(tiny_gpt2, [[5, 6, 7, 8], [9, 10, 11, 12]])
    o = torch.randn(tiny_gpt2.d_model)
    for bad, match in (([], "non-empty list of Transplant"), (transplant.Transplant("o", o, 0), "list of Transplant"),
                       (["o"], "Transplant objects only")):
        with pytest.raises(MechbookError, match=match):
            transplant.transplant_logits(tiny_gpt2, batch, bad)
    with pytest.raises(MechbookError, match="unknown transplant method"):
        transplant.Transplant("o", o, 0, "multiply")
    with pytest.raises(MechbookError, match="label"):
        transplant.Transplant(None, o, 0)
    last = tiny_gpt2.n_layers - 1
    for method in ("add", "replace"):
        negative = transplant.transplant_logits(tiny_gpt2, batch, [transplant.Transplant("o", o, -1, method)])[1][0]
        counted = transplant.transplant_logits(tiny_gpt2, batch, [transplant.Transplant("o", o, last, method)])[1][0]
        assert torch.equal(negative, counted)
