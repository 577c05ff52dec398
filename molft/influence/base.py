"""The estimator interface: fit to the training data, solve (H + damping I) x = v, score candidates.

Scores are `-g_candidate . x` with x the inverse-HVP of the query gradient. The inverse-HVP is solved once
per query vector (once in total for the mean query) and reused for every candidate, so the candidate pass
costs one vectorised backward per batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from molft.influence.problem import (
    Batch,
    Batches,
    InfluenceProblem,
    NonFiniteGradientError,
    ScoresAndInfo,
    reusable_batches,
)

logger = logging.getLogger(__name__)


class InfluenceEstimator:
    """Base class: subclasses implement `_fit` and `solve_many`, or override `score` entirely.

    damping: lambda in (H + lambda I); acts like an L2 penalty of strength lambda on the scope.
    """

    name: ClassVar[str] = "base"

    def __init__(self, damping: float = 1e-3) -> None:
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        self.damping = float(damping)
        self.problem: InfluenceProblem | None = None
        self.train_batches: Iterable[Batch] = ()
        self.fit_info: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- interface
    def fit(self, problem: InfluenceProblem, train_batches: Iterable[Batch]) -> InfluenceEstimator:
        """Prepare whatever the solver needs from the training data (Hessian, factors, ...)."""
        self.problem = problem
        self.train_batches = reusable_batches(train_batches)
        start = time.perf_counter()
        self.fit_info = self._fit() or {}
        self.fit_info["fit_s"] = time.perf_counter() - start
        return self

    def _fit(self) -> dict[str, Any] | None:
        return None

    def solve(self, vector: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """x ~= (H + damping I)^-1 v for one [P] vector."""
        solutions, info = self.solve_many(vector.unsqueeze(0))
        return solutions[0], info

    def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Inverse-HVPs of the rows of a [Q, P] matrix."""
        raise NotImplementedError(f"estimator {self.name!r} does not provide inverse-HVPs; use score()")

    def score(
        self, query_batches: Batches, candidate_batches: Batches, per_query: bool = False
    ) -> ScoresAndInfo:
        """Influence of each candidate on the query loss: [N], or [Q, N] with `per_query`."""
        problem = self.require_fit()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if per_query:
            query_vectors = problem.stack_grads(query_batches)
        else:
            query_vectors = problem.mean_grad(query_batches).unsqueeze(0)
        timings["query_grads_s"] = time.perf_counter() - start

        start = time.perf_counter()
        solutions, solve_info = self.solve_many(query_vectors)
        timings["solve_s"] = time.perf_counter() - start
        check_solutions(query_vectors, solutions, self.name)

        start = time.perf_counter()
        scores = candidate_scores(problem, candidate_batches, solutions)
        timings["candidate_grads_s"] = time.perf_counter() - start

        diagnostics = {
            "query_grad_norm": row_norms(query_vectors),
            "ihvp_norm": row_norms(solutions),
            "solver": solve_info,
            "timings": timings,
        }
        return (scores if per_query else scores[0]), diagnostics

    # ------------------------------------------------------------------------------------- helpers
    def require_fit(self) -> InfluenceProblem:
        if self.problem is None:
            raise RuntimeError(f"estimator {self.name!r} must be fit() before use")
        return self.problem

    def options(self) -> dict[str, Any]:
        """JSON-friendly settings for the run's diagnostics."""
        return {"damping": self.damping}


def candidate_scores(
    problem: InfluenceProblem,
    candidate_batches: Iterable[Batch],
    solutions: torch.Tensor,
    theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """-solutions @ g_candidate for every candidate, streamed batch by batch: [Q, N]."""
    chunks = []
    for batch_index, batch in enumerate(candidate_batches):
        try:
            chunks.append(-problem.grad_dot(batch, solutions, theta))
        except NonFiniteGradientError as error:
            raise NonFiniteGradientError(f"candidate batch {batch_index}: {error}") from None
    if not chunks:
        raise ValueError("no candidate batches given")
    return torch.cat(chunks, dim=1)


def check_solutions(vectors: torch.Tensor, solutions: torch.Tensor, name: str) -> None:
    """Refuse NaN or silently-zero inverse-HVPs instead of returning meaningless scores."""
    if not torch.isfinite(solutions).all():
        raise FloatingPointError(
            f"{name}: the inverse-HVP contains NaN/inf; increase damping or check the data"
        )
    vector_norms, solution_norms = vectors.norm(dim=1), solutions.norm(dim=1)
    collapsed = (vector_norms > 0) & (solution_norms == 0)
    if collapsed.any():
        rows = collapsed.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"{name}: the inverse-HVP is exactly zero for non-zero query vectors {rows[:10]}"
        )
    if (vector_norms == 0).any():
        logger.warning(
            "%d query gradient(s) are exactly zero: their scores are all 0", int((vector_norms == 0).sum())
        )


def row_norms(matrix: torch.Tensor) -> list[float]:
    """Euclidean norm of each row, as plain floats for JSON diagnostics."""
    return [float(value) for value in matrix.norm(dim=1)]
