from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsRegressor

from molft.valuation import knn_shapley_regression, prune_by_value, surrogate_utility, ts_dshapley


def _knn_utility(members, emb, y, val_emb, val_y, k, offset):
    """Jia et al.'s regression utility, written out directly: -(sum of the K nearest labels / K - t)^2."""
    if len(members) == 0:
        predictions = np.zeros(len(val_y))
    else:
        members = np.array(sorted(members))
        dist = np.linalg.norm(val_emb[:, None, :] - emb[None, members, :], axis=2)
        nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
        predictions = (y[members][nearest] - offset).sum(axis=1) / k
    return -np.mean((predictions - (val_y - offset)) ** 2)


def _brute_force_shapley(emb, y, val_emb, val_y, k, center):
    n = len(y)
    offset = y.mean() if center else 0.0
    values = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                with_i = _knn_utility([*coalition, i], emb, y, val_emb, val_y, k, offset)
                without = _knn_utility(list(coalition), emb, y, val_emb, val_y, k, offset)
                values[i] += weight * (with_i - without)
    return values


@pytest.mark.parametrize("n_points", [1, 2, 6])
@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("center", [True, False])
def test_knn_shapley_matches_brute_force(n_points, k, center):
    rng = np.random.default_rng(n_points * 10 + k)
    emb, y = rng.normal(size=(n_points, 3)), rng.normal(2.0, 1.0, n_points)
    val_emb, val_y = rng.normal(size=(4, 3)), rng.normal(2.0, 1.0, 4)
    exact = knn_shapley_regression(emb, y, val_emb, val_y, k, center=center)
    np.testing.assert_allclose(exact, _brute_force_shapley(emb, y, val_emb, val_y, k, center), atol=1e-12)


def test_knn_shapley_hand_computed_two_points():
    # 1-NN, validation point at 0.2 with label 1: U({}) = -1, U({a}) = 0, U({b}) = -4, U({a, b}) = 0
    values = knn_shapley_regression([[0.0], [1.0]], [1.0, 3.0], [[0.2]], [1.0], k=1, center=False)
    np.testing.assert_allclose(values, [2.5, -1.5])


def test_knn_shapley_values_sum_to_full_minus_empty_utility():
    rng = np.random.default_rng(3)
    emb, y = rng.normal(size=(80, 4)), rng.normal(size=80)
    val_emb, val_y = rng.normal(size=(25, 4)), rng.normal(size=25)
    values = knn_shapley_regression(emb, y, val_emb, val_y, k=5, chunk_size=7)
    offset = y.mean()
    full_prediction = KNeighborsRegressor(n_neighbors=5).fit(emb, y).predict(val_emb)
    full = -np.mean((full_prediction - val_y) ** 2)
    empty = -np.mean((val_y - offset) ** 2)  # the empty coalition predicts the training mean
    assert values.sum() == pytest.approx(full - empty, abs=1e-10)


def test_knn_shapley_centered_values_ignore_label_offset():
    rng = np.random.default_rng(4)
    emb, y = rng.normal(size=(30, 2)), rng.normal(size=30)
    val_emb, val_y = rng.normal(size=(10, 2)), rng.normal(size=10)
    base = knn_shapley_regression(emb, y, val_emb, val_y, k=3)
    shifted = knn_shapley_regression(emb, y + 10.0, val_emb, val_y + 10.0, k=3)
    np.testing.assert_allclose(base, shifted, atol=1e-10)


def test_knn_shapley_gives_mislabelled_point_lowest_value():
    emb, y, val_emb, val_y = _line_with_planted_error()
    values = knn_shapley_regression(emb, y, val_emb, val_y, k=3)
    assert int(np.argmin(values)) == 13


def test_knn_shapley_rejects_bad_input():
    emb, y = np.zeros((3, 2)), np.zeros(3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn_shapley_regression(emb, y, emb, y, k=0)
    with pytest.raises(ValueError, match="dimensions"):
        knn_shapley_regression(emb, y, np.zeros((2, 5)), np.zeros(2))
    with pytest.raises(ValueError, match=r"train labels are not finite at positions \[1\]"):
        knn_shapley_regression(emb, [0.0, np.nan, 0.0], emb, y)


def _line_with_planted_error():
    """30 molecules on a line in embedding space, y = 2x + noise, with molecule 13 mislabelled."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 30)
    y = 2 * x + rng.normal(0, 0.05, 30)
    y[13] += 3.0
    val_x = np.linspace(0.02, 0.98, 20)
    return np.stack([x, np.zeros(30)], axis=1), y, np.stack([val_x, np.zeros(20)], axis=1), 2 * val_x


@pytest.mark.parametrize(("model", "seed"), [("ridge", 0), ("ridge", 1), ("knn", 0)])
def test_ts_dshapley_gives_mislabelled_point_lowest_value(model, seed):
    emb, y, val_emb, val_y = _line_with_planted_error()
    result = ts_dshapley(
        emb,
        y,
        val_emb,
        val_y,
        n_subsets=12,
        subset_size=10,
        n_permutations=5,
        model=model,
        seed=seed,
        ridge_alpha=0.1,
        n_neighbors=3,
    )
    assert int(np.argmin(result.values)) == 13
    # 12 subsets of 10 over 30 points: every point valued exactly 4 times
    np.testing.assert_array_equal(result.n_evaluations, np.full(30, 4))
    # per subset: one fit on the whole subset + 9 per permutation (the last prefix is the subset itself)
    assert result.n_model_fits == 12 * (1 + 5 * 9)
    assert result.seconds >= 0


def test_ts_dshapley_is_deterministic_per_seed():
    emb, y, val_emb, val_y = _line_with_planted_error()
    kwargs = dict(n_subsets=4, subset_size=8, n_permutations=3, ridge_alpha=0.1)
    first = ts_dshapley(emb, y, val_emb, val_y, seed=5, **kwargs)
    again = ts_dshapley(emb, y, val_emb, val_y, seed=5, **kwargs)
    other = ts_dshapley(emb, y, val_emb, val_y, seed=6, **kwargs)
    np.testing.assert_array_equal(first.values, again.values)
    assert not np.array_equal(first.values, other.values)


def test_ts_dshapley_single_subset_values_sum_to_full_minus_empty_utility():
    # without truncation the marginals of each permutation telescope to U(subset) - U(empty)
    emb, y, val_emb, val_y = _line_with_planted_error()
    result = ts_dshapley(
        emb, y, val_emb, val_y, n_subsets=1, subset_size=30, n_permutations=2, ridge_alpha=0.1
    )
    full = surrogate_utility(emb, y, val_emb, val_y, ridge_alpha=0.1)
    empty = -np.mean((y.mean() - val_y) ** 2)
    assert result.values.sum() == pytest.approx(full - empty, abs=1e-9)


def test_ts_dshapley_truncation_saves_fits():
    emb, y, val_emb, val_y = _line_with_planted_error()
    kwargs = dict(n_subsets=3, subset_size=10, n_permutations=4, ridge_alpha=0.1, seed=0)
    exact = ts_dshapley(emb, y, val_emb, val_y, **kwargs)
    truncated = ts_dshapley(emb, y, val_emb, val_y, truncation_tol=0.5, **kwargs)
    assert truncated.n_model_fits < exact.n_model_fits


def test_ts_dshapley_balances_coverage_and_rejects_too_few_subsets():
    emb, y, val_emb, val_y = _line_with_planted_error()
    result = ts_dshapley(emb, y, val_emb, val_y, n_subsets=7, subset_size=8, n_permutations=1)
    assert result.n_evaluations.sum() == 56
    assert result.n_evaluations.max() - result.n_evaluations.min() <= 1
    with pytest.raises(ValueError, match="n_subsets >= 4"):
        ts_dshapley(emb, y, val_emb, val_y, n_subsets=3, subset_size=8)
    with pytest.raises(ValueError, match="Unknown surrogate model"):
        ts_dshapley(emb, y, val_emb, val_y, model="forest")


def test_prune_by_value_stops_when_utility_stops_improving():
    values = np.array([5.0, -3.0, 1.0, -1.0, 2.0])

    def utility(kept):
        return float(values[kept].sum())

    result = prune_by_value(values, utility, chunk_size=1)
    np.testing.assert_array_equal(result.kept, [0, 2, 4])
    np.testing.assert_array_equal(result.removed, [1, 3])
    assert result.utilities == [4.0, 7.0, 8.0, 7.0]
    assert result.n_utility_calls == 4

    chunked = prune_by_value(values, utility, chunk_size=2)
    np.testing.assert_array_equal(chunked.kept, [0, 2, 4])
    assert chunked.utilities == [4.0, 8.0, 5.0]


def test_prune_by_value_keeps_at_least_min_kept():
    values = np.array([-1.0, -2.0, -3.0])
    result = prune_by_value(values, lambda kept: -float(len(kept)), chunk_size=1, min_kept=1)
    np.testing.assert_array_equal(result.kept, [0])
    with pytest.raises(ValueError, match="not finite at positions"):
        prune_by_value(np.array([1.0, np.nan]), lambda kept: 0.0)
