#!/usr/bin/env python
"""Test accuracy of this project's main recipe beside its peers, on exactly the same molecules, in one command.

For every split (the six fixed Lipophilicity splits of ../shared/splits by default) and every seed it runs
* molformer: `python run_regression.py <config> --split_file <split> --seed <seed> --output_dir ...` plus every
  flag this script does not know (passed through), reading the test metrics from all_results.json;
* rf: a random forest on ECFP4 (molft.baselines: 500 trees, seeded), trained on the training part only;
* chemprop: `chemprop train` (v2) with the same split, when the chemprop CLI is installed (else a logged skip).
All three read the same split file, so train, validation and test hold the same rows; the script checks this
against each MoLFormer run's predictions.csv (row numbers and canonical SMILES). The forest has nothing to
choose, so it ignores the validation part; MoLFormer and chemprop use it for early stopping, as they do alone.
A finished run (its run_complete.json) is read back instead of rerun, so an interrupted benchmark resumes.

    python benchmarks/bench_accuracy.py --output_dir outputs/bench_accuracy
    python benchmarks/bench_accuracy.py --methods rf --output_dir outputs/bench_rf
    python benchmarks/bench_accuracy.py --dataset_name esol --split_method random --split_seeds 0,1,2 \\
        --output_dir outputs/bench_esol
    python benchmarks/bench_accuracy.py --config configs/regression_tiny.yaml --max_steps 20 --methods molformer,rf

Writes <output_dir>/bench_accuracy.csv (one row per run and target) and bench_accuracy.md (the summary table:
mean ± std over splits x seeds per method and split family, the MoLFormer/peer ratio, wall time per run),
and prints the table. Classification (--problem_type ...) reports ROC-AUC and PR-AUC instead of RMSE.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molft import baselines  # noqa: E402
from molft.accuracy_report import METHODS, report_markdown, result_rows  # noqa: E402
from molft.benchmark_data import Data, Split, check_lineup, load_data, make_split_file, read_split  # noqa: E402
from molft.cli import HelpFormatter, help_description, load_config_file  # noqa: E402
from molft.files import ALL_RESULTS_FILE, DONE_MARKER, PREDICTIONS_FILE  # noqa: E402
from molft.io import is_done, mark_done, read_json, write_csv, write_json, write_text  # noqa: E402

logger = logging.getLogger("bench_accuracy")

SPLITS_DIR = ROOT.parent / "shared" / "splits"
DEFAULT_SPLITS = [
    str(SPLITS_DIR / f"{kind}_s{i}.json") for kind in ("random", "scaffold") for i in range(3)
]  # fmt: skip
RESULTS_CSV = "bench_accuracy.csv"
RESULTS_MD = "bench_accuracy.md"
# beside each run folder (<seed>.bench_run.json; run_regression.py wants its folder to itself): the command or
# options that made the run, and its wall time
RUN_RECORD = "bench_run.json"
# the data options this script reads itself (molft.benchmark_data); given here, they go to run_regression.py too
PASSED_ON = (
    "dataset_name", "dataset_config_name", "train_file", "smiles_column", "label_column", "problem_type",
    "class_names", "standardize",
)  # fmt: skip
OWNED_FLAGS = ("--output_dir", "--seed", "--split_file", "--split", "--split_seed")
ALIASES = {"pr_auc": ("average_precision", "prc_auc", "auprc"), "roc_auc": ("auroc", "auc")}
TIMING_KEYS = ("runtime", "per_second")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=help_description(__doc__),
        epilog="Every flag not listed here goes to run_regression.py (e.g. --max_steps, --model_name_or_path).",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output_dir", default="outputs/bench_accuracy")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="Comma-separated subset of " + ",".join(METHODS)
    )
    parser.add_argument(
        "--config", default=str(ROOT / "configs" / "regression_small.yaml"), help="run_regression.py config."
    )
    parser.add_argument(
        "--splits",
        default=None,
        help="Comma-separated JSON split files of row numbers (default: the six shared Lipophilicity splits).",
    )
    parser.add_argument(
        "--split_method",
        default=None,
        help="Instead of split files: make splits (random, scaffold, ...) of the data.",
    )
    parser.add_argument(
        "--split_fractions", default="0.8,0.1,0.1", help="train,validation,test of --split_method."
    )
    parser.add_argument("--split_seeds", default="0,1,2", help="Seeds of the --split_method splits.")
    parser.add_argument("--seeds", default="0", help="Training seeds per split (comma-separated).")
    parser.add_argument(
        "--dataset_name", default=None, help="As run_regression.py's (default: the config's)."
    )
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_file", default=None, help="As run_regression.py's: one table, split here.")
    parser.add_argument("--smiles_column", default=None)
    parser.add_argument("--label_column", default=None, help="One column, or several: a,b,c.")
    parser.add_argument("--problem_type", default=None, choices=baselines.PROBLEM_TYPES)
    parser.add_argument(
        "--class_names",
        default=None,
        help="As run_regression.py's: classes in output order (last: positive).",
    )
    parser.add_argument(
        "--standardize", default=None, help="As run_regression.py's (fragment_neutral | tautomer | none)."
    )
    parser.add_argument("--rf_trees", type=int, default=baselines.DEFAULT_TREES)
    parser.add_argument("--rf_n_jobs", type=int, default=1, help="Cores per forest (-1: all).")
    parser.add_argument(
        "--chemprop_args", default="", help="Extra flags for `chemprop train`, e.g. '--epochs 50'."
    )
    parser.add_argument(
        "--omp_threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the runs (default: inherited, else each script decides).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Redo finished runs instead of reading them back."
    )
    args, extra = parser.parse_known_args(argv)
    owned = [flag for flag in extra if flag.split("=")[0] in OWNED_FLAGS]
    if owned:
        parser.error(
            f"{owned} are set by this script per run; use --splits/--split_method/--seeds/--output_dir."
        )
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods takes a subset of {list(METHODS)}, got {args.methods}.")
    if args.splits and args.split_method:
        parser.error("Give --splits (files) or --split_method (splits made here), not both.")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args, extra


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The data options of the runs: the config's, overridden by this command's."""
    config = load_config_file(args.config)
    presplit = [key for key in ("validation_file", "test_file", "split_column") if config.get(key)]
    if presplit:
        raise ValueError(f"{args.config} sets {presplit}: the benchmark splits one table itself.")
    options = {key: config.get(key) for key in (*PASSED_ON, "strict_smiles")}
    options.update({key: getattr(args, key) for key in PASSED_ON if getattr(args, key)})
    if not options["train_file"] and not options["dataset_name"]:
        options["dataset_name"] = "lipophilicity"  # run_regression.py's default, named in the record
    options["problem_type"] = options["problem_type"] or baselines.REGRESSION
    return options


def load_splits(args: argparse.Namespace, data: Data, output_dir: Path) -> list[Split]:
    """The split files given, or (--split_method) made here, one per --split_seeds; as positions in the data."""
    if args.split_method:
        fractions = [float(f) for f in args.split_fractions.split(",")]
        paths = [
            make_split_file(
                data,
                args.split_method,
                fractions,
                int(seed),
                output_dir / "splits" / f"{args.split_method}_s{seed}.json",
            )
            for seed in args.split_seeds.split(",")
        ]
    else:
        paths = [Path(p) for p in (args.splits.split(",") if args.splits else DEFAULT_SPLITS)]
    names = [p.stem for p in paths]
    if len(set(names)) < len(names):
        raise ValueError(f"Split files must have different names (they name the run folders): {names}.")
    # splits made here form one family per method; the shared files' families follow their README
    return [read_split(path, data, family=args.split_method) for path in paths]


@dataclass
class Context:
    """What every run needs: the options, the data, the environment of the subprocesses."""

    args: argparse.Namespace
    extra: list[str]
    data: Data
    options: dict[str, Any]
    output_dir: Path
    env: dict[str, str]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def finished(run_dir: Path, key: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any], float] | None:
    """(test metrics, wall time) of a finished run made with the same `key`; None when it must (re)run.

    A run folder made with other options (its bench_run.json) is an error, finished or not, so results are
    never mixed and a run never resumes another's checkpoints; --overwrite redoes it.
    """
    record_path = record_file(run_dir)
    if overwrite:
        (run_dir / DONE_MARKER).unlink(missing_ok=True)
        return None
    record = read_json(record_path) if record_path.is_file() else {}
    recorded = record.get("key")
    if recorded is not None and recorded != key:
        differ = [
            f"{name}: was {recorded.get(name)!r}, now {key.get(name)!r}"
            for name in sorted({*recorded, *key})
            if recorded.get(name) != key.get(name)
        ]
        raise ValueError(
            f"{run_dir} holds a run made otherwise ({'; '.join(differ)}); pass --overwrite to redo it, or "
            "choose another --output_dir."
        )
    if not is_done(run_dir):
        return None
    wall = record.get("wall_time_s")
    if wall is None:  # stopped between the run's end and the record's
        wall = read_json(run_dir / DONE_MARKER).get("wall_time_s")
    logger.info("%s: finished earlier, read back.", run_dir)
    metrics = heldout_metrics(read_json(run_dir / ALL_RESULTS_FILE))
    return metrics, float("nan") if wall is None else float(wall)


def record_file(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.{RUN_RECORD}"


def start_record(run_dir: Path, key: dict[str, Any]) -> None:
    """bench_run.json before a run starts: the options it is made with (its wall time follows at the end)."""
    write_json(record_file(run_dir), {"key": key, "wall_time_s": None})


def heldout_metrics(all_results: dict[str, Any]) -> dict[str, Any]:
    """The test_* metrics of all_results.json without their prefix (timings left out, aliases resolved)."""
    metrics = {
        key[5:]: value
        for key, value in all_results.items()
        if key.startswith("test_") and not any(t in key for t in TIMING_KEYS)
    }
    for name, aliases in ALIASES.items():
        for key, value in list(metrics.items()):
            for alias in aliases:
                if key == alias or key.startswith(alias + "_"):
                    metrics.setdefault(name + key[len(alias) :], value)
    return metrics


def run_logged(command: list[str], log: Path, env: dict[str, str]) -> float:
    """Run `command` with its output in `log`; its wall time, or an error quoting the log's end."""
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Running %s (log: %s)", shlex.join(command), log)
    start = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{shlex.join(command)} failed (exit {code}); log {log} ends:\n{tail}")
    return wall


def run_molformer(ctx: Context, split: Split, seed: int, run_dir: Path) -> tuple[dict[str, Any], float]:
    """run_regression.py on the split file, with this command's data flags and every flag it did not know."""
    data_flags = []
    for name in PASSED_ON:
        if getattr(ctx.args, name):
            data_flags += [f"--{name}", str(getattr(ctx.args, name))]
    config = Path(ctx.args.config).resolve()
    command = [
        sys.executable, str(ROOT / "run_regression.py"), str(config), "--split_file", str(split.path.resolve()),
        "--seed", str(seed), "--output_dir", str(run_dir), *data_flags, *ctx.extra,
    ]  # fmt: skip
    # the config's options, not its bytes: a comment edit must not invalidate finished runs
    key = {
        "command": command[1:],
        "config_options": load_config_file(config),
        "split_sha256": sha256(split.path),
    }
    done = finished(run_dir, key, ctx.args.overwrite)
    if done is None:
        start_record(run_dir, key)
        # --overwrite starts afresh; otherwise run_regression.py resumes an interrupted run from its checkpoint
        fresh = ["--overwrite_output_dir"] if ctx.args.overwrite else []
        log = ctx.output_dir / "logs" / f"molformer_{split.name}_{seed}.log"
        wall = run_logged(command + fresh, log, ctx.env)
        write_json(record_file(run_dir), {"key": key, "wall_time_s": wall})
        done = heldout_metrics(read_json(run_dir / ALL_RESULTS_FILE)), wall
    check_lineup(run_dir / PREDICTIONS_FILE, split, ctx.data)
    return done


def run_forest(ctx: Context, split: Split, seed: int, run_dir: Path) -> tuple[dict[str, Any], float]:
    """molft.baselines' random forest on ECFP4: fit on the train part, scored on the test part."""
    args, data = ctx.args, ctx.data
    key = {
        "trees": args.rf_trees, "seed": seed, "split_sha256": sha256(split.path), "data": ctx.options,
        "targets": data.targets, "problem_type": data.problem_type,
    }  # fmt: skip
    done = finished(run_dir, key, args.overwrite)
    if done is not None:
        return done
    start_record(run_dir, key)
    start = time.perf_counter()
    train, test = (data.molecules.iloc[split.positions[p]] for p in ("train", "test"))
    metrics, predictions = baselines.forest_baseline(
        train,
        test,
        data.targets,
        data.problem_type,
        n_estimators=args.rf_trees,
        seed=seed,
        n_jobs=args.rf_n_jobs,
        class_names=data.classes,
    )
    wall = time.perf_counter() - start
    write_csv(run_dir / PREDICTIONS_FILE, predictions)
    write_json(run_dir / ALL_RESULTS_FILE, metrics)
    write_json(record_file(run_dir), {"key": key, "wall_time_s": wall})
    mark_done(run_dir, {"method": "rf", "split": split.name, "seed": seed, "wall_time_s": wall})
    return heldout_metrics(metrics), wall


def chemprop_task(data: Data) -> str | None:
    """chemprop's --task-type for these data; None for a multiclass target (not wired here)."""
    if data.problem_type == baselines.REGRESSION:
        return "regression"
    if any(len(names) > 2 for names in data.classes.values()):
        return None
    return "classification"


def run_chemprop(ctx: Context, split: Split, seed: int, run_dir: Path) -> tuple[dict[str, Any], float]:
    """`chemprop train` on the benchmark's molecules with the split's positions; scored here like the forest."""
    data, task = ctx.data, chemprop_task(ctx.data)
    table = ctx.output_dir / "chemprop_data.csv"  # canonical SMILES; binary classes as their indices 0/1
    frame = data.molecules[["canonical_smiles", *data.targets]].rename(columns={"canonical_smiles": "smiles"})
    classes = {t: np.array([0.0, 1.0]) for t in data.targets} if task == "classification" else {}
    write_csv(table, frame)
    split_file = run_dir / "chemprop_split.json"  # positions in the table, in chemprop's --splits-file layout
    parts = {"train": "train", "validation": "val", "test": "test"}
    write_json(split_file, [{parts[p]: idx.tolist() for p, idx in split.positions.items()}])
    command = [
        shutil.which("chemprop") or "chemprop", "train", "-i", str(table), "-s", "smiles",
        "--target-columns", *data.targets, "--splits-file", str(split_file), "-o", str(run_dir / "chemprop"),
        "--task-type", task, "--pytorch-seed", str(seed), "--data-seed", str(seed), "--num-workers", "0",
        *shlex.split(ctx.args.chemprop_args),
    ]  # fmt: skip
    key = {"command": command[1:], "data_sha256": sha256(table), "split_sha256": sha256(split.path)}
    done = finished(run_dir, key, ctx.args.overwrite)
    if done is not None:
        return done
    start_record(run_dir, key)
    shutil.rmtree(run_dir / "chemprop", ignore_errors=True)  # an interrupted or overwritten run's files
    wall = run_logged(command, ctx.output_dir / "logs" / f"chemprop_{split.name}_{seed}.log", ctx.env)
    test = data.molecules.iloc[split.positions["test"]].reset_index(drop=True)
    scores = chemprop_scores(run_dir / "chemprop", test, data.targets, classes)
    metrics = baselines.score_predictions(test[data.targets], scores, data.problem_type)
    write_json(run_dir / ALL_RESULTS_FILE, metrics)
    write_json(record_file(run_dir), {"key": key, "wall_time_s": wall})
    mark_done(run_dir, {"method": "chemprop", "split": split.name, "seed": seed, "wall_time_s": wall})
    return heldout_metrics(metrics), wall


def chemprop_scores(
    folder: Path, test: pd.DataFrame, targets: list[str], classes: dict[str, np.ndarray]
) -> dict[str, baselines.TargetScores]:
    """chemprop's test predictions (mean over an ensemble's models), checked to be the test molecules in order."""
    files = sorted(folder.rglob("test_predictions.csv"))
    if not files:
        raise FileNotFoundError(f"chemprop wrote no test_predictions.csv under {folder}.")
    frames = [pd.read_csv(f) for f in files]
    for path, frame in zip(files, frames, strict=True):
        if frame.iloc[:, 0].tolist() != test["canonical_smiles"].tolist():
            raise ValueError(f"{path}: its molecules are not the split's test molecules in order.")
    scores = {}
    for target in targets:
        values = np.mean([f[target].to_numpy(dtype=np.float64) for f in frames], axis=0)
        if target in classes:  # chemprop gives the probability of class 1 (the positive one)
            scores[target] = baselines.TargetScores(np.column_stack([1 - values, values]), classes[target])
        else:
            scores[target] = baselines.TargetScores(values)
    return scores


RUNNERS = {"molformer": run_molformer, "rf": run_forest, "chemprop": run_chemprop}


def write_report(
    ctx: Context, results: pd.DataFrame, notes: list[str], command: str, methods: list[str]
) -> str:
    """bench_accuracy.csv (every run) and bench_accuracy.md (summary, command, machine, notes); the summary."""
    write_csv(ctx.output_dir / RESULTS_CSV, results)
    text, summary = report_markdown(results, ctx.data, notes, command, methods, ctx.args.rf_trees)
    write_text(ctx.output_dir / RESULTS_MD, text)
    return summary


def run_env(args: argparse.Namespace) -> dict[str, str]:
    """The subprocesses' environment: this one, with --omp_threads if given and quiet tokenizers."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.omp_threads)
    return env


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    options = data_options(args)
    data = load_data(options)
    splits = load_splits(args, data, output_dir)
    ctx = Context(args, extra, data, options, output_dir, run_env(args))
    methods, notes = list(args.methods), []
    if "chemprop" in methods:
        reason = None
        if shutil.which("chemprop") is None:
            reason = "not installed (no `chemprop` command; `pip install chemprop` adds it)"
        elif chemprop_task(data) is None:
            reason = "multiclass targets are not wired to chemprop here"
        if reason:
            notes.append(f"chemprop skipped: {reason}.")
            logger.warning("chemprop skipped: %s.", reason)
            methods.remove("chemprop")
    if not methods:
        raise SystemExit("No method left to run.")
    if "molformer" not in methods:
        notes.append("MoLFormer not run (--methods), so no ratio to it.")
    command = shlex.join(["python", "benchmarks/bench_accuracy.py", *argv])
    rows: list[dict[str, Any]] = []
    for split in splits:
        for seed in args.seeds:
            for method in methods:
                run_dir = output_dir / method / split.name / str(seed)
                metrics, wall = RUNNERS[method](ctx, split, seed, run_dir)
                rows.extend(result_rows(method, split, seed, metrics, wall, data))
                # written after every run, so a long benchmark shows its progress
                summary = write_report(ctx, pd.DataFrame(rows), notes, command, methods)
    print(f"\n{data.source}: test metrics, mean ± std over {len(splits)} splits x {len(args.seeds)} seeds\n")
    print(summary)
    for note in notes:
        print(note)
    print(f"\nWrote {output_dir / RESULTS_CSV} and {output_dir / RESULTS_MD}")
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
