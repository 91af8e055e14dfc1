"""Stage detection (argument formation, function application, saturation) on lens tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mechbook.papers.vector_arithmetic import icl
from mechbook.papers.vector_arithmetic import stages
from mechbook.core.errors import MechbookError
from mechbook.papers.vector_arithmetic.prompts import build_prompts


def lens_of(argument_ranks, answer_ranks, answer_probs=None, prompt=0, **extra) -> pd.DataFrame:
    """A hand-made lens table for one prompt: ranks per layer of argument and answer."""
    n = len(argument_ranks)
    assert len(answer_ranks) == n
    answer_probs = answer_probs if answer_probs is not None else [0.9 if r == 1 else 0.01 for r in answer_ranks]
    rows = []
    for layer in range(n):
        for target, rank, prob in (
            ("argument", argument_ranks[layer], 0.5 if argument_ranks[layer] == 1 else 0.01),
            ("answer", answer_ranks[layer], answer_probs[layer]),
        ):
            rows.append({"prompt": prompt, "layer": layer, "target": target, "rank": rank,
                         "reciprocal_rank": 1 / rank, "prob": prob, **extra})
    return pd.DataFrame(rows)


def one(lens, **kw) -> dict:
    out = stages.stage_layers(lens, **kw)
    assert len(out) == 1
    return out.iloc[0].to_dict()


def test_the_papers_picture_argument_then_answer_then_saturation():
    # argument top-1 at layers 2-3, answer from layer 4, confident from layer 5
    lens = lens_of(
        argument_ranks=[50, 9, 1, 1, 2, 3, 5],
        answer_ranks=[900, 80, 4, 2, 1, 1, 1],
        answer_probs=[0.0, 0.0, 0.05, 0.2, 0.4, 0.7, 0.9],
    )
    row = one(lens)
    assert row["argument_formation"] == 2 and row["argument_rule"] == "top-1" and row["argument_best_rank"] == 1
    assert row["function_application"] == 4 and row["flip"]
    assert row["saturation"] == 5
    assert row["n_layers"] == 7 and not row["argument_top1_after"]


def test_saturation_threshold_absolute_or_relative_to_the_last_layer():
    lens = lens_of([50, 1, 2, 3], [9, 2, 1, 1], answer_probs=[0.0, 0.1, 0.25, 0.6])
    absolute = dict(relative_to_final=False)
    assert one(lens, saturation_threshold=0.5, **absolute)["saturation"] == 3
    assert one(lens, saturation_threshold=0.2, **absolute)["saturation"] == 2
    assert math.isnan(one(lens, saturation_threshold=0.7, **absolute)["saturation"])  # never confident enough
    # relative: 0.25 is under half of the final 0.6, over a third of it
    assert one(lens)["saturation"] == 3
    assert one(lens, saturation_threshold=0.4)["saturation"] == 2
    # a shy model: top-1 but never probable; relative saturation still finds the plateau
    shy = lens_of([50, 1, 2, 3], [9, 2, 1, 1], answer_probs=[0.0, 0.01, 0.08, 0.1])
    assert one(shy)["saturation"] == 2
    assert math.isnan(one(shy, **absolute)["saturation"])
    with pytest.raises(MechbookError, match=r"saturation_threshold = 1.5 is out of range: .*\(>= 0 and <= 1\)"):
        stages.stage_layers(lens, saturation_threshold=1.5)


def test_saturation_needs_the_answer_to_stay_on_top_to_the_end():
    # answer top-1 at 2, loses it at 3, back from 4 on
    row = one(lens_of([9, 1, 2, 1, 2, 2], [30, 2, 1, 2, 1, 1], answer_probs=[0, 0.1, 0.6, 0.3, 0.6, 0.8]))
    assert row["function_application"] == 2 and row["flip"]
    assert row["saturation"] == 4
    # top-1 at the end but dropping below the threshold in the last layer: no saturation
    row = one(lens_of([9, 1, 2, 2], [30, 2, 1, 1], answer_probs=[0, 0.1, 0.8, 0.4]), relative_to_final=False)
    assert math.isnan(row["saturation"])


def test_argument_never_top1_falls_back_to_the_peak_before_the_answer():
    # argument's best rank before the answer tops (layer 3) is 4 at layer 1; it is top-1 only later
    row = one(lens_of([40, 4, 6, 9, 1, 1], [500, 30, 3, 1, 2, 2]))
    assert row["function_application"] == 3
    assert row["argument_formation"] == 1 and row["argument_rule"] == "peak" and row["argument_best_rank"] == 4
    assert row["argument_top1_after"] and not row["flip"]
    # ties: the earliest layer of the best rank
    row = one(lens_of([40, 3, 3, 9], [500, 30, 1, 1]))
    assert row["argument_formation"] == 1


def test_nothing_ever_on_top():
    row = one(lens_of([40, 7, 5, 9], [500, 30, 3, 2]))
    assert math.isnan(row["function_application"]) and math.isnan(row["saturation"])
    assert row["argument_formation"] == 2 and row["argument_rule"] == "peak"  # searched over all layers
    assert not row["flip"]


def test_answer_on_top_from_the_first_layer_leaves_no_argument_stage():
    row = one(lens_of([2, 3, 1], [1, 1, 1]))
    assert row["function_application"] == 0 and row["saturation"] == 0
    assert math.isnan(row["argument_formation"]) and row["argument_rule"] == "none"
    assert math.isnan(row["argument_best_rank"]) and row["argument_top1_after"]


def test_several_tasks_are_told_apart_by_the_by_columns():
    lens = pd.concat(
        [
            lens_of([5, 1, 2, 2], [9, 3, 1, 1], prompt=0, task="a"),
            lens_of([5, 2, 1, 2], [9, 3, 2, 1], prompt=0, task="b"),
            lens_of([1, 2, 2, 2], [9, 1, 1, 1], prompt=1, task="b"),
        ]
    )
    with pytest.raises(MechbookError, match="by=\\['task'\\]"):
        stages.stage_layers(lens)
    per_prompt = stages.stage_layers(lens, by=["task"])
    assert per_prompt[["task", "prompt"]].values.tolist() == [["a", 0], ["b", 0], ["b", 1]]
    assert per_prompt["function_application"].tolist() == [2, 3, 1]
    assert per_prompt["argument_formation"].tolist() == [1, 2, 0]

    summary = stages.summarize_stages(per_prompt, by=["task"])
    assert list(summary.columns[:2]) == ["task", "stage"]
    assert len(summary) == 2 * len(stages.STAGES)
    b = summary[(summary.task == "b") & (summary.stage == "function_application")].iloc[0]
    assert b["n_prompts"] == 2 and b["n_defined"] == 2 and b["median_layer"] == 2
    assert b["fraction_of_depth"] == pytest.approx(3 / 4)
    assert b["q25"] == pytest.approx(1.5) and b["q75"] == pytest.approx(2.5)

    long = stages.stages_long(per_prompt)
    assert len(long) == 3 * len(stages.STAGES)
    assert set(long.columns) == {"task", "prompt", "n_layers", "stage", "layer"}


def test_undefined_stages_are_counted_not_averaged():
    lens = pd.concat([lens_of([5, 1, 2], [9, 2, 1], prompt=0), lens_of([5, 4, 3], [9, 8, 7], prompt=1)])
    summary = stages.summarize_stages(stages.stage_layers(lens)).set_index("stage")
    assert summary.loc["function_application", "n_prompts"] == 2
    assert summary.loc["function_application", "n_defined"] == 1
    assert summary.loc["function_application", "median_layer"] == 2


def test_bad_tables_are_refused_with_the_fix():
    lens = lens_of([5, 1, 2], [9, 2, 1])
    with pytest.raises(MechbookError, match="lacks columns"):
        stages.stage_layers(lens.drop(columns="prob"))
    with pytest.raises(MechbookError, match="both 'argument' and 'answer'"):
        stages.stage_layers(lens[lens.target == "answer"])
    with pytest.raises(MechbookError, match="decode both"):
        stages.stage_layers(lens.drop(index=lens.index[(lens.target == "answer") & (lens.layer == 1)]))
    two = pd.concat([lens, lens_of([5, 1, 2], [9, 2, 1], prompt=1)], ignore_index=True)
    gap = (two.prompt == 1) & (two.layer == 1)
    with pytest.raises(MechbookError, match="every layer"):
        stages.stage_layers(two[~gap])
    with pytest.raises(MechbookError, match="stage_layers"):
        stages.summarize_stages(pd.DataFrame({"x": [1]}))


def test_fraction_of_depth_and_the_papers_reference():
    assert stages.fraction_of_depth(17, 18) == 1.0
    ref = stages.paper_reference().set_index("stage")
    assert ref.loc["function_application", "paper_layer"] == 19
    assert ref.loc["function_application", "paper_fraction"] == pytest.approx(20 / 24)


def test_correct_lens_on_a_tiny_model(tiny_gpt2):
    prompts = build_prompts("capitals", tiny_gpt2, n=4, multi_token="first")
    logits, resid = icl.run_prompts(tiny_gpt2, prompts)
    full = icl.lens_table(tiny_gpt2, prompts, resid)
    chosen = [True, False, True, False]
    lens = stages.correct_lens(tiny_gpt2, prompts, resid, chosen)
    assert sorted(lens.prompt.unique()) == [0, 2]
    cols = ["prompt", "layer", "target", "rank", "item"]
    expected = full[full.prompt.isin([0, 2])][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(lens[cols].reset_index(drop=True), expected)
    assert np.allclose(lens["prob"], full[full.prompt.isin([0, 2])]["prob"])
    per_prompt = stages.stage_layers(lens)
    assert per_prompt.prompt.tolist() == [0, 2]
    with pytest.raises(MechbookError, match="answers none"):
        stages.correct_lens(tiny_gpt2, prompts, resid, [False] * 4)
    with pytest.raises(MechbookError, match="same prompt set"):
        stages.correct_lens(tiny_gpt2, prompts, resid, [True])


def test_accuracy_by_group_and_error_kinds(tiny_gpt2):
    prompts = build_prompts("past_tense", tiny_gpt2, multi_token="first")
    frame = prompts.to_frame()
    regular = frame.index[frame.group == "regular"][:2].tolist()
    irregular = frame.index[frame.group == "irregular"][:2].tolist()
    n = len(prompts)
    correct = [False] * n
    for i in (regular[0], irregular[0]):
        correct[i] = True
    predicted = list(prompts.answer_tokens)
    for i in range(n):
        if not correct[i]:
            predicted[i] = "zzz"  # in no prompt
    predicted[regular[1]] = prompts.argument_tokens[regular[1]]
    accuracy = pd.DataFrame({"item": prompts.items, "group": prompts.groups, "predicted": predicted,
                             "correct": correct, "answer_rank": [1 if c else 5 for c in correct]})
    table = stages.accuracy_by_group(accuracy, prompts).set_index("group")
    assert list(table.index) == ["all", "irregular", "regular"]
    assert table.loc["all", "n"] == n and table.loc["all", "accuracy"] == pytest.approx(2 / n)
    n_irregular = prompts.groups.count("irregular")
    assert table.loc["irregular", "accuracy"] == pytest.approx(1 / n_irregular)
    summary = prompts.summary().set_index("group")
    assert table.loc["all", "dropped"] == summary.loc["all", "dropped"]
    assert (table["task"] == "past_tense").all()

    kinds = stages.error_kinds(accuracy, prompts)
    assert len(kinds) == n - 2
    assert kinds.set_index("item").loc[prompts.items[regular[1]], "kind"] == "argument"
    assert set(kinds.kind) == {"argument", "other"}
    # a word of the in-context example counts as copied
    example_word = prompts.prompts[0].split(". ")[1].split()[-1]  # "Yesterday I <past>" of the example
    accuracy.loc[0, ["predicted", "correct"]] = [" " + example_word, False]
    kinds = stages.error_kinds(accuracy, prompts)
    assert kinds.set_index("item").loc[prompts.items[0], "kind"] == "copied from the prompt"
    with pytest.raises(MechbookError, match="this prompt set"):
        stages.accuracy_by_group(accuracy.iloc[:2], prompts)


def test_wilson_interval():
    low, high = stages.wilson_interval(5, 10)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)
    assert stages.wilson_interval(0, 4)[0] == pytest.approx(0.0, abs=1e-12)
    assert stages.wilson_interval(4, 4)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in stages.wilson_interval(0, 0))


def test_prompts_keep_the_order_of_the_lens_table():
    lens = pd.concat([lens_of([5, 1, 2], [9, 2, 1], prompt=p, task=t) for t, p in [("z", 3), ("z", 1), ("a", 0)]])
    per_prompt = stages.stage_layers(lens, by=["task"])
    assert per_prompt[["task", "prompt"]].values.tolist() == [["z", 3], ["z", 1], ["a", 0]]
    summary = stages.summarize_stages(per_prompt, by=["task"])
    assert list(dict.fromkeys(summary.task)) == ["z", "a"]


def test_fraction_of_depth_needs_a_layer_count():
    for n_layers in (0, "12", True):
        with pytest.raises(MechbookError, match="number of layers"):
            stages.fraction_of_depth(3, n_layers)
    assert stages.fraction_of_depth(np.array([0, 11]), np.int64(12)).tolist() == [1 / 12, 1.0]


def stages_by_loop(arg_ranks, ans_ranks, ans_probs, threshold, relative):
    """The stage rules as a plain loop over one prompt's layers (chapter a3 writes them out the same way)."""
    n = len(ans_ranks)
    fa = next((layer for layer in range(n) if ans_ranks[layer] == 1), None)
    before = range(fa if fa is not None else n)
    top1 = [layer for layer in before if arg_ranks[layer] == 1]
    af = top1[0] if top1 else min(before, key=lambda layer: arg_ranks[layer], default=None)
    floor = threshold * (ans_probs[-1] if relative else 1.0)
    held = [ans_ranks[layer] == 1 and ans_probs[layer] >= floor for layer in range(n)]
    sat = next((layer for layer in range(n) if all(held[layer:])), None)
    rule = "top-1" if top1 else ("peak" if af is not None else "none")
    flip = fa is not None and fa > 0 and arg_ranks[fa - 1] == 1
    return [af, rule, fa, flip, sat]


@pytest.mark.parametrize("relative", [True, False])
def test_stage_layers_agrees_with_a_plain_loop_on_random_tables(relative):
    rng = np.random.default_rng(0)
    frames, expected = [], []
    for prompt in range(300):
        n = int(rng.integers(1, 9))
        arg = rng.integers(1, 4, n).tolist()  # small ranks: many ties and many top-1 layers
        ans = rng.integers(1, 4, n).tolist()
        probs = rng.choice([0.05, 0.3, 0.5, 0.6, 0.9], n).tolist()
        frames.append(lens_of(arg, ans, probs, prompt=prompt).assign(task="t"))
        expected.append(stages_by_loop(arg, ans, probs, 0.5, relative))
    columns = ["argument_formation", "argument_rule", "function_application", "flip", "saturation"]
    # tables of several lengths are stacked per length: stage_layers needs every layer of every prompt
    lens = pd.concat(frames)
    lengths = lens.groupby("prompt").layer.transform("size")
    got = pd.concat([stages.stage_layers(part, by=["task"], relative_to_final=relative)
                     for _, part in lens.groupby(lengths, sort=False)]).set_index("prompt").sort_index()
    want = pd.DataFrame(expected, columns=columns).astype({"argument_formation": float, "function_application": float,
                                                           "saturation": float})
    pd.testing.assert_frame_equal(got[columns].reset_index(drop=True), want, check_dtype=False)
