"""The across-models tables: every model's saved results side by side, beside the papers' numbers.

No model is loaded: results folders are written by hand in a temporary root, in the
shape the chapters save them.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mechbook.book import results  # noqa: E402
from mechbook.book import across_models as compare
from mechbook.core import stats  # noqa: E402
from mechbook.core.errors import MechbookError  # noqa: E402


def _save(root: Path, model: str, chapter: str, **tables) -> None:
    saved = results.ChapterResults(chapter, model, root=root)
    for name, data in tables.items():
        saved.save(name, data)
    saved.finish()


def _transplant(rate: float) -> pd.DataFrame:
    return pd.DataFrame([
        {"task": task, "domain": domain, "method": method, "failure_rate": rate, "median_rank_before": 20.0,
         "median_rank_after": 4.0, "top1_rate_after": 0.1, "n": 40}
        for task in ["capitals", "capitalize", "past_tense"] for domain in ["in-domain", "out-of-domain"]
        for method in ["add o", compare.TRANSPLANT_METHOD]
    ])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two models with Paper A results, one with Paper B circuits."""
    for model, acc in [("small-model", 0.5), ("org/big-model", 0.9)]:
        _save(tmp_path, model, "a2_tasks_accuracy", accuracy=pd.DataFrame({
            "task": ["capitals", "past_tense", "past_tense"], "group": ["all", "all", "regular"],
            "n_shots": [3, 1, 1], "n": [80, 100, 50], "accuracy": [acc, acc / 2, 0.1]}))
        _save(tmp_path, model, "a5_transplant", transplant=_transplant(0.1 if model == "small-model" else 0.5))
    _save(tmp_path, "small-model", "a4_ffn_update", function_layer=pd.DataFrame({
        "task": ["capitals"], "median_layer": [5], "fraction_of_depth": [0.75], "n_layers": [8]}))
    _save(tmp_path, "small-model", "a6_abstractive_extractive", ffn_ablation=pd.DataFrame([
        {"task": "capitalize", "variant": variant, "layers_removed": k, "fraction_removed": k / 6, "n_layers": 6,
         "accuracy": 1.0 - k * (0.3 if variant == "abstractive" else 0.1), "n": 32}
        for variant in ["abstractive", "extractive"] for k in range(4)]))
    _save(tmp_path, "small-model", "b2_node_pruning",
          summary=pd.DataFrame({"task": ["numerals", "months"], "n_heads": [4, 3], "n_mlps": [2, 2], "size": [6, 5],
                                "score": [85.0, 90.0], "threshold": [0.2, 0.2], "n_prompts": [8, 8]}),
          circuits={"numerals": {"heads": [[0, 1], [2, 3], [4, 4], [1, 0]], "mlps": [0, 1], "score": 85.0},
                    "months": {"heads": [[0, 1], [4, 4], [3, 3]], "mlps": [0, 2], "score": 90.0}})
    _save(tmp_path, "small-model", "b5_components", key_heads={"key_heads": ["4.4"], "n_layers": 6, "n_heads": 4})
    return tmp_path


def test_tables_stack_every_model_and_the_papers_numbers(root: Path) -> None:
    acc = compare.icl_accuracy_table(root)
    assert set(acc.model) == {"small-model", "org/big-model"} and set(acc.task) == {"capitals", "past_tense"}
    transplant = compare.transplant_table(root)
    measured = transplant[~transplant.model.map(compare.is_paper)]
    assert len(measured) == 2 * 6  # one method, two models, 3 tasks x 2 domains
    paper = transplant[transplant.model == "GPT-2 (paper)"].set_index(["task", "domain"]).failure_rate
    assert paper["capitals", "in-domain"] == 0.37
    assert paper["capitalize", "out-of-domain"] == 0.05  # the paper's uppercasing, beside the book's capitalize
    layer = compare.function_layer_table(root)
    assert layer[layer.model == "GPT-2 medium (paper)"].fraction_of_depth.tolist() == [pytest.approx(2 / 3)]


def test_circuit_size_and_overlap(root: Path) -> None:
    size = compare.circuit_size_table(root).set_index(["model", "task"])
    assert size.loc[("small-model", "numerals"), "share_of_heads"] == 4 / 24
    assert size.loc[("GPT-2 small (paper)", "numerals"), "n_heads"] == 14
    overlap = compare.circuit_overlap_table(root)
    heads = overlap[(overlap.model == "small-model") & (overlap.kind == "heads")].iloc[0]
    assert (heads.shared, heads.in_either, heads.shared_nodes) == (2, 5, "0.1 4.4")
    assert heads.jaccard == pytest.approx(2 / 5)
    paper = overlap[overlap.model.map(compare.is_paper)].set_index("kind").shared
    assert paper.to_dict() == {"heads": 8, "mlps": 10}
    # results saved before b2 had score intervals: the columns are there, empty, and shown as the score alone
    assert size.score_low.isna().all() and size.score_high.isna().all()
    shown = compare.with_interval(size.score, size.score_low, size.score_high, ".1f")
    assert shown[:2] == ["85.0", "90.0"] and pd.isna(shown[-1])  # the paper gives no score


def test_circuit_scores_and_sequence_accuracy_carry_their_intervals(root: Path) -> None:
    summary = pd.DataFrame({"task": ["numerals"], "n_heads": [4], "n_mlps": [2], "size": [6], "score": [85.0],
                            "score_low": [80.5], "score_high": [88.25], "threshold": [0.2], "n_prompts": [16]})
    _save(root, "org/big-model", "b2_node_pruning", summary=summary,
          circuits={"numerals": {"heads": [[0, 1]], "mlps": [0], "score": 85.0}})
    size = compare.circuit_size_table(root).set_index(["model", "task"])
    assert list(size.columns[:5]) == ["n_heads", "n_mlps", "score", "score_low", "score_high"]
    row = size.loc[("org/big-model", "numerals")]
    assert compare.with_interval([row.score], [row.score_low], [row.score_high], ".1f") == ["85.0 (80.5–88.2)"]
    _save(root, "small-model", "b1_sequence_data", behaviour=pd.DataFrame({
        "task": ["numerals", "numerals", "months"], "template": ["t1", "t2", "t1"], "n": [30, 10, 20],
        "top1_accuracy": [1.0, 0.5, 0.0]}))
    b1 = compare.sequence_behaviour_table(root).set_index("task")
    assert b1.loc["numerals", "top1_accuracy"] == pytest.approx(35 / 40) and b1.loc["numerals", "n"] == 40
    for task, (k, n) in {"numerals": (35, 40), "months": (0, 20)}.items():
        assert (b1.loc[task, "ci_low"], b1.loc[task, "ci_high"]) == pytest.approx(stats.wilson_interval(k, n))
    assert b1.loc["months", "ci_low"] == pytest.approx(0.0, abs=1e-12) and b1.loc["months", "ci_high"] > 0.1


def test_ffn_drop_reads_the_step_nearest_a_third(root: Path) -> None:
    drop = compare.ffn_ablation_drop(compare.ffn_ablation_table(root)).set_index(["model", "variant"])
    assert drop.loc[("small-model", "abstractive"), "drop"] == pytest.approx(0.6)  # 2 of 6 removed
    assert drop.loc[("small-model", "extractive"), "drop"] == pytest.approx(0.2)
    assert drop.loc[("BLOOM-176B (paper)", "abstractive"), "drop"] == 0.73


def test_absent_chapters_give_none_and_a_command(root: Path) -> None:
    assert compare.cross_task_table(root) is None
    assert compare.subcircuit_effects_table(root) is None
    assert compare.sequence_behaviour_table(root) is None
    note = compare.missing_note("b4_shared_circuit", "smollm2-135m")
    assert "`python -m mechbook run --model smollm2-135m --chapters b4`" in note


def test_a_model_whose_table_lacks_columns_is_left_out(root: Path) -> None:
    _save(root, "odd-model", "a2_tasks_accuracy", accuracy=pd.DataFrame({"task": ["capitals"], "score": [1.0]}))
    assert set(compare.icl_accuracy_table(root).model) == {"small-model", "org/big-model"}


def test_empty_results_folder(tmp_path: Path) -> None:
    assert compare.icl_accuracy_table(tmp_path) is None
    lines = compare.what_held({"icl_accuracy": None, "cross_task": None})
    assert lines == ["- Not yet measured on any model: in-context accuracy (a2), cross-task scores (b4) "
                     "(each section above names the command)."]


def test_what_held_reads_the_tables(root: Path) -> None:
    tables = {"icl_accuracy": compare.icl_accuracy_table(root), "transplant": compare.transplant_table(root),
              "ffn_drop": compare.ffn_ablation_drop(compare.ffn_ablation_table(root)),
              "circuit_overlap": compare.circuit_overlap_table(root)}
    text = "\n".join(compare.what_held(tables, first="small-model"))
    assert "small-model: capitals 50%, past_tense 25%; org/big-model: capitals 90%" in text
    assert "small-model fails less often than the paper's GPT-2 in 4 of 6" in text  # 10% vs 37, 20, 4, 5, 19, 22
    assert "abstractive prompts more accuracy than extractive ones in 1 of 1" in text
    assert "small-model: 2 of 5" not in text  # two tasks only: no row for all three
    assert "Not yet measured" not in text


def test_models_are_ordered_and_coloured_consistently() -> None:
    order = compare.order_models(["b", "GPT-2 (paper)", "a", "c"], first="c")
    assert order == ["c", "a", "b", "GPT-2 (paper)"]
    palette = compare.model_palette(order)
    assert len(set(palette.values())) == 4
    r, g, b = palette["GPT-2 (paper)"]
    assert r == g == b  # the papers' models are grey


def test_figures_draw_every_model(root: Path) -> None:
    transplant = compare.transplant_table(root)
    fig = compare.model_bars(transplant, x="task", y="failure_rate", col="domain", title="t", ylabel="y")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["org/big-model", "small-model", "GPT-2 (paper)"]
    plt.close(fig)
    fig = compare.model_lines(compare.ffn_ablation_table(root), x="fraction_removed", y="accuracy", col="task",
                              style="variant", title="t", xlabel="x", ylabel="y")
    plt.close(fig)


# ----------------------------------------------------------------- results on disk


def test_load_json_per_model(root: Path) -> None:
    circuits = results.load_json("b2_node_pruning", "circuits", root)
    assert list(circuits) == ["small-model"] and circuits["small-model"]["months"]["score"] == 90.0


def test_check_results_names_the_old_folder_and_the_command(root: Path) -> None:
    results.check_results(root)  # all current: no error
    (root / "small-model" / "o_vectors").mkdir()  # not a chapter folder: ignored
    results.check_results(root)
    old = root / "gpt2" / "b2_node_pruning"
    old.mkdir(parents=True)
    with pytest.raises(MechbookError, match=r"no _complete.json.*python -m mechbook run --model gpt2 --chapters b2\)"):
        results.check_results(root)
    results.check_results(root, skip={("gpt2", "b2_node_pruning")})  # about to be rewritten
    old.rmdir()
    marker = root / "org--model" / "a2_tasks_accuracy" / results.MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"model": "org/model", "chapter": "a2_tasks_accuracy", "format": 0}))
    with pytest.raises(MechbookError, match=rf"\(format 0, now {results.FORMAT}\).*--model org/model --chapters a2\)"):
        results.check_results(root)
    with pytest.raises(MechbookError, match="older mechbook"):
        compare.icl_accuracy_table(root)  # the chapter refuses them too, rather than mixing versions


def test_safetensors_header_is_sorted_so_reruns_give_the_same_bytes(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, safe_open

    code = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from mechbook.book.results import sort_safetensors_header\n"
        "meta = {k: k.upper() for k in ['model', 'layer', 'task', 'hook', 'd_model', 'source', 'items', 'format']}\n"
        "save_file({'o': torch.arange(5.0)}, sys.argv[1], metadata=meta)\n"
        "sort_safetensors_header(sys.argv[1])\n"
    )
    paths = [tmp_path / f"o{i}.safetensors" for i in range(3)]
    for path in paths:  # separate processes: the writer's hash order differs between them
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    assert torch.equal(load_file(paths[0])["o"], torch.arange(5.0))
    with safe_open(paths[0], "pt") as f:
        assert f.metadata()["task"] == "TASK"


def test_a_results_root_that_does_not_exist_is_refused_not_reported_empty(tmp_path: Path) -> None:
    """c1 with ``-p results_root=/nonexistent`` used to say "no model has results" and succeed."""
    missing = tmp_path / "nonexistent"
    for table in (compare.icl_accuracy_table, compare.circuit_overlap_table, compare.circuit_size_table):
        with pytest.raises(MechbookError, match=r"^results root '.*nonexistent' is not a folder; pass the folder"):
            table(missing)
    assert compare.icl_accuracy_table(tmp_path) is None  # an existing folder without results: nothing to show


def test_verdict_changes_set_each_verdict_beside_its_earlier_one() -> None:
    """The committed earlier table is a verdicts_table; a claim measured again with a verdict that flips is marked
    moved and changed, one measured again with the same verdict moved only, and the rest neither."""
    earlier = pd.read_csv(compare.EARLIER_VERDICTS)
    assert list(earlier.columns) == ["model", "claim", "task", "condition", "ours", "ci_low", "ci_high", "n",
                                     "paper", "paper_model", "verdict"]
    assert set(earlier.verdict) <= {"holds", "does not hold here", "cannot tell"}
    assert not earlier.duplicated(compare.VERDICT_KEY).any()
    same = compare.verdict_changes(earlier, earlier)
    assert len(same) == len(earlier) and not same.moved.any() and not same.changed.any()

    now = earlier.copy()
    flip = now.index[now.verdict == "holds"][0]  # measured on more prompts: the paper's number now falls outside
    now.loc[flip, ["n", "ci_low", "ci_high"]] = [512, now.loc[flip, "paper"] + 1.0, now.loc[flip, "paper"] + 2.0]
    now.loc[flip, "verdict"] = stats.verdict(now.loc[flip, "paper"], now.loc[flip, "ci_low"],
                                             now.loc[flip, "ci_high"], widest=100.0)
    keep = now.index[now.verdict == "holds"][1]
    now.loc[keep, ["n", "ours"]] = [512, now.loc[keep, "ours"] * 1.01]
    now = now.drop(index=now.index[-1])  # a claim gone from the new table is not compared
    changes = compare.verdict_changes(now, earlier)
    assert len(changes) == len(earlier) - 1
    row = changes.set_index(compare.VERDICT_KEY)
    key = lambda i: tuple(earlier.loc[i, compare.VERDICT_KEY])  # noqa: E731
    assert row.loc[key(flip), "changed"] and row.loc[key(flip), "moved"]
    assert row.loc[key(flip), ["verdict_before", "verdict"]].tolist() == ["holds", "does not hold here"]
    assert row.loc[key(keep), "moved"] and not row.loc[key(keep), "changed"]
    assert changes.moved.sum() == 2 and changes.changed.sum() == 1
    with pytest.raises(MechbookError, match="columns"):
        compare.verdict_changes(now.drop(columns="verdict"), earlier)
    with pytest.raises(MechbookError, match="twice"):
        compare.verdict_changes(pd.concat([now, now.iloc[:1]]), earlier)


def test_circuit_choices_say_how_b2_chose_each_models_circuits() -> None:
    """One pruning where b2 pruned one draw (or saved no draws column), the share and the draws where it pruned
    several; the paper's rows are not measured models."""
    sizes = pd.DataFrame({
        "model": ["a", "a", "b", "gpt2-small (paper)"], "task": ["numerals", "months", "numerals", "numerals"],
        "n_prompts": [512, 512, 16, None], "draws": [5, 5, 1, None], "kept_in": [0.6, 0.6, 0.6, None]})
    assert compare.circuit_choices(sizes) == {"a": "kept in at least 60% of 5 draws of 512 prompts",
                                              "b": "one pruning on 16 prompts"}
    older = sizes.drop(columns=["draws", "kept_in"])
    assert compare.circuit_choices(older)["a"] == "one pruning on 512 prompts"
