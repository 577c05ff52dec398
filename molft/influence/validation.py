"""Ground truth for influence scores: actually retrain a ridge head with each candidate added.

The reference model is a linear head on frozen features trained on the same objective the influence
problem uses: mean over n samples of 0.5 * (x . w - y)^2 plus (l2 / 2) ||w||^2 (the intercept, when fitted,
is penalised like every other scoped parameter, matching `damping = l2`). "Adding" a candidate keeps each
sample's weight 1/n and l2 fixed, so the measured effect is, to first order, exactly score / n; the
retrained weights come from one Sherman-Morrison update per candidate (exact, O(d^2) each).

`validate_estimators` is the harness built on it: every estimator on a ridge head over a model's frozen
embeddings, ranked against the exact influence and against that retraining truth. The retraining check of
the network itself (--validate lds, molft.influence.lds) takes its rank statistics and its estimators'
scores on the run's own problem (`score_estimators`) from here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.stats
import torch
from torch import nn
from tqdm.auto import tqdm

from molft.files import INFLUENCE_SCORES_FILE, INFLUENCE_SUMMARY_FILE, LDS_SCORES_FILE, LDS_SUMMARY_FILE
from molft.influence.api import compute_influence
from molft.influence.features import feature_batch_size, feature_batches, linear_forward
from molft.influence.problem import InfluenceProblem
from molft.influence.runner import lissa_steps_needed
from molft.io import read_json
from molft.markdown import markdown_table
from molft.model_utils import release_memory

logger = logging.getLogger(__name__)

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


def spearman_interval(x: ArrayLike, y: ArrayLike, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of Spearman(x, y), pairs resampled with replacement (seeded)."""
    x, y = _to_numpy(x).reshape(-1), _to_numpy(y).reshape(-1)
    rows = np.random.default_rng([seed, 7]).integers(0, len(x), size=(n_boot, len(x)))
    rx, ry = scipy.stats.rankdata(x[rows], axis=1), scipy.stats.rankdata(y[rows], axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    norms = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    ranked = norms > 0  # a resample of tied values has no rank correlation
    if not ranked.any():
        return float("nan"), float("nan")
    low, high = np.percentile((rx * ry).sum(axis=1)[ranked] / norms[ranked], [2.5, 97.5])
    return float(low), float(high)


def spearman_vs(reference_scores: ArrayLike, scores: ArrayLike) -> float:
    """Spearman rank correlation of `scores` against a reference (e.g. the retrain effects)."""
    reference = _as_vector(reference_scores, "reference_scores", _to_numpy(reference_scores).size)
    estimate = _as_vector(scores, "scores", reference.shape[0])
    if reference.shape[0] < 2:
        raise ValueError("need at least 2 scores for a rank correlation")
    if np.ptp(reference) == 0 or np.ptp(estimate) == 0:
        raise ValueError("a constant score vector has no rank correlation (all scores equal)")
    return float(scipy.stats.spearmanr(reference, estimate).statistic)


VALIDATION_MODES = ("none", "ridge", "lds")


def validation_mode(value: str | bool | None) -> str:
    """The --validate mode: none | ridge (this module's check) | lds (molft.influence.lds).

    The flag used to be a boolean: true (or the bare flag) still runs the ridge check, with a note.
    """
    text = str(value).strip().lower() if value is not None else "none"
    if text in VALIDATION_MODES:
        return text
    if text in ("false", "no", "0", "f", "n", ""):
        return "none"
    if text in ("true", "yes", "1", "t", "y"):
        logger.info("--validate %s is the old boolean form: running --validate ridge.", value)
        return "ridge"
    raise ValueError(f"--validate must be one of {VALIDATION_MODES} (or the old true/false), got {value!r}.")


# ----------------------------------------------------------------------------------------------------------
# The harness: every estimator on a ridge head, where the truth is computable
# ----------------------------------------------------------------------------------------------------------


def validate_estimators(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    estimator_options: Sequence[tuple[str, dict[str, Any]]],
    *,
    target_mean: float,
    target_std: float,
    damping: float,
    batch_size: int,
    exact_max_params: int,
    quiet: bool,
) -> pd.DataFrame:
    """Each estimator on a linear head over the frozen pooled embeddings, against exact and retraining truth.

    Why a linear surrogate rather than the model's own (nonlinear) head: only for a ridge head are both
    references exact and cheap: the exact influence (explicit Hessian) and the measured change of the query
    loss after actually retraining with each candidate added (closed form, Sherman-Morrison). Features are
    standardised with the training statistics and labels normalised like the model's targets, so `damping`
    (= the ridge l2) means what it means for the real head. `features`/`labels` hold the roles train, query
    and candidates; `estimator_options`: (estimator, its options) for each one compared, in order.
    """
    mean, std = float(target_mean), float(target_std)
    center = features["train"].mean(axis=0)
    spread = features["train"].std(axis=0)
    spread[spread == 0] = 1.0
    x = {role: (values - center) / spread for role, values in features.items()}
    y = {role: (values - mean) / std for role, values in labels.items()}
    l2 = damping

    weights = ridge_weights(x["train"], y["train"], l2)
    head = nn.Linear(x["train"].shape[1], 1).double()
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weights[:-1]).reshape(1, -1))
        head.bias.copy_(torch.as_tensor(weights[-1:]))
    problem = InfluenceProblem(head, dict(head.named_parameters()), forward_fn=linear_forward)
    batches = {
        role: feature_batches(
            x[role], y[role], feature_batch_size(batch_size, x["train"].shape[1] + 1), torch.float64
        )
        for role in x
    }
    n_train = len(y["train"])

    start = time.perf_counter()
    retrain = leave_one_in_retrain_effect(
        x["train"], y["train"], x["query"], y["query"], x["candidates"], y["candidates"], l2
    )
    retrain_s = time.perf_counter() - start
    exact, _ = compute_influence(
        problem,
        batches["train"],
        batches["query"],
        batches["candidates"],
        "exact",
        damping=l2,
        max_params=max(exact_max_params, problem.num_params),
    )
    rows = [
        {
            "estimator": "retrain (truth)",
            "spearman_vs_exact": spearman_vs(exact, retrain),
            "spearman_vs_retrain": 1.0,
            "seconds": retrain_s,
            "note": "measured query-loss change after refitting with each molecule added",
        }
    ]
    for name, options in tqdm(estimator_options, desc="Validating estimators", disable=quiet):
        options = dict(options)
        if name == "exact":
            options["max_params"] = max(options["max_params"], problem.num_params)
        start = time.perf_counter()
        try:
            scores, diagnostics = compute_influence(
                problem, batches["train"], batches["query"], batches["candidates"], name, **options
            )
        except (FloatingPointError, ValueError, RuntimeError) as err:
            logger.warning("--validate: %s failed: %s", name, err)
            rows.append(failed_row(name, time.perf_counter() - start, err))
            continue
        finally:
            release_memory()  # each estimator starts from an empty cache, not the previous one's peak
        rows.append(
            {
                "estimator": name,
                "spearman_vs_exact": safe_spearman(exact, scores),
                "spearman_vs_retrain": safe_spearman(retrain, scores),
                "seconds": time.perf_counter() - start,
                "note": solver_note(name, diagnostics, scores, retrain, n_train, l2, options.get("depth")),
            }
        )
    return pd.DataFrame(rows)


def safe_spearman(reference: np.ndarray, scores: np.ndarray) -> float:
    """spearman_vs, NaN for constant scores (which have no ranks)."""
    try:
        return spearman_vs(reference, scores)
    except ValueError:
        return float("nan")


def failed_row(name: str, seconds: float, err: Exception) -> dict[str, Any]:
    """The table row of an estimator that raised: no correlations, the error as its note."""
    return {
        "estimator": name,
        "spearman_vs_exact": float("nan"),
        "spearman_vs_retrain": float("nan"),
        "seconds": seconds,
        "note": f"failed: {type(err).__name__}: {str(err)[:160]}",
    }


def solver_note(
    name: str,
    diagnostics: dict[str, Any],
    scores: np.ndarray,
    retrain: np.ndarray,
    n_train: int,
    damping: float,
    depth: int | None,
) -> str:
    """Convergence in a few words, plus the slope of the measured effect on score / n (1 = calibrated).

    `depth`: LiSSA's recursion depth (read for lissa only).
    """
    solver = diagnostics.get("solver", {})
    parts = []
    if name == "cg":
        parts.append(
            f"{solver.get('iterations')} iterations, converged={all(solver.get('converged', [True]))}"
        )
    elif name == "lissa":
        needed = 3 * lissa_steps_needed(solver, damping)
        parts.append(
            f"scale {solver.get('scale', float('nan')):.3g}; depth {depth}"
            f"{' <' if depth < needed else ' >='} ~{needed:.0f} steps flat directions may need (3 x scale/damping)"
        )
    elif name in ("gradient_dot", "tracin"):
        parts.append("no curvature (H = I)")
    predicted = scores / n_train
    if name not in ("gradient_dot", "tracin") and np.any(predicted):
        slope = float(predicted @ retrain / (predicted @ predicted))
        parts.append(f"retrain = {slope:.3g} x score/n")
    return "; ".join(parts)


def json_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN (a failed estimator) as null so the summary stays strict JSON."""
    return [
        {
            key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in row.items()
        }
        for row in table.to_dict(orient="records")
    ]


def validation_markdown(table: pd.DataFrame, damping: float, query_split: str) -> str:
    """validation.md: what the surrogate and the two references are, then the table."""
    header = (
        "# Influence estimators against the truth\n\n"
        "Surrogate: a ridge head (l2 = damping = "
        f"{damping:g}) on the model's frozen, standardised pooled embeddings; query set: the "
        f"{query_split} split. spearman_vs_exact: rank agreement with the exact influence "
        "(explicit Hessian); spearman_vs_retrain: with the measured query-loss change after refitting the head "
        "with each molecule added.\n\n"
    )
    return header + format_table(table) + "\n"


def format_table(table: pd.DataFrame) -> str:
    """A validation table as Markdown, correlations to 4 decimals."""
    shown = table.copy()
    for column in ("spearman_vs_exact", "spearman_vs_retrain"):
        shown[column] = shown[column].map(lambda value: "nan" if not np.isfinite(value) else f"{value:.4f}")
    shown["seconds"] = shown["seconds"].map(lambda value: f"{value:.2f}")
    return markdown_table(shown)


# ----------------------------------------------------------------------------------------------------------
# The estimators a retraining check (molft.influence.lds) compares, on the run's own problem
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EstimatorScores:
    """One estimator's scores over the LDS pool (None when it failed), and what they cost."""

    scores: np.ndarray | None
    seconds: float | None = None
    error: str | None = None


def score_estimators(
    setup: Any,
    names: Sequence[str],
    options_for: Callable[[str], dict[str, Any]],
    primary: str,
    primary_scores: EstimatorScores,
    *,
    scope: str,
    pool: pd.DataFrame,
    damping: float,
    curvature: str,
    quiet: bool,
) -> dict[str, EstimatorScores]:
    """Every estimator of `names` on the run's own problem (ProblemSetup), each under the forward it needs,
    named estimator@scope, over the LDS pool; `primary` (already computed) is reused. One that fails is
    logged and kept with its error."""
    from molft.influence.molformer import problem_for_estimator
    from molft.influence.retrain import addable_mask
    from molft.influence.runner import run_estimator

    keep, results = addable_mask(pool), {}
    for name in dict.fromkeys([primary, *names]):
        if name == primary:
            results[f"{name}@{scope}"] = EstimatorScores(primary_scores.scores[keep], primary_scores.seconds)
            continue
        start = time.perf_counter()
        try:
            problem = problem_for_estimator(setup.problem, name, curvature)
            scores, _ = run_estimator(
                problem, setup.batches, name, options_for(name), per_query=False, damping=damping, quiet=quiet
            )
        except Exception as err:  # one estimator's failure must not end the retraining of the rest
            logger.warning("--validate lds: %s on the %s scope failed and is left out: %r", name, scope, err)
            error = f"{type(err).__name__}: {str(err)[:200]}"
            results[f"{name}@{scope}"] = EstimatorScores(None, time.perf_counter() - start, error)
            continue
        results[f"{name}@{scope}"] = EstimatorScores(scores[keep], time.perf_counter() - start)
    return results


def extra_scores(folders: str | None, pool: pd.DataFrame) -> dict[str, EstimatorScores]:
    """Scores of other run_influence.py outputs (same run and pool), named estimator@scope.

    A folder of an earlier --validate lds run gives every estimator it scored (its lds_scores.csv), so the
    same scores can be judged against another retraining mode without computing them again; any other
    folder gives its one estimator (influence_scores.csv).
    """
    from molft.cli import parse_list
    from molft.data import read_table
    from molft.selection import check_scores_match_pool, pool_ids

    results: dict[str, EstimatorScores] = {}
    for folder in parse_list(folders or ""):
        if (Path(folder) / LDS_SCORES_FILE).is_file():
            results.update(lds_scores(Path(folder), pool_ids(pool)))
            continue
        try:
            summary = read_json(Path(folder) / INFLUENCE_SUMMARY_FILE)
            scores = check_scores_match_pool(read_table(Path(folder) / INFLUENCE_SCORES_FILE), pool)
        except (OSError, ValueError) as err:
            raise ValueError(f"--lds_extra_scores {folder}: {err}") from err
        if np.isnan(scores).any():
            raise ValueError(
                f"--lds_extra_scores {folder} has no score for pool ids {pool_ids(pool)[np.isnan(scores)][:10]}."
            )
        results[f"{summary['estimator']}@{summary['scope']['name']}"] = EstimatorScores(
            scores, summary.get("timings", {}).get("total_s")
        )
    return results


def lds_scores(folder: Path, ids: np.ndarray) -> dict[str, EstimatorScores]:
    """Every estimator's scores saved by an earlier --validate lds run, in the order of the pool `ids`."""
    path = folder / LDS_SCORES_FILE
    table = pd.read_csv(path)
    if "id" not in table.columns:
        raise ValueError(f"--lds_extra_scores {folder}: {path} has no id column.")
    table = table.drop_duplicates("id").set_index("id")
    missing = np.setdiff1d(ids, table.index.to_numpy())
    if len(missing):
        raise ValueError(
            f"--lds_extra_scores {folder}: {path} has no score for pool ids {missing[:10].tolist()} "
            f"({len(missing)} of {len(ids)}); was it made on another pool?"
        )
    seconds = {}
    if (folder / LDS_SUMMARY_FILE).is_file():
        estimators = read_json(folder / LDS_SUMMARY_FILE).get("estimators", {})
        seconds = {name: entry.get("seconds") for name, entry in estimators.items()}
    results = {}
    for name in table.columns:
        values = table.loc[ids, name].to_numpy(dtype=np.float64)
        if np.isnan(values).any():
            raise ValueError(f"--lds_extra_scores {folder}: {name} in {path} has missing scores.")
        results[name] = EstimatorScores(values, seconds.get(name))
    return results
