"""molft.regression: target statistics by hand, the model options, and the models the factory builds."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY_CONFIG, tiny_config
from transformers import TrainingArguments

from modeling_molformer import MolformerForMaskedLM
from molft.arguments import DEFAULT_MODEL
from molft.chem import canonical_smiles
from molft.peft_setup import PeftOptions
from molft.regression import (
    ModelFactory,
    RegressionModelArguments,
    build_config,
    cap_splits,
    load_tokenizer,
    target_statistics,
)
from tokenization_molformer import MolformerTokenizer

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1", "O=C(O)c1ccccc1", "CCN(CC)CC"]


def test_target_statistics_by_hand():
    labels = np.array([1.0, 2.0, 3.0, 6.0])
    assert target_statistics(labels, "none") == (0.0, 1.0)
    assert target_statistics(labels, "standard") == pytest.approx((3.0, np.sqrt(14 / 4)))
    assert target_statistics(labels, "minmax") == (1.0, 5.0)
    # a zero-weight molecule does not count
    assert target_statistics(labels, "standard", [1, 1, 1, 0]) == pytest.approx((2.0, np.sqrt(2 / 3)))
    assert target_statistics(labels, "minmax", [0, 1, 1, 1]) == (2.0, 4.0)
    assert target_statistics(np.full(3, 5.0), "standard") == (5.0, 1.0)


def test_model_options_start_from_the_pretrained_model_unless_a_new_one_is_asked_for():
    assert RegressionModelArguments().model_name_or_path == DEFAULT_MODEL
    new = RegressionModelArguments(config_name=str(TINY_CONFIG))
    assert new.model_name_or_path is None and new.config_name == str(TINY_CONFIG)


def test_config_name_may_be_a_file_or_a_folder(tmp_path):
    shutil.copy(TINY_CONFIG, tmp_path / "config.json")
    tokenizer = MolformerTokenizer.from_smiles(SMILES)
    train = pd.DataFrame({"canonical_smiles": SMILES, "label": np.arange(len(SMILES), dtype=float)})
    configs = [
        build_config(RegressionModelArguments(config_name=str(name)), "none", tokenizer, train)
        for name in (TINY_CONFIG, tmp_path)
    ]
    assert configs[0].to_dict() == configs[1].to_dict()
    assert configs[0].vocab_size == len(tokenizer) and configs[0].target_mean == pytest.approx(2.5)


def test_masked_lm_checkpoint_starts_the_encoder(data_dir, tmp_path):
    """A run_mlm.py output: encoder weights and tokenizer come from it, the regression head is new."""
    smiles = [canonical_smiles(s) for s in pd.read_csv(data_dir / "lipophilicity.csv", nrows=160)["smiles"]]
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    MolformerForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    mlm = MolformerForMaskedLM.from_pretrained(tmp_path / "mlm")
    # configs/regression_tiny.yaml's new-model config, with a checkpoint given on top
    model_args = RegressionModelArguments(
        model_name_or_path=str(tmp_path / "mlm"), config_name=str(TINY_CONFIG)
    )
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, use_cpu=True)
    loaded_tokenizer = load_tokenizer(model_args, None)
    train = pd.DataFrame({"canonical_smiles": smiles, "label": np.linspace(0, 3, len(smiles))})
    factory = ModelFactory.create(model_args, PeftOptions(), loaded_tokenizer, train, training_args)
    model = factory.build()
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    encoder, reference = model.molformer.state_dict(), mlm.molformer.state_dict()
    assert encoder.keys() == reference.keys()
    assert all(torch.equal(encoder[k], reference[k]) for k in encoder)
    assert model.config.target_mean == pytest.approx(1.5) and model.config.regression_head == "molformer"


def test_capped_splits_keep_their_first_molecules(caplog):
    frames = {
        name: pd.DataFrame({"row": np.arange(10) + offset})
        for name, offset in (("validation", 0), ("test", 100))
    }
    with caplog.at_level("INFO", logger="molft.regression"):
        cap_splits(frames, {"validation": 3, "test": None})
    assert frames["validation"]["row"].tolist() == [0, 1, 2]
    assert len(frames["test"]) == 10
    assert "Using the first 3 of the 10 validation molecules." in caplog.messages
    cap_splits(frames, {"test": 50})  # a cap above the size changes nothing
    assert len(frames["test"]) == 10
