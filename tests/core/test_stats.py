"""Intervals over prompts and the verdicts c1 draws from them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mechbook.book import across_models
from mechbook.core import stats


def _wilson_by_inversion(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson interval as its definition: every p whose score test does not reject k of n (fine grid)."""
    p = np.linspace(0, 1, 2_000_001)
    with np.errstate(divide="ignore", invalid="ignore"):
        accepted = np.abs(k / n - p) <= z * np.sqrt(p * (1 - p) / n)
    accepted |= (p == k / n)
    inside = p[accepted]
    return inside.min(), inside.max()


@pytest.mark.parametrize("k, n", [(0, 4), (4, 4), (5, 10), (4, 40), (22, 40), (1, 38)])
def test_wilson_matches_the_score_test_inverted(k, n):
    low, high = stats.wilson_interval(k, n)
    ref_low, ref_high = _wilson_by_inversion(k, n)
    assert low == pytest.approx(ref_low, abs=2e-6) and high == pytest.approx(ref_high, abs=2e-6)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        stats.wilson_interval(5, 4)
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))


def test_difference_interval_matches_newcombe_1998():
    """Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339."""
    low, high = stats.difference_interval(56, 70, 48, 80)
    assert low == pytest.approx(0.0524, abs=1e-4) and high == pytest.approx(0.3339, abs=1e-4)


@pytest.mark.parametrize(
    "paper, low, high, expected",
    [(0.37, 0.04, 0.23, stats.DOES_NOT_HOLD), (0.19, 0.12, 0.38, stats.HOLDS),
     (0.2, 0.0, 0.6, stats.CANNOT_TELL), (0.2, float("nan"), float("nan"), stats.CANNOT_TELL)],
)
def test_verdict(paper, low, high, expected):
    assert stats.verdict(paper, low, high) == expected


def test_verdicts_table_reads_counts_and_paper_numbers():
    transplant = pd.DataFrame({
        "model": ["m", "m", "GPT-2 (paper)", "GPT-2 (paper)"],
        "task": ["capitals", "capitals", "capitals", "capitals"],
        "domain": ["in-domain", "out-of-domain", "in-domain", "out-of-domain"],
        "failure_rate": [4 / 40, 13 / 29, 0.37, 0.20], "n": [40, 29, np.nan, np.nan],
    })
    drop = pd.DataFrame({
        "model": ["m", "BLOOM-176B (paper)"], "task": ["capitalize", "capitalize"],
        "variant": ["abstractive", "abstractive"], "accuracy_intact": [26 / 32, np.nan],
        "accuracy_after": [7 / 32, np.nan], "drop": [19 / 32, 0.73], "n_intact": [32, np.nan], "n_after": [32, np.nan],
    })
    table = across_models.verdicts_table({"transplant": transplant, "ffn_drop": drop})
    assert list(table.verdict) == [stats.DOES_NOT_HOLD, stats.DOES_NOT_HOLD, stats.HOLDS]
    assert (table.ci_low.iloc[0], table.ci_high.iloc[0]) == stats.wilson_interval(4, 40)
    assert (table.ci_low.iloc[2], table.ci_high.iloc[2]) == stats.difference_interval(26, 32, 7, 32)
    assert list(table.paper) == [0.37, 0.20, 0.73]
    line = [x for x in across_models.what_held({"verdicts": table}) if x.startswith("- Verdicts")][0]
    assert "m: holds 1, does not hold here 2, cannot tell 0 (of 3)" in line

    # cross-task scores are in percent: an interval is "too wide to tell" from 50 points, not from 0.5
    cross = pd.DataFrame({
        "model": ["m", "m", "m", "GPT-2 small (paper)", "GPT-2 small (paper)"],
        "circuit_task": ["numerals", "numwords", "months", "numerals", "numwords"],
        "eval_task": ["numwords", "numerals", "numerals", "numwords", "numerals"],
        "score": [59.3, 70.7, 89.6, 48.4, 87.3], "score_low": [50.1, 61.0, 20.0, np.nan, np.nan],
        "score_high": [68.2, 80.0, 95.0, np.nan, np.nan], "n_prompts": [8, 8, 8, np.nan, np.nan],
    })
    judged = across_models.verdicts_table({"cross_task": cross})
    assert list(judged.task) == ["numerals circuit", "numwords circuit"]  # months has no paper number
    assert list(judged.verdict) == [stats.DOES_NOT_HOLD, stats.DOES_NOT_HOLD]
    assert list(judged.paper) == [48.4, 87.3] and list(judged.n) == [8, 8]
    wide = cross.assign(score_low=[10.0, 61.0, 20.0, np.nan, np.nan])
    assert list(across_models.verdicts_table({"cross_task": wide}).verdict) == [stats.CANNOT_TELL,
                                                                               stats.DOES_NOT_HOLD]
    inside = cross.assign(score_high=[68.2, 90.0, 95.0, np.nan, np.nan])
    assert list(across_models.verdicts_table({"cross_task": inside}).verdict) == [stats.DOES_NOT_HOLD,
                                                                                 stats.HOLDS]


def test_bootstrap_ratio_interval_equals_the_resampling_loop_written_out():
    from mechbook.core.stats import bootstrap_ratio_interval

    rng = np.random.default_rng(5)
    den = rng.normal(4.0, 1.0, 12)
    num = 0.8 * den + rng.normal(0, 0.5, 12)
    low, high = bootstrap_ratio_interval(num, den, n_boot=500, seed=3)
    draws = np.random.default_rng(3).integers(0, 12, size=(500, 12))
    ratios = sorted(100 * sum(num[i] for i in row) / sum(den[i] for i in row) for row in draws)
    assert low == pytest.approx(np.quantile(ratios, 0.025)) and high == pytest.approx(np.quantile(ratios, 0.975))
    assert low < 100 * num.mean() / den.mean() < high
    # more prompts, narrower interval
    wide = bootstrap_ratio_interval(num[:4], den[:4], seed=3)
    assert wide[1] - wide[0] > high - low
    assert all(np.isnan(bootstrap_ratio_interval(num[:1], den[:1])))
    with pytest.raises(ValueError, match="paired"):
        bootstrap_ratio_interval(num, den[:5])


def test_difference_interval_of_an_empty_group_is_undefined():
    """No trials: no proportion, so no difference either; (nan, nan) as wilson_interval gives, and c1 cannot tell."""
    low, high = stats.difference_interval(0, 0, 1, 2)
    assert math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in stats.difference_interval(1, 2, 0, 0))
    assert stats.verdict(0.1, low, high) == stats.CANNOT_TELL
    with pytest.raises(stats.MechbookError, match="0 <= successes <= n, got 3 of 2"):
        stats.difference_interval(3, 2, 1, 2)


def test_counts_quantiles_and_intervals_are_checked():
    from mechbook.core.errors import MechbookError

    for args, match in (((2.5, 5), "whole number"), (("3", 5), "whole number"), ((None, 5), "whole number"),
                        ((True, 2), "whole number"), ((1, 5.5), "whole number"), ((1, float("inf")), "whole number")):
        with pytest.raises(MechbookError, match=match):
            stats.wilson_interval(*args)
    for z in (-1.96, 0, float("nan")):
        with pytest.raises(MechbookError, match="positive quantile"):
            stats.wilson_interval(1, 5, z=z)
    assert stats.wilson_interval(np.int64(2), np.int64(5)) == stats.wilson_interval(2, 5)
    with pytest.raises(MechbookError, match="whole number"):
        stats.difference_interval(1, 2, "1", 2)
    for args, match in ((("a", 0, 1), "must be a number"), ((None, 0.4, 0.6), "must be a number"),
                        ((0.5, 0.9, 0.1), "low end above its high end")):
        with pytest.raises(MechbookError, match=match):
            stats.verdict(*args)
    with pytest.raises(MechbookError, match="positive width"):
        stats.verdict(0.5, 0.4, 0.6, widest=-1)
    ones = np.ones(3)
    for num, den, match in ((np.array([1.0, np.nan, 2]), ones, "NaN or inf"), (np.array([1.0, np.inf, 2]), ones, "NaN"),
                            (ones, np.zeros(3), "not positive"), (["a", "b"], ["c", "d"], "numbers per prompt")):
        with pytest.raises(MechbookError, match=match):
            stats.bootstrap_ratio_interval(num, den)
    for kwargs in ({"n_boot": 2.5}, {"n_boot": "10"}, {"seed": -1}):
        with pytest.raises(MechbookError):
            stats.bootstrap_ratio_interval(ones, ones, **kwargs)
    with pytest.raises(MechbookError, match="two collections"):
        stats.jaccard(None, [1])


def test_seeded_numpy_repeats_its_draws_and_restores_the_callers_generator():
    from mechbook.core.stats import seeded_numpy

    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    with seeded_numpy(5):
        first = np.random.random(3)
    with seeded_numpy(5):
        again = np.random.random(3)
    assert np.array_equal(first, again)
    assert np.random.random() == expected_next  # the caller's stream goes on as if nothing had drawn
