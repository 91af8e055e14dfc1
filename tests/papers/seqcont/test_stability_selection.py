"""Stability selection over draws (chapter b2): inclusion frequencies and the circuit kept in a share of draws."""

from __future__ import annotations

import pytest

from mechbook.core.circuits import Circuit
from mechbook.core.errors import MechbookError
from mechbook.papers.seqcont.stability import inclusion_frequency, stable_circuits


def _draws():
    return {("numerals", 0): Circuit([(4, 10), (1, 2)], [0, 3]),
            ("numerals", 1): Circuit([(4, 10), (5, 0)], [0]),
            ("numerals", 2): Circuit([(4, 10), (1, 2), (5, 0)], [0, 3, 7]),
            ("months", 0): Circuit([(2, 1)], [])}


def test_frequencies_count_the_draws_that_kept_each_component():
    table = inclusion_frequency(_draws())
    numerals = table[table.task == "numerals"].set_index("component")
    assert numerals.loc["4.10", "kept"] == 3 and numerals.loc["1.2", "kept"] == 2 and numerals.loc["MLP 7", "kept"] == 1
    assert (numerals.draws == 3).all() and numerals.loc["1.2", "frequency"] == pytest.approx(2 / 3)
    # highest frequency first, then by position in the model; a head label is text ("4.10", not 4.1)
    assert list(numerals.index) == ["MLP 0", "4.10", "1.2", "MLP 3", "5.0", "MLP 7"]
    assert list(table.task.unique()) == ["numerals", "months"]
    assert table[table.task == "months"].frequency.tolist() == [1.0]


def test_the_stable_circuit_keeps_what_reaches_the_share():
    table = inclusion_frequency(_draws())
    half = stable_circuits(table, share=0.6)
    assert half["numerals"] == Circuit([(1, 2), (4, 10), (5, 0)], [0, 3])
    assert stable_circuits(table, share=1.0)["numerals"] == Circuit([(4, 10)], [0])
    assert stable_circuits(table, share=0.3)["numerals"] == Circuit([(1, 2), (4, 10), (5, 0)], [0, 3, 7])
    # one draw: the stable circuit is that draw's circuit at any share
    single = stable_circuits(inclusion_frequency({("months", 0): Circuit([(2, 1)], [4])}), share=0.9)
    assert single["months"] == Circuit([(2, 1)], [4])


@pytest.mark.parametrize("share", [0, 1.5, -0.2, True, "0.6"])
def test_a_share_outside_0_to_1_is_refused(share):
    with pytest.raises(MechbookError, match="share"):
        stable_circuits(inclusion_frequency(_draws()), share=share)


def test_no_draws_or_another_table_is_refused():
    with pytest.raises(MechbookError, match="no circuits"):
        inclusion_frequency({})
    with pytest.raises(MechbookError, match="inclusion_frequency"):
        stable_circuits(__import__("pandas").DataFrame({"task": ["x"]}), share=0.6)


def test_draws_apart_moves_one_draw_and_holds_the_other(monkeypatch):
    """Each moved draw is pruned on the right pair of seeds; the run with both at the first seed is shared."""
    from types import SimpleNamespace

    from mechbook.papers.seqcont import stability

    asked, pruned = [], []

    def fake_prepare(model, task, *, n_prompts, n_corrupted, seed, corrupted_seed):
        asked.append((task, seed, corrupted_seed))
        return SimpleNamespace(seed=seed, corrupted_seed=corrupted_seed)

    def prune(key, t, *, threshold):
        pruned.append(key)
        # the circuit depends on the clean draw only: moving the means changes nothing
        return Circuit([(1, t.seed)], [0])

    monkeypatch.setattr(stability, "prepare_task", fake_prepare)
    table, found = stability.draws_apart(None, ["numerals"], 8, [0, 1, 2], prune=prune)
    assert sorted(set(asked), key=str) == [("numerals", 0, 1), ("numerals", 0, 2), ("numerals", 0, None), ("numerals", 1, 0),
                                  ("numerals", 2, 0)]
    assert len(pruned) == len(set(pruned)) == 5  # the shared run once
    rows = table.set_index("moved")
    assert rows.loc["corrupted means", "heads"] == 1.0 and rows.loc["clean prompts", "heads"] == 0.0
    assert (rows.mlps == 1.0).all() and (rows.pairs == 3).all()
    assert found[("numerals", "corrupted means", 2)] == Circuit([(1, 0)], [0])
    with pytest.raises(MechbookError, match="at least two"):
        stability.draws_apart(None, ["numerals"], 8, [0], prune=prune)
