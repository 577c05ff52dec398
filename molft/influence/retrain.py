"""Retrain a finished run_regression.py run with external molecules added, and measure its query loss.

The ground truth of the linear datamodeling score (`molft.influence.lds`): a retraining is the run's own
recipe, replayed from the options it recorded (run_options.yaml) on its own split (split.json), with the
molecules added through `--extra_train_file`, in a subprocess of run_regression.py. Two procedures:

* scratch: the whole recipe from the run's starting checkpoint (its model, PEFT method, epochs, early
  stopping on validation RMSE and best-epoch restore, exactly as the run was trained);
* warm: the fine-tuned model trained further for a fixed number of steps on train + subset
  (`--continue_training`, so the head, target statistics and PEFT method are the run's; no evaluation,
  no checkpoint, no early stopping or best-model restore, no warm-up; the run's learning rate and schedule
  over those steps). This is the proximal response influence functions approximate (Bae et al. 2022).

The measured quantity is the loss influence scores predict: mean over the query split of the per-sample
loss of `molft.influence.molformer.influence_loss` (0.5 x squared error in the run's normalised target
units), computed from the retrained model's predictions.csv with the ORIGINAL run's target statistics, so
every retraining is measured in the same units.

Retrainings are jobs (`RetrainJob`), each with its own folder; a finished one holds a completion marker
with its loss and is skipped on rerun, so an interrupted evaluation resumes where it stopped, and shards
(i/n, as in scripts/sweep.sh) split the jobs between processes that share the folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch

from molft.files import (
    LDS_EXTRA_FILE,
    LDS_PLAN_FILE,
    LDS_RETRAIN_LOG,
    LDS_RETRAIN_OPTIONS_FILE,
    LDS_RUN_DIR,
    PREDICTIONS_FILE,
    RUN_CONFIG_FILE,
    RUN_OPTIONS_FILE,
    SPLIT_FILE,
)
from molft.influence.molformer import influence_loss
from molft.io import is_done, mark_done, read_json, write_csv, write_json
from molft.run_record import write_options

logger = logging.getLogger(__name__)

RETRAIN_MODES = ("warm", "scratch")
SCRIPT = Path(__file__).resolve().parents[2] / "run_regression.py"
# options of the run that a retraining must not replay: its outputs, resumption, publishing, and caps that
# would leave query molecules without a prediction
DROPPED_OPTIONS = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "predict_file", "do_predict",
    "push_to_hub", "hub_model_id", "hub_strategy", "merge_adapter", "max_eval_samples", "max_predict_samples",
    "split_file", "selection_name", "logging_dir",
)  # fmt: skip
WARM_OPTIONS = {
    "do_train": True,
    "do_eval": False,
    "continue_training": True,
    "eval_strategy": "no",
    "save_strategy": "no",
    "load_best_model_at_end": False,
    "early_stopping_patience": 0,
    "warmup_steps": 0,
}
HEAVY_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
HEAVY_DIRS = ("checkpoint-*", "base_model", "merged")


@dataclass(frozen=True)
class RetrainJob:
    """One retraining: the pool positions it adds (none for the reference) under one seed."""

    key: str  # its folder under the LDS directory, e.g. seed42/subset007
    seed: int
    kind: str  # reference | subset | group
    name: str
    members: tuple[int, ...] = ()


RetrainFn = Callable[[RetrainJob, Path], float]
"""retrain(job, job_dir) -> query loss of the model retrained with job.members added."""


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n; None -> (0, 1), the whole plan."""
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"--lds_shard {text!r}: expected i/n with 0 <= i < n (0-based), e.g. 0/4.")
    return index, count


def plan_jobs(
    membership: np.ndarray, seeds: Sequence[int], groups: dict[str, np.ndarray] | None = None
) -> list[RetrainJob]:
    """Every retraining, seed by seed: the reference, the subsets, then the groups (keyed by content)."""
    jobs = []
    width = max(3, len(str(len(membership) - 1)))
    for seed in seeds:
        jobs.append(RetrainJob(f"seed{seed}/reference", int(seed), "reference", "reference"))
        for i, row in enumerate(membership):
            name = f"subset{i:0{width}d}"
            jobs.append(
                RetrainJob(
                    f"seed{seed}/{name}",
                    int(seed),
                    "subset",
                    name,
                    tuple(int(i) for i in np.flatnonzero(row)),
                )
            )
        for name, members in (groups or {}).items():
            digest = hashlib.sha1(np.asarray(sorted(members), dtype=np.int64).tobytes()).hexdigest()[:8]
            key = f"seed{seed}/group_{name}_k{len(members)}_{digest}"
            jobs.append(RetrainJob(key, int(seed), "group", name, tuple(int(i) for i in members)))
    return jobs


def check_plan(lds_dir: Path, plan: dict[str, Any]) -> None:
    """An LDS directory holds the retrainings of one plan: other settings there are an error, not a mix."""
    path = Path(lds_dir) / LDS_PLAN_FILE
    if path.is_file():
        recorded = read_json(path)
        differing = sorted(key for key in set(plan) | set(recorded) if plan.get(key) != recorded.get(key))
        if differing:
            raise ValueError(
                f"{lds_dir} holds retrainings of other LDS settings (they differ in {differing}); choose "
                "another --lds_dir or remove that one."
            )
        return
    write_json(path, plan)


def run_jobs(
    jobs: Sequence[RetrainJob], retrain: RetrainFn, lds_dir: Path, shard: tuple[int, int] = (0, 1)
) -> int:
    """Run this shard's unfinished retrainings (a folder without marker is redone); returns how many ran."""
    index, count = shard
    mine = [job for position, job in enumerate(jobs) if position % count == index]
    todo = [job for job in mine if not is_done(Path(lds_dir) / job.key)]
    label = "" if count == 1 else f" (shard {index}/{count})"
    logger.info(
        "LDS retrainings%s: %d of %d already done, %d to run.",
        label,
        len(mine) - len(todo),
        len(mine),
        len(todo),
    )
    subsets = sum(job.kind == "subset" for job in jobs) // max(1, len({job.seed for job in jobs}))
    started, durations = time.perf_counter(), []
    for done, job in enumerate(todo, 1):
        job_dir = Path(lds_dir) / job.key
        if job_dir.exists():
            logger.info("Removing the unfinished retraining %s and redoing it.", job_dir)
            shutil.rmtree(job_dir)
        job_dir.mkdir(parents=True)
        what = f"subset {int(job.name[6:]) + 1}/{subsets}" if job.kind == "subset" else job.name
        logger.info(
            "[%d/%d] retraining seed %d, %s (%d molecules added)",
            done,
            len(todo),
            job.seed,
            what,
            len(job.members),
        )
        start = time.perf_counter()
        loss = float(retrain(job, job_dir))
        if not math.isfinite(loss):
            raise FloatingPointError(f"LDS retraining {job.key} measured a non-finite query loss ({loss}).")
        durations.append(time.perf_counter() - start)
        mark_done(job_dir, {"loss": loss, "seconds": durations[-1], "seed": job.seed, "kind": job.kind,
                            "members": list(job.members)})  # fmt: skip
        eta = np.mean(durations) * (len(todo) - done)
        logger.info("[%d/%d] %s: query loss %.6g in %.1f s; elapsed %s, ETA %s", done, len(todo), job.key, loss,
                    durations[-1], _clock(time.perf_counter() - started), _clock(eta))  # fmt: skip
    return len(todo)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def missing_jobs(jobs: Sequence[RetrainJob], lds_dir: Path) -> list[str]:
    return [job.key for job in jobs if not is_done(Path(lds_dir) / job.key)]


@dataclass
class RunRecipe:
    """How a finished run was trained: the options it was given, its seed, and where it lives."""

    run_dir: Path
    options: dict[str, Any]
    seed: int

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> RunRecipe:
        """Read the run's recorded options; a run whose retraining could not add molecules is an error."""
        run_dir = Path(run_dir).resolve()
        options_file = run_dir / RUN_OPTIONS_FILE
        if not options_file.is_file():
            raise FileNotFoundError(
                f"{options_file} not found: retraining replays the options a run_regression.py run recorded "
                "there (runs from before it was written cannot be retrained)."
            )
        from molft.cli import load_config_file

        options = load_config_file(options_file)
        problems = {
            "extra_train_file": "it already trained with --extra_train_file (the retrain adds the subset "
            "through that option); LDS needs a run trained on its split alone",
            "max_train_samples": "--max_train_samples would cut the added molecules off the training set",
        }
        for key, why in problems.items():
            if options.get(key):
                raise ValueError(f"{options_file}: {key}={options[key]!r}: {why}.")
        if options.get("hp_search", "none") != "none":
            raise ValueError(f"{options_file} is a hyperparameter search; retrain its best_config.yaml run.")
        run_config = run_dir / RUN_CONFIG_FILE
        seed = read_json(run_config).get("training", {}).get("seed") if run_config.is_file() else None
        seed = options.get("seed", 42) if seed is None else seed  # 42: TrainingArguments' default
        return cls(run_dir, options, int(seed))

    def retrain_options(
        self, mode: str, seed: int, output_dir: Path, extra_file: Path | None, warm_steps: int
    ) -> dict[str, Any]:
        """run_regression.py options of one retraining: the run's own, its split, this seed and subset."""
        if mode not in RETRAIN_MODES:
            raise ValueError(f"retrain mode must be one of {RETRAIN_MODES}, got {mode!r}")
        options = {k: v for k, v in self.options.items() if k not in DROPPED_OPTIONS}
        options.update(
            output_dir=str(output_dir),
            overwrite_output_dir=True,
            seed=int(seed),
            split_file=str(self.run_dir / SPLIT_FILE),
            report_to="none",
            predict_train_split=False,  # the query loss reads validation or test predictions only
        )
        if extra_file is not None:
            options.update(extra_train_file=str(extra_file), extra_smiles_column="smiles")
            options.update(extra_label_column="label")
        if mode == "scratch":
            if not options.get("model_name_or_path") and not options.get("tokenizer_name"):
                # a model built from a config keeps the run's vocabulary, not one grown from the subset
                options["tokenizer_name"] = str(self.run_dir)
            return options
        for key in ("config_name", "config_overrides", "tokenizer_name", "warmup_ratio", "num_train_epochs"):
            options.pop(key, None)
        options.update(WARM_OPTIONS, model_name_or_path=str(self.run_dir), max_steps=int(warm_steps))
        return options


def run_config_namespace(run_dir: Path) -> SimpleNamespace:
    """The run's target statistics and loss (its config.json), all `influence_loss` reads."""
    config = read_json(Path(run_dir) / "config.json")
    return SimpleNamespace(
        target_std=float(config.get("target_std", 1.0)),
        regression_loss=config.get("regression_loss", "mse"),
        huber_delta=float(config.get("huber_delta", 1.0)),
    )


def query_loss(
    predictions_file: Path, query_frame: pd.DataFrame, query_split: str, loss_fn: Callable
) -> float:
    """Mean influence loss over the query molecules, from a run's predictions.csv (matched by dataset row)."""
    predictions = pd.read_csv(predictions_file)
    part = predictions[predictions["split"] == query_split].set_index("row")
    missing = sorted(set(query_frame["row"]) - set(part.index))
    if missing:
        raise ValueError(
            f"{predictions_file} has no {query_split} prediction for dataset rows {missing[:10]} "
            f"({len(missing)} of {len(query_frame)} query molecules)."
        )
    rows = part.loc[query_frame["row"].to_numpy()]
    if (rows["canonical_smiles"].to_numpy() != query_frame["canonical_smiles"].to_numpy()).any():
        raise ValueError(f"{predictions_file}: its {query_split} molecules are not the run's; another split?")
    values = torch.tensor(rows["prediction"].to_numpy(dtype=np.float64)).reshape(-1, 1)
    labels = torch.tensor(query_frame["label"].to_numpy(dtype=np.float64))
    loss = loss_fn(values, {"labels": labels})
    return float(loss.mean())


class SubprocessRetrainer:
    """A `RetrainFn` for molft.influence.lds: one run_regression.py subprocess per retraining.

    Writes into the retraining's folder the subset (extra_train.csv), the options (retrain_options.yaml,
    which reruns it), the log (log.txt) and the run (run/); returns the query loss. Model weights are
    removed afterwards unless `keep_models`.
    """

    def __init__(
        self,
        recipe: RunRecipe,
        mode: str,
        pool: pd.DataFrame,
        query_frame: pd.DataFrame,
        query_split: str,
        *,
        warm_steps: int,
        launcher: str | None = None,
        extra_args: str | None = None,
        keep_models: bool = False,
    ) -> None:
        if mode not in RETRAIN_MODES:
            raise ValueError(f"--lds_retrain must be one of {RETRAIN_MODES}, got {mode!r}.")
        self.recipe, self.mode, self.pool = recipe, mode, pool
        self.query_frame, self.query_split = query_frame, query_split
        self.warm_steps, self.keep_models = warm_steps, keep_models
        self.launcher = shlex.split(launcher) if launcher else [sys.executable]
        self.extra_args = shlex.split(extra_args) if extra_args else []
        self.loss_fn, self.loss_description = influence_loss(run_config_namespace(recipe.run_dir))

    def original_loss(self) -> float | None:
        """The query loss of the run itself (its own predictions.csv), for the record."""
        predictions = self.recipe.run_dir / PREDICTIONS_FILE
        try:
            return query_loss(predictions, self.query_frame, self.query_split, self.loss_fn)
        except (OSError, ValueError, KeyError) as err:  # e.g. a run that predicted part of its split
            logger.info("The run's own query loss is not recorded: %s", err)
            return None

    def command(self, config_file: Path) -> list[str]:
        return [*self.launcher, str(SCRIPT), str(config_file), *self.extra_args]

    def __call__(self, job: RetrainJob, job_dir: Path) -> float:
        extra_file = None
        if len(job.members):
            extra_file = job_dir / LDS_EXTRA_FILE
            write_csv(extra_file, self.pool.iloc[list(job.members)][["smiles", "label"]])
        run_dir = job_dir / LDS_RUN_DIR
        options = self.recipe.retrain_options(self.mode, job.seed, run_dir, extra_file, self.warm_steps)
        config_file = job_dir / LDS_RETRAIN_OPTIONS_FILE
        write_options(config_file, options, f"LDS retraining {job.key} ({self.mode})", "run_regression.py")
        command = self.command(config_file)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with open(job_dir / LDS_RETRAIN_LOG, "w") as log:
            log.write("$ " + shlex.join(command) + "\n")
            log.flush()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0:
            tail = (job_dir / LDS_RETRAIN_LOG).read_text().splitlines()[-15:]
            raise RuntimeError(
                f"LDS retraining {job.key} failed (exit {done.returncode}); the end of {job_dir / LDS_RETRAIN_LOG}:\n"
                + "\n".join(f"    {line}" for line in tail)
            )
        loss = query_loss(run_dir / PREDICTIONS_FILE, self.query_frame, self.query_split, self.loss_fn)
        if not self.keep_models:
            prune_models(run_dir)
        return loss


def prune_models(run_dir: Path) -> None:
    """Remove weights and checkpoints of a measured retraining (its predictions and metrics stay)."""
    for pattern in HEAVY_DIRS:
        for folder in run_dir.glob(pattern):
            shutil.rmtree(folder, ignore_errors=True)
    for pattern in HEAVY_FILES:
        for path in run_dir.glob(pattern):
            path.unlink(missing_ok=True)


def addable_mask(pool: pd.DataFrame) -> np.ndarray:
    """Which scored pool rows a retraining may add: not those in the run's validation/test split."""
    from molft.influence.report import HELDOUT_SPLITS

    if "in_run_split" not in pool:
        return np.ones(len(pool), dtype=bool)
    return ~pool["in_run_split"].isin(HELDOUT_SPLITS).to_numpy()


def addable_pool(pool: pd.DataFrame) -> pd.DataFrame:
    """The pool molecules a retraining may add (their positions are what `RetrainJob.members` count)."""
    return pool[addable_mask(pool)].reset_index(drop=True)


def retraining_seeds(run_seed: int, noise: bool, noise_seed: int | None, more_seeds: int = 0) -> list[int]:
    """The run's seed; with `noise` a second (default: the run's + 1), then `more_seeds` counting on from the
    second and skipping the run's own."""
    seeds = [run_seed]
    if not noise:
        return seeds
    seeds.append(run_seed + 1 if noise_seed is None else noise_seed)
    if seeds[1] == run_seed:
        raise ValueError(f"--lds_noise_seed {seeds[1]} is the run's own seed; choose another.")
    candidate = seeds[1]
    while len(seeds) < 2 + more_seeds:
        candidate += 1
        if candidate != run_seed:
            seeds.append(candidate)
    return seeds


def run_retrainer(
    run_dir: str, mode: str, pool: pd.DataFrame, query_frame: pd.DataFrame, query_split: str, *,
    warm_steps: int, noise: bool, noise_seed: int | None, launcher: str | None, extra_args: str | None,
    keep_models: bool, more_seeds: int = 0,
) -> tuple[SubprocessRetrainer, list[int]]:  # fmt: skip
    """The subprocess retrainer of a finished run and its retraining seeds: the run's, then (with `noise`)
    a second one (default: the run's + 1) and `more_seeds` after it (the second + 1, + 2, ...)."""
    recipe = RunRecipe.from_run(run_dir)
    seeds = retraining_seeds(recipe.seed, noise, noise_seed, more_seeds)
    retrainer = SubprocessRetrainer(
        recipe, mode, addable_pool(pool), query_frame, query_split, warm_steps=warm_steps, launcher=launcher,
        extra_args=extra_args, keep_models=keep_models,
    )  # fmt: skip
    return retrainer, seeds
