"""One training order for runs that differ only in their extra molecules (`--train_order fixed`).

The Trainer's samplers shuffle train + extra molecules together from the seed, so adding a single molecule
reorders every other one, and retrainings meant to measure what added molecules do (the LDS of
molft.influence.lds) differ more by their order than by the molecules. Here the split's molecules take one
order drawn from the seed alone, and each extra molecule a place drawn from its canonical SMILES and the seed:
a molecule added in two retrainings sits at the same place among the split's molecules in both, and those keep
their relative order. Batches still shift by the extra molecules placed before them, and dropout draws its
masks per batch, so two such runs still differ by more than their molecules.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

TRAIN_ORDERS = ("random", "fixed")
SPLIT_SOURCE = "dataset"  # the `source` of the split's own molecules; extra ones carry their file's name


def fixed_training_order(train: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The training frame in the fixed order: split rows by a seeded permutation, extra rows by their SMILES."""
    extra = (train["source"] != SPLIT_SOURCE).to_numpy()
    count = int((~extra).sum())
    places = np.empty(len(train))
    split_places = np.empty(count)
    split_places[np.random.default_rng(seed).permutation(count)] = (np.arange(count) + 0.5) / max(count, 1)
    places[~extra] = split_places
    places[extra] = [unit_interval(f"{seed}:{smiles}") for smiles in train.loc[extra, "canonical_smiles"]]
    return train.iloc[np.argsort(places, kind="stable")].reset_index(drop=True)


def unit_interval(text: str) -> float:
    """A place in [0, 1) that depends on `text` alone (the first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
