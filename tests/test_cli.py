"""Every script run as a user runs it: a subprocess on tiny data, checking the exit code and the files it writes.

One tiny regression run (trained once for the module) feeds influence, selection, a two-shard sweep and the
report, so the hand-offs between scripts are tested through their files, as on the command line. The tiny
quickstart starts in the background at the first test and is collected by the last, using the second core.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest

from molft.files import (
    ALL_RESULTS_FILE,
    DONE_MARKER,
    INFLUENCE_HISTOGRAM_FILE,
    INFLUENCE_SCORES_FILE,
    INFLUENCE_SUMMARY_FILE,
    MANIFEST_FILE,
    MLM_DATA_SUMMARY_FILE,
    PREDICTIONS_FILE,
    RUN_CONFIG_FILE,
    SELECTED_FILE,
    SPLIT_FILE,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for one script; generous, as a shared CI machine may be busy
N_TRAIN, N_POOL, N_CORPUS, K = 300, 40, 200, 10
# whatever the calling shell has set, the scripts see a quiet, offline, single-threaded, unsharded machine
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_"))},
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for name in ("SHARD", "DRY_RUN", "QUICKSTART_TINY", "SHARED"):
    ENV.pop(name, None)
TIMING_KEYS = ("runtime", "per_second", "wall_time")  # metrics that depend on the machine's load


class Files(NamedTuple):
    tmp: Path
    train: Path  # the first 300 molecules of Lipophilicity
    pool: Path  # the first 40 external molecules


def run(*command: str | Path, timeout: int = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """`command` from the repository root; fails the test with the end of its output unless it exits 0."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=ROOT,
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{(result.stdout + result.stderr)[-4000:]}"
    return result


def python(script: str, *args: str | Path, **env: str) -> subprocess.CompletedProcess:
    return run(sys.executable, script, *args, **env)


def head_lines(source: Path, target: Path, n_rows: int) -> Path:
    """The header and first `n_rows` lines of a shared csv, as `head` would cut it."""
    with source.open() as src:
        target.write_text("".join(islice(src, n_rows + 1)))
    return target


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def metrics(run_dir: Path) -> dict:
    """The run's all_results.json without the timing entries."""
    results = read_json(run_dir / ALL_RESULTS_FILE)
    return {k: v for k, v in results.items() if not any(t in k for t in TIMING_KEYS)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, data_dir) -> Files:
    tmp = tmp_path_factory.mktemp("cli")
    train = head_lines(data_dir / "lipophilicity.csv", tmp / "lipophilicity_300.csv", N_TRAIN)
    pool = head_lines(data_dir / "external_300.csv", tmp / "external_40.csv", N_POOL)
    return Files(tmp, train, pool)


@pytest.fixture(scope="module", autouse=True)
def quickstart_in_background(request, tmp_path_factory, data_dir):
    """Starts the tiny quickstart when a test of it is selected, so it runs beside the other tests."""
    if not any(item.name == "test_quickstart_tiny" for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("quickstart")
    log = (out / "quickstart.out").open("w")
    process = subprocess.Popen(
        ["bash", "scripts/quickstart.sh", str(out / "run")],
        cwd=ROOT,
        env={**ENV, "QUICKSTART_TINY": "1", "SHARED": str(data_dir.parent)},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so that a stop takes the running step with it
    )
    yield process, out
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    log.close()


@pytest.fixture(scope="module")
def regression_run(files) -> Path:
    out = files.tmp / "regression"
    python(
        "run_regression.py", "configs/regression_tiny.yaml", "--train_file", files.train, "--output_dir", out
    )
    return out


def test_run_regression(regression_run):
    for name in (SPLIT_FILE, ALL_RESULTS_FILE, PREDICTIONS_FILE, RUN_CONFIG_FILE, DONE_MARKER):
        assert (regression_run / name).is_file(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (regression_run / name).is_file(), name  # a loadable model folder
    results = read_json(regression_run / ALL_RESULTS_FILE)
    assert math.isfinite(results["test_rmse"]) and math.isfinite(results["eval_rmse"])
    split = read_json(regression_run / SPLIT_FILE)
    assert split["n_molecules"] == N_TRAIN and sum(split["sizes"].values()) == N_TRAIN
    predictions = pd.read_csv(regression_run / PREDICTIONS_FILE)
    assert predictions["split"].value_counts().to_dict() == split["sizes"]


def test_accelerate_launch_trains_the_same_model(files, regression_run):
    out = files.tmp / "accelerate"
    run(
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",  # `accelerate launch`, this Python
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--cpu", "run_regression.py", "configs/regression_tiny.yaml",
        "--train_file", files.train, "--output_dir", out,
    )  # fmt: skip
    assert (out / DONE_MARKER).is_file()
    assert metrics(out) == metrics(regression_run)  # one CPU process: the very same run


@pytest.fixture(scope="module")
def influence_run(files, regression_run) -> Path:
    out = files.tmp / "influence"
    python(
        "run_influence.py",
        "--model_name_or_path", regression_run,
        "--train_file", files.train,  # the run's own data, which its split.json indexes
        "--external_file", files.pool,
        "--estimator", "cg", "--scope", "head",
        "--output_dir", out, "--disable_tqdm", "true",
    )  # fmt: skip
    return out


def test_run_influence(influence_run):
    for name in (INFLUENCE_SCORES_FILE, INFLUENCE_SUMMARY_FILE, INFLUENCE_HISTOGRAM_FILE, DONE_MARKER):
        assert (influence_run / name).is_file(), name
    scores = pd.read_csv(influence_run / INFLUENCE_SCORES_FILE)
    # pool molecules in the run's validation/test split are left out of the scores (issue #13)
    pool = json.loads((influence_run / INFLUENCE_SUMMARY_FILE).read_text())["external_file"]
    n_scored = N_POOL - pool["heldout_overlap"]["left_out"]
    assert len(scores) == pool["n_scored"] == n_scored and pool["n_rows"] == N_POOL
    assert scores["score"].notna().all() and scores["score"].std() > 0
    assert sorted(scores["rank"]) == list(range(1, n_scored + 1))


@pytest.fixture(scope="module")
def selections(files, regression_run, influence_run) -> Path:
    """SELECTIONS_DIR for the sweep: a random and an influence selection of 10 external molecules."""
    out = files.tmp / "selections"
    scores = influence_run / INFLUENCE_SCORES_FILE
    for name, strategy in (
        ("random", ["--strategy", "random"]),
        ("influence_top", ["--strategy", "influence", "--mode", "top", "--scores_file", scores]),
    ):
        python(
            "run_selection.py",
            "--model_name_or_path", regression_run, "--train_file", files.train,
            "--external_file", files.pool, "--k", str(K), "--seed", "0", "--mmd_permutations", "20",
            "--output_dir", out / name, "--disable_tqdm", "true", *strategy,
        )  # fmt: skip
    return out


def test_run_selection(selections, influence_run):
    for name in ("random", "influence_top"):
        for file in (SELECTED_FILE, MANIFEST_FILE, DONE_MARKER):
            assert (selections / name / file).is_file(), f"{name}/{file}"
        assert len(pd.read_csv(selections / name / SELECTED_FILE)) == K
        assert read_json(selections / name / MANIFEST_FILE)["n_selected"] == K
    # the influence selection read the scores file: the 10 most helpful molecules outside the held-out split
    scores = pd.read_csv(influence_run / INFLUENCE_SCORES_FILE)
    eligible = scores[~scores["in_run_split"].isin(["validation", "test"])]
    chosen = pd.read_csv(selections / "influence_top" / SELECTED_FILE)
    assert sorted(chosen["index"]) == sorted(eligible.nsmallest(K, "score")["index"])


@pytest.fixture(scope="module")
def sweep(files, regression_run, selections) -> Path:
    """Two real runs (no extra molecules; the influence selection), one per shard, as two machines would."""
    out = files.tmp / "sweep"
    args = [
        "bash",
        "scripts/sweep.sh",
        out,
        regression_run / SPLIT_FILE,
        selections,
        "--train_file",
        files.train,
    ]
    grid = {"METHODS": "full", "STRATEGIES": "none influence_top", "SEEDS": "1"}
    grid |= {"CONFIG": "configs/regression_tiny.yaml", "LAUNCHER": sys.executable}
    plan = run(*args, **grid, DRY_RUN="1", SHARD="1/2").stdout
    assert "[2/2] to run: " + str(out / "full/influence_top/seed1") in plan
    assert "--extra_train_file " + str(selections / "influence_top" / SELECTED_FILE) in plan
    assert not out.exists()  # a dry run changes nothing
    for shard in ("0/2", "1/2"):
        assert "1 runs, 0 already done, 0 failed (2 in the grid)" in run(*args, **grid, SHARD=shard).stdout
    assert "sweep: 2 runs, 2 already done, 0 failed" in run(*args, **grid).stdout  # resumed: nothing to do
    return out


def test_sweep_script(sweep, selections):
    for strategy in ("none", "influence_top"):
        run_dir = sweep / "full" / strategy / "seed1"
        assert (run_dir / DONE_MARKER).is_file() and (run_dir / "log.txt").is_file()
        assert math.isfinite(read_json(run_dir / ALL_RESULTS_FILE)["test_rmse"])
    config = read_json(sweep / "full/influence_top/seed1" / RUN_CONFIG_FILE)
    assert str(selections / "influence_top" / SELECTED_FILE) in json.dumps(config)
    assert read_json(sweep / "full/influence_top/seed1" / ALL_RESULTS_FILE)["n_extra_train"] > 0


def test_report(files, sweep):
    out = files.tmp / "report"
    python("report.py", "--sweep_dir", sweep, "--output_dir", out)
    for name in ("report.md", "runs.csv", "cells.csv", "paired.csv"):
        assert (out / name).is_file(), name
    assert sorted(pd.read_csv(out / "runs.csv")["strategy"]) == ["influence_top", "none"]
    assert "influence_top − none" in (out / "report.md").read_text()


def test_run_mlm(files, data_dir):
    corpus = head_lines(data_dir / "pretrain_chembl30_zinc_120k.csv", files.tmp / "corpus.csv", N_CORPUS)
    out = files.tmp / "mlm"
    python(
        "run_mlm.py",
        "--config_name", "configs/molformer-tiny.json", "--train_file", corpus,
        "--output_dir", out, "--do_train", "--do_eval", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "64", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", "--use_cpu", "true",
    )  # fmt: skip
    for name in (ALL_RESULTS_FILE, MLM_DATA_SUMMARY_FILE, DONE_MARKER, "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert math.isfinite(read_json(out / ALL_RESULTS_FILE)["eval_loss"])


def test_split_difficulty(files):
    out = files.tmp / "splits"
    printed = python("scripts/split_difficulty.py", "--train_file", files.train, "--save_dir", out).stdout
    saved = sorted(path.stem for path in out.glob("*.json"))
    assert saved and "random" in saved
    assert sorted(line.split()[0] for line in printed.strip().splitlines()[1:]) == saved  # one row per file


def test_quickstart_shows_the_failing_step_log(files, data_dir):
    """A step that fails prints the end of its log, so the traceback is on screen, and stops the script."""
    out = files.tmp / "broken_quickstart"
    (out / "mlm").mkdir(parents=True)  # a "finished" pretraining without a model: step 2 cannot load it
    (out / "mlm" / DONE_MARKER).write_text("{}")
    (out / "mlm" / ALL_RESULTS_FILE).write_text('{"eval_initial_loss": 4.0, "eval_loss": 3.0}')
    result = subprocess.run(
        ["bash", "scripts/quickstart.sh", str(out)],
        cwd=ROOT,
        env={**ENV, "QUICKSTART_TINY": "1", "SHARED": str(data_dir.parent)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    assert "FAILED (exit" in result.stderr and "run_regression.py" in result.stderr
    last_line = (out / "regression.log").read_text().strip().splitlines()[-1]
    assert "Traceback (most recent call last)" in result.stderr and last_line in result.stderr
    assert "3/6" not in result.stdout  # stopped at the failing step


def test_quickstart_tiny(quickstart_in_background):
    """QUICKSTART_TINY=1 bash scripts/quickstart.sh OUT: every step and hand-off of the pipeline, in seconds."""
    process, out = quickstart_in_background
    process.wait(timeout=2 * TIMEOUT)
    printed = (out / "quickstart.out").read_text()
    assert process.returncode == 0, printed[-4000:]
    run_dir = out / "run"
    for step in ("mlm", "regression", "influence", "selections/influence_top"):
        assert (run_dir / step / DONE_MARKER).is_file(), step
    for cell in ("none", "influence_top"):
        assert (run_dir / "sweep/full" / cell / "seed1" / DONE_MARKER).is_file(), cell
    assert (run_dir / "report" / "report.md").is_file()
    assert "6/6 report" in printed and "finished: outputs under" in printed
