"""scripts/sweep.sh: grid, skipping finished runs, redoing crashed ones, reporting failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.sh"

# Stands in for run_regression.py: records its arguments, writes the completion marker, and fails on demand.
STUB = """
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
with open(os.environ["CALLS_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\\n")
if os.environ.get("FAIL_SEED") == args[args.index("--seed") + 1]:
    sys.exit(3)
os.makedirs(out, exist_ok=True)
json.dump({"peft": args[args.index("--peft") + 1]}, open(os.path.join(out, "run_complete.json"), "w"))
"""


@pytest.fixture()
def sweep_env(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    split = tmp_path / "split.json"
    split.write_text("{}")
    selections = tmp_path / "selections"
    (selections / "random").mkdir(parents=True)
    (selections / "random" / "selected.csv").write_text("SMILES,Label\nCCO,1.0\n")
    (selections / "weighted").mkdir()
    (selections / "weighted" / "selected.csv").write_text("SMILES,Label,score\nCCO,1.0,-0.2\n")
    (selections / "weighted" / "run_args.txt").write_text("--extra_train_weights score --weight_mapping helpful_clip\n")
    env = {
        **os.environ,
        "METHODS": "full lora",
        "STRATEGIES": "none random",
        "SEEDS": "1 2",
        "LAUNCHER": sys.executable,
        "SCRIPT": str(stub),
        "CONFIG": "cfg.yaml",
        "CALLS_LOG": str(tmp_path / "calls.jsonl"),
        "METHOD_ARGS_lora": "--learning_rate 2e-3",
    }
    return tmp_path, split, selections, env


def run_sweep(tmp_path, split, selections, env):
    return subprocess.run(
        ["bash", str(SWEEP), str(tmp_path / "sweep"), str(split), str(selections)],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )


def calls(env) -> list[list[str]]:
    path = Path(env["CALLS_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_grid_runs_every_cell_with_its_flags(sweep_env):
    tmp_path, split, selections, env = sweep_env
    result = run_sweep(tmp_path, split, selections, env)
    assert result.returncode == 0, result.stderr
    made = calls(env)
    assert len(made) == 8
    full_random_1 = next(a for a in made if a[a.index("--output_dir") + 1].endswith("full/random/seed1"))
    assert full_random_1[:1] == ["cfg.yaml"]
    assert full_random_1[full_random_1.index("--peft") + 1] == "none"  # "full" means no PEFT
    assert full_random_1[full_random_1.index("--extra_train_file") + 1].endswith("random/selected.csv")
    assert full_random_1[full_random_1.index("--split_file") + 1] == str(split)
    lora_none = next(a for a in made if a[a.index("--output_dir") + 1].endswith("lora/none/seed2"))
    assert "--extra_train_file" not in lora_none
    assert lora_none[-2:] == ["--learning_rate", "2e-3"]  # METHOD_ARGS_lora reaches lora runs only
    assert "--learning_rate" not in full_random_1


def test_resume_runs_only_what_is_missing(sweep_env):
    tmp_path, split, selections, env = sweep_env
    assert run_sweep(tmp_path, split, selections, env).returncode == 0
    sweep = tmp_path / "sweep"
    # one run crashed half-way (directory without marker), one was never started
    (sweep / "lora/random/seed2/run_complete.json").unlink()
    (sweep / "lora/random/seed2/checkpoint-5").mkdir()
    import shutil

    shutil.rmtree(sweep / "full/none/seed1")
    Path(env["CALLS_LOG"]).unlink()
    result = run_sweep(tmp_path, split, selections, env)
    assert result.returncode == 0, result.stderr
    redone = sorted(a[a.index("--output_dir") + 1].split("sweep/")[1] for a in calls(env))
    assert redone == ["full/none/seed1", "lora/random/seed2"]
    assert not (sweep / "lora/random/seed2/checkpoint-5").exists()  # the crashed run restarted cleanly
    assert "8 runs, 6 already done, 0 failed" in result.stdout


def test_failures_are_reported_and_exit_nonzero(sweep_env):
    tmp_path, split, selections, env = sweep_env
    result = run_sweep(tmp_path, split, selections, {**env, "FAIL_SEED": "2"})
    assert result.returncode == 1
    assert "4 failed" in result.stdout
    assert len(calls(env)) == 8  # the other runs still ran
    assert not (tmp_path / "sweep/full/none/seed2/run_complete.json").exists()


def test_strategy_run_args_reach_only_that_strategy(sweep_env):
    tmp_path, split, selections, env = sweep_env
    result = run_sweep(tmp_path, split, selections, {**env, "METHODS": "full", "STRATEGIES": "random weighted", "SEEDS": "1"})
    assert result.returncode == 0, result.stderr
    made = {a[a.index("--output_dir") + 1].split("sweep/")[1]: a for a in calls(env)}
    weighted = made["full/weighted/seed1"]
    assert weighted[weighted.index("--extra_train_weights") + 1] == "score"
    assert weighted[weighted.index("--weight_mapping") + 1] == "helpful_clip"
    assert "--extra_train_weights" not in made["full/random/seed1"]


def test_missing_selection_file_is_a_clear_error(sweep_env):
    tmp_path, split, selections, env = sweep_env
    result = run_sweep(tmp_path, split, selections, {**env, "STRATEGIES": "none diversity"})
    assert result.returncode == 2
    assert "diversity/selected.csv" in result.stderr
    assert calls(env) == []
