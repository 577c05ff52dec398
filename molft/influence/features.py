"""Influence on precomputed features: a head differentiated alone on pooled embeddings.

When the encoder is outside the parameter scope, every parameter value sees the same pooled embedding of
a molecule, so embedding each molecule once and differentiating the head on the embeddings is exact and
far cheaper than running the encoder for every gradient. Embeddings are cheap to batch, so batches are
sized by the per-sample gradient entries they produce, not by the model's batch size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from molft.influence.problem import LABELS_KEY

FEATURES_KEY = "features"
FEATURE_GRAD_ENTRIES = 50_000_000
FEATURE_BATCH_MAX = 4096


def feature_batch_size(batch_size: int, num_params: int) -> int:
    """As many embeddings as keep a batch's per-sample gradients near 5e7 numbers (at least `batch_size`)."""
    return int(min(FEATURE_BATCH_MAX, max(batch_size, FEATURE_GRAD_ENTRIES // max(num_params, 1))))


def feature_batches(
    features: np.ndarray, labels: np.ndarray, batch_size: int, dtype: torch.dtype
) -> list[dict[str, torch.Tensor]]:
    """Labelled batches of `features` rows, in order."""
    x = torch.as_tensor(features, dtype=dtype)
    y = torch.as_tensor(labels, dtype=dtype)
    return [
        {FEATURES_KEY: x[start : start + batch_size], LABELS_KEY: y[start : start + batch_size]}
        for start in range(0, len(x), batch_size)
    ]


def linear_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """forward_fn of a plain module (e.g. nn.Linear) on feature batches: it takes the features positionally."""
    return model(batch[FEATURES_KEY])
