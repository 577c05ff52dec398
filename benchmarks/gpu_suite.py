"""One command for a GPU: what MoLFormer-XL costs to run, fine-tune, score and pretrain here.

    python benchmarks/gpu_suite.py --output_dir outputs/gpu_suite        # one H100/H200, under 8 minutes
    python benchmarks/gpu_suite.py --smoke --output_dir /tmp/gpu_suite  # CPU, tiny configs, seconds (CI)

Sections, cheapest and most certain first, so that a time budget (--time_budget_s) cuts the optional ones:

1. backbone: the XL encoder, forward and forward+backward, bf16 autocast, batches of 64 and 256 molecules,
   length-grouped (sorted by length, little padding) and padded (random molecules, padded to the longest),
   eager, eager with `fused_qkv`, eager with `fused_qkv` and `padding_free`, and torch.compile (last, as
   it compiles);
2. finetune: one epoch of Lipophilicity through run_regression.main with an XL-config model (random
   weights: the cost does not depend on them), full and LoRA: molecules/s, peak memory, 20 epochs projected;
3. influence: run_influence.main over the 300 external molecules, on the LoRA run (scope lora, DataInf) and
   on the full run (scope last_k_layers, CG with a bounded number of iterations);
4. mlm: masked-LM training steps (AdamW) on the pretraining corpus, eager and compiled.

Model FLOPs utilisation is the matmul FLOPs of the real (unpadded) tokens per second over the GPU's dense
bf16 peak, for GPUs whose peak is known (or --peak_tflops). Writes gpu_suite.json (every figure with the
settings and the machine) and gpu_suite.md (the tables). `--smoke` runs the same code on the CPU with the
tiny config, a slice of each file and dynamo's eager backend (the capture without code generation), so
CI proves the whole suite runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# the repository (model code, molft) and benchmarks/ itself (gpu_measure): the tests load this file by path,
# so the suite cannot count on `python benchmarks/gpu_suite.py` having put its own folder on sys.path
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gpu_measure import Settings, backbone, finetune, gpu_peak_tflops, influence, mlm  # noqa: E402

from molft.io import write_json, write_text  # noqa: E402

logger = logging.getLogger("gpu_suite")

DATA = ROOT.parent / "shared" / "data"
XL_CONFIG = ROOT.parent / "shared" / "golden" / "ibm-molformer-xl-hub"
TINY_CONFIG = ROOT / "configs" / "molformer-tiny.json"
JSON_FILE, MARKDOWN_FILE = "gpu_suite.json", "gpu_suite.md"
SECTIONS = ("backbone", "finetune", "influence", "mlm", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="gets gpu_suite.json and gpu_suite.md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, slices: the CI run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch_sizes", default="64,256")
    parser.add_argument("--num_batches", type=int, default=8, help="distinct batches per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per figure (median)")
    parser.add_argument("--finetune_batch_size", type=int, default=64)
    parser.add_argument(
        "--influence_train_samples", type=int, default=1000, help="training molecules the curvature sees"
    )
    parser.add_argument("--cg_max_iter", type=int, default=20, help="CG iterations of the last-layers run")
    parser.add_argument(
        "--influence_dtype", default="float64", help="float64 (the scripts' default) | float32"
    )
    parser.add_argument("--mlm_batch_size", type=int, default=256)
    parser.add_argument("--mlm_steps", type=int, default=10, help="timed masked-LM steps")
    parser.add_argument("--projected_epochs", type=int, default=20)
    parser.add_argument(
        "--time_budget_s", type=float, default=450.0, help="later sections are skipped past it"
    )
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="dense bf16 peak for MFU (else looked up)"
    )
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    common = {
        "device": device,
        "autocast_bf16": bf16,
        "lipophilicity": DATA / "lipophilicity.csv",
        "external": DATA / "external_300.csv",
        "corpus": DATA / "pretrain_chembl30_zinc_120k.csv",
        "influence_dtype": args.influence_dtype,
        "projected_epochs": args.projected_epochs,
        "time_budget_s": args.time_budget_s,
        "peak_tflops": args.peak_tflops,
    }
    if args.smoke:
        return Settings(
            **common, config=TINY_CONFIG, batch_sizes=(4, 8), num_batches=2, repeats=1, compile_backend="eager",
            finetune_batch_size=16, finetune_max_steps=2, influence_train_samples=16, cg_max_iter=2,
            mlm_batch_size=8, mlm_steps=2,
        )  # fmt: skip
    return Settings(
        **common, config=XL_CONFIG, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        num_batches=args.num_batches, repeats=args.repeats, compile_backend="inductor",
        finetune_batch_size=args.finetune_batch_size, finetune_max_steps=None,
        influence_train_samples=args.influence_train_samples, cg_max_iter=args.cg_max_iter,
        mlm_batch_size=args.mlm_batch_size, mlm_steps=args.mlm_steps,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def environment(settings: Settings) -> dict[str, Any]:
    import transformers

    device = torch.device(settings.device)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": settings.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "peak_bf16_tflops": gpu_peak_tflops(device, settings.peak_tflops),
        "autocast": "bf16" if settings.autocast_bf16 else "fp32",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "commit": commit,
    }


class Budget:
    """Runs sections while time is left; a skipped section is recorded with the reason, never dropped."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()
        self.timings: dict[str, float] = {}
        self.skipped: dict[str, str] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[bool]:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.seconds:
            self.skipped[name] = f"time budget: {elapsed:.0f} s spent of {self.seconds:.0f} s"
            logger.warning("Skipping %s (%s).", name, self.skipped[name])
            yield False
            return
        logger.info("Section %s (%.0f s so far)", name, elapsed)
        start = time.perf_counter()
        try:
            yield True
        finally:
            self.timings[name] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # its own handler: the scripts it runs reconfigure the root logger
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    settings = build_settings(args)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; choose from {SECTIONS}.")
    if "influence" in sections and "finetune" not in sections:
        raise ValueError("--sections: influence scores the finetune section's runs; add finetune.")
    workdir = args.output_dir / "runs"
    workdir.mkdir(parents=True, exist_ok=True)
    budget = Budget(settings.time_budget_s)
    result: dict[str, Any] = {
        "settings": {k: str(v) for k, v in asdict(settings).items()},
        "smoke": args.smoke,
    }
    result["environment"] = environment(settings)
    runs: dict[str, Path] = {}
    for name in sections:
        with budget.section(name) as go:
            if not go:
                continue
            if name == "backbone":
                result["backbone"] = backbone(settings, ("eager", "eager fused_qkv", "eager padding_free"))
            elif name == "finetune":
                result["finetune"], runs = finetune(settings, workdir)
            elif name == "influence":
                result["influence"] = influence(settings, runs, workdir)
            elif name == "mlm":
                result["mlm"] = mlm(settings, ("eager",))
            elif name == "compile":
                result["backbone"] = result.get("backbone", []) + backbone(settings, ("compile",))
                result["mlm"] = result.get("mlm", []) + mlm(settings, ("compile",))
    result["section_seconds"] = budget.timings
    result["skipped"] = budget.skipped
    result["total_s"] = time.perf_counter() - budget.start
    write_json(args.output_dir / JSON_FILE, result)
    write_text(args.output_dir / MARKDOWN_FILE, markdown(result))
    logger.info(
        "Wrote %s and %s (%.0f s).",
        args.output_dir / JSON_FILE,
        args.output_dir / MARKDOWN_FILE,
        result["total_s"],
    )
    return result


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# MoLFormer GPU suite" + (" (smoke run: CPU, tiny config)" if result["smoke"] else ""),
        "",
        f"{env['gpu'] or env['device']}, {env['autocast']} autocast, torch {env['torch']}, CUDA {env['cuda']}, "
        f"transformers {env['transformers']}, commit {env['commit']}; {result['total_s']:.0f} s in all.",
        "MFU: matmul FLOPs of the real tokens per second over the dense bf16 peak "
        f"({env['peak_bf16_tflops'] or 'unknown'} TFLOP/s); forward+backward counts 3x the forward.",
    ]
    tables = {
        "backbone": ("Backbone", ["mode", "pass", "batch_size", "batches", "molecules_per_s", "tokens_per_s",
                                  "ms_per_batch", "padding_overhead", "first_call_s", "peak_mib", "mfu"]),
        "finetune": ("Fine-tuning, one epoch of Lipophilicity", None),
        "influence": ("Influence over the external molecules", None),
        "mlm": ("Masked-LM training steps", None),
    }  # fmt: skip
    for key, (title, columns) in tables.items():
        rows = result.get(key)
        if not rows:
            continue
        columns = columns or list(rows[0])
        lines += ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    if result["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {name}: {why}" for name, why in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def format_cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


if __name__ == "__main__":
    main()
