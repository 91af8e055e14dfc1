"""Hooks, batching and the logit lens, checked against independent computations."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from mechbook.core import decoding
from mechbook.core.errors import MechbookError
from mechbook.core.runs import TokenBatch, run_from_layer, run_last, temporary_hooks, tokenize

PROMPTS = [
    "The capital of France is Paris. The capital of Poland is",
    "one two three",
    "Today I walk. Yesterday I walked. Today I jump. Yesterday I",
]


def test_right_padded_batch_matches_single_runs(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    logits, _ = run_last(tiny_model, batch)
    for i, prompt in enumerate(PROMPTS):
        alone, _ = run_last(tiny_model, tokenize(tiny_model, [prompt]))
        assert torch.allclose(logits[i], alone[0], atol=1e-5)


def test_last_logits_equal_full_forward(tiny_model):
    batch = tokenize(tiny_model, PROMPTS[:1])
    logits, _ = run_last(tiny_model, batch)
    with torch.inference_mode():
        full = tiny_model.hf_model(batch.input_ids).logits[0, -1]
    assert torch.allclose(logits[0], full, atol=1e-5)


def test_cache_holds_only_requested_hooks(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    _, cache = run_last(tiny_model, batch, names=names, last_only=True)
    assert set(cache) == set(names)
    assert cache["blocks.0.hook_resid_post"].shape == (3, tiny_model.d_model)
    assert cache["blocks.1.attn.hook_z"].shape == (3, tiny_model.n_heads, tiny_model.d_head)


def test_temporary_hooks_are_removed_even_on_error(tiny_model):
    batch = tokenize(tiny_model, PROMPTS[:1])
    before, _ = run_last(tiny_model, batch)

    def zero(act, hook):
        return torch.zeros_like(act)

    with pytest.raises(RuntimeError):
        with temporary_hooks(tiny_model, [("blocks.0.hook_mlp_out", zero)]):
            during, _ = run_last(tiny_model, batch)
            assert not torch.allclose(during, before)
            raise RuntimeError("boom")
    after, _ = run_last(tiny_model, batch)
    assert torch.equal(after, before)


def test_unknown_hook_name_suggests_close_ones(tiny_model):
    with pytest.raises(MechbookError, match="did you mean blocks.0.hook_resid_post"):
        run_last(tiny_model, tokenize(tiny_model, PROMPTS[:1]), names=["blocks.0.hook_resid_postt"])


def test_logit_lens_matches_hidden_states_through_norm_and_head(tiny_model):
    """Independent path: transformers' own hidden states -> its final norm -> lm_head -> softcap."""
    hf = tiny_model.hf_model
    batch = tokenize(tiny_model, PROMPTS[:1])
    names = decoding.resid_post_names(tiny_model)
    _, cache = run_last(tiny_model, batch, names=names, last_only=True)
    resid = decoding.stack_layers(cache, names)  # [1, layer, d]
    target = torch.tensor([5])
    lens = decoding.logit_lens(tiny_model, resid, {"t": target})
    with torch.inference_mode():
        out = hf(batch.input_ids, output_hidden_states=True)
        base = hf.base_model
        norm = base.ln_f if hasattr(base, "ln_f") else base.norm
        cap = getattr(hf.config, "final_logit_softcapping", None)
        for layer in range(tiny_model.n_layers):
            h = out.hidden_states[layer + 1][0, -1]
            if layer < tiny_model.n_layers - 1:  # the last entry is already normalised
                h = norm(h)
            logits = hf.lm_head(h)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            row = lens[lens.layer == layer].iloc[0]
            assert row["rank"] == int((logits >= logits[5]).sum())  # ties count against the target
            assert row["prob"] == pytest.approx(float(logits.softmax(-1)[5]), rel=1e-4, abs=1e-7)
        assert torch.allclose(out.logits[0, -1], decoding.unembed(tiny_model, resid[0, -1]), atol=1e-5)


def test_top_tokens_of_a_vector(tiny_model):
    direction = tiny_model.hf_model.get_output_embeddings().weight[7]
    table = decoding.top_tokens(tiny_model, direction, k=3, normalize=False)
    assert list(table["rank"]) == [1, 2, 3]
    assert table["logit"].is_monotonic_decreasing


def test_single_token_id_rejects_multi_token_answers(tiny_model):
    with pytest.raises(MechbookError, match="tokens for"):
        decoding.single_token_id(tiny_model, " Xylophonequartz")


@pytest.mark.slow
def test_gemma_logit_lens_last_layer_is_the_models_prediction(gemma):
    batch = tokenize(gemma, ["Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"])
    names = decoding.resid_post_names(gemma)
    logits, cache = run_last(gemma, batch, names=names, last_only=True)
    resid = decoding.stack_layers(cache, names)
    top = decoding.top_tokens_per_layer(gemma, resid[0], k=1)
    assert top[top.layer == gemma.n_layers - 1]["token"].item() == decoding.to_str(gemma, logits[0].argmax())
    assert top[top.layer == gemma.n_layers - 1]["token"].item() == " Warsaw"


# --- running from a layer -------------------------------------------------------------------------


def _check_run_from_layer(model, layers):
    batch = tokenize(model, ["one two three four five six seven eight nine ten January", "1 2 3 4", "Today I walk."])
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.n_layers)]
    full, cache = run_last(model, batch, names=names)
    for layer in layers:
        resid = cache[names[layer]] if layer < model.n_layers else None
        if resid is None:  # from the end: only the final norm and unembedding
            _, end = run_last(model, batch, names=["ln_final.hook_in"])
            resid = end["ln_final.hook_in"]
        logits, _ = run_from_layer(model, resid, layer, batch.last_pos)
        assert torch.equal(logits, full), (model.name, layer, (logits - full).abs().max())


def test_run_from_layer_equals_full_forward(tiny_model):
    _check_run_from_layer(tiny_model, range(tiny_model.n_layers + 1))


@pytest.mark.slow
def test_run_from_layer_equals_full_forward_gemma(gemma):
    _check_run_from_layer(gemma, [0, 1, 5, 6, 11, 17])


def test_run_from_layer_hooks_and_cache(tiny_model):
    batch = tokenize(tiny_model, ["1 2 3 4 5", "one two three"])
    _, cache = run_last(tiny_model, batch, names=["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"])
    fired = []
    hooks = [("blocks.0.attn.hook_z", lambda a, hook: fired.append(0)),
             ("blocks.2.attn.hook_z", lambda a, hook: fired.append(2))]
    _, got = run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 1, batch.last_pos, fwd_hooks=hooks,
                            names=["blocks.2.attn.hook_z"])
    assert fired == [2]
    assert torch.allclose(got["blocks.2.attn.hook_z"], cache["blocks.2.attn.hook_z"], atol=1e-6)
    with pytest.raises(MechbookError, match="before layer 1"):
        run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 1, batch.last_pos, names=["blocks.0.attn.hook_z"])
    with pytest.raises(MechbookError, match="out of range"):
        run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 7, batch.last_pos)


def test_run_from_layer_tokens_restricts_the_logits(tiny_model):
    batch = tokenize(tiny_model, ["1 2 3 4 5", "one two three"])
    full, cache = run_last(tiny_model, batch, names=["blocks.1.hook_resid_pre"])
    tokens = torch.tensor([5, 17, 42])
    part, _ = run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 1, batch.last_pos, tokens=tokens)
    assert torch.allclose(part[:, tokens], full[:, tokens], atol=1e-5)
    assert part.isnan().sum() == part.numel() - 2 * len(tokens)


def test_run_layers_stop_gives_the_residual_entering_that_block(tiny_model):
    from mechbook.core.architectures import run_layers
    from mechbook.core.runs import LocalRunner

    batch = tokenize(tiny_model, ["1 2 3 4 5", "one two three"])
    names = [f"blocks.{l}.hook_resid_pre" for l in range(tiny_model.n_layers)] + ["ln_final.hook_in"]
    _, cache = run_last(tiny_model, batch, names=names)
    generic = dataclasses.replace(tiny_model, runner=LocalRunner(fast_loops=False))
    for model in (tiny_model, generic):
        with torch.inference_mode():
            for start in range(tiny_model.n_layers):
                for stop in range(start, tiny_model.n_layers + 1):
                    got = run_layers(model, cache[names[start]], start, stop=stop)
                    # right padding: compare the real positions only
                    for row, n in enumerate(batch.lengths.tolist()):
                        assert torch.allclose(got[row, :n], cache[names[stop]][row, :n], atol=1e-5), (start, stop)
            with pytest.raises(MechbookError, match="do not lie"):
                run_layers(model, cache[names[1]], 2, stop=1)


def test_run_joining_equals_one_run_from_layer_per_group(tiny_model):
    from mechbook.core.interventions import edit_hooks, zero_ablation
    from mechbook.core.names import Component
    from mechbook.core.runs import run_joining

    batch = tokenize(tiny_model, ["1 2 3 4 5", "one two three", "a b c d e f"])
    n, top = len(batch), tiny_model.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(top)]
    _, cache = run_last(tiny_model, batch, names=names)
    joins = [0, 1, 1, top - 1]  # groups join at these layers; each zero-ablates head 1 of its own layer
    edits = [e for g, l in enumerate(joins)
             for e in zero_ablation([Component("head", l, 1)], rows=slice(g * n, (g + 1) * n))]
    resid = [cache[names[l]] for l in joins]
    got = run_joining(tiny_model, list(zip(joins, resid)), batch.last_pos, fwd_hooks=edit_hooks(edits))
    for g, l in enumerate(joins):
        own = zero_ablation([Component("head", l, 1)])
        want, _ = run_from_layer(tiny_model, resid[g], l, batch.last_pos, fwd_hooks=edit_hooks(own))
        assert torch.allclose(got[g * n : (g + 1) * n], want, atol=1e-5), (g, l)
    with pytest.raises(MechbookError, match="in order of their layers"):
        run_joining(tiny_model, [(1, resid[1]), (0, resid[0])], batch.last_pos)
    with pytest.raises(MechbookError, match="no rows"):
        run_joining(tiny_model, [], batch.last_pos)


def test_inside_mlp_names_the_layer_of_hooks_within_an_mlp():
    from mechbook.core.names import act_name, inside_mlp

    assert inside_mlp("blocks.3.mlp.hook_in") == 3 and inside_mlp("blocks.12.mlp.out.hook_out") == 12
    assert inside_mlp(act_name("mlp_out", 3)) is None and inside_mlp(act_name("z", 3)) is None
    assert inside_mlp("blocks.x.mlp.hook_in") is None and inside_mlp("ln_final.hook_in") is None


def test_inside_attention_names_the_layer_of_hooks_before_the_head_outputs():
    from mechbook.core.names import act_name, inside_attention

    assert inside_attention(act_name("q", 3)) == 3 and inside_attention(act_name("pattern", 12)) == 12
    assert inside_attention("blocks.4.attn.k.hook_out") == 4 and inside_attention("blocks.4.attn.hook_rot_q") == 4
    assert inside_attention(act_name("z", 3)) is None and inside_attention("blocks.3.attn.hook_in") is None
    assert inside_attention(act_name("attn_out", 3)) is None and inside_attention("blocks.3.mlp.hook_in") is None


# --- ranks, degenerate logits and bad input (issue 25) ---------------------------------------------


def test_ties_rank_against_the_answer():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 2.0, 0.0]])
    assert decoding.token_ranks(logits, torch.tensor([1, 0])).tolist() == [2, 1]  # tied top: rank 2; unique top: 1
    assert decoding.token_ranks(logits, torch.tensor([2, 2])).tolist() == [2, 2]
    assert decoding.token_ranks(logits, torch.tensor([3, 3])).tolist() == [4, 4]  # the last token: rank = vocabulary


def test_token_ranks_refuse_rows_where_every_logit_is_equal():
    with pytest.raises(MechbookError, match="all 10 tokens the same logit"):
        decoding.token_ranks(torch.zeros(3, 10), torch.tensor([1, 2, 3]))
    logits = torch.randn(3, 10)
    logits[2] = 7.0  # one degenerate row among good ones is enough
    with pytest.raises(MechbookError, match="1 of 3 rows \\(the first is row 2\\).*smaller scale"):
        decoding.token_ranks(logits, torch.tensor([1, 2, 3]))


def test_decoding_a_vector_the_final_norm_sends_to_zero_is_refused(tiny_model):
    """The final norm of a zero (or overflowing) residual is 0, so every logit is equal: nothing to rank or list."""
    zero = torch.zeros(tiny_model.d_model)
    with pytest.raises(MechbookError, match="same logit"):
        decoding.top_tokens(tiny_model, zero)
    with pytest.raises(MechbookError, match="same logit"):
        decoding.logit_lens(tiny_model, zero.expand(1, 2, -1), {"t": torch.tensor([3])})
    with pytest.raises(MechbookError, match="same logit"):
        decoding.top_tokens_per_layer(tiny_model, zero.expand(2, -1))
    huge = 1e20 * torch.randn(1, 2, tiny_model.d_model)  # float32 overflows inside the norm
    with pytest.raises(MechbookError, match="non-finite|same logit"):
        decoding.logit_lens(tiny_model, huge, {"t": torch.tensor([3])})


def test_top_tokens_per_layer_refuses_k_below_one(tiny_model):
    resid = torch.randn(2, tiny_model.d_model)
    for k in (0, -1):
        with pytest.raises(MechbookError, match="top tokens per layer asked for"):
            decoding.top_tokens_per_layer(tiny_model, resid, k=k)
    assert len(decoding.top_tokens_per_layer(tiny_model, resid, k=np.int64(2))) == 4


def test_logit_lens_refuses_chunk_zero(tiny_model):
    resid = torch.randn(2, tiny_model.n_layers, tiny_model.d_model)
    with pytest.raises(MechbookError, match="chunk must be at least 1"):
        decoding.logit_lens(tiny_model, resid, {"t": torch.tensor([3, 4])}, chunk=0)
    assert len(decoding.logit_lens(tiny_model, resid, {"t": [3, 4]}, chunk=1)) == 2 * tiny_model.n_layers


@pytest.mark.parametrize("logits, ids, message", [
    (torch.randn(2, 10), torch.tensor([[1], [2]]), "one target id per row"),
    (torch.randn(2, 10), torch.tensor([1, 2, 3]), "one target id per row"),
    (torch.randn(10), torch.tensor([1, 2]), "one target id per row"),
    (torch.tensor(1.0), torch.tensor(1), "float tensor of logits"),
    (np.zeros((2, 10)), torch.tensor([1, 2]), "float tensor of logits"),
    (torch.randn(2, 10), [[1, 2], [3]], "must be token ids"),
    (torch.randn(2, 10), torch.tensor([1.7, 2.0]), "integer token ids"),
    (torch.randn(2, 10), torch.tensor([-1, 2]), "negative token id -1"),
    (torch.randn(2, 10), torch.tensor([1, 10]), "past the vocabulary of 10"),
])
def test_token_ranks_with_mismatched_shapes_or_bad_ids_is_one_line(logits, ids, message):
    with pytest.raises(MechbookError, match=message):
        decoding.token_ranks(logits, ids)


def test_token_ids_outside_the_vocabulary_are_refused_before_the_run(tiny_model):
    past = tiny_model.d_vocab
    batch = TokenBatch(torch.tensor([[5, past, 7]]), torch.tensor([3]))
    with pytest.raises(MechbookError, match=f"token id {past} is outside .* vocabulary of {past} tokens"):
        run_last(tiny_model, batch)
    with pytest.raises(MechbookError, match="token id -3 is outside"):
        tokenize(tiny_model, [[5, -3, 7]])
    with pytest.raises(MechbookError, match="token id 1.7 is not an integer"):
        tokenize(tiny_model, [[5, 1.7]])
    assert tokenize(tiny_model, [[np.int64(5), 6]]).tokens(0) == [5, 6]


def test_run_from_layer_refuses_a_negative_last_position(tiny_model):
    batch = tokenize(tiny_model, PROMPTS[1:3])  # of different lengths: -1 would read the shorter one's padding
    name = "blocks.1.hook_resid_pre"
    full, cache = run_last(tiny_model, batch, names=[name])
    with pytest.raises(MechbookError, match="last position -1 is negative.*pass batch.last_pos"):
        run_from_layer(tiny_model, cache[name], 1, [-1, 2])
    with pytest.raises(MechbookError, match="integer positions"):
        run_from_layer(tiny_model, cache[name], 1, torch.tensor([1.0, 2.0]))
    logits, _ = run_from_layer(tiny_model, cache[name], 1, batch.last_pos.tolist())  # a list works too
    assert torch.equal(logits, full)


def test_hooks_of_the_wrong_signature_or_return_value_are_one_line(tiny_model):
    batch = tokenize(tiny_model, PROMPTS[:1])
    name = "blocks.0.hook_mlp_out"

    def two_args(act, h):
        return act

    for fn in (lambda act: act, two_args):
        with pytest.raises(MechbookError, match=r"cannot be called .* hook\(tensor, hook\) -> tensor \| None"):
            run_last(tiny_model, batch, fwd_hooks=[(name, fn)])
    for fn, message in ((lambda act, hook: (act,), "returned a tuple"), (lambda act, hook: act[:, :1], "of shape"),
                        (lambda act, hook: 0.0, "returned a float")):
        with pytest.raises(MechbookError, match=message + ".*hook\\(tensor, hook\\)"):
            run_last(tiny_model, batch, fwd_hooks=[(name, fn)])
    with pytest.raises(MechbookError, match="not a function"):
        run_last(tiny_model, batch, fwd_hooks=[(name, "zero")])
    with pytest.raises(MechbookError, match=r"\(hook name, function\) pairs"):
        run_last(tiny_model, batch, fwd_hooks=[name])
    with pytest.raises(MechbookError, match="cannot be called"):
        with temporary_hooks(tiny_model, [(name, lambda act: act)]):
            pass
    before, _ = run_last(tiny_model, batch)
    for fn in (lambda act, hook=None: act * 1, lambda *args, **kwargs: None):  # what transformer-lens accepts works
        assert torch.allclose(run_last(tiny_model, batch, fwd_hooks=[(name, fn)])[0], before)


# --- bad input: one-line errors, never a raw traceback or a plausible number -------------------------


def test_tokenize_refuses_what_is_not_a_list_of_prompts_of_one_kind(tiny_gpt2):
    for bad in (None, 123, (p for p in ["a"])):
        with pytest.raises(MechbookError, match="takes a list of prompts"):
            tokenize(tiny_gpt2, bad)
    with pytest.raises(MechbookError, match="bytes prompt"):
        tokenize(tiny_gpt2, [b"hello"])  # would be read as the token ids 104, 101, ...
    for mixed in (["hello", [5, 6]], [[5, 6], "hello"]):
        with pytest.raises(MechbookError, match="another kind than prompt 0"):
            tokenize(tiny_gpt2, mixed)


def test_a_token_batch_whose_lengths_do_not_fit_its_ids_is_refused(tiny_gpt2):
    batch = tokenize(tiny_gpt2, [[5, 6, 7], [8, 9, 10]])
    with pytest.raises(MechbookError, match="expected a TokenBatch"):
        run_last(tiny_gpt2, batch.input_ids)
    for lengths, match in (([0, 3], "lengths must lie in 1..3"),  # length 0 would read position -1, a pad
                           ([4, 3], "lengths must lie in 1..3"), ([3], "one integer per prompt"),
                           ([3.0, 3.0], "one integer per prompt")):
        with pytest.raises(MechbookError, match=match):
            run_last(tiny_gpt2, TokenBatch(batch.input_ids, torch.tensor(lengths)))


def test_restricted_unembedding_ids_are_checked(tiny_gpt2):
    batch = tokenize(tiny_gpt2, [[5, 6, 7]])
    vocab = tiny_gpt2.d_vocab
    for tokens, match in ((torch.tensor([-1, 3]), "negative token id"),  # would fill column vocab-1
                          (torch.tensor([vocab]), "past the vocabulary"), (torch.tensor([3.7]), "integer token ids"),
                          (torch.tensor([], dtype=torch.long), "tokens= is empty")):
        with pytest.raises(MechbookError, match=match):
            run_last(tiny_gpt2, batch, tokens=tokens)
    with pytest.raises(MechbookError, match="wrap it in a list"):  # "no hook named 'b'" before
        run_last(tiny_gpt2, batch, names="blocks.0.hook_resid_pre")
    logits, _ = run_last(tiny_gpt2, batch, tokens=[3, 4])
    assert torch.isfinite(logits[:, [3, 4]]).all() and logits[:, 5].isnan().all()


def test_residual_vectors_of_another_type_or_dtype_are_refused(tiny_gpt2):
    batch = tokenize(tiny_gpt2, [[5, 6, 7]])
    resid = torch.zeros(1, 3, tiny_gpt2.d_model)
    for bad in (resid.long(), resid.double(), resid.half()):
        with pytest.raises(MechbookError, match="pass it as .to"):
            run_from_layer(tiny_gpt2, bad, 0, batch.last_pos)
    for bad in (resid.numpy(), resid.tolist()):
        with pytest.raises(MechbookError, match="must be a torch tensor"):
            run_from_layer(tiny_gpt2, bad, 0, batch.last_pos)
    with pytest.raises(MechbookError, match="residual vectors"):
        decoding.unembed(tiny_gpt2, torch.zeros(tiny_gpt2.d_model + 1))
    with pytest.raises(MechbookError, match="pass it as .to"):
        decoding.unembed(tiny_gpt2, torch.zeros(tiny_gpt2.d_model, dtype=torch.long))
    with pytest.raises(MechbookError, match="must be a torch tensor"):
        decoding.top_tokens(tiny_gpt2, [0.1] * tiny_gpt2.d_model)
    with pytest.raises(MechbookError, match="pass it as .to"):
        decoding.top_tokens(tiny_gpt2, torch.ones(tiny_gpt2.d_model, dtype=torch.long))


def test_a_hook_returning_integers_is_refused(tiny_gpt2):
    from mechbook.core.names import act_name

    batch = tokenize(tiny_gpt2, [[5, 6, 7]])
    with pytest.raises(MechbookError, match="returned torch.int64 values"):
        run_last(tiny_gpt2, batch, fwd_hooks=[(act_name("mlp_out", 0), lambda act, hook: act.long())])


def test_run_variants_checks_its_count_functions_and_reduction(tiny_gpt2):
    from mechbook.core.runs import run_variants

    batch = tokenize(tiny_gpt2, [[5, 6, 7], [8, 9, 10]])
    reduce = lambda logits: logits[..., 0]  # noqa: E731
    for n, match in ((0, "at least 1"), (-1, "at least 1"), (2.5, "not an integer"), ("2", "not an integer")):
        with pytest.raises(MechbookError, match=match):
            run_variants(tiny_gpt2, batch, n, lambda first, count: [], reduce)
    with pytest.raises(MechbookError, match="both functions"):
        run_variants(tiny_gpt2, batch, 1, None, reduce)
    for bad in (lambda logits: logits.sum(), lambda logits: logits[0]):  # a scalar; the prompts' axis first
        with pytest.raises(MechbookError, match="leading axes"):
            run_variants(tiny_gpt2, batch, 2, lambda first, count: [], bad)


def test_decoding_helpers_refuse_bad_ids_and_empty_input(tiny_gpt2):
    d, vocab = tiny_gpt2.d_model, tiny_gpt2.d_vocab
    resid = torch.randn(2, tiny_gpt2.n_layers, d)
    for targets in ({}, [torch.tensor([1, 2])]):
        with pytest.raises(MechbookError, match="targets as a dict"):
            decoding.logit_lens(tiny_gpt2, resid, targets)
    with pytest.raises(MechbookError, match="no prompt or no layer"):
        decoding.logit_lens(tiny_gpt2, resid[:0], {"t": torch.tensor([], dtype=torch.long)})
    with pytest.raises(MechbookError, match="at least one"):
        decoding.top_tokens_per_layer(tiny_gpt2, torch.randn(0, d))
    for ids, match in (([vocab, 1], "past the vocabulary"), ([-1, 1], "negative token id"), ([1.7, 1.0], "integer")):
        with pytest.raises(MechbookError, match=match):
            decoding.token_logits(tiny_gpt2, torch.randn(2, d), torch.tensor(ids))
    for token in (vocab + 100, -1):  # '' and an OverflowError before
        with pytest.raises(MechbookError, match="outside"):
            decoding.to_str(tiny_gpt2, token)
    with pytest.raises(MechbookError, match="as a str"):
        decoding.single_token_id(tiny_gpt2, None)
    with pytest.raises(MechbookError, match="run with names="):
        decoding.stack_layers({}, ["blocks.0.hook_resid_post"])
