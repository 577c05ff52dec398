"""Running one estimator from a script (molft.influence.runner)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molft.influence import InfluenceProblem, runner
from molft.influence.runner import warn_if_lissa_truncated


def test_lissa_truncation_is_flagged(caplog):
    # the slowest direction contracts by (1 - damping / scale) per step: 3 e-folds need 3 x 10 / 0.01 steps
    warn_if_lissa_truncated({"scale": 10.0}, {"damping": 0.01, "depth": 1000})
    assert "short of the ~3000 steps" in caplog.text
    caplog.clear()
    warn_if_lissa_truncated({"scale": 10.0}, {"damping": 0.1, "depth": 1000})
    assert caplog.text == ""


def test_each_estimator_run_hands_its_memory_back(monkeypatch):
    """run_estimator releases cached (accelerator) memory after every estimator, also one that fails."""
    calls = []
    monkeypatch.setattr(runner, "release_memory", lambda: calls.append(1))
    torch.manual_seed(0)
    head = nn.Linear(3, 1).double()
    problem = InfluenceProblem(
        head, dict(head.named_parameters()), forward_fn=lambda m, b: m(b["x"]).view(-1)
    )
    batch = [{"x": torch.randn(8, 3, dtype=torch.float64), "labels": torch.randn(8, dtype=torch.float64)}]
    roles = {"train": batch, "query": batch, "candidates": batch}
    scores, _ = runner.run_estimator(
        problem,
        roles,
        "cg",
        {"damping": 0.1, "tol": 1e-8, "max_iter": 10},
        per_query=False,
        damping=0.1,
        quiet=True,
    )
    assert scores.shape == (8,) and len(calls) == 1
    with pytest.raises(ValueError):
        runner.run_estimator(
            problem,
            roles,
            "exact",
            {"damping": 0.1, "max_params": 1},
            per_query=False,
            damping=0.1,
            quiet=True,
        )
    assert len(calls) == 2
