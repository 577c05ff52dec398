from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from molft.files import SHIFT_PLOT_FILE, SHIFT_REPORT_FILE
from molft.io import read_json
from molft.shift import (
    format_shift_report,
    label_distribution_summary,
    mmd_permutation_test,
    nearest_neighbour_tanimoto,
    shift_diagnostics,
    shift_report,
)

SMILES = ["CCO", "c1ccccc1", "CCN", "CC(=O)O", "c1ccncc1", "C1CCCCC1"]


def test_nn_tanimoto_of_identical_sets_is_one():
    report = nearest_neighbour_tanimoto(SMILES, SMILES)
    np.testing.assert_array_equal(report["external"]["nn_similarity"], np.ones(len(SMILES)))
    summary = report["external"]["summary"]
    assert summary["mean"] == 1.0 and summary["median"] == 1.0 and summary["q05"] == 1.0
    assert summary["share_above_0.4"] == 1.0 and summary["share_above_0.6"] == 1.0
    assert summary["n"] == len(SMILES)
    assert report["reference"] is None


def test_nn_tanimoto_of_disjoint_molecules_is_zero_and_reference_is_separate():
    # methane shares no Morgan environment with benzene
    report = nearest_neighbour_tanimoto(["C"], ["c1ccccc1"], reference_smiles=["c1ccccc1", "C"])
    assert report["external"]["nn_similarity"].tolist() == [0.0]
    assert report["external"]["summary"]["share_above_0.4"] == 0.0
    assert report["reference"]["nn_similarity"].tolist() == [1.0, 0.0]
    assert report["reference"]["summary"]["share_above_0.4"] == 0.5


def test_nn_tanimoto_names_the_bad_set():
    with pytest.raises(ValueError, match="In the reference SMILES: Cannot parse SMILES at position 1"):
        nearest_neighbour_tanimoto(["CCO"], ["CCO"], reference_smiles=["CCO", "C1CC"])


def _direct_mmd2(x, y, sigma):
    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_statistic_matches_direct_sum():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1.0, size=(4, 3))
    result = mmd_permutation_test(x, y, n_permutations=10, bandwidth=1.3)
    assert result["mmd2"] == pytest.approx(_direct_mmd2(x, y, 1.3), abs=1e-12)
    pooled = np.concatenate([x, y])
    distances = [np.linalg.norm(a - b) for i, a in enumerate(pooled) for b in pooled[i + 1 :]]
    median = mmd_permutation_test(x, y, n_permutations=10)
    assert median["bandwidth"] == pytest.approx(np.median(distances))
    assert median["mmd2"] == pytest.approx(_direct_mmd2(x, y, np.median(distances)), abs=1e-12)


def test_mmd_same_distribution_gives_large_p_and_shift_small_p():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(50, 5))
    same = mmd_permutation_test(x, y, n_permutations=200, seed=0)
    shifted = mmd_permutation_test(x, y + 1.0, n_permutations=200, seed=0)
    assert same["p_value"] > 0.2
    assert shifted["p_value"] == pytest.approx(1 / 201)  # no permutation reaches the observed MMD²
    assert shifted["mmd2"] > same["mmd2"]
    # the p-value counts permutations: (1 + #{perm >= observed}) / (1 + n_permutations)
    assert (same["p_value"] * 201) == pytest.approx(round(same["p_value"] * 201))


def test_mmd_is_deterministic_per_seed_and_checks_input():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 3)), rng.normal(0.3, 1.0, size=(25, 3))
    first = mmd_permutation_test(x, y, n_permutations=99, seed=4, permutation_batch=7)
    assert first == mmd_permutation_test(x, y, n_permutations=99, seed=4)
    with pytest.raises(ValueError, match="embedding dimensions"):
        mmd_permutation_test(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="pass a bandwidth"):
        mmd_permutation_test(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        mmd_permutation_test(x[:1], y)


def test_label_summary_matches_scipy_and_hand_values():
    summary = label_distribution_summary([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    expected = stats.ks_2samp([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    assert summary["ks_statistic"] == pytest.approx(expected.statistic)
    assert summary["ks_p_value"] == pytest.approx(expected.pvalue)
    assert summary["external"]["mean"] == 2.0 and summary["external"]["std"] == 1.0
    assert summary["train"]["mean"] == 5.0 and summary["train"]["median"] == 5.0
    assert summary["mean_difference"] == -3.0
    with pytest.raises(ValueError, match=r"external labels are missing or not finite at positions \[1\]"):
        label_distribution_summary([1.0, np.nan], [1.0])


def test_shift_report_bundles_available_parts():
    rng = np.random.default_rng(3)
    full = shift_report(
        SMILES[:3],
        SMILES,
        reference_smiles=SMILES[3:],
        external_embeddings=rng.normal(size=(3, 4)),
        train_embeddings=rng.normal(size=(6, 4)),
        external_labels=[1.0, 2.0, 3.0],
        train_labels=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        n_permutations=20,
    )
    assert full["tanimoto"]["external"]["summary"]["mean"] == 1.0
    assert full["mmd"]["n_x"] == 3 and full["mmd"]["n_permutations"] == 20
    assert full["labels"]["mean_difference"] == pytest.approx(-1.5)
    text = format_shift_report(full)
    assert "NN Tanimoto to train (external, n=3): mean 1.000" in text
    assert "NN Tanimoto to train (reference, n=3)" in text
    assert "Embedding MMD²" in text and "KS D = " in text

    smiles_only = shift_report(SMILES[:2], SMILES)
    assert smiles_only["mmd"] is None and smiles_only["labels"] is None
    assert "MMD" not in format_shift_report(smiles_only)


def test_shift_diagnostics_of_the_candidates_are_written(tmp_path):
    pool = pd.DataFrame({"canonical_smiles": SMILES, "label": np.arange(6.0)})
    frames = {
        "train": pd.DataFrame({"canonical_smiles": SMILES[:4], "label": [1.0, 2.0, 3.0, 5.0]}),
        "test": pd.DataFrame({"canonical_smiles": SMILES[4:], "label": [0.0, 1.0]}),
    }
    embeddings = np.random.default_rng(0).normal(size=(6, 3))
    candidates = np.array([1, 4, 5])
    report = shift_diagnostics(
        tmp_path, pool, candidates, frames, pool_embeddings=embeddings, train_embeddings=embeddings[:4],
        n_permutations=10, seed=0,
    )  # fmt: skip
    assert report["reference"] == "test split" and report["pool_indices"] == [1, 4, 5]
    assert report["tanimoto"]["external"]["summary"]["n"] == 3
    assert report["tanimoto"]["reference"]["summary"]["n"] == 2
    assert report["mmd"] == mmd_permutation_test(embeddings[candidates], embeddings[:4], 10, 0)
    assert report["labels"]["mean_difference"] == pytest.approx(np.mean([1.0, 4.0, 5.0]) - 2.75)
    assert read_json(tmp_path / SHIFT_REPORT_FILE)["pool_indices"] == [1, 4, 5]
    assert (tmp_path / SHIFT_PLOT_FILE).stat().st_size > 0

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    report = shift_diagnostics(unlabelled, pool.drop(columns="label"), candidates, frames, n_permutations=10)
    assert report["mmd"] is None and report["labels"] is None
    assert (unlabelled / SHIFT_REPORT_FILE).is_file() and not (unlabelled / SHIFT_PLOT_FILE).exists()
