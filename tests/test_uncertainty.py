"""molft.uncertainty: MC dropout, ensembles of finished runs, calibration, and run_regression.py's hook."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import model_predictions, tiny_config

from modeling_molformer_reg import MolformerForRegression
from molft.chem import canonical_smiles
from molft.files import ALL_RESULTS_FILE, DONE_MARKER, PREDICTIONS_FILE, RUN_CONFIG_FILE, SPLIT_FILE
from molft.io import read_json, write_json
from molft.metrics import regression_metrics
from molft.uncertainty import (
    UncertaintyArguments,
    check_ensemble_members,
    check_prediction_options,
    ensemble_samples,
    expected_calibration_error,
    mc_dropout_samples,
    predict_with_uncertainty,
    regression_calibration,
    summarise,
    uncertainty_metrics,
)
from tokenization_molformer import MolformerTokenizer

SMILES = [
    canonical_smiles(s)
    for s in (
        "CC(=O)Oc1ccccc1C(=O)O",
        "CN1CCN(c2ccc(Cl)cc2)CC1",
        "O=C(Nc1ccccc1)c1ccncc1",
        "CCOC(=O)c1ccc(N)cc1",
        "Cc1ccc(S(=O)(=O)N2CCCC2)cc1",
        "COc1ccc2[nH]cc(CCN)c2c1",
        "CCO",
    )
]
ROOT = Path(__file__).resolve().parents[1]
SPLIT = {"train": SMILES[:4], "validation": SMILES[4:5], "test": SMILES[5:]}


@pytest.fixture(scope="module")
def tokenizer() -> MolformerTokenizer:
    return MolformerTokenizer.from_smiles(SMILES)


def regression_model(tokenizer, seed: int, dropout: float) -> MolformerForRegression:
    torch.manual_seed(seed)
    config = tiny_config(
        vocab_size=len(tokenizer),
        hidden_dropout_prob=dropout,
        embedding_dropout_prob=dropout,
        classifier_dropout_prob=dropout,
        target_mean=2.0,
        target_std=1.5,
    )
    return MolformerForRegression(config).eval()


def finished_run(path: Path, model, tokenizer, split: dict[str, list[str]] = SPLIT) -> Path:
    """A run folder as run_regression.py leaves it, as far as an ensemble reads it."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_json(path / SPLIT_FILE, {"smiles": split})
    write_json(path / DONE_MARKER, {})
    return path


# ---------------------------------------------------------------------------------------------------------
# Calibration by hand
# ---------------------------------------------------------------------------------------------------------


def test_summarise_is_the_mean_and_sample_std():
    samples = np.random.default_rng(0).normal(size=(5, 7, 2))
    mean, std = summarise(samples)
    np.testing.assert_allclose(mean, samples.mean(axis=0))
    np.testing.assert_allclose(std, np.std(samples, axis=0, ddof=1))
    with pytest.raises(ValueError, match="S >= 2"):
        summarise(samples[:1])


def test_regression_calibration_equals_a_hand_computation():
    labels = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    mean = np.array([1.5, 2.0, 1.0, 4.5, 9.0])
    std = np.array([1.0, 0.5, 0.5, 0.2, 1.0])
    result = regression_calibration(labels, mean, std)
    # errors 0.5, 0, 2, 0.5 against std 1, 0.5, 0.5, 0.2 (the NaN label is left out)
    assert result["within_1std"] == 2 / 4
    assert result["within_2std"] == 2 / 4  # 2 > 2·0.5 and 0.5 > 2·0.2
    nll = np.mean(
        [
            0.5 * math.log(2 * math.pi * s**2) + e**2 / (2 * s**2)
            for e, s in zip([0.5, 0, 2, 0.5], [1, 0.5, 0.5, 0.2], strict=True)
        ]
    )
    assert result["nll"] == pytest.approx(nll)
    assert result["mean_std"] == pytest.approx(np.mean([1.0, 0.5, 0.5, 0.2]))
    # two targets: each its own molecules, then their mean
    two = regression_calibration(
        np.c_[labels, [0.0, 0, 0, 0, 0]], np.c_[mean, np.zeros(5)], np.c_[std, np.ones(5)]
    )
    assert two["within_1std"] == pytest.approx((0.5 + 1.0) / 2)


def test_zero_std_gives_a_nan_nll_and_says_so(caplog):
    result = regression_calibration([1.0, 2.0], [1.0, 2.5], [0.0, 0.0])
    assert math.isnan(result["nll"]) and result["within_1std"] == 0.5
    assert "predicted std of 0" in caplog.text


def test_expected_calibration_error_equals_a_hand_computation():
    # single-label, 3 classes: confidences 0.9, 0.8, 0.6, 0.35 → bins (0.8, 0.9], (0.7, 0.8], (0.5, 0.6], (0.3, 0.4]
    probabilities = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.35, 0.33, 0.32]])
    labels = np.array([0, 0, 2, 1])
    by_hand = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(0 - 0.35)) / 4
    assert expected_calibration_error(probabilities, labels, n_bins=10) == pytest.approx(by_hand)
    # one bin: |accuracy − mean confidence|
    assert expected_calibration_error(probabilities, labels, n_bins=1) == pytest.approx(
        abs(0.5 - np.mean([0.9, 0.8, 0.6, 0.35]))
    )
    # binary per column, NaN labels left out: column 0 in bins (0.1,0.2] and (0.8,0.9]; column 1 one bin
    p = np.array([[0.15, 0.5], [0.85, 0.5], [0.85, 0.5], [0.9, 0.5]])
    y = np.array([[0, 1], [1, 0], [0, np.nan], [np.nan, 1]])
    column0 = 1 / 3 * abs(0 - 0.15) + 2 / 3 * abs(0.5 - 0.85)
    column1 = abs(2 / 3 - 0.5)
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx((column0 + column1) / 2)
    with pytest.raises(ValueError, match="class labels"):
        expected_calibration_error(probabilities, np.array([0, 1, 2, 0.5]))


def test_uncertainty_metrics_name_their_method_and_match_regression_metrics():
    labels, mean, std = np.array([1.0, 2.0, 4.0]), np.array([[1.5], [2.0], [3.0]]), np.ones((3, 1))
    metrics = uncertainty_metrics("test", "mc", labels, mean, std)
    expected = regression_metrics(labels, mean[:, 0])
    assert {k: metrics[f"test_mc_{k}"] for k in expected} == expected
    assert metrics["test_mc_within_1std"] == 1.0 and metrics["test_mc_within_2std"] == 1.0
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6]])
    assert uncertainty_metrics(
        "test", "tta", [0, 0], probabilities, 0 * probabilities, "single_label_classification"
    ) == {  # fmt: skip
        "test_tta_ece": pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    }


# ---------------------------------------------------------------------------------------------------------
# MC dropout and ensembles on tiny MoLFormers
# ---------------------------------------------------------------------------------------------------------


def test_mc_dropout_std_is_zero_without_dropout_and_positive_with_it(tokenizer):
    plain = regression_model(tokenizer, 0, dropout=0.0)
    samples = mc_dropout_samples(plain, tokenizer, SMILES, 4, seed=0, batch_size=3, max_length=64)
    assert samples.shape == (4, len(SMILES), 1)
    mean, std = summarise(samples)
    assert (std == 0).all()
    np.testing.assert_allclose(mean[:, 0], model_predictions(plain, tokenizer, SMILES), rtol=1e-5, atol=1e-6)
    noisy = regression_model(tokenizer, 0, dropout=0.3)
    samples = mc_dropout_samples(noisy, tokenizer, SMILES, 4, seed=0, batch_size=3, max_length=64)
    assert (summarise(samples)[1] > 0).all()
    np.testing.assert_array_equal(
        samples, mc_dropout_samples(noisy, tokenizer, SMILES, 4, 0, 3, 64)
    )  # seeded
    assert not noisy.training  # left as it was


def test_mc_dropout_keeps_several_outputs_apart(tokenizer):
    class ThreeOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(len(tokenizer), 4)
            self.dropout = torch.nn.Dropout(0.5)
            self.head = torch.nn.Linear(4, 3)
            self.config = types.SimpleNamespace(problem_type="regression")

        def forward(self, input_ids, attention_mask):
            pooled = self.embed(input_ids).mean(1)
            return types.SimpleNamespace(
                logits=self.head(self.dropout(pooled)) * torch.tensor([1.0, 0.0, 1.0])
            )

    torch.manual_seed(0)
    samples = mc_dropout_samples(ThreeOutputs(), tokenizer, SMILES, 3, seed=1, batch_size=2, max_length=64)
    assert samples.shape == (3, len(SMILES), 3)
    assert (samples[:, :, 1] == 0).all() and (summarise(samples)[1][:, [0, 2]] > 0).all()


def test_ensemble_mean_and_std_equal_numpys_over_hand_made_runs(tokenizer, tmp_path):
    models = [regression_model(tokenizer, seed, dropout=0.1) for seed in (1, 2, 3)]
    runs = [finished_run(tmp_path / f"seed{i}", model, tokenizer) for i, model in enumerate(models)]
    expected = np.stack([model_predictions(model, tokenizer, SMILES) for model in models])
    samples = ensemble_samples(runs, SMILES, batch_size=4, max_length=64)
    assert samples.shape == (3, len(SMILES), 1)
    mean, std = summarise(samples)
    np.testing.assert_allclose(mean[:, 0], expected.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std[:, 0], np.std(expected, axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    # this run's own folder is this run's model, even before it is finished
    current = tmp_path / "current"
    with_current = ensemble_samples(
        [runs[0], current], SMILES, 4, 64, current=(current, models[2], tokenizer)
    )
    np.testing.assert_allclose(with_current[1, :, 0], expected[2], rtol=1e-5, atol=1e-6)


def test_ensemble_members_with_another_split_or_unfinished_are_refused(tokenizer, tmp_path):
    ours = {name: set(smiles) for name, smiles in SPLIT.items()}
    model = regression_model(tokenizer, 0, dropout=0.0)
    same = finished_run(tmp_path / "same", model, tokenizer)
    check_ensemble_members([same, tmp_path / "this_run"], ours, tmp_path / "this_run")
    swapped = {"train": SMILES[:3] + SMILES[5:6], "validation": SMILES[4:5], "test": SMILES[3:4] + SMILES[6:]}
    other = finished_run(tmp_path / "other", model, tokenizer, swapped)
    with pytest.raises(ValueError, match=r"other split the molecules differently: its train split"):
        check_ensemble_members([same, other], ours, tmp_path / "this_run")
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    write_json(no_model / DONE_MARKER, {})
    with pytest.raises(ValueError, match=r"no_model holds no saved model"):
        check_ensemble_members([same, no_model], ours, tmp_path / "this_run")
    (same / DONE_MARKER).unlink()
    with pytest.raises(ValueError, match=r"same is not a finished run_regression.py run"):
        check_ensemble_members([same, other], ours, tmp_path / "this_run")


def test_bad_uncertainty_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--mc_dropout_samples must be 0"):
        UncertaintyArguments(mc_dropout_samples=1)
    with pytest.raises(ValueError, match="at least two run folders"):
        UncertaintyArguments(ensemble_dirs="runs/a")
    with pytest.raises(ValueError, match="more than once"):
        UncertaintyArguments(ensemble_dirs="runs/a, runs/a")
    with pytest.raises(ValueError, match="add --do_predict"):
        check_prediction_options(3, UncertaintyArguments(), do_predict=False, hp_search=False)
    with pytest.raises(ValueError, match="--tta, --mc_dropout_samples: a hyperparameter search"):
        check_prediction_options(
            3, UncertaintyArguments(mc_dropout_samples=2), do_predict=True, hp_search=True
        )
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        check_prediction_options(0, UncertaintyArguments(ensemble_dirs=f"{tmp_path},{tmp_path / 'missing'}"), True, False)  # fmt: skip
    check_prediction_options(0, UncertaintyArguments(), do_predict=False, hp_search=True)  # nothing asked


def test_hook_fills_test_rows_and_predict_rows_and_names_its_metrics(tokenizer, tmp_path):
    model = regression_model(tokenizer, 0, dropout=0.2)
    split = [name for name, smiles in SPLIT.items() for _ in smiles]
    canonical = [s for smiles in SPLIT.values() for s in smiles]
    predictions = pd.DataFrame(
        {
            "canonical_smiles": canonical,
            "label": np.linspace(0, 3, len(canonical)),
            "split": split,
            "prediction": 0.0,
        }
    )
    unlabelled = pd.DataFrame({"canonical_smiles": SMILES[:3]})
    other = finished_run(tmp_path / "other", regression_model(tokenizer, 5, 0.0), tokenizer)
    options = UncertaintyArguments(mc_dropout_samples=3, ensemble_dirs=f"{other},{tmp_path / 'run'}")
    metrics = predict_with_uncertainty(
        model, tokenizer, predictions, unlabelled, tta=2, options=options, seed=0, batch_size=4, max_length=64,
        output_dir=tmp_path / "run",
    )  # fmt: skip
    test = predictions["split"] == "test"
    for method in ("tta", "mc", "ensemble"):
        for column in (f"prediction_{method}", f"prediction_{method}_std"):
            assert predictions.loc[test, column].notna().all() and predictions.loc[~test, column].isna().all()
            assert unlabelled[column].notna().all()
        for name in ("rmse", "r2", "within_1std", "within_2std", "nll", "mean_std"):
            assert f"test_{method}_{name}" in metrics
    labels = predictions.loc[test, "label"].to_numpy()
    rmse = np.sqrt(np.mean((labels - predictions.loc[test, "prediction_mc"]) ** 2))
    assert metrics["test_mc_rmse"] == pytest.approx(rmse)
    error = np.abs(labels - predictions.loc[test, "prediction_ensemble"])
    within = np.mean(error <= predictions.loc[test, "prediction_ensemble_std"])
    assert metrics["test_ensemble_within_1std"] == within
    # the ensemble of this run's model and the other run's, by hand
    pair = np.stack(
        [model_predictions(m, tokenizer, SMILES[:3]) for m in (regression_model(tokenizer, 5, 0.0), model)]
    )
    np.testing.assert_allclose(
        unlabelled["prediction_ensemble_std"], pair.std(axis=0, ddof=1), rtol=1e-4, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------------------
# run_regression.py as a user runs it
# ---------------------------------------------------------------------------------------------------------


def test_run_regression_with_augmentation_tta_and_mc_dropout(data_dir, tmp_path):
    """A few steps of the tiny recipe with every new option; what it writes, checked against itself."""
    train = tmp_path / "lipophilicity_100.csv"
    pd.read_csv(data_dir / "lipophilicity.csv", nrows=100).to_csv(train, index=False)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "run_regression.py", "configs/regression_tiny.yaml", "--train_file", train,
        "--output_dir", out, "--max_steps", "4", "--do_predict", "--augment_smiles", "2", "--tta", "3",
        "--mc_dropout_samples", "3",
    ]  # fmt: skip
    done = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = read_json(out / ALL_RESULTS_FILE)
    predictions = pd.read_csv(out / PREDICTIONS_FILE)
    test = predictions["split"] == "test"
    n_train = int((predictions["split"] == "train").sum())
    assert read_json(out / "train_results.json")["train_samples"] == 2 * n_train  # two items per molecule
    for method in ("tta", "mc"):
        mean, std = predictions[f"prediction_{method}"], predictions[f"prediction_{method}_std"]
        assert mean[test].notna().all() and std[test].notna().all() and mean[~test].isna().all()
        assert (std[test] > 0).all()  # random SMILES and dropout both move the tiny model's predictions
        expected = regression_metrics(predictions.loc[test, "label"], mean[test])
        assert results[f"test_{method}_rmse"] == pytest.approx(expected["rmse"])
        error = (predictions.loc[test, "label"] - mean[test]).abs()
        assert results[f"test_{method}_within_2std"] == pytest.approx(float((error <= 2 * std[test]).mean()))
    # test_rmse stays the canonical prediction's
    canonical = regression_metrics(predictions.loc[test, "label"], predictions.loc[test, "prediction"])
    assert results["test_rmse"] == pytest.approx(canonical["rmse"])
    assert read_json(out / "predict_results.json")["test_mc_nll"] == results["test_mc_nll"]
    config = read_json(out / RUN_CONFIG_FILE)
    assert config["augmentation"] == {"augment_smiles": 2, "tta": 3}
    assert config["uncertainty"]["mc_dropout_samples"] == 3
    assert config["training"]["remove_unused_columns"] is False
