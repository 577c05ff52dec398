"""The measuring half of benchmarks/gpu_suite.py: timing, peak memory, FLOPs and MFU, the batches, and the
four sections (backbone, finetune, influence, mlm) that return the suite's rows.

It is its own module so that gpu_suite.py stays the script (arguments, time budget, driver, report) and
each file holds one concept under the project's ~500-line limit. benchmarks/ is no package: gpu_suite.py
puts this folder on sys.path and imports it by name, so it imports the same whether the suite runs as
`python benchmarks/gpu_suite.py` or the tests load it from its file.
"""

from __future__ import annotations

import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configuration_molformer import MolformerConfig  # noqa: E402
from modeling_molformer import MolformerForMaskedLM, MolformerModel  # noqa: E402
from tokenization_molformer import MolformerTokenizer  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs this suite is meant for, by a piece of
# torch.cuda.get_device_name(), first match wins (the SXM H100 reports itself as "NVIDIA H100 80GB HBM3")
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
}


@dataclass
class Settings:
    """Everything a section reads; --smoke swaps in the tiny sizes, the CPU and dynamo's eager backend."""

    device: str
    autocast_bf16: bool
    config: Path
    lipophilicity: Path
    external: Path
    corpus: Path
    batch_sizes: tuple[int, ...]
    num_batches: int
    repeats: int
    compile_backend: str
    finetune_batch_size: int
    finetune_max_steps: int | None
    influence_train_samples: int
    cg_max_iter: int
    influence_dtype: str
    mlm_batch_size: int
    mlm_steps: int
    projected_epochs: int
    time_budget_s: float
    peak_tflops: float | None


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Drop what the previous figure left, so each peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """CUDA allocator peak since the last release_memory; None on the CPU (no per-figure peak there)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def timed(step: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds of the untimed first call, median seconds of `repeats` further calls)."""
    synchronise(device)
    start = time.perf_counter()
    step()
    synchronise(device)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronise(device)
        seconds.append(time.perf_counter() - start)
    return first, statistics.median(seconds)


def layer_flops_per_token(config: MolformerConfig) -> float:
    """Matmul FLOPs of one encoder layer per token: projections, FFN, feature maps, kv and q @ kv."""
    hidden, inner, features = config.hidden_size, config.intermediate_size, config.num_random_features
    return 8 * hidden * hidden + 4 * hidden * inner + 8 * hidden * features


def forward_flops_per_token(config: MolformerConfig, lm_head: bool = False) -> float:
    flops = config.num_hidden_layers * layer_flops_per_token(config)
    if lm_head:  # transform dense + decoder, on every token as the model computes them
        flops += 2 * config.hidden_size * config.hidden_size + 2 * config.hidden_size * config.vocab_size
    return flops


def gpu_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    return peak_for_gpu(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for_gpu(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    return None if peak_tflops is None or seconds <= 0 else flops / seconds / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def smiles_of(path: Path, limit: int | None = None) -> list[str]:
    frame = pd.read_csv(path, nrows=limit)
    column = next((c for c in frame.columns if c.lower() == "smiles"), None)
    if column is None:
        raise ValueError(f"{path} has no smiles column (columns: {list(frame.columns)}).")
    return frame[column].astype(str).tolist()


def make_batches(
    tokenizer: MolformerTokenizer, encoded: list[list[int]], batch_size: int, num_batches: int, kind: str
) -> list[dict[str, torch.Tensor]]:
    """`num_batches` batches of tokenised molecules: "length_grouped" chunks of the length-sorted molecules,
    spread over the range, or "padded" chunks of randomly ordered molecules; each padded to its longest."""
    lengths = np.array([len(ids) for ids in encoded])
    rng = np.random.default_rng(0)
    order = np.argsort(lengths, kind="stable") if kind == "length_grouped" else rng.permutation(len(encoded))
    chunks = [
        order[start : start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)
    ]
    if len(chunks) < num_batches:
        raise ValueError(
            f"{len(encoded)} molecules hold {len(chunks)} batches of {batch_size}, not {num_batches}."
        )
    picked = [chunks[int((i + 0.5) * len(chunks) / num_batches)] for i in range(num_batches)]  # quantiles
    return [
        dict(tokenizer.pad([{"input_ids": encoded[i]} for i in chunk], return_tensors="pt"))
        for chunk in picked
    ]


def model_config(settings: Settings, vocab_size: int, **overrides: Any) -> MolformerConfig:
    config = (
        MolformerConfig.from_json_file(str(settings.config))
        if settings.config.is_file()
        else MolformerConfig.from_pretrained(settings.config)
    )
    config.vocab_size = max(config.vocab_size, vocab_size)
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------


def backbone(settings: Settings, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Forward and forward+backward rows for every batch size, batch kind and mode."""
    device = torch.device(settings.device)
    smiles = smiles_of(settings.lipophilicity)
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    encoded = tokenizer(smiles)["input_ids"]
    config = model_config(settings, len(tokenizer))
    torch.manual_seed(0)
    model = MolformerModel(config).to(device)
    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=settings.autocast_bf16
    )
    peak = gpu_peak_tflops(device, settings.peak_tflops)
    per_token = forward_flops_per_token(config)
    compiled = None
    rows = []
    for mode in modes:
        config.fused_qkv = mode in ("eager fused_qkv", "eager padding_free")
        config.padding_free = mode == "eager padding_free"
        if mode == "compile":
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=settings.compile_backend, dynamic=True)
        module = compiled if mode == "compile" else model
        for batch_size in settings.batch_sizes:
            for kind in ("length_grouped", "padded"):
                batches = [
                    {k: v.to(device) for k, v in b.items()}
                    for b in make_batches(tokenizer, encoded, batch_size, settings.num_batches, kind)
                ]
                real = sum(int(b["attention_mask"].sum()) for b in batches)
                padded = sum(b["input_ids"].numel() for b in batches)
                for pass_name, train in (("forward", False), ("forward+backward", True)):
                    model.train(train)
                    release_memory(device)
                    first, seconds = timed(
                        functools.partial(run_pass, module, batches, autocast, train),
                        device,
                        settings.repeats,
                    )
                    flops = real * per_token * (3 if train else 1)
                    rows.append(
                        {
                            "mode": mode, "pass": pass_name, "batch_size": batch_size, "batches": kind,
                            "molecules_per_s": batch_size * len(batches) / seconds, "tokens_per_s": real / seconds,
                            "ms_per_batch": 1e3 * seconds / len(batches), "padding_overhead": padded / real - 1,
                            "first_call_s": first, "peak_mib": peak_mib(device), "mfu": mfu(flops, seconds, peak),
                        }
                    )  # fmt: skip
    config.fused_qkv = config.padding_free = False
    del model, compiled
    release_memory(device)
    return rows


def run_pass(module, batches, autocast, train: bool) -> None:
    if not train:
        with torch.inference_mode(), autocast():
            for batch in batches:
                module(**batch)
        return
    for batch in batches:
        with autocast():
            loss = module(**batch).pooler_output.float().square().mean()
        loss.backward()
    for param in module.parameters():
        param.grad = None


def finetune(settings: Settings, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """One epoch of Lipophilicity through run_regression.main, full and LoRA, with an XL-config model."""
    import run_regression

    device = torch.device(settings.device)
    train_file = settings.lipophilicity
    if settings.finetune_max_steps is not None:  # smoke: a slice of the real file
        train_file = workdir / "lipophilicity_slice.csv"
        pd.read_csv(settings.lipophilicity, nrows=160).to_csv(train_file, index=False)
    rows, runs = [], {}
    for method in ("none", "lora"):
        output_dir = workdir / f"finetune_{method}"
        argv = [
            "--train_file", str(train_file), "--config_name", str(settings.config), "--output_dir", str(output_dir),
            "--overwrite_output_dir", "true", "--do_train", "--num_train_epochs", "1",
            "--per_device_train_batch_size", str(settings.finetune_batch_size), "--per_device_eval_batch_size", "256",
            "--peft", method, "--early_stopping_patience", "0", "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "1" if settings.finetune_max_steps else "10", "--report_to", "none",
            "--disable_tqdm", "true", "--log_level", "warning", "--seed", "0", "--dataloader_num_workers", "0",
        ]  # fmt: skip
        if settings.finetune_max_steps is not None:
            argv += ["--max_steps", str(settings.finetune_max_steps)]
        if device.type == "cpu":
            argv += ["--use_cpu", "true"]
        release_memory(device)
        start = time.perf_counter()
        metrics = run_regression.main(argv)
        wall = time.perf_counter() - start
        per_s = metrics["train_samples_per_second"]
        n_train = metrics["train_samples"]
        rows.append(
            {
                "method": "full" if method == "none" else method, "trainable_params": metrics.get("trainable_params"),
                "train_molecules": n_train, "molecules_per_s": per_s, "epoch_s": n_train / per_s,
                f"projected_{settings.projected_epochs}_epochs_min": settings.projected_epochs * n_train / per_s / 60,
                "peak_mib": peak_mib(device), "script_wall_s": wall,
            }
        )  # fmt: skip
        runs[method] = output_dir
    release_memory(device)
    return rows, runs


def influence(settings: Settings, runs: dict[str, Path], workdir: Path) -> list[dict[str, Any]]:
    """run_influence.main over the external molecules: LoRA scope (DataInf) and last-layers scope (CG)."""
    import run_influence

    device = torch.device(settings.device)
    external = settings.external
    if settings.finetune_max_steps is not None:
        external = workdir / "external_slice.csv"
        pd.read_csv(settings.external, nrows=20).to_csv(external, index=False)
    jobs = (
        ("lora", "lora", "datainf", []),
        ("none", "last_k_layers", "cg", ["--last_k", "1", "--cg_max_iter", str(settings.cg_max_iter)]),
    )
    rows = []
    for run, scope, estimator, extra in jobs:
        argv = [
            "--model_name_or_path", str(runs[run]), "--external_file", str(external),
            "--output_dir", str(workdir / f"influence_{scope}"), "--overwrite_output_dir", "true",
            "--scope", scope, "--estimator", estimator, "--max_train_samples", str(settings.influence_train_samples),
            "--dtype", settings.influence_dtype, "--device", settings.device, "--disable_tqdm", "true",
            "--log_level", "warning", *extra,
        ]  # fmt: skip
        release_memory(device)
        start = time.perf_counter()
        summary = run_influence.main(argv)
        wall = time.perf_counter() - start
        scored = summary["external_file"]["n_scored"]
        rows.append(
            {
                "scope": scope, "estimator": estimator, "num_params": summary["scope"]["num_params"],
                "train_molecules": summary["train_size_for_hessian"], "candidates_scored": scored,
                "dtype": settings.influence_dtype, "estimator_s": summary["timings"]["total_s"], "script_wall_s": wall,
                "candidates_per_s": scored / summary["timings"]["total_s"], "peak_mib": peak_mib(device),
            }
        )  # fmt: skip
    release_memory(device)
    return rows


def mlm(settings: Settings, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Masked-LM training steps (forward, backward, AdamW) on corpus molecules, eager and/or compiled."""
    from molft.mlm import MlmDataArguments, mlm_collator

    device = torch.device(settings.device)
    needed = settings.mlm_batch_size * (settings.mlm_steps + 1)
    smiles = smiles_of(settings.corpus, limit=needed)
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    config = model_config(settings, len(tokenizer))
    # run_mlm.py's collator with its default masking options (never a special token as a random replacement)
    collator = mlm_collator(
        tokenizer, MlmDataArguments(), pad_to_multiple_of=8 if settings.autocast_bf16 else None
    )
    torch.manual_seed(0)
    encoded = tokenizer(smiles)["input_ids"]
    batches = []
    for start in range(0, len(encoded) - settings.mlm_batch_size + 1, settings.mlm_batch_size):
        batch = collator([{"input_ids": ids} for ids in encoded[start : start + settings.mlm_batch_size]])
        batches.append({k: v.to(device) for k, v in batch.items()})
    real = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    peak = gpu_peak_tflops(device, settings.peak_tflops)
    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=settings.autocast_bf16
    )
    rows = []
    for mode in modes:
        torch.manual_seed(0)
        model = MolformerForMaskedLM(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        if mode == "compile":
            torch._dynamo.reset()
        module = (
            torch.compile(model, backend=settings.compile_backend, dynamic=True)
            if mode == "compile"
            else model
        )
        release_memory(device)
        synchronise(device)
        start = time.perf_counter()
        mlm_step(module, optimizer, autocast, batches[0])  # warm-up (and compilation)
        synchronise(device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for batch in batches[1:]:
            loss = mlm_step(module, optimizer, autocast, batch)
        synchronise(device)
        seconds = time.perf_counter() - start
        flops = 3 * real * forward_flops_per_token(config, lm_head=True)
        rows.append(
            {
                "mode": mode, "batch_size": settings.mlm_batch_size, "steps": len(batches) - 1,
                "molecules_per_s": settings.mlm_batch_size * (len(batches) - 1) / seconds,
                "tokens_per_s": real / seconds, "first_step_s": first, "peak_mib": peak_mib(device),
                "mfu": mfu(flops, seconds, peak), "last_loss": float(loss),
            }
        )  # fmt: skip
        del model, optimizer, module
        release_memory(device)
    return rows


def mlm_step(
    module, optimizer: torch.optim.Optimizer, autocast, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    with autocast():
        loss = module(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
