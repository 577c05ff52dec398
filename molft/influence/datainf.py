"""DataInf (Kwon et al. 2023): closed-form inverse-HVPs for adapter-sized scopes.

Approximations, in order:
1. H is replaced by the empirical Fisher F = mean_i g_i g_i^T of the training per-sample gradients.
2. F is taken block-diagonal, one block per parameter tensor ("layer").
3. Inverse and average are swapped: (mean_i g_i g_i^T + l I)^-1 ~= mean_i (g_i g_i^T + l I)^-1, and each
   rank-one term is inverted exactly with Sherman-Morrison:
       (g g^T + l I)^-1 v = (v - g (g . v) / (l + ||g||^2)) / l.
Step 3 is exact when the training gradients of a block are mutually orthogonal and becomes tight as the
damping grows relative to ||g||^2; its error grows with the block dimension, hence "LoRA-sized".
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from molft.influence.base import InfluenceEstimator

logger = logging.getLogger(__name__)

LAYER_DAMPING_MODES = ("fixed", "heuristic")
HEURISTIC_DAMPING_FRACTION = 0.1


class DataInfEstimator(InfluenceEstimator):
    """DataInf inverse-HVPs, block by block.

    layer_damping: "fixed" uses `damping` for every block; "heuristic" uses the paper's per-block value
        0.1 * mean_i ||g_i,block||^2 / block_size.
    cache_limit: training per-sample gradients are kept in memory when N * P is at most this many
        entries, otherwise they are recomputed for every solve.
    """

    name = "datainf"

    def __init__(
        self, damping: float = 1e-3, layer_damping: str = "fixed", cache_limit: int = 20_000_000
    ) -> None:
        super().__init__(damping)
        if layer_damping not in LAYER_DAMPING_MODES:
            raise ValueError(
                f"unknown layer_damping {layer_damping!r}; expected one of {LAYER_DAMPING_MODES}"
            )
        self.layer_damping = layer_damping
        self.cache_limit = cache_limit
        self._cached: torch.Tensor | None = None
        self._block_damping: dict[str, float] = {}
        self._num_train = 0

    def _fit(self) -> dict[str, Any]:
        problem = self.require_fit()
        blocks = problem.block_slices()
        squared_norms = {name: 0.0 for name, _ in blocks}
        cached, cache_entries, count = [], 0, 0
        for grads in problem.iter_grads(self.train_batches):
            count += grads.shape[0]
            for name, columns in blocks:
                squared_norms[name] += float(grads[:, columns].pow(2).sum())
            cache_entries += grads.numel()
            if cache_entries <= self.cache_limit:
                cached.append(grads)
        if count == 0:
            raise ValueError("no training samples")
        self._num_train = count
        self._cached = torch.cat(cached) if cache_entries <= self.cache_limit else None
        for name, columns in blocks:
            if self.layer_damping == "heuristic":
                size = columns.stop - columns.start
                value = HEURISTIC_DAMPING_FRACTION * squared_norms[name] / (count * size)
                self._block_damping[name] = value if value > 0 else self.damping
            else:
                self._block_damping[name] = self.damping
        if min(self._block_damping.values()) <= 0:
            raise ValueError("DataInf needs damping > 0 (it divides by the per-block damping)")
        return {
            "num_train": count,
            "cached": self._cached is not None,
            "block_damping": dict(self._block_damping),
        }

    def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        problem = self.require_fit()
        blocks = problem.block_slices()
        corrections = torch.zeros_like(vectors)
        batches = [self._cached] if self._cached is not None else problem.iter_grads(self.train_batches)
        for grads in batches:
            for name, columns in blocks:
                block_grads = grads[:, columns]
                damping = self._block_damping[name]
                weights = (vectors[:, columns] @ block_grads.T) / (damping + block_grads.pow(2).sum(dim=1))
                corrections[:, columns] += weights @ block_grads
        solutions = torch.empty_like(vectors)
        for name, columns in blocks:
            damping = self._block_damping[name]
            solutions[:, columns] = (
                vectors[:, columns] - corrections[:, columns] / self._num_train
            ) / damping
        return solutions, {"block_damping": dict(self._block_damping)}

    def options(self) -> dict[str, Any]:
        return {"damping": self.damping, "layer_damping": self.layer_damping}
