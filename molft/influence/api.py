"""Estimator registry and the one-call entry point used by run_influence.py."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from molft.influence.base import InfluenceEstimator
from molft.influence.datainf import DataInfEstimator
from molft.influence.ekfac import EKFACEstimator
from molft.influence.first_order import GradientDotEstimator, TracInEstimator
from molft.influence.problem import Batch, InfluenceProblem, describe_batches, reusable_batches
from molft.influence.second_order import ConjugateGradientEstimator, ExactEstimator, LiSSAEstimator

logger = logging.getLogger(__name__)

ESTIMATORS: dict[str, type[InfluenceEstimator]] = {
    cls.name: cls
    for cls in (
        ExactEstimator,
        ConjugateGradientEstimator,
        LiSSAEstimator,
        DataInfEstimator,
        EKFACEstimator,
        GradientDotEstimator,
        TracInEstimator,
    )
}
HESSIAN_ESTIMATORS = ("exact", "cg", "lissa")
"""The estimators that invert a curvature (Hessian or Gauss-Newton); the others need no choice of one."""


def make_estimator(name: str, **options: Any) -> InfluenceEstimator:
    """Instantiate a registered estimator; unknown names or options raise ValueError."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown influence estimator {name!r}; expected one of {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"estimator {name!r} does not accept options {unknown}; accepted: {sorted(accepted)}"
        )
    return cls(**options)


def compute_influence(
    problem: InfluenceProblem,
    train_batches: Iterable[Batch],
    query_batches: Iterable[Batch],
    candidate_batches: Iterable[Batch],
    estimator: str | InfluenceEstimator = "cg",
    per_query: bool = False,
    **options: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Influence scores of the candidates on the query loss, plus JSON-friendly diagnostics.

    Returns scores of shape [N] for the mean query loss, or [Q, N] with `per_query` (row q = query sample
    q). Sign: a score is the predicted change of the query loss when the candidate is added to the
    training data, so NEGATIVE = helpful. `options` go to the estimator's constructor when `estimator`
    is a name.
    """
    if isinstance(estimator, str):
        estimator = make_estimator(estimator, **options)
    elif options:
        raise ValueError(
            f"options {sorted(options)} given with an estimator instance; set them on the instance"
        )
    train_batches = reusable_batches(train_batches)
    query_batches = reusable_batches(query_batches)
    candidate_batches = reusable_batches(candidate_batches)

    start = time.perf_counter()
    estimator.fit(problem, train_batches)
    scores, diagnostics = estimator.score(query_batches, candidate_batches, per_query=per_query)
    total_s = time.perf_counter() - start

    scores_np = scores.detach().cpu().double().numpy()
    if not np.isfinite(scores_np).all():
        raise FloatingPointError(f"{estimator.name}: non-finite influence scores")
    timings = {
        "fit_s": estimator.fit_info.get("fit_s", 0.0),
        **diagnostics.pop("timings", {}),
        "total_s": total_s,
    }
    summary = {
        "estimator": estimator.name,
        "options": estimator.options(),
        "num_params": problem.num_params,
        "scope": list(problem.names),
        "train": describe_batches(train_batches),
        "query": describe_batches(query_batches),
        "candidates": describe_batches(candidate_batches),
        "per_query": per_query,
        "fit": {key: value for key, value in estimator.fit_info.items() if key != "fit_s"},
        "timings": timings,
        **diagnostics,
    }
    logger.info("%s influence for %d candidates in %.2fs", estimator.name, scores_np.shape[-1], total_s)
    return scores_np, summary
