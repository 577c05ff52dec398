"""molft.influence.lds_stats: the seeds' agreement and the reliability of their mean, at the edges."""

from __future__ import annotations

import numpy as np
import pytest

from molft.influence.lds_stats import json_number, seed_agreement


def test_one_seed_has_no_agreement_and_two_give_the_ceiling_and_its_spearman_brown():
    x = np.arange(8.0)
    assert seed_agreement({1: x}) is None
    agreement = seed_agreement({1: x, 2: x**3})  # same ranks: r = 1, reliability 1
    assert agreement == {"pairs": {"1-2": 1.0}, "mean_pair": 1.0, "seed_mean_reliability": 1.0, "seeds": 2}
    noisy = seed_agreement({1: x, 2: np.array([1, 0, 3, 2, 5, 4, 7, 6.0])})
    r = noisy["pairs"]["1-2"]
    assert 0 < r < 1 and noisy["seed_mean_reliability"] == pytest.approx(2 * r / (1 + r))


def test_seeds_that_disagree_have_no_reliability_and_constant_changes_no_ranks():
    x = np.arange(6.0)
    assert (
        seed_agreement({1: x, 2: -x, 3: x})["seed_mean_reliability"] is None
    )  # r = -1/3: nothing to build on
    flat = seed_agreement({1: np.zeros(6), 2: x})
    assert flat["pairs"] == {"1-2": None} and flat["mean_pair"] is None and flat["seeds"] == 2
    assert json_number(float("nan")) is None and json_number(0.5) == 0.5
