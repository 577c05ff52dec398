"""Regression metrics for property prediction, shared by Trainer evaluation and offline reports.

`evaluate.load("mse")` and friends are deliberately not used: their metric scripts are fetched from the
Hugging Face Hub at run time, which fails on offline compute nodes. scikit-learn and scipy give the same
formulas locally and are already dependencies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

logger = logging.getLogger(__name__)

METRIC_NAMES = ("mse", "rmse", "mae", "r2", "pearson", "spearman", "median_ae")


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Score predictions against labels; both are 1-D array-likes in label units."""
    y_true = _as_vector(y_true, "y_true")
    y_pred = _as_vector(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} values but y_pred has {y_pred.size}; they must align.")
    if y_true.size == 0:
        raise ValueError("Cannot compute regression metrics on empty input.")
    bad_labels = np.flatnonzero(~np.isfinite(y_true))
    if bad_labels.size:
        raise ValueError(
            f"y_true holds {bad_labels.size} non-finite label(s) (first at index {bad_labels[0]}); "
            "clean the dataset before evaluation."
        )
    bad_preds = np.flatnonzero(~np.isfinite(y_pred))
    if bad_preds.size:
        raise ValueError(
            f"y_pred holds {bad_preds.size} non-finite prediction(s) (first at index {bad_preds[0]}): "
            "the model has diverged (try a lower learning rate or gradient clipping)."
        )

    mse = skm.mean_squared_error(y_true, y_pred)
    return {
        "mse": float(mse),
        "rmse": float(np.sqrt(mse)),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "r2": float(skm.r2_score(y_true, y_pred)) if y_true.size > 1 else float("nan"),
        "pearson": _correlation(stats.pearsonr, y_true, y_pred, "pearson"),
        "spearman": _correlation(stats.spearmanr, y_true, y_pred, "spearman"),
        "median_ae": float(skm.median_absolute_error(y_true, y_pred)),
    }


def make_compute_metrics() -> Callable[[Any], dict[str, float]]:
    """Build the `compute_metrics` callback for `transformers.Trainer`.

    The model de-normalises its outputs, so predictions and labels already share label units.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions = eval_pred.predictions
        # models that also return hidden states or extra outputs hand over a tuple
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        return regression_metrics(
            _squeeze_single_target(eval_pred.label_ids, "labels"),
            _squeeze_single_target(predictions, "predictions"),
        )

    return compute_metrics


def _as_vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}.")
    return array


def _squeeze_single_target(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"Expected {name} of shape [N] or [N, 1] (single-target regression), got {array.shape}."
        )
    return array


def _correlation(func: Callable[..., Any], y_true: np.ndarray, y_pred: np.ndarray, name: str) -> float:
    # a constant vector (e.g. a collapsed model predicting the mean) has no defined correlation
    if y_true.size < 2:
        logger.warning("%s correlation needs at least 2 points, got %d; reporting nan.", name, y_true.size)
        return float("nan")
    for label, values in (("predictions", y_pred), ("labels", y_true)):
        if np.ptp(values) == 0:
            logger.warning("%s correlation undefined: all %s are equal; reporting nan.", name, label)
            return float("nan")
    return float(func(y_true, y_pred).statistic)
