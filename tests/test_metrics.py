from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from transformers import EvalPrediction

from molft.metrics import METRIC_NAMES, make_compute_metrics, regression_metrics

Y_TRUE = [1.0, 2.0, 3.0, 4.0]
Y_PRED = [1.5, 2.0, 2.5, 5.0]
# errors 0.5, 0, -0.5, 1; label mean 2.5, prediction mean 2.75
EXPECTED = {
    "mse": (0.25 + 0 + 0.25 + 1) / 4,
    "rmse": math.sqrt(1.5 / 4),
    "mae": (0.5 + 0 + 0.5 + 1) / 4,
    "r2": 1 - 1.5 / (2.25 + 0.25 + 0.25 + 2.25),
    # sum of centred products 5.5; centred sums of squares 5 (labels) and 7.25 (predictions)
    "pearson": 5.5 / math.sqrt(5 * 7.25),
    "spearman": 1.0,  # predictions keep the label order
    "median_ae": 0.5,  # median of 0, 0.5, 0.5, 1
}


def test_regression_metrics_match_hand_computation():
    scores = regression_metrics(Y_TRUE, Y_PRED)
    assert set(scores) == set(METRIC_NAMES)
    for name, expected in EXPECTED.items():
        assert scores[name] == pytest.approx(expected), name
        assert isinstance(scores[name], float)


def test_spearman_counts_rank_swaps():
    # ranks differ by 1 for two items: rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert regression_metrics([1, 2, 3, 4], [2, 1, 3, 4])["spearman"] == pytest.approx(0.8)


def test_constant_predictions_give_nan_correlations_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="molft.metrics"):
        scores = regression_metrics(Y_TRUE, [2.5, 2.5, 2.5, 2.5])
    assert math.isnan(scores["pearson"]) and math.isnan(scores["spearman"])
    assert scores["mse"] == pytest.approx((2.25 + 0.25 + 0.25 + 2.25) / 4)
    assert scores["r2"] == pytest.approx(0.0)
    assert "all predictions are equal" in caplog.text


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([1.0, 2.0], [1.0], "align"),
        ([], [], "empty"),
        ([1.0, 2.0], [1.0, np.nan], "diverged"),
        ([1.0, 2.0], [1.0, np.inf], "diverged"),
        ([1.0, np.nan], [1.0, 2.0], "non-finite label"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "one-dimensional"),
    ],
)
def test_bad_inputs_are_rejected(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        regression_metrics(y_true, y_pred)


@pytest.mark.parametrize(
    "predictions",
    [
        np.array(Y_PRED),
        np.array(Y_PRED)[:, None],
        (np.array(Y_PRED)[:, None], np.zeros((4, 8))),
    ],
    ids=["flat", "column", "tuple"],
)
@pytest.mark.parametrize("labels", [np.array(Y_TRUE), np.array(Y_TRUE)[:, None]], ids=["flat", "column"])
def test_compute_metrics_accepts_trainer_shapes(predictions, labels):
    scores = make_compute_metrics()(EvalPrediction(predictions=predictions, label_ids=labels))
    assert scores["rmse"] == pytest.approx(EXPECTED["rmse"])
    assert scores["pearson"] == pytest.approx(EXPECTED["pearson"])


def test_compute_metrics_rejects_multi_target_output():
    eval_pred = EvalPrediction(predictions=np.zeros((4, 2)), label_ids=np.array(Y_TRUE))
    with pytest.raises(ValueError, match=r"\[N, 1\]"):
        make_compute_metrics()(eval_pred)
