"""Prompt builders for Paper A: tokenizer-aware, deterministic, honest about drops.

Tokenizers only (no forward pass); they load from the mechbook model cache.
"""

from __future__ import annotations

import re
from functools import lru_cache
from types import SimpleNamespace

import pytest

from mechbook.core.errors import MechbookError
from mechbook.papers.vector_arithmetic import prompts as va
from mechbook.papers.vector_arithmetic.prompts import Pair, build_prompts

TOKENIZERS = ["gemma3-270m", "smollm2-135m"]


@lru_cache(maxsize=None)
def load_tokenizer(name: str):
    from mechbook.store.cache import cached_model_dir

    path = cached_model_dir(name)
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no cached tokenizer at {path}; run mechbook.load_model({name!r}) once")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    return load_tokenizer(request.param)


@pytest.fixture(scope="module")
def smollm():
    return load_tokenizer("smollm2-135m")


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def whole_word(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


@pytest.mark.parametrize("variant", va.VARIANTS)
@pytest.mark.parametrize("task", va.known_tasks())
def test_answer_and_argument_are_the_true_next_tokens(tokenizer, task, variant):
    prompts = build_prompts(task, tokenizer, variant=variant)
    assert len(prompts) > 0
    for i, prompt in enumerate(prompts.prompts):
        ids = prompts.token_ids[i]
        assert encode(tokenizer, prompt) == ids
        for word, target in ((prompts.answers[i], prompts.answer_ids[i]), (prompts.items[i], prompts.argument_ids[i])):
            assert encode(tokenizer, f"{prompt} {word}") == ids + [target], (task, variant, prompt, word)
        assert prompts.answer_ids[i] != prompts.argument_ids[i]


@pytest.mark.parametrize("task", va.known_tasks())
def test_first_token_scoring_keeps_the_prefix_property(tokenizer, task):
    prompts = build_prompts(task, tokenizer, multi_token="first")
    for i, prompt in enumerate(prompts.prompts):
        ids = prompts.token_ids[i]
        full = encode(tokenizer, f"{prompt} {prompts.answers[i]}")
        assert full[: len(ids) + 1] == ids + [prompts.answer_ids[i]]
        assert len(full) - len(ids) == prompts.answer_n_tokens[i]


def test_every_candidate_is_kept_or_dropped_with_a_reason(tokenizer):
    for task in va.known_tasks():
        prompts = build_prompts(task, tokenizer)
        summary = prompts.summary().set_index("group")
        total = summary.loc["all"]
        assert total["candidates"] == len(prompts) + len(prompts.dropped)
        assert total["dropped"] == sum(total[f"dropped_{r}"] for r in va.DROP_REASONS)
        assert set(prompts.dropped["reason"]) <= set(va.DROP_REASONS)
        assert not set(prompts.items) & set(prompts.dropped["item"])


def test_known_drops(tokenizer):
    # " MUG" is two tokens for both tokenizers; " jogged" starts with " jog"; Luxembourg is its own capital.
    upper = build_prompts("uppercase", tokenizer)
    assert upper.dropped.set_index("item").loc["mug", "reason"] == "answer_multi_token"
    past = build_prompts("past_tense", tokenizer, multi_token="first")
    assert past.dropped.set_index("item").loc["jog", "reason"] == "answer_equals_argument"
    capitals = build_prompts("capitals", tokenizer, multi_token="first").dropped.set_index("item")
    assert capitals.loc[["Luxembourg", "Guinea-Bissau"], "reason"].tolist() == ["answer_in_argument"] * 2


def test_capital_list_quirks():
    pairs = va.capital_pairs()
    countries = [p.argument for p in pairs]
    assert len(pairs) == 246 and len(set(countries)) == 246
    assert "Bolivia" not in countries
    assert Pair("United Kingdom", "London", "in-domain") in pairs
    assert Pair("Northern Ireland", "Belfast", "in-domain") in pairs
    assert not any(";" in c for c in countries)


def test_word_lists():
    assert len(va.us_state_capital_pairs()) == 50
    train, unseen = va.uppercase_pairs("train"), va.uppercase_pairs("unseen")
    assert (len(train), len(unseen)) == (100, 60)
    assert not {p.argument for p in train} & {p.argument for p in unseen}
    assert Pair("red", "RED", "in-domain") in train
    assert Pair("red", "Red", "in-domain") in va.uppercase_pairs("train", style="capitalized")
    groups = [p.group for p in va.past_tense_pairs()]
    assert groups.count("regular") >= 100 and groups.count("irregular") >= 60
    assert all(p.argument != p.answer for p in va.past_tense_pairs())
    with pytest.raises(MechbookError, match="unseen"):
        va.uppercase_pairs("test")


@pytest.mark.parametrize("task", va.known_tasks())
def test_extractive_states_the_answer_and_abstractive_does_not(tokenizer, task):
    abstractive = build_prompts(task, tokenizer, multi_token="first", seed=3)
    extractive = build_prompts(task, tokenizer, multi_token="first", seed=3, variant="extractive")
    assert abstractive.items == extractive.items
    pairs = zip(abstractive.items, abstractive.answers, abstractive.prompts, extractive.prompts)
    for item, answer, short, long in pairs:
        assert not whole_word(answer, short), (item, short)
        assert whole_word(answer, long.split("\n")[0]), (item, long)
        assert long.endswith("\n" + short)  # same examples, same final query


def test_no_context_prompts_repeat_fillers_and_argument(tokenizer):
    prompts = build_prompts("capitals", tokenizer, variant="no_context")
    assert prompts.n_shots == 0
    for item, answer, prompt in zip(prompts.items, prompts.answers, prompts.prompts):
        assert re.fullmatch(rf"(\w+ \w+ \w+) {re.escape(item)} \1 {re.escape(item)} \1", prompt), prompt
        assert not whole_word(answer, prompt)


def test_same_seed_same_prompts_other_seed_other_prompts(tokenizer):
    first = build_prompts("capitals", tokenizer, seed=7, n=20).to_frame()
    again = build_prompts("capitals", tokenizer, seed=7, n=20).to_frame()
    other = build_prompts("capitals", tokenizer, seed=8, n=20).to_frame()
    assert first.equals(again)
    assert list(first["prompt"]) != list(other["prompt"])
    everything = build_prompts("capitals", tokenizer, seed=7)
    assert set(first["item"]) <= set(everything.items)
    assert everything.summary().set_index("group").loc["all", "usable"] == len(everything)


def test_zero_usable_prompts_is_an_error_that_names_the_fix(tokenizer):
    unsplittable = [Pair(w, w.upper() + "QX", "made-up") for w in ("zorvik", "plimbat", "quendar")]
    with pytest.raises(MechbookError, match=r"uppercase.*multi_token='first'"):
        build_prompts("uppercase", tokenizer, pairs=unsplittable)
    assert len(build_prompts("uppercase", tokenizer, pairs=unsplittable, multi_token="first")) == 3


def test_bad_arguments_are_errors(tokenizer):
    with pytest.raises(MechbookError, match="known"):
        build_prompts("capital", tokenizer)
    with pytest.raises(MechbookError, match="variant"):
        build_prompts("capitals", tokenizer, variant="closed_book")
    with pytest.raises(MechbookError, match="multi_token"):
        build_prompts("capitals", tokenizer, multi_token="all")
    with pytest.raises(MechbookError, match="n<="):
        build_prompts("uppercase", tokenizer, n=1000)
    with pytest.raises(MechbookError, match="n_shots"):
        build_prompts("capitals", tokenizer, pairs=va.capital_pairs()[:3], n_shots=3)
    with pytest.raises(MechbookError, match="twice"):
        build_prompts("capitals", tokenizer, pairs=[Pair("France", "Paris", "a"), Pair("France", "Lyon", "a")])
    with pytest.raises(MechbookError, match="LoadedModel"):
        build_prompts("capitals", "gemma3-270m")


def test_hand_checked_capital_prompt(tokenizer):
    pairs = [Pair("Poland", "Warsaw", "in-domain"), Pair("France", "Paris", "in-domain")]
    prompts = build_prompts("capitals", tokenizer, pairs=pairs, n_shots=1)
    row = prompts.to_frame().set_index("item").loc["Poland"]
    assert row["prompt"] == "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"
    gemma = "gemma" in tokenizer.name_or_path
    warsaw, poland = (60671, 25657) if gemma else (28918, 12452)
    assert (row["answer_id"], row["argument_id"]) == (warsaw, poland)
    assert (row["answer_token"], row["answer_n_tokens"]) == (" Warsaw", 1)
    assert (row["token_ids"][0] == tokenizer.bos_token_id) is gemma  # Gemma prepends <bos>, SmolLM2 does not


def test_hand_checked_past_tense_prompts(smollm):
    pairs = [Pair("abandon", "abandoned", "regular"), Pair("walk", "walked", "regular")]
    extractive = build_prompts("past_tense", smollm, pairs=pairs, variant="extractive")
    walk = extractive.prompts[extractive.items.index("walk")]
    assert walk.endswith("\nToday I abandon. Yesterday I abandoned. Today I walk. Yesterday I")
    facts = ("The past tense of abandon is abandoned.", "The past tense of walk is walked.")
    assert walk.split("\n")[0] in {" ".join(facts), " ".join(reversed(facts))}
    assert extractive.answer_tokens[extractive.items.index("walk")] == " walked"


def test_batching_helpers_and_model_input(tokenizer):
    model = SimpleNamespace(name="my-model", bridge=object(), tokenizer=tokenizer)
    prompts = build_prompts("past_tense", model, n=5)
    assert prompts.tokenizer_name == "my-model" and len(prompts) == 5
    frame = prompts.to_frame()
    assert len(frame) == 5 and frame["n_tokens"].tolist() == [len(t) for t in prompts.token_ids]
    targets = prompts.target_ids()
    assert targets["answer"].tolist() == prompts.answer_ids and targets["argument"].shape == (5,)
    assert list(prompts.summary()["group"]) == ["irregular", "regular", "all"]
    assert "kept=5" in repr(prompts)


def test_numpy_counts_are_counts():
    """``n`` and ``n_shots`` drawn from numpy (a sweep over np.arange) give the same prompts as plain ints."""
    import numpy as np

    from conftest import _tokenizer

    tok = _tokenizer(False)
    plain = build_prompts("capitals", tok, n=3, n_shots=2, multi_token="first")
    numpy = build_prompts("capitals", tok, n=np.int64(3), n_shots=np.int32(2), multi_token="first")
    assert numpy.prompts == plain.prompts and len(numpy) == 3
    with pytest.raises(MechbookError, match=r"^n = 0 is out of range: it must be a count of prompts \(>= 1\) or None"):
        build_prompts("capitals", tok, n=0, multi_token="first")
    with pytest.raises(MechbookError, match=r"^n_shots = True is out of range"):
        build_prompts("capitals", tok, n_shots=True, multi_token="first")


def test_seeds_and_pairs_are_checked():
    for seed in (-1, 1.5):  # both built prompts before (checked ahead of the tokenizer)
        with pytest.raises(MechbookError, match="seed"):
            build_prompts("capitals", None, seed=seed)
    for argument in (None, ""):
        with pytest.raises(MechbookError, match="needs a word"):
            va._check_pairs([Pair(argument, "Paris", "g")])
