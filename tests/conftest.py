"""Shared fixtures: paths to ../shared, tiny configs, a tiny tokenizer and the corpus SMILES the MLM tests use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
DATA = SHARED / "data"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from molft.preflight import hub_reachable  # noqa: E402  the one Hub check, as the scripts make it


def pytest_collection_modifyitems(config, items):
    if any("hub" in item.keywords for item in items) and not hub_reachable():
        skip = pytest.mark.skip(reason="needs the Hugging Face Hub (offline)")
        for item in items:
            if "hub" in item.keywords:
                item.add_marker(skip)
    if not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden tensors not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="module")
def corpus_smiles(data_dir) -> list[str]:
    """The first 400 SMILES of the pretraining corpus (molft.mlm and run_mlm.py tests)."""
    corpus = data_dir / "pretrain_chembl30_zinc_120k.csv"
    if not corpus.is_file():
        pytest.skip(f"pretraining corpus not found at {corpus}")
    return pd.read_csv(corpus, nrows=400)["smiles"].tolist()
