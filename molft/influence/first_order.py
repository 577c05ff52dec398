"""First-order baselines that ignore curvature (H = I): gradient dot product and TracIn.

Both keep the package's sign convention, score = -g_query . g_candidate (summed over checkpoints for
TracIn), so a negative score still means "a gradient step on the candidate lowers the query loss".
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from molft.influence.base import InfluenceEstimator, candidate_scores
from molft.influence.problem import Batches, ScoresAndInfo

Checkpoint = tuple[Mapping[str, torch.Tensor] | None, float]


class GradientDotEstimator(InfluenceEstimator):
    """Identity "inverse-HVP": the score is minus the query-candidate gradient dot product.

    `damping` is accepted for a uniform interface but has no effect.
    """

    name = "gradient_dot"

    def __init__(self, damping: float = 0.0) -> None:
        super().__init__(damping)

    def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return vectors.clone(), {}


class TracInEstimator(InfluenceEstimator):
    """TracIn-CP (Pruthi et al. 2020): score = -sum_k lr_k g_query(theta_k) . g_candidate(theta_k).

    checkpoints: (state, learning_rate) pairs; a state maps scope parameter names to tensors (a model
        state_dict works; extra entries are ignored) and None means the problem's current parameters.
        Default: the current parameters with learning rate 1, which equals `gradient_dot`.
    """

    name = "tracin"

    def __init__(self, checkpoints: Sequence[Checkpoint] | None = None, damping: float = 0.0) -> None:
        super().__init__(damping)
        self.checkpoints: list[Checkpoint] = list(checkpoints) if checkpoints else [(None, 1.0)]

    def score(
        self, query_batches: Batches, candidate_batches: Batches, per_query: bool = False
    ) -> ScoresAndInfo:
        problem = self.require_fit()
        start = time.perf_counter()
        total: torch.Tensor | None = None
        for index, (state, learning_rate) in enumerate(self.checkpoints):
            try:
                theta = problem.theta if state is None else problem.flatten(state)
            except (KeyError, ValueError) as error:
                raise ValueError(f"TracIn checkpoint {index}: {error}") from None
            if per_query:
                query_vectors = problem.stack_grads(query_batches, theta)
            else:
                query_vectors = problem.mean_grad(query_batches, theta).unsqueeze(0)
            scores = float(learning_rate) * candidate_scores(problem, candidate_batches, query_vectors, theta)
            total = scores if total is None else total + scores
        diagnostics = {
            "num_checkpoints": len(self.checkpoints),
            "learning_rates": [float(lr) for _, lr in self.checkpoints],
            "timings": {"checkpoints_s": time.perf_counter() - start},
        }
        return (total if per_query else total[0]), diagnostics

    def options(self) -> dict[str, Any]:
        return {"num_checkpoints": len(self.checkpoints)}
