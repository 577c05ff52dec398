"""Model plumbing shared by the scripts: loading, unwrapping PEFT, pinning feature maps, embeddings."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


def molformer_config(model: nn.Module):
    """The MolformerConfig a (possibly PEFT-wrapped) model runs with; its attention layers read it live."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "model_type", None) == "molformer":
            return config
    return None


@contextmanager
def fixed_feature_maps(model: nn.Module) -> Iterator[None]:
    """Pin MoLFormer's random features (no redraw) even in train mode, e.g. for MC dropout or influence.

    A no-op for models without MoLFormer attention, so generic code can always use it.
    """
    config = molformer_config(model)
    if config is None:
        yield
        return
    previous = config.feature_map_redraw
    config.feature_map_redraw = "never"
    try:
        yield
    finally:
        config.feature_map_redraw = previous


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@torch.no_grad()
def embed_batches(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> np.ndarray:
    """Pooled embeddings [N, H] in eval mode, in batch order (the representation the regression head sees)."""
    base = unwrap_peft(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    try:
        for batch in batches:
            chunks.append(
                base.embed(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                .float()
                .cpu()
                .numpy()
            )
    finally:
        model.train(was_training)
    return np.concatenate(chunks) if chunks else np.empty((0, 0), dtype=np.float32)


def smiles_batches(
    smiles: list[str],
    tokenizer,
    batch_size: int,
    max_length: int,
    labels: np.ndarray | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches in input order, tokenised as run_regression.py does (truncation is reported).

    `labels` (float64, cast to the model's dtype where used) are added as a `labels` tensor when given.
    """
    from transformers import DataCollatorWithPadding

    encoded = tokenizer(smiles, truncation=True, max_length=max_length)
    features = [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    collator = DataCollatorWithPadding(tokenizer)
    batches = []
    for start in range(0, len(features), batch_size):
        batch = dict(collator(features[start : start + batch_size]))
        if labels is not None:
            batch["labels"] = torch.tensor(np.asarray(labels[start : start + batch_size], dtype=np.float64))
        batches.append(batch)
    return batches


def release_memory() -> None:
    """Hand cached accelerator memory back between independent computations (estimators, models), so each
    starts from what it needs rather than from the previous one's peak."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(name: str) -> torch.device:
    """The device a `--device` option names; `auto` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
