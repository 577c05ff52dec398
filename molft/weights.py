"""Per-molecule loss weights for external molecules: soft alternatives to hard selection.

Influence scores follow the project convention (negative = helpful: the query loss is predicted to fall),
so the `helpful_*` mappings negate them first. Every mapping returns non-negative weights; the softmax
mappings are rescaled to mean 1 so the external set's total weight equals its size.
"""

from __future__ import annotations

import numpy as np

WEIGHT_MAPPINGS = ("identity", "clip", "helpful_clip", "softmax", "helpful_softmax")


def map_weights(values: np.ndarray, mapping: str, temperature: float = 1.0) -> np.ndarray:
    """Turn a column of values (e.g. influence scores) into loss weights.

    identity: the values themselves (must be >= 0); clip: max(v, 0); helpful_clip: max(-v, 0);
    softmax: n·softmax(v / T); helpful_softmax: n·softmax(-v / T).
    """
    values = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"Weight values are missing or non-finite at rows {bad[:10].tolist()}.")
    if mapping not in WEIGHT_MAPPINGS:
        raise ValueError(f"Unknown weight mapping {mapping!r}; choose one of {WEIGHT_MAPPINGS}.")
    if temperature <= 0:
        raise ValueError(f"Weight temperature must be positive, got {temperature}.")
    if mapping == "identity":
        negative = np.flatnonzero(values < 0)
        if negative.size:
            raise ValueError(
                f"identity weights must be >= 0; rows {negative[:10].tolist()} are negative "
                "(use clip or a softmax mapping for scores)."
            )
        weights = values
    elif mapping in ("clip", "helpful_clip"):
        weights = np.clip(values if mapping == "clip" else -values, 0.0, None)
    else:
        logits = (values if mapping == "softmax" else -values) / temperature
        logits -= logits.max()
        weights = np.exp(logits)
        weights *= len(weights) / weights.sum()
    if not weights.sum() > 0:
        raise ValueError(
            f"All weights are zero under mapping {mapping!r}; nothing would be learned from them."
        )
    return weights
