"""The reference model every benchmark runs beside MoLFormer: a random forest on ECFP4 fingerprints.

A fine-tuned transformer is only worth its cost if it beats the cheap, standard baseline of the field on the
same molecules, so the forest is fixed rather than tuned: ECFP4 (Morgan, radius 2, 2,048 bits), 500 trees,
scikit-learn's defaults otherwise, a seed. It trains on the training split only (no validation-based choice
exists to make). Several targets get one forest each, trained on the rows that have that target's label, so a
missing label is never filled in; classification uses RandomForestClassifier and scores its probabilities.
Metrics are named as run_regression.py names them (`test_rmse`, `test_rmse_<target>`, ...), so one table
reads both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from rdkit import DataStructs
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

from molft.chem import morgan_fingerprints
from molft.metrics import CLASSIFICATION_METRIC_NAMES, regression_metrics, single_label_metrics

logger = logging.getLogger(__name__)

ECFP_RADIUS = 2  # ECFP4: diameter 4
ECFP_BITS = 2048
DEFAULT_TREES = 500
REGRESSION = "regression"
SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
PROBLEM_TYPES = (REGRESSION, SINGLE_LABEL, MULTI_LABEL)
# the metric a table leads with, and whether lower is better
PRIMARY_METRIC = {
    REGRESSION: ("rmse", True),
    SINGLE_LABEL: ("roc_auc", False),
    MULTI_LABEL: ("roc_auc", False),
}


@dataclass
class TargetScores:
    """A model's output for one target on every test molecule.

    `values`: predictions [N] (regression) or class probabilities [N, len(classes)] (classification).
    """

    values: np.ndarray
    classes: np.ndarray | None = None


def check_problem_type(problem_type: str) -> str:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}.")
    return problem_type


def ecfp4(smiles: Sequence[str]) -> np.ndarray:
    """[N, 2048] 0/1 matrix of ECFP4 bits (molft.chem.morgan_fingerprints; raises on an unparsable SMILES)."""
    fps = morgan_fingerprints(list(smiles), radius=ECFP_RADIUS, n_bits=ECFP_BITS)
    out = np.zeros((len(fps), ECFP_BITS), dtype=np.uint8)
    for i, fp in enumerate(fps):
        DataStructs.ConvertToNumpyArray(fp, out[i])
    return out


def fit_predict_forest(
    train_x: np.ndarray,
    train_labels: pd.DataFrame,
    test_x: np.ndarray,
    problem_type: str = REGRESSION,
    *,
    n_estimators: int = DEFAULT_TREES,
    seed: int = 0,
    n_jobs: int = 1,
) -> dict[str, TargetScores]:
    """One forest per column of `train_labels` (NaN = missing), fit on its labelled rows; scores on `test_x`."""
    check_problem_type(problem_type)
    if len(train_x) != len(train_labels):
        raise ValueError(f"{len(train_x)} training fingerprints but {len(train_labels)} label rows.")
    if n_estimators < 1:
        raise ValueError(f"n_estimators must be at least 1, got {n_estimators}.")
    scores = {}
    for target in train_labels.columns:
        labels = train_labels[target]
        known = labels.notna().to_numpy()
        if not known.any():
            raise ValueError(f"Target {target!r} has no label in the training split; a forest cannot be fit.")
        if problem_type == REGRESSION:
            forest = RandomForestRegressor(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)
            forest.fit(train_x[known], labels[known].to_numpy(dtype=np.float64))
            scores[target] = TargetScores(forest.predict(test_x))
            continue
        y = labels[known].to_numpy()
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(
                f"Target {target!r} has only class {classes.tolist()[0]!r} among its {known.sum()} training labels; "
                "a classifier needs two."
            )
        if problem_type == MULTI_LABEL and not set(classes.tolist()) <= {0, 1}:
            raise ValueError(
                f"Target {target!r}: multi-label classification wants 0/1 labels, got classes {classes.tolist()}."
            )
        forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)
        forest.fit(train_x[known], y)
        scores[target] = TargetScores(forest.predict_proba(test_x), forest.classes_)
    return scores


def score_predictions(
    labels: pd.DataFrame,
    scores: dict[str, TargetScores],
    problem_type: str = REGRESSION,
    prefix: str = "test",
) -> dict[str, float]:
    """Metrics per target on its labelled rows, and (several targets) their mean under the unsuffixed name.

    A single target's metrics carry no suffix, as run_regression.py writes them.
    """
    check_problem_type(problem_type)
    per_target: dict[str, dict[str, float]] = {}
    for target in labels.columns:
        if target not in scores:
            raise ValueError(f"No predictions for target {target!r}; got {sorted(scores)}.")
        known = labels[target].notna().to_numpy()
        if not known.any():
            raise ValueError(f"Target {target!r} has no label in the evaluated split.")
        values = np.asarray(scores[target].values)
        if len(values) != len(labels):
            raise ValueError(f"Target {target!r}: {len(values)} predictions for {len(labels)} molecules.")
        y_true = labels[target][known].to_numpy()
        if problem_type == REGRESSION:
            per_target[target] = regression_metrics(y_true.astype(np.float64), values[known])
        else:
            per_target[target] = classification_metrics(y_true, values[known], scores[target].classes, target)
    if len(per_target) == 1:
        only = next(iter(per_target.values()))
        return {f"{prefix}_{name}": value for name, value in only.items()}
    out: dict[str, float] = {}
    for name in next(iter(per_target.values())):
        values = [m[name] for m in per_target.values()]
        out[f"{prefix}_{name}"] = float(np.nanmean(values))
        for target, metrics in per_target.items():
            out[f"{prefix}_{name}_{target}"] = metrics[name]
    return out


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, classes: np.ndarray | None, target: str = "label"
) -> dict[str, float]:
    """ROC-AUC, PR-AUC (average precision), accuracy, F1 and MCC of class probabilities [N, K].

    The fine-tuned model's rules (molft.metrics.single_label_metrics), so the two sides of a benchmark are
    scored alike: the predicted class is the most probable one; two classes: the positive class is the last
    of `classes` (sorted: 1 of 0/1, True of booleans); more: one-vs-rest macro means. A metric a test set
    cannot define (one class only) is nan, with a warning.
    """
    if classes is None:
        raise ValueError(f"Target {target!r}: classification scores need their classes.")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise ValueError(
            f"Target {target!r}: probabilities of shape {probabilities.shape} for {len(classes)} classes."
        )
    unseen = sorted(set(y_true.tolist()) - set(classes.tolist()), key=str)
    if unseen:
        raise ValueError(
            f"Target {target!r}: test labels {unseen} are no class of the training labels {classes.tolist()}."
        )
    position = {label: i for i, label in enumerate(classes.tolist())}
    indices = np.array([position[label] for label in y_true.tolist()], dtype=np.int64)
    metrics = single_label_metrics(indices, probabilities, [str(c) for c in classes.tolist()])
    return {name: metrics[name] for name in CLASSIFICATION_METRIC_NAMES}


def prediction_frame(
    test: pd.DataFrame,
    labels: pd.DataFrame,
    scores: dict[str, TargetScores],
    class_names: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """predictions.csv of a baseline: the test molecules, each target's label and prediction (or probabilities).

    `class_names`: per target, the name of each class where the labels are class indices 0, 1, ...
    """
    out = test[[c for c in ("row", "smiles", "canonical_smiles") if c in test]].reset_index(drop=True)
    single = len(labels.columns) == 1
    for target in labels.columns:
        suffix = "" if single else f"_{target}"
        out[f"label{suffix}"] = labels[target].to_numpy()
        values, classes = scores[target].values, scores[target].classes
        if classes is None:
            out[f"prediction{suffix}"] = values
            continue
        names = (class_names or {}).get(target)
        shown = [names[int(c)] for c in classes] if names is not None else list(classes)
        if names is not None:
            out[f"label{suffix}"] = [None if pd.isna(v) else names[int(v)] for v in labels[target]]
        picked = (values[:, 1] >= 0.5).astype(int) if len(shown) == 2 else np.argmax(values, axis=1)
        out[f"prediction{suffix}"] = [shown[i] for i in picked]
        for i, name in enumerate(shown):
            out[f"probability{suffix}_{name}"] = values[:, i]
    out["split"] = "test"
    return out


def forest_baseline(
    train: pd.DataFrame,
    test: pd.DataFrame,
    targets: Sequence[str],
    problem_type: str = REGRESSION,
    *,
    smiles_column: str = "canonical_smiles",
    n_estimators: int = DEFAULT_TREES,
    seed: int = 0,
    n_jobs: int = 1,
    class_names: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Fit the forests on `train` and score them on `test` (frames with SMILES and target columns).

    Classes are compared in sorted order; the positive class of binary metrics is the last. Labels that are
    class indices (0, 1, ...) in an order of their own get their names from `class_names` in predictions.csv.
    Returns the test metrics (and the training labels per target, `n_train[_<target>]`) and the predictions.
    """
    targets = list(targets)
    train_x, test_x = ecfp4(train[smiles_column]), ecfp4(test[smiles_column])
    scores = fit_predict_forest(
        train_x, train[targets], test_x, problem_type, n_estimators=n_estimators, seed=seed, n_jobs=n_jobs
    )
    metrics = score_predictions(test[targets], scores, problem_type)
    for target in targets:
        key = "n_train" if len(targets) == 1 else f"n_train_{target}"
        metrics[key] = int(train[target].notna().sum())
    return metrics, prediction_frame(test, test[targets], scores, class_names)
