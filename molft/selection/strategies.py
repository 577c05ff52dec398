"""The selection strategies, each registered under its name (see `molft.selection.registry`).

Influence scores follow the convention NEGATIVE = helpful; uncertainty is the MC-dropout variance;
diversity spreads the picks over chemical space; stratified keeps the pool's label distribution;
knn_shapley and ts_dshapley value molecules with surrogate learners on embeddings (`molft.valuation`);
`all` and `none` are the controls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from rdkit.SimDivFilters import MaxMinPicker
from sklearn.cluster import KMeans

from molft.chem import morgan_fingerprints
from molft.selection.pool import SelectionPool
from molft.selection.registry import Picked, register_strategy
from molft.valuation import knn_shapley_regression, prune_by_value, surrogate_utility, ts_dshapley

logger = logging.getLogger(__name__)

INFLUENCE_MODES = ("top", "bottom", "percentile", "helpful")
UNCERTAINTY_MODES = ("top", "percentile")
DIVERSITY_METHODS = ("kmeans", "maxmin")
TS_DSHAPLEY_MODES = ("top", "prune")

# strategies that value molecules with surrogate learners on embeddings: they need labels and the run's split
VALUATION_STRATEGIES = ("knn_shapley", "ts_dshapley")


@register_strategy("influence")
def _influence(
    pool: SelectionPool, budget: int | None, seed: int, mode: str = "top", percentile: float = 10.0
) -> Picked:
    """Rank by influence score (negative = helpful); ties by pool position.

    top: the `budget` most helpful; bottom: the `budget` least helpful (reversed control);
    percentile: every molecule with score <= the `percentile`-th percentile of the scores;
    helpful: every molecule with score < 0. The last two use the budget as a cap, most helpful first.
    """
    pool.require("influence_scores", purpose="Strategy 'influence'")
    scores = pool.influence_scores
    ascending = np.argsort(scores, kind="stable")
    info: dict[str, Any] = {}
    if mode == "top":
        order = ascending[: _need_budget(budget, "influence", mode)]
    elif mode == "bottom":
        order = np.argsort(-scores, kind="stable")[: _need_budget(budget, "influence", mode)]
    elif mode == "percentile":
        _check_percentile(percentile)
        threshold = float(np.percentile(scores, percentile))
        order = _cap(ascending[scores[ascending] <= threshold], budget)
        info["threshold"] = threshold
    elif mode == "helpful":
        order = _cap(ascending[scores[ascending] < 0], budget)
    else:
        raise ValueError(f"Unknown influence mode {mode!r}; choose one of {INFLUENCE_MODES}.")
    return order, scores[order], info


@register_strategy("random")
def _random(pool: SelectionPool, budget: int | None, seed: int) -> Picked:
    """Uniform sample without replacement: the baseline every other strategy must beat."""
    k = _need_budget(budget, "random")
    order = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
    return order, None, {}


@register_strategy("uncertainty")
def _uncertainty(
    pool: SelectionPool, budget: int | None, seed: int, mode: str = "top", percentile: float = 90.0
) -> Picked:
    """Rank by MC-dropout variance across passes (ddof=1), highest first; ties by pool position.

    top: the `budget` most uncertain; percentile: every molecule with variance >= the `percentile`-th
    percentile (budget as cap). The seed is unused: the passes were drawn when the predictions were made.
    """
    pool.require("mc_predictions", purpose="Strategy 'uncertainty'")
    if pool.mc_predictions.shape[0] < 2:
        raise ValueError("Strategy 'uncertainty' needs at least 2 MC-dropout passes to estimate a variance.")
    variance = pool.mc_predictions.var(axis=0, ddof=1)
    descending = np.argsort(-variance, kind="stable")
    info: dict[str, Any] = {"n_passes": int(pool.mc_predictions.shape[0])}
    if mode == "top":
        order = descending[: _need_budget(budget, "uncertainty", mode)]
    elif mode == "percentile":
        _check_percentile(percentile)
        threshold = float(np.percentile(variance, percentile))
        order = _cap(descending[variance[descending] >= threshold], budget)
        info["threshold"] = threshold
    else:
        raise ValueError(f"Unknown uncertainty mode {mode!r}; choose one of {UNCERTAINTY_MODES}.")
    return order, variance[order], info


@register_strategy("diversity")
def _diversity(
    pool: SelectionPool,
    budget: int | None,
    seed: int,
    method: str = "maxmin",
    from_train: bool = False,
    radius: int = 2,
    n_bits: int = 2048,
    n_init: int = 10,
) -> Picked:
    """Spread the picks over chemical space.

    kmeans: k-means (k = budget) on the embeddings; from each cluster the member closest to its centroid,
    larger clusters first; score = distance to the centroid. maxmin: RDKit MaxMin picking on Morgan
    fingerprints (Tanimoto distance); with `from_train` the training set counts as already picked, so the
    picks are also far from the training data. `radius`/`n_bits` are for maxmin, `n_init` for kmeans.
    """
    k = _need_budget(budget, "diversity", method)
    if method == "kmeans":
        pool.require("embeddings", purpose="Strategy 'diversity' with method 'kmeans'")
        return _kmeans_representatives(pool.embeddings, k, seed, n_init)
    if method == "maxmin":
        if from_train:
            pool.require("train_smiles", purpose="Strategy 'diversity' with from_train")
        return _maxmin_pick(pool, k, seed, from_train, radius, n_bits)
    raise ValueError(f"Unknown diversity method {method!r}; choose one of {DIVERSITY_METHODS}.")


@register_strategy("stratified")
def _stratified(pool: SelectionPool, budget: int | None, seed: int, n_bins: int = 5) -> Picked:
    """Keep the pool's label distribution: quantile bins, proportional quotas, random picks per bin.

    Quotas are floor(budget * bin share) plus one for the bins with the largest remainders, so they sum
    to the budget exactly. Picks are listed bin by bin, lowest labels first.
    """
    pool.require("labels", purpose="Strategy 'stratified'")
    k = _need_budget(budget, "stratified")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    labels = pool.labels
    edges = np.quantile(labels, np.linspace(0, 1, n_bins + 1))
    bin_of = np.searchsorted(edges[1:-1], labels, side="right")
    sizes = np.bincount(bin_of, minlength=n_bins)
    numerators = k * sizes  # exact integer arithmetic for the largest-remainder rule
    quotas = numerators // len(pool)
    by_remainder = np.argsort(-(numerators % len(pool)), kind="stable")
    quotas[by_remainder[: k - int(quotas.sum())]] += 1
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(bin_of == b), size=int(quotas[b]), replace=False) for b in range(n_bins)
    ]
    info = {"bin_edges": edges.tolist(), "bin_sizes": sizes.tolist(), "quotas": quotas.tolist()}
    return np.concatenate(picks).astype(np.int64), None, info


@register_strategy("knn_shapley")
def _knn_shapley(
    pool: SelectionPool,
    budget: int | None,
    seed: int,
    n_neighbors: int = 5,
    metric: str = "euclidean",
    include_train: bool = True,
) -> Picked:
    """The `budget` molecules with the highest exact KNN-Shapley value (see valuation.knn_shapley_regression).

    Players are the training molecules plus the pool (`include_train`), or the pool alone; the utility is
    the KNN regressor's negative MSE on the validation set. Deterministic: the seed is unused.
    """
    k = _need_budget(budget, "knn_shapley")
    needed = ["embeddings", "labels", "val_embeddings", "val_labels"]
    needed += ["train_embeddings", "train_labels"] if include_train else []
    pool.require(*needed, purpose="Strategy 'knn_shapley'")
    emb, labels, n_train = _players(pool, include_train)
    started = time.perf_counter()
    values = knn_shapley_regression(
        emb, labels, pool.val_embeddings, pool.val_labels, n_neighbors, metric=metric
    )
    values = values[n_train:]
    order = np.argsort(-values, kind="stable")[:k]
    info = {"seconds": time.perf_counter() - started, "n_players": len(labels)}
    return order, values[order], info


@register_strategy("ts_dshapley")
def _ts_dshapley(
    pool: SelectionPool,
    budget: int | None,
    seed: int,
    mode: str = "top",
    model: str = "ridge",
    n_subsets: int | None = None,
    subset_size: int = 30,
    n_permutations: int = 10,
    truncation_tol: float = 0.0,
    ridge_alpha: float = 1.0,
    n_neighbors: int = 5,
    include_train: bool = False,
    prune_chunk_size: int | None = None,
) -> Picked:
    """TS-DShapley values of the pool molecules (see valuation.ts_dshapley); score = value.

    top: the `budget` highest-valued molecules. prune: drop the lowest-valued molecules chunk by chunk
    while the surrogate model fitted on training data (when given) plus the remaining pool keeps
    improving on validation; returns the survivors, highest value first, capped by the budget.
    `include_train` values the pool in random mixes with training molecules rather than among itself.
    """
    if mode not in TS_DSHAPLEY_MODES:
        raise ValueError(f"Unknown ts_dshapley mode {mode!r}; choose one of {TS_DSHAPLEY_MODES}.")
    if mode == "top":
        _need_budget(budget, "ts_dshapley", mode)
    needed = ["embeddings", "labels", "val_embeddings", "val_labels"]
    needed += ["train_embeddings", "train_labels"] if include_train else []
    pool.require(*needed, purpose="Strategy 'ts_dshapley'")
    emb, labels, n_train = _players(pool, include_train)
    if subset_size > len(labels):
        logger.info(
            "subset_size %d exceeds the %d points to value; using %d.", subset_size, len(labels), len(labels)
        )
    result = ts_dshapley(
        emb,
        labels,
        pool.val_embeddings,
        pool.val_labels,
        n_subsets=n_subsets,
        subset_size=min(subset_size, len(labels)),
        n_permutations=n_permutations,
        model=model,
        seed=seed,
        truncation_tol=truncation_tol,
        ridge_alpha=ridge_alpha,
        n_neighbors=n_neighbors,
    )
    values = result.values[n_train:]
    info: dict[str, Any] = {"n_model_fits": result.n_model_fits, "seconds": result.seconds}
    descending = np.argsort(-values, kind="stable")
    if mode == "top":
        order = descending[:budget]
    else:
        has_train = pool.train_embeddings is not None and pool.train_labels is not None
        base_emb = pool.train_embeddings if has_train else np.empty((0, pool.embeddings.shape[1]))
        base_y = pool.train_labels if has_train else np.empty(0)

        def utility(kept: np.ndarray) -> float:
            return surrogate_utility(
                np.concatenate([base_emb, pool.embeddings[kept]]),
                np.concatenate([base_y, pool.labels[kept]]),
                pool.val_embeddings,
                pool.val_labels,
                model=model,
                ridge_alpha=ridge_alpha,
                n_neighbors=n_neighbors,
            )

        pruned = prune_by_value(values, utility, chunk_size=prune_chunk_size)
        survivors = np.isin(descending, pruned.kept)
        order = _cap(descending[survivors], budget)
        info.update(
            prune_utilities=pruned.utilities,
            n_removed=len(pruned.removed),
            prune_seconds=pruned.seconds,
            prune_with_train=has_train,
        )
    return order, values[order], info


@register_strategy("all", uses_budget=False)
def _all(pool: SelectionPool, budget: int | None, seed: int) -> Picked:
    """Control: add the whole pool."""
    return np.arange(len(pool)), None, {}


@register_strategy("none", uses_budget=False)
def _none(pool: SelectionPool, budget: int | None, seed: int) -> Picked:
    """Control: add nothing (retrain on the original training set only)."""
    return np.empty(0, dtype=np.int64), None, {}


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _need_budget(budget: int | None, strategy: str, mode: str | None = None) -> int:
    if budget is None:
        what = f"Strategy {strategy!r}" + (f" in mode {mode!r}" if mode else "")
        raise ValueError(f"{what} picks a fixed number of molecules: give a budget (k or fraction).")
    return budget


def _cap(order: np.ndarray, budget: int | None) -> np.ndarray:
    return order if budget is None else order[:budget]


def _check_percentile(percentile: float) -> None:
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")


def _players(pool: SelectionPool, include_train: bool) -> tuple[np.ndarray, np.ndarray, int]:
    if not include_train:
        return pool.embeddings, pool.labels, 0
    emb = np.concatenate([pool.train_embeddings, pool.embeddings])
    labels = np.concatenate([pool.train_labels, pool.labels])
    return emb, labels, len(pool.train_labels)


def _kmeans_representatives(emb: np.ndarray, k: int, seed: int, n_init: int) -> Picked:
    if k == 0:
        return np.empty(0, dtype=np.int64), np.empty(0), {}
    n_distinct = len(np.unique(emb, axis=0))
    if n_distinct < k:
        raise ValueError(f"k-means needs at least k={k} distinct embeddings; the pool has {n_distinct}.")
    kmeans = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(emb)
    sizes = np.bincount(kmeans.labels_, minlength=k)
    taken = np.zeros(len(emb), dtype=bool)
    picks, distances = [], []
    for cluster in np.argsort(-sizes, kind="stable"):  # larger clusters first
        members = np.flatnonzero((kmeans.labels_ == cluster) & ~taken)
        if len(members) == 0:  # an empty cluster borrows the nearest point not yet taken
            members = np.flatnonzero(~taken)
        dist = np.linalg.norm(emb[members] - kmeans.cluster_centers_[cluster], axis=1)
        best = members[int(np.argmin(dist))]
        taken[best] = True
        picks.append(best)
        distances.append(float(dist.min()))
    info = {"cluster_sizes": np.sort(sizes)[::-1].tolist(), "inertia": float(kmeans.inertia_)}
    return np.asarray(picks, dtype=np.int64), np.asarray(distances), info


def _maxmin_pick(
    pool: SelectionPool, k: int, seed: int, from_train: bool, radius: int, n_bits: int
) -> Picked:
    if k == 0:
        return np.empty(0, dtype=np.int64), None, {}
    pool_fps = _fingerprints(pool.smiles, "pool", radius, n_bits)
    train_fps = _fingerprints(pool.train_smiles, "training", radius, n_bits) if from_train else []
    fps = train_fps + pool_fps
    n_train = len(train_fps)
    picks = MaxMinPicker().LazyBitVectorPick(
        fps, len(fps), n_train + k, firstPicks=list(range(n_train)), seed=seed
    )
    order = np.asarray(list(picks)[n_train:], dtype=np.int64) - n_train
    return order, None, {"n_train_first_picks": n_train}


def _fingerprints(smiles: Sequence[str], which: str, radius: int, n_bits: int) -> list:
    try:
        return morgan_fingerprints(smiles, radius=radius, n_bits=n_bits)
    except ValueError as err:
        raise ValueError(f"In the {which} SMILES: {err}") from err
