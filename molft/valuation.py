"""Shapley data valuation of molecules with cheap surrogate learners on model embeddings.

Retraining MoLFormer for every coalition of molecules is unaffordable, so both estimators value molecules
with a learner that costs almost nothing (k-nearest neighbours, ridge) fitted on the fine-tuned model's
embeddings, and transfer those values back to the choice of fine-tuning data:

- `knn_shapley_regression`: exact Shapley values of a KNN regressor (Jia et al., 2019), O(N log N) per
  validation molecule.
- `ts_dshapley`: TS-DShapley (Schoch et al., 2023): truncated Monte Carlo permutation Shapley computed on
  many small random subsets and averaged per molecule, plus `prune_by_value` to find how many low-valued
  molecules to drop.

Higher value = more useful for predicting the validation labels; negative = harmful.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import KNeighborsRegressor

logger = logging.getLogger(__name__)

SURROGATE_MODELS = ("ridge", "knn")


@dataclass
class ValuationResult:
    """Values plus what they cost, so reports can compare valuation methods on price as well."""

    values: np.ndarray
    n_model_fits: int
    seconds: float
    n_evaluations: np.ndarray  # per point: in how many subsets it was valued
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneResult:
    kept: np.ndarray  # sorted positions of the survivors
    removed: np.ndarray  # removed positions, lowest value first
    utilities: list[float]  # utility after 0, 1, 2, ... chunks were removed (last one may be rejected)
    n_utility_calls: int
    seconds: float


def knn_shapley_regression(
    train_emb: np.ndarray,
    train_y: np.ndarray,
    val_emb: np.ndarray,
    val_y: np.ndarray,
    k: int = 5,
    *,
    metric: str = "euclidean",
    center: bool = True,
    chunk_size: int = 256,
) -> np.ndarray:
    """Exact Shapley value of every training point for a K-nearest-neighbour regressor.

    Utility of a set S for one validation molecule with label t (Jia et al., 2019, regression variant):
    ``U(S) = -(sum of the labels of the min(K, |S|) nearest members of S / K - t)**2``, averaged over the
    validation molecules (i.e. negative validation MSE). Neighbour order is by `metric` distance, ties
    broken by position. With `center` the labels are centred on the mean training label first, so a
    neighbourhood with fewer than K members shrinks its prediction towards the training mean, not towards
    zero; this makes the values independent of where the label scale starts.

    The values follow from a recursion over the distance ranking (phi_i - phi_{i+1} only involves
    coalitions in which rank i is among the K nearest), so the cost is one sort per validation molecule.
    """
    train_emb, train_y = _check_xy(train_emb, train_y, "train")
    val_emb, val_y = _check_xy(val_emb, val_y, "validation")
    if train_emb.shape[1] != val_emb.shape[1]:
        raise ValueError(
            f"Train embeddings have {train_emb.shape[1]} dimensions, "
            f"validation embeddings {val_emb.shape[1]}."
        )
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    n_points = len(train_y)
    offset = float(train_y.mean()) if center else 0.0
    labels = train_y - offset
    targets = val_y - offset

    # rank-dependent weights of the recursion (ranks are 1-based: rank 1 = nearest)
    rank = np.arange(1, n_points + 1, dtype=np.float64)
    lower = rank[:-1]  # i = 1 .. N-1, the first member of each adjacent pair (i, i+1)
    p_top = np.minimum(k, lower) / lower  # P(fewer than K nearer points precede the pair)
    n_nearer = lower - 1
    top_nearer = np.minimum(k - 1, n_nearer)
    with np.errstate(divide="ignore", invalid="ignore"):
        # weight of each nearer point in the shared neighbourhood sum
        w_nearer = np.where(
            n_nearer > 0, top_nearer * (top_nearer + 1) / (2 * n_nearer * (n_nearer + 1)), 0.0
        )
        # weight of the point at rank j (j >= i + 2) in the shared neighbourhood sum, independent of i
        top_before = np.minimum(k - 1, rank - 2)
        w_farther = np.where(rank >= 3, top_before * (top_before + 1) / (2 * (rank - 2) * (rank - 1)), 0.0)
    last_top = min(k - 1, n_points - 1)

    totals = np.zeros(n_points, dtype=np.float64)
    for start in range(0, len(targets), chunk_size):
        dist = pairwise_distances(val_emb[start : start + chunk_size], train_emb, metric=metric)
        order = np.argsort(dist, axis=1, kind="stable")
        ranked = labels[order]  # [B, N] labels by increasing distance
        target = targets[start : start + chunk_size, None]

        nearer_sum = np.cumsum(ranked, axis=1) - ranked  # sum of labels ranked before i
        farther = np.cumsum((ranked * w_farther)[:, ::-1], axis=1)[:, ::-1]
        farther = np.concatenate([farther, np.zeros((len(ranked), 1))], axis=1)
        expected_sum = w_nearer * nearer_sum[:, :-1] + farther[:, 2:]
        y_i, y_next = ranked[:, :-1], ranked[:, 1:]
        step = (y_next - y_i) / k * ((2 * expected_sum + (y_i + y_next) * p_top) / k - 2 * target * p_top)

        # the farthest point only matters in coalitions with fewer than K members
        y_last = ranked[:, -1:]
        others_mean = (ranked.sum(axis=1, keepdims=True) - y_last) / max(n_points - 1, 1)
        phi_last = -(y_last / (k * n_points)) * (
            others_mean / k * last_top * (last_top + 1) + (last_top + 1) * (y_last / k - 2 * target)
        )
        phi_ranked = phi_last + np.concatenate(
            [np.cumsum(step[:, ::-1], axis=1)[:, ::-1], np.zeros((len(ranked), 1))], axis=1
        )
        values = np.empty_like(phi_ranked)
        np.put_along_axis(values, order, phi_ranked, axis=1)
        totals += values.sum(axis=0)
    return totals / len(targets)


def ts_dshapley(
    emb: np.ndarray,
    y: np.ndarray,
    val_emb: np.ndarray,
    val_y: np.ndarray,
    *,
    n_subsets: int | None = None,
    subset_size: int = 30,
    n_permutations: int = 10,
    model: str = "ridge",
    seed: int = 0,
    truncation_tol: float = 0.0,
    ridge_alpha: float = 1.0,
    n_neighbors: int = 5,
) -> ValuationResult:
    """TS-DShapley: Monte Carlo permutation Shapley on many small subsets, averaged per point.

    Utility = negative validation MSE of `model` (sklearn Ridge or KNeighborsRegressor on the embeddings
    as given) fitted on a coalition; the empty coalition predicts the mean label of all points. Subsets
    are consecutive blocks of fresh random permutations, so every point is valued in as many subsets as
    any other (+-1). `n_subsets=None` means enough subsets for each point to be valued about 5 times.
    With `truncation_tol > 0` a permutation stops once the coalition's utility is within
    `truncation_tol * |U(subset)|` of the whole subset's (Ghorbani & Zou, 2019); later marginals count 0.
    """
    emb, y = _check_xy(emb, y, "embeddings")
    val_emb, val_y = _check_xy(val_emb, val_y, "validation")
    if model not in SURROGATE_MODELS:
        raise ValueError(f"Unknown surrogate model {model!r}; choose one of {SURROGATE_MODELS}.")
    n_points = len(y)
    if not 1 <= subset_size <= n_points:
        raise ValueError(
            f"subset_size must be between 1 and the number of points ({n_points}), got {subset_size}."
        )
    if n_subsets is None:
        n_subsets = math.ceil(5 * n_points / subset_size)
    if n_subsets * subset_size < n_points:
        raise ValueError(
            f"n_subsets={n_subsets} of size {subset_size} cannot value all {n_points} points; "
            f"use n_subsets >= {math.ceil(n_points / subset_size)}."
        )
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}.")

    def utility(rows: np.ndarray) -> float:
        return _surrogate_utility(emb[rows], y[rows], val_emb, val_y, model, ridge_alpha, n_neighbors)

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    empty_utility = -float(np.mean((y.mean() - val_y) ** 2))
    value_sums = np.zeros(n_points)
    counts = np.zeros(n_points, dtype=np.int64)
    n_fits = 0
    for members in _balanced_subsets(n_points, n_subsets, subset_size, rng):
        full_utility = utility(members)
        n_fits += 1
        marginal_sums = np.zeros(len(members))
        for _ in range(n_permutations):
            order = rng.permutation(len(members))
            previous = empty_utility
            for position, member in enumerate(order):
                if truncation_tol > 0 and abs(full_utility - previous) <= truncation_tol * abs(full_utility):
                    break
                if position == len(order) - 1:
                    current = full_utility
                else:
                    current = utility(members[order[: position + 1]])
                    n_fits += 1
                marginal_sums[member] += current - previous
                previous = current
        value_sums[members] += marginal_sums / n_permutations
        counts[members] += 1
    seconds = time.perf_counter() - started
    logger.info("TS-DShapley: %d model fits in %.1f s for %d points", n_fits, seconds, n_points)
    params = {
        "n_subsets": n_subsets,
        "subset_size": subset_size,
        "n_permutations": n_permutations,
        "model": model,
        "seed": seed,
        "truncation_tol": truncation_tol,
        "ridge_alpha": ridge_alpha,
        "n_neighbors": n_neighbors,
        "utility": "negative validation MSE",
    }
    return ValuationResult(value_sums / counts, n_fits, seconds, counts, params)


def surrogate_utility(
    emb: np.ndarray,
    y: np.ndarray,
    val_emb: np.ndarray,
    val_y: np.ndarray,
    *,
    model: str = "ridge",
    ridge_alpha: float = 1.0,
    n_neighbors: int = 5,
) -> float:
    """Negative validation MSE of the surrogate learner fitted on (emb, y): the utility TS-DShapley uses."""
    emb, y = _check_xy(emb, y, "embeddings")
    val_emb, val_y = _check_xy(val_emb, val_y, "validation")
    if model not in SURROGATE_MODELS:
        raise ValueError(f"Unknown surrogate model {model!r}; choose one of {SURROGATE_MODELS}.")
    return _surrogate_utility(emb, y, val_emb, val_y, model, ridge_alpha, n_neighbors)


def prune_by_value(
    values: np.ndarray,
    utility_fn: Callable[[np.ndarray], float],
    *,
    chunk_size: int | None = None,
    min_improvement: float = 0.0,
    min_kept: int = 1,
) -> PruneResult:
    """Drop the lowest-valued points one chunk at a time while the utility keeps improving.

    `utility_fn(kept_positions)` scores a candidate set (higher is better). Stops at the first chunk whose
    removal does not raise the utility by more than `min_improvement`; that chunk stays.
    `chunk_size=None` removes 5% of the points (at least one) per step.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("values must be a non-empty 1-D array.")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(f"values are not finite at positions {bad[:10].tolist()}.")
    n_points = len(values)
    if chunk_size is None:
        chunk_size = max(1, round(0.05 * n_points))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    started = time.perf_counter()
    order = np.argsort(values, kind="stable")  # lowest value first
    n_removed = 0
    best = float(utility_fn(np.sort(order)))
    utilities = [best]
    while n_removed < n_points - min_kept:
        candidate = min(n_removed + chunk_size, n_points - min_kept)
        current = float(utility_fn(np.sort(order[candidate:])))
        utilities.append(current)
        if not current > best + min_improvement:
            break
        best, n_removed = current, candidate
    seconds = time.perf_counter() - started
    logger.info(
        "Pruning removed %d of %d points (utility %.4g -> %.4g)", n_removed, n_points, utilities[0], best
    )
    return PruneResult(np.sort(order[n_removed:]), order[:n_removed], utilities, len(utilities), seconds)


def _surrogate_utility(
    emb: np.ndarray,
    y: np.ndarray,
    val_emb: np.ndarray,
    val_y: np.ndarray,
    model: str,
    ridge_alpha: float,
    n_neighbors: int,
) -> float:
    if model == "ridge":
        learner = Ridge(alpha=ridge_alpha)
    else:
        learner = KNeighborsRegressor(n_neighbors=min(n_neighbors, len(y)))
    predictions = learner.fit(emb, y).predict(val_emb)
    return -float(np.mean((predictions - val_y) ** 2))


def _balanced_subsets(n_points: int, n_subsets: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    # A stream of back-to-back random permutations, cut into blocks of `size` distinct points; a point
    # that would repeat inside a block waits for the next one. Every point is used once per pass.
    subsets = []
    stream = rng.permutation(n_points)
    for _ in range(n_subsets):
        while len(np.unique(stream)) < size:
            stream = np.concatenate([stream, rng.permutation(n_points)])
        _, first_positions = np.unique(stream, return_index=True)
        take = np.sort(first_positions)[:size]
        subsets.append(stream[take])
        stream = np.delete(stream, take)
    return subsets


def _check_xy(emb: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(emb, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"{name} embeddings must be 2-D [N, D], got shape {emb.shape}.")
    if y.ndim != 1 or len(y) != len(emb):
        raise ValueError(f"{name} labels must be 1-D with {len(emb)} entries, got shape {y.shape}.")
    if len(y) == 0:
        raise ValueError(f"{name} set is empty.")
    bad = np.flatnonzero(~np.isfinite(y))
    if len(bad):
        raise ValueError(f"{name} labels are not finite at positions {bad[:10].tolist()}.")
    if not np.isfinite(emb).all():
        raise ValueError(f"{name} embeddings contain non-finite values.")
    return emb, y
