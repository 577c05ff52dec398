"""benchmarks/gpu_suite.py: the whole suite runs (--smoke, CPU, tiny config) and its figures add up."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from configuration_molformer import MolformerConfig
from modeling_molformer import MolformerModel
from tokenization_molformer import MolformerTokenizer

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def load_suite():
    """benchmarks/ is no package: the suite is loaded from its file (and registered, as dataclasses need)."""
    if "gpu_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_suite"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_suite"]


def load_measure():
    """benchmarks/gpu_measure.py, as the suite imports it (loading the suite puts benchmarks/ on sys.path)."""
    load_suite()
    return importlib.import_module("gpu_measure")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(SUITE), "--smoke", "--output_dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def test_smoke_run_measures_every_section(smoke_run):
    result, _ = smoke_run
    assert result["smoke"] is True and result["skipped"] == {}
    assert set(result["section_seconds"]) == {"backbone", "finetune", "influence", "mlm", "compile"}
    backbone = result["backbone"]
    # 4 modes x 2 batch sizes x 2 batch kinds x 2 passes
    assert len(backbone) == 32
    assert {row["mode"] for row in backbone} == {"eager", "eager fused_qkv", "eager padding_free", "compile"}
    assert {(row["batches"], row["pass"]) for row in backbone} == {
        (kind, name) for kind in ("length_grouped", "padded") for name in ("forward", "forward+backward")
    }
    for row in backbone:
        assert row["molecules_per_s"] > 0 and row["tokens_per_s"] > row["molecules_per_s"]
        assert row["peak_mib"] is None and row["mfu"] is None  # CPU: no per-figure peak, no known bf16 peak
    for batch_size in (4, 8):
        overhead = {
            row["batches"]: row["padding_overhead"] for row in backbone if row["batch_size"] == batch_size
        }
        assert 0 <= overhead["length_grouped"] < overhead["padded"]


def test_smoke_run_fine_tunes_scores_and_pretrains(smoke_run):
    result, markdown = smoke_run
    finetune = {row["method"]: row for row in result["finetune"]}
    assert set(finetune) == {"full", "lora"}
    assert finetune["lora"]["trainable_params"] < finetune["full"]["trainable_params"]
    for row in finetune.values():
        assert row["train_molecules"] == 128  # the training split of the 160-molecule slice
        # --max_steps 2 measures the speed; an epoch is projected from it
        assert row["epoch_s"] == pytest.approx(row["train_molecules"] / row["molecules_per_s"])
        assert row["projected_20_epochs_min"] == pytest.approx(20 * row["epoch_s"] / 60)
    influence = {row["scope"]: row for row in result["influence"]}
    assert influence["lora"]["estimator"] == "datainf" and influence["last_k_layers"]["estimator"] == "cg"
    for row in influence.values():
        assert row["train_molecules"] == 16 and 0 < row["candidates_scored"] <= 20
        assert row["candidates_per_s"] == pytest.approx(row["candidates_scored"] / row["estimator_s"])
    assert {row["mode"] for row in result["mlm"]} == {"eager", "compile"}
    for row in result["mlm"]:
        assert row["tokens_per_s"] > 0 and 0 < row["last_loss"] < 2 * math.log(64)  # a finite, sane loss
    for title in ("## Backbone", "## Fine-tuning", "## Influence", "## Masked-LM"):
        assert title in markdown


def test_flops_count_every_matmul_of_the_encoder():
    """Per token, each Linear weight costs 2 FLOPs per entry; the attention adds 8 x H x m per layer."""
    measure = load_measure()
    config = MolformerConfig(num_hidden_layers=3, hidden_size=48, num_attention_heads=4, intermediate_size=80)
    with torch.device("meta"):
        model = MolformerModel(config)
    linear = sum(m.weight.numel() for m in model.encoder.modules() if isinstance(m, nn.Linear))
    attention = 8 * config.hidden_size * config.num_random_features * config.num_hidden_layers
    assert measure.forward_flops_per_token(config) == 2 * linear + attention
    lm_head = 2 * 48 * 48 + 2 * 48 * config.vocab_size
    assert measure.forward_flops_per_token(config, lm_head=True) == 2 * linear + attention + lm_head
    assert measure.mfu(2e12, 2.0, 1.0) == pytest.approx(1.0) and measure.mfu(1.0, 1.0, None) is None


def test_batches_are_length_grouped_or_randomly_padded(data_dir):
    measure = load_measure()
    smiles = measure.smiles_of(data_dir / "lipophilicity.csv", limit=400)
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    encoded = tokenizer(smiles)["input_ids"]

    def overhead(batches) -> float:
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        return sum(b["input_ids"].numel() for b in batches) / real - 1

    grouped = measure.make_batches(tokenizer, encoded, 16, 5, "length_grouped")
    padded = measure.make_batches(tokenizer, encoded, 16, 5, "padded")
    assert [len(b["input_ids"]) for b in grouped + padded] == [16] * 10
    assert overhead(grouped) < 0.1 < overhead(padded)
    lengths = [b["input_ids"].shape[1] for b in grouped]
    assert lengths == sorted(lengths)  # quantiles of the length distribution, shortest first
    with pytest.raises(ValueError, match="hold 25 batches of 16, not 30"):
        measure.make_batches(tokenizer, encoded, 16, 30, "padded")


def test_exhausted_time_budget_skips_sections_and_says_so(tmp_path):
    suite = load_suite()
    result = suite.main(
        ["--smoke", "--output_dir", str(tmp_path), "--sections", "mlm", "--time_budget_s", "-1"]
    )
    assert "mlm" not in result and result["skipped"]["mlm"].startswith("time budget")
    assert "- mlm: time budget" in (tmp_path / "gpu_suite.md").read_text()
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["skipped"] == result["skipped"]
    with pytest.raises(ValueError, match="influence scores the finetune section's runs"):
        suite.main(["--smoke", "--output_dir", str(tmp_path), "--sections", "influence"])
    with pytest.raises(ValueError, match="unknown"):
        suite.main(["--smoke", "--output_dir", str(tmp_path), "--sections", "backbone,gpu"])


def test_peak_lookup_knows_the_target_gpus():
    measure = load_measure()
    assert measure.gpu_peak_tflops(torch.device("cpu"), None) is None
    assert measure.gpu_peak_tflops(torch.device("cpu"), 123.0) == 123.0
    # the SXM H100 reports itself as "NVIDIA H100 80GB HBM3"
    assert measure.peak_for_gpu("NVIDIA H100 80GB HBM3") == measure.peak_for_gpu("NVIDIA H200") == 989.4
    assert measure.peak_for_gpu("NVIDIA H100 PCIe") == 756.0
    assert measure.peak_for_gpu("NVIDIA A100-SXM4-80GB") == 312.0
    assert measure.peak_for_gpu("Tesla T4") is None


@pytest.mark.cuda
def test_gpu_suite_backbone_on_cuda(tmp_path):
    """On a GPU: the XL backbone section with bf16 autocast, peak memory and MFU (H100/H200)."""
    suite = load_suite()
    result = suite.main(
        ["--output_dir", str(tmp_path), "--sections", "backbone", "--batch_sizes", "64", "--num_batches", "2"]
    )
    rows = result["backbone"]
    assert result["environment"]["autocast"] == "bf16"
    assert all(row["peak_mib"] > 0 for row in rows)
    if result["environment"]["peak_bf16_tflops"] is not None:
        assert all(0 < row["mfu"] < 1 for row in rows)
