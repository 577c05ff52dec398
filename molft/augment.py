"""SMILES augmentation: random SMILES of the same molecule, for training (run_mlm.py, run_regression.py) and
for test-time augmentation (TTA) of run_regression.py's predictions.

A molecule has many valid SMILES; a model that only ever sees RDKit's canonical one can learn that
string's quirks instead of the chemistry. Training on fresh random SMILES every epoch and averaging
predictions over several of them at test time are the two standard remedies. Everything here is seeded:
training draws its seeds from torch's RNG (so it follows `set_seed` and differs per epoch), TTA from
the run's seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rdkit import Chem

logger = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
# keys the training items carry that the model must not see
_SMILES_KEY, _LENGTH_KEY = "smiles", "length"


@dataclass
class AugmentationArguments:
    """run_regression.py's SMILES augmentation: random SMILES in training (--augment_smiles) and at test time."""

    augment_smiles: int = field(
        default=0,
        metadata={
            "help": "Train on N random SMILES per training molecule per epoch (an epoch is then N times "
            "longer), drawn afresh every epoch from the seed. 0 (default): the canonical SMILES only, as "
            "without augmentation; 1: one random SMILES per molecule per epoch instead of the canonical "
            "one. Validation and test always use the canonical SMILES. A vocabulary built from the "
            "training SMILES then also covers random ones."
        },
    )
    tta: int = field(
        default=0,
        metadata={
            "help": "Test-time augmentation (needs --do_predict; N >= 2): predict each test (and "
            "--predict_file) molecule from N random SMILES, the canonical one not among them. "
            "predictions.csv gets the mean and its spread (prediction_tta, prediction_tta_std), "
            "all_results test_tta_* metrics of the mean; test_rmse etc. stay those of the canonical "
            "prediction. 0: off."
        },
    )

    def __post_init__(self) -> None:
        if self.augment_smiles < 0:
            raise ValueError(f"--augment_smiles must be >= 0, got {self.augment_smiles}.")
        if self.tta < 0 or self.tta == 1:
            raise ValueError(
                f"--tta must be 0 (off) or at least 2 (a spread needs two predictions), got {self.tta}."
            )


def randomised_smiles(smiles: Sequence[str], seed: int) -> list[str]:
    """One random (non-canonical) SMILES per molecule: a new atom order and branch order per seed."""
    variants = []
    for offset, smi in enumerate(smiles):
        mol = Chem.MolFromSmiles(smi)
        if mol is None:  # cannot happen for RDKit canonical SMILES; keep the string rather than lose a row
            variants.append(smi)
            continue
        # RDKit treats seed 0 as "unseeded", so seeds live in [1, 2**31 - 1)
        variants.append(
            Chem.MolToRandomSmilesVect(mol, 1, randomSeed=(seed + offset) % (MAX_SEED - 1) + 1)[0]
        )
    return variants


def draw_seed() -> int:
    """An enumeration seed from torch's RNG: follows `set_seed`, differs per batch, epoch and worker."""
    return int(torch.randint(1, MAX_SEED, (1,)).item())


def vocabulary_variants(smiles: Sequence[str], seed: int, copies: int) -> list[str]:
    """`copies` random SMILES per molecule, for a vocabulary built from the training SMILES.

    Random SMILES use tokens canonical ones rarely need (e.g. more ring-closure digits); a vocabulary
    without them would turn those into <unk>.
    """
    return [v for k in range(copies) for v in randomised_smiles(smiles, seed + k * len(smiles))]


class AugmentedSmiles(torch.utils.data.Dataset):
    """`copies` items per training molecule, each carrying its canonical SMILES for `RandomSmilesCollator`.

    Item `i` is molecule `i % n_molecules`, so an epoch holds every molecule `copies` times. Items keep the
    canonical token ids, which length-grouped batching reads (random SMILES are about as long). A plain
    torch dataset, so those lengths are read once per training rather than row by row.
    """

    def __init__(self, columns: dict[str, list], smiles: Sequence[str], copies: int):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}.")
        lengths = {name: len(values) for name, values in columns.items()}
        if any(n != len(smiles) for n in lengths.values()):
            raise ValueError(f"{len(smiles)} SMILES but columns of lengths {lengths}.")
        self.columns = {name: values for name, values in columns.items() if name != _LENGTH_KEY}
        self.smiles = list(smiles)
        self.copies = copies

    @classmethod
    def from_dataset(cls, dataset: Any, smiles: Sequence[str], copies: int) -> AugmentedSmiles:
        """From a tokenised `datasets.Dataset` (molft.regression.tokenise) and its canonical SMILES."""
        return cls(dataset.to_dict(), smiles, copies)

    def __len__(self) -> int:
        return len(self.smiles) * self.copies

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        row = index % len(self.smiles)
        item = {name: values[row] for name, values in self.columns.items()}
        item[_SMILES_KEY] = self.smiles[row]
        return item


class RandomSmilesCollator:
    """Re-encode every item that carries `smiles` from a fresh random SMILES, then collate as `collator` does.

    One seed per batch is drawn from torch's RNG (`draw_seed`), item `j` of the batch uses seed + j, so
    two copies of a molecule in one batch get different SMILES. Items without `smiles` (evaluation sets)
    pass through unchanged.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Any], tokenizer: Any, max_seq_length: int):
        self.collator = collator
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        features = [
            {k: v for k, v in example.items() if k not in (_SMILES_KEY, _LENGTH_KEY)} for example in examples
        ]
        to_randomise = [i for i, example in enumerate(examples) if _SMILES_KEY in example]
        if to_randomise:
            variants = randomised_smiles([examples[i][_SMILES_KEY] for i in to_randomise], draw_seed())
            encoded = self.tokenizer(variants, truncation=True, max_length=self.max_seq_length)
            for position, i in enumerate(to_randomise):
                for key in encoded:
                    if key in features[i]:
                        features[i][key] = encoded[key][position]
        return self.collator(features)


def augment_training_set(
    dataset: Any, smiles: Sequence[str], copies: int, collator: Callable, tokenizer: Any, max_seq_length: int
) -> tuple[AugmentedSmiles, RandomSmilesCollator]:
    """The training set and collator of `--augment_smiles copies` (copies >= 1)."""
    logger.info(
        "SMILES augmentation: %d random SMILES per training molecule per epoch (%d items per epoch).",
        copies,
        copies * len(smiles),
    )
    return AugmentedSmiles.from_dataset(dataset, smiles, copies), RandomSmilesCollator(
        collator, tokenizer, max_seq_length
    )


def tta_samples(
    predict: Callable[[list[str]], np.ndarray], smiles: Sequence[str], n_samples: int, seed: int
) -> np.ndarray:
    """Predictions [n_samples, n_molecules, n_outputs] from `n_samples` random SMILES of every molecule.

    `predict` maps SMILES to an array with one row per molecule (regression values or class
    probabilities). Sample `k` uses seed + k·n_molecules, so every (sample, molecule) pair has its own seed
    and the result depends only on `seed`, not on batching.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    samples = []
    for k in range(n_samples):
        output = np.asarray(predict(randomised_smiles(smiles, seed + k * len(smiles))), dtype=np.float64)
        samples.append(output.reshape(len(smiles), -1))
    return np.stack(samples)
