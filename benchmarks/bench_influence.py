"""Time and peak memory of scoring external molecules: batched per-sample gradients vs one backward each.

Scoring a candidate is one dot product of its loss gradient with the inverse-HVP of the query gradient
(solved once, reused for every candidate), so the cost is the candidates' gradients. Six ways, one run:

  loop           one backward pass per molecule (`InfluenceProblem.per_sample_grads_looped`, the reference),
                 each molecule cut from its padded batch, as `grad_method="loop"` scores a batch
  loop_alone     the same loop over molecules tokenised one at a time: no padding, so the fairest per-molecule
                 reference (a batch's padding is work the loop would not do on its own)
  vmap           per-sample gradients of a whole batch in one vectorised backward (`per_sample_grads`)
  jvp            forward-mode directional derivatives g_i . v for the batch, no per-sample gradient ever built
                 (`InfluenceProblem.grad_dot`; what scoring used before the layerwise path)
  layerwise      per-sample gradients [B, P] read off one ordinary backward of the batch's summed loss: each
                 Linear/LayerNorm/Embedding's inputs and output gradients (`LayerwiseProblem.per_sample_grads`)
  layerwise_dot  the same backward, each layer's contribution contracted with v at once, no [B, P] matrix
                 (`LayerwiseProblem.grad_dot`; what `compute_influence` now uses by default)

Random weights (the cost does not depend on them), a vocabulary built from the SMILES, eval mode with the
feature maps pinned, the influence scope "all" by default (every parameter: the most expensive case).
The stand-in inverse-HVP is a random unit vector; all methods must give the same scores. Each method runs
in its own fresh process (same seed, same weights), so its peak memory is its own: the CUDA allocator's
peak, or on CPU the process's max RSS, both above the level with the model and data loaded. After one
untimed warm-up batch each, the processes take turns: `--repeats` rounds in which every method makes one
timed pass over all molecules; the median pass is reported with the range, so a shared machine's load
falls on every method alike and shows as spread rather than as one method's luck.

    python benchmarks/bench_influence.py                        # CPU, configs/molformer-small.json
    python benchmarks/bench_influence.py --device cuda          # CUDA, the MoLFormer-XL config
    python benchmarks/bench_influence.py --scope last_k_layers --last_k 2 --dtype float64 --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
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
from molft.influence.molformer import layerwise_layout  # noqa: E402
from molft.influence.per_sample import LayerwiseProblem  # noqa: E402
from molft.model_utils import fixed_feature_maps  # noqa: E402
from tokenization_molformer import MolformerTokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
SMALL_CONFIG = ROOT / "configs" / "molformer-small.json"
XL_CONFIG = SHARED / "golden" / "ibm-molformer-xl-hub" / "config.json"
DEFAULT_DATA = SHARED / "data" / "external_300.csv"
METHODS = ("loop", "loop_alone", "vmap", "jvp", "layerwise", "layerwise_dot")
LOOPS = ("loop", "loop_alone")  # the per-molecule references the ratios are taken against
EARLIER = ("vmap", "jvp")  # the batched methods before the layerwise ones
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
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.config = args.config or (XL_CONFIG if torch.device(args.device).type == "cuda" else SMALL_CONFIG)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
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


def build(
    args: argparse.Namespace, method: str = "loop"
) -> tuple[InfluenceProblem, list[Batch], torch.Tensor]:
    """The same random model, scope, batches and stand-in inverse-HVP in every process (fixed seed)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    molecules_per_batch = 1 if method == "loop_alone" else args.batch_size
    tokenizer, batches = load_batches(args.data, args.num_molecules, molecules_per_batch)
    config = MolformerConfig.from_pretrained(args.config)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    model = MolformerForRegression(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    params = select_parameters(model, args.scope, last_k=args.last_k)
    if method.startswith("layerwise"):
        problem = LayerwiseProblem(model, params, grad_method="layerwise", layout=layerwise_layout(model))
    else:
        problem = InfluenceProblem(model, params, grad_method="vmap", vmap_chunk_size=args.vmap_chunk_size)
    direction = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(args.seed))
    direction = (direction / direction.norm()).to(device=device, dtype=problem.dtype)
    return problem, [problem.to_device(batch) for batch in batches], direction


def score_step(
    name: str, problem: InfluenceProblem, direction: torch.Tensor
) -> Callable[[Batch], torch.Tensor]:
    if name in LOOPS:
        return lambda batch: -(problem.per_sample_grads_looped(batch) @ direction)
    if name in ("vmap", "layerwise"):
        return lambda batch: -(problem.per_sample_grads(batch) @ direction)
    return lambda batch: -problem.grad_dot(batch, direction[None])[0]


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Worker:
    """One method in its own process (its own peak memory), kept alive so passes can alternate between methods:
    a shared machine's load then falls on every method alike instead of on whichever ran during a busy spell."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        torch.set_num_threads(args.threads)
        self.problem, self.batches, direction = build(args, name)
        self.device = self.problem.device
        self.step = score_step(name, self.problem, direction)
        synchronise(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = psutil.Process().memory_info().rss
        self.run(self.batches[:1])  # warm-up: vmap tracing, allocator growth, the layerwise self-check

    def run(self, batches: list[Batch]) -> torch.Tensor:
        with fixed_feature_maps(self.problem.model):
            scores = torch.cat([self.step(batch) for batch in batches]).double().cpu()
        synchronise(self.device)
        return scores

    def timed_pass(self) -> tuple[float, float, torch.Tensor]:
        """(wall seconds, this process's CPU seconds, scores) of one pass over all batches."""
        start, cpu_start = time.perf_counter(), time.process_time()
        scores = self.run(self.batches)
        return time.perf_counter() - start, time.process_time() - cpu_start, scores

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:  # ru_maxrss is KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return peak / 2**20


WORKER: Worker | None = None


def _call_worker(method: str, *args: Any) -> Any:
    """In a method's process: "setup" builds its Worker (and warms up), any other name calls that method.

    A non-finite gradient (e.g. forward mode overflowing in float32) comes back as the method's result."""
    global WORKER
    try:
        if method == "setup":
            WORKER = Worker(*args)
            return None
        return getattr(WORKER, method)()
    except NonFiniteGradientError as error:
        return NonFiniteGradientError(str(error).split(":")[0])


def measure(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each method in its own process; `repeats` rounds in which every method makes one timed pass in turn."""
    context = multiprocessing.get_context("spawn")
    pools = {name: context.Pool(1) for name in names}
    passes: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    try:
        setups = {name: pools[name].apply_async(_call_worker, ("setup", args, name)) for name in names}
        for name, setup in setups.items():
            if isinstance(error := setup.get(), Exception):
                results[name]["error"] = str(error)
        for _ in range(args.repeats):
            for name in names:
                if "error" in results[name]:
                    continue
                outcome = pools[name].apply(_call_worker, ("timed_pass",))
                if isinstance(outcome, Exception):
                    results[name]["error"] = str(outcome)
                    continue
                passes[name].append(outcome[:2])
                results[name]["scores"] = outcome[2]
        for name in names:
            if "error" not in results[name]:
                results[name]["peak_mib"] = pools[name].apply(_call_worker, ("peak_mib",))
                wall, cpu = zip(*passes[name], strict=True)
                results[name].update(wall=statistics.median(wall), cpu=statistics.median(cpu))
                results[name]["spread"] = (min(wall), max(wall))
    finally:
        for pool in pools.values():
            pool.terminate()
    return results


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
        f"median {lengths[len(lengths) // 2]} max {lengths[-1]}; each method in its own process after one "
        f"untimed warm-up batch, {args.repeats} rounds of one timed pass per method in turn; load average "
        f"{' '.join(f'{load:.2f}' for load in psutil.getloadavg())}",
        flush=True,
    )
    del problem, batches
    results = measure(args, args.methods)

    # CPU seconds of a single-threaded CPU run count the work alone, not the time a busy machine's other jobs
    # held the core (on an idle machine the two agree); with more threads or on CUDA, wall seconds count
    clock = "cpu" if torch.device(args.device).type == "cpu" and args.threads == 1 else "wall"
    finished = [name for name in args.methods if "scores" in results[name]]
    reference_name = finished[0] if finished else None
    earlier = [name for name in EARLIER if name in finished]
    old_best = min(earlier, key=lambda name: results[name][clock]) if earlier else "none"
    print(
        f"{'method':<14}{'cpu s':>8}{'wall s':>8}{'wall min-max':>14}{'molecules/s':>12}{'peak MiB':>9}"
        f"{'vs loop':>9}{'vs alone':>9}{f'vs {old_best}' if earlier else '':>10}{'max |diff|':>11}"
    )
    for name in args.methods:
        result = results[name]
        if "error" in result:
            print(f"{name:<14} failed: {result['error']}")
            continue
        ratios = [
            results[base][clock] / result[clock] if clock in results.get(base, {}) else float("nan")
            for base in (*LOOPS, old_best)
        ]
        reference = results[reference_name]["scores"]
        difference = float((result["scores"] - reference).abs().max() / reference.abs().max())
        low, high = result["spread"]
        print(
            f"{name:<14}{result['cpu']:>8.2f}{result['wall']:>8.2f}{f'{low:.2f}-{high:.2f}':>14}"
            f"{molecules / result[clock]:>12.1f}{result['peak_mib']:>9.0f}{ratios[0]:>8.2f}x{ratios[1]:>8.2f}x"
            f"{f'{ratios[2]:.2f}x' if earlier else '':>10}"
            f"{difference:>11.1e}"
        )
    memory = (
        "torch.cuda.max_memory_allocated" if torch.device(args.device).type == "cuda" else "process max RSS"
    )
    print(
        f"max |diff|: largest score difference from {reference_name!r}, relative to its largest |score|. "
        f"peak MiB: {memory} above its level with the model and data loaded (warm-up included). cpu s, wall s: "
        "medians of the timed passes (wall min-max: their range). molecules/s and vs (speed-up over that "
        "method; alone: loop_alone, the loop without padding"
        + (f"; {old_best}: the faster of the earlier batched methods {'/'.join(EARLIER)}" if earlier else "")
        + f") use {clock} seconds."
    )


if __name__ == "__main__":
    main()
