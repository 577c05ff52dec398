#!/usr/bin/env python
"""Training throughput of run_regression.py's batching (dynamic padding + length grouping) vs padding to 512.

Both schemes train the same model (same initial weights, same AdamW settings) on the same molecules; only how
batches are formed differs:

* dynamic: batches of similar token length (transformers' LengthGroupedSampler, as the Trainer builds it with
  `train_sampling_strategy="group_by_length"`), each padded to its longest SMILES (DataCollatorWithPadding);
* fixed: random batches, every one padded to 512 tokens (`padding="max_length", max_length=512`).

Each scheme runs `--repeats` timed blocks of `--steps` optimizer steps after `--warmup` untimed steps; the
median block gives the reported speed. Default: the small config on the CPU.

    python benchmarks/bench_training.py
    python benchmarks/bench_training.py --device cuda --steps 50 --batch_size 64
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_molformer import MolformerConfig  # noqa: E402
from modeling_molformer_reg import MolformerForRegression  # noqa: E402
from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column, load_raw_dataset, prepare_molecules  # noqa: E402
from tokenization_molformer import MolformerTokenizer  # noqa: E402

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default=str(ROOT / "configs" / "molformer-small.json"), help="Model config."
    )
    parser.add_argument("--config_overrides", default=None, help="e.g. hidden_size=128,num_hidden_layers=4")
    parser.add_argument(
        "--train_file", default=None, help="csv/json/parquet; default: embedded Lipophilicity."
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per timed block.")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timed blocks per scheme (the median is shown)."
    )
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps before the first block.")
    parser.add_argument("--max_length", type=int, default=512, help="Fixed padding length of the baseline.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_smiles(train_file: str | None) -> tuple[list[str], np.ndarray, str]:
    raw = load_raw_dataset(None if train_file else "lipophilicity", train_file=train_file)
    frame = next(iter(raw.frames.values()))
    smiles_col = find_column(frame, None, SMILES_CANDIDATES, "SMILES", raw.source)
    label_col = find_column(frame, None, LABEL_CANDIDATES, "label", raw.source)
    molecules = prepare_molecules(frame, smiles_col, label_col, source=raw.source)
    return molecules["canonical_smiles"].tolist(), molecules["label"].to_numpy(np.float32), raw.source


def batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches (a new epoch when one runs out), like a long training run."""
    for epoch in itertools.count():
        sampler = loader.sampler
        if hasattr(sampler, "generator") and sampler.generator is not None:
            sampler.generator.manual_seed(epoch)
        yield from loader


def time_scheme(model, loader, args, device) -> dict[str, float]:
    """Median seconds per step over `repeats` blocks, and the padded / real tokens per batch."""
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    stream = batches(loader)
    padded, real = [], []

    def step() -> None:
        batch = {k: v.to(device) for k, v in next(stream).items()}
        padded.append(batch["input_ids"].numel())
        real.append(int(batch["attention_mask"].sum()))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    block_times = []
    for _ in range(args.repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _synchronize(device)
        block_times.append((time.perf_counter() - start) / args.steps)
    seconds = statistics.median(block_times)
    return {
        "s_per_step": seconds,
        "samples_per_s": args.batch_size / seconds,
        "padded_tokens": float(np.mean(padded)),
        "real_share": float(np.sum(real) / np.sum(padded)),
        "spread": (max(block_times) - min(block_times)) / seconds,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    smiles, labels, source = load_smiles(args.train_file)
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    config = MolformerConfig.from_json_file(args.config)
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    model = MolformerForRegression(config)

    encoded = tokenizer(smiles, truncation=True, max_length=args.max_length)
    examples = [
        {"input_ids": ids, "attention_mask": mask, "labels": float(label)}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels, strict=True)
    ]
    lengths = [len(e["input_ids"]) for e in examples]
    generator = torch.Generator().manual_seed(args.seed)
    schemes = {
        "dynamic + length grouping": DataLoader(
            examples,
            batch_size=args.batch_size,
            sampler=LengthGroupedSampler(args.batch_size, lengths=lengths, generator=generator),
            collate_fn=DataCollatorWithPadding(tokenizer),
            drop_last=True,
        ),
        f"max_length={args.max_length}": DataLoader(
            examples,
            batch_size=args.batch_size,
            sampler=RandomSampler(examples, generator=torch.Generator().manual_seed(args.seed)),
            collate_fn=DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.max_length),
            drop_last=True,
        ),
    }
    results = {name: time_scheme(model, loader, args, device) for name, loader in schemes.items()}

    n_threads = torch.get_num_threads()
    if device.type == "cpu":
        threads = f", {n_threads} thread{'s' * (n_threads > 1)}"
    else:
        threads = f" ({torch.cuda.get_device_name()})"
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Training throughput: MoLFormer {Path(args.config).name}"
        f"{' + ' + args.config_overrides if args.config_overrides else ''} ({n_params / 1e6:.2f}M parameters), "
        f"{len(smiles)} molecules from {source.split(' (')[0]} (median {np.median(lengths):.0f} tokens, "
        f"max {max(lengths)}), batch {args.batch_size}, {args.device}{threads}"
        f"{', bf16' if args.bf16 else ''}; median of {args.repeats} x {args.steps} steps"
    )
    print(
        f"{'padding':<28}{'samples/s':>11}{'s/step':>9}{'tokens/batch':>14}{'real tokens':>13}{'block spread':>14}"
    )
    for name, r in results.items():
        print(
            f"{name:<28}{r['samples_per_s']:>11.1f}{r['s_per_step']:>9.3f}{r['padded_tokens']:>14.0f}"
            f"{r['real_share']:>12.0%}{r['spread']:>13.0%}"
        )
    dynamic, fixed = results.values()
    print(
        f"speed-up of dynamic padding + length grouping: {dynamic['samples_per_s'] / fixed['samples_per_s']:.1f}x"
    )
    return results


if __name__ == "__main__":
    main()
