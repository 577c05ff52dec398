from __future__ import annotations

import json
import sys
import types
from contextlib import contextmanager
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from molft.chem import canonical_smiles, morgan_fingerprints, nearest_neighbour_similarity, tanimoto_matrix
from molft.data import dataset_fingerprint
from molft.selection import (
    Selection,
    SelectionPool,
    available_strategies,
    check_scores_match_pool,
    load_pool,
    mc_dropout_predictions,
    merge_selected_into_train,
    resolve_budget,
    select,
    selection_manifest,
    strategy_parameters,
    write_selection,
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
    noisy = SelectionPool(
        smiles=pool.smiles,
        labels=labels,
        embeddings=pool.embeddings,
        train_embeddings=pool.train_embeddings,
        train_labels=pool.train_labels,
        val_embeddings=pool.val_embeddings,
        val_labels=pool.val_labels,
    )
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


def test_pool_validates_shapes():
    with pytest.raises(ValueError, match=r"embeddings must be 2-D \[2, D\]"):
        SelectionPool(smiles=["C", "CC"], embeddings=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"influence_scores are missing or not finite at positions \[1\]"):
        SelectionPool(smiles=["C", "CC"], influence_scores=[0.1, np.nan])
    with pytest.raises(ValueError, match="Embedding sizes differ"):
        SelectionPool(
            smiles=["C"], embeddings=np.zeros((1, 4)), val_embeddings=np.zeros((2, 3)), val_labels=[1, 2]
        )


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


def _pool_frame():
    return pd.DataFrame({"smiles": ["CCO", "c1ccccc1", "CCN"], "label": [1.0, 2.0, 3.0]})


def test_check_scores_match_pool_aligns_by_index():
    scores = pd.DataFrame(
        {"index": [2, 0, 1], "smiles": ["NCC", "OCC", "C1=CC=CC=C1"], "score": [-3.0, -1.0, -2.0]}
    )
    np.testing.assert_array_equal(check_scores_match_pool(scores, _pool_frame()), [-1.0, -2.0, -3.0])


def test_check_scores_match_pool_rejects_another_pool():
    other = pd.DataFrame({"index": [0, 1, 2], "smiles": ["CCO", "CCCl", "CCN"], "score": [0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="another pool"):
        check_scores_match_pool(other, _pool_frame())
    shorter = pd.DataFrame({"smiles": ["CCO", "c1ccccc1"], "score": [0.0, 0.0]})
    with pytest.raises(ValueError, match="2 rows but the pool has 3"):
        check_scores_match_pool(shorter, _pool_frame())
    with pytest.raises(ValueError, match="lacks column"):
        check_scores_match_pool(shorter.rename(columns={"score": "value"}), _pool_frame())


def test_manifest_and_outputs_round_trip(tmp_path):
    frame = _pool_frame()
    selection = Selection(
        np.array([2, 0]), np.array([-0.5, 0.25]), "influence", {"mode": "top"}, seed=1, budget=2
    )
    fingerprint = dataset_fingerprint(frame["smiles"])
    manifest = selection_manifest(selection, "pool.csv", fingerprint)
    train = pd.DataFrame({"CMPD_CHEMBLID": ["a"], "exp": [0.5], "smiles": ["CC"]})
    merged = merge_selected_into_train(train, frame, selection, label_column="exp")
    paths = write_selection(tmp_path, frame, selection, manifest, merged)

    written = json.loads(paths["manifest"].read_text())
    assert written["indices"] == [2, 0] and written["scores"] == [-0.5, 0.25]
    assert (
        written["strategy"] == "influence" and written["seed"] == 1 and written["params"] == {"mode": "top"}
    )
    assert written["pool_sha256"] == fingerprint and written["pool_file"] == "pool.csv"
    chosen = pd.read_csv(paths["selected"])
    assert chosen.columns.tolist() == ["rank", "index", "smiles", "label", "score"]
    assert chosen["rank"].tolist() == [1, 2] and chosen["smiles"].tolist() == ["CCN", "CCO"]
    assert chosen["label"].tolist() == [3.0, 1.0]
    merged_back = pd.read_csv(paths["merged_train"])
    assert merged_back["smiles"].tolist() == ["CC", "CCN", "CCO"]
    assert merged_back["exp"].tolist() == [0.5, 3.0, 1.0]
    assert merged_back["source"].tolist() == ["train", "external", "external"]


def test_merge_handles_molecules_already_in_train():
    selection = Selection(np.array([0, 2]), None, "random", {}, seed=0)
    train = pd.DataFrame({"smiles": ["OCC"], "label": [9.0]})  # same molecule as pool index 0
    assert len(merge_selected_into_train(train, _pool_frame(), selection)) == 3
    dropped = merge_selected_into_train(train, _pool_frame(), selection, duplicates="drop")
    assert dropped["smiles"].tolist() == ["OCC", "CCN"]
    with pytest.raises(
        ValueError, match=r"1 chosen molecules are already in the training set \(pool indices \[0\]\)"
    ):
        merge_selected_into_train(train, _pool_frame(), selection, duplicates="error")


def test_load_pool_keeps_every_row_and_reports_bad_ones(tmp_path):
    good = tmp_path / "pool.csv"
    good.write_text("SMILES,Label\nOCC,1.5\nC1=CC=CC=C1,2.0\n")
    frame = load_pool(good)
    assert frame["canonical_smiles"].tolist() == ["CCO", "c1ccccc1"]
    assert frame["label"].tolist() == [1.5, 2.0] and frame["row"].tolist() == [0, 1]
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("smiles\nCCO\n")
    assert "label" not in load_pool(unlabelled, require_labels=False).columns
    with pytest.raises(ValueError, match="No label column"):
        load_pool(unlabelled)
    bad = tmp_path / "bad.csv"
    bad.write_text("SMILES,Label\nCCO,1.0\nC1CC,2.0\n")
    with pytest.raises(ValueError, match="row 1: 'C1CC'"):  # an error, never a silently shifted index
        load_pool(bad)


# ---------------------------------------------------------------------------------------------------------
# MC dropout


def _tiny_model(p: float):
    torch = pytest.importorskip("torch")

    class TinyRegressor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(12, 8)
            self.norm = torch.nn.BatchNorm1d(8)
            self.dropout = torch.nn.Dropout(p)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).float()
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
            return types.SimpleNamespace(logits=self.head(self.dropout(self.norm(pooled))))

    torch.manual_seed(0)
    model = TinyRegressor()
    model.eval()
    ids = torch.randint(0, 12, (10, 5))
    mask = torch.ones(10, 5, dtype=torch.long)
    batches = [{"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4]} for i in range(0, 10, 4)]
    return torch, model, batches


def test_mc_dropout_is_seeded_and_restores_the_model():
    torch, model, batches = _tiny_model(0.5)
    running_mean = model.norm.running_mean.clone()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = mc_dropout_predictions(model, batches, n_passes=5, seed=0)
    assert torch.rand(1) == expected_next  # the caller's random stream is untouched
    again = mc_dropout_predictions(model, iter(batches), n_passes=5, seed=0)
    other = mc_dropout_predictions(model, batches, n_passes=5, seed=1)
    assert first.shape == (5, 10)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (first.var(axis=0) > 0).all()
    assert not model.training and not model.dropout.training
    assert torch.equal(model.norm.running_mean, running_mean)  # batch norm stayed in eval mode


def test_mc_dropout_without_dropout_matches_eval_predictions():
    torch, model, batches = _tiny_model(0.0)
    with torch.no_grad():
        expected = torch.cat([model(**b).logits[:, 0] for b in batches]).double().numpy()
    predictions = mc_dropout_predictions(model, batches, n_passes=3, seed=0)
    np.testing.assert_allclose(predictions, np.tile(expected, (3, 1)), rtol=1e-6)


def test_mc_dropout_pins_feature_maps_when_available(monkeypatch):
    _, model, batches = _tiny_model(0.5)
    events = []

    @contextmanager
    def fixed_feature_maps(m):
        events.append(("enter", m is model))
        yield
        events.append(("exit", m is model))

    fake = types.ModuleType("molft.model_utils")
    fake.fixed_feature_maps = fixed_feature_maps
    monkeypatch.setitem(sys.modules, "molft.model_utils", fake)
    mc_dropout_predictions(model, batches, n_passes=2, seed=0)
    assert events == [("enter", True), ("exit", True)]
    monkeypatch.setitem(sys.modules, "molft.model_utils", None)  # import fails: runs without pinning
    assert mc_dropout_predictions(model, batches, n_passes=2, seed=0).shape == (2, 10)


def test_mc_dropout_custom_forward_and_shape_check():
    _, model, batches = _tiny_model(0.5)
    predictions = mc_dropout_predictions(
        model, batches, n_passes=2, seed=0, forward_fn=lambda m, b: m(**b).logits[:, 0] * 0 + 1
    )
    np.testing.assert_array_equal(predictions, np.ones((2, 10)))
    with pytest.raises(ValueError, match="one prediction per molecule"):
        mc_dropout_predictions(
            model, batches, n_passes=1, seed=0, forward_fn=lambda m, b: m(**b).logits.repeat(1, 2)
        )
