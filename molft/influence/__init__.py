"""Influence functions: which external molecules would help the fine-tuned model on held-out queries.

For a candidate molecule z and query set Q the score is (Koh & Liang 2017, I_up,loss)

    score(z) = -grad L(Q)^T (H + damping I)^-1 grad l(z),

with H the Hessian of the MEAN training loss w.r.t. the parameters in scope and l the per-sample loss
(default 0.5 * squared error). Sign convention: the score is the predicted change of the query loss when
z is up-weighted (added to the training data), so a NEGATIVE score is HELPFUL (query loss predicted to
decrease) and a positive score harmful. Adding z as one more sample of weight 1/n changes the query loss
by about score / n. `HELPFUL_SIGN` states this in code: `score * HELPFUL_SIGN > 0` means helpful.

Typical use:

    params = select_parameters(model, "head")
    problem = InfluenceProblem(model, params)
    scores, diagnostics = compute_influence(problem, train_batches, query_batches, candidate_batches, "cg")
"""

from __future__ import annotations

from molft.influence.api import ESTIMATORS, compute_influence, make_estimator
from molft.influence.base import InfluenceEstimator
from molft.influence.datainf import DataInfEstimator
from molft.influence.ekfac import EKFACEstimator
from molft.influence.first_order import GradientDotEstimator, TracInEstimator
from molft.influence.problem import (
    LABELS_KEY,
    InfluenceProblem,
    NonFiniteGradientError,
    additive_mask_forward,
    default_forward,
    squared_error_loss,
)
from molft.influence.scope import HEAD_KEYWORDS, SCOPES, is_head_parameter, select_parameters
from molft.influence.second_order import (
    ConjugateGradientEstimator,
    ExactEstimator,
    LiSSADivergenceError,
    LiSSAEstimator,
)
from molft.influence.validation import leave_one_in_retrain_effect, ridge_weights, spearman_vs

HELPFUL_SIGN = -1
"""Scores with this sign are helpful: adding the candidate is predicted to lower the query loss."""

__all__ = [
    "ESTIMATORS",
    "HEAD_KEYWORDS",
    "HELPFUL_SIGN",
    "LABELS_KEY",
    "SCOPES",
    "ConjugateGradientEstimator",
    "DataInfEstimator",
    "EKFACEstimator",
    "ExactEstimator",
    "GradientDotEstimator",
    "InfluenceEstimator",
    "InfluenceProblem",
    "LiSSADivergenceError",
    "LiSSAEstimator",
    "NonFiniteGradientError",
    "TracInEstimator",
    "additive_mask_forward",
    "compute_influence",
    "default_forward",
    "is_head_parameter",
    "leave_one_in_retrain_effect",
    "make_estimator",
    "ridge_weights",
    "select_parameters",
    "spearman_vs",
    "squared_error_loss",
]
