"""What the run's model says about the pool and the run's splits: embeddings and MC-dropout predictions.

The model is loaded only when the strategy or the shift diagnostics use one of these arrays, and every
array covers the whole pool file, so positions stay those of the file (candidates are taken later).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from molft.selection.registry import strategy_parameters
from molft.selection.strategies import VALUATION_STRATEGIES
from molft.selection.uncertainty import mc_predictions

if TYPE_CHECKING:
    import torch

    from molft.arguments import RunModelArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArrays:
    """What the model says about each molecule set (None where nothing needs it)."""

    pool_embeddings: np.ndarray | None = None
    train_embeddings: np.ndarray | None = None
    validation_embeddings: np.ndarray | None = None
    mc_predictions: np.ndarray | None = None  # [passes, pool]


def model_arrays(
    model_args: RunModelArguments,
    pool_frame: pd.DataFrame,
    frames: dict[str, pd.DataFrame] | None,
    *,
    strategy: str,
    params: dict[str, Any],
    shift_diagnostics: bool,
    n_passes: int,
    batch_size: int,
    seed: int,
    quiet: bool = False,
) -> ModelArrays:
    """Run the model only for the arrays `strategy` and the shift diagnostics use; all for the whole pool.

    `params` are the strategy parameters given (their defaults fill the rest); `frames` the run's
    train/validation/test frames, or None without a split.
    """
    arrays = ModelArrays()
    if not model_args.model_name_or_path:
        return arrays
    effective = {**strategy_parameters(strategy), **params}
    mmd = shift_diagnostics and frames is not None
    valuation = strategy in VALUATION_STRATEGIES
    want_pool = valuation or mmd or (strategy == "diversity" and effective.get("method") == "kmeans")
    want_train = (valuation or mmd) and frames is not None
    want_mc = strategy == "uncertainty"
    if not (want_pool or want_train or want_mc):
        logger.info("Strategy %r does not use the model; not loading it.", strategy)
        return arrays

    from transformers import AutoTokenizer

    import tokenization_molformer  # noqa: F401  registers the tokenizer with AutoTokenizer
    from molft.model_utils import embed_batches, resolve_device, smiles_batches
    from molft.peft_setup import load_regression_checkpoint

    device = resolve_device(model_args.device)
    model = load_regression_checkpoint(model_args.model_name_or_path, model_args.base_model).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)

    def batches_of(frame: pd.DataFrame) -> list[dict[str, torch.Tensor]]:
        return smiles_batches(
            frame["canonical_smiles"].tolist(), tokenizer, batch_size, model_args.max_seq_length
        )

    pool_batches = batches_of(pool_frame)
    if want_pool:
        arrays.pool_embeddings = embed_batches(
            model, tqdm(pool_batches, desc="Embedding pool", disable=quiet)
        )
    if want_train:
        train_batches = batches_of(frames["train"])
        arrays.train_embeddings = embed_batches(
            model, tqdm(train_batches, desc="Embedding train", disable=quiet)
        )
    if valuation:
        validation_batches = batches_of(frames["validation"])
        arrays.validation_embeddings = embed_batches(
            model, tqdm(validation_batches, desc="Embedding validation", disable=quiet)
        )
    if want_mc:
        arrays.mc_predictions = mc_predictions(model, pool_batches, n_passes, seed, quiet)
    return arrays
