"""Throughput and peak memory of one MLM training step (forward, backward, AdamW) for MoLFormer configs.

Decides what a pretraining recipe can afford: tokens per second and peak memory of the small model
(configs/molformer-small.json) against MoLFormer-XL (the config defaults), on CPU or GPU.

    python benchmarks/bench_mlm.py                       # CPU (one thread), both configs, < 2 minutes
    python benchmarks/bench_mlm.py --device cuda --bf16 --batch-size 128

Each config runs in a fresh process, so the CPU peak (resident memory above the process's level before the
model was built) belongs to that config alone. Timings are the median of `--repeats` steps after warm-up.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the model modules live next to the scripts, not in an installed package
    sys.path.insert(0, str(ROOT))
CONFIGS = {
    "small": ROOT / "configs" / "molformer-small.json",
    "xl": None,
}  # None: MolformerConfig defaults (XL)
SMALL_VOCAB_SIZE = 64  # about what a vocabulary built from the ChEMBL/ZINC corpus holds


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Time training steps of one config; runs inside a child process."""
    import torch

    from configuration_molformer import MolformerConfig
    from modeling_molformer import MolformerForMaskedLM

    torch.manual_seed(0)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    device = torch.device(options["device"])
    path = CONFIGS[name]
    config = MolformerConfig.from_json_file(path) if path else MolformerConfig()
    if path:
        config.vocab_size = SMALL_VOCAB_SIZE
    baseline_mib = _rss_mib()
    model = MolformerForMaskedLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, length = options["batch_size"], options["seq_len"]
    input_ids = torch.randint(5, config.vocab_size, (batch, length), device=device)
    labels = torch.where(torch.rand(batch, length, device=device) < 0.15, input_ids, -100)
    attention_mask = torch.ones_like(input_ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options["bf16"])

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(options["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step() for _ in range(options["repeats"])]
    median = statistics.median(times)
    peak_mib = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else _rss_mib() - baseline_mib
    )
    return {
        "config": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "seq_len": length,
        "bf16": options["bf16"],
        "median_step_s": median,
        "min_step_s": min(times),
        "tokens_per_s": batch * length / median,
        "peak_memory_mib": peak_mib,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["small", "xl"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per molecule (corpus mean is ~45)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 keeps torch's default (all cores), which is much slower than 1 on a busy machine",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    options = {
        k: getattr(args, k)
        for k in ("device", "batch_size", "seq_len", "warmup", "repeats", "threads", "bf16")
    }
    context = multiprocessing.get_context("spawn")  # a fresh process per config: its own peak memory
    results = []
    for name in args.configs:
        with context.Pool(1) as pool:
            results.append(pool.apply(measure, (name, options)))
    header = f"{'config':<7}{'params':>12}{'median step s':>15}{'tokens/s':>12}{'peak MiB':>10}  device"
    lines = [header] + [
        f"{r['config']:<7}{r['parameters']:>12,}{r['median_step_s']:>15.4f}{r['tokens_per_s']:>12,.0f}"
        f"{r['peak_memory_mib']:>10.0f}  {r['device']}, {r['threads']} threads, batch {r['batch_size']}"
        f"x{r['seq_len']}{', bf16' if r['bf16'] else ''}"
        for r in results
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.output:
        from molft.io import write_json

        write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
