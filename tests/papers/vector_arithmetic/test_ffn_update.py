"""The FFN update o (Paper A §3-4): capture, function-application layer, subtraction, saving."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import slow_twins
from mechbook.book import o_vectors
from mechbook.core import decoding
from mechbook.core.errors import MechbookError
from mechbook.core.runs import run_last, tokenize
from mechbook.papers.vector_arithmetic import ffn_update as ffn
from mechbook.papers.vector_arithmetic.prompts import build_prompts

PROMPTS = [
    "The capital of France is Paris. The capital of Poland is",
    "one two three",
    "Today I walk. Yesterday I walked. Today I jump. Yesterday I",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _targets(model, batch):
    """Two distinct token ids per prompt to play argument and answer."""
    ids = batch.input_ids
    answer = ids[torch.arange(len(batch)), batch.last_pos].cpu()
    argument = (answer + 1) % model.d_vocab
    return answer, argument


# --- capture -------------------------------------------------------------------------------------------


def test_capture_matches_a_full_cache_of_each_prompt_alone(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch, batch_size=2)
    assert run.mlp_out.shape == (3, tiny_model.n_layers, tiny_model.d_model)
    for i, prompt in enumerate(PROMPTS):
        ids = tokenize(tiny_model, [prompt]).input_ids
        with torch.inference_mode():
            logits, cache = tiny_model.bridge.run_with_cache(ids)
        for layer in range(tiny_model.n_layers):
            assert torch.allclose(run.mlp_out[i, layer], cache[f"blocks.{layer}.hook_mlp_out"][0, -1], atol=1e-4)
            assert torch.allclose(run.resid_post[i, layer], cache[f"blocks.{layer}.hook_resid_post"][0, -1], atol=1e-4)
        assert torch.allclose(run.logits[i], logits[0, -1], atol=1e-4)


def test_resid_mid_is_the_residual_the_mlp_acted_on(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    names = [f"blocks.{layer}.hook_resid_mid" for layer in range(tiny_model.n_layers)]
    if not all(n in tiny_model.bridge.hook_dict for n in names):
        pytest.skip("no hook_resid_mid on this architecture")
    _, cache = run_last(tiny_model, batch, names=names, last_only=True)
    assert torch.allclose(run.resid_mid, decoding.stack_layers(cache, names), atol=1e-4)
    assert torch.equal(run.o(1), run.mlp_out[:, 1])


def test_kept_positions_hold_the_residual_and_give_the_same_subtraction(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    plain = ffn.capture_mlp_outputs(tiny_model, batch, batch_size=2)
    kept = ffn.capture_mlp_outputs(tiny_model, batch, keep_positions=True, batch_size=2)
    assert plain.resid_positions is None
    assert kept.resid_positions.shape[:3] == (3, tiny_model.n_layers, batch.input_ids.shape[1])
    rows = torch.arange(3)
    assert torch.allclose(kept.resid_positions[rows, :, batch.last_pos], plain.resid_post, atol=1e-5)
    assert torch.allclose(kept.mlp_out, plain.mlp_out, atol=1e-5)
    answer, argument = _targets(tiny_model, batch)
    for layer in range(tiny_model.n_layers):
        o = 3.0 * plain.o(layer)
        fast = ffn.subtract_o(tiny_model, batch, kept, layer, o, answer, argument, batch_size=2)
        full = slow_twins.transplant(tiny_model, batch, -o, layer, method="add")  # o taken away by a full forward
        output = fast[fast.readout == "model output"]
        assert output.top_after.tolist() == [decoding.to_str(tiny_model, t) for t in full.argmax(-1)]
    with pytest.raises(MechbookError, match="keep_positions=True"):
        ffn.subtract_o(tiny_model, batch, plain, 0, plain.o(0), answer, argument)
    assert kept.select([1]).resid_positions.shape[0] == 1


def test_token_logits_equal_the_full_unembedding(tiny_model):
    resid = torch.randn(4, 2, tiny_model.d_model)
    ids = torch.randint(0, tiny_model.d_vocab, (4, 2))
    full = decoding.unembed(tiny_model, resid).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(decoding.token_logits(tiny_model, resid, ids), full, atol=1e-4)


# --- the function-application layer ---------------------------------------------------------------------


def test_mlp_effects_agree_with_the_logit_lens(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    answer, argument = _targets(tiny_model, batch)
    effects = ffn.mlp_effects(tiny_model, run, answer, argument)
    assert len(effects) == 3 * tiny_model.n_layers
    lens = decoding.logit_lens(tiny_model, run.resid_post, {"answer": answer, "argument": argument})
    merged = effects.merge(lens[lens.target == "answer"], on=["prompt", "layer"])
    assert np.allclose(merged.answer_rr_after, merged.reciprocal_rank)
    lens_mid = decoding.logit_lens(tiny_model, run.resid_mid, {"argument": argument})
    merged = effects.merge(lens_mid, on=["prompt", "layer"])
    assert np.allclose(merged.argument_rr_before, merged.reciprocal_rank)
    assert np.allclose(effects.rr_jump, effects.answer_rr_after - effects.answer_rr_before)
    assert np.allclose(effects.margin_gain, effects.margin_after - effects.margin_before)


def test_mlp_effects_need_one_target_per_prompt(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    with pytest.raises(MechbookError, match="one of each per prompt"):
        ffn.mlp_effects(tiny_model, run, [1, 2], [3, 4, 5])


def _effects(rr_after: list[list[float]], rr_before: list[list[float]], arg_before: list[list[float]]) -> pd.DataFrame:
    n, layers = len(rr_after), len(rr_after[0])
    frame = pd.DataFrame({"prompt": np.repeat(np.arange(n), layers), "layer": np.tile(np.arange(layers), n)})
    frame["answer_rr_after"] = np.ravel(rr_after)
    frame["answer_rr_before"] = np.ravel(rr_before)
    frame["argument_rr_before"] = np.ravel(arg_before)
    frame["rr_jump"] = frame.answer_rr_after - frame.answer_rr_before
    frame["margin_gain"] = 0.0
    return frame


def test_function_layer_is_the_largest_reciprocal_rank_jump_earliest_on_ties():
    effects = _effects(
        rr_after=[[0.1, 1.0, 1.0], [0.5, 0.5, 1.0]],
        rr_before=[[0.1, 0.5, 1.0], [0.0, 0.0, 0.5]],
        arg_before=[[0.0, 1.0, 0.5], [0.5, 0.5, 1.0]],
    )
    best = ffn.function_application_layers(effects)
    assert best.layer.tolist() == [1, 0]  # prompt 1: jumps of 0.5 at layers 0 and 2, earliest wins
    assert best.flip.tolist() == [True, False]


def test_lower_median_is_an_observed_value():
    assert ffn.lower_median([3, 1, 4, 2]) == 2
    assert ffn.lower_median([5]) == 5
    with pytest.raises(MechbookError):
        ffn.lower_median([])


def test_find_function_layer_on_task_prompts(tiny_model):
    prompts = build_prompts("capitals", tiny_model, n=4, seed=0, n_shots=1, multi_token="first")
    task = ffn.find_function_layer(tiny_model, prompts)
    assert 0 <= task.layer < tiny_model.n_layers
    analysed = task.analysed
    expected = np.flatnonzero(task.correct) if task.correct.any() else np.arange(len(prompts))
    assert list(analysed) == list(expected)
    assert list(task.layers.item) == [prompts.items[i] for i in analysed]
    assert set(task.effects.prompt) == set(analysed)
    assert task.o().shape == (len(prompts), tiny_model.d_model)
    assert torch.allclose(task.mean_o(), task.run.mlp_out[:, task.layer].mean(0))
    summary = ffn.function_layer_summary([task], tiny_model.n_layers)
    assert summary.loc[0, "fraction_of_depth"] == (task.layer + 1) / tiny_model.n_layers
    assert summary.loc[0, "n"] == len(analysed)
    with pytest.raises(MechbookError, match="has no group"):
        task.select(groups=["irregular"])
    two = task.select(n=2, seed=0)
    assert two.sum() == 2 and np.array_equal(two, task.select(n=2, seed=0))
    assert torch.allclose(task.mean_o(two), task.o(two).mean(0))
    table = ffn.subtract_o_table(tiny_model, task)
    assert set(table.prompt) == set(analysed)
    assert set(zip(table.o, table.readout)) == {("own o", f"logit lens at layer {task.layer}"), ("own o", "model output"),
                                                 ("task mean o", f"logit lens at layer {task.layer}")}
    assert len(ffn.subtract_o_summary(table)) == 3


def test_run_select_keeps_rows(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch)
    sub = run.select([2, 0])
    assert torch.equal(sub.mlp_out[0], run.mlp_out[2]) and torch.equal(sub.logits[1], run.logits[0])


def test_subtract_o_reads_the_lens_without_the_update(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    run = ffn.capture_mlp_outputs(tiny_model, batch, keep_positions=True)
    answer, argument = _targets(tiny_model, batch)
    layer = 1
    table = ffn.subtract_o(tiny_model, batch, run, layer, run.o(layer), answer, argument)
    assert set(table.readout) == {f"logit lens at layer {layer}", "model output"}
    lens = table[table.readout != "model output"]
    expected = decoding.unembed(tiny_model, run.resid_mid[:, layer]).argmax(-1)
    assert lens.top_after.tolist() == [decoding.to_str(tiny_model, t) for t in expected]
    output = table[table.readout == "model output"]
    assert output.top_before.tolist() == [decoding.to_str(tiny_model, t) for t in run.logits.argmax(-1)]


# --- how constant is o ----------------------------------------------------------------------------------------


def test_pairwise_cosines():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(pairwise_sorted(ffn.pairwise_cosines(a)), torch.tensor([0.0, 0.0, 1.0]))
    assert ffn.pairwise_cosines(a, a[:2]).shape == (6,)


def pairwise_sorted(x):
    return torch.sort(x).values


def test_o_cosine_table_has_within_and_across_rows():
    torch.manual_seed(0)
    outs = {"a": torch.randn(4, 3, 8), "b": torch.randn(5, 3, 8)}
    outs["a"][:, 1] = torch.randn(8) + 0.01 * torch.randn(4, 8)  # nearly constant at layer 1
    table = ffn.o_cosine_table(outs)
    assert len(table) == 3 * 3
    within = table[(table.comparison == "within task") & (table.task == "a")].set_index("layer")
    assert within.loc[1, "mean_cosine"] > 0.99 > within.loc[0, "mean_cosine"]
    assert within.loc[0, "n_pairs"] == 6
    assert table[table.comparison == "across tasks"].n_pairs.eq(20).all()
    centered = ffn.o_cosine_table({"a": torch.ones(3, 2, 4) + 1e-3 * torch.randn(3, 2, 4), "b": -torch.ones(3, 2, 4)}, center=True)
    across = centered[centered.comparison == "across tasks"]
    assert (across.mean_cosine < -0.99).all() and centered.centered.all()


# --- saving and loading ---------------------------------------------------------------------------------------


def test_o_vector_round_trip(tiny_model, tmp_path):
    o = torch.randn(tiny_model.d_model)
    path = o_vectors.save_o_vector(tmp_path / "v" / "capitals.safetensors", o, model=tiny_model, layer=-1,
                                   task="capitals", source="mean over 2 prompts", items=["Poland", "France"])
    loaded = o_vectors.load_o_vector(path, tiny_model)
    assert torch.equal(loaded.vector, o)
    assert loaded.layer == tiny_model.n_layers - 1
    assert loaded.hook == f"blocks.{tiny_model.n_layers - 1}.hook_mlp_out"
    assert loaded.items == ("Poland", "France")
    assert loaded.model == tiny_model.name and loaded.d_model == tiny_model.d_model
    assert [p.name for p in path.parent.iterdir()] == ["capitals.safetensors"]  # no temporary file left


def test_loading_a_vector_of_the_wrong_width_names_both_widths(tiny_model, tiny_gpt2, tmp_path):
    path = o_vectors.save_o_vector(tmp_path / "o.safetensors", torch.randn(tiny_gpt2.d_model), model=tiny_gpt2, layer=0,
                                   task="capitals", source="test", items=[])
    width = tiny_gpt2.d_model + 8
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file({"o": torch.randn(width)}, str(path), metadata={**meta, "d_model": str(width)})
    with pytest.raises(MechbookError, match=rf"width {width}.*d_model={tiny_model.d_model}.*recompute"):
        o_vectors.load_o_vector(path, tiny_model)
    assert load_file(str(path))["o"].shape == (width,)


def test_loading_checks_layer_model_and_file(tiny_model, tmp_path):
    path = o_vectors.save_o_vector(tmp_path / "o.safetensors", torch.randn(tiny_model.d_model), model=tiny_model,
                                   layer=0, task="capitals", source="test", items=[])
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file({"o": torch.randn(tiny_model.d_model)}, str(path), metadata={**meta, "layer": "99"})
    with pytest.raises(MechbookError, match="out of range"):
        o_vectors.load_o_vector(path, tiny_model)
    save_file({"o": torch.randn(tiny_model.d_model)}, str(path), metadata={**meta, "model": "other-model"})
    with pytest.raises(MechbookError, match="saved for other-model"):
        o_vectors.load_o_vector(path, tiny_model)
    assert o_vectors.load_o_vector(path, tiny_model, allow_other_model=True).model == "other-model"
    with pytest.raises(MechbookError, match="run chapter a4_ffn_update"):
        o_vectors.load_o_vector(tmp_path / "missing.safetensors", tiny_model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MechbookError, match="not an o vector file"):
        o_vectors.load_o_vector(tmp_path / "junk.safetensors", tiny_model)
    with pytest.raises(MechbookError, match="out of range"):
        o_vectors.save_o_vector(tmp_path / "x.safetensors", torch.randn(tiny_model.d_model), model=tiny_model,
                                layer=tiny_model.n_layers, task="capitals", source="test", items=[])


def test_o_vector_path_is_per_model(tmp_path):
    path = o_vectors.o_vector_path("bigscience/bloom-560m", "capitals", root=tmp_path)
    assert path == tmp_path / "bigscience--bloom-560m" / "a4_ffn_update" / "o_vectors" / "capitals.safetensors"


def test_the_o_record_keeps_its_provenance_and_refuses_what_does_not_fit(tiny_model):
    record = ffn.o_vector(torch.randn(1, tiny_model.d_model), model=tiny_model, layer=-1, task="capitals",
                          source="mean over 2 prompts", items=["Poland", "France"])
    assert record.vector.shape == (tiny_model.d_model,) and record.layer == tiny_model.n_layers - 1
    meta = record.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    again = ffn.OVector.from_metadata(record.vector, meta, where="here")
    assert again == record
    with pytest.raises(MechbookError, match=r"here lacks metadata \['hook'\]"):
        ffn.OVector.from_metadata(record.vector, {k: v for k, v in meta.items() if k != "hook"}, where="here")
    assert record.check_fits(tiny_model) is record
    wider = replace(record, vector=torch.randn(tiny_model.d_model + 8))
    with pytest.raises(MechbookError, match=rf"here has width {tiny_model.d_model + 8}.*d_model={tiny_model.d_model}"):
        wider.check_fits(tiny_model, where="here")
    with pytest.raises(MechbookError, match="saved for other-model"):
        replace(record, model="other-model").check_fits(tiny_model)
    with pytest.raises(MechbookError, match="out of range"):
        ffn.o_vector(torch.randn(tiny_model.d_model), model=tiny_model, layer=tiny_model.n_layers, task="capitals",
                     source="test", items=[])
    with pytest.raises(MechbookError):
        ffn.o_vector(torch.full((tiny_model.d_model,), float("nan")), model=tiny_model, layer=0, task="capitals",
                     source="test", items=[])


def test_the_same_o_gives_the_same_bytes(tiny_model, tmp_path):
    o = torch.randn(tiny_model.d_model)
    kept = dict(model=tiny_model, layer=0, task="capitals", source="test", items=["Poland", "France", "Chad"])
    first = o_vectors.save_o_vector(tmp_path / "a.safetensors", o, **kept).read_bytes()
    assert o_vectors.save_o_vector(tmp_path / "b.safetensors", o, **kept).read_bytes() == first
                                   

def test_the_papers_modules_import_no_book_plumbing():
    import ast
    from pathlib import Path

    import mechbook.papers.vector_arithmetic as paper

    for path in sorted(Path(paper.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(m.startswith("mechbook.book") for m in modules), f"{path.name} imports {modules}"


# --- the real model ------------------------------------------------------------------------------------------------

POLAND = "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"


@pytest.mark.slow
def test_gemma_function_layer_flips_poland_to_warsaw(gemma):
    batch = tokenize(gemma, [POLAND])
    run = ffn.capture_mlp_outputs(gemma, batch, keep_positions=True)
    warsaw, poland = decoding.single_token_id(gemma, " Warsaw"), decoding.single_token_id(gemma, " Poland")
    best = ffn.function_application_layers(ffn.mlp_effects(gemma, run, [warsaw], [poland]))
    layer = int(best.layer[0])
    assert gemma.n_layers // 2 <= layer < gemma.n_layers
    table = ffn.subtract_o(gemma, batch, run, layer, run.o(layer), [warsaw], [poland])
    lens = table[table.readout == f"logit lens at layer {layer}"].iloc[0]
    assert lens.answer_top1_before and lens.argument_top1_after  # " Warsaw" -> " Poland" without o


def test_no_tasks_is_refused_with_the_fix():
    """``-p tasks=[]`` used to reach a KeyError on the empty summary table."""
    with pytest.raises(MechbookError, match=r"^no tasks to summarise; .*tasks=\['capitals'\]"):
        ffn.function_layer_summary([], n_layers=4)
    with pytest.raises(MechbookError, match="no tasks' MLP outputs to compare"):
        ffn.o_cosine_table({})


def test_cosines_medians_and_token_tables_refuse_bad_input(tiny_gpt2):
    for args, match in (((torch.randn(8),), "float vectors \\[n, d\\]"),
                        ((torch.randn(3, 8), torch.randn(3, 9)), "one width"),
                        ((torch.randn(1, 8),), "no pair")):  # an empty tensor (a NaN mean) before
        with pytest.raises(MechbookError, match=match):
            ffn.pairwise_cosines(*args)
    with pytest.raises(MechbookError, match="whole numbers"):
        ffn.lower_median([1.5, 2.5])  # 1 before
    assert ffn.lower_median(np.array([3, 1, 2, 4])) == 2
    with pytest.raises(MechbookError, match="non-empty dict"):
        ffn.top_tokens_table(tiny_gpt2, {})
