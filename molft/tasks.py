"""What a run learns: one regression target (the default), several targets with gaps, or classes.

One regression target is read, trained and written exactly as before the other tasks existed. `--label_column
a,b,c` trains one output per target, a missing label masked in the loss and in that target's metrics.
`--problem_type` single_label_classification (one class per molecule, integer or string labels) or
multi_label_classification (several 0/1 columns, gaps masked) follows transformers' convention, so the saved
config declares it and `AutoModelForSequenceClassification` loads the model.

This module holds the task's options, its checks, and the model config it needs; molft/labels.py reads the
labels, molft/task_outputs.py scores and writes the predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from molft.io import read_json

logger = logging.getLogger(__name__)

# transformers' problem_type values, as modeling_molformer_reg.PROBLEM_TYPES (not imported: it loads torch)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
CLASS_WEIGHTS = ("none", "balanced")
# frames of tasks with one output per label column hold the labels in LABEL_PREFIX + column
LABEL_PREFIX = "label_"


@dataclass
class TaskArguments:
    """The task of run_regression.py: what its label columns hold and how the loss weights them."""

    problem_type: str = field(
        default="regression",
        metadata={
            "help": "regression (one output per --label_column; a,b,c trains several targets, gaps masked) | "
            "single_label_classification (one class per molecule, integer or string labels) | "
            "multi_label_classification (one 0/1 column per label, gaps masked).",
            "choices": list(PROBLEM_TYPES),
        },
    )
    num_labels: int | None = field(
        default=None,
        metadata={
            "help": "single_label_classification: the number of classes the labels must have (2 = binary); "
            "default: as many as they have."
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "single_label_classification: the classes in output order, comma-separated (the last is "
            "the positive class of binary metrics). Default: the labels sorted (numerically for integers), or "
            "the classes of a fine-tuned --model_name_or_path."
        },
    )
    class_weights: str = field(
        default="none",
        metadata={
            "help": "none | balanced: weight the classification loss by class frequency in train (single-label: "
            "n / (classes x n_class); multi-label: negatives / positives of each label).",
            "choices": list(CLASS_WEIGHTS),
        },
    )


@dataclass
class Task:
    """A run's problem type and labels; `label_columns` and `classes` are filled in from the data."""

    problem_type: str = "regression"
    label_option: str | None = None  # --label_column as given
    num_labels: int | None = None
    class_names: list[str] | None = None
    class_weights: str = "none"
    label_columns: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    @classmethod
    def from_arguments(cls, args: TaskArguments, label_column: str | None) -> Task:
        names = parse_names(args.class_names, "--class_names") if args.class_names else None
        return cls(args.problem_type, label_column, args.num_labels, names, args.class_weights)

    @property
    def is_classification(self) -> bool:
        return self.problem_type != "regression"

    @property
    def is_legacy(self) -> bool:
        """One regression target: data, model and outputs exactly as before several targets existed."""
        return self.problem_type == "regression" and len(self.label_columns) <= 1

    @property
    def output_names(self) -> list[str]:
        """What each model output is: a class (single-label), else a label column."""
        return (
            list(self.classes) if self.problem_type == "single_label_classification" else self.label_columns
        )

    @property
    def frame_columns(self) -> list[str]:
        """The prepared frames' label columns of a task with one output per label column."""
        return [LABEL_PREFIX + name for name in self.label_columns]

    def record(self) -> dict[str, Any]:
        """What split.json records of the task (run_influence.py and run_selection.py read it)."""
        return {
            "problem_type": self.problem_type,
            "label_columns": self.label_columns,
            "classes": self.classes,
        }


def parse_names(value: str, flag: str) -> list[str]:
    """A comma-separated list of names; an empty or repeated name is an error."""
    names = [part.strip() for part in value.split(",")]
    if any(not name for name in names):
        raise ValueError(f"{flag} {value!r} has an empty name.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag} {value!r} lists {repeated} more than once; name each column once.")
    return names


def validate_task_arguments(args: TaskArguments, label_column: str | None, hp_search: str) -> None:
    """Fail before any data is read when task options cannot work together."""
    for flag, value, allowed in (
        ("--problem_type", args.problem_type, PROBLEM_TYPES),
        ("--class_weights", args.class_weights, CLASS_WEIGHTS),
    ):
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {allowed}, got {value!r}.")
    columns = parse_names(label_column, "--label_column") if label_column else []
    single = args.problem_type == "single_label_classification"
    if not single:
        given = [f for f, v in (("--num_labels", args.num_labels), ("--class_names", args.class_names)) if v]
        if given:
            raise ValueError(
                f"{' and '.join(given)} are for single_label_classification, not {args.problem_type}."
            )
    if args.problem_type == "regression" and args.class_weights != "none":
        raise ValueError("--class_weights weights a classification loss; this run is regression.")
    if single and len(columns) > 1:
        raise ValueError(
            f"single_label_classification reads one label column, got {len(columns)} ({label_column}); "
            "several 0/1 columns are --problem_type multi_label_classification."
        )
    if single and args.num_labels is not None and args.num_labels < 2:
        raise ValueError(f"--num_labels must be at least 2 (binary), got {args.num_labels}.")
    if single and args.class_names:
        names = parse_names(args.class_names, "--class_names")
        if args.num_labels is not None and len(names) != args.num_labels:
            raise ValueError(
                f"--class_names names {len(names)} classes but --num_labels is {args.num_labels}."
            )
    if args.problem_type != "regression" and hp_search != "none":
        raise ValueError(f"--hp_search minimises validation RMSE: it does not run for {args.problem_type}.")


def make_task(
    args: TaskArguments, label_column: str | None, hp_search: str, model_name_or_path: str | None
) -> Task:
    """The run's task from its options (checked first), with a fine-tuned classifier's classes."""
    validate_task_arguments(args, label_column, hp_search)
    task = Task.from_arguments(args, label_column)
    adopt_checkpoint_classes(task, model_name_or_path)
    return task


def adopt_checkpoint_classes(task: Task, model_name_or_path: str | None) -> None:
    """A fine-tuned checkpoint (a local run_regression.py output) must be of the run's problem type, checked
    before any data is read; a single-label one brings its classes, in its order, unless --class_names does."""
    folder = Path(model_name_or_path or "")
    if not (folder / "config.json").is_file():
        return
    config = read_json(folder / "config.json")
    finetuned = (folder / "adapter_config.json").is_file() or "MolformerForRegression" in (
        config.get("architectures") or []
    )
    saved = config.get("problem_type")
    if not finetuned or saved is None:
        return
    if saved != task.problem_type:
        raise ValueError(_other_problem(model_name_or_path, saved, task.problem_type))
    if saved == "single_label_classification" and not task.class_names and config.get("id2label"):
        id2label = config["id2label"]
        task.class_names = [str(id2label[str(i)]) for i in range(len(id2label))]
        logger.info("Classes of %s: %s", model_name_or_path, task.class_names)


def _other_problem(path: str | None, saved: str, wanted: str) -> str:
    return (
        f"{path} is a {saved} model, but this run asks for {wanted}: pass --problem_type {saved} to use it, or "
        "start a new task from an encoder (a pretrained or run_mlm.py model)."
    )


def split_params(task: Task | None, method: str) -> dict[str, Any]:
    """What the stratified split stratifies on: classes (single-label); tasks with several columns refuse."""
    if task is None or task.is_legacy or method != "stratified":
        return {}
    if task.problem_type == "single_label_classification":
        return {"by_class": True}
    raise ValueError(
        f"--split stratified stratifies on one label; this {task.problem_type} run has {len(task.label_columns)} "
        f"label columns {task.label_columns}. Use --split random or scaffold."
    )


def check_split_labels(frames: Mapping[str, pd.DataFrame], task: Task, needs_validation_auc: bool) -> None:
    """Every target needs labels in every split; the best-epoch metric must be defined on validation."""
    if task.is_legacy:
        return
    for split, frame in frames.items():
        if task.problem_type == "single_label_classification":
            absent = [c for i, c in enumerate(task.classes) if not (frame["label"] == i).any()]
            if absent:
                logger.warning("The %s split has no molecule of class(es) %s.", split, absent)
            continue
        for name, column in zip(task.label_columns, task.frame_columns, strict=True):
            if frame[column].notna().sum() == 0:
                raise ValueError(
                    f"Target {name!r} has no labels in the {split} split ({len(frame)} molecules): its metrics "
                    "would be undefined. Change the split (fractions, seed, method) or drop it from --label_column."
                )
    if needs_validation_auc and not roc_auc_defined(frames["validation"], task):
        raise ValueError(
            "The validation split holds one class only (of every label): validation ROC-AUC, which picks the best "
            "epoch, is undefined. Use --split stratified, a larger validation fraction, or "
            "--metric_for_best_model eval_loss."
        )


def roc_auc_defined(frame: pd.DataFrame, task: Task) -> bool:
    """Whether (macro) ROC-AUC is defined on `frame`: some label or class has positives and negatives."""
    if task.problem_type == "single_label_classification":
        return frame["label"].nunique() > 1
    return any(frame[c].dropna().nunique() > 1 for c in task.frame_columns)


def best_metric(problem_type: str) -> str:
    """The validation metric that picks the best epoch: RMSE (mean over targets), or macro ROC-AUC."""
    return "rmse" if problem_type == "regression" else "roc_auc"


# ---------------------------------------------------------------- the model config


def configure_config(config: Any, task: Task, train_frame: pd.DataFrame, scaling: str) -> None:
    """Problem type, output names, per-target statistics or class weights of a new model's config."""
    from molft.regression import target_statistics  # regression.py builds configs through this module

    config.problem_type = task.problem_type
    config.id2label = dict(enumerate(task.output_names))
    config.label2id = {name: i for i, name in enumerate(task.output_names)}
    config.class_weights = None
    if task.problem_type == "regression":
        weights = train_frame["sample_weight"].to_numpy() if "sample_weight" in train_frame else None
        stats = []
        for column in task.frame_columns:
            values = train_frame[column].to_numpy(np.float64)
            observed = ~np.isnan(values)
            stats.append(
                target_statistics(values[observed], scaling, None if weights is None else weights[observed])
            )
        config.target_mean, config.target_std = [m for m, _ in stats], [s for _, s in stats]
        logger.info(
            "Target scaling %s per target: %s",
            scaling,
            ", ".join(
                f"{n} = {m:.4g} + {s:.4g} · output"
                for n, (m, s) in zip(task.label_columns, stats, strict=True)
            ),
        )
    else:
        config.target_mean, config.target_std = 0.0, 1.0
        config.class_weights = class_weights(task, train_frame)


def class_weights(task: Task, train_frame: pd.DataFrame) -> list[float] | None:
    """--class_weights balanced: n / (classes · n_class) per class, or negatives / positives per label."""
    if task.class_weights == "none":
        return None
    if task.problem_type == "single_label_classification":
        counts = np.bincount(train_frame["label"].to_numpy(), minlength=len(task.classes))
        names, weights = task.classes, counts.sum() / (len(task.classes) * np.maximum(counts, 1))
        empty = [c for c, n in zip(names, counts, strict=True) if n == 0]
    else:
        positives = np.array([(train_frame[c] == 1).sum() for c in task.frame_columns])
        negatives = np.array([(train_frame[c] == 0).sum() for c in task.frame_columns])
        names, weights = task.label_columns, negatives / np.maximum(positives, 1)
        empty = [c for c, n in zip(names, positives, strict=True) if n == 0]
    if empty:
        raise ValueError(f"--class_weights balanced: {empty} have no positive training molecules to weight.")
    logger.info("Class weights (balanced): %s", dict(zip(names, np.round(weights, 4).tolist(), strict=True)))
    return [float(w) for w in weights]


def check_checkpoint_task(config: Any, task: Task, path: str | None) -> None:
    """A fine-tuned checkpoint keeps its head: it must be the head of this run's task."""
    saved = config.problem_type or "regression"
    if saved != task.problem_type:
        raise ValueError(_other_problem(path, saved, task.problem_type))
    from modeling_molformer_reg import num_outputs

    outputs = [config.id2label[i] for i in range(num_outputs(config))]
    if (len(outputs) != 1) if task.is_legacy else (outputs != task.output_names):
        labels = task.label_columns if task.is_legacy else task.output_names
        raise ValueError(f"{path} predicts {outputs}; this run's labels are {labels}.")


def require_single_target_regression(
    script: str, model_path: str | None = None, split_file: str | None = None
) -> None:
    """run_influence.py and run_selection.py work on one regression target's squared error: refuse other runs
    (a model's config.json, or a run's split.json) before any heavy work."""
    found: list[tuple[str, str, int]] = []
    config_file = Path(model_path) / "config.json" if model_path else None
    if config_file is not None and config_file.is_file():
        config = read_json(config_file)
        means = config.get("target_mean")
        outputs = len(means) if isinstance(means, list) else 1
        problem = config.get("problem_type") or "regression"
        found.append(
            (
                str(model_path),
                problem,
                outputs if problem == "regression" else len(config.get("id2label") or {}),
            )
        )
    if split_file and Path(split_file).is_file():
        record = read_json(split_file).get("task") or {}
        found.append(
            (
                str(split_file),
                record.get("problem_type", "regression"),
                len(record.get("label_columns") or [0]),
            )
        )
    for where, problem, outputs in found:
        if problem != "regression" or outputs > 1:
            what = problem if problem != "regression" else f"regression run with {outputs} targets"
            raise ValueError(
                f"{script} works on the squared error of one regression target; {where} belongs to a {what} "
                f"(problem_type {problem}). {script} does not support that problem type yet."
            )
