"""Paper B data layer: the paper's prompts, the per-tokenizer answer rule, drops, the generator."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pandas as pd
import pytest

from mechbook.core.errors import MechbookError
from mechbook.papers.seqcont import sequences as sc

MODELS_DIR = Path("/root/.cache/mechbook/models")
TOKENIZERS = ["gemma3-270m", "smollm2-135m"]


@pytest.fixture(scope="module")
def tokenizers():
    from mechbook.store.cache import cached_model_dir

    loaded = {}
    for name in TOKENIZERS:
        path = cached_model_dir(name)
        if not path.exists():
            pytest.skip(f"{name} is not in the model cache; run mechbook.load_model({name!r}) once")
        from transformers import AutoTokenizer

        loaded[name] = AutoTokenizer.from_pretrained(str(path))
    return loaded


def _quiet_tokenize(prompts, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sc.SeqPromptWarning)
        return sc.tokenize_prompts(prompts, tokenizer)


def _fake_model(tokenizer, name="fake"):
    return types.SimpleNamespace(tokenizer=tokenizer, name=name)


# --- the paper's prompts ---------------------------------------------------------------------


@pytest.mark.parametrize("task", sc.PAPER_TASKS)
@pytest.mark.parametrize("template", sc.PAPER_SETS)
def test_paper_sets_load_with_members_from_text(task, template):
    prompts = sc.load_paper_prompts(task, template)
    assert len(prompts) == (1536 if template == "corrupted" else 1024)
    assert all(len(m) == 4 for m in prompts.members)
    assert all(t.endswith(" in") and c.startswith(" ") for t, c in zip(prompts.text, prompts.corr))
    if template != "corrupted":
        assert set(prompts.template) == {template}
        sequence = sc.WORD_SEQUENCES.get(task)
        for members, corr, incorr in zip(prompts.members, prompts.corr, prompts.incorr):
            assert incorr == " " + members[-1]
            if sequence is None:
                assert [int(m) for m in members] + [int(corr)] == list(range(int(members[0]), int(members[0]) + 5))
            else:
                assert corr == " " + sequence[sequence.index(members[-1]) + 1]


def test_corrupted_members_come_from_text_not_s_fields():
    prompts = sc.load_paper_prompts("numerals", "corrupted")
    # Row 0's S-fields read 3 1 11 3; its text reads 11 1 11 3.
    assert prompts.members[0] == ("11", "1", "11", "3")
    assert prompts.template[:1] == ["done"] and prompts.template[512] == "lost" and prompts.template[1024] == "names"


def test_unknown_task_and_set_raise():
    with pytest.raises(MechbookError, match="known: numerals"):
        sc.load_paper_prompts("letters")
    with pytest.raises(MechbookError, match="corrupted"):
        sc.load_paper_prompts("numerals", "clean")


def test_gpt2_circuit_reference():
    circuit = sc.paper_gpt2small_circuit("numerals")
    assert (7, 11) in circuit["heads"] and 9 in circuit["mlps"]


def test_set_rejects_ragged_lists():
    with pytest.raises(MechbookError, match="same length"):
        sc.SeqPromptSet("numerals", "clean", ["a in"], [("1",)], [" 2", " 3"], [" 1"], ["done"], [0])


# --- fitting to a tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", sc.PAPER_TASKS)
def test_answer_is_the_true_next_token(tokenizers, name, task):
    tok = tokenizers[name]
    prompts = _quiet_tokenize(sc.load_paper_prompts(task, "names"), tok)
    for k in range(0, len(prompts), 7):
        ids = prompts.prompt_ids[k]
        for continuation, answer in ((prompts.corr[k], prompts.corr_id[k]), (prompts.incorr[k], prompts.incorr_id[k])):
            full = tok(prompts.text[k] + continuation).input_ids
            assert full[: len(ids) + 1] == ids + [answer]
        # The shown prompt text tokenizes back to exactly the prompt tokens.
        assert tok(prompts.prompt_text[k]).input_ids == ids
        assert prompts.corr_id[k] != prompts.incorr_id[k]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_digit_prompts_end_with_the_space_token(tokenizers, name):
    tok = tokenizers[name]
    prompts = _quiet_tokenize(sc.load_paper_prompts("numerals", "done"), tok)
    assert prompts.prompt_text[0] == prompts.text[0] + " "
    assert tok.decode([prompts.prompt_ids[0][-1]]).strip() == ""
    assert tok.decode([prompts.corr_id[0]]) == "5" and tok.decode([prompts.incorr_id[0]]) == "4"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_word_prompts_keep_the_paper_text(tokenizers, name):
    tok = tokenizers[name]
    prompts = _quiet_tokenize(sc.load_paper_prompts("months", "done"), tok)
    assert prompts.prompt_text == prompts.text
    assert tok.decode([prompts.corr_id[0]]) == " May"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_numerals_drop_shared_first_digit_with_a_warning(tokenizers, name):
    prompts = sc.load_paper_prompts("numerals", "lost")
    with pytest.warns(sc.SeqPromptWarning, match="dropped 256 of 1024.*same_first_token: 256.*' 11' vs ' 10'"):
        fitted = sc.tokenize_prompts(prompts, tokenizers[name])
    assert len(fitted) == 768
    assert fitted.drop_counts().to_dict() == {"same_first_token": 256}
    # Starts 7 and 8 (" 11" vs " 10", " 12" vs " 11") go; start 6 (" 10" vs " 9") stays, scored on "1".
    assert set(fitted.dropped["corr"]) == {" 11", " 12"}
    assert sum(n > 1 for n in fitted.corr_n_tokens) == 128


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", ["numwords", "months"])
def test_word_tasks_keep_everything_silently(tokenizers, name, task):
    with warnings.catch_warnings():
        warnings.simplefilter("error", sc.SeqPromptWarning)
        fitted = sc.tokenize_prompts(sc.load_paper_prompts(task, "corrupted"), tokenizers[name])
    assert len(fitted) == 1536 and fitted.dropped.empty


def test_length_groups_partition_the_set(tokenizers):
    fitted = _quiet_tokenize(sc.load_paper_prompts("numerals", "corrupted"), tokenizers["smollm2-135m"])
    counts = fitted.length_counts()
    assert counts.sum() == len(fitted) and len(counts) > 1
    groups = fitted.by_length()
    assert {n: len(g) for n, g in groups.items()} == counts.to_dict()
    for n, group in groups.items():
        ids, lengths = group.token_tensors(pad_token_id=0)
        assert ids.shape == (len(group), n) and bool((lengths == n).all())


def test_right_padded_tensors_keep_each_length(tokenizers):
    fitted = _quiet_tokenize(sc.load_paper_prompts("months", "names"), tokenizers["smollm2-135m"])
    ids, lengths = fitted.token_tensors(pad_token_id=-1)
    for k in range(0, len(fitted), 50):
        assert ids[k, : lengths[k]].tolist() == fitted.prompt_ids[k]
        assert bool((ids[k, lengths[k] :] == -1).all())


def test_untokenized_set_refuses_token_views():
    prompts = sc.load_paper_prompts("months", "done")
    with pytest.raises(MechbookError, match="tokenize_prompts"):
        prompts.length_counts()


def test_scoring_refuses_prompts_for_another_tokenizer(tokenizers):
    fitted = _quiet_tokenize(sc.load_paper_prompts("months", "done"), tokenizers["gemma3-270m"])
    with pytest.raises(MechbookError, match="another tokenizer"):
        sc.score_prompts(_fake_model(tokenizers["smollm2-135m"]), fitted)
    with pytest.raises(MechbookError, match="another tokenizer"):
        sc.tokenize_prompts(fitted, tokenizers["smollm2-135m"])
    assert sc.tokenize_prompts(fitted, tokenizers["gemma3-270m"]) is fitted


def _fake_scores(prompts, solved):
    return pd.DataFrame({
        "source_index": prompts.source_index, "template": prompts.template, "text": prompts.text,
        "corr": prompts.corr, "incorr": prompts.incorr,
        "p_corr": [0.6 if s else 0.1 for s in solved], "p_incorr": [0.1 if s else 0.3 for s in solved],
        "top1_token": "x",
    })  # fmt: skip


def test_filter_keeps_solved_and_records_the_rest(tokenizers):
    tok = tokenizers["gemma3-270m"]
    fitted = _quiet_tokenize(sc.load_paper_prompts("numwords", "done").select(range(10)), tok)
    solved = [k % 3 != 0 for k in range(10)]
    kept = sc.filter_solved(_fake_model(tok), fitted, scores=_fake_scores(fitted, solved))
    assert len(kept) == sum(solved)
    assert kept.drop_counts().to_dict() == {"not_solved": 10 - sum(solved)}


def test_filter_with_nothing_solved_raises_with_counts(tokenizers):
    tok = tokenizers["gemma3-270m"]
    fitted = _quiet_tokenize(sc.load_paper_prompts("numerals", "done").select(range(0, 1024, 100)), tok)
    with pytest.raises(MechbookError, match=r"solves none of the \d+ numerals/clean prompts.*lower ratio"):
        sc.filter_solved(_fake_model(tok), fitted, scores=_fake_scores(fitted, [False] * len(fitted)))


# --- the generator ---------------------------------------------------------------------------


def test_generator_reproduces_the_paper_form():
    prompts = sc.make_prompts("numerals", template="done", n_prompts=16, starts=[1])
    assert prompts.members[0] == ("1", "2", "3", "4")
    assert prompts.corr[0] == " 5" and prompts.incorr[0] == " 4"
    assert prompts.text[0].endswith(" done in") and prompts.text[0].count(" done in ") == 4
    assert sc._parse_paper_text(prompts.text[0]) == ("done", ("1", "2", "3", "4"))


def test_generator_is_deterministic():
    a = sc.make_prompts("months", template="names", seed=3)
    b = sc.make_prompts("months", template="names", seed=3)
    c = sc.make_prompts("months", template="names", seed=4)
    assert a.text == b.text and a.text != c.text
    assert {m[0] for m in a.members} == set(sc.MONTHS[:8])


@pytest.mark.parametrize("corruption", sc.CORRUPTIONS)
def test_corrupted_twin_pairs_row_by_row(corruption):
    clean = sc.make_prompts("numwords", n_prompts=64, seed=7)
    twin = sc.make_prompts("numwords", n_prompts=64, seed=7, corrupted=corruption)
    assert twin.kind == "corrupted" and twin.corr == clean.corr and twin.incorr == clean.incorr
    used = {m for ms in clean.members for m in ms} | {c.strip() for c in clean.corr}
    for text_clean, text_twin, members_clean, members_twin in zip(clean.text, twin.text, clean.members, twin.members):
        fillers = [[clause.split(" in ")[0] for clause in text.split(". ")] for text in (text_clean, text_twin)]
        assert fillers[0] == fillers[1]
        assert set(members_twin) <= used
        if corruption == "shuffle":
            assert sorted(members_twin) == sorted(members_clean) and members_twin != members_clean
    assert twin.text == sc.make_prompts("numwords", n_prompts=64, seed=7, corrupted=corruption).text


def test_generator_intervals_spanish_and_custom_templates():
    steps = sc.make_prompts("numerals", step=2, starts=[2], n_prompts=4, template="{member}")
    assert steps.text[0] == "2 4 6 8" and steps.corr[0] == " 10" and steps.task == "numerals_step2"
    spanish = sc.make_prompts("numwords_es", starts=[1], n_prompts=2, template="{member}", separator=", ")
    assert spanish.text[0] == "uno, dos, tres, cuatro," and spanish.corr[0] == " cinco"
    months = sc.make_prompts("months_es", starts=[1], n_members=3, n_prompts=2, template="{name} nació en {member}.")
    assert months.members[0] == ("enero", "febrero", "marzo") and months.corr[0] == " abril"
    assert months.text[0].endswith(" nació en")
    colon = sc.make_prompts("months", n_prompts=2, starts=[1], template="{object}: {member};")
    assert colon.text[0].endswith(":") and colon.corr[0] == " May"


def test_generator_fillers_avoid_sequence_members():
    prompts = sc.make_prompts("months", template="names", n_prompts=512, seed=1)
    first_words = {clause.split(" ")[0] for text in prompts.text for clause in text.split(". ")}
    assert not first_words & set(sc.MONTHS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"template": "{name} was born."}, "placeholder {member} exactly once"),
        ({"template": "{member} and {member}"}, "exactly once"),
        ({"template": "{who} born in {member}."}, "unknown placeholders"),
        ({"task": "letters"}, "unknown sequence task"),
        ({"task": "months", "starts": [10]}, "do not fit"),
        ({"task": "months", "step": 3}, "no start in 1..8 fits"),
        ({"step": 0}, "non-zero"),
        ({"corrupted": "reverse"}, "shuffle, resample"),
    ],
)
def test_generator_rejects_bad_input(kwargs, message):
    with pytest.raises(MechbookError, match=message):
        sc.make_prompts(**kwargs)


def test_generator_warns_about_multi_token_members(tokenizers):
    with pytest.warns(sc.SeqPromptWarning) as record:
        fitted = sc.make_prompts("numerals", starts=[6, 8], n_prompts=8, tokenizer=tokenizers["gemma3-270m"])
    messages = " | ".join(str(w.message) for w in record)
    assert "['10', '11', '12']" in messages and "same_first_token: 4" in messages
    assert len(fitted) == 4 and fitted.is_tokenized
    with pytest.warns(sc.SeqPromptWarning, match="diciembre"):
        sc.make_prompts("months_es", starts=[8], n_prompts=2, tokenizer=tokenizers["smollm2-135m"])


# --- one real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma_scores_and_filters_32_prompts():
    import torch

    import mechbook

    model = mechbook.load_model("gemma3-270m")
    fitted = _quiet_tokenize(sc.load_paper_prompts("numerals", "names"), model.tokenizer)
    prompts = fitted.select(range(0, len(fitted), len(fitted) // 32))
    scores = sc.score_prompts(model, prompts, batch_size=16)
    assert len(scores) == len(prompts) and scores[["p_corr", "p_incorr"]].le(1).all().all()
    with torch.inference_mode():  # the last-position shortcut matches the full forward pass
        full = model.hf_model(torch.tensor([prompts.prompt_ids[0]])).logits[0, -1].softmax(-1)
    assert abs(float(full[prompts.corr_id[0]]) - scores.p_corr[0]) < 1e-4
    assert scores.solved.mean() > 0.5
    kept = sc.filter_solved(model, prompts, scores=scores)
    assert len(kept) == int(scores.solved.sum())


def test_sequence_members_and_make_prompts_take_whole_numbers_and_lists():
    for args, match in ((("months", 1, 0), "count >= 1"), (("numerals", 1, -2), "count >= 1"),
                        (("numerals", 1, 3, 0), "non-zero step"),  # ['1', '1', '1'] before
                        (("numerals", 1.5, 3), "not an integer"),  # ['1.5', '2.5', '3.5'] before
                        (("numerals", 1, 3, 1.5), "not an integer"), (("months", "1", 2), "not an integer")):
        with pytest.raises(MechbookError, match=match):
            sc.sequence_members(*args)
    for kwargs, match in (({"step": 0.5}, "not an integer"), ({"step": "2"}, "not an integer"),
                          ({"starts": []}, "starts=\\[\\] gives no prompt"), ({"starts": [1.5]}, "not an integer"),
                          ({"starts": 3}, "list of start positions"), ({"separator": None}, "separator"),
                          ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"tokenizer": "gpt2"}, "expected a tokenizer")):
        with pytest.raises(MechbookError, match=match):
            sc.make_prompts("numerals", n_prompts=2, **kwargs)
    with pytest.raises(MechbookError, match="wrap a single one in a list"):  # its letters were the names before
        sc.make_prompts("numerals", template="names", names="Bob", n_prompts=2)
    with pytest.raises(MechbookError, match="expected a tokenizer"):
        sc.tokenize_prompts(sc.load_paper_prompts("numerals"), None)
