"""Helpers shared by the script tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch

from configuration_molformer import MolformerConfig

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "molformer-tiny.json"


def tiny_config(**overrides) -> MolformerConfig:
    """configs/molformer-tiny.json (hidden 32, 2 layers, FFN 32), with `overrides` (e.g. vocab_size)."""
    config = MolformerConfig.from_json_file(str(TINY_CONFIG))
    config.update(overrides)
    return config


@torch.no_grad()
def model_predictions(model, tokenizer, smiles: list[str]) -> np.ndarray:
    """A regression model's predictions for `smiles`, in one padded batch."""
    model.eval()
    batch = tokenizer(smiles, padding=True, return_tensors="pt")
    return model(**batch).logits.view(-1).double().numpy()


def head_copy(source: Path, target: Path, n_rows: int) -> Path:
    """The first `n_rows` of a shared csv, so script tests run on a slice of the real file."""
    pd.read_csv(source, nrows=n_rows).to_csv(target, index=False)
    return target


def train_tiny_regression(train_file: Path, run_dir: Path, *extra: str) -> Path:
    """One epoch of a tiny MoLFormer from scratch on `train_file`, through run_regression.main()."""
    argv = [
        "run_regression.py",
        "--train_file", str(train_file),
        "--config_name", str(TINY_CONFIG),
        "--output_dir", str(run_dir),
        "--do_train", "--do_eval",
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "32",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--use_cpu", "true",
        "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip
    from run_regression import main  # the script's entry point only

    with patch.object(sys, "argv", argv):
        main()
    return run_dir


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run faster on one thread, and much faster than two on a busy 2-core machine.

    Autouse in every test module that imports it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
