"""Helpers shared by the script tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch

from configuration_molformer import MolformerConfig
from molft.chem import canonical_smiles
from molft.files import SPLIT_FILE
from molft.io import read_json

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "molformer-tiny.json"


MICRO_FIELDS = dict(
    vocab_size=24,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    num_random_features=12,
    max_position_embeddings=8,
)


def micro_config(**overrides) -> MolformerConfig:
    """The modeling tests' MoLFormer: two layers, two heads of 8, 12 random features (two orthogonal blocks,
    truncated), a rotary table of 8; `overrides` change single fields."""
    return MolformerConfig(**{**MICRO_FIELDS, **overrides})


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


def run_and_pool_files(data_dir: Path, tmp: Path, n_dataset: int, n_pool: int) -> tuple[Path, Path]:
    """The first `n_dataset` Lipophilicity rows (a run's dataset) and `n_pool` external molecules (its pool)."""
    train_file = head_copy(data_dir / "lipophilicity.csv", tmp / f"lipophilicity_{n_dataset}.csv", n_dataset)
    return train_file, head_copy(data_dir / "external_300.csv", tmp / "pool.csv", n_pool)


def pool_rows_in_split(pool_file: Path, run_dir: Path) -> list[int]:
    """Positions of the pool molecules that are in the run's validation or test split (its split.json)."""
    split = read_json(run_dir / SPLIT_FILE)
    heldout_smiles = set(split["smiles"]["validation"]) | set(split["smiles"]["test"])
    pool = pd.read_csv(pool_file)
    return [i for i, smi in enumerate(pool["SMILES"]) if canonical_smiles(smi) in heldout_smiles]


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


def write_smiles(path: Path, smiles: list[str], column: str = "smiles") -> Path:
    """A one-column csv of `smiles` (the shape run_mlm.py and molft.mlm_corpus read)."""
    pd.DataFrame({column: smiles}).to_csv(path, index=False)
    return path


def launch_two_processes(script: str, *args: str | Path | int) -> subprocess.CompletedProcess[str]:
    """`script` (run_regression.py, run_mlm.py) with `args` as two DDP processes on the CPU; asserts success.

    `accelerate launch --cpu --num_processes 2` starts ONE process (its CPU launcher needs mpirun for more);
    --multi_gpu starts two through torchrun, which with --use_cpu train on the CPU over gloo.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / script),
        *map(str, args),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


TINY_RUN = ["configs/regression_tiny.yaml", "--max_steps", "2", "--logging_steps", "1", "--do_predict"]


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python <args>` from the repository root, as a user runs a script, on one thread; asserts success."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def lora_round_trip(
    base: Path, config, out: Path, smiles: list[str], tokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, predictions after reload) of a LoRA adapter on the model saved at `base`, its B matrices
    random so the adapter changes outputs, saved to `out` with the run's `config` beside it."""
    from modeling_molformer_reg import MolformerForRegression
    from molft.peft_setup import PeftOptions, apply_peft, load_regression_checkpoint

    adapted = apply_peft(MolformerForRegression.from_pretrained(base), PeftOptions(peft="lora"))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_()
    adapted.eval()
    expected = adapted.predict(smiles, tokenizer)
    adapted.save_pretrained(out)
    config.save_pretrained(out)
    return expected, load_regression_checkpoint(out).eval().predict(smiles, tokenizer)
