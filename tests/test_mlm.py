"""molft.mlm and molft.mlm_corpus: the MLM options, corpus selection, enumeration, masking and loss curve."""

from __future__ import annotations

import logging
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, write_smiles
from transformers import TrainingArguments

from molft import mlm_corpus
from molft.arguments import DEFAULT_MODEL
from molft.augment import randomised_smiles
from molft.chem import canonical_smiles
from molft.cli import parse_args
from molft.mlm import (
    MlmDataArguments,
    MlmModelArguments,
    encode_smiles,
    mlm_collator,
    plot_loss_curve,
)
from molft.mlm_corpus import prepare_corpus
from tokenization_molformer import MolformerTokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_evaluation_masks_do_not_depend_on_batching(corpus_smiles):
    tokenizer = MolformerTokenizer.from_smiles(corpus_smiles)
    collator = mlm_collator(tokenizer, MlmDataArguments())
    eval_items = list(encode_smiles(corpus_smiles[:64], tokenizer, 202, mask_seed=7))
    train_items = list(encode_smiles(corpus_smiles[:64], tokenizer, 202))
    rng_state = torch.get_rng_state()
    whole = collator(eval_items)
    regrouped = collator(eval_items[40:][::-1])  # another batch, another order (length-grouped samplers)
    assert torch.equal(torch.get_rng_state(), rng_state)  # dropout and feature redraws are not reset
    for position, index in enumerate(range(63, 39, -1)):
        n = len(eval_items[index]["input_ids"])
        for key in ("input_ids", "labels"):
            assert torch.equal(whole[key][index, :n], regrouped[key][position, :n])
        assert (regrouped["labels"][position, n:] == -100).all()
        assert (regrouped["input_ids"][position, n:] == tokenizer.pad_token_id).all()
    assert (whole["labels"] != -100).float().mean() > 0.05  # masks exist at all
    assert not torch.equal(collator(train_items)["labels"], collator(train_items)["labels"])


def test_masking_statistics_follow_the_flags(corpus_smiles):
    tokenizer = MolformerTokenizer.from_smiles(corpus_smiles)
    data_args = MlmDataArguments(mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1)
    collator = mlm_collator(tokenizer, data_args)
    dataset = encode_smiles(corpus_smiles, tokenizer, data_args.max_seq_length)
    torch.manual_seed(0)
    original, masked, labels = [], [], []
    for _ in range(3):  # ~50k tokens
        batch = collator([dataset[i] for i in range(len(dataset))])
        padded = tokenizer.pad([dataset[i] for i in range(len(dataset))], return_tensors="pt")["input_ids"]
        original.append(padded.flatten())
        masked.append(batch["input_ids"].flatten())
        labels.append(batch["labels"].flatten())
    original, masked, labels = torch.cat(original), torch.cat(masked), torch.cat(labels)
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    selected = labels != -100
    assert not (selected & special).any()  # <bos>, <eos>, <pad> are never selected ...
    assert torch.equal(masked[special], original[special])  # ... nor changed
    assert torch.equal(labels[selected], original[selected])
    assert selected[~special].float().mean().item() == pytest.approx(0.15, abs=0.01)
    n = selected.sum().item()
    to_mask = (masked[selected] == tokenizer.mask_token_id).sum().item() / n
    unchanged = (masked[selected] == original[selected]).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.02)  # includes random draws of the original token (1/V)
    assert 1 - to_mask - unchanged == pytest.approx(0.1, abs=0.02)
    # a random replacement is never a special token: a <pad> at a real position gives an all-zero row whose
    # LayerNorm backward (eps 1e-12) overflows to NaN
    assert (
        not torch.isin(masked[selected], torch.tensor(tokenizer.all_special_ids))
        .logical_and(masked[selected] != tokenizer.mask_token_id)
        .any()
    )


def test_smiles_enumeration_changes_strings_not_molecules(corpus_smiles):
    smiles = [canonical_smiles(s) for s in corpus_smiles[:20]]
    variants = randomised_smiles(smiles, seed=3)
    assert variants == randomised_smiles(smiles, seed=3)  # seeded
    assert sum(v != s for v, s in zip(variants, smiles, strict=True)) >= 15
    assert [canonical_smiles(v) for v in variants] == smiles
    tokenizer = MolformerTokenizer.from_smiles(smiles + variants)
    dataset = encode_smiles(smiles, tokenizer, 202, randomise=True)
    collator = mlm_collator(tokenizer, MlmDataArguments(mlm_probability=0.0))
    torch.manual_seed(0)
    first = collator([dataset[i] for i in range(len(dataset))])["input_ids"]
    second = collator([dataset[i] for i in range(len(dataset))])["input_ids"]
    assert not torch.equal(first, second)  # a new random SMILES every time a molecule is drawn
    decoded = tokenizer.batch_decode(first, skip_special_tokens=True)
    assert [canonical_smiles(s.replace(" ", "")) for s in decoded] == smiles


def test_invalid_smiles_are_dropped_and_counted(tmp_path, caplog):
    train_file = tmp_path / "train.smi"
    train_file.write_text("smiles\nCCO ethanol\nC1CC\n\nc1ccccc1 benzene\nnot_a_smiles\nCCN\n")
    data_args = MlmDataArguments(train_file=str(train_file), validation_split_percentage=0)
    with caplog.at_level(logging.WARNING, logger="molft.data"):
        corpus = prepare_corpus(data_args, seed=0)
    assert sorted(corpus.train) == sorted(["CCO", "c1ccccc1", "CCN"])
    assert corpus.summary["n_read"] == 3
    assert any("dropping 2 of 5 rows" in r.getMessage() for r in caplog.records)


def test_validation_split_is_seeded_and_disjoint(corpus_smiles, tmp_path):
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:50] + corpus_smiles[:5])
    data_args = MlmDataArguments(train_file=str(train_file), validation_split_percentage=10)
    first, second = prepare_corpus(data_args, seed=1), prepare_corpus(data_args, seed=1)
    assert first.train == second.train and first.validation == second.validation
    assert len(first.validation) == 5 and len(first.train) == 45  # 5 repeats dropped, ceil(10% of 50)
    assert not set(first.train) & set(first.validation)
    assert first.summary["duplicates_dropped"] == 5
    assert np.unique(first.train).size == 45


def test_validation_file_molecules_are_not_trained_on(corpus_smiles, tmp_path, caplog):
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:30])
    validation_file = write_smiles(tmp_path / "validation.csv", corpus_smiles[25:35])
    data_args = MlmDataArguments(train_file=str(train_file), validation_file=str(validation_file))
    with caplog.at_level(logging.WARNING, logger="molft.mlm_corpus"):
        corpus = prepare_corpus(data_args, seed=0)
    validation = {canonical_smiles(s) for s in corpus_smiles[25:35]}
    assert set(corpus.validation) == validation
    assert set(corpus.train) == {canonical_smiles(s) for s in corpus_smiles[:25]}
    assert corpus.summary["validation_overlap_dropped"] == 5
    assert any("5 training molecules are also in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("recipe", ["mlm_pretrain_small.yaml", "mlm_adapt_lipophilicity.yaml"])
def test_recipes_parse_and_are_consistent(recipe):
    model_args, data_args, training_args = parse_args(
        (MlmModelArguments, MlmDataArguments, TrainingArguments),
        [str(ROOT / "configs" / recipe), "--use_cpu", "true"],
    )
    assert training_args.train_sampling_strategy == "group_by_length"
    assert data_args.smiles_enumeration and data_args.early_stopping_patience
    assert training_args.load_best_model_at_end and training_args.metric_for_best_model == "eval_loss"
    if model_args.config_name is not None:  # from scratch: the config exists and the vocabulary is built
        assert (ROOT / model_args.config_name).is_file() and model_args.build_tokenizer_from_corpus
        assert data_args.exclude_files  # the downstream labelled sets are refused
    else:
        assert data_args.dataset_name == "lipophilicity" and data_args.split_file
        assert not model_args.build_tokenizer_from_corpus


def test_model_defaults_continue_the_hub_model_and_build_a_vocabulary_only_from_scratch():
    continued = MlmModelArguments()
    assert continued.model_name_or_path == DEFAULT_MODEL and not continued.build_tokenizer_from_corpus
    scratch = MlmModelArguments(config_name=str(TINY_CONFIG))
    assert scratch.model_name_or_path is None and scratch.build_tokenizer_from_corpus
    assert not MlmModelArguments(
        config_name=str(TINY_CONFIG), tokenizer_name="tok"
    ).build_tokenizer_from_corpus
    with pytest.raises(ValueError, match="different vocabulary"):
        MlmModelArguments(build_tokenizer_from_corpus=True)  # the default checkpoint has its own vocabulary
    with pytest.raises(ValueError, match="min_token_frequency"):
        MlmModelArguments(config_name=str(TINY_CONFIG), min_token_frequency=0)


class CountingChecker:
    """Counts the SMILES that molft.mlm_corpus checks with RDKit."""

    def __init__(self):
        self.calls = 0

    def __call__(self, smiles):
        self.calls += 1
        return canonical_smiles(smiles)


@pytest.mark.parametrize("with_validation_file", [False, True], ids=["split", "validation-file"])
def test_max_train_samples_checks_only_needed_rows_and_keeps_the_selection(
    corpus_smiles, tmp_path, with_validation_file
):
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:200])
    options = {"train_file": str(train_file), "validation_split_percentage": 10, "max_eval_samples": 8}
    if with_validation_file:
        options["validation_file"] = str(write_smiles(tmp_path / "valid.csv", corpus_smiles[150:170]))
    whole = prepare_corpus(MlmDataArguments(**options), seed=3)
    checker = CountingChecker()
    with patch.object(mlm_corpus, "canonical_smiles", checker):
        sampled = prepare_corpus(MlmDataArguments(**options, max_train_samples=30), seed=3)
    # the same molecules as when the whole (clean) corpus is read, from far fewer RDKit checks
    assert sampled.train == whole.train[:30] and sampled.validation == whole.validation
    if with_validation_file:  # every row up to the 30th one outside the validation file
        assert sampled.summary["validation_overlap_dropped"] == checker.calls - 30
        assert checker.calls < 60
    else:  # the 20 rows (10%) of the validation part: 8 used, so 8 checked; then 30 training rows
        assert checker.calls == 8 + 30
    assert sampled.summary["n_checked"] == checker.calls and sampled.summary["n_rows"] == 200
    assert (sampled.summary["n_train"], sampled.summary["n_validation"]) == (30, 8)


def test_rows_beyond_the_needed_ones_are_never_checked(corpus_smiles, tmp_path, caplog):
    # seeded row order: the first 5 rows in that order are valid, every other row is not a molecule
    order = np.random.default_rng(0).permutation(100)
    smiles = ["not_a_smiles"] * 100
    for k, index in enumerate(order[:5]):
        smiles[index] = corpus_smiles[k]
    train_file = write_smiles(tmp_path / "train.csv", smiles)
    data_args = MlmDataArguments(
        train_file=str(train_file), validation_split_percentage=0, max_train_samples=5, strict_smiles=True
    )
    checker = CountingChecker()
    with caplog.at_level(logging.WARNING), patch.object(mlm_corpus, "canonical_smiles", checker):
        corpus = prepare_corpus(data_args, seed=0)
    assert checker.calls == 5 and not caplog.records  # strict, yet the 95 bad rows were never read
    assert corpus.train == [canonical_smiles(s) for s in corpus_smiles[:5]]
    with pytest.raises(
        ValueError, match=r"95 SMILES could not be parsed by RDKit \(\S*train.csv row \d+: 'not_a_smiles'"
    ):
        prepare_corpus(MlmDataArguments(**{**vars(data_args), "max_train_samples": 6}), seed=0)


def test_sampled_corpus_skips_invalid_heldout_and_repeated_rows(corpus_smiles, tmp_path, caplog):
    rows = corpus_smiles[:60] + corpus_smiles[:20] + ["C1CC", "not_a_smiles"] * 10
    train_file = write_smiles(tmp_path / "train.csv", rows)
    exclude_file = write_smiles(tmp_path / "heldout.csv", corpus_smiles[40:50])
    data_args = MlmDataArguments(
        train_file=str(train_file),
        exclude_files=[str(exclude_file)],
        validation_split_percentage=10,
        max_train_samples=25,
    )
    checker = CountingChecker()
    with (
        caplog.at_level(logging.WARNING, logger="molft"),
        patch.object(mlm_corpus, "canonical_smiles", checker),
    ):
        first = prepare_corpus(data_args, seed=5)
    second = prepare_corpus(data_args, seed=5)
    assert first.train == second.train and first.validation == second.validation  # seeded
    heldout = {canonical_smiles(s) for s in corpus_smiles[40:50]}
    assert len(first.train) == 25 and len(set(first.train)) == 25
    assert not set(first.train) & (heldout | set(first.validation))
    summary = first.summary
    assert summary["n_checked"] == checker.calls < len(rows)
    n_invalid = summary["n_checked"] - summary["n_read"]
    used = summary["n_read"] - summary["heldout_overlap"]["dropped"] - summary["duplicates_dropped"]
    assert used == summary["n_corpus"] == 25 + summary["n_validation"]
    # seed 5 meets each kind of row that is skipped
    assert n_invalid and summary["heldout_overlap"]["dropped"] and summary["duplicates_dropped"]
    assert any(f"Dropping {n_invalid} checked rows" in r.getMessage() for r in caplog.records)


def test_loss_curve_starts_at_the_baseline_and_shows_masked_accuracy(tmp_path, caplog):
    history = [
        {"eval_initial_loss": 4.0, "step": 0},  # Trainer's record of the baseline: not a loss entry
        {"loss": 3.0, "step": 5},
        {"eval_loss": 2.5, "eval_masked_accuracy": 0.3, "step": 10},
        {"loss": 2.0, "step": 10},
    ]
    initial = {"eval_initial_loss": 4.0, "eval_initial_masked_accuracy": 0.05}
    path = tmp_path / "curve.png"
    assert plot_loss_curve(history, initial, path) and path.stat().st_size > 0
    with patch("molft.plots.save_figure") as save:
        plot_loss_curve(history, initial, path)
    loss_ax, accuracy_ax = save.call_args.args[1].axes
    train, evaluation = loss_ax.lines
    assert list(train.get_xdata()) == [5, 10] and list(evaluation.get_ydata()) == [4.0, 2.5]
    assert list(accuracy_ax.lines[0].get_xdata()) == [0, 10]
    assert list(accuracy_ax.lines[0].get_ydata()) == [0.05, 0.3]
    assert loss_ax.get_title() == "MLM loss" and "accuracy" in accuracy_ax.get_ylabel()
    with caplog.at_level(logging.INFO, logger="molft.mlm"):
        assert not plot_loss_curve(history[:1], None, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists() and "No losses were logged" in caplog.text
