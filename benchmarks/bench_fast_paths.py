"""The MoLFormer fast paths beside the plain path, timed side by side in one run, with their numerical check.

Paths (one model, one set of weights; each row switches the paths on the same modules):

* plain: `reference_attention`, the reference's rotary formula on [B, h, S, d] views, three projections;
* rotary: the default forward (rotary with one temporary instead of four, on contiguous [B, S, h, d] rows);
* rotary + fused qkv: also `config.fused_qkv` (one matmul over the checkpoint's three weights);
* + padding-free: also `config.padding_free` (projections, LayerNorms and FFNs on the real tokens only);
* with --compile, the default forward under `torch.compile` (inductor; minutes of compilation on a CPU).

Repeats are interleaved (plain, rotary, fused, plain, ...), so a shared machine's load changes all rows alike;
the figures are medians. Each row also reports its largest difference from the plain path (eval forward and
gradients, fixed features), so "fast" never silently means "different".

    OMP_NUM_THREADS=1 python benchmarks/bench_fast_paths.py                  # CPU, fp32, XL config
    python benchmarks/bench_fast_paths.py --device cuda --dtype bf16 --batch_size 256 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configuration_molformer import MolformerConfig  # noqa: E402
from modeling_molformer import (  # noqa: E402
    MolformerModel,
    MolformerSelfAttention,
    apply_rotary,
    apply_rotary_fast,
    reference_attention,
    rotary_cos_sin,
)
from tokenization_molformer import MolformerTokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_CONFIG = SHARED / "golden" / "ibm-molformer-xl-hub" / "config.json"
DEFAULT_DATA = SHARED / "data" / "lipophilicity.csv"
PATHS = ("plain", "rotary", "rotary + fused qkv", "+ padding-free")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=2, help="distinct (padded) batches per pass")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed passes per path")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a MoLFormer config.json")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with a 'smiles' column")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_batches(data: Path, batch_size: int, num_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random Lipophilicity molecules, each batch padded to its longest (what a shuffled loader gives)."""
    smiles = pd.read_csv(data)["smiles"].astype(str).tolist()
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    order = torch.randperm(len(smiles), generator=torch.Generator().manual_seed(seed)).tolist()
    needed = batch_size * num_batches
    if needed > len(smiles):
        raise ValueError(f"{data} has {len(smiles)} SMILES; {num_batches} x {batch_size} are needed.")
    chunks = [order[start : start + batch_size] for start in range(0, needed, batch_size)]
    return [
        dict(tokenizer([smiles[i] for i in chunk], padding=True, return_tensors="pt")) for chunk in chunks
    ]


@contextlib.contextmanager
def path(model: MolformerModel, name: str) -> Iterator[None]:
    """Switch the attention of every layer to one of PATHS (the weights are untouched)."""
    attentions = [m for m in model.modules() if isinstance(m, MolformerSelfAttention)]
    previous = model.config.fused_qkv, model.config.padding_free
    model.config.fused_qkv = name in ("rotary + fused qkv", "+ padding-free")
    model.config.padding_free = name == "+ padding-free"
    if name == "plain":
        for attention in attentions:
            attention.forward = functools.partial(reference_attention, attention)
    try:
        yield
    finally:
        model.config.fused_qkv, model.config.padding_free = previous
        for attention in attentions:
            attention.__dict__.pop("forward", None)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    steps: dict[str, Callable[[], None]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of each step, timed round-robin after one untimed warm-up call each."""
    for step in steps.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronise(device)
            start = time.perf_counter()
            step()
            synchronise(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def allocated_sizes(fn: Callable[[], torch.Tensor], unit: int) -> float:
    """Bytes the ops inside `fn` allocate (temporaries and result), in units of `unit` bytes."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    return sum(event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0) / unit


def max_difference(model: MolformerModel, batch: dict[str, torch.Tensor], name: str) -> tuple[float, float]:
    """Largest |difference| from the plain path: eval last_hidden_state at the real tokens (padding-free
    leaves zeros at the padding), and gradients of a scalar of them."""
    real = batch["attention_mask"].bool()

    def run(path_name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.eval()  # no dropout, no redraw: every path sees the same features
        model.zero_grad(set_to_none=True)
        with path(model, path_name):
            out = model(**batch).last_hidden_state[real]
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    plain_out, plain_grads = run("plain")
    out, grads = run(name)
    model.zero_grad(set_to_none=True)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, plain_grads, strict=True))
    return (out - plain_out).abs().max().item(), grad_diff


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = MolformerConfig.from_pretrained(args.config)
    batches = [
        {key: value.to(device) for key, value in batch.items()}
        for batch in load_batches(args.data, args.batch_size, args.num_batches, args.seed)
    ]
    model = MolformerModel(config).to(device)
    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"
    )

    def forward(module: torch.nn.Module) -> None:
        with torch.inference_mode(), autocast():
            for batch in batches:
                module(**batch)

    def forward_backward(module: torch.nn.Module) -> None:
        for batch in batches:
            with autocast():
                loss = module(**batch).pooler_output.float().square().mean()
            loss.backward()
        model.zero_grad(set_to_none=True)

    def under(name: str, step: Callable, module: torch.nn.Module, train: bool) -> Callable[[], None]:
        def run() -> None:
            model.train(train)
            with path(model, name):
                step(module)

        return run

    rows = {name: {} for name in PATHS}
    # the rotary op alone, on the queries of the first batch: [B, S, h, d]
    batch_size, seq = batches[0]["input_ids"].shape
    rows_x = torch.randn(batch_size, seq, config.num_attention_heads, config.head_dim, device=device)
    cos, sin = rotary_cos_sin(seq, config.head_dim, device)
    ops = {
        "plain": lambda: apply_rotary(rows_x.transpose(1, 2), cos, sin),
        "rotary": lambda: apply_rotary_fast(rows_x, cos[:, None], sin[:, None]),
    }
    op_seconds = interleaved_medians(ops, device, args.repeats * 5)
    for name, fn in ops.items():
        rows[name]["rotary_op_ms"] = 1e3 * op_seconds[name]
        if device.type == "cpu":
            rows[name]["rotary_op_allocations_x"] = allocated_sizes(
                fn, rows_x.numel() * rows_x.element_size()
            )
    same = torch.equal(ops["plain"](), ops["rotary"]().transpose(1, 2))

    compiled = torch.compile(model) if args.compile else None
    for pass_name, step, train in (("forward", forward, False), ("forward_backward", forward_backward, True)):
        steps = {name: under(name, step, model, train) for name in PATHS}
        if compiled is not None:
            steps["torch.compile"] = under("rotary", step, compiled, train)
            rows.setdefault("torch.compile", {})
        for name, seconds in interleaved_medians(steps, device, args.repeats).items():
            rows[name][f"{pass_name}_ms"] = 1e3 * seconds / len(batches)
    for name in PATHS[1:]:
        rows[name]["max_diff_output"], rows[name]["max_diff_grads"] = max_difference(model, batches[0], name)
    explain = torch._dynamo.explain(model.eval())(**batches[0])

    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    padded = sum(batch["input_ids"].numel() for batch in batches)
    result = {
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": str(args.config),
        "batches": f"{len(batches)} x {args.batch_size} random Lipophilicity molecules, padding {padded / real - 1:.0%}",
        "repeats": args.repeats,
        "rotary_op_bit_identical": same,
        "graph_breaks": explain.graph_break_count,
        "paths": rows,
    }
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    rows = result["paths"]
    plain = rows["plain"]
    print(
        f"device={result['device']} dtype={result['dtype']} threads={result['threads']} torch={result['torch']}\n"
        f"{result['batches']}; medians of {result['repeats']} interleaved repeats (rotary op: x5)\n"
        f"rotary op bit-identical to the reference formula: {result['rotary_op_bit_identical']}; "
        f"torch.compile graph breaks (eval forward): {result['graph_breaks']}\n"
    )
    columns = [
        "path", "rotary op ms", "allocs (x q)", "forward ms/batch", "speed-up", "fwd+bwd ms/batch", "speed-up",
        "max abs diff out / grads",
    ]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, row in rows.items():
        op = f"{row['rotary_op_ms']:.2f}" if "rotary_op_ms" in row else ""
        allocs = f"{row['rotary_op_allocations_x']:.1f}" if "rotary_op_allocations_x" in row else ""
        cells = [name, op, allocs]
        for key in ("forward_ms", "forward_backward_ms"):
            cells += [f"{row[key]:.1f}", f"{plain[key] / row[key]:.2f}x"] if key in row else ["", ""]
        diff = (
            f"{row['max_diff_output']:.1e} / {row['max_diff_grads']:.1e}"
            if "max_diff_output" in row
            else ("reference" if name == "plain" else "")
        )
        print("| " + " | ".join(cells + [diff]) + " |")


if __name__ == "__main__":
    main()
