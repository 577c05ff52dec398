"""One estimator run from a script: progress bars, failures that say what to change, the LiSSA depth check.

`compute_influence` is silent and raises the estimators' own errors; a command-line run wants to see the
passes over the data and the solver iterations, and on failure the flag that fixes it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from molft.influence.api import compute_influence
from molft.influence.problem import Batch, InfluenceProblem, NonFiniteGradientError
from molft.influence.second_order import LiSSADivergenceError
from molft.model_utils import release_memory

logger = logging.getLogger(__name__)

SOLVER_LOGGER = "molft.influence.second_order"


def lissa_scale(value: str) -> float | str:
    """The value of --lissa_scale: 'auto' or a positive number."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"--lissa_scale must be 'auto' or a positive number, got {value!r}.") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"--lissa_scale must be 'auto' or a positive number, got {value!r}.")
    return scale


class ProgressBatches(list):
    """Batches that show a progress bar every time an estimator passes over them."""

    def __init__(self, batches: Sequence[Batch], desc: str, quiet: bool) -> None:
        super().__init__(batches)
        self.desc = desc
        self.quiet = quiet

    def __iter__(self) -> Iterator[Batch]:
        yield from tqdm(super().__iter__(), total=len(self), desc=self.desc, disable=self.quiet, leave=False)


class SolverProgress(logging.Handler):
    """A progress bar fed by the solvers' per-iteration debug records (CG residual, LiSSA iHVP norm)."""

    def __init__(self, total: int, desc: str, quiet: bool, depth: int = 1) -> None:
        super().__init__(logging.DEBUG)
        self.depth = depth
        self.bar = tqdm(total=total, desc=desc, disable=quiet, leave=False)

    def emit(self, record: logging.LogRecord) -> None:
        message, values = str(record.msg), record.args
        if not isinstance(values, tuple):
            return
        if message.startswith("CG iteration") and len(values) == 2:
            self.bar.update(1)
            self.bar.set_postfix(residual=f"{values[1]:.2e}")
        elif message.startswith("LiSSA repeat") and len(values) == 3:
            position = int(values[0]) * self.depth + int(values[1])
            self.bar.update(max(0, position - self.bar.n))
            self.bar.set_postfix(ihvp_norm=f"{max(values[2]):.3e}")

    def close(self) -> None:
        self.bar.close()
        super().close()


def run_estimator(
    problem: InfluenceProblem,
    batches: dict[str, Sequence[Batch]],
    estimator: str,
    options: dict[str, Any],
    *,
    per_query: bool,
    damping: float,
    quiet: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """compute_influence with progress bars; failures are re-raised with what to change.

    `batches` holds the roles train, query and candidates; `damping` is the flag's value, for the message.
    """
    batches = {
        role: ProgressBatches(role_batches, f"{role} gradients", quiet)
        for role, role_batches in batches.items()
    }
    solver_logger = logging.getLogger(SOLVER_LOGGER)
    handler = None
    if estimator in ("cg", "lissa"):
        if estimator == "cg":
            handler = SolverProgress(options["max_iter"], "CG iterations", quiet)
        else:
            total = options["depth"] * options["repeats"]
            handler = SolverProgress(total, "LiSSA steps", quiet, depth=options["depth"])
        solver_logger.addHandler(handler)
        previous_level = solver_logger.level
        solver_logger.setLevel(logging.DEBUG)
        _keep_root_handlers_at(logging.getLogger().getEffectiveLevel())
    try:
        scores, diagnostics = compute_influence(
            problem,
            batches["train"],
            batches["query"],
            batches["candidates"],
            estimator,
            per_query=per_query,
            **options,
        )
    except LiSSADivergenceError as err:
        raise LiSSADivergenceError(
            f"{err} With --lissa_scale {options.get('scale')} the recursion blew up instead of converging: "
            "rerun with --lissa_scale auto (1.5 x the estimated top eigenvalue) or a larger value, or use "
            "--estimator cg. No scores were written."
        ) from err
    except NonFiniteGradientError as err:
        raise NonFiniteGradientError(
            f"{err}. Check the labels/SMILES of those molecules, or use --dtype float64."
        ) from err
    except FloatingPointError as err:
        raise FloatingPointError(
            f"{estimator} failed: {err}. The Hessian of a model away from a minimum can be indefinite: use "
            f"--curvature gauss_newton (positive semi-definite), or raise --damping (now "
            f"{damping:g}; e.g. x10); --estimator exact reports whether the damped curvature is "
            "positive definite. No scores were written."
        ) from err
    finally:
        if handler is not None:
            solver_logger.removeHandler(handler)
            solver_logger.setLevel(previous_level)
            handler.close()
        release_memory()  # the estimator's factors and caches are gone; give their memory back
    if estimator == "lissa":
        warn_if_lissa_truncated(diagnostics["solver"], options)
    return scores, diagnostics


def lissa_steps_needed(solver: dict[str, Any], damping: float) -> float:
    """Steps per e-fold of the slowest direction: the error there shrinks like (1 - damping / scale)^steps."""
    return float(solver.get("scale", 0.0)) / damping if damping > 0 else math.inf


def warn_if_lissa_truncated(solver: dict[str, Any], options: dict[str, Any]) -> None:
    """LiSSA's own check (small relative step) passes long before flat directions have converged."""
    needed = lissa_steps_needed(solver, options["damping"])
    if options["depth"] < 3 * needed:
        logger.warning(
            "LiSSA depth %d is short of the ~%.0f steps (3 x scale / damping) its flattest directions may need: "
            "the iHVP may be truncated towards a scaled gradient (gradient_dot). Raise --lissa_depth or "
            "--damping, or use --estimator cg.",
            options["depth"],
            3 * needed,
        )


def _keep_root_handlers_at(level: int) -> None:
    """The solvers' debug records feed the progress bar only, not the console."""
    for handler in logging.getLogger().handlers:
        if handler.level < level:
            handler.setLevel(level)
