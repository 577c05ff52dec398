"""Strategies that choose external molecules to add to the training set, behind one interface.

Every strategy works on precomputed arrays held by a `SelectionPool` (influence scores, embeddings,
MC-dropout predictions, labels, SMILES), so the choice can be tested and re-run without the model, and
each is deterministic for a given seed. `select(name, pool, budget, seed, **params)` runs one and returns
a `Selection`; `selection_manifest` and `write_selection` record it next to the chosen molecules.

Budget convention: strategies that pick a fixed number of molecules pick exactly `budget`; threshold
modes (influence "percentile"/"helpful", uncertainty "percentile", ts_dshapley "prune") take every
molecule past the threshold and use the budget, when given, only as a cap (best first); the controls
`all` and `none` ignore it.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rdkit.SimDivFilters import MaxMinPicker
from sklearn.cluster import KMeans

from molft import __version__
from molft.chem import canonical_smiles, morgan_fingerprints
from molft.data import (
    LABEL_CANDIDATES,
    SMILES_CANDIDATES,
    find_column,
    prepare_molecules,
    read_table,
)
from molft.io import write_csv, write_json
from molft.valuation import knn_shapley_regression, prune_by_value, surrogate_utility, ts_dshapley

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Where each input of a strategy comes from, for error messages that say what to pass.
FIELD_SOURCES: dict[str, str] = {
    "labels": "pool labels (the label column of the pool file, --pool_label_column)",
    "influence_scores": "influence scores for this pool (run_influence.py's scores file, --scores_file)",
    "embeddings": "pool embeddings (--pool_embeddings_file, or --model_name_or_path to embed the pool)",
    "mc_predictions": "MC-dropout predictions [passes, pool] (--mc_predictions_file, or --model_name_or_path "
    "with --mc_passes)",
    "train_smiles": "the training split (--train_file)",
    "train_embeddings": "training-set embeddings (--train_embeddings_file, or --model_name_or_path)",
    "train_labels": "training labels (--train_file)",
    "val_embeddings": "validation embeddings (--validation_embeddings_file, or --model_name_or_path)",
    "val_labels": "validation labels (--validation_file)",
}

INFLUENCE_MODES = ("top", "bottom", "percentile", "helpful")
UNCERTAINTY_MODES = ("top", "percentile")
DIVERSITY_METHODS = ("kmeans", "maxmin")
TS_DSHAPLEY_MODES = ("top", "prune")


@dataclass
class SelectionPool:
    """The external candidates plus every precomputed array a strategy may need.

    `smiles` should be canonical (they identify the pool in manifests). Influence scores follow the
    convention NEGATIVE = helpful (a predicted decrease of the query loss when the molecule is added).
    `mc_predictions` is [passes, pool]. The train_* and val_* arrays describe the current training and
    validation data, for strategies that judge candidates relative to them.
    """

    smiles: list[str]
    labels: np.ndarray | None = None
    influence_scores: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    mc_predictions: np.ndarray | None = None
    train_smiles: list[str] | None = None
    train_embeddings: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    val_embeddings: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.smiles = list(self.smiles)
        n_pool = len(self.smiles)
        self.labels = _vector(self.labels, "labels", n_pool)
        self.influence_scores = _vector(self.influence_scores, "influence_scores", n_pool)
        self.embeddings = _matrix(self.embeddings, "embeddings", n_pool)
        if self.mc_predictions is not None:
            self.mc_predictions = np.asarray(self.mc_predictions, dtype=np.float64)
            if self.mc_predictions.ndim != 2 or self.mc_predictions.shape[1] != n_pool:
                raise ValueError(
                    f"mc_predictions must be [passes, {n_pool}] (one column per pool molecule), "
                    f"got shape {self.mc_predictions.shape}."
                )
            if not np.isfinite(self.mc_predictions).all():
                raise ValueError("mc_predictions contain non-finite values.")
        n_train = _common_length(
            {
                "train_smiles": self.train_smiles,
                "train_embeddings": self.train_embeddings,
                "train_labels": self.train_labels,
            }
        )
        if self.train_smiles is not None:
            self.train_smiles = list(self.train_smiles)
        self.train_labels = _vector(self.train_labels, "train_labels", n_train)
        self.train_embeddings = _matrix(self.train_embeddings, "train_embeddings", n_train)
        n_val = _common_length({"val_embeddings": self.val_embeddings, "val_labels": self.val_labels})
        self.val_labels = _vector(self.val_labels, "val_labels", n_val)
        self.val_embeddings = _matrix(self.val_embeddings, "val_embeddings", n_val)
        dims = {
            name: getattr(self, name).shape[1]
            for name in ("embeddings", "train_embeddings", "val_embeddings")
            if getattr(self, name) is not None
        }
        if len(set(dims.values())) > 1:
            raise ValueError(f"Embedding sizes differ between inputs: {dims}; they must come from one model.")

    def __len__(self) -> int:
        return len(self.smiles)

    def require(self, *names: str, purpose: str) -> None:
        """Fail early, naming what is missing and which input provides it."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            details = "; ".join(f"{name}: {FIELD_SOURCES.get(name, name)}" for name in missing)
            raise ValueError(f"{purpose} needs inputs that were not given — {details}.")


@dataclass
class Selection:
    """Chosen pool positions in pick order, with the score that ranked each (None if none did)."""

    indices: np.ndarray
    scores: np.ndarray | None
    strategy: str
    params: dict[str, Any]
    seed: int
    budget: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # diagnostics and cost: seconds, fits, thresholds

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        if len(np.unique(self.indices)) != len(self.indices):
            raise ValueError(f"Strategy {self.strategy!r} picked a molecule twice.")
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if len(self.scores) != len(self.indices):
                raise ValueError("Selection scores must have one entry per chosen index.")

    def __len__(self) -> int:
        return len(self.indices)


Picked = tuple[np.ndarray, np.ndarray | None, dict[str, Any]]


@dataclass(frozen=True)
class _Strategy:
    name: str
    fn: Callable[..., Picked]
    uses_budget: bool


STRATEGIES: dict[str, _Strategy] = {}


def register_strategy(
    name: str, *, uses_budget: bool = True
) -> Callable[[Callable[..., Picked]], Callable[..., Picked]]:
    """Add a strategy `fn(pool, budget, seed, **params) -> (indices, scores, info)` under `name`."""

    def decorate(fn: Callable[..., Picked]) -> Callable[..., Picked]:
        if name in STRATEGIES:
            raise ValueError(f"Selection strategy {name!r} is registered twice.")
        STRATEGIES[name] = _Strategy(name, fn, uses_budget)
        return fn

    return decorate


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)


def strategy_parameters(name: str) -> dict[str, Any]:
    """Tunable parameters of a strategy with their defaults (for help texts and config checks)."""
    spec = _get_strategy(name)
    parameters = list(inspect.signature(spec.fn).parameters.values())[3:]
    return {p.name: p.default for p in parameters}


def resolve_budget(pool_size: int, k: int | None = None, fraction: float | None = None) -> int:
    """Number of molecules to pick from exactly one of `k` or `fraction` of the pool (rounded half up)."""
    if (k is None) == (fraction is None):
        raise ValueError("Give exactly one of k (number of molecules) or fraction (share of the pool).")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"k must be an integer, got {k!r}.")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        if k > pool_size:
            raise ValueError(f"k={k} exceeds the pool size {pool_size}.")
        return int(k)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    budget = math.floor(fraction * pool_size + 0.5)
    if budget == 0:
        logger.warning("fraction=%s of a pool of %d rounds to 0 molecules.", fraction, pool_size)
    return budget


def select(strategy: str, pool: SelectionPool, budget: int | None, seed: int = 0, **params: Any) -> Selection:
    """Run one registered strategy; unknown parameters are an error rather than silently ignored."""
    spec = _get_strategy(strategy)
    allowed = strategy_parameters(strategy)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"Strategy {strategy!r} does not take parameter(s) {unknown}; "
            f"it takes {sorted(allowed) or 'none'}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}.")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
            raise ValueError(f"budget must be a non-negative integer or None, got {budget!r}.")
        if budget > len(pool):
            raise ValueError(f"budget {budget} exceeds the pool size {len(pool)}.")
        budget = int(budget)
    if not spec.uses_budget and budget is not None:
        logger.info("Strategy %r ignores the budget (%d).", strategy, budget)
        budget = None
    effective = {**allowed, **params}
    indices, scores, info = spec.fn(pool, budget, int(seed), **params)
    selection = Selection(indices, scores, strategy, effective, int(seed), budget, info)
    if budget is not None and len(selection) > budget:
        raise RuntimeError(
            f"Strategy {strategy!r} picked {len(selection)} molecules for a budget of {budget}."
        )
    logger.info("Strategy %r picked %d of %d pool molecules.", strategy, len(selection), len(pool))
    return selection


# ----------------------------------------------------------------------------------------------------------
# Strategies


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
# Pool files, score files, manifests and outputs


def load_pool(
    path: str | os.PathLike,
    smiles_column: str | None = None,
    label_column: str | None = None,
    *,
    require_labels: bool = True,
) -> pd.DataFrame:
    """Read an external pool through molft.data: columns smiles, canonical_smiles, label, row.

    Unparsable SMILES are an error rather than a dropped row, because pool indices must stay aligned
    with score and embedding files computed for the same file. Columns are auto-detected unless named.
    """
    table = read_table(path)
    source = str(path)
    smiles_col = find_column(table, smiles_column, SMILES_CANDIDATES, "SMILES", source)
    label_col = label_column
    if label_col is None:
        try:
            label_col = find_column(table, None, LABEL_CANDIDATES, "label", source)
        except ValueError:
            if require_labels:
                raise
            logger.info("Pool file %s has no label column; label-based strategies are unavailable.", path)
    return prepare_molecules(
        table, smiles_col, label_col, source=source, strict=True, require_labels=require_labels
    )


def check_scores_match_pool(
    scores_frame: pd.DataFrame,
    pool_frame: pd.DataFrame,
    *,
    score_column: str = "score",
    smiles_column: str = "smiles",
    index_column: str = "index",
) -> np.ndarray:
    """Return the scores in pool order after checking they were computed for this very pool.

    Score files carry the SMILES of each pool index; a file written for another external set (or a
    reordered one) would otherwise silently attach scores to the wrong molecules.
    """
    missing = [c for c in (score_column, smiles_column) if c not in scores_frame.columns]
    if missing:
        raise ValueError(f"Score file lacks column(s) {missing}; it has {list(scores_frame.columns)}.")
    n_pool = len(pool_frame)
    if len(scores_frame) != n_pool:
        raise ValueError(
            f"Score file has {len(scores_frame)} rows but the pool has {n_pool} molecules: "
            "the scores were computed for another pool."
        )
    if index_column in scores_frame.columns:
        index = scores_frame[index_column].to_numpy()
        if not np.array_equal(np.sort(index), np.arange(n_pool)):
            raise ValueError(
                f"Score file column {index_column!r} is not a permutation of the pool indices "
                f"0..{n_pool - 1}."
            )
        scores_frame = scores_frame.iloc[np.argsort(index, kind="stable")]
    score_smiles = [canonical_smiles(s) or str(s) for s in scores_frame[smiles_column]]
    pool_smiles = _canonical_column(pool_frame).tolist()
    mismatched = [i for i, (a, b) in enumerate(zip(score_smiles, pool_smiles, strict=True)) if a != b]
    if mismatched:
        examples = ", ".join(f"{i}: {score_smiles[i]!r} vs pool {pool_smiles[i]!r}" for i in mismatched[:3])
        raise ValueError(
            f"Score file does not match the pool at {len(mismatched)} of {n_pool} indices ({examples}): "
            "the scores were computed for another pool."
        )
    scores = pd.to_numeric(scores_frame[score_column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(
            f"Score file column {score_column!r} is missing or not finite at pool indices "
            f"{bad[:10].tolist()}."
        )
    return scores


def selection_manifest(
    selection: Selection, pool_source: str | os.PathLike, pool_fingerprint: str
) -> dict[str, Any]:
    """Everything needed to reproduce a selection and to check later that it refers to the same pool."""
    return _jsonable(
        {
            "strategy": selection.strategy,
            "params": selection.params,
            "seed": selection.seed,
            "budget": selection.budget,
            "n_selected": len(selection),
            "indices": selection.indices,
            "scores": selection.scores,
            "pool_file": str(pool_source),
            "pool_sha256": pool_fingerprint,
            "info": selection.info,
            "molft_version": __version__,
        }
    )


def selected_frame(pool_frame: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """One row per chosen molecule in pick order: rank, index, smiles (canonical), label (if known), score.

    The smiles/label columns are the ones run_regression.py's --extra_train_file detects by itself.
    """
    canonical = _canonical_column(pool_frame)
    if len(selection) and (selection.indices.min() < 0 or selection.indices.max() >= len(pool_frame)):
        raise ValueError(f"Selection indices fall outside the pool of {len(pool_frame)} molecules.")
    rows = pool_frame.iloc[selection.indices]
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(selection) + 1),
            "index": selection.indices,
            "smiles": canonical[selection.indices],
        }
    )
    if "label" in pool_frame.columns:
        frame["label"] = rows["label"].to_numpy()
    frame["score"] = selection.scores if selection.scores is not None else np.nan
    return frame


def merge_selected_into_train(
    train_frame: pd.DataFrame,
    pool_frame: pd.DataFrame,
    selection: Selection,
    *,
    smiles_column: str = "smiles",
    label_column: str = "label",
    duplicates: str = "warn",
    source_column: str | None = "source",
) -> pd.DataFrame:
    """Training rows followed by the chosen pool molecules, in the training file's column names.

    Chosen molecules already in the training set (same canonical SMILES): duplicates="warn" keeps them
    and logs, "drop" leaves them out and logs, "error" raises. `source_column` marks rows train/external.
    """
    if duplicates not in ("warn", "drop", "error"):
        raise ValueError(f"duplicates must be 'warn', 'drop' or 'error', got {duplicates!r}.")
    missing = [c for c in (smiles_column, label_column) if c not in train_frame.columns]
    if missing:
        raise ValueError(f"Training frame lacks column(s) {missing}; it has {list(train_frame.columns)}.")
    if "label" not in pool_frame.columns:
        raise ValueError("The pool has no labels, so its molecules cannot be added to the training set.")
    chosen = selected_frame(pool_frame, selection)
    train_canonical = set(_canonical_column(train_frame, smiles_column))
    overlap = chosen["smiles"].isin(train_canonical).to_numpy()
    if overlap.any():
        message = (
            f"{int(overlap.sum())} chosen molecules are already in the training set "
            f"(pool indices {chosen['index'][overlap].tolist()[:10]})"
        )
        if duplicates == "error":
            raise ValueError(message + ".")
        if duplicates == "drop":
            logger.warning("%s; leaving them out.", message)
            chosen = chosen[~overlap]
        else:
            logger.warning("%s; keeping them.", message)
    added = pd.DataFrame(
        {smiles_column: chosen["smiles"].to_numpy(), label_column: chosen["label"].to_numpy()}
    )
    train = train_frame.copy()
    if source_column:
        train[source_column] = "train"
        added[source_column] = "external"
    return pd.concat([train, added], ignore_index=True)


def write_selection(
    output_dir: str | os.PathLike,
    pool_frame: pd.DataFrame,
    selection: Selection,
    manifest: dict[str, Any],
    merged_train: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write selected.csv, manifest.json and optionally merged_train.csv, each atomically."""
    output_dir = Path(output_dir)
    paths = {"selected": output_dir / "selected.csv", "manifest": output_dir / "manifest.json"}
    write_csv(paths["selected"], selected_frame(pool_frame, selection))
    write_json(paths["manifest"], manifest)
    if merged_train is not None:
        paths["merged_train"] = output_dir / "merged_train.csv"
        write_csv(paths["merged_train"], merged_train)
    return paths


# ----------------------------------------------------------------------------------------------------------
# MC dropout


def mc_dropout_predictions(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    n_passes: int,
    seed: int,
    forward_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> np.ndarray:
    """Predictions [n_passes, N] with dropout active and everything else as in evaluation.

    The model is put in train mode so that every dropout (also functional dropout guarded by
    `self.training`) is on, normalisation layers are kept in eval mode, and MoLFormer's random feature
    maps are pinned with `molft.model_utils.fixed_feature_maps` when that exists. The torch RNG is seeded
    inside a forked RNG state, so the caller's random stream is untouched. `batches` must yield the same
    molecules in the same order on every pass (no shuffling); an iterator is materialised once.
    """
    import torch

    stateful_norms = (
        torch.nn.BatchNorm1d,
        torch.nn.BatchNorm2d,
        torch.nn.BatchNorm3d,
        torch.nn.SyncBatchNorm,
        torch.nn.InstanceNorm1d,
        torch.nn.InstanceNorm2d,
        torch.nn.InstanceNorm3d,
    )
    if n_passes < 1:
        raise ValueError(f"n_passes must be >= 1, got {n_passes}.")
    forward = forward_fn or _default_forward
    if isinstance(batches, Iterator):
        batches = list(batches)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = {module: module.training for module in model.modules()}
    passes = []
    try:
        model.train()
        for module in model.modules():
            if isinstance(module, stateful_norms):
                module.eval()
        devices = (
            [torch.cuda.current_device() if device.index is None else device.index]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _fixed_feature_maps(model):
            torch.manual_seed(seed)
            for _ in range(n_passes):
                outputs = []
                for batch in batches:
                    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    prediction = forward(model, moved)
                    if prediction.ndim == 2 and prediction.shape[1] == 1:
                        prediction = prediction[:, 0]
                    if prediction.ndim != 1:
                        raise ValueError(
                            "forward_fn must return one prediction per molecule, "
                            f"got shape {tuple(prediction.shape)}."
                        )
                    outputs.append(prediction.detach().to("cpu", torch.float64).numpy())
                passes.append(np.concatenate(outputs) if outputs else np.empty(0))
    finally:
        for module, was_training in flags.items():
            module.train(was_training)
    if len({len(p) for p in passes}) != 1:
        raise ValueError(
            "batches yielded a different number of molecules on different passes; pass a re-iterable."
        )
    return np.stack(passes)


def _default_forward(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _fixed_feature_maps(model: torch.nn.Module) -> Any:
    try:
        from molft.model_utils import fixed_feature_maps
    except ImportError:
        logger.debug("molft.model_utils.fixed_feature_maps unavailable; running MC dropout without it.")
        return nullcontext()
    return fixed_feature_maps(model)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _get_strategy(name: str) -> _Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"Unknown selection strategy {name!r}; choose one of {available_strategies()}.")
    return STRATEGIES[name]


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


def _vector(values: Any, name: str, length: int | None) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or (length is not None and len(array) != length):
        raise ValueError(f"{name} must be 1-D with {length} entries, got shape {array.shape}.")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{name} are missing or not finite at positions {bad[:10].tolist()}.")
    return array


def _matrix(values: Any, name: str, length: int | None) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or (length is not None and len(array) != length):
        raise ValueError(f"{name} must be 2-D [{length}, D], got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain non-finite values.")
    return array


def _common_length(arrays: dict[str, Any]) -> int | None:
    lengths = {name: len(value) for name, value in arrays.items() if value is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Inputs that describe the same molecules differ in length: {lengths}.")
    return next(iter(lengths.values()), None)


def _canonical_column(frame: pd.DataFrame, smiles_column: str = "smiles") -> np.ndarray:
    # molft.data frames carry canonical_smiles already; other frames are canonicalised here
    if "canonical_smiles" in frame.columns:
        return frame["canonical_smiles"].astype(str).to_numpy()
    if smiles_column not in frame.columns:
        raise ValueError(f"Frame needs a {smiles_column!r} column; it has {list(frame.columns)}.")
    return np.array([canonical_smiles(s) or str(s) for s in frame[smiles_column]], dtype=object)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(value) for value in obj]
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj
