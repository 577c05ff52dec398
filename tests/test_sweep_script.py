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
    (selections / "weighted" / "run_args.txt").write_text(
        "--extra_train_weights score --weight_mapping helpful_clip\n"
    )
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
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
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
    result = run_sweep(
        tmp_path, split, selections, {**env, "METHODS": "full", "STRATEGIES": "random weighted", "SEEDS": "1"}
    )
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


# --- sharding: SHARD=I/N, or a Slurm job array, splits the grid over machines sharing SWEEP_DIR ---

GRID = {f"{m}/{s}/seed{seed}" for m in ("full", "lora") for s in ("none", "random") for seed in (1, 2)}


def shard_env(env: dict, tmp_path: Path, name: str, **variables: str) -> dict:
    """The fixture's environment with its own calls log, free of any Slurm variables of the test machine."""
    clean = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k not in ("SHARD", "DRY_RUN")}
    return {**clean, "CALLS_LOG": str(tmp_path / f"calls_{name}.jsonl"), **variables}


def run_dirs(env) -> set[str]:
    return {a[a.index("--output_dir") + 1].split("sweep/")[1] for a in calls(env)}


def planned(stdout: str) -> set[str]:
    """The runs a dry run says it would start."""
    return {
        line.split("sweep/")[1] for line in stdout.splitlines() if "to run: " in line or "to redo: " in line
    }


def test_shards_are_disjoint_and_cover_the_grid(sweep_env):
    tmp_path, split, selections, env = sweep_env
    envs = [shard_env(env, tmp_path, str(i), SHARD=f"{i}/3") for i in range(3)]
    command = ["bash", str(SWEEP), str(tmp_path / "sweep"), str(split), str(selections)]
    # the three shards run at the same time on one sweep folder, as array tasks on shared storage do
    procs = [subprocess.Popen(command, env=e, cwd=ROOT, stdout=subprocess.PIPE, text=True) for e in envs]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    shards = [run_dirs(e) for e in envs]
    assert [len(s) for s in shards] == [3, 3, 2]  # round-robin over the 8 runs
    assert sum(len(s) for s in shards) == len(set().union(*shards))  # no run in two shards
    assert set().union(*shards) == GRID
    assert all((tmp_path / "sweep" / run / "run_complete.json").is_file() for run in GRID)
    assert "sweep shard 2/3: 2 runs, 0 already done, 0 failed (8 in the grid)" in outputs[2]
    # the whole grid afterwards: every run is done already
    whole = run_sweep(tmp_path, split, selections, shard_env(env, tmp_path, "whole"))
    assert "sweep: 8 runs, 8 already done, 0 failed" in whole.stdout


def test_finished_shard_is_skipped_on_rerun_and_others_are_left_alone(sweep_env):
    tmp_path, split, selections, env = sweep_env
    first = shard_env(env, tmp_path, "first", SHARD="0/2")
    assert run_sweep(tmp_path, split, selections, first).returncode == 0
    assert run_dirs(first) == {"full/none/seed1", "full/random/seed1", "lora/none/seed1", "lora/random/seed1"}
    # shard 1 is half-way through a run on another machine: its folder has no marker yet
    in_progress = tmp_path / "sweep" / "lora/random/seed2" / "checkpoint-5"
    in_progress.mkdir(parents=True)

    again = shard_env(env, tmp_path, "again", SHARD="0/2")
    result = run_sweep(tmp_path, split, selections, again)
    assert result.returncode == 0, result.stderr
    assert calls(again) == []
    assert "sweep shard 0/2: 4 runs, 4 already done, 0 failed (8 in the grid)" in result.stdout
    assert in_progress.is_dir()  # another shard's unfinished run is never removed

    other = shard_env(env, tmp_path, "other", SHARD="1/2")
    assert run_sweep(tmp_path, split, selections, other).returncode == 0
    assert run_dirs(other) == GRID - run_dirs(first)
    assert not in_progress.exists()  # its own shard redid it cleanly


def test_slurm_array_variables_choose_the_shard(sweep_env):
    tmp_path, split, selections, env = sweep_env
    dry = shard_env(env, tmp_path, "dry", DRY_RUN="1")

    def plan(**variables: str) -> set[str]:
        result = run_sweep(tmp_path, split, selections, {**dry, **variables})
        assert result.returncode == 0, result.stderr
        return planned(result.stdout)

    by_shard = [plan(SHARD=f"{i}/3") for i in range(3)]
    # --array=1-3 (task ids 1, 2, 3) and --array=0-2 both give shards 1, 2, 0 / 0, 1, 2: task id mod count
    for task_id in range(4):
        assert plan(SLURM_ARRAY_TASK_ID=str(task_id), SLURM_ARRAY_TASK_COUNT="3") == by_shard[task_id % 3]
    assert plan(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="3", SHARD="0/1") == GRID  # SHARD wins
    stepped = run_sweep(
        tmp_path, split, selections,
        {**dry, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "2"},
    )  # fmt: skip
    assert stepped.returncode == 2 and "plain range" in stepped.stderr
    assert calls(dry) == []


@pytest.mark.parametrize("shard", ["2/2", "1", "-1/2", "0/0", "a/b"])
def test_bad_shard_is_a_clear_error(sweep_env, shard):
    tmp_path, split, selections, env = sweep_env
    result = run_sweep(tmp_path, split, selections, shard_env(env, tmp_path, "bad", SHARD=shard))
    assert result.returncode == 2
    assert "0-based" in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_dry_run_prints_the_plan_and_changes_nothing(sweep_env):
    tmp_path, split, selections, env = sweep_env
    sweep = tmp_path / "sweep"
    (sweep / "full/none/seed1").mkdir(parents=True)
    (sweep / "full/none/seed1/run_complete.json").write_text("{}")
    crashed = sweep / "lora/random/seed2/checkpoint-5"
    crashed.mkdir(parents=True)
    dry = shard_env(env, tmp_path, "dry", DRY_RUN="1")
    result = run_sweep(tmp_path, split, selections, dry)
    assert result.returncode == 0, result.stderr
    assert calls(dry) == []
    assert crashed.is_dir()  # nothing removed
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.glob("*/*/*")) == [
        "full/none/seed1",
        "lora/random/seed2",
    ]  # nothing created
    lines = result.stdout.splitlines()
    assert any(line.endswith("done already: " + str(sweep / "full/none/seed1")) for line in lines)
    assert any(line.endswith("incomplete, to redo: " + str(sweep / "lora/random/seed2")) for line in lines)
    assert planned(result.stdout) == GRID - {"full/none/seed1"}
    command = next(line for line in lines if "lora/none/seed2" in line and "--peft" in line)
    assert "--peft lora" in command and "--seed 2" in command and "--learning_rate 2e-3" in command
    assert "sweep: 8 runs, 1 already done, 7 to run (8 in the grid)" in result.stdout


def test_sbatch_example_runs_its_array_task_shard(sweep_env):
    tmp_path, split, selections, env = sweep_env
    task = shard_env(
        env, tmp_path, "task", SLURM_ARRAY_TASK_ID="4", SLURM_ARRAY_TASK_COUNT="4", SLURM_SUBMIT_DIR=str(ROOT)
    )  # the last task of --array=1-4: shard 0/4
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "sweep.sbatch"), str(tmp_path / "sweep"), str(split), str(selections)],
        env=task, capture_output=True, text=True, cwd=tmp_path,  # Slurm starts it elsewhere
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert run_dirs(task) == {"full/none/seed1", "lora/none/seed1"}  # runs 0 and 4 of 8
    assert "sweep shard 0/4: 2 runs, 0 already done, 0 failed (8 in the grid)" in result.stdout
