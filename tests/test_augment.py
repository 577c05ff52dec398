"""molft.augment: random SMILES for training (--augment_smiles) and test-time augmentation (--tta)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import DataCollatorWithPadding

from molft.augment import (
    AugmentationArguments,
    AugmentedSmiles,
    augment_training_set,
    randomised_smiles,
    tta_samples,
    vocabulary_variants,
)
from molft.chem import canonical_smiles
from molft.regression import tokenise
from tokenization_molformer import MolformerTokenizer

SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O",
    "CN1CCN(c2ccc(Cl)cc2)CC1",
    "O=C(Nc1ccccc1)c1ccncc1",
    "CCOC(=O)c1ccc(N)cc1",
    "Cc1ccc(S(=O)(=O)N2CCCC2)cc1",
    "COc1ccc2[nH]cc(CCN)c2c1",
]


@pytest.fixture(scope="module")
def molecules() -> pd.DataFrame:
    smiles = [canonical_smiles(s) for s in SMILES]
    return pd.DataFrame(
        {"canonical_smiles": smiles, "label": np.arange(len(smiles), dtype=float), "sample_weight": 1.0}
    )


@pytest.fixture(scope="module")
def tokenizer(molecules) -> MolformerTokenizer:
    smiles = molecules["canonical_smiles"].tolist()
    return MolformerTokenizer.from_smiles(smiles + vocabulary_variants(smiles, seed=0, copies=3))


def decoded(tokenizer, batch) -> list[str]:
    return [s.replace(" ", "") for s in tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)]


def one_epoch(dataset, collator, batch_size: int = 4) -> list[dict]:
    """The batches of one epoch in dataset order, as a Trainer's dataloader would collate them."""
    return [collator([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]) for s in range(0, len(dataset), batch_size)]  # fmt: skip


def test_training_items_are_random_smiles_of_the_same_molecule_fresh_each_epoch(molecules, tokenizer):
    canonical = molecules["canonical_smiles"].tolist()
    dataset, collator = augment_training_set(
        tokenise(molecules, tokenizer, 202, lengths=True), canonical, 2, DataCollatorWithPadding(tokenizer), tokenizer, 202
    )  # fmt: skip
    assert len(dataset) == 2 * len(canonical)
    torch.manual_seed(0)
    first, second = one_epoch(dataset, collator), one_epoch(dataset, collator)
    torch.manual_seed(0)
    again = one_epoch(dataset, collator)
    first_smiles = [s for batch in first for s in decoded(tokenizer, batch)]
    second_smiles = [s for batch in second for s in decoded(tokenizer, batch)]
    # every item is a valid SMILES of its own molecule, and labels and weights travel with it
    assert [canonical_smiles(s) for s in first_smiles] == canonical * 2
    assert [canonical_smiles(s) for s in second_smiles] == canonical * 2
    assert torch.cat([b["labels"] for b in first]).tolist() == molecules["label"].tolist() * 2
    assert "sample_weight" in first[0] and "length" not in first[0] and "smiles" not in first[0]
    # random, not canonical; the two copies of a molecule differ; the next epoch draws new ones
    assert sum(s != c for s, c in zip(first_smiles, canonical * 2, strict=True)) >= 10
    assert sum(a != b for a, b in zip(first_smiles[:6], first_smiles[6:], strict=True)) >= 4
    assert sum(a != b for a, b in zip(first_smiles, second_smiles, strict=True)) >= 10
    # the seed alone decides them
    for batch, repeat in zip(first, again, strict=True):
        assert torch.equal(batch["input_ids"], repeat["input_ids"])
        assert torch.equal(batch["attention_mask"], repeat["attention_mask"])
    assert (first[0]["attention_mask"].sum(1) == torch.tensor([len(tokenizer(s)["input_ids"]) for s in first_smiles[:4]])).all()  # fmt: skip


def test_evaluation_items_pass_through_unchanged(molecules, tokenizer):
    canonical = molecules["canonical_smiles"].tolist()
    plain = DataCollatorWithPadding(tokenizer)
    _, collator = augment_training_set(
        tokenise(molecules, tokenizer, 202), canonical, 1, plain, tokenizer, 202
    )
    evaluation = tokenise(molecules, tokenizer, 202)
    items = [evaluation[i] for i in range(len(evaluation))]
    expected, got = plain(items), collator(items)
    assert torch.equal(expected["input_ids"], got["input_ids"])
    assert decoded(tokenizer, got) == canonical


def test_one_copy_keeps_the_epoch_length_and_zero_copies_are_refused(molecules, tokenizer):
    dataset = tokenise(molecules, tokenizer, 202, lengths=True)
    assert len(AugmentedSmiles.from_dataset(dataset, molecules["canonical_smiles"], 1)) == len(molecules)
    with pytest.raises(ValueError, match="copies must be >= 1"):
        AugmentedSmiles.from_dataset(dataset, molecules["canonical_smiles"], 0)
    with pytest.raises(ValueError, match="5 SMILES but columns"):
        AugmentedSmiles.from_dataset(dataset, molecules["canonical_smiles"][:5], 2)


def test_vocabulary_variants_cover_random_smiles(molecules):
    canonical = molecules["canonical_smiles"].tolist()
    variants = vocabulary_variants(canonical, seed=3, copies=2)
    assert len(variants) == 2 * len(canonical)
    assert [canonical_smiles(v) for v in variants] == canonical * 2
    assert variants == vocabulary_variants(canonical, seed=3, copies=2)
    assert variants[: len(canonical)] == randomised_smiles(canonical, 3)


def test_tta_mean_and_std_equal_a_hand_computation_with_a_stub_predictor(molecules):
    canonical = molecules["canonical_smiles"].tolist()

    def stub(smiles: list[str]) -> np.ndarray:  # two outputs per molecule: its string length, and 1
        return np.array([[len(s), 1.0] for s in smiles])

    samples = tta_samples(stub, canonical, n_samples=4, seed=11)
    assert samples.shape == (4, len(canonical), 2)
    by_hand = np.array(
        [[len(s) for s in randomised_smiles(canonical, 11 + k * len(canonical))] for k in range(4)]
    )
    np.testing.assert_array_equal(samples[:, :, 0], by_hand)
    from molft.uncertainty import summarise

    mean, std = summarise(samples)
    np.testing.assert_allclose(mean[:, 0], by_hand.mean(axis=0))
    np.testing.assert_allclose(std[:, 0], by_hand.std(axis=0, ddof=1))
    assert (std[:, 1] == 0).all() and std[:, 0].max() > 0  # random SMILES differ in length
    np.testing.assert_array_equal(samples, tta_samples(stub, canonical, n_samples=4, seed=11))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tta": 1}, "--tta must be 0"),
        ({"tta": -2}, "--tta must be 0"),
        ({"augment_smiles": -1}, "augment_smiles"),
    ],
)
def test_bad_augmentation_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        AugmentationArguments(**options)
