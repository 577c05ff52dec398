"""Throughput and peak memory of the MoLFormer backbone at realistic Lipophilicity lengths.

Random weights with the XL config (the numbers do not depend on the weights), real SMILES tokenised with a
vocabulary built from them, batches padded to their own longest molecule (dynamic padding, as the Trainer's
collator does). Forward is timed in eval mode under inference_mode; forward+backward in train mode, so the
feature-map redraw and dropout are part of it. Figures are medians over repeats after a warm-up pass.

    python benchmarks/bench_backbone.py                      # CPU, fp32, XL config
    python benchmarks/bench_backbone.py --device cuda --dtype bf16 --batch_size 128 --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configuration_molformer import MolformerConfig  # noqa: E402
from modeling_molformer import MolformerModel  # noqa: E402
from tokenization_molformer import MolformerTokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_CONFIG = SHARED / "golden" / "ibm-molformer-xl-hub" / "config.json"
DEFAULT_DATA = SHARED / "data" / "lipophilicity.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=1, help="distinct batches timed per repeat")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes over the batches (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a MoLFormer config.json")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with a 'smiles' column")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_batches(
    data: Path, batch_size: int, num_batches: int, seed: int
) -> tuple[MolformerTokenizer, list[dict[str, torch.Tensor]]]:
    frame = pd.read_csv(data)
    if "smiles" not in frame.columns:
        raise ValueError(f"{data} has no 'smiles' column (columns: {list(frame.columns)}).")
    smiles = frame["smiles"].astype(str).tolist()
    needed = batch_size * num_batches
    if needed > len(smiles):
        raise ValueError(
            f"{data} has {len(smiles)} SMILES; {num_batches} batches of {batch_size} need {needed}."
        )
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    order = torch.randperm(len(smiles), generator=torch.Generator().manual_seed(seed))[:needed].tolist()
    batches = []
    for start in range(0, needed, batch_size):
        chunk = [smiles[i] for i in order[start : start + batch_size]]
        batches.append(dict(tokenizer(chunk, padding=True, return_tensors="pt")))
    return tokenizer, batches


def peak_memory_mib(device: torch.device) -> float:
    """Process high-water mark: CUDA allocator peak, or peak RSS on CPU (tracemalloc misses torch's allocator)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(
    step: Callable[[dict[str, torch.Tensor]], None],
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> list[float]:
    for _ in range(warmup):
        for batch in batches:
            step(batch)
    synchronise(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        synchronise(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = MolformerConfig.from_pretrained(args.config)
    tokenizer, batches = load_batches(args.data, args.batch_size, args.num_batches, args.seed)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size={config.vocab_size}."
        )
    batches = [{name: tensor.to(device) for name, tensor in batch.items()} for batch in batches]
    model = MolformerModel(config).to(device)

    def autocast() -> contextlib.AbstractContextManager:
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(batch: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode(), autocast():
            model(**batch)

    def forward_backward(batch: dict[str, torch.Tensor]) -> None:
        with autocast():
            loss = model(**batch).pooler_output.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    molecules = sum(len(batch["input_ids"]) for batch in batches)
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    padded_tokens = sum(batch["input_ids"].numel() for batch in batches)
    lengths = [int(n) for batch in batches for n in batch["attention_mask"].sum(1)]
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}\n"
        f"config={args.config} ({sum(p.numel() for p in model.parameters()):,} parameters, random weights)\n"
        f"data={args.data.name}: {args.num_batches} batches x {args.batch_size} molecules, tokens per molecule "
        f"median {statistics.median(lengths)} max {max(lengths)} (bos/eos included), "
        f"padding overhead {padded_tokens / real_tokens - 1:.1%}\n"
        f"median of {args.repeats} repeats after {args.warmup} warm-up pass(es)"
    )
    print(f"{'pass':<18}{'molecules/s':>14}{'tokens/s':>14}{'s/batch':>10}{'peak MiB':>12}")
    # CPU: max RSS is a process-wide high-water mark, so both passes are measured from one baseline taken with
    # the model and data loaded; forward runs first, and forward+backward needs more, so each rise is its own
    cpu_baseline = peak_memory_mib(device) if device.type == "cpu" else 0.0
    for name, step, train in (("forward", forward, False), ("forward+backward", forward_backward, True)):
        model.train(train)
        synchronise(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(time_passes(step, batches, device, args.warmup, args.repeats))
        peak = peak_memory_mib(device) - cpu_baseline
        print(
            f"{name:<18}{molecules / seconds:>14.1f}{real_tokens / seconds:>14.0f}"
            f"{seconds / len(batches):>10.3f}{peak:>12.0f}"
        )
    if device.type == "cpu":
        print("peak MiB on CPU: rise of the process's max RSS over its value with the model and data loaded")
    else:
        print("peak MiB on CUDA: torch.cuda.max_memory_allocated during the pass, weights included")


if __name__ == "__main__":
    main()
