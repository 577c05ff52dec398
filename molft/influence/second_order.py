"""Inverse-HVP solvers on the true (damped) Hessian: explicit solve, conjugate gradient and LiSSA.

CG and LiSSA are written on torch tensors (rather than scipy's solvers) so they run on the model's device
and solve all query vectors of a batch at once, one pass over the training data per iteration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from molft.influence.base import InfluenceEstimator, row_norms
from molft.influence.problem import Batch, batch_size, slice_batch

logger = logging.getLogger(__name__)


class LiSSADivergenceError(FloatingPointError):
    """The LiSSA recursion blew up: its scale is below the largest eigenvalue of the damped Hessian."""


class ExactEstimator(InfluenceEstimator):
    """Explicit [P, P] Hessian, damped and factorised once; exact reference for small scopes."""

    name = "exact"

    def __init__(self, damping: float = 1e-3, max_params: int = 5000) -> None:
        super().__init__(damping)
        self.max_params = max_params
        self._factor: torch.Tensor | None = None
        self._cholesky = True

    def _fit(self) -> dict[str, Any]:
        problem = self.require_fit()
        if problem.num_params > self.max_params:
            raise ValueError(
                f"exact influence needs the explicit Hessian, but the scope has {problem.num_params} parameters "
                f"> max_params={self.max_params}; use 'cg', 'lissa' or 'datainf', or a smaller scope"
            )
        hessian = problem.hessian(self.train_batches)
        damped = hessian + self.damping * torch.eye(
            problem.num_params, device=problem.device, dtype=problem.dtype
        )
        if not torch.isfinite(damped).all():
            raise FloatingPointError("the Hessian contains NaN/inf")
        factor, status = torch.linalg.cholesky_ex(damped)
        self._cholesky = int(status) == 0
        if self._cholesky:
            self._factor = factor
        else:
            logger.warning(
                "the damped Hessian is not positive definite (non-convex loss at these parameters); "
                "solving with LU, but consider a larger damping than %g",
                self.damping,
            )
            self._factor = damped
        return {"positive_definite": self._cholesky, "hessian_trace": float(hessian.trace())}

    def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if self._factor is None:
            raise RuntimeError("exact estimator must be fit() before use")
        rhs = vectors.T.to(self._factor.dtype)
        if self._cholesky:
            solutions = torch.cholesky_solve(rhs, self._factor)
        else:
            solutions = torch.linalg.solve(self._factor, rhs)
        return solutions.T.contiguous(), {"positive_definite": self._cholesky}

    def options(self) -> dict[str, Any]:
        return {"damping": self.damping, "max_params": self.max_params}


class ConjugateGradientEstimator(InfluenceEstimator):
    """Conjugate gradient on damped HVPs; stops when ||r|| <= tol * ||v|| for every query vector."""

    name = "cg"

    def __init__(self, damping: float = 1e-3, tol: float = 1e-6, max_iter: int = 100) -> None:
        super().__init__(damping)
        if tol <= 0 or max_iter < 1:
            raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
        self.tol = tol
        self.max_iter = max_iter

    def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        problem = self.require_fit()
        solutions = torch.zeros_like(vectors)
        residuals = vectors.clone()
        directions = residuals.clone()
        squared = (residuals * residuals).sum(dim=1)
        targets = self.tol * vectors.norm(dim=1)
        active = squared.sqrt() > targets
        trace = [_relative(squared, vectors)]
        iterations = 0
        while active.any() and iterations < self.max_iter:
            iterations += 1
            rows = active.nonzero().flatten()
            products = problem.hvp(directions[rows], self.train_batches, damping=self.damping)
            curvature = (directions[rows] * products).sum(dim=1)
            if (curvature <= 0).any():
                raise FloatingPointError(
                    f"CG met non-positive curvature at iteration {iterations}: the damped Hessian is not positive "
                    f"definite (non-convex loss); increase damping above {self.damping:g}"
                )
            step = squared[rows] / curvature
            solutions[rows] += step[:, None] * directions[rows]
            residuals[rows] -= step[:, None] * products
            new_squared = (residuals[rows] * residuals[rows]).sum(dim=1)
            directions[rows] = residuals[rows] + (new_squared / squared[rows])[:, None] * directions[rows]
            squared[rows] = new_squared
            active = squared.sqrt() > targets
            trace.append(_relative(squared, vectors))
            logger.debug("CG iteration %d: max relative residual %.3e", iterations, max(trace[-1]))
        converged = [not flag for flag in active.tolist()]
        if not all(converged):
            logger.warning(
                "CG did not reach tol=%g within max_iter=%d for %d of %d vectors (max relative residual %.3e)",
                self.tol,
                self.max_iter,
                converged.count(False),
                len(converged),
                max(trace[-1]),
            )
        return solutions, {"iterations": iterations, "converged": converged, "relative_residual_trace": trace}

    def options(self) -> dict[str, Any]:
        return {"damping": self.damping, "tol": self.tol, "max_iter": self.max_iter}


class LiSSAEstimator(InfluenceEstimator):
    """LiSSA (Agarwal et al. 2017): h_j = v + (1 - d) h_{j-1} - H h_{j-1} / scale, result h / scale.

    With the internal damping d = damping / scale the fixed point is h / scale = (H + damping I)^-1 v, so
    `damping` means the same as for every other estimator. The recursion converges only if `scale` exceeds
    the largest eigenvalue of H + damping I, and takes about scale / (smallest eigenvalue + damping) steps.

    scale: a number, or "auto" = `auto_scale_margin` x a power-iteration estimate of the top eigenvalue.
    batch_size: samples per HVP (drawn from one random training batch); None = full-data HVPs (deterministic).
    repeats: independent recursions averaged (only useful with mini-batch HVPs).
    divergence_factor: the recursion is declared divergent once ||h_j|| exceeds this factor times the
        largest value a convergent full-data recursion can reach, min(j + 1, scale / damping) * ||v||.
    """

    name = "lissa"

    def __init__(
        self,
        damping: float = 1e-3,
        scale: float | str = "auto",
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int | None = None,
        seed: int = 0,
        log_every: int = 50,
        divergence_factor: float = 10.0,
        auto_scale_iters: int = 30,
        auto_scale_margin: float = 1.5,
        convergence_tol: float = 1e-3,
    ) -> None:
        super().__init__(damping)
        if scale != "auto" and not (isinstance(scale, int | float) and scale > 0):
            raise ValueError(f"scale must be a positive number or 'auto', got {scale!r}")
        if depth < 1 or repeats < 1:
            raise ValueError(f"depth and repeats must be >= 1, got depth={depth}, repeats={repeats}")
        self.scale = scale
        self.depth = depth
        self.repeats = repeats
        self.batch_size = batch_size
        self.seed = seed
        self.log_every = max(1, log_every)
        self.divergence_factor = divergence_factor
        self.auto_scale_iters = auto_scale_iters
        self.auto_scale_margin = auto_scale_margin
        self.convergence_tol = convergence_tol
        self._scale_value: float | None = None

    def _fit(self) -> dict[str, Any]:
        self.train_batches = list(self.train_batches)
        if self.scale == "auto":
            top = top_eigenvalue(self, self.train_batches, self.auto_scale_iters, self.seed)
            self._scale_value = self.auto_scale_margin * (abs(top) + self.damping)
            logger.info("LiSSA scale set to %.4g (top Hessian eigenvalue ~ %.4g)", self._scale_value, top)
            return {"scale": self._scale_value, "top_eigenvalue_estimate": top}
        self._scale_value = float(self.scale)
        return {"scale": self._scale_value}

    def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        problem = self.require_fit()
        scale = self._scale_value
        if scale is None:
            raise RuntimeError("LiSSA must be fit() before use")
        vector_norms = vectors.norm(dim=1)
        total = torch.zeros_like(vectors)
        traces, updates = [], []
        for repeat in range(self.repeats):
            generator = torch.Generator().manual_seed(self.seed + repeat)
            estimate = vectors.clone()
            trace = [{"step": 0, "ihvp_norm": row_norms(estimate / scale)}]
            update = torch.full_like(vector_norms, math.inf)
            for step in range(1, self.depth + 1):
                batches = self._step_batches(generator)
                product = problem.hvp(estimate, batches, damping=self.damping)
                new_estimate = vectors + estimate - product / scale
                update = (new_estimate - estimate).norm(dim=1) / new_estimate.norm(dim=1).clamp_min(1e-300)
                estimate = new_estimate
                self._check_divergence(estimate, vector_norms, step, scale)
                if step % self.log_every == 0 or step == self.depth:
                    trace.append({"step": step, "ihvp_norm": row_norms(estimate / scale)})
                    logger.debug(
                        "LiSSA repeat %d step %d: ihvp norm %s", repeat, step, trace[-1]["ihvp_norm"]
                    )
            total += estimate / scale
            traces.append(trace)
            updates.append([float(value) for value in update])
        final_update = max(max(row) for row in updates)
        converged = final_update <= self.convergence_tol
        if not converged:
            logger.warning(
                "LiSSA has not converged after depth=%d (last relative update %.2e > %.1e); increase depth, "
                "or lower scale towards the top eigenvalue of the damped Hessian",
                self.depth,
                final_update,
                self.convergence_tol,
            )
        info = {
            "scale": scale,
            "converged": converged,
            "final_relative_update": updates,
            "norm_trace": traces,
        }
        return total / self.repeats, info

    def _step_batches(self, generator: torch.Generator) -> Sequence[Batch]:
        if self.batch_size is None:
            return self.train_batches
        batch = self.train_batches[int(torch.randint(len(self.train_batches), (1,), generator=generator))]
        size = batch_size(batch)
        if self.batch_size >= size:
            return [batch]
        rows = torch.randperm(size, generator=generator)[: self.batch_size]
        return [slice_batch(batch, rows)]

    def _check_divergence(
        self, estimate: torch.Tensor, vector_norms: torch.Tensor, step: int, scale: float
    ) -> None:
        norms = estimate.norm(dim=1)
        reach = step + 1 if self.damping == 0 else min(step + 1, scale / self.damping)
        limit = self.divergence_factor * reach * vector_norms
        if torch.isfinite(norms).all() and (norms <= limit).all():
            return
        raise LiSSADivergenceError(
            f"LiSSA diverged at step {step} (||h|| = {float(norms.max()):.3e} with scale={scale:g}): the scale "
            "must exceed the largest eigenvalue of the damped Hessian. Increase `scale` (e.g. x10) or use "
            "scale='auto'."
        )

    def options(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            "scale": self.scale if self._scale_value is None else self._scale_value,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


def top_eigenvalue(
    estimator: InfluenceEstimator, batches: Sequence[Batch], iterations: int = 30, seed: int = 0
) -> float:
    """Largest-magnitude eigenvalue of the (undamped) Hessian by power iteration."""
    problem = estimator.require_fit()
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(problem.num_params, generator=generator, dtype=torch.float64)
    vector = (vector / vector.norm()).to(device=problem.device, dtype=problem.dtype)
    eigenvalue = 0.0
    for _ in range(iterations):
        product = problem.hvp(vector, batches)
        eigenvalue = float(vector @ product)
        norm = product.norm()
        if norm == 0:
            break
        vector = product / norm
    return eigenvalue


def _relative(squared: torch.Tensor, vectors: torch.Tensor) -> list[float]:
    return [float(value) for value in squared.sqrt() / vectors.norm(dim=1).clamp_min(1e-300)]
