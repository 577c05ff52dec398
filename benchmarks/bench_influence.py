"""Time and peak memory of scoring external molecules: batched per-sample gradients vs one backward each.

Scoring a candidate is one dot product of its loss gradient with the inverse-HVP of the query gradient
(solved once, reused for every candidate), so the cost is the candidates' gradients. Three ways, one run:

  loop      one backward pass per molecule (`InfluenceProblem.per_sample_grads_looped`, the reference)
  vmap      per-sample gradients of a whole batch in one vectorised backward (`per_sample_grads`)
  jvp       forward-mode directional derivatives g_i . v for the batch, no per-sample gradient ever built
            (`grad_dot`; what `compute_influence` uses for mean-query scores)

Random weights (the cost does not depend on them), a vocabulary built from the SMILES, eval mode with the
feature maps pinned, the influence scope "all" by default (every parameter: the most expensive case).
The stand-in inverse-HVP is a random unit vector; all methods must give the same scores. Each method runs
in its own fresh process (same seed, same weights), so its peak memory is its own: the CUDA allocator's
peak, or on CPU the process's max RSS, both above the level with the model and data loaded.

    python benchmarks/bench_influence.py                        # CPU, configs/molformer-small.json
    python benchmarks/bench_influence.py --device cuda          # CUDA, the MoLFormer-XL config
    python benchmarks/bench_influence.py --scope last_k_layers --last_k 2 --dtype float64 --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configuration_molformer import MolformerConfig  # noqa: E402
from modeling_molformer_reg import MolformerForRegression  # noqa: E402
from molft.influence import InfluenceProblem, NonFiniteGradientError, select_parameters  # noqa: E402
from molft.model_utils import fixed_feature_maps  # noqa: E402
from tokenization_molformer import MolformerTokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
SMALL_CONFIG = ROOT / "configs" / "molformer-small.json"
XL_CONFIG = SHARED / "golden" / "ibm-molformer-xl-hub" / "config.json"
DEFAULT_DATA = SHARED / "data" / "external_300.csv"
METHODS = ("loop", "vmap", "jvp")
Batch = dict[str, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--config", type=Path, default=None, help="MoLFormer config (default: small on CPU, XL on CUDA)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with SMILES and Label columns")
    parser.add_argument("--num_molecules", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16, help="molecules per vectorised backward")
    parser.add_argument("--vmap_chunk_size", type=int, default=None, help="caps vmap memory (default: batch)")
    parser.add_argument("--scope", default="all", choices=("all", "last_k_layers", "head", "bias"))
    parser.add_argument("--last_k", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to run")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 on a busy machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.config = args.config or (XL_CONFIG if torch.device(args.device).type == "cuda" else SMALL_CONFIG)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    return args


def load_batches(path: Path, n: int, batch_size: int) -> tuple[MolformerTokenizer, list[Batch]]:
    frame = pd.read_csv(path).head(n)
    missing = [column for column in ("SMILES", "Label") if column not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}.")
    smiles = frame["SMILES"].astype(str).tolist()
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    batches = []
    for start in range(0, len(smiles), batch_size):
        batch = dict(tokenizer(smiles[start : start + batch_size], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor(frame["Label"].to_numpy()[start : start + batch_size])
        batches.append(batch)
    return tokenizer, batches


def build(args: argparse.Namespace) -> tuple[InfluenceProblem, list[Batch], torch.Tensor]:
    """The same random model, scope, batches and stand-in inverse-HVP in every process (fixed seed)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tokenizer, batches = load_batches(args.data, args.num_molecules, args.batch_size)
    config = MolformerConfig.from_pretrained(args.config)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    model = MolformerForRegression(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    params = select_parameters(model, args.scope, last_k=args.last_k)
    problem = InfluenceProblem(model, params, grad_method="vmap", vmap_chunk_size=args.vmap_chunk_size)
    direction = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(args.seed))
    direction = (direction / direction.norm()).to(device=device, dtype=problem.dtype)
    return problem, [problem.to_device(batch) for batch in batches], direction


def score_step(
    name: str, problem: InfluenceProblem, direction: torch.Tensor
) -> Callable[[Batch], torch.Tensor]:
    if name == "loop":
        return lambda batch: -(problem.per_sample_grads_looped(batch) @ direction)
    if name == "vmap":
        return lambda batch: -(problem.per_sample_grads(batch) @ direction)
    return lambda batch: -problem.grad_dot(batch, direction[None])[0]


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Runs in a fresh process: one warm-up batch (vmap tracing, allocator growth), then all batches, timed."""
    torch.set_num_threads(args.threads)
    problem, batches, direction = build(args)
    device = problem.device
    step = score_step(name, problem, direction)
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = psutil.Process().memory_info().rss
    try:
        with fixed_feature_maps(problem.model):
            step(batches[0])
            synchronise(device)
            start = time.perf_counter()
            scores = torch.cat([step(batch) for batch in batches]).double().cpu()
            synchronise(device)
            seconds = time.perf_counter() - start
    except NonFiniteGradientError as error:
        return {"error": str(error).split(":")[0]}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    return {"seconds": seconds, "peak_mib": peak / 2**20, "scores": scores}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    problem, batches, _ = build(args)
    molecules = sum(len(batch["input_ids"]) for batch in batches)
    lengths = sorted(int(n) for batch in batches for n in batch["attention_mask"].sum(1))
    scope = f"{args.scope} (last_k={args.last_k})" if args.scope == "last_k_layers" else args.scope
    print(
        f"device={args.device} dtype={args.dtype} threads={args.threads} torch={torch.__version__}\n"
        f"config={args.config} ({sum(p.numel() for p in problem.model.parameters()):,} parameters, random weights)\n"
        f"scope={scope}: {problem.num_params:,} parameters in {len(problem.names)} tensors\n"
        f"data={args.data.name}: {molecules} molecules in batches of {args.batch_size}, tokens per molecule "
        f"median {lengths[len(lengths) // 2]} max {lengths[-1]}; each method in a fresh process after one "
        "untimed warm-up batch",
        flush=True,
    )
    del problem, batches
    context = multiprocessing.get_context("spawn")  # a fresh process per method: its own peak memory
    results = {}
    for name in args.methods:
        with context.Pool(1) as pool:
            results[name] = pool.apply(measure, (args, name))

    finished = [name for name in args.methods if "scores" in results[name]]
    reference_name = finished[0] if finished else None
    print(
        f"{'method':<8}{'seconds':>10}{'molecules/s':>14}{'peak MiB':>11}{'speed-up vs loop':>18}{'max |diff|':>13}"
    )
    for name in args.methods:
        result = results[name]
        if "error" in result:
            print(f"{name:<8} failed: {result['error']}")
            continue
        loop = results.get("loop", {}).get("seconds")
        speedup = loop / result["seconds"] if loop else float("nan")
        reference = results[reference_name]["scores"]
        difference = float((result["scores"] - reference).abs().max() / reference.abs().max())
        print(
            f"{name:<8}{result['seconds']:>10.2f}{molecules / result['seconds']:>14.1f}{result['peak_mib']:>11.0f}"
            f"{speedup:>18.2f}{difference:>13.1e}"
        )
    memory = (
        "torch.cuda.max_memory_allocated" if torch.device(args.device).type == "cuda" else "process max RSS"
    )
    print(
        f"max |diff|: largest score difference from {reference_name!r}, relative to its largest |score|. "
        f"peak MiB: {memory} above its level with the model and data loaded (warm-up included)."
    )


if __name__ == "__main__":
    main()
