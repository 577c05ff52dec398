"""run_mlm.py end to end on tiny models and small corpora (CPU, no network, seconds per run)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from helpers import TINY_CONFIG, launch_two_processes, single_thread, write_smiles  # noqa: F401  (autouse fixture)
from huggingface_hub import constants
from transformers import AutoModelForMaskedLM

import modeling_molformer  # noqa: F401  (registers MoLFormer with the Auto classes)
import modeling_molformer_reg
import run_mlm
from molft.chem import canonical_smiles
from molft.data import load_raw_dataset, prepare_molecules
from molft.files import DONE_MARKER, MLM_DATA_SUMMARY_FILE, MLM_LOSS_CURVE_FILE
from molft.io import read_json
from molft.overlap import dataset_fingerprint
from molft.preflight import PreflightError
from molft.splits import make_split, read_split_smiles, save_split
from tokenization_molformer import MolformerTokenizer

ROOT = Path(__file__).resolve().parents[1]

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


def run_main(*args: str | Path) -> dict[str, float]:
    with patch.object(sys, "argv", ["run_mlm.py", *map(str, args)]):
        return run_mlm.main()


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, corpus_smiles) -> tuple[Path, dict[str, float], str]:
    """A run from scratch with early stopping; returns its folder, metrics and what it printed."""
    tmp = tmp_path_factory.mktemp("scratch")
    train_file = write_smiles(tmp / "train.csv", corpus_smiles[:200])
    output_dir = tmp / "out"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):  # the script logs to stdout, at INFO by default
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
    return output_dir, metrics, console.getvalue()


def test_from_scratch_lowers_eval_loss_and_writes_a_checkpoint(scratch_run):
    output_dir, metrics, _ = scratch_run
    tokenizer = MolformerTokenizer.from_pretrained(output_dir)
    # an untrained model predicts close to uniformly over the vocabulary
    assert metrics["eval_initial_loss"] == pytest.approx(math.log(len(tokenizer)), abs=0.3)
    assert metrics["eval_loss"] < metrics["eval_initial_loss"] - 0.8
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0.2 < metrics["eval_masked_accuracy"] <= 1.0
    summary = read_json(output_dir / MLM_DATA_SUMMARY_FILE)
    assert (summary["n_train"], summary["n_validation"]) == (160, 40)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) and config["pad_token_id"] == tokenizer.pad_token_id
    for name in ("model.safetensors", "tokenizer.json", "README.md", MLM_LOSS_CURVE_FILE, DONE_MARKER):
        assert (output_dir / name).is_file(), name
    assert read_json(output_dir / DONE_MARKER)["metrics"]["eval_loss"] == metrics["eval_loss"]


def test_best_epoch_is_kept_and_evaluation_masks_are_fixed(scratch_run):
    output_dir, metrics, _ = scratch_run
    state = read_json(output_dir / "trainer_state.json")
    epoch_losses = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(epoch_losses) == 6  # one per epoch (the state is saved before the final evaluation)
    # the final evaluation re-scores the reloaded best epoch on the same masks, so it matches exactly
    assert metrics["eval_loss"] == pytest.approx(min(epoch_losses), abs=1e-6)
    assert state["best_metric"] == pytest.approx(metrics["eval_loss"], abs=1e-6)


def test_output_loads_as_regression_model_with_only_a_new_head(scratch_run):
    output_dir, _, _ = scratch_run
    model, info = modeling_molformer_reg.MolformerForRegression.from_pretrained(
        output_dir, output_loading_info=True
    )
    assert info["missing_keys"] and all(key.startswith("classifier.") for key in info["missing_keys"])
    assert all(key.startswith("lm_head.") for key in info["unexpected_keys"])
    mlm = AutoModelForMaskedLM.from_pretrained(output_dir)
    for name, tensor in mlm.molformer.state_dict().items():
        torch.testing.assert_close(model.molformer.state_dict()[name], tensor)


def test_console_and_result_files_follow_the_examples(scratch_run):
    output_dir, metrics, console = scratch_run
    for message in (
        "New model from",
        "Best model restored: checkpoint-",
        f"Outputs are in {output_dir.resolve()}",
    ):
        assert message in console, message
    for split in ("train", "eval"):
        saved = read_json(output_dir / f"{split}_results.json")
        assert saved[f"{split}_loss"] == metrics[f"{split}_loss"], split
    assert read_json(output_dir / "all_results.json")["eval_loss"] == metrics["eval_loss"]


def test_offline_default_model_fails_fast_and_names_the_offline_route(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    train_file = write_smiles(tmp_path / "train.csv", ["CCO", "CCN"])
    with pytest.raises(PreflightError) as err:
        run_main(
            "--train_file", train_file, "--output_dir", tmp_path / "out", "--do_train",
            "--cache_dir", tmp_path / "empty_cache",
        )  # fmt: skip
    assert "'ibm/MoLFormer-XL-both-10pct'" in str(err.value)  # the default model, unless --config_name
    assert "python run_mlm.py configs/mlm_pretrain_small.yaml" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]


def test_heldout_molecules_are_removed_and_logged(corpus_smiles, tmp_path, capsys):
    train = corpus_smiles[:100]
    heldout = corpus_smiles[100:130]
    leaked = heldout[:10]
    train_file = write_smiles(tmp_path / "train.csv", train + leaked)
    exclude_file = write_smiles(tmp_path / "heldout.csv", heldout, column="SMILES")
    output_dir = tmp_path / "out"
    run_main(
        "--config_name", TINY_CONFIG,
        "--train_file", train_file,
        "--exclude_files", exclude_file,
        "--validation_split_percentage", "0",
        "--output_dir", output_dir,
        "--do_train", "--max_steps", "1",
        *FAST_TRAINING,
    )  # fmt: skip
    summary = read_json(output_dir / MLM_DATA_SUMMARY_FILE)
    assert summary["n_read"] == 110
    assert summary["heldout_overlap"] == {str(exclude_file): 10, "dropped": 10}
    assert summary["n_train"] == 100
    assert summary["corpus_fingerprint"] == dataset_fingerprint(sorted(canonical_smiles(s) for s in train))
    # the script logs to stdout (transformers-examples style), which is what a user sees
    log = capsys.readouterr().out.splitlines()
    warning = next(line for line in log if " - WARNING - molft.overlap - " in line and "held-out" in line)
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
    summary = read_json(output_dir / MLM_DATA_SUMMARY_FILE)
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
            r"bad.csv: 1 SMILES could not be parsed by RDKit( as written)? \(row 1: 'C1CC'",
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


def test_occupied_output_dir_without_checkpoint_is_refused(tmp_path, corpus_smiles):
    (tmp_path / "notes.txt").write_text("someone else's files")
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:20])
    with pytest.raises(ValueError, match="not empty and holds no checkpoint"):
        run_main(
            "--config_name", TINY_CONFIG, "--train_file", train_file, "--output_dir", tmp_path, "--do_train"
        )


def test_interrupted_run_resumes_and_finished_run_is_protected(tmp_path, corpus_smiles, capsys):
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
    capsys.readouterr()
    run_main(*args, "--max_steps", "4")  # logs at info level by default (log_level passive)
    assert any(
        "Resuming from" in line and "checkpoint-2" in line  # the regression script's words, since #13
        for line in capsys.readouterr().out.splitlines()
    )
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 4
    assert (output_dir / DONE_MARKER).is_file()


@pytest.mark.slow
def test_accelerate_launch_with_two_processes(tmp_path, corpus_smiles):
    """DDP on the CPU (torchrun over gloo): both ranks train, rank 0 alone writes, and the losses keep their
    scale: the Trainer multiplies a loss by the number of processes when the model takes `num_items_in_batch`,
    which doubled every loss while the model ignored it."""
    train_file = write_smiles(tmp_path / "train.csv", corpus_smiles[:200])  # 160 train, 40 validation
    out = tmp_path / "ddp"
    data = [*FAST_TRAINING, "--train_file", train_file, "--validation_split_percentage", "20"]
    done = launch_two_processes(
        "run_mlm.py",
        *data, "--config_name", TINY_CONFIG, "--output_dir", out, "--do_train", "--do_eval",
        "--max_steps", "4", "--per_device_eval_batch_size", "1", "--log_level", "info", "--log_level_replica", "info",
    )  # fmt: skip
    results = read_json(out / "all_results.json")
    assert results["train_samples"] == 160 and results["eval_samples"] == 40
    assert read_json(out / "trainer_state.json")["global_step"] == 4
    assert (out / DONE_MARKER).is_file() and not list(out.rglob("*.tmp"))
    log = done.stdout + done.stderr
    # the same vocabulary on both ranks
    assert log.count("Vocabulary of 38 tokens built from 160 training molecules") == 2
    assert "Total train batch size (w. parallel, distributed & accumulation) = 32" in log  # 2 x 16
    assert log.count("Saving model checkpoint to") == 1 and log.count(MLM_LOSS_CURVE_FILE) == 1
    # four steps leave the loss near that of uniform guessing over 38 tokens, not twice it
    assert abs(results["train_loss"] - math.log(38)) < 0.5
    # one process, batches of 2, sees the molecule pairs the two processes saw in each evaluation step
    single = run_main(
        *data, "--per_device_eval_batch_size", "2", "--model_name_or_path", out, "--output_dir", tmp_path / "eval",
        "--do_eval",
    )  # fmt: skip
    # (padding a lone molecule to its pair's length changes only rounding)
    assert single["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-4)


def test_evaluation_only_run_scores_a_checkpoint_on_a_file(scratch_run, corpus_smiles, tmp_path):
    """do_train false with --validation_file: no training corpus needed, the same eval_loss as the run's own."""
    output_dir, metrics, _ = scratch_run
    molecules = write_smiles(tmp_path / "molecules.csv", corpus_smiles[200:260])
    first = run_main(
        *FAST_TRAINING,
        "--model_name_or_path", output_dir,
        "--validation_file", molecules,
        "--do_train", "false", "--do_eval", "true",
        "--output_dir", tmp_path / "eval_a",
    )  # fmt: skip
    again = run_main(
        *FAST_TRAINING,
        "--model_name_or_path", output_dir,
        "--validation_file", molecules,
        "--do_train", "false", "--do_eval", "true",
        "--output_dir", tmp_path / "eval_b",
    )  # fmt: skip
    assert math.isfinite(first["eval_loss"]) and 0 < first["eval_masked_accuracy"] <= 1
    assert first["eval_loss"] == again["eval_loss"]  # fixed evaluation masks: repeatable
    assert first["eval_samples"] == 60
    assert read_json(tmp_path / "eval_a" / MLM_DATA_SUMMARY_FILE)["n_train"] == 0
    assert not (tmp_path / "eval_a" / "model.safetensors").exists()
