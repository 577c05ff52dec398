"""The pretrained small MoLFormer committed under models/: it loads as users load it and knows chemistry.

Masked-LM accuracy is measured the way a user measures it, `run_mlm.py` in evaluation-only mode on 500
Lipophilicity molecules (none of which was in the pretraining corpus), with the same fixed masks for the shipped
weights and for a freshly initialised model of the same config and tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

import modeling_molformer  # noqa: F401  (registers MoLFormer with the Auto classes)
from molft.data import embedded_lipophilicity_path, read_table

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "molformer-1m-cpu"
ENV_THREADS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(*args: str | Path) -> None:
    result = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env={**os.environ, **ENV_THREADS},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_loads_through_auto_model_for_masked_lm_and_predicts_tokens():
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForMaskedLM.from_pretrained(MODEL).eval()
    smiles = read_table(embedded_lipophilicity_path())["smiles"].iloc[0]
    batch = tokenizer([smiles], return_tensors="pt")
    assert tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert (MODEL / "README.md").is_file()


@pytest.fixture(scope="module")
def masked_lm_accuracy(tmp_path_factory) -> dict[str, float]:
    tmp = tmp_path_factory.mktemp("shipped")
    molecules = tmp / "lipophilicity_500.csv"
    read_table(embedded_lipophilicity_path())[["smiles"]].iloc[:500].to_csv(molecules, index=False)
    common = [
        "--validation_file",
        molecules,
        "--do_train",
        "false",
        "--do_eval",
        "true",
        "--report_to",
        "none",
    ]
    run_script("run_mlm.py", "--model_name_or_path", MODEL, *common, "--output_dir", tmp / "shipped")
    run_script(
        "run_mlm.py", "--config_name", MODEL / "config.json", "--tokenizer_name", MODEL, "--seed", "42",
        *common, "--output_dir", tmp / "fresh",
    )  # fmt: skip
    return {
        name: json.loads((tmp / name / "all_results.json").read_text())["eval_masked_accuracy"]
        for name in ("shipped", "fresh")
    }


def test_masked_lm_accuracy_on_lipophilicity_is_far_above_a_fresh_model(masked_lm_accuracy):
    assert masked_lm_accuracy["fresh"] < 0.2
    assert masked_lm_accuracy["shipped"] > 0.6
    assert masked_lm_accuracy["shipped"] > 3 * masked_lm_accuracy["fresh"]


def test_regression_script_fine_tunes_from_it(tmp_path):
    run_script(
        "run_regression.py", "configs/regression_small.yaml",
        "--model_name_or_path", MODEL,
        "--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32", "--max_predict_samples", "32",
        "--output_dir", tmp_path / "run",
    )  # fmt: skip
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert (predictions["split"] == "test").sum() == 32
    assert torch.isfinite(torch.tensor(results["test_rmse"]))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    shipped = json.loads((MODEL / "config.json").read_text())
    assert config["hidden_size"] == shipped["hidden_size"]  # the backbone came from models/, not from scratch
