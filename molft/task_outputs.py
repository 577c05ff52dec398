"""A task's metrics, predictions.csv columns and test-set figures (one regression target: molft.regression).

Several regression targets: metrics per target (`rmse_<target>`, ...) and their mean (`rmse`, ...), a
`label_<target>`/`prediction_<target>` pair of columns and a parity plot per target. Classification: the
model's logits become probabilities (softmax over classes, sigmoid per label); ROC-AUC, PR-AUC, accuracy,
F1 and MCC per label and macro; `prob_<class or label>` columns; ROC curves and a reliability diagram.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, softmax

from molft.files import PARITY_TARGET_PLOT_FILE, RELIABILITY_PLOT_FILE, ROC_CURVE_FILE
from molft.metrics import make_compute_metrics as regression_compute_metrics
from molft.metrics import multi_label_metrics, multitarget_regression_metrics, single_label_metrics
from molft.tasks import LABEL_PREFIX, Task, best_metric

logger = logging.getLogger(__name__)

PREDICTION_PREFIX, PROBABILITY_PREFIX = "prediction_", "prob_"
LOSS_NAMES = {
    "single_label_classification": "cross-entropy",
    "multi_label_classification": "binary cross-entropy",
}


def probabilities(values: np.ndarray, task: Task) -> np.ndarray:
    """Class (softmax) or label (sigmoid) probabilities of a classifier's logits."""
    values = np.asarray(values, dtype=np.float64)
    return softmax(values, axis=1) if task.problem_type == "single_label_classification" else expit(values)


def make_compute_metrics(task: Task | None) -> Callable[[Any], dict[str, float]]:
    """The Trainer's `compute_metrics` for the task (label units for regression, probabilities scored)."""
    if task is None or task.is_legacy:
        return regression_compute_metrics()

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions = eval_pred.predictions
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        labels = np.asarray(eval_pred.label_ids)
        if task.problem_type == "regression":
            return multitarget_regression_metrics(labels, predictions, task.label_columns)
        if task.problem_type == "single_label_classification":
            return single_label_metrics(labels, probabilities(predictions, task), task.classes)
        return multi_label_metrics(labels, probabilities(predictions, task), task.label_columns)

    return compute_metrics


def prediction_columns(values: np.ndarray, task: Task, frame: pd.DataFrame | None = None) -> dict[str, Any]:
    """predictions.csv columns of a new task: labels (when `frame` has them) then predictions/probabilities."""
    values = np.asarray(values, dtype=np.float64)
    values = values.reshape(len(values), -1)
    columns: dict[str, Any] = {}
    if task.problem_type == "single_label_classification":
        probs = probabilities(values, task)
        if frame is not None and "label" in frame:
            columns["label"] = [task.classes[i] for i in frame["label"]]
        columns["prediction"] = [task.classes[i] for i in probs.argmax(axis=1)]
        columns.update({PROBABILITY_PREFIX + c: probs[:, i] for i, c in enumerate(task.classes)})
        return columns
    outputs = probabilities(values, task) if task.is_classification else values
    for j, name in enumerate(task.label_columns):
        if frame is not None and LABEL_PREFIX + name in frame:
            columns[LABEL_PREFIX + name] = frame[LABEL_PREFIX + name].to_numpy()
        if task.is_classification:
            columns[PROBABILITY_PREFIX + name] = outputs[:, j]
            columns[PREDICTION_PREFIX + name] = (outputs[:, j] >= 0.5).astype(np.int64)
        else:
            columns[PREDICTION_PREFIX + name] = outputs[:, j]
    return columns


def done_fields(task: Task, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What run_complete.json adds for a new task: its problem type and headline test metric."""
    if task.is_legacy:
        return {}
    metric = f"test_{best_metric(task.problem_type)}"
    return {"problem_type": task.problem_type, "labels": task.output_names, metric: metrics.get(metric)}


def write_test_figures(test: pd.DataFrame, output_dir: Path, task: Task) -> None:
    """The test split's figures: a parity plot per target, or ROC curves and a reliability diagram."""
    from molft import (
        classification_plots,
        plots,
    )  # matplotlib is slow to import: only once results are written

    if task.problem_type == "regression":
        for name in task.label_columns:
            observed = test[LABEL_PREFIX + name].notna()
            plots.parity_plot(
                test.loc[observed, LABEL_PREFIX + name],
                test.loc[observed, PREDICTION_PREFIX + name],
                output_dir / PARITY_TARGET_PLOT_FILE.format(target=file_part(name)),
                title=f"Test set: {name}",
                unit=name,
            )
        return
    curves, reliability = classification_curves(test, task)
    classification_plots.roc_curves(curves, output_dir / ROC_CURVE_FILE)
    classification_plots.reliability_diagram(reliability, output_dir / RELIABILITY_PLOT_FILE)


def classification_curves(test: pd.DataFrame, task: Task) -> tuple[dict, dict]:
    """(ROC curves, reliability curves) of predictions.csv rows: the positive class of a binary task, each
    class against the rest (reliability: the most probable class, right or wrong), or each observed label."""
    if task.problem_type == "multi_label_classification":
        curves = {}
        for name in task.label_columns:
            observed = test[LABEL_PREFIX + name].notna()
            curves[name] = (
                test.loc[observed, LABEL_PREFIX + name],
                test.loc[observed, PROBABILITY_PREFIX + name],
            )
        return curves, curves
    labels = test["label"].astype(str).to_numpy()
    roc = {c: (labels == c, test[PROBABILITY_PREFIX + c]) for c in task.classes}
    if len(task.classes) == 2:
        positive = task.classes[1]
        roc = {f"{positive} (vs {task.classes[0]})": roc[positive]}
        return roc, roc
    confidence = test[[PROBABILITY_PREFIX + c for c in task.classes]].max(axis=1)
    correct = labels == test["prediction"].astype(str).to_numpy()
    return roc, {"most probable class": (correct, confidence)}


def write_loss_curves(
    log_history: Sequence[dict[str, Any]],
    path: Path,
    task: Task,
    *,
    loss: str,
    target_scaling: str,
    label_name: str,
    n_train: int,
    n_validation: int,
    best_step: int | None,
) -> Any:
    """The loss by epoch and the validation metric that picks the best epoch: RMSE (the mean over targets),
    or a classifier's macro ROC-AUC; the best epoch marked."""
    from molft import plots  # matplotlib is slow to import: only once results are written

    if not task.is_classification:
        return plots.regression_loss_curves(
            log_history,
            path,
            loss=loss,
            target_scaling=target_scaling,
            label_name=label_name if task.is_legacy else "mean over targets",
            n_train=n_train,
            n_validation=n_validation,
            best_step=best_step,
        )
    if not any(
        "epoch" in e and ("loss" in e or "eval_loss" in e or "eval_roc_auc" in e) for e in log_history
    ):
        logger.info("No losses were logged (see --logging_steps, --eval_strategy); no loss curve written.")
        return None
    loss = LOSS_NAMES[task.problem_type]
    return plots.loss_curves(
        log_history,
        path,
        metric="eval_roc_auc",
        metric_name="ROC-AUC (macro)",
        loss_name=loss,
        title=f"loss ({loss}, {n_train} training molecules)",
        x_axis="epoch",
        best_step=best_step,
        metric_title=f"validation ROC-AUC ({n_validation} molecules)",
    )


def file_part(name: str) -> str:
    """A label name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "label"
