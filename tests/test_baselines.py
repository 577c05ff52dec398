"""molft.baselines: the ECFP4 random forest scores as scikit-learn does by hand, and masks missing labels per target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem
from rdkit.Chem import rdFingerprintGenerator
from sklearn import metrics as skm
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

from molft import baselines

SMILES = [
    "CCO", "CCN", "CCC", "CCCl", "c1ccccc1", "c1ccccc1O", "c1ccccc1N", "CC(=O)O", "CC(=O)N", "CCOC",
    "c1ccncc1", "C1CCCCC1", "CC(C)O", "OCCO", "c1ccc(Cl)cc1", "CC#N", "NCCN", "c1ccc2ccccc2c1", "CCS", "CCBr",
]  # fmt: skip
N_TRAIN = 14
TREES = 7


def sklearn_fingerprints(smiles: list[str]) -> np.ndarray:
    """ECFP4 computed here straight from RDKit, not through molft."""
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return np.array([generator.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)) for s in smiles])


@pytest.fixture
def table() -> pd.DataFrame:
    rng = np.random.RandomState(0)
    frame = pd.DataFrame({"canonical_smiles": SMILES, "y": rng.normal(2.0, 1.0, len(SMILES)).round(2)})
    frame["active"] = (frame["y"] > 2.0).astype(int)
    return frame


def test_ecfp4_is_rdkit_morgan_radius_2_2048_bits():
    assert np.array_equal(baselines.ecfp4(SMILES), sklearn_fingerprints(SMILES))
    with pytest.raises(ValueError, match="position 1"):
        baselines.ecfp4(["CCO", "C1CC"])


def test_regression_metrics_equal_a_direct_scikit_learn_forest(table):
    train, test = table.iloc[:N_TRAIN], table.iloc[N_TRAIN:]
    metrics, predictions = baselines.forest_baseline(train, test, ["y"], n_estimators=TREES, seed=3)

    forest = RandomForestRegressor(n_estimators=TREES, random_state=3)
    forest.fit(sklearn_fingerprints(train["canonical_smiles"].tolist()), train["y"])
    expected = forest.predict(sklearn_fingerprints(test["canonical_smiles"].tolist()))
    assert np.allclose(predictions["prediction"], expected)
    assert metrics["test_rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(test["y"], expected)))
    assert metrics["test_mae"] == pytest.approx(skm.mean_absolute_error(test["y"], expected))
    assert metrics["test_r2"] == pytest.approx(skm.r2_score(test["y"], expected))
    assert metrics["n_train"] == N_TRAIN
    # the seed is used: another seed gives another forest
    other, _ = baselines.forest_baseline(train, test, ["y"], n_estimators=TREES, seed=4)
    assert other["test_rmse"] != metrics["test_rmse"]


def test_binary_classification_metrics_equal_scikit_learn(table):
    train, test = table.iloc[:N_TRAIN], table.iloc[N_TRAIN:]
    metrics, predictions = baselines.forest_baseline(
        train, test, ["active"], baselines.SINGLE_LABEL, n_estimators=TREES, seed=0
    )
    forest = RandomForestClassifier(n_estimators=TREES, random_state=0)
    forest.fit(sklearn_fingerprints(train["canonical_smiles"].tolist()), train["active"])
    proba = forest.predict_proba(sklearn_fingerprints(test["canonical_smiles"].tolist()))[:, 1]
    predicted = (proba > 0.5).astype(int)  # the most probable class, as the fine-tuned model predicts
    y = test["active"].to_numpy()
    assert set(y) == {0, 1}
    assert np.allclose(predictions["probability_1"], proba)
    assert metrics["test_roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba))
    assert metrics["test_pr_auc"] == pytest.approx(skm.average_precision_score(y, proba))
    assert metrics["test_accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert metrics["test_f1"] == pytest.approx(skm.f1_score(y, predicted))
    assert metrics["test_mcc"] == pytest.approx(skm.matthews_corrcoef(y, predicted))


def test_multiclass_metrics_are_one_vs_rest_macro_means():
    rng = np.random.RandomState(1)
    y = np.array(["a", "b", "c"] * 6)
    proba = rng.dirichlet(np.ones(3), size=len(y))
    metrics = baselines.classification_metrics(y, proba, np.array(["a", "b", "c"]))
    assert metrics["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    )
    onehot = np.stack([y == c for c in "abc"], axis=1)
    assert metrics["pr_auc"] == pytest.approx(skm.average_precision_score(onehot, proba, average="macro"))
    predicted = np.array(list("abc"))[proba.argmax(axis=1)]
    assert metrics["f1"] == pytest.approx(skm.f1_score(y, predicted, average="macro"))
    with pytest.raises(ValueError, match=r"test labels \['d'\]"):
        baselines.classification_metrics(np.array(["a", "d"]), proba[:2], np.array(["a", "b", "c"]))


def test_missing_labels_are_dropped_per_target(table):
    """Each target's forest sees only its labelled rows, and its metrics only its labelled test rows."""
    frame = table[["canonical_smiles", "y"]].rename(columns={"y": "a"})
    frame["b"] = -2 * frame["a"] + 1
    frame.loc[[0, 2, 4, 6, 15, 17], "a"] = np.nan
    frame.loc[[1, 3, 16], "b"] = np.nan
    train, test = frame.iloc[:N_TRAIN], frame.iloc[N_TRAIN:]
    metrics, predictions = baselines.forest_baseline(train, test, ["a", "b"], n_estimators=TREES, seed=0)

    test_x = sklearn_fingerprints(test["canonical_smiles"].tolist())
    per_target = {}
    for target in ("a", "b"):
        known = train[train[target].notna()]
        forest = RandomForestRegressor(n_estimators=TREES, random_state=0)
        forest.fit(sklearn_fingerprints(known["canonical_smiles"].tolist()), known[target])
        expected = forest.predict(test_x)
        assert np.allclose(predictions[f"prediction_{target}"], expected)
        labelled = test[target].notna().to_numpy()
        per_target[target] = np.sqrt(skm.mean_squared_error(test[target][labelled], expected[labelled]))
        assert metrics[f"test_rmse_{target}"] == pytest.approx(per_target[target])
        assert metrics[f"n_train_{target}"] == len(known)
    assert metrics["n_train_a"] == N_TRAIN - 4 and metrics["n_train_b"] == N_TRAIN - 2
    assert metrics["test_rmse"] == pytest.approx(np.mean(list(per_target.values())))
    assert predictions["label_a"].isna().sum() == 2  # the missing test labels stay missing, not filled


def test_multi_label_wants_0_1_labels_and_masks_gaps(table):
    frame = table[["canonical_smiles", "active"]].copy()
    frame["big"] = [1, 0] * 10
    frame.loc[[0, 5, 18], "big"] = np.nan
    train, test = frame.iloc[:N_TRAIN], frame.iloc[N_TRAIN:]
    metrics, _ = baselines.forest_baseline(
        train, test, ["active", "big"], baselines.MULTI_LABEL, n_estimators=TREES, seed=0
    )
    assert metrics["test_roc_auc"] == pytest.approx(
        np.nanmean([metrics["test_roc_auc_active"], metrics["test_roc_auc_big"]])
    )
    assert metrics["n_train_big"] == N_TRAIN - 2
    frame.loc[1, "big"] = 2
    with pytest.raises(ValueError, match="0/1 labels"):
        baselines.forest_baseline(frame.iloc[:N_TRAIN], test, ["big"], baselines.MULTI_LABEL, n_estimators=2)


def test_bad_training_labels_are_clear_errors(table):
    train, test = table.iloc[:N_TRAIN].copy(), table.iloc[N_TRAIN:]
    train["empty"] = np.nan
    with pytest.raises(ValueError, match="'empty' has no label in the training split"):
        baselines.forest_baseline(train, test.assign(empty=1.0), ["empty"], n_estimators=2)
    train["one"] = 1
    with pytest.raises(ValueError, match="only class 1"):
        baselines.forest_baseline(train, test.assign(one=1), ["one"], baselines.SINGLE_LABEL, n_estimators=2)
    with pytest.raises(ValueError, match="problem_type must be one of"):
        baselines.forest_baseline(train, test, ["y"], "ranking", n_estimators=2)
