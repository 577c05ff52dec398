"""run_mlm.py end to end on tiny models and small corpora (CPU, no network, seconds per run)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch

import modeling_molformer_reg
import run_mlm
from molft.chem import canonical_smiles
from molft.data import dataset_fingerprint, load_raw_dataset, prepare_molecules
from molft.io import DONE_MARKER, read_json
from molft.splits import make_split, read_split_smiles, save_split
from tokenization_molformer import MolformerTokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "pretrain_chembl30_zinc_120k.csv"
TINY_CONFIG = ROOT / "configs" / "molformer-tiny.json"

FAST_TRAINING = [
    "--report_to", "none",
    "--use_cpu", "true",
    "--dataloader_num_workers", "0",
    "--disable_tqdm", "true",
    "--seed", "0",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "64",
    "--save_strategy", "no",
    "--logging_steps", "5",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run faster on one thread, and much faster than two on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus_smiles() -> list[str]:
    if not CORPUS.is_file():
        pytest.skip(f"pretraining corpus not found at {CORPUS}")
    return pd.read_csv(CORPUS, nrows=400)["smiles"].tolist()


def write_smiles(path: Path, smiles: list[str], column: str = "smiles") -> Path:
    pd.DataFrame({column: smiles}).to_csv(path, index=False)
    return path


def run_main(*args: str | Path) -> dict[str, float]:
    with patch.object(sys, "argv", ["run_mlm.py", *map(str, args)]):
        return run_mlm.main()


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, corpus_smiles) -> tuple[Path, dict[str, float]]:
    tmp = tmp_path_factory.mktemp("scratch")
    train_file = write_smiles(tmp / "train.csv", corpus_smiles[:200])
    output_dir = tmp / "out"
    metrics = run_main(
        *FAST_TRAINING,
        "--config_name", TINY_CONFIG,
        "--train_file", train_file,
        "--validation_split_percentage", "20",
        "--output_dir", output_dir,
        "--do_train", "--do_eval",
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch",
        "--save_total_limit", "1",
        "--load_best_model_at_end", "true",
        "--early_stopping_patience", "3",
        "--num_train_epochs", "6",
        "--learning_rate", "3e-3",
    )  # fmt: skip
    return output_dir, metrics


def test_from_scratch_lowers_eval_loss_and_writes_a_checkpoint(scratch_run):
    output_dir, metrics = scratch_run
    tokenizer = MolformerTokenizer.from_pretrained(output_dir)
    # an untrained model predicts close to uniformly over the vocabulary
    assert metrics["eval_initial_loss"] == pytest.approx(math.log(len(tokenizer)), abs=0.3)
    assert metrics["eval_loss"] < metrics["eval_initial_loss"] - 0.8
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0.2 < metrics["eval_masked_accuracy"] <= 1.0
    summary = read_json(output_dir / run_mlm.DATA_SUMMARY_FILE)
    assert (summary["n_train"], summary["n_validation"]) == (160, 40)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) and config["pad_token_id"] == tokenizer.pad_token_id
    for name in ("model.safetensors", "tokenizer.json", "README.md", run_mlm.LOSS_CURVE_FILE, DONE_MARKER):
        assert (output_dir / name).is_file(), name
    assert read_json(output_dir / DONE_MARKER)["metrics"]["eval_loss"] == metrics["eval_loss"]


def test_best_epoch_is_kept_and_evaluation_masks_are_fixed(scratch_run):
    output_dir, metrics = scratch_run
    state = read_json(output_dir / "trainer_state.json")
    epoch_losses = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(epoch_losses) == 6  # one per epoch (the state is saved before the final evaluation)
    # the final evaluation re-scores the reloaded best epoch on the same masks, so it matches exactly
    assert metrics["eval_loss"] == pytest.approx(min(epoch_losses), abs=1e-6)
    assert state["best_metric"] == pytest.approx(metrics["eval_loss"], abs=1e-6)


def test_evaluation_masks_do_not_depend_on_batching(corpus_smiles):
    tokenizer = MolformerTokenizer.from_smiles(corpus_smiles)
    collator = run_mlm.mlm_collator(tokenizer, run_mlm.DataTrainingArguments())
    eval_items = list(run_mlm.encode_smiles(corpus_smiles[:64], tokenizer, 202, mask_seed=7))
    train_items = list(run_mlm.encode_smiles(corpus_smiles[:64], tokenizer, 202))
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


def test_output_loads_as_regression_model_with_only_a_new_head(scratch_run):
    output_dir, _ = scratch_run
    model, info = modeling_molformer_reg.MolformerForRegression.from_pretrained(
        output_dir, output_loading_info=True
    )
    assert info["missing_keys"] and all(key.startswith("classifier.") for key in info["missing_keys"])
    assert all(key.startswith("lm_head.") for key in info["unexpected_keys"])
    mlm = run_mlm.AutoModelForMaskedLM.from_pretrained(output_dir)
    for name, tensor in mlm.molformer.state_dict().items():
        torch.testing.assert_close(model.molformer.state_dict()[name], tensor)


def test_masking_statistics_follow_the_flags(corpus_smiles):
    tokenizer = MolformerTokenizer.from_smiles(corpus_smiles)
    data_args = run_mlm.DataTrainingArguments(
        mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1
    )
    collator = run_mlm.mlm_collator(tokenizer, data_args)
    dataset = run_mlm.encode_smiles(corpus_smiles, tokenizer, data_args.max_seq_length)
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
    assert not torch.isin(masked[selected], torch.tensor(tokenizer.all_special_ids)).logical_and(
        masked[selected] != tokenizer.mask_token_id
    ).any()


def test_smiles_enumeration_changes_strings_not_molecules(corpus_smiles):
    smiles = [canonical_smiles(s) for s in corpus_smiles[:20]]
    variants = run_mlm.randomised_smiles(smiles, seed=3)
    assert variants == run_mlm.randomised_smiles(smiles, seed=3)  # seeded
    assert sum(v != s for v, s in zip(variants, smiles, strict=True)) >= 15
    assert [canonical_smiles(v) for v in variants] == smiles
    tokenizer = MolformerTokenizer.from_smiles(smiles + variants)
    dataset = run_mlm.encode_smiles(smiles, tokenizer, 202, randomise=True)
    collator = run_mlm.mlm_collator(tokenizer, run_mlm.DataTrainingArguments(mlm_probability=0.0))
    torch.manual_seed(0)
    first = collator([dataset[i] for i in range(len(dataset))])["input_ids"]
    second = collator([dataset[i] for i in range(len(dataset))])["input_ids"]
    assert not torch.equal(first, second)  # a new random SMILES every time a molecule is drawn
    decoded = tokenizer.batch_decode(first, skip_special_tokens=True)
    assert [canonical_smiles(s.replace(" ", "")) for s in decoded] == smiles


def test_heldout_molecules_are_removed_and_logged(corpus_smiles, tmp_path, caplog):
    train = corpus_smiles[:100]
    heldout = corpus_smiles[100:130]
    leaked = heldout[:10]
    train_file = write_smiles(tmp_path / "train.csv", train + leaked)
    exclude_file = write_smiles(tmp_path / "heldout.csv", heldout, column="SMILES")
    output_dir = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="molft.data"):
        run_main(
            "--config_name", TINY_CONFIG,
            "--train_file", train_file,
            "--exclude_files", exclude_file,
            "--validation_split_percentage", "0",
            "--output_dir", output_dir,
            "--do_train", "--max_steps", "1",
            *FAST_TRAINING,
        )  # fmt: skip
    summary = read_json(output_dir / run_mlm.DATA_SUMMARY_FILE)
    assert summary["n_read"] == 110
    assert summary["heldout_overlap"] == {str(exclude_file): 10, "dropped": 10}
    assert summary["n_train"] == 100
    assert summary["corpus_fingerprint"] == dataset_fingerprint(sorted(canonical_smiles(s) for s in train))
    warning = next(r.getMessage() for r in caplog.records if "held-out" in r.getMessage())
    assert "10 of 110" in warning and canonical_smiles(leaked[0]) in warning


@pytest.fixture(scope="module")
def lipophilicity_split(tmp_path_factory) -> Path:
    try:
        raw = load_raw_dataset("lipophilicity")
    except Exception as err:  # no embedded copy and no Hub
        pytest.skip(f"Lipophilicity not available offline: {err}")
    frame = prepare_molecules(raw.frames["all"], "smiles", "exp", source=raw.source)
    path = tmp_path_factory.mktemp("split") / "split.json"
    save_split(path, frame, make_split(frame, "random", seed=0), dataset_source=raw.source)
    return path


def test_lipophilicity_adaptation_uses_only_training_molecules(lipophilicity_split, tmp_path):
    split = read_split_smiles(lipophilicity_split)
    new = ["CCOC(=O)c1ccccc1N", "CC(C)Cc1ccc(C(C)C(=O)O)cc1"]  # not in Lipophilicity
    include_file = write_smiles(tmp_path / "extra.csv", split["test"][:3] + split["validation"][:2] + new)
    output_dir = tmp_path / "out"
    run_main(
        "--config_name", TINY_CONFIG,
        "--dataset_name", "lipophilicity",
        "--split_file", lipophilicity_split,
        "--include_file", include_file,
        "--validation_split_percentage", "10",
        "--output_dir", output_dir,
        "--do_train", "--max_steps", "1",
        *FAST_TRAINING,
    )  # fmt: skip
    summary = read_json(output_dir / run_mlm.DATA_SUMMARY_FILE)
    expected = sorted(set(split["train"]) | {canonical_smiles(s) for s in new})
    assert summary["corpus_fingerprint"] == dataset_fingerprint(expected)
    assert summary["heldout_overlap"]["dropped"] == 5
    assert summary["heldout_overlap"][f"{lipophilicity_split} (test)"] == 3
    assert summary["n_train"] + summary["n_validation"] == len(expected) == 3360 + 2


def test_lipophilicity_without_split_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs --split_file"):
        run_main("--config_name", TINY_CONFIG, "--dataset_name", "lipophilicity", "--output_dir", tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("smiles\n", "holds no rows"),
        ("name,value\nethanol,1\n", "No SMILES column found in .*bad.csv"),
        (
            "smiles\nCCO\nC1CC\nc1ccccc1\n",
            r"bad.csv: 1 SMILES could not be parsed by RDKit \(row 1: 'C1CC'\)",
        ),
    ],
    ids=["empty-file", "header-only", "missing-column", "invalid-smiles-strict"],
)
def test_bad_corpus_gives_a_clear_error(tmp_path, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        run_main(
            "--config_name", TINY_CONFIG,
            "--train_file", bad,
            "--strict_smiles", "true",
            "--output_dir", tmp_path / "out",
            "--do_train",
            *FAST_TRAINING,
        )  # fmt: skip


def test_invalid_smiles_are_dropped_and_counted(tmp_path, caplog):
    train_file = tmp_path / "train.smi"
    train_file.write_text("smiles\nCCO ethanol\nC1CC\n\nc1ccccc1 benzene\nnot_a_smiles\nCCN\n")
    data_args = run_mlm.DataTrainingArguments(train_file=str(train_file), validation_split_percentage=0)
    with caplog.at_level(logging.WARNING, logger="molft.data"):
        corpus = run_mlm.prepare_corpus(data_args, seed=0)
    assert sorted(corpus.train) == sorted(["CCO", "c1ccccc1", "CCN"])
    assert corpus.summary["n_read"] == 3
    assert any("dropping 2 of 5 rows" in r.getMessage() for r in caplog.records)


def test_occupied_output_dir_without_checkpoint_is_refused(tmp_path, corpus_smiles):
    (tmp_path / "notes.txt").write_text("someone else's files")
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:20])
    with pytest.raises(ValueError, match="not empty and holds no checkpoint"):
        run_main(
            "--config_name", TINY_CONFIG, "--train_file", train_file, "--output_dir", tmp_path, "--do_train"
        )


def test_interrupted_run_resumes_and_finished_run_is_protected(tmp_path, corpus_smiles, caplog):
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:40])
    output_dir = tmp_path / "out"
    args = [
        *FAST_TRAINING,
        "--config_name", TINY_CONFIG,
        "--train_file", train_file,
        "--validation_split_percentage", "0",
        "--output_dir", output_dir,
        "--do_train",
        "--save_strategy", "steps",
        "--save_steps", "2",
    ]  # fmt: skip
    run_main(*args, "--max_steps", "2")
    with pytest.raises(ValueError, match="already holds a finished run"):
        run_main(*args, "--max_steps", "4")
    (output_dir / DONE_MARKER).unlink()  # as if the run had died after its checkpoint
    with caplog.at_level(logging.INFO, logger="run_mlm"):
        run_main(*args, "--max_steps", "4")
    assert any(
        "resuming training at" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records
    )
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 4
    assert (output_dir / DONE_MARKER).is_file()


def test_validation_split_is_seeded_and_disjoint(corpus_smiles, tmp_path):
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:50] + corpus_smiles[:5])
    data_args = run_mlm.DataTrainingArguments(train_file=str(train_file), validation_split_percentage=10)
    first, second = run_mlm.prepare_corpus(data_args, seed=1), run_mlm.prepare_corpus(data_args, seed=1)
    assert first.train == second.train and first.validation == second.validation
    assert len(first.validation) == 5 and len(first.train) == 45  # 5 repeats dropped, ceil(10% of 50)
    assert not set(first.train) & set(first.validation)
    assert first.summary["duplicates_dropped"] == 5
    assert np.unique(first.train).size == 45


def test_validation_file_molecules_are_not_trained_on(corpus_smiles, tmp_path, caplog):
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:30])
    validation_file = write_smiles(tmp_path / "validation.csv", corpus_smiles[25:35])
    data_args = run_mlm.DataTrainingArguments(
        train_file=str(train_file), validation_file=str(validation_file)
    )
    with caplog.at_level(logging.WARNING, logger="run_mlm"):
        corpus = run_mlm.prepare_corpus(data_args, seed=0)
    validation = {canonical_smiles(s) for s in corpus_smiles[25:35]}
    assert set(corpus.validation) == validation
    assert set(corpus.train) == {canonical_smiles(s) for s in corpus_smiles[:25]}
    assert corpus.summary["validation_overlap_dropped"] == 5
    assert any("5 training molecules are also in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("recipe", ["mlm_pretrain_small.yaml", "mlm_adapt_lipophilicity.yaml"])
def test_recipes_parse_and_are_consistent(recipe):
    model_args, data_args, training_args = run_mlm.parse_args(
        (run_mlm.ModelArguments, run_mlm.DataTrainingArguments, run_mlm.TrainingArguments),
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
