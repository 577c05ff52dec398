"""Multi-seed summaries and paired significance tests.

Fine-tuning results vary with the seed as much as with the method, so every comparison pairs runs that
share a seed (and data split) and tests the per-pair differences, rather than comparing two means.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

PairedTest = Literal["wilcoxon", "ttest"]
CONFIDENCE = 0.95
# "wilcox" drops zero differences before ranking (the textbook signed-rank test); ties in the metric
# are rare for float scores, and a pair with no difference carries no sign information.
WILCOXON_ZERO_METHOD = "wilcox"


def summarize(values: Any) -> dict[str, float]:
    """Mean with a 95% Student-t interval; with one seed the interval is undefined (nan)."""
    array = finite_vector(values, "values")
    n = array.size
    mean = float(array.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": np.nan, "sem": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    std = float(array.std(ddof=1))
    sem = std / np.sqrt(n)
    ci_low, ci_high = _t_interval(mean, sem, n)
    return {"n": n, "mean": mean, "std": std, "sem": sem, "ci_low": ci_low, "ci_high": ci_high}


def paired_comparison(a: Any, b: Any, test: PairedTest = "wilcoxon") -> dict[str, Any]:
    """Test a - b over aligned pairs (same split and seed); negative mean_diff means a scored lower.

    The Wilcoxon signed-rank test uses zero_method="wilcox" (zero differences are dropped); when every
    difference is zero there is no evidence of a difference and p is 1.
    """
    if test not in ("wilcoxon", "ttest"):
        raise ValueError(f"Unknown paired test {test!r}; use 'wilcoxon' or 'ttest'.")
    a = finite_vector(a, "a")
    b = finite_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"Paired samples must align: a has {a.size} values, b has {b.size}.")
    diff = a - b
    n = diff.size
    result: dict[str, Any] = {
        "n": n,
        "mean_diff": float(diff.mean()),
        "std_diff": np.nan,
        "ci_low": np.nan,
        "ci_high": np.nan,
        "p_value": np.nan,
        "test": test,
        "note": "",
    }
    if n < 2:
        result["note"] = f"{n} pair(s): no interval or test possible"
        return result

    std = float(diff.std(ddof=1))
    result["std_diff"] = std
    result["ci_low"], result["ci_high"] = _t_interval(result["mean_diff"], std / np.sqrt(n), n)
    if not np.any(diff):
        result["p_value"] = 1.0
        result["note"] = "all differences are zero"
        return result

    if test == "ttest":
        result["p_value"] = float(stats.ttest_rel(a, b).pvalue)
    else:
        result["p_value"] = float(stats.wilcoxon(diff, zero_method=WILCOXON_ZERO_METHOD).pvalue)
        n_nonzero = int(np.count_nonzero(diff))
        smallest_p = 2.0 / 2**n_nonzero
        if smallest_p > 0.05:
            result["note"] = f"smallest possible p with {n_nonzero} non-zero pair(s) is {smallest_p:.3g}"
    return result


def holm_correction(p_values: Any) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control for many comparisons); nan stays nan."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}.")
    tested = np.flatnonzero(~np.isnan(p))
    if np.any((p[tested] < 0) | (p[tested] > 1)):
        raise ValueError("p_values must lie in [0, 1].")
    adjusted = np.full_like(p, np.nan)
    m = tested.size
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    # step-down: an adjusted p is never smaller than the one before it
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def _t_interval(mean: float, sem: float, n: int) -> tuple[float, float]:
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * sem
    return mean - half_width, mean + half_width


def finite_vector(values: Any, name: str) -> np.ndarray:
    """`values` as a 1-D float64 array; refuses another shape, no values or NaN/inf, naming `name`."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty.")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} holds {bad.size} non-finite value(s), first at index {bad[0]}.")
    return array


def require_columns(table: Any, columns: Sequence[str], what: str = "Table") -> None:
    """Refuse a table that lacks any of `columns`, naming the missing ones and those it has."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(table.columns)}.")
