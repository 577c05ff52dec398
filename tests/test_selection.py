"""molft.selection's registry and strategies on a hand-made pool of 40 molecules."""

from __future__ import annotations

import dataclasses
from itertools import combinations

import numpy as np
import pytest

from molft.chem import canonical_smiles, morgan_fingerprints, nearest_neighbour_similarity, tanimoto_matrix
from molft.selection import (
    SelectionPool,
    available_strategies,
    pool_budget,
    resolve_budget,
    select,
    strategy_parameters,
)
from molft.valuation import knn_shapley_regression

# Five chemical families, so that a diverse pick has to leave the crowded ones.
SMILES = (
    ["C" * n for n in range(2, 11)]
    + ["C" * n + "O" for n in range(2, 9)]
    + ["c1ccccc1" + s for s in ["", "C", "CC", "O", "N", "Cl", "F", "Br", "C(=O)O", "C#N", "OC"]]
    + ["c1ccncc1", "c1ccoc1", "c1ccsc1", "C1CCNCC1", "C1CCOCC1", "C1CCCCC1", "c1ccc2ccccc2c1"]
    + ["O=C1CCCCC1", "c1cnc2ccccc2c1", "NC(=O)N", "OC(=O)CC(=O)O", "S=C=S", "FC(F)(F)F"]
)
N_POOL = len(SMILES)


@pytest.fixture
def pool() -> SelectionPool:
    rng = np.random.default_rng(0)
    smiles = [canonical_smiles(s) for s in SMILES]
    embeddings = rng.normal(size=(N_POOL, 4))
    labels = embeddings @ np.array([1.0, -0.5, 0.2, 0.0]) + rng.normal(0, 0.1, N_POOL)
    train_emb = rng.normal(size=(20, 4))
    val_emb = rng.normal(size=(15, 4))
    weights = np.array([1.0, -0.5, 0.2, 0.0])
    return SelectionPool(
        smiles=smiles,
        labels=labels,
        influence_scores=rng.normal(size=N_POOL),
        embeddings=embeddings,
        mc_predictions=rng.normal(size=(6, N_POOL)) * rng.uniform(0.1, 2.0, N_POOL),
        train_smiles=["CCO", "c1ccccc1", "CCN", "CC(=O)O"] * 5,
        train_embeddings=train_emb,
        train_labels=train_emb @ weights,
        val_embeddings=val_emb,
        val_labels=val_emb @ weights,
    )


# every strategy with a fixed-size mode, with cheap parameters
FIXED_SIZE = [
    ("influence", {"mode": "top"}),
    ("influence", {"mode": "bottom"}),
    ("random", {}),
    ("uncertainty", {"mode": "top"}),
    ("diversity", {"method": "kmeans", "n_init": 2}),
    ("diversity", {"method": "maxmin"}),
    ("diversity", {"method": "maxmin", "from_train": True}),
    ("stratified", {"n_bins": 4}),
    ("knn_shapley", {"n_neighbors": 3}),
    ("ts_dshapley", {"n_subsets": 8, "subset_size": 10, "n_permutations": 2}),
]


def test_registry_lists_every_strategy():
    expected = {"influence", "random", "uncertainty", "diversity", "stratified", "knn_shapley", "ts_dshapley"}
    assert set(available_strategies()) == expected | {"all", "none"}
    assert strategy_parameters("influence") == {"mode": "top", "percentile": 10.0}


@pytest.mark.parametrize(("strategy", "params"), FIXED_SIZE, ids=lambda v: str(v))
def test_fixed_size_strategies_are_deterministic_and_respect_budget(pool, strategy, params):
    first = select(strategy, pool, 8, seed=3, **params)
    again = select(strategy, pool, 8, seed=3, **params)
    assert len(first) == 8
    assert len(set(first.indices.tolist())) == 8
    assert first.indices.dtype == np.int64
    assert ((first.indices >= 0) & (first.indices < N_POOL)).all()
    np.testing.assert_array_equal(first.indices, again.indices)
    assert first.strategy == strategy and first.seed == 3 and first.budget == 8
    assert {**strategy_parameters(strategy), **params} == first.params
    assert len(select(strategy, pool, 0, seed=3, **params)) == 0


def test_random_depends_on_seed(pool):
    picks = {tuple(select("random", pool, 5, seed=s).indices) for s in range(5)}
    assert len(picks) == 5


def test_influence_top_and_bottom_pick_the_extremes():
    scores = np.array([0.5, -2.0, 0.1, -0.3, 3.0, -0.3, 1.0])
    pool = SelectionPool(smiles=[f"C{i}" for i in range(7)], influence_scores=scores)
    top = select("influence", pool, 3, mode="top")
    np.testing.assert_array_equal(top.indices, [1, 3, 5])  # the tie -0.3 resolved by position
    np.testing.assert_array_equal(top.scores, [-2.0, -0.3, -0.3])
    np.testing.assert_array_equal(select("influence", pool, 2, mode="bottom").indices, [4, 6])
    np.testing.assert_array_equal(select("influence", pool, None, mode="helpful").indices, [1, 3, 5])
    np.testing.assert_array_equal(select("influence", pool, 2, mode="helpful").indices, [1, 3])
    # 30th percentile of the 7 scores is -0.3: everything at or below it
    percentile = select("influence", pool, None, mode="percentile", percentile=30)
    np.testing.assert_array_equal(percentile.indices, [1, 3, 5])
    assert percentile.info["threshold"] == pytest.approx(-0.3)


def test_uncertainty_picks_highest_variance():
    rng = np.random.default_rng(1)
    spread = np.array([0.1, 3.0, 0.5, 2.0, 0.2, 1.0])
    predictions = rng.normal(size=(200, 6)) * spread
    pool = SelectionPool(smiles=[f"C{i}" for i in range(6)], mc_predictions=predictions)
    top = select("uncertainty", pool, 2)
    np.testing.assert_array_equal(top.indices, [1, 3])
    np.testing.assert_allclose(top.scores, predictions[:, [1, 3]].var(axis=0, ddof=1))
    above_median = select("uncertainty", pool, None, mode="percentile", percentile=50)
    np.testing.assert_array_equal(above_median.indices, [1, 3, 5])
    with pytest.raises(ValueError, match="at least 2 MC-dropout passes"):
        select("uncertainty", SelectionPool(smiles=["C"], mc_predictions=[[1.0]]), 1)


def test_stratified_covers_every_label_bin(pool):
    selection = select("stratified", pool, 8, seed=0, n_bins=4)
    edges = np.quantile(pool.labels, [0, 0.25, 0.5, 0.75, 1])
    bins = np.searchsorted(edges[1:-1], pool.labels[selection.indices], side="right")
    np.testing.assert_array_equal(np.bincount(bins, minlength=4), [2, 2, 2, 2])


def test_stratified_largest_remainder_quotas():
    pool = SelectionPool(smiles=[f"C{i}" for i in range(10)], labels=np.arange(10.0))
    selection = select("stratified", pool, 4, seed=0, n_bins=3)
    # quantile bins of 0..9 hold 3, 3 and 4 labels; 4 * [3, 3, 4] / 10 = [1.2, 1.2, 1.6] -> [1, 1, 2]
    assert selection.info["bin_sizes"] == [3, 3, 4]
    assert selection.info["quotas"] == [1, 1, 2]
    assert sorted(np.digitize(selection.indices, [3, 6]).tolist()) == [0, 1, 2, 2]


def test_kmeans_picks_one_representative_per_cluster():
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    embeddings = np.concatenate([c + rng.normal(0, 0.3, size=(10, 2)) for c in centres])
    pool = SelectionPool(smiles=[f"C{i}" for i in range(40)], embeddings=embeddings)
    selection = select("diversity", pool, 4, seed=0, method="kmeans")
    assert sorted((selection.indices // 10).tolist()) == [0, 1, 2, 3]
    for index, distance in zip(selection.indices, selection.scores, strict=True):
        centroid = embeddings[index // 10 * 10 : index // 10 * 10 + 10].mean(axis=0)
        assert distance == pytest.approx(np.linalg.norm(embeddings[index] - centroid))


def _mean_pairwise_similarity(smiles):
    similarity = tanimoto_matrix(morgan_fingerprints(smiles), morgan_fingerprints(smiles))
    return float(np.mean([similarity[i, j] for i, j in combinations(range(len(smiles)), 2)]))


def test_maxmin_is_more_diverse_than_random(pool):
    def diversity_of(selection):
        return _mean_pairwise_similarity([pool.smiles[i] for i in selection.indices])

    maxmin = np.mean([diversity_of(select("diversity", pool, 8, seed=s)) for s in range(5)])
    random = np.mean([diversity_of(select("random", pool, 8, seed=s)) for s in range(20)])
    assert maxmin < 0.5 * random  # about 0.01 vs 0.11 on this pool


def test_maxmin_from_train_moves_away_from_training_data(pool):
    train_fps = morgan_fingerprints(pool.train_smiles)

    def nn_to_train(selection):
        fps = morgan_fingerprints([pool.smiles[i] for i in selection.indices])
        return nearest_neighbour_similarity(fps, train_fps).mean()

    far = np.mean([nn_to_train(select("diversity", pool, 8, seed=s, from_train=True)) for s in range(3)])
    random = np.mean([nn_to_train(select("random", pool, 8, seed=s)) for s in range(20)])
    assert far < random - 0.1  # about 0.07 vs 0.27 on this pool
    no_train = SelectionPool(smiles=pool.smiles)
    with pytest.raises(ValueError, match="train_smiles: the training split"):
        select("diversity", no_train, 3, from_train=True)


def test_knn_shapley_picks_the_highest_values(pool):
    selection = select("knn_shapley", pool, 5, n_neighbors=3)
    values = knn_shapley_regression(
        np.concatenate([pool.train_embeddings, pool.embeddings]),
        np.concatenate([pool.train_labels, pool.labels]),
        pool.val_embeddings,
        pool.val_labels,
        k=3,
    )[20:]
    np.testing.assert_array_equal(selection.indices, np.argsort(-values, kind="stable")[:5])
    np.testing.assert_allclose(selection.scores, np.sort(values)[::-1][:5])


def test_value_strategies_avoid_a_mislabelled_molecule(pool):
    labels = pool.labels.copy()
    labels[7] += 20.0
    noisy = dataclasses.replace(pool, labels=labels)
    assert 7 not in select("knn_shapley", noisy, N_POOL - 1).indices
    top = select("ts_dshapley", noisy, N_POOL - 1, n_subsets=8, subset_size=10, n_permutations=3)
    assert 7 not in top.indices
    pruned = select("ts_dshapley", noisy, None, mode="prune", n_subsets=8, subset_size=10, n_permutations=3)
    assert 7 not in pruned.indices
    assert pruned.info["n_removed"] >= 1 and len(pruned) == N_POOL - pruned.info["n_removed"]
    assert np.all(np.diff(pruned.scores) <= 0)  # survivors listed highest value first


def test_controls_ignore_the_budget(pool):
    np.testing.assert_array_equal(select("all", pool, 3).indices, np.arange(N_POOL))
    assert select("all", pool, 3).budget is None
    assert len(select("none", pool, 3)) == 0


def test_missing_inputs_name_their_source():
    bare = SelectionPool(smiles=["CCO", "CCN"])
    with pytest.raises(ValueError, match="--scores_file"):
        select("influence", bare, 1)
    with pytest.raises(ValueError, match="mc_predictions"):
        select("uncertainty", bare, 1)
    with pytest.raises(ValueError, match="val_embeddings.*val_labels"):
        select(
            "knn_shapley",
            SelectionPool(smiles=["C"], labels=[1.0], embeddings=[[0.0]]),
            1,
            include_train=False,
        )


def test_select_rejects_bad_requests(pool):
    with pytest.raises(ValueError, match="Unknown selection strategy 'best'"):
        select("best", pool, 3)
    with pytest.raises(ValueError, match=r"does not take parameter\(s\) \['mode'\]"):
        select("random", pool, 3, mode="top")
    with pytest.raises(ValueError, match=f"budget 99 exceeds the pool size {N_POOL}"):
        select("random", pool, 99)
    with pytest.raises(ValueError, match="give a budget"):
        select("influence", pool, None, mode="top")
    with pytest.raises(ValueError, match="Unknown influence mode"):
        select("influence", pool, 3, mode="middle")


def test_resolve_budget():
    assert resolve_budget(300, k=30) == 30
    assert resolve_budget(300, fraction=0.1) == 30
    assert resolve_budget(10, fraction=0.25) == 3  # 2.5 rounds half up
    assert resolve_budget(10, fraction=1.0) == 10
    with pytest.raises(ValueError, match="k=301 exceeds the pool size 300"):
        resolve_budget(300, k=301)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(300, k=3, fraction=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(300)
    with pytest.raises(ValueError, match=">= 0"):
        resolve_budget(300, k=-1)
    for fraction in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            resolve_budget(300, fraction=fraction)


def test_pool_budget_names_the_excluded_molecules():
    assert pool_budget(None, None, 8, 10, "pool.csv") is None
    assert pool_budget(3, None, 8, 10, "pool.csv") == 3
    assert pool_budget(None, 0.5, 8, 10, "pool.csv") == 4  # a share of the candidates, not of the file
    with pytest.raises(
        ValueError, match=r"The pool pool.csv has 8 candidates \(2 held-out molecules excluded\)"
    ):
        pool_budget(9, None, 8, 10, "pool.csv")
    with pytest.raises(ValueError, match=r"has 8 candidates\.$"):
        pool_budget(9, None, 8, 8, "pool.csv")
