"""Paper B component analyses: member positions, OV successor scores, attention, single ablations, lens turns."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from mechbook.core import decoding
from mechbook.core import patching as P
from mechbook.core.architectures import kv_head, ov_circuit
from mechbook.papers.seqcont import components as S
from mechbook.core.errors import MechbookError
from mechbook.core.runs import run_last, temporary_hooks
from mechbook.papers.seqcont import sequences as sc


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sc.SeqPromptWarning)
        return fn(*args, **kwargs)


def _prompts(model, corrupted=None, n=6):
    """Number-word prompts the tiny tokenizer reads ("one two three" -> " four")."""
    return _quiet(sc.make_prompts, "numwords", template="{member}", n_prompts=n, n_members=3, starts=[1, 2, 3],
                  corrupted=corrupted, tokenizer=model.tokenizer)


# --- member positions -----------------------------------------------------------------------------


def test_member_positions_point_at_the_members(tiny_model):
    prompts = _prompts(tiny_model)
    frame = S.member_token_frame(tiny_model, prompts)
    assert len(frame) == 3 * len(prompts)
    for row in frame.itertuples():
        token = tiny_model.tokenizer.decode([row.token_id]).strip()
        assert row.member.startswith(token) and token
    # successors: the next shown member, and the answer after the last one
    last = frame[frame["index"] == 2]
    assert list(last["next_token_id"]) == prompts.corr_id


def test_member_positions_with_paper_templates_on_real_tokenizers():
    from mechbook.store.cache import cached_model_dir

    path = cached_model_dir("gemma3-270m")
    if not path.exists():
        pytest.skip("gemma3-270m is not in the model cache")
    from transformers import AutoTokenizer

    fake = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(path)), name="gemma-tokenizer")
    for task, template in [("numerals", "done"), ("months", "names"), ("numwords", "lost")]:
        prompts = _quiet(sc.tokenize_prompts, sc.load_paper_prompts(task, template).select(range(16)), fake.tokenizer)
        for members, ids, pos in zip(prompts.members, prompts.prompt_ids, S.member_positions(fake, prompts)):
            tokens = [fake.tokenizer.decode([ids[p]]).strip() for p in pos]
            assert all(t and m.startswith(t) for t, m in zip(tokens, members)), (tokens, members)


def test_member_search_skips_fillers_that_look_like_members():
    # "April born in May": the name April is not the member April
    text = "April born in March. Tom born in April. April born in May. Ann born in June. Bo born in"
    starts = S._member_char_starts(text, ("March", "April", "May", "June"), "names")
    assert [text[s : s + 5] for s in starts] == ["March", "April", "May. ", "June."]
    assert starts[1] == text.index("in April") + 3


# --- OV circuits --------------------------------------------------------------------------------------


def _attn_out_with_heads(model, ids, layer, keep):
    """Layer ``layer``'s attention output when only heads ``keep`` write (the others' z zeroed), and its input."""
    stored = {}

    def zero_others(z, hook):
        z = z.clone()
        for h in range(model.n_heads):
            if h not in keep:
                z[:, :, h] = 0.0
        return z

    def save(name):
        def hook(act, hook):
            stored[name] = act.detach().clone()

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_z", zero_others),
             (f"blocks.{layer}.hook_attn_out", save("out")), (f"blocks.{layer}.hook_resid_pre", save("in"))]
    with torch.inference_mode(), temporary_hooks(model, hooks):
        model.bridge(ids)
    return stored["out"][0, 0], stored["in"][0, 0]


def test_ov_circuit_equals_the_heads_contribution_on_a_single_token(tiny_model):
    # One token attends only to itself: the head writes exactly OV(its input).
    token = tiny_model.tokenizer(" two", add_special_tokens=False).input_ids[0]
    ids = torch.tensor([[token]], device=tiny_model.device)
    for layer in range(tiny_model.n_layers):
        none, _ = _attn_out_with_heads(tiny_model, ids, layer, keep=[])
        for head in range(tiny_model.n_heads):
            out, resid = _attn_out_with_heads(tiny_model, ids, layer, keep=[head])
            ours = ov_circuit(tiny_model, layer, head)(resid)
            assert torch.allclose(ours, out - none, atol=1e-5), (layer, head, float((ours - out + none).abs().max()))


def test_grouped_query_heads_share_their_value_head(tiny_model):
    group = tiny_model.n_heads // tiny_model.n_kv_heads
    assert [kv_head(tiny_model, h) for h in range(tiny_model.n_heads)] == [h // group for h in range(tiny_model.n_heads)]
    if group > 1:
        a, b = ov_circuit(tiny_model, 0, 0), ov_circuit(tiny_model, 0, 1)
        assert torch.equal(a.W_V, b.W_V) and not torch.equal(a.W_O, b.W_O)


def test_successor_ranks_follow_the_ov_output_through_the_unembedding(tiny_model):
    prompts = _prompts(tiny_model)
    heads = [P.Component("head", 1, 0), P.Component("head", tiny_model.n_layers - 1, tiny_model.n_heads - 1)]
    scores = S.successor_scores(tiny_model, prompts, heads=heads, k=5)
    table, vectors = S.member_vectors(tiny_model, prompts)
    assert len(scores) == len(heads) * len(table)
    for j, head in enumerate(heads):
        logits = decoding.unembed(tiny_model, ov_circuit(tiny_model, head.layer, head.head)(vectors))
        for m, row in table.iterrows():
            spellings = S._spellings(tiny_model, row["next"], row["next_token_id"])
            hand = min(int(decoding.token_ranks(logits[m], torch.tensor(t))) for t in spellings)
            ours = scores.iloc[j * len(table) + m]
            assert ours["rank_next"] == hand
            words = dict.fromkeys([*table["member"], *table["next"]])
            ids = {w: S._spellings(tiny_model, w, (table.loc[table.member == w, "token_id"].tolist()
                                                   or table.loc[table.next == w, "next_token_id"].tolist())[0]) for w in words}
            assert ours["top_member"] == max(words, key=lambda w: float(logits[m, ids[w]].max()))
            assert ours["next_top_among_members"] == (ours["top_member"] == row["next"])
    assert (scores["next_in_top_k"] == (scores["rank_next"] <= 5)).all()
    summary = S.successor_summary(scores.assign(task="numwords"))
    assert len(summary) == len(heads) and summary["successor_top_k"].between(0, 1).all()


def test_member_vectors_average_the_residual_at_member_positions(tiny_model):
    prompts = _prompts(tiny_model)
    table, vectors = S.member_vectors(tiny_model, prompts, source="blocks.0.hook_resid_pre")
    frame = S.member_token_frame(tiny_model, prompts)
    first = table.iloc[0]
    rows = frame[(frame["member"] == first["member"]) & frame["whole"]]
    _, cache = run_last(tiny_model, S.batch_of(tiny_model, prompts), names=["blocks.0.hook_resid_pre"])
    hand = torch.stack([cache["blocks.0.hook_resid_pre"][r.prompt, r.position] for r in rows.itertuples()]).mean(0)
    assert torch.allclose(vectors[0], hand, atol=1e-5)
    assert first["occurrences"] == len(rows)


# --- attention ------------------------------------------------------------------------------------------


def test_last_position_attention_shapes_and_values(tiny_model):
    prompts = concat = S.concat_prompts([_prompts(tiny_model, n=3), _quiet(
        sc.make_prompts, "numwords", template="{member}", n_prompts=2, n_members=4, starts=[1],
        tokenizer=tiny_model.tokenizer)])
    batch = S.batch_of(tiny_model, concat)
    heads = [P.Component("head", 0, 1), P.Component("head", 2, 3)]
    pattern = S.last_position_attention(tiny_model, batch, heads)
    assert pattern.shape == (len(prompts), len(heads), batch.input_ids.shape[1])
    assert torch.allclose(pattern.sum(-1), torch.ones(len(prompts), len(heads)), atol=1e-5)
    for i, n in enumerate(batch.lengths.tolist()):
        assert (pattern[i, :, n:] == 0).all()
    with torch.inference_mode():
        _, cache = tiny_model.bridge.run_with_cache(batch.input_ids[:1, : int(batch.lengths[0])])
    direct = cache["blocks.2.attn.hook_pattern"][0, 3, -1]
    assert torch.allclose(pattern[0, 1, : int(batch.lengths[0])], direct.float(), atol=1e-5)


def test_member_attention_and_attention_frame(tiny_model):
    prompts = _prompts(tiny_model, n=4)
    heads = [P.Component("head", 1, 2)]
    frame = S.member_attention(tiny_model, prompts, heads, batch_size=3)
    assert len(frame) == len(prompts) and frame["on_members"].between(0, 1 + 1e-6).all()
    assert (frame["on_last_member"] <= frame["on_members"] + 1e-6).all()
    one = S.attention_frame(tiny_model, prompts, 0, heads)
    assert len(one) == len(prompts.prompt_ids[0]) and one["is_member"].sum() == 3
    assert one["attention"].sum() == pytest.approx(1.0, abs=1e-5)


def test_attention_refuses_mlps(tiny_model):
    batch = S.batch_of(tiny_model, _prompts(tiny_model, n=2))
    with pytest.raises(MechbookError, match="head components"):
        S.last_position_attention(tiny_model, batch, [P.Component("mlp", 0)])


# --- single ablations ---------------------------------------------------------------------------------------


def test_single_ablation_effects_agree_with_patching_ablate(tiny_model):
    clean = _prompts(tiny_model)
    corrupted = _prompts(tiny_model, corrupted="shuffle")
    means = S.corrupted_means(tiny_model, corrupted, clean)
    metric = S.answer_metric(clean)
    batch = S.batch_of(tiny_model, clean)
    full = float(metric(run_last(tiny_model, batch)[0]).mean())
    if full <= 0:  # a random tiny model may prefer the last member; flip the metric so the full score is positive
        corr, incorr = clean.answer_tensors()
        metric = P.logit_diff(incorr, corr)
    comps = [P.Component("head", 0, 0), P.Component("head", 2, 1), P.Component("mlp", 1), P.Component("head", 2, 3),
             P.Component("mlp", 2)]
    effects = S.single_ablation_effects(tiny_model, batch, metric, means, components=comps, max_rows=8)
    fast = S.single_ablation_effects(tiny_model, batch, metric, means, components=comps, max_rows=12)
    full = float(metric(run_last(tiny_model, batch)[0]).mean())
    for comp, row, quick in zip(comps, effects.itertuples(), fast.itertuples()):
        alone = float(P.ablate(tiny_model, batch, [comp], metric, mode="mean", means=means).mean())
        assert row.metric == pytest.approx(alone, abs=1e-4)
        assert quick.metric == pytest.approx(alone, abs=1e-4)
        assert row.score == pytest.approx(100 * alone / full, rel=1e-4, abs=1e-3)
        assert row.effect == pytest.approx(row.score - 100)
    ranked = S.top_components(effects.assign(task="t"), n=5)
    assert list(ranked["effect"]) == sorted(effects["effect"])
    assert list(S.top_components(fast.assign(task="t"), n=5)["component"]) == list(ranked["component"])


def test_corrupted_means_need_a_matching_length(tiny_model):
    clean = _prompts(tiny_model)
    longer = _quiet(sc.make_prompts, "numwords", template="{member}", n_prompts=2, n_members=6, starts=[1],
                    corrupted="shuffle", tokenizer=tiny_model.tokenizer)
    with pytest.raises(MechbookError, match="token length"):
        S.corrupted_means(tiny_model, longer, clean)


def test_key_heads_rank_by_mean_effect_over_tasks():
    effects = pd.DataFrame({
        "task": ["a", "a", "a", "b", "b", "b"],
        "kind": ["head", "head", "mlp", "head", "head", "mlp"],
        "layer": [1, 2, 0, 1, 2, 0], "head": [0, 3, None, 0, 3, None],
        "effect": [-10.0, -50.0, -90.0, -40.0, -20.0, -90.0],
    })  # fmt: skip
    assert [h.label for h in S.key_heads(effects, n=2)] == ["2.3", "1.0"]
    with pytest.raises(MechbookError, match="no heads"):
        S.key_heads(effects[effects.kind == "mlp"])


# --- logit lens ---------------------------------------------------------------------------------------------


def test_lens_turn_layers_from_ranks():
    ranks = {  # prompt 0 turns at layer 2; prompt 1 at layer 1 after a wobble at 0; prompt 2 never
        0: ([1, 1, 3, 2], [5, 2, 1, 1]),
        1: ([4, 1, 2, 2], [2, 3, 1, 1]),
        2: ([1, 1, 1, 1], [2, 2, 2, 2]),
    }
    rows = []
    for p, (last, nxt) in ranks.items():
        for layer in range(4):
            rows.append({"prompt": p, "layer": layer, "target": "last shown", "rank": last[layer]})
            rows.append({"prompt": p, "layer": layer, "target": "next", "rank": nxt[layer]})
    turns = S.lens_turn_layers(pd.DataFrame(rows))
    assert turns["turn_layer"].tolist()[:2] == [2, 2] and np.isnan(turns["turn_layer"].iloc[2])
    assert turns["next_top1_layer"].tolist()[:2] == [2.0, 2.0]
    assert turns["last_top1_layer"].tolist() == [0.0, 1.0, 0.0]
    summary = S.lens_turn_summary(turns.assign(task="t"), n_layers=4)
    assert summary.loc[0, "median_turn_layer"] == 2 and summary.loc[0, "turn_depth"] == pytest.approx(0.75)


def test_sequence_lens_ends_at_the_models_logits(tiny_model):
    prompts = _prompts(tiny_model, n=3)
    lens = S.sequence_lens(tiny_model, prompts)
    assert len(lens) == len(prompts) * tiny_model.n_layers * 2
    logits, _ = run_last(tiny_model, S.batch_of(tiny_model, prompts))
    corr, _ = prompts.answer_tensors()
    final = lens[(lens.layer == tiny_model.n_layers - 1) & (lens.target == "next")].sort_values("prompt")
    assert final["rank"].tolist() == decoding.token_ranks(logits, corr).tolist()


# --- prompt sets and the behaviour table ----------------------------------------------------------------


def test_sample_and_concat_prompts():
    prompts = sc.load_paper_prompts("months", "done")
    a = S.sample_prompts(prompts, 10, seed=1)
    assert len(a) == 10 and a.source_index == sorted(a.source_index)
    assert S.sample_prompts(prompts, 10, seed=1).text == a.text
    assert S.sample_prompts(prompts, None) is prompts
    joined = S.concat_prompts([a, S.sample_prompts(sc.load_paper_prompts("months", "lost"), 5)])
    assert len(joined) == 15 and set(joined.template) == {"done", "lost"}
    with pytest.raises(MechbookError, match="one task"):
        S.concat_prompts([a, sc.load_paper_prompts("numerals", "done")])


def test_behaviour_table_counts():
    scores = pd.DataFrame({
        "task": ["x"] * 4 + ["y"] * 2, "template": ["done"] * 4 + ["lost"] * 2,
        "solved": [True, True, False, True, False, False], "top1_is_corr": [True, False, False, True, False, True],
        "p_corr": [0.5, 0.4, 0.1, 0.6, 0.1, 0.2],
    })  # fmt: skip
    drops = pd.DataFrame({"task": ["x", "y"], "template": ["done", "lost"], "n_paper": [1024, 1024], "dropped": [3, 0]})
    table = S.behaviour_table(scores, drops)
    assert table["n"].tolist() == [4, 2]
    assert table["solved_fraction"].tolist() == [0.75, 0.0]
    assert table["top1_accuracy"].tolist() == [0.5, 0.5]
    assert table["dropped"].tolist() == [3, 0]


def test_single_ablation_refuses_positions_and_residuals(tiny_model):
    clean = _prompts(tiny_model, n=2)
    with pytest.raises(MechbookError, match="whole heads and MLPs"):
        S.single_ablation_effects(tiny_model, S.batch_of(tiny_model, clean), S.answer_metric(clean), {},
                                  components=[P.Component("resid", 1)])


def test_member_index_orders_members():
    assert S.member_index("numerals", "12") == 12
    assert S.member_index("months", "March") == 2 and S.member_index("numwords_es", "tres") == 2
    assert S.member_index("numerals_step2", "8") == 8
    with pytest.raises(MechbookError, match="unknown sequence task"):
        S.member_index("letters", "a")


@pytest.mark.slow
def test_solved_paper_prompts_mix_templates_and_are_solved(gemma):
    prompts = _quiet(S.solved_paper_prompts, gemma, "months", n_prompts=6, seed=0)
    assert len(prompts) == 6 and set(prompts.template) == set(sc.PAPER_TEMPLATES)
    assert len(set(prompts.n_tokens)) == 1
    scores = sc.score_prompts(gemma, prompts)
    assert scores["solved"].all()


def test_member_index_and_effect_tables_refuse_bad_input():
    with pytest.raises(MechbookError, match="not a member of months"):
        S.member_index("months", "Smarch")
    wrong = pd.DataFrame({"task": ["a"], "component": ["0.1"], "effect": [1.0]})
    with pytest.raises(MechbookError, match="needs columns"):
        S.key_heads(wrong)
    with pytest.raises(MechbookError, match="needs columns"):
        S.top_components(wrong)
    effects = pd.DataFrame({"task": ["a"], "kind": ["head"], "layer": [0], "head": [1], "effect": [1.0]})
    for n, match in ((0, "n >= 1"), (2.5, "not an integer")):
        with pytest.raises(MechbookError, match="out of range"):
            S.key_heads(effects, n=n)
        with pytest.raises(MechbookError, match=match):
            S.top_components(effects, n=n)
