#!/usr/bin/env python
"""CPU threads for a small MoLFormer: training speed with 1 thread vs all cores, alone and beside another job.

The README main command once took 45 min instead of 6 on a busy 2-core machine, because torch used every core
for a 0.8M-parameter model and fought the other job for them. This measures why the training scripts pick one
thread for small models on the CPU (molft.threads): each setting trains the README main command's model
(configs/regression_small.yaml: molformer-small narrowed to 0.8M parameters) on Lipophilicity batches for
`--steps` steps in a fresh process, `--repeats` times, interleaved; the median is reported. "busy" runs the same
while a competing single-threaded process spins on one core, as another user's job would.

    OMP_NUM_THREADS is set per child process by this script; run it on an otherwise idle machine:
    python benchmarks/bench_threads.py
    python benchmarks/bench_threads.py --steps 40 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = "hidden_size=128,intermediate_size=256,num_hidden_layers=4,num_attention_heads=4"


def worker(steps: int, batch_size: int) -> None:
    """Train `steps` steps in this process (threads set by the parent) and print seconds per step."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from configuration_molformer import MolformerConfig
    from modeling_molformer_reg import MolformerForRegression
    from molft.data import load_raw_dataset
    from tokenization_molformer import MolformerTokenizer

    frame = next(iter(load_raw_dataset("lipophilicity").frames.values()))
    smiles = frame["smiles"].tolist()[: steps * batch_size]
    labels = frame["exp"].to_numpy(np.float32)[: len(smiles)]
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    config = MolformerConfig.from_json_file(str(ROOT / "configs" / "molformer-small.json"))
    config.update_from_string(OVERRIDES)
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    torch.manual_seed(0)
    model = MolformerForRegression(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = []
    for start in range(0, len(smiles), batch_size):
        batch = tokenizer(smiles[start : start + batch_size], padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor(labels[start : start + batch_size])
        batches.append(batch)
    times = []
    for batch in [batches[0], *batches]:  # the first step warms up and is not timed
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {"s_per_step": statistics.mean(times[1:]), "params": params, "threads": torch.get_num_threads()}
        )
    )


def measure(threads: int, busy: bool, steps: int, batch_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], env=env) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", "--steps", str(steps), "--batch_size", str(batch_size)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="Timed optimizer steps per measurement.")
    parser.add_argument("--repeats", type=int, default=3, help="Measurements per setting (median shown).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.batch_size)
        return
    cores = os.cpu_count() or 1
    settings = [(t, busy) for busy in (False, True) for t in sorted({1, cores})]
    runs: dict[tuple[int, bool], list[float]] = {s: [] for s in settings}
    params = 0
    for _ in range(args.repeats):  # interleaved, so drifting load hits every setting alike
        for threads, busy in settings:
            result = measure(threads, busy, args.steps, args.batch_size)
            runs[(threads, busy)].append(result["s_per_step"])
            params = result["params"]
    print(
        f"Small MoLFormer ({params / 1e6:.2f}M parameters), batch {args.batch_size}, {args.steps} training steps, "
        f"{cores} cores; median of {args.repeats} fresh processes per setting"
    )
    print(f"{'machine':<34}{'threads':>8}{'s/step':>9}{'molecules/s':>13}")
    for (threads, busy), values in runs.items():
        seconds = statistics.median(values)
        machine = "busy (1 other process spinning)" if busy else "idle"
        print(f"{machine:<34}{threads:>8}{seconds:>9.3f}{args.batch_size / seconds:>13.1f}")
    for busy in (False, True):
        one = statistics.median(runs[(1, busy)])
        many = statistics.median(runs[(cores, busy)])
        print(
            f"{'busy' if busy else 'idle'}: {cores} threads take {many / one:.2f}x the time of 1 thread per step"
        )


if __name__ == "__main__":
    main()
