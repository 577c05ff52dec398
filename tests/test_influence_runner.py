"""Running one estimator from a script (molft.influence.runner)."""

from __future__ import annotations

from molft.influence.runner import warn_if_lissa_truncated


def test_lissa_truncation_is_flagged(caplog):
    # the slowest direction contracts by (1 - damping / scale) per step: 3 e-folds need 3 x 10 / 0.01 steps
    warn_if_lissa_truncated({"scale": 10.0}, {"damping": 0.01, "depth": 1000})
    assert "short of the ~3000 steps" in caplog.text
    caplog.clear()
    warn_if_lissa_truncated({"scale": 10.0}, {"damping": 0.1, "depth": 1000})
    assert caplog.text == ""
