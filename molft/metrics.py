"""Metrics for property prediction (regression, several targets with gaps, classification), shared by
Trainer evaluation and offline reports.

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
CLASSIFICATION_METRIC_NAMES = ("roc_auc", "pr_auc", "accuracy", "f1", "mcc")


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


def multitarget_regression_metrics(y_true: Any, y_pred: Any, names: list[str]) -> dict[str, float]:
    """Regression metrics per target (`rmse_<name>`, ...) on its observed labels (NaN = missing), and their
    mean over targets under the plain names (`rmse`, ...)."""
    y_true, y_pred = _as_matrix(y_true, len(names), "y_true"), _as_matrix(y_pred, len(names), "y_pred")
    scores: dict[str, float] = {}
    per_target = []
    for j, name in enumerate(names):
        observed = ~np.isnan(y_true[:, j])
        if not observed.any():
            raise ValueError(f"Target {name!r} has no labels among these {len(y_true)} molecules.")
        target_scores = regression_metrics(y_true[observed, j], y_pred[observed, j])
        per_target.append(target_scores)
        scores.update({f"{metric}_{name}": value for metric, value in target_scores.items()})
    for metric in METRIC_NAMES:
        scores[metric] = float(np.mean([target[metric] for target in per_target]))
    return scores


def binary_metrics(y_true: Any, score: Any, y_pred: Any) -> dict[str, float]:
    """ROC-AUC and PR-AUC (average precision) of `score`, accuracy, F1 and MCC of the 0/1 `y_pred`.

    The AUCs are nan when `y_true` holds one class only (they are undefined then).
    """
    y_true = np.asarray(y_true).astype(int)
    score, y_pred = np.asarray(score, dtype=np.float64), np.asarray(y_pred).astype(int)
    two_classes = np.unique(y_true).size == 2
    if not two_classes:
        logger.warning(
            "ROC-AUC and PR-AUC undefined: all %d labels are %d; reporting nan.", y_true.size, y_true[0]
        )
    return {
        "roc_auc": float(skm.roc_auc_score(y_true, score)) if two_classes else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, score)) if two_classes else float("nan"),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
    }


def single_label_metrics(y_true: Any, probabilities: Any, classes: list[str]) -> dict[str, float]:
    """Metrics of one class per molecule from class probabilities [n, classes].

    Binary: the metrics of the second class (the positive one). More classes: each class against the rest
    (`roc_auc_<class>`, ...), ROC-AUC/PR-AUC/F1 as the macro mean over classes, accuracy and MCC of the
    predicted class (the most probable one).
    """
    probabilities = _as_matrix(probabilities, len(classes), "probabilities")
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    if y_true.shape[0] != probabilities.shape[0]:
        raise ValueError(
            f"{y_true.shape[0]} labels but {probabilities.shape[0]} predictions; they must align."
        )
    predicted = probabilities.argmax(axis=1)
    if len(classes) == 2:
        return binary_metrics(y_true == 1, probabilities[:, 1], predicted == 1)
    scores: dict[str, float] = {}
    for k, name in enumerate(classes):
        one_vs_rest = binary_metrics(y_true == k, probabilities[:, k], predicted == k)
        scores.update({f"{metric}_{name}": value for metric, value in one_vs_rest.items()})
    for metric in ("roc_auc", "pr_auc", "f1"):
        scores[metric] = _defined_mean([scores[f"{metric}_{name}"] for name in classes], metric)
    scores["accuracy"] = float(skm.accuracy_score(y_true, predicted))
    scores["mcc"] = float(skm.matthews_corrcoef(y_true, predicted))
    return scores


def multi_label_metrics(y_true: Any, probabilities: Any, names: list[str]) -> dict[str, float]:
    """Metrics per 0/1 label (`roc_auc_<name>`, ...) on its observed molecules (NaN = missing), predicted
    positive at probability 0.5, and their macro mean over labels under the plain names."""
    y_true = _as_matrix(y_true, len(names), "y_true")
    probabilities = _as_matrix(probabilities, len(names), "probabilities")
    scores: dict[str, float] = {}
    for j, name in enumerate(names):
        observed = ~np.isnan(y_true[:, j])
        if not observed.any():
            raise ValueError(f"Label {name!r} has no values among these {len(y_true)} molecules.")
        prob = probabilities[observed, j]
        label_scores = binary_metrics(y_true[observed, j], prob, prob >= 0.5)
        scores.update({f"{metric}_{name}": value for metric, value in label_scores.items()})
    for metric in CLASSIFICATION_METRIC_NAMES:
        scores[metric] = _defined_mean([scores[f"{metric}_{name}"] for name in names], metric)
    return scores


def _defined_mean(values: list[float], metric: str) -> float:
    """Macro mean over the labels where `metric` is defined (nan when it is defined for none)."""
    defined = [v for v in values if not np.isnan(v)]
    if len(defined) < len(values):
        logger.warning(
            "Macro %s averages %d of %d labels (the others are undefined).", metric, len(defined), len(values)
        )
    return float(np.mean(defined)) if defined else float("nan")


def _as_matrix(values: Any, n_columns: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1 and n_columns == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != n_columns:
        raise ValueError(f"{name} must have shape [N, {n_columns}], got {array.shape}.")
    return array
