"""The statistics of an LDS: rank correlations with a bootstrap interval, the seeds' agreement with each other
and the reliability of their mean, and the shuffled-scores null. Kept apart from the retraining plan in lds.py."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from molft.influence.validation import safe_spearman, spearman_interval


def correlation_record(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict[str, float | None]:
    """{"lds", "ci_low", "ci_high"}: Spearman of predictions x with measured changes y, and its interval."""
    low, high = spearman_interval(x, y, n_boot, seed)
    return {"lds": json_number(safe_spearman(x, y)), "ci_low": json_number(low), "ci_high": json_number(high)}


def seed_agreement(changes: dict[int, np.ndarray]) -> dict[str, Any] | None:
    """How far the seeds agree on the subsets' changes: every pair's Spearman, their mean r, and the
    Spearman-Brown reliability k r / (1 + (k - 1) r) of the mean over k seeds (None with one seed, or r <= 0)."""
    seeds = list(changes)
    if len(seeds) < 2:
        return None
    pairs = {
        f"{a}-{b}": json_number(safe_spearman(changes[a], changes[b]))
        for i, a in enumerate(seeds)
        for b in seeds[i + 1 :]
    }
    values, k = [value for value in pairs.values() if value is not None], len(seeds)
    if not values:
        return {"pairs": pairs, "mean_pair": None, "seed_mean_reliability": None, "seeds": k}
    r = float(np.mean(values))
    # no agreement to build on when r <= 0: the formula would give a meaningless (negative) reliability
    reliability = k * r / (1 + (k - 1) * r) if r > 0 else None
    return {"pairs": pairs, "mean_pair": r, "seed_mean_reliability": reliability, "seeds": k}


def shuffled_control(
    scores: np.ndarray, membership: np.ndarray, measured: np.ndarray, repeats: int, seed: int
) -> dict[str, Any]:
    """LDS of scores permuted across molecules: the distribution an uninformative estimator gets."""
    rng = np.random.default_rng([seed, 11])
    values = np.array([safe_spearman(membership @ rng.permutation(scores), measured) for _ in range(repeats)])
    return {"mean": json_number(np.nanmean(values)), "sd": json_number(np.nanstd(values)), "repeats": repeats,
            "values": [json_number(v) for v in values]}  # fmt: skip


def json_number(value: float) -> float | None:
    """A float for JSON: NaN (no ranking) becomes null."""
    return float(value) if value is not None and math.isfinite(value) else None
