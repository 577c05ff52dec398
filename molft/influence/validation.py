"""Ground truth for influence scores: actually retrain a ridge head with each candidate added.

The reference model is a linear head on frozen features trained on the same objective the influence
problem uses: mean over n samples of 0.5 * (x . w - y)^2 plus (l2 / 2) ||w||^2 (the intercept, when fitted,
is penalised like every other scoped parameter, matching `damping = l2`). "Adding" a candidate keeps each
sample's weight 1/n and l2 fixed, so the measured effect is, to first order, exactly score / n; the
retrained weights come from one Sherman-Morrison update per candidate (exact, O(d^2) each).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.stats
import torch

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def _as_matrix(values: ArrayLike, name: str, fit_intercept: bool) -> np.ndarray:
    array = _to_numpy(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D feature matrix, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(
            f"{name} contains NaN/inf at rows {np.flatnonzero(~np.isfinite(array).all(1))[:10].tolist()}"
        )
    if fit_intercept:
        array = np.hstack([array, np.ones((array.shape[0], 1))])
    return array


def _as_vector(values: ArrayLike, name: str, rows: int) -> np.ndarray:
    array = _to_numpy(values).reshape(-1)
    if array.shape[0] != rows:
        raise ValueError(f"{name} has {array.shape[0]} entries but its features have {rows} rows")
    if not np.isfinite(array).all():
        raise ValueError(
            f"{name} contains NaN/inf at rows {np.flatnonzero(~np.isfinite(array))[:10].tolist()}"
        )
    return array


def ridge_weights(
    features: ArrayLike, labels: ArrayLike, l2: float, fit_intercept: bool = True
) -> np.ndarray:
    """argmin_w mean 0.5 (x.w - y)^2 + l2/2 ||w||^2; with an intercept, its weight is the last entry."""
    x = _as_matrix(features, "features", fit_intercept)
    y = _as_vector(labels, "labels", x.shape[0])
    system = x.T @ x + x.shape[0] * l2 * np.eye(x.shape[1])
    return scipy.linalg.solve(system, x.T @ y, assume_a="pos")


def leave_one_in_retrain_effect(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    query_labels: ArrayLike,
    candidate_features: ArrayLike,
    candidate_labels: ArrayLike,
    l2: float,
    fit_intercept: bool = True,
    per_query: bool = False,
) -> np.ndarray:
    """Measured change of the query loss (mean 0.5 squared error) when each candidate is added and the
    ridge head retrained: [N], or [Q, N] with `per_query`. Negative = the candidate helps the queries.

    Compare with influence scores computed with damping = l2 on the same head: effect ~= score / n.
    """
    if not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    x = _as_matrix(train_features, "train_features", fit_intercept)
    y = _as_vector(train_labels, "train_labels", x.shape[0])
    xq = _as_matrix(query_features, "query_features", fit_intercept)
    yq = _as_vector(query_labels, "query_labels", xq.shape[0])
    xc = _as_matrix(candidate_features, "candidate_features", fit_intercept)
    yc = _as_vector(candidate_labels, "candidate_labels", xc.shape[0])
    if not x.shape[1] == xq.shape[1] == xc.shape[1]:
        raise ValueError(
            f"feature widths differ: train {x.shape[1]}, query {xq.shape[1]}, candidates {xc.shape[1]}"
        )

    # Base system (x^T x + n l2 I) w = x^T y; a candidate adds the rank-one term x_c x_c^T.
    factor = scipy.linalg.cho_factor(x.T @ x + x.shape[0] * l2 * np.eye(x.shape[1]))
    base = scipy.linalg.cho_solve(factor, x.T @ y)
    solved = scipy.linalg.cho_solve(factor, xc.T)  # B^-1 x_c for every candidate, [d, N]
    leverage = np.einsum("nd,dn->n", xc, solved)
    projected = xc @ base + leverage * yc
    weights = base[:, None] + solved * (yc - projected / (1.0 + leverage))[None, :]

    base_losses = 0.5 * (xq @ base - yq) ** 2
    new_losses = 0.5 * (xq @ weights - yq[:, None]) ** 2
    effects = new_losses - base_losses[:, None]
    return effects if per_query else effects.mean(axis=0)


def spearman_vs(reference_scores: ArrayLike, scores: ArrayLike) -> float:
    """Spearman rank correlation of `scores` against a reference (e.g. the retrain effects)."""
    reference = _as_vector(reference_scores, "reference_scores", _to_numpy(reference_scores).size)
    estimate = _as_vector(scores, "scores", reference.shape[0])
    if reference.shape[0] < 2:
        raise ValueError("need at least 2 scores for a rank correlation")
    if np.ptp(reference) == 0 or np.ptp(estimate) == 0:
        raise ValueError("a constant score vector has no rank correlation (all scores equal)")
    return float(scipy.stats.spearmanr(reference, estimate).statistic)
