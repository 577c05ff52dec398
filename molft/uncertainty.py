"""Uncertainty of run_regression.py's predictions: spread over random SMILES (TTA), dropout masks (MC dropout)
and finished runs (an ensemble), and whether that spread is calibrated on the test split.

A bare number cannot tell a user which predictions to trust. Each method gives S predictions per molecule,
[S, n_molecules, n_outputs] (regression values, or class probabilities for classification); their mean
and sample standard deviation (ddof=1) become `<column>_<method>` and `<column>_<method>_std` columns of
predictions.csv, and the test split's labels say how honest the spread is: the fraction of molecules
within ±1 and ±2 predicted std and the Gaussian NLL (regression), or the expected calibration error
(classification). Only the test split and --predict_file molecules get these columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from molft.augment import tta_samples
from molft.files import DONE_MARKER, SPLIT_FILE
from molft.io import read_json
from molft.metrics import regression_metrics
from molft.model_utils import smiles_batches, unwrap_peft

logger = logging.getLogger(__name__)

METHODS = ("tta", "mc", "ensemble")
CLASSIFICATION = ("single_label_classification", "multi_label_classification")


@dataclass
class UncertaintyArguments:
    """Per-molecule uncertainty of run_regression.py's predictions (with --do_predict)."""

    mc_dropout_samples: int = field(
        default=0,
        metadata={
            "help": "MC dropout (needs --do_predict; N >= 2): predict test and --predict_file molecules N "
            "times with dropout on (feature maps pinned), seeded by --seed; predictions.csv gets "
            "prediction_mc and prediction_mc_std, all_results test_mc_* metrics. 0: off."
        },
    )
    ensemble_dirs: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated finished run_regression.py output folders (e.g. one sweep's seeds) "
            "whose models predict the test and --predict_file molecules; predictions.csv gets their mean "
            "and std (prediction_ensemble, prediction_ensemble_std), all_results test_ensemble_* metrics. "
            "Every run must have this run's split; this run's --output_dir may be listed (its new "
            "model is then a member), otherwise it is not one. Needs --do_predict."
        },
    )
    calibration_bins: int = field(
        default=10,
        metadata={"help": "Equal-width probability bins of the expected calibration error (classification)."},
    )

    def __post_init__(self) -> None:
        if self.mc_dropout_samples < 0 or self.mc_dropout_samples == 1:
            raise ValueError(
                "--mc_dropout_samples must be 0 (off) or at least 2 (a spread needs two predictions), "
                f"got {self.mc_dropout_samples}."
            )
        if self.calibration_bins < 1:
            raise ValueError(f"--calibration_bins must be >= 1, got {self.calibration_bins}.")
        dirs = self.ensemble_paths()
        if self.ensemble_dirs is not None and len(dirs) < 2:
            raise ValueError(f"--ensemble_dirs needs at least two run folders, got {self.ensemble_dirs!r}.")
        duplicates = sorted({str(d) for d in dirs if dirs.count(d) > 1})
        if duplicates:
            raise ValueError(f"--ensemble_dirs lists {', '.join(duplicates)} more than once.")

    def ensemble_paths(self) -> list[Path]:
        return [Path(d.strip()) for d in (self.ensemble_dirs or "").split(",") if d.strip()]


# ---------------------------------------------------------------------------------------------------------
# Samples → mean, std and calibration
# ---------------------------------------------------------------------------------------------------------


def summarise(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) over the first axis of [S, n_molecules, n_outputs], S >= 2."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[0] < 2:
        raise ValueError(f"Need samples [S >= 2, molecules, outputs], got shape {samples.shape}.")
    return samples.mean(axis=0), samples.std(axis=0, ddof=1)


def as_matrix(values: Any, n_rows: int, name: str) -> np.ndarray:
    """`values` as [n_rows, k] floats (a 1-D array is one column)."""
    array = np.asarray(values, dtype=np.float64)
    array = array.reshape(n_rows, -1) if array.ndim <= 1 else array
    if array.ndim != 2 or array.shape[0] != n_rows:
        raise ValueError(f"{name} must have {n_rows} rows, got shape {array.shape}.")
    return array


def regression_calibration(labels: Any, mean: Any, std: Any) -> dict[str, float]:
    """Fraction of molecules within ±1 and ±2 predicted std, Gaussian NLL and mean predicted std.

    [n_molecules, n_targets] arrays; missing labels (NaN) leave that molecule out of that target. A
    Gaussian would put 68.3% and 95.4% within ±1 and ±2 std. The NLL is nan (with a warning) when a
    predicted std is 0. Several targets: each counts its labelled molecules, then the mean over targets.
    """
    mean = np.asarray(mean, dtype=np.float64)
    labels, std = as_matrix(labels, len(mean), "labels"), as_matrix(std, len(mean), "std")
    mean = as_matrix(mean, len(mean), "mean")
    if not labels.shape == mean.shape == std.shape:
        raise ValueError(f"labels {labels.shape}, mean {mean.shape} and std {std.shape} must match.")
    per_target = []
    for j in range(labels.shape[1]):
        known = ~np.isnan(labels[:, j])
        if not known.any():
            raise ValueError(f"Target {j} has no labelled molecule to check the calibration on.")
        error, sigma = np.abs(labels[known, j] - mean[known, j]), std[known, j]
        if (sigma == 0).any():
            logger.warning(
                "%d of %d molecules have a predicted std of 0 (target %d): the Gaussian NLL is undefined "
                "(nan).",
                int((sigma == 0).sum()),
                int(known.sum()),
                j,
            )
            nll = float("nan")
        else:
            nll = float(np.mean(0.5 * np.log(2 * np.pi * sigma**2) + error**2 / (2 * sigma**2)))
        per_target.append(
            {
                "within_1std": float(np.mean(error <= sigma)),
                "within_2std": float(np.mean(error <= 2 * sigma)),
                "nll": nll,
                "mean_std": float(np.mean(sigma)),
            }
        )
    return {key: float(np.mean([t[key] for t in per_target])) for key in per_target[0]}


def expected_calibration_error(probabilities: Any, labels: Any, n_bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width confidence bins of (bin share) · |accuracy − confidence|.

    `probabilities` [n, n_classes] with integer `labels` [n] (single-label, binary or multiclass): the
    confidence is the top probability and a molecule is right when its top class is its label.
    `probabilities` and 0/1 `labels` of the same shape, [n] or [n, n_labels] (multi-label, or binary given
    as the positive class' probability): each column is its own binary problem (probability against the
    fraction of positives per bin; NaN labels left out), and the ECE is their mean.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    if probabilities.ndim == 2 and labels.ndim == 1 and len(labels) == len(probabilities):
        if np.isnan(labels).any() or (labels != np.round(labels)).any():
            raise ValueError("Single-label ECE needs integer class labels without missing values.")
        if ((labels < 0) | (labels >= probabilities.shape[1])).any():
            raise ValueError(f"Class labels must lie in [0, {probabilities.shape[1]}).")
        confidence = probabilities.max(axis=1)
        correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
        return _binned_gap(confidence, correct, n_bins)
    if probabilities.shape != labels.shape:
        raise ValueError(
            f"probabilities {probabilities.shape} and labels {labels.shape}: give [n, classes] with [n] "
            "class indices, or two arrays of the same shape (one binary problem per column)."
        )
    probabilities, labels = probabilities.reshape(len(labels), -1), labels.reshape(len(labels), -1)
    gaps = []
    for j in range(labels.shape[1]):
        known = ~np.isnan(labels[:, j])
        if not known.any():
            raise ValueError(f"Label column {j} has no known label to check the calibration on.")
        gaps.append(_binned_gap(probabilities[known, j], labels[known, j], n_bins))
    return float(np.mean(gaps))


def _binned_gap(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    # bins (0, 1/B], ..., ((B-1)/B, 1]; a confidence of exactly 0 joins the first bin
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        total += members.mean() * abs(outcome[members].mean() - confidence[members].mean())
    return float(total)


def uncertainty_metrics(
    prefix: str,
    method: str,
    labels: Any,
    mean: np.ndarray,
    std: np.ndarray,
    problem_type: str = "regression",
    n_bins: int = 10,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """`{prefix}_{method}_*` metrics of the mean prediction and its std on labelled molecules.

    Regression: the usual metrics of the mean (per target `_<name>` and their mean when there are
    several) plus `regression_calibration`. Classification: `_ece`.
    """
    key = f"{prefix}_{method}"
    if problem_type in CLASSIFICATION:
        return {f"{key}_ece": expected_calibration_error(mean, labels, n_bins)}
    labels = as_matrix(labels, len(mean), "labels")
    metrics: dict[str, float] = {}
    per_target = []
    for j in range(labels.shape[1]):
        known = ~np.isnan(labels[:, j])
        per_target.append(regression_metrics(labels[known, j], mean[known, j]))
    if len(per_target) == 1:
        metrics.update({f"{key}_{name}": value for name, value in per_target[0].items()})
    else:
        names = list(names or range(len(per_target)))
        for name, target in zip(names, per_target, strict=True):
            metrics.update({f"{key}_{metric}_{name}": value for metric, value in target.items()})
        for metric in per_target[0]:
            metrics[f"{key}_{metric}"] = float(np.mean([t[metric] for t in per_target]))
    metrics.update(
        {f"{key}_{name}": value for name, value in regression_calibration(labels, mean, std).items()}
    )
    return metrics


# ---------------------------------------------------------------------------------------------------------
# The samples of each method
# ---------------------------------------------------------------------------------------------------------


def output_transform(problem_type: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """From the model's logits to what is averaged: values (regression) or class probabilities."""
    if problem_type == "single_label_classification":
        return lambda logits: torch.softmax(logits.float(), dim=-1)
    if problem_type == "multi_label_classification":
        return lambda logits: torch.sigmoid(logits.float())
    return lambda logits: logits


def problem_type_of(model: torch.nn.Module) -> str:
    return getattr(unwrap_peft(model).config, "problem_type", None) or "regression"


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return outputs.logits if hasattr(outputs, "logits") else outputs


@torch.no_grad()
def predict_smiles(
    model: torch.nn.Module, tokenizer: Any, smiles: Sequence[str], batch_size: int, max_length: int
) -> np.ndarray:
    """Predictions [n, n_outputs] in evaluation mode, in input order (values or class probabilities)."""
    transform = output_transform(problem_type_of(model))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in smiles_batches(list(smiles), tokenizer, batch_size, max_length):
            logits = _forward(model, {k: v.to(device) for k, v in batch.items()})
            outputs.append(transform(logits).to("cpu", torch.float64).reshape(len(batch["input_ids"]), -1))
    finally:
        model.train(was_training)
    return torch.cat(outputs).numpy() if outputs else np.empty((0, 1))


def mc_dropout_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    smiles: Sequence[str],
    n_samples: int,
    seed: int,
    batch_size: int,
    max_length: int,
) -> np.ndarray:
    """[n_samples, n, n_outputs] with dropout on, as molft.selection's MC dropout does it (seeded, norms in
    eval mode, MoLFormer's random features pinned), for any number of outputs."""
    from molft.selection.uncertainty import mc_dropout_predictions

    if not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        logger.warning("The model has no dropout with p > 0: every MC-dropout pass is the same (std 0).")
    transform = output_transform(problem_type_of(model))
    batches = smiles_batches(list(smiles), tokenizer, batch_size, max_length)

    def flat_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # one value per (molecule, output), row by row: mc_dropout_predictions takes vectors
        return transform(_forward(model, batch)).reshape(-1)

    flat = mc_dropout_predictions(model, batches, n_samples, seed, forward_fn=flat_forward)
    return flat.reshape(n_samples, len(smiles), -1)


def split_molecules(dataset: pd.DataFrame, indices: dict[str, Any]) -> dict[str, set[str]]:
    """The canonical SMILES of each split, as split.json records them."""
    smiles = dataset["canonical_smiles"].to_numpy()
    return {name: set(smiles[np.asarray(idx, dtype=int)]) for name, idx in indices.items()}


def check_ensemble_members(dirs: Sequence[Path], split: dict[str, set[str]], output_dir: Path) -> None:
    """Refuse, before any training, runs that are unfinished or split the molecules differently.

    A member trained on this run's test molecules would make the ensemble's test metrics meaningless.
    `output_dir` (this run) may be listed: its model is the one this run trains or loads.
    """
    for run in dirs:
        if run.resolve() == output_dir.resolve():
            continue
        if not (run / DONE_MARKER).is_file():
            raise ValueError(
                f"--ensemble_dirs: {run} is not a finished run_regression.py run (no {DONE_MARKER})."
            )
        if not any((run / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(
                f"--ensemble_dirs: {run} holds no saved model (it was not trained with --do_train)."
            )
        if not (run / SPLIT_FILE).is_file():
            raise ValueError(f"--ensemble_dirs: {run} has no {SPLIT_FILE} to compare its split with.")
        theirs = {name: set(smiles) for name, smiles in read_json(run / SPLIT_FILE)["smiles"].items()}
        for name, ours in split.items():
            other = theirs.get(name, set())
            if ours != other:
                only_ours, only_theirs = sorted(ours - other), sorted(other - ours)
                example = (only_ours or only_theirs)[0]
                raise ValueError(
                    f"--ensemble_dirs: {run} split the molecules differently: its {name} split has "
                    f"{len(other)} molecules, this run's {len(ours)}; {len(only_ours)} of ours are not in "
                    f"its {name} split and {len(only_theirs)} of its are not in ours (e.g. {example}). "
                    "Ensemble runs of the same data and --split/--split_seed (or --split_file)."
                )


def ensemble_samples(
    dirs: Sequence[Path],
    smiles: Sequence[str],
    batch_size: int,
    max_length: int,
    current: tuple[Path, torch.nn.Module, Any] | None = None,
) -> np.ndarray:
    """[n_members, n, n_outputs]: each run's model (with its own tokenizer) predicting `smiles`.

    `current` = (output_dir, model, tokenizer) of this run, used for a listed folder that is this run's.
    """
    from transformers import AutoTokenizer

    import tokenization_molformer  # noqa: F401  registers the tokenizer with AutoTokenizer
    from molft.peft_setup import load_regression_checkpoint

    device = next(current[1].parameters()).device if current else torch.device("cpu")
    samples = []
    for run in dirs:
        if current is not None and run.resolve() == current[0].resolve():
            samples.append(predict_smiles(current[1], current[2], smiles, batch_size, max_length))
            continue
        model = load_regression_checkpoint(run).to(device)
        tokenizer = AutoTokenizer.from_pretrained(run)
        samples.append(predict_smiles(model, tokenizer, smiles, batch_size, max_length))
        del model
    shapes = {run: s.shape for run, s in zip(dirs, samples, strict=True)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"--ensemble_dirs: the runs predict different numbers of outputs: {shapes}.")
    return np.stack(samples)


# ---------------------------------------------------------------------------------------------------------
# run_regression.py's hook
# ---------------------------------------------------------------------------------------------------------


def output_columns(model: torch.nn.Module, n_outputs: int) -> list[str]:
    """The prediction column(s) the uncertainty columns extend: `prediction`, or one per output."""
    if n_outputs == 1:
        return ["prediction"]
    id2label = getattr(unwrap_peft(model).config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i), str(i))) for i in range(n_outputs)]
    return [f"prediction_{name}" for name in names]


def frame_labels(frame: pd.DataFrame) -> np.ndarray | None:
    """A split frame's labels as numbers: its `label` column, or its `label_<target>` columns (one per
    output, molft.tasks); None when it has none or they are not numbers (class names)."""
    columns = ["label"] if "label" in frame else [c for c in frame.columns if c.startswith("label_")]
    if not columns:
        return None
    try:
        values = frame[columns].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values[:, 0] if len(columns) == 1 else values


def add_columns(
    frame: pd.DataFrame, rows: Any, method: str, columns: Sequence[str], mean: np.ndarray, std: np.ndarray
) -> None:
    """`<column>_<method>` and `<column>_<method>_std` for the `rows` (a boolean mask); NaN elsewhere."""
    for j, column in enumerate(columns):
        for name, values in ((f"{column}_{method}", mean[:, j]), (f"{column}_{method}_std", std[:, j])):
            frame[name] = np.nan
            frame.loc[rows, name] = values


def check_prediction_options(
    tta: int, options: UncertaintyArguments, do_predict: bool, hp_search: bool
) -> None:
    """Fail before any work when the prediction-time options cannot run."""
    asked = [
        flag
        for flag, on in (
            ("--tta", tta > 0),
            ("--mc_dropout_samples", options.mc_dropout_samples > 0),
            ("--ensemble_dirs", bool(options.ensemble_dirs)),
        )
        if on
    ]
    if asked and hp_search:
        raise ValueError(f"{', '.join(asked)}: a hyperparameter search writes no predictions; drop them.")
    if asked and not do_predict:
        raise ValueError(f"{', '.join(asked)} add uncertainty to the predictions; add --do_predict.")
    for run in options.ensemble_paths():
        if not run.is_dir():
            raise FileNotFoundError(f"--ensemble_dirs: {run} does not exist.")


def predict_with_uncertainty(
    model: torch.nn.Module,
    tokenizer: Any,
    predictions: pd.DataFrame,
    unlabelled: pd.DataFrame | None,
    *,
    tta: int,
    options: UncertaintyArguments,
    seed: int,
    batch_size: int,
    max_length: int,
    output_dir: Path,
    labels: np.ndarray | None = None,
    columns: Sequence[str] | None = None,
) -> dict[str, float]:
    """Add the asked methods' columns to the test rows of `predictions` and to `unlabelled`; test metrics.

    `labels`: the test molecules' labels as numbers, [n_test] or [n_test, n_outputs] (class indices for
    single-label classification; NaN marks a missing one). Default: `frame_labels` of the test rows of
    `predictions`; without numeric labels only the columns are added.
    `columns`: the prediction column each output extends (default: `output_columns`).
    """
    test_rows = (predictions["split"] == "test").to_numpy()
    sets = {"test": predictions.loc[test_rows, "canonical_smiles"].tolist()}
    if unlabelled is not None:
        sets["predict"] = unlabelled["canonical_smiles"].tolist()
    methods: dict[str, Callable[[list[str]], np.ndarray]] = {}
    if tta:

        def predict(smiles: list[str]) -> np.ndarray:
            return predict_smiles(model, tokenizer, smiles, batch_size, max_length)

        methods["tta"] = lambda smiles: tta_samples(predict, smiles, tta, seed)
    if options.mc_dropout_samples:
        methods["mc"] = lambda smiles: mc_dropout_samples(
            model, tokenizer, smiles, options.mc_dropout_samples, seed, batch_size, max_length
        )
    if options.ensemble_dirs:
        dirs = options.ensemble_paths()
        methods["ensemble"] = lambda smiles: ensemble_samples(
            dirs, smiles, batch_size, max_length, current=(output_dir, model, tokenizer)
        )
    if labels is None:
        labels = frame_labels(predictions.loc[test_rows])
    if labels is None:
        logger.warning("The test molecules have no numeric labels: uncertainty metrics are not computed.")
    problem_type = problem_type_of(model)
    metrics: dict[str, float] = {}
    for method, sample in methods.items():
        for name, smiles in sets.items():
            mean, std = summarise(sample(smiles))
            names = list(columns or output_columns(model, mean.shape[1]))
            if len(names) != mean.shape[1]:
                raise ValueError(f"{len(names)} prediction columns {names} for {mean.shape[1]} outputs.")
            if name == "test":
                add_columns(predictions, test_rows, method, names, mean, std)
            if name == "test" and labels is not None:
                metrics.update(
                    uncertainty_metrics(
                        "test",
                        method,
                        labels,
                        mean,
                        std,
                        problem_type,
                        options.calibration_bins,
                        [c.split("_", 1)[-1] for c in names],
                    )
                )
            if name == "predict":
                add_columns(unlabelled, np.ones(len(unlabelled), dtype=bool), method, names, mean, std)
        logger.info("Uncertainty (%s) added for %s.", method, " and ".join(sets))
    return metrics
