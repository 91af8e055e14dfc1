"""Reading back what chapters b2 and b4 save (mechbook.book.saved_circuits): circuits, prompts, the shared sub-circuit."""

from __future__ import annotations

import pytest
import torch

from mechbook import MechbookError
from mechbook.book import results
from mechbook.book.saved_circuits import load_shared_circuit, load_task_circuits, load_task_sets, selection
from mechbook.core.circuits import Circuit
from mechbook.papers.seqcont.task_circuits import circuits_record

pytestmark = pytest.mark.usefixtures("one_thread")

THREE = {
    "numerals": Circuit([(0, 1), (1, 0), (1, 1)], [0, 1], score=81.234567),
    "numwords": Circuit([(0, 1), (1, 1)], [1], score=90.0),
    "months": Circuit([(0, 1), (0, 0)], [1, 0], score=70.0),
}


def _publish(root, model_name, chapter, **files):
    saved = results.ChapterResults(chapter, model_name, root=root)
    for name, data in files.items():
        saved.save(name, data)
    return saved.finish()


def test_load_task_circuits(tmp_path, tiny_gpt2):
    with pytest.raises(MechbookError, match="python -m mechbook run --model tiny --chapters b2"):
        load_task_circuits("tiny", root=tmp_path)
    _publish(tmp_path, tiny_gpt2.name, "b2_node_pruning", circuits=circuits_record(THREE))
    loaded = load_task_circuits(tiny_gpt2, root=tmp_path)
    assert loaded == THREE and loaded["numerals"].score == pytest.approx(81.235)

    # circuits of a bigger model do not fit this one
    _publish(tmp_path, tiny_gpt2.name, "b2_node_pruning", circuits=circuits_record({"numerals": Circuit([(40, 0)], [])}))
    with pytest.raises(MechbookError, match="does not fit.*--chapters b2"):
        load_task_circuits(tiny_gpt2, root=tmp_path)

    _publish(tmp_path, tiny_gpt2.name, "b2_node_pruning", circuits={"numerals": {"mlps": []}})
    with pytest.raises(MechbookError, match="circuits.json: could not read circuits.*--chapters b2"):
        load_task_circuits(tiny_gpt2, root=tmp_path)

    _publish(tmp_path, tiny_gpt2.name, "b2_node_pruning", circuits={})
    with pytest.raises(MechbookError, match="holds no circuits.*--chapters b2"):
        load_task_circuits(tiny_gpt2, root=tmp_path)


def test_b2s_prompts_are_saved_and_rebuilt_exactly(tiny_model, tmp_path):
    """Later chapters score circuits on chapter b2's own prompts: the saved record rebuilds the same batch and means."""
    from mechbook.papers.seqcont import sequences
    from mechbook.papers.seqcont.components import concat_prompts
    from mechbook.papers.seqcont.task_circuits import prompts_record, task_set

    clean = [sequences.tokenize_prompts(sequences.load_paper_prompts("months", t), tiny_model.tokenizer).select([3, 1])
             for t in ("done", "names")]
    corrupted = sequences.tokenize_prompts(sequences.load_paper_prompts("months", "corrupted"), tiny_model.tokenizer)
    original = {"months": task_set(tiny_model, concat_prompts(clean), corrupted.select([5, 0, 9]))}
    _publish(tmp_path, tiny_model.name, "b2_node_pruning", prompts=prompts_record(original))
    back = load_task_sets(tiny_model, root=tmp_path)["months"]
    assert torch.equal(back.batch.input_ids, original["months"].batch.input_ids)
    assert all(torch.equal(back.means[k], v) for k, v in original["months"].means.items())
    with pytest.raises(MechbookError, match="--chapters b2"):
        load_task_sets(tiny_model, root=tmp_path / "elsewhere")
    # the first n prompts, b2's means
    first = load_task_sets(tiny_model, root=tmp_path, n_prompts=3)["months"]
    assert torch.equal(first.batch.input_ids, original["months"].batch.input_ids[:3])
    assert first.prompts.text == original["months"].prompts.text[:3] and len(first) == 3
    assert all(torch.equal(first.means[k], v) for k, v in original["months"].means.items())
    assert torch.equal(first.tokens, torch.unique(torch.cat(first.prompts.answer_tensors())))
    for n in (1, 5, 2.0):
        with pytest.raises(MechbookError, match=f"n_prompts = {n!r} is out of range.* 4 prompts"):
            load_task_sets(tiny_model, root=tmp_path, n_prompts=n)
    _publish(tmp_path, tiny_model.name, "b2_node_pruning", prompts={"months": {"clean": [["done", 99999]],
                                                                               "corrupted": [0]}})
    with pytest.raises(MechbookError, match=r"prompts.json: months/done: rows \[99999\].*--chapters b2"):
        load_task_sets(tiny_model, root=tmp_path)


SMALL = {"numerals": Circuit([(0, 1), (1, 0)], [0, 1]), "numwords": Circuit([(0, 1), (1, 1)], [1]),
         "months": Circuit([(0, 1)], [1, 0])}


def test_load_shared_circuit_prefers_b4_then_intersects_b2(tmp_path, tiny_gpt2):
    with pytest.raises(MechbookError, match="--chapters b2"):
        load_shared_circuit(tiny_gpt2, root=tmp_path)
    _publish(tmp_path, tiny_gpt2.name, "b2_node_pruning", circuits=circuits_record(SMALL))
    circuit, source = load_shared_circuit(tiny_gpt2, root=tmp_path)
    assert circuit == Circuit([(0, 1)], [1]) and "circuits.json" in source
    _publish(tmp_path, tiny_gpt2.name, "b4_shared_circuit", shared=Circuit([(1, 1)], []).to_dict())
    circuit, source = load_shared_circuit(tiny_gpt2, root=tmp_path)
    assert circuit == Circuit([(1, 1)], []) and "shared.json" in source


def test_an_empty_or_foreign_shared_circuit_is_refused(tmp_path, tiny_gpt2):
    _publish(tmp_path, tiny_gpt2.name, "b2_node_pruning",
             circuits=circuits_record({"a": Circuit([(0, 0)], []), "b": Circuit([(0, 1)], [])}))
    with pytest.raises(MechbookError, match="empty.*--chapters b2 b4"):
        load_shared_circuit(tiny_gpt2, root=tmp_path)
    _publish(tmp_path, tiny_gpt2.name, "b4_shared_circuit", shared=Circuit([(40, 0)], []).to_dict())
    with pytest.raises(MechbookError, match="does not fit.*--chapters b2 b4"):
        load_shared_circuit(tiny_gpt2, root=tmp_path)


def test_selection_says_how_b2_chose_its_circuits(tmp_path):
    import pandas as pd

    row = {"task": "numerals", "n_prompts": 512, "draws": 5, "kept_in": 0.6}
    _publish(tmp_path, "tiny", "b2_node_pruning", summary=pd.DataFrame([row]))
    assert selection("tiny", tmp_path) == "kept in at least 60% of 5 draws of 512 prompts"
    _publish(tmp_path, "tiny", "b2_node_pruning", summary=pd.DataFrame([{**row, "draws": 1, "n_prompts": 16}]))
    assert selection("tiny", tmp_path) == "one pruning on 16 prompts"
    _publish(tmp_path, "tiny", "b2_node_pruning", summary=pd.DataFrame([{"task": "numerals"}]))
    with pytest.raises(MechbookError, match="no draws, kept_in and n_prompts.*--chapters b2"):
        selection("tiny", tmp_path)


def test_b2_prunes_each_model_at_the_books_size_unless_told():
    """None takes the book's size for the model (the paper's 512 and five draws where the book searched at it,
    16 prompts and one draw elsewhere); a value given wins; an out-of-range one is refused in mechbook run's words."""
    from mechbook.book.saved_circuits import ELSEWHERE, PRUNED_AT, pruning_size

    assert pruning_size("gemma3-270m") == PRUNED_AT["gemma3-270m"]
    assert (PRUNED_AT["gemma3-270m"].n_prompts, len(PRUNED_AT["gemma3-270m"].seeds)) == (512, 5)
    assert pruning_size("some-other-model") == ELSEWHERE
    assert (ELSEWHERE.n_prompts, ELSEWHERE.n_corrupted, ELSEWHERE.seeds) == (16, 64, (0,))
    mixed = pruning_size("gemma3-270m", n_prompts=32, seeds=[3])
    assert (mixed.n_prompts, mixed.n_corrupted, mixed.seeds) == (32, 512, (3,))
    with pytest.raises(MechbookError, match="n_prompts = 0 is out of range"):
        pruning_size("gemma3-270m", n_prompts=0)
    with pytest.raises(MechbookError, match="seeds = \\[-1\\] is out of range"):
        pruning_size("gemma3-270m", seeds=[-1])
