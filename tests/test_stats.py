from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from molft.stats import holm_correction, paired_comparison, summarize


def test_summarize_matches_t_interval_by_hand():
    summary = summarize([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)
    half_width = stats.t.ppf(0.975, df=3) * std / 2
    assert summary["n"] == 4
    assert summary["mean"] == pytest.approx(2.5)
    assert summary["std"] == pytest.approx(std)
    assert summary["sem"] == pytest.approx(std / 2)
    assert summary["ci_low"] == pytest.approx(2.5 - half_width)
    assert summary["ci_high"] == pytest.approx(2.5 + half_width)
    # t(3) is wider than the normal approximation
    assert half_width > 1.96 * std / 2


def test_summarize_single_value_has_no_interval():
    summary = summarize([0.7])
    assert summary["n"] == 1 and summary["mean"] == 0.7
    assert all(math.isnan(summary[k]) for k in ("std", "sem", "ci_low", "ci_high"))


def test_summarize_constant_values_give_a_zero_width_interval():
    summary = summarize([0.5, 0.5, 0.5])
    assert (summary["ci_low"], summary["ci_high"]) == (0.5, 0.5)


@pytest.mark.parametrize(("values", "message"), [([], "empty"), ([1.0, np.nan], "non-finite")])
def test_summarize_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        summarize(values)


def test_wilcoxon_exact_p_for_tiny_case():
    # diffs -0.4, -0.3, -0.1, +0.2: the only positive one has rank 2, so R+ = 2. Of the 16 equally likely
    # sign patterns, 3 give R+ <= 2 ({}, {1}, {2}); two-sided p = 2 * 3/16.
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = a - np.array([-0.4, -0.3, -0.1, 0.2])
    result = paired_comparison(a, b, test="wilcoxon")
    assert result["p_value"] == pytest.approx(6 / 16)
    assert result["mean_diff"] == pytest.approx(-0.15)
    assert result["n"] == 4 and result["test"] == "wilcoxon"
    assert result["note"] == "smallest possible p with 4 non-zero pair(s) is 0.125"


def test_wilcoxon_all_one_sign_three_pairs():
    result = paired_comparison([1.0, 2.0, 3.0], [1.5, 2.2, 3.9])
    assert result["p_value"] == pytest.approx(2 / 8)


def test_wilcoxon_drops_zero_differences():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    b = a - np.array([0.0, -0.4, -0.3, -0.1, 0.2])
    result = paired_comparison(a, b)
    assert result["n"] == 5
    assert result["p_value"] == pytest.approx(6 / 16)  # same as without the zero pair


def test_ttest_and_interval_match_hand_computation():
    a = [0.70, 0.65, 0.80, 0.72]
    b = [0.75, 0.70, 0.78, 0.80]
    diff = np.array([-0.05, -0.05, 0.02, -0.08])
    mean, sd = diff.mean(), diff.std(ddof=1)
    sem = sd / 2
    t_stat = mean / sem
    result = paired_comparison(a, b, test="ttest")
    assert result["mean_diff"] == pytest.approx(-0.04)
    assert result["std_diff"] == pytest.approx(sd)
    assert result["ci_low"] == pytest.approx(mean - stats.t.ppf(0.975, 3) * sem)
    assert result["ci_high"] == pytest.approx(mean + stats.t.ppf(0.975, 3) * sem)
    assert result["p_value"] == pytest.approx(2 * stats.t.sf(abs(t_stat), 3))


def test_single_pair_gives_nan_p_with_note():
    result = paired_comparison([1.0], [2.0])
    assert result["mean_diff"] == -1.0
    assert math.isnan(result["p_value"]) and math.isnan(result["ci_low"])
    assert "1 pair" in result["note"]


@pytest.mark.parametrize("test", ["wilcoxon", "ttest"])
def test_identical_samples_give_p_one(test):
    result = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], test=test)
    assert result["p_value"] == 1.0
    assert result["mean_diff"] == 0.0 and result["ci_low"] == 0.0
    assert result["note"] == "all differences are zero"


def test_paired_comparison_rejects_bad_input():
    with pytest.raises(ValueError, match="align"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="Unknown paired test"):
        paired_comparison([1.0, 2.0], [1.0, 3.0], test="mannwhitney")


def test_holm_correction_by_hand():
    # sorted p: 0.01 * 3, 0.03 * 2, 0.04 * 1 -> 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    adjusted = holm_correction([0.01, 0.04, 0.03, np.nan])
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    np.testing.assert_allclose(holm_correction([0.5, 0.6]), [1.0, 1.0])
    assert holm_correction([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_correction([1.5])
