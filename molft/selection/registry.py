"""One interface over every selection strategy: the registry, the budget, and `select`.

A strategy is a function `fn(pool, budget, seed, **params) -> (indices, scores, info)` registered under a
name with `register_strategy`; `select` checks the request, runs it and wraps the result in a `Selection`.
The strategies themselves live in `molft.selection.strategies`.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from molft.selection.pool import SelectionPool

logger = logging.getLogger(__name__)


@dataclass
class Selection:
    """Chosen pool positions in pick order, with the score that ranked each (None if none did)."""

    indices: np.ndarray
    scores: np.ndarray | None
    strategy: str
    params: dict[str, Any]
    seed: int
    budget: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # diagnostics and cost: seconds, fits, thresholds

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        if len(np.unique(self.indices)) != len(self.indices):
            raise ValueError(f"Strategy {self.strategy!r} picked a molecule twice.")
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if len(self.scores) != len(self.indices):
                raise ValueError("Selection scores must have one entry per chosen index.")

    def __len__(self) -> int:
        return len(self.indices)


Picked = tuple[np.ndarray, np.ndarray | None, dict[str, Any]]


@dataclass(frozen=True)
class _Strategy:
    name: str
    fn: Callable[..., Picked]
    uses_budget: bool


STRATEGIES: dict[str, _Strategy] = {}


def register_strategy(
    name: str, *, uses_budget: bool = True
) -> Callable[[Callable[..., Picked]], Callable[..., Picked]]:
    """Add a strategy `fn(pool, budget, seed, **params) -> (indices, scores, info)` under `name`."""

    def decorate(fn: Callable[..., Picked]) -> Callable[..., Picked]:
        if name in STRATEGIES:
            raise ValueError(f"Selection strategy {name!r} is registered twice.")
        STRATEGIES[name] = _Strategy(name, fn, uses_budget)
        return fn

    return decorate


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)


def strategy_parameters(name: str) -> dict[str, Any]:
    """Tunable parameters of a strategy with their defaults (for help texts and config checks)."""
    spec = _get_strategy(name)
    parameters = list(inspect.signature(spec.fn).parameters.values())[3:]
    return {p.name: p.default for p in parameters}


def resolve_budget(pool_size: int, k: int | None = None, fraction: float | None = None) -> int:
    """Number of molecules to pick from exactly one of `k` or `fraction` of the pool (rounded half up)."""
    if (k is None) == (fraction is None):
        raise ValueError("Give exactly one of k (number of molecules) or fraction (share of the pool).")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"k must be an integer, got {k!r}.")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        if k > pool_size:
            raise ValueError(f"k={k} exceeds the pool size {pool_size}.")
        return int(k)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    budget = math.floor(fraction * pool_size + 0.5)
    if budget == 0:
        logger.warning("fraction=%s of a pool of %d rounds to 0 molecules.", fraction, pool_size)
    return budget


def pool_budget(
    k: int | None, fraction: float | None, n_candidates: int, n_pool: int, pool_file: str | os.PathLike
) -> int | None:
    """--k/--fraction turned into a number of molecules; None (no budget) when neither is given."""
    if k is None and fraction is None:
        return None
    try:
        return resolve_budget(n_candidates, k, fraction)
    except ValueError as err:
        excluded = n_pool - n_candidates
        detail = f" ({excluded} held-out molecules excluded)" if excluded else ""
        raise ValueError(f"{err} The pool {pool_file} has {n_candidates} candidates{detail}.") from err


def select(strategy: str, pool: SelectionPool, budget: int | None, seed: int = 0, **params: Any) -> Selection:
    """Run one registered strategy; unknown parameters are an error rather than silently ignored."""
    spec = _get_strategy(strategy)
    allowed = strategy_parameters(strategy)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"Strategy {strategy!r} does not take parameter(s) {unknown}; "
            f"it takes {sorted(allowed) or 'none'}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}.")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
            raise ValueError(f"budget must be a non-negative integer or None, got {budget!r}.")
        if budget > len(pool):
            raise ValueError(f"budget {budget} exceeds the pool size {len(pool)}.")
        budget = int(budget)
    if not spec.uses_budget and budget is not None:
        logger.info("Strategy %r ignores the budget (%d).", strategy, budget)
        budget = None
    effective = {**allowed, **params}
    indices, scores, info = spec.fn(pool, budget, int(seed), **params)
    selection = Selection(indices, scores, strategy, effective, int(seed), budget, info)
    if budget is not None and len(selection) > budget:
        raise RuntimeError(
            f"Strategy {strategy!r} picked {len(selection)} molecules for a budget of {budget}."
        )
    logger.info("Strategy %r picked %d of %d pool molecules.", strategy, len(selection), len(pool))
    return selection


def _get_strategy(name: str) -> _Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"Unknown selection strategy {name!r}; choose one of {available_strategies()}.")
    return STRATEGIES[name]
