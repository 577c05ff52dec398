#!/usr/bin/env python
"""Score external molecules by their influence on a fine-tuned MoLFormer regression run's held-out loss.

A thin command line over `molft.influence`: it rebuilds the run's data from its split.json, loads the saved
model (full or PEFT adapter), and asks which external molecules, if added to the training data, would
lower the loss on the validation molecules (the query set):

    python run_influence.py configs/influence_example.yaml
    python run_influence.py configs/influence_example.yaml --estimator lissa --lissa_depth 2000
    python run_influence.py --model_name_or_path outputs/run --external_file pool.csv \
        --estimator datainf --scope lora --output_dir outputs/influence_lora
    python run_influence.py configs/influence_example.yaml --validate   # trust check of every estimator

Sign convention (the library's): a score is the predicted change of the query loss when the molecule is
added, so NEGATIVE = HELPFUL; rank 1 is the most helpful molecule.

Writes `influence_scores.csv` (what `run_selection.py --strategy influence --scores_file` reads),
`influence_summary.json` (settings, timings, solver convergence, score statistics and the threshold each
selection rule implies), `influence_histogram.png`, with --per_query `influence_matrix.npy` (+
`influence_queries.csv`), with --validate `validation.csv`/`validation.md`, then `run_complete.json` last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch
from torch import nn
from torch.func import functional_call, jvp
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

import modeling_molformer_reg  # noqa: F401  registers MoLFormer with the Auto classes
import tokenization_molformer  # noqa: F401  registers the tokenizer with AutoTokenizer
from molft import plots
from molft.cli import log_level, parse_args, setup_logging
from molft.influence import (
    ESTIMATORS,
    HELPFUL_SIGN,
    SCOPES,
    InfluenceProblem,
    LiSSADivergenceError,
    NonFiniteGradientError,
    compute_influence,
    default_forward,
    leave_one_in_retrain_effect,
    ridge_weights,
    select_parameters,
    spearman_vs,
    squared_error_loss,
)
from molft.io import atomic_path, mark_done, prepare_output_dir, write_csv, write_json, write_text
from molft.model_utils import embed_batches, fixed_feature_maps, smiles_batches, unwrap_peft
from molft.peft_setup import is_adapter_checkpoint, load_regression_checkpoint
from molft.run_data import RunDataArguments
from molft.selection import load_pool
from molft.splits import SPLIT_NAMES

logger = logging.getLogger(__name__)

SCORES_FILE = "influence_scores.csv"
SUMMARY_FILE = "influence_summary.json"
HISTOGRAM_FILE = "influence_histogram.png"
MATRIX_FILE = "influence_matrix.npy"
QUERIES_FILE = "influence_queries.csv"
VALIDATION_CSV = "validation.csv"
VALIDATION_MD = "validation.md"
DIRECTION = "negative=helpful (predicted query-loss decrease)"
QUERY_SPLITS = ("validation", "test")
TOP_K = (10, 30, 50)
PERCENTILES = (10, 25)
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
VALIDATE_DEFAULT = "exact,cg,lissa,datainf,ekfac,gradient_dot,tracin"
REGRESSION_ARCHITECTURE = "MolformerForRegression"
HEAD_ATTRIBUTE = "classifier"
PEFT_FROZEN_COPY = ".original_module."
Batch = dict[str, torch.Tensor]
HESSIAN_ESTIMATORS = ("exact", "cg", "lissa")
CURVATURES = ("gauss_newton", "hessian")
FEATURE_GRAD_ENTRIES = 50_000_000
FEATURE_BATCH_MAX = 4096


@dataclass
class InfluenceArguments:
    estimator: str = field(
        default="cg",
        metadata={
            "help": "How (H + damping I)^-1 is applied: exact (explicit Hessian; small scopes) | cg (conjugate "
            "gradient on Hessian-vector products) | lissa (stochastic Neumann series) | datainf (closed form "
            "on the empirical Fisher; LoRA-sized scopes) | ekfac (kronfluence EK-FAC on Linear layers) | "
            "gradient_dot | tracin (first order, no Hessian)."
        },
    )
    scope: str = field(
        default="head",
        metadata={
            "help": "Parameters the influence is computed over: head (the regression head) | last_k_layers "
            "(last --last_k encoder layers + head) | bias (every bias + head) | lora (PEFT adapters) | all."
        },
    )
    last_k: int = field(default=1, metadata={"help": "Encoder layers in --scope last_k_layers."})
    damping: float = field(
        default=0.01,
        metadata={
            "help": "lambda in (H + lambda I), like an L2 penalty on the scope. The loss is 0.5 x squared error "
            "on the model's normalised targets, so the curvature is O(1) per unit feature. With --curvature "
            "hessian it must exceed the magnitude of the most negative eigenvalue."
        },
    )
    query_split: str = field(
        default="validation",
        metadata={
            "help": "Split whose loss the scores predict: validation | test. Selecting on test makes the run's "
            "test metrics optimistic (a loud warning is logged)."
        },
    )
    per_query: bool = field(
        default=False,
        metadata={"help": "Also write the [queries x candidates] matrix (influence_matrix.npy)."},
    )
    batch_size: int = field(
        default=32,
        metadata={
            "help": "Molecules per vectorised gradient / Hessian-vector product through the model. Pooled "
            "embeddings (--scope head, --validate) go in larger batches of up to 5e7 gradient entries."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use a seeded random subset of the training split for the Hessian/Fisher (speed for "
            "large scopes). Default: the whole training split."
        },
    )
    curvature: str = field(
        default="gauss_newton",
        metadata={
            "help": "Curvature that exact/cg/lissa invert: gauss_newton (J^T J of the model linearised at the "
            "trained parameters: positive semi-definite, so the solve is well-posed even when the model is not "
            "at a minimum) | hessian (the true Hessian of Koh & Liang: indefinite away from a minimum, needs "
            "--damping above its most negative eigenvalue). Gradients are the same for both."
        },
    )
    head_on_features: bool = field(
        default=True,
        metadata={
            "help": "--scope head: embed every molecule once and differentiate the head alone on the pooled "
            "embeddings (exact, since the encoder is outside the scope; much faster). false: run the whole "
            "model for every gradient."
        },
    )
    grad_method: str = field(
        default="auto",
        metadata={
            "help": "Per-sample gradients: vmap (one vectorised backward per batch) | loop (one backward per "
            "molecule) | auto (vmap, falling back to loop)."
        },
    )
    vmap_chunk_size: int | None = field(
        default=None, metadata={"help": "Molecules per vmap chunk (caps memory for large scopes)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of --max_train_samples and the solvers."})


@dataclass
class EstimatorArguments:
    exact_max_params: int = field(
        default=5000, metadata={"help": "exact: refuse scopes with more parameters (P x P Hessian)."}
    )
    cg_tol: float = field(default=1e-6, metadata={"help": "cg: stop at relative residual <= tol."})
    cg_max_iter: int = field(default=100, metadata={"help": "cg: maximum iterations (HVP passes)."})
    lissa_scale: str = field(
        default="auto",
        metadata={
            "help": "lissa: must exceed the top eigenvalue of the damped Hessian, else the recursion "
            "diverges; auto = 1.5 x a power-iteration estimate."
        },
    )
    lissa_depth: int = field(default=1000, metadata={"help": "lissa: recursion steps."})
    lissa_repeats: int = field(default=1, metadata={"help": "lissa: independent recursions averaged."})
    lissa_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "lissa: molecules per stochastic HVP (default: full training data, deterministic)."
        },
    )
    lissa_log_every: int = field(default=50, metadata={"help": "lissa: record the iHVP norm every N steps."})
    lissa_divergence_factor: float = field(
        default=10.0, metadata={"help": "lissa: declare divergence when the norm exceeds this x its bound."}
    )
    datainf_layer_damping: str = field(
        default="heuristic",
        metadata={
            "help": "datainf: fixed (--damping for every layer) | heuristic (0.1 x mean squared gradient norm "
            "per parameter, per layer; DataInf needs damping well above the squared gradient norms)."
        },
    )
    ekfac_strategy: str = field(
        default="ekfac", metadata={"help": "ekfac: kronfluence strategy ekfac | kfac | diagonal | identity."}
    )
    tracin_checkpoints: str | None = field(
        default=None,
        metadata={
            "help": "tracin: comma-separated checkpoint folders, or 'auto' (the run's checkpoint-* folders). "
            "Only the scope's parameters are swapped in. Default: the final model alone (= gradient_dot)."
        },
    )
    tracin_learning_rates: str | None = field(
        default=None,
        metadata={
            "help": "tracin: comma-separated learning rate per checkpoint (default: the last learning rate "
            "logged in each checkpoint's trainer_state.json)."
        },
    )


@dataclass
class PoolArguments:
    external_file: str = field(
        metadata={"help": "External molecules to score: csv/tsv/json/jsonl/parquet with SMILES and labels."}
    )
    external_smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column (default: found by name)."}
    )
    external_label_column: str | None = field(
        default=None,
        metadata={"help": "Label column (default: found by name); influence needs the candidates' labels."},
    )


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A run_regression.py output folder: a full regression model or a PEFT adapter."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of an adapter, if not where the adapter says."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the one saved with the model)."}
    )
    max_seq_length: int = field(default=202, metadata={"help": "The run's --max_seq_length (truncation)."})
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when available) | cpu | cuda | cuda:N."}
    )
    dtype: str = field(
        default="float64",
        metadata={
            "help": "Precision of the influence computation: float64 (default: solves and rankings are limited "
            "by the method, not by rounding, and the forward-mode derivatives used for scoring do not overflow "
            "at padded positions, which they do in float32 for whole-model scopes) | float32 (half the "
            "memory; fine for --scope head)."
        },
    )


@dataclass
class ValidationArguments:
    validate: bool = field(
        default=False,
        metadata={
            "help": "Also check the estimators where the truth is computable: a ridge head on the model's "
            "frozen pooled embeddings (l2 = --damping). Each estimator's scores are compared (Spearman) with "
            "the exact influence and with the measured query-loss change of actually retraining with each "
            "molecule added. Writes validation.csv and validation.md."
        },
    )
    validate_estimators: str = field(
        default=VALIDATE_DEFAULT, metadata={"help": "Comma-separated estimators compared by --validate."}
    )


@dataclass
class OutputArguments:
    output_dir: str = field(metadata={"help": "Where the scores, summary and plots go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Redo a run whose output_dir is already complete."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error."})


ARGUMENT_TYPES = (
    InfluenceArguments,
    EstimatorArguments,
    PoolArguments,
    RunDataArguments,
    ModelArguments,
    ValidationArguments,
    OutputArguments,
)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Score the external pool and return the summary (also written to influence_summary.json)."""
    arguments = parse_args(ARGUMENT_TYPES, args)
    influence_args, estimator_args, pool_args, data_args, model_args, validation_args, output_args = arguments
    level = log_level(output_args.log_level)
    setup_logging(level)
    # no config dumps (transformers) or argument dumps (kronfluence) at info level
    transformers_logging.set_verbosity(max(level, logging.WARNING))
    logging.getLogger("kronfluence").setLevel(max(level, logging.WARNING))
    validate_arguments(influence_args, estimator_args, validation_args)
    device, dtype = resolve_device(model_args.device), resolve_dtype(model_args.dtype)
    started = time.perf_counter()
    quiet = output_args.disable_tqdm

    # Inputs, each checked before anything slow runs
    checkpoint_kind = check_regression_checkpoint(model_args.model_name_or_path)
    data_args.use_model_split(model_args.model_name_or_path, required=True)
    frames = data_args.load_frames()
    pool = load_candidate_pool(pool_args)
    warn_about_query_split(influence_args.query_split)
    warn_about_extra_training_data(model_args.model_name_or_path)
    output_dir = prepare_output_dir(
        output_args.output_dir, output_args.overwrite_output_dir, "influence scores"
    )

    model = load_regression_checkpoint(model_args.model_name_or_path, model_args.base_model)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    config = unwrap_peft(model).config
    loss_fn, loss_description = influence_loss(config)

    train_frame = training_subset(frames["train"], influence_args.max_train_samples, influence_args.seed)
    query_frame = frames[influence_args.query_split]
    batch_size, max_length = influence_args.batch_size, model_args.max_seq_length
    token_batches = {
        "train": frame_batches(train_frame, tokenizer, batch_size, max_length),
        "query": frame_batches(query_frame, tokenizer, batch_size, max_length),
        "candidates": frame_batches(pool, tokenizer, batch_size, max_length),
    }
    logger.info(
        "Influence of %d external molecules on the %s loss (%d molecules); Hessian over %d training molecules.",
        len(pool),
        influence_args.query_split,
        len(query_frame),
        len(train_frame),
    )

    with fixed_feature_maps(model):
        setup = build_problem(model, influence_args, loss_fn, token_batches, quiet)
        options = estimator_options(influence_args, estimator_args, setup, model_args)
        scores, diagnostics = run_estimator(setup, influence_args, options, quiet)
        validation = None
        if validation_args.validate:
            features = setup.features or embed_all(model, token_batches, quiet)
            validation = validate_estimators(
                features,
                {
                    name: frame["label"].to_numpy()
                    for name, frame in (("train", train_frame), ("query", query_frame), ("candidates", pool))
                },
                config,
                influence_args,
                estimator_args,
                parse_list(validation_args.validate_estimators),
                quiet,
            )

    mean_scores = scores.mean(axis=0) if influence_args.per_query else scores
    scores_frame = score_table(pool, mean_scores, frames)
    write_csv(output_dir / SCORES_FILE, scores_frame)
    if influence_args.per_query:
        write_matrix(output_dir, scores, query_frame)
    summary = run_summary(
        arguments, checkpoint_kind, setup, diagnostics, mean_scores, loss_description, len(train_frame),
        len(query_frame), dtype, device,
    )  # fmt: skip
    if validation is not None:
        write_csv(output_dir / VALIDATION_CSV, validation)
        write_text(output_dir / VALIDATION_MD, validation_markdown(validation, influence_args))
        summary["validation"] = json_records(validation)
        logger.info("Estimator validation (ridge head on frozen embeddings):\n%s", format_table(validation))
    write_json(output_dir / SUMMARY_FILE, summary)
    plots.score_histogram(
        mean_scores,
        output_dir / HISTOGRAM_FILE,
        xlabel="influence score (negative = helpful)",
        title=f"{influence_args.estimator} influence on the {influence_args.query_split} loss "
        f"({influence_args.scope} scope)",
    )
    log_result(scores_frame, summary)
    mark_done(
        output_dir,
        {
            "script": "run_influence.py",
            "estimator": influence_args.estimator,
            "scope": influence_args.scope,
            "n_candidates": len(pool),
            "external_file": pool_args.external_file,
            "seconds": time.perf_counter() - started,
        },
    )
    return summary


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def parse_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def validate_arguments(
    influence_args: InfluenceArguments,
    estimator_args: EstimatorArguments,
    validation_args: ValidationArguments,
) -> None:
    """Fail before any data or model is read when options cannot work."""
    if influence_args.estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown --estimator {influence_args.estimator!r}; choose one of {sorted(ESTIMATORS)}."
        )
    if influence_args.scope not in SCOPES:
        raise ValueError(f"Unknown --scope {influence_args.scope!r}; choose one of {SCOPES}.")
    if influence_args.query_split not in QUERY_SPLITS:
        raise ValueError(f"--query_split must be one of {QUERY_SPLITS}, got {influence_args.query_split!r}.")
    if influence_args.curvature not in CURVATURES:
        raise ValueError(f"--curvature must be one of {CURVATURES}, got {influence_args.curvature!r}.")
    if not (math.isfinite(influence_args.damping) and influence_args.damping >= 0):
        raise ValueError(f"--damping must be a finite number >= 0, got {influence_args.damping}.")
    if influence_args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {influence_args.batch_size}.")
    if influence_args.max_train_samples is not None and influence_args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be >= 1, got {influence_args.max_train_samples}.")
    lissa_scale(estimator_args.lissa_scale)  # raises on a bad value
    if validation_args.validate and influence_args.damping <= 0:
        raise ValueError("--validate needs --damping > 0 (it is the ridge penalty of the surrogate head).")
    unknown = sorted(set(parse_list(validation_args.validate_estimators)) - set(ESTIMATORS))
    if validation_args.validate and unknown:
        raise ValueError(
            f"--validate_estimators: unknown estimator(s) {unknown}; choose from {sorted(ESTIMATORS)}."
        )


def lissa_scale(value: str) -> float | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"--lissa_scale must be 'auto' or a positive number, got {value!r}.") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"--lissa_scale must be 'auto' or a positive number, got {value!r}.")
    return scale


def warn_about_query_split(query_split: str) -> None:
    if query_split == "test":
        logger.warning(
            "!!! --query_split test: the scores predict the TEST loss. Selecting molecules with them tunes the "
            "training data to the test set, so the run's test metrics are no longer an unbiased estimate. Use "
            "this only for analysis, never for a selection you report test metrics for. !!!"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"--dtype must be float32 or float64, got {name!r}.")
    return dtypes[name]


# ----------------------------------------------------------------------------------------------------------
# Inputs: checkpoint, the run's split, the external pool
# ----------------------------------------------------------------------------------------------------------


def check_regression_checkpoint(path: str | Path) -> str:
    """'full' or 'adapter'; anything without a trained regression head (e.g. an MLM checkpoint) is an error.

    Loading an MLM checkpoint as a regression model would silently attach a random head, and every score
    would describe that random head.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model_name_or_path {path} is not a directory (a run_regression.py output)."
        )
    if is_adapter_checkpoint(path):
        return "adapter"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{path} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json)."
        )
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    head_keys = [key for key in checkpoint_weight_names(path) if key.startswith(f"{HEAD_ATTRIBUTE}.")]
    if REGRESSION_ARCHITECTURE not in architectures or not head_keys:
        raise ValueError(
            f"{path} is not a fine-tuned regression checkpoint: architectures {architectures}, "
            f"{len(head_keys)} regression-head ({HEAD_ATTRIBUTE}.*) weights. Influence needs the trained head "
            "of a run_regression.py output; an MLM checkpoint (run_mlm.py) must be fine-tuned first."
        )
    return "full"


def checkpoint_weight_names(path: Path) -> list[str]:
    """Tensor names in the checkpoint's safetensors file(s), without loading them."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return list(handle.keys())
    raise ValueError(f"{path} has no model.safetensors weights.")


def load_candidate_pool(pool_args: PoolArguments) -> pd.DataFrame:
    """The external molecules through run_selection's loader, so score indices are pool positions."""
    try:
        return load_pool(
            pool_args.external_file, pool_args.external_smiles_column, pool_args.external_label_column
        )
    except ValueError as err:
        raise ValueError(
            f"--external_file {pool_args.external_file}: {err} (influence needs each molecule's SMILES and "
            "label: the candidate's gradient is that of its own loss)."
        ) from err


def warn_about_extra_training_data(model_path: str) -> None:
    """A run trained with --extra_train_file saw molecules the split does not hold: say so."""
    run_config = Path(model_path) / "run_config.json"
    if not run_config.is_file():
        return
    extra = json.loads(run_config.read_text()).get("data", {}).get("extra_train_file")
    if extra:
        logger.warning(
            "The run also trained on --extra_train_file %s; the Hessian here uses the split's training "
            "molecules only.",
            extra,
        )


def training_subset(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    if limit is None or limit >= len(frame):
        return frame
    rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=limit, replace=False))
    logger.info("Hessian/Fisher over %d of %d training molecules (--max_train_samples).", limit, len(frame))
    return frame.iloc[rows].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# The influence problem
# ----------------------------------------------------------------------------------------------------------


def influence_loss(config: Any) -> tuple[Callable[[torch.Tensor, Batch], torch.Tensor], str]:
    """The per-sample loss the model was trained on, in normalised target units, with the library's 1/2.

    Training minimises mean (normalised prediction - normalised label)^2, so 0.5 x that error keeps the
    Hessian's scale relative to --damping what it was in training: (logits - label) / target_std.
    """
    std = float(config.target_std)
    kind = getattr(config, "regression_loss", "mse")
    if kind == "huber":
        delta = float(config.huber_delta)

        def huber(predictions: torch.Tensor, batch: Batch) -> torch.Tensor:
            residual = (predictions.reshape(predictions.shape[0], -1) - batch["labels"].reshape(-1, 1)) / std
            zeros = torch.zeros_like(residual)
            return nn.functional.huber_loss(residual, zeros, reduction="none", delta=delta).sum(dim=-1)

        return huber, f"huber(delta={delta}) on (prediction - label) / {std:.6g}"
    if kind == "l1":
        logger.warning(
            "The model was trained with an L1 loss, whose Hessian is zero almost everywhere; influence uses "
            "0.5 x squared error instead (same residuals)."
        )

    def squared_error(predictions: torch.Tensor, batch: Batch) -> torch.Tensor:
        return squared_error_loss(predictions / std, {"labels": batch["labels"] / std})

    return squared_error, f"0.5 * ((prediction - label) / {std:.6g})^2"


class HeadOnFeatures(nn.Module):
    """The model's regression head on precomputed pooled embeddings, with its label-unit output.

    For the head scope the encoder is fixed, so differentiating this small module is exactly
    differentiating the whole model, without running the encoder for every gradient and HVP.
    """

    def __init__(self, head: nn.Module, target_mean: float, target_std: float) -> None:
        super().__init__()
        self.head = head
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) * self.target_std + self.target_mean


@dataclass
class ProblemSetup:
    """The influence problem plus the batches each role feeds it and how its names map to the model's."""

    problem: InfluenceProblem
    batches: dict[str, list[Batch]]
    model_names: list[str]  # the scope's parameter names in the model, in problem order
    on_features: bool
    features: dict[str, np.ndarray] | None = None


def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the regression head; for PEFT the wrapper that runs the trained copy."""
    head = getattr(unwrap_peft(model), HEAD_ATTRIBUTE, None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no regression head ({HEAD_ATTRIBUTE!r}).")
    for name, module in model.named_modules():
        if module is head:
            return name, head
    raise ValueError("The regression head is not a submodule of the model.")


def scope_parameters(model: nn.Module, scope: str, last_k: int) -> dict[str, nn.Parameter]:
    """The scope's parameters, without PEFT's frozen, unused copy of the head."""
    params = select_parameters(model, scope, last_k=last_k)
    params = {name: param for name, param in params.items() if PEFT_FROZEN_COPY not in name}
    if not params:
        raise ValueError(f"--scope {scope} selects no parameters of this model.")
    return params


def build_problem(
    model: nn.Module,
    influence_args: InfluenceArguments,
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor],
    token_batches: dict[str, list[Batch]],
    quiet: bool,
) -> ProblemSetup:
    """The whole model over the chosen scope, or, for the head scope, the head alone on pooled embeddings."""
    problem_kwargs = {
        "loss_fn": loss_fn,
        "grad_method": influence_args.grad_method,
        "vmap_chunk_size": influence_args.vmap_chunk_size,
    }
    if influence_args.scope == "head" and influence_args.head_on_features:
        prefix, head = head_module(model)
        config = unwrap_peft(model).config
        module = HeadOnFeatures(head, config.target_mean, config.target_std)
        params = {name: param for name, param in module.named_parameters() if PEFT_FROZEN_COPY not in name}
        features = embed_all(model, token_batches, quiet)
        dtype = next(iter(params.values())).dtype
        size = feature_batch_size(influence_args.batch_size, sum(param.numel() for param in params.values()))
        batches = {
            role: feature_batches(features[role], labels_of(token_batches[role]), size, dtype)
            for role in token_batches
        }
        model_names = [prefix + name.removeprefix("head") for name in params]
        forward_fn = curvature_forward(influence_args, default_forward, params)
        problem = InfluenceProblem(module, params, forward_fn=forward_fn, **problem_kwargs)
        return ProblemSetup(problem, batches, model_names, on_features=True, features=features)
    params = scope_parameters(model, influence_args.scope, influence_args.last_k)
    forward_fn = curvature_forward(influence_args, default_forward, params)
    problem = InfluenceProblem(model, params, forward_fn=forward_fn, **problem_kwargs)
    return ProblemSetup(problem, dict(token_batches), list(params), on_features=False)


def curvature_forward(
    influence_args: InfluenceArguments,
    forward_fn: Callable[[nn.Module, Batch], torch.Tensor],
    params: dict[str, nn.Parameter],
) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """The linearised forward for the Gauss-Newton curvature of the Hessian-based estimators, else as is."""
    if influence_args.curvature == "gauss_newton" and influence_args.estimator in HESSIAN_ESTIMATORS:
        return LinearisedForward(forward_fn, params)
    return forward_fn


class LinearisedForward:
    """forward_fn of the model linearised at its trained parameters: f(theta0) + J (theta - theta0).

    At theta0 values and gradients equal the model's, while the Hessian of a convex loss of this
    forward is exactly the generalised Gauss-Newton matrix J^T H_loss J (Martens 2010): positive
    semi-definite, so exact/cg/lissa see a well-posed problem even when the model is not at a minimum.
    """

    def __init__(
        self, forward_fn: Callable[[nn.Module, Batch], torch.Tensor], params: dict[str, nn.Parameter]
    ) -> None:
        self.forward_fn = forward_fn
        self.anchor = {name: param.detach().clone() for name, param in params.items()}

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # Inside the library's functional_call the scope attributes hold the current theta.
        delta = {name: _attribute(model, name) - value for name, value in self.anchor.items()}
        bound = _BoundForward(model, self.forward_fn)

        def at(params: dict[str, torch.Tensor]) -> torch.Tensor:
            named = {f"model.{name}": value for name, value in params.items()}
            return functional_call(bound, named, (batch,))

        value, tangent = jvp(at, (self.anchor,), (delta,))
        return value + tangent


class _BoundForward(nn.Module):
    def __init__(self, model: nn.Module, forward_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_fn(self.model, batch)


def _attribute(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)


def embed_all(model: nn.Module, token_batches: dict[str, list[Batch]], quiet: bool) -> dict[str, np.ndarray]:
    """Pooled embeddings (what the head sees) of every role's molecules, in eval mode."""
    return {
        role: embed_batches(model, tqdm(batches, desc=f"Embedding {role}", disable=quiet, leave=False))
        for role, batches in token_batches.items()
    }


def labels_of(batches: Sequence[Batch]) -> np.ndarray:
    return torch.cat([batch["labels"].reshape(-1) for batch in batches]).double().numpy()


def feature_batch_size(batch_size: int, num_params: int) -> int:
    """Embeddings are cheap to batch: as many as keep a batch's per-sample gradients near 5e7 numbers."""
    return int(min(FEATURE_BATCH_MAX, max(batch_size, FEATURE_GRAD_ENTRIES // max(num_params, 1))))


def feature_batches(
    features: np.ndarray, labels: np.ndarray, batch_size: int, dtype: torch.dtype
) -> list[Batch]:
    x = torch.as_tensor(features, dtype=dtype)
    y = torch.as_tensor(labels, dtype=dtype)
    return [
        {"features": x[start : start + batch_size], "labels": y[start : start + batch_size]}
        for start in range(0, len(x), batch_size)
    ]


def estimator_options(
    influence_args: InfluenceArguments,
    estimator_args: EstimatorArguments,
    setup: ProblemSetup | None = None,
    model_args: ModelArguments | None = None,
    estimator: str | None = None,
) -> dict[str, Any]:
    """The constructor options of one estimator, from the flags (`setup`/`model_args`: TracIn checkpoints)."""
    name = estimator or influence_args.estimator
    damping = influence_args.damping
    if name == "exact":
        return {"damping": damping, "max_params": estimator_args.exact_max_params}
    if name == "cg":
        return {"damping": damping, "tol": estimator_args.cg_tol, "max_iter": estimator_args.cg_max_iter}
    if name == "lissa":
        return {
            "damping": damping,
            "scale": lissa_scale(estimator_args.lissa_scale),
            "depth": estimator_args.lissa_depth,
            "repeats": estimator_args.lissa_repeats,
            "batch_size": estimator_args.lissa_batch_size,
            "seed": influence_args.seed,
            "log_every": estimator_args.lissa_log_every,
            "divergence_factor": estimator_args.lissa_divergence_factor,
        }
    if name == "datainf":
        return {"damping": damping, "layer_damping": estimator_args.datainf_layer_damping}
    if name == "ekfac":
        return {
            "damping": damping,
            "strategy": estimator_args.ekfac_strategy,
            "seed": influence_args.seed,
            "output_dir": None,  # kronfluence's factors go to a temporary folder, removed afterwards
        }
    if name == "tracin":
        if setup is None or model_args is None or not estimator_args.tracin_checkpoints:
            return {}  # the final parameters alone (--validate: the surrogate has no checkpoints)
        return {"checkpoints": tracin_checkpoints(setup, estimator_args, model_args)}
    return {}  # gradient_dot: no curvature, damping has no effect


def tracin_checkpoints(
    setup: ProblemSetup, estimator_args: EstimatorArguments, model_args: ModelArguments
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """(scope state, learning rate) of each checkpoint, named as in the problem."""
    spec = estimator_args.tracin_checkpoints
    run_dir = Path(model_args.model_name_or_path)
    if spec.strip().lower() == "auto":
        folders = sorted(
            (path for path in run_dir.glob("checkpoint-*") if path.is_dir()),
            key=lambda path: (
                int(path.name.rsplit("-", 1)[-1]) if path.name.rsplit("-", 1)[-1].isdigit() else 0
            ),
        )
        if not folders:
            raise ValueError(f"--tracin_checkpoints auto: {run_dir} has no checkpoint-* folders.")
    else:
        folders = [Path(part) for part in parse_list(spec)]
    rates = [float(value) for value in parse_list(estimator_args.tracin_learning_rates or "")]
    if rates and len(rates) != len(folders):
        raise ValueError(f"--tracin_learning_rates has {len(rates)} values for {len(folders)} checkpoints.")
    checkpoints = []
    for position, folder in enumerate(folders):
        rate = rates[position] if rates else logged_learning_rate(folder)
        model = load_regression_checkpoint(folder, model_args.base_model)
        named = dict(model.named_parameters())
        missing = [name for name in setup.model_names if name not in named]
        if missing:
            raise ValueError(f"TracIn checkpoint {folder} lacks scope parameters, e.g. {missing[:3]}.")
        state = {
            problem_name: named[model_name].detach()
            for problem_name, model_name in zip(setup.problem.names, setup.model_names, strict=True)
        }
        checkpoints.append((state, rate))
        logger.info("TracIn checkpoint %s with learning rate %.3g", folder, rate)
    return checkpoints


def logged_learning_rate(folder: Path) -> float:
    state_file = folder / "trainer_state.json"
    history = json.loads(state_file.read_text()).get("log_history", []) if state_file.is_file() else []
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    if not rates:
        raise ValueError(
            f"TracIn checkpoint {folder} has no logged learning rate (trainer_state.json); give "
            "--tracin_learning_rates."
        )
    return float(rates[-1])


# ----------------------------------------------------------------------------------------------------------
# Running an estimator, with progress and clear failures
# ----------------------------------------------------------------------------------------------------------


class ProgressBatches(list):
    """Batches that show a progress bar every time an estimator passes over them."""

    def __init__(self, batches: Sequence[Batch], desc: str, quiet: bool) -> None:
        super().__init__(batches)
        self.desc = desc
        self.quiet = quiet

    def __iter__(self) -> Iterator[Batch]:
        yield from tqdm(super().__iter__(), total=len(self), desc=self.desc, disable=self.quiet, leave=False)


class SolverProgress(logging.Handler):
    """A progress bar fed by the solvers' per-iteration debug records (CG residual, LiSSA iHVP norm)."""

    def __init__(self, total: int, desc: str, quiet: bool, depth: int = 1) -> None:
        super().__init__(logging.DEBUG)
        self.depth = depth
        self.bar = tqdm(total=total, desc=desc, disable=quiet, leave=False)

    def emit(self, record: logging.LogRecord) -> None:
        message, values = str(record.msg), record.args
        if not isinstance(values, tuple):
            return
        if message.startswith("CG iteration") and len(values) == 2:
            self.bar.update(1)
            self.bar.set_postfix(residual=f"{values[1]:.2e}")
        elif message.startswith("LiSSA repeat") and len(values) == 3:
            position = int(values[0]) * self.depth + int(values[1])
            self.bar.update(max(0, position - self.bar.n))
            self.bar.set_postfix(ihvp_norm=f"{max(values[2]):.3e}")

    def close(self) -> None:
        self.bar.close()
        super().close()


def run_estimator(
    setup: ProblemSetup, influence_args: InfluenceArguments, options: dict[str, Any], quiet: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """compute_influence with progress bars; failures are re-raised with what to change."""
    name = influence_args.estimator
    batches = {
        role: ProgressBatches(batches, f"{role} gradients", quiet) for role, batches in setup.batches.items()
    }
    solver_logger = logging.getLogger("molft.influence.second_order")
    handler = None
    if name in ("cg", "lissa"):
        if name == "cg":
            handler = SolverProgress(options["max_iter"], "CG iterations", quiet)
        else:
            total = options["depth"] * options["repeats"]
            handler = SolverProgress(total, "LiSSA steps", quiet, depth=options["depth"])
        solver_logger.addHandler(handler)
        previous_level = solver_logger.level
        solver_logger.setLevel(logging.DEBUG)
        _keep_root_handlers_at(logging.getLogger().getEffectiveLevel())
    try:
        scores, diagnostics = compute_influence(
            setup.problem,
            batches["train"],
            batches["query"],
            batches["candidates"],
            name,
            per_query=influence_args.per_query,
            **options,
        )
    except LiSSADivergenceError as err:
        raise LiSSADivergenceError(
            f"{err} With --lissa_scale {options.get('scale')} the recursion blew up instead of converging: "
            "rerun with --lissa_scale auto (1.5 x the estimated top eigenvalue) or a larger value, or use "
            "--estimator cg. No scores were written."
        ) from err
    except NonFiniteGradientError as err:
        raise NonFiniteGradientError(
            f"{err}. Check the labels/SMILES of those molecules, or use --dtype float64."
        ) from err
    except FloatingPointError as err:
        raise FloatingPointError(
            f"{name} failed: {err}. The Hessian of a model away from a minimum can be indefinite: use "
            f"--curvature gauss_newton (positive semi-definite), or raise --damping (now "
            f"{influence_args.damping:g}; e.g. x10); --estimator exact reports whether the damped curvature is "
            "positive definite. No scores were written."
        ) from err
    finally:
        if handler is not None:
            solver_logger.removeHandler(handler)
            solver_logger.setLevel(previous_level)
            handler.close()
    if name == "lissa":
        warn_if_lissa_truncated(diagnostics["solver"], options)
    return scores, diagnostics


def lissa_steps_needed(solver: dict[str, Any], damping: float) -> float:
    """Steps per e-fold of the slowest direction: the error there shrinks like (1 - damping / scale)^steps."""
    return float(solver.get("scale", 0.0)) / damping if damping > 0 else math.inf


def warn_if_lissa_truncated(solver: dict[str, Any], options: dict[str, Any]) -> None:
    """LiSSA's own check (small relative step) passes long before flat directions have converged."""
    needed = lissa_steps_needed(solver, options["damping"])
    if options["depth"] < 3 * needed:
        logger.warning(
            "LiSSA depth %d is short of the ~%.0f steps (3 x scale / damping) its flattest directions may need: "
            "the iHVP may be truncated towards a scaled gradient (gradient_dot). Raise --lissa_depth or "
            "--damping, or use --estimator cg.",
            options["depth"],
            3 * needed,
        )


def _keep_root_handlers_at(level: int) -> None:
    """The solvers' debug records feed the progress bar only, not the console."""
    for handler in logging.getLogger().handlers:
        if handler.level < level:
            handler.setLevel(level)


# ----------------------------------------------------------------------------------------------------------
# Validation on a ridge head, where the truth is computable
# ----------------------------------------------------------------------------------------------------------


def validate_estimators(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    config: Any,
    influence_args: InfluenceArguments,
    estimator_args: EstimatorArguments,
    estimators: list[str],
    quiet: bool,
) -> pd.DataFrame:
    """Each estimator on a linear head over the frozen pooled embeddings, against exact and retraining truth.

    Why a linear surrogate rather than the model's own (nonlinear) head: only for a ridge head are both
    references exact and cheap: the exact influence (explicit Hessian) and the measured change of the query
    loss after actually retraining with each candidate added (closed form, Sherman-Morrison). Features are
    standardised with the training statistics and labels normalised like the model's targets, so --damping
    (= the ridge l2) means what it means for the real head.
    """
    mean, std = float(config.target_mean), float(config.target_std)
    center = features["train"].mean(axis=0)
    spread = features["train"].std(axis=0)
    spread[spread == 0] = 1.0
    x = {role: (values - center) / spread for role, values in features.items()}
    y = {role: (values - mean) / std for role, values in labels.items()}
    l2 = influence_args.damping

    weights = ridge_weights(x["train"], y["train"], l2)
    head = nn.Linear(x["train"].shape[1], 1).double()
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weights[:-1]).reshape(1, -1))
        head.bias.copy_(torch.as_tensor(weights[-1:]))
    problem = InfluenceProblem(head, dict(head.named_parameters()), forward_fn=linear_forward)
    batches = {
        role: feature_batches(
            x[role],
            y[role],
            feature_batch_size(influence_args.batch_size, x["train"].shape[1] + 1),
            torch.float64,
        )
        for role in x
    }
    n_train = len(y["train"])

    start = time.perf_counter()
    retrain = leave_one_in_retrain_effect(
        x["train"], y["train"], x["query"], y["query"], x["candidates"], y["candidates"], l2
    )
    retrain_s = time.perf_counter() - start
    exact, _ = compute_influence(
        problem,
        batches["train"],
        batches["query"],
        batches["candidates"],
        "exact",
        damping=l2,
        max_params=max(estimator_args.exact_max_params, problem.num_params),
    )
    rows = [
        {
            "estimator": "retrain (truth)",
            "spearman_vs_exact": spearman_vs(exact, retrain),
            "spearman_vs_retrain": 1.0,
            "seconds": retrain_s,
            "note": "measured query-loss change after refitting with each molecule added",
        }
    ]
    for name in tqdm(estimators, desc="Validating estimators", disable=quiet):
        options = estimator_options(influence_args, estimator_args, estimator=name)
        if name == "exact":
            options["max_params"] = max(options["max_params"], problem.num_params)
        start = time.perf_counter()
        try:
            scores, diagnostics = compute_influence(
                problem, batches["train"], batches["query"], batches["candidates"], name, **options
            )
        except (FloatingPointError, ValueError, RuntimeError) as err:
            logger.warning("--validate: %s failed: %s", name, err)
            rows.append(failed_row(name, time.perf_counter() - start, err))
            continue
        rows.append(
            {
                "estimator": name,
                "spearman_vs_exact": safe_spearman(exact, scores),
                "spearman_vs_retrain": safe_spearman(retrain, scores),
                "seconds": time.perf_counter() - start,
                "note": solver_note(
                    name, diagnostics, scores, retrain, n_train, l2, estimator_args.lissa_depth
                ),
            }
        )
    return pd.DataFrame(rows)


def json_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN (a failed estimator) as null so the summary stays strict JSON."""
    return [
        {
            key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in row.items()
        }
        for row in table.to_dict(orient="records")
    ]


def linear_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch["features"])


def safe_spearman(reference: np.ndarray, scores: np.ndarray) -> float:
    try:
        return spearman_vs(reference, scores)
    except ValueError:
        return float("nan")  # constant scores have no ranks


def failed_row(name: str, seconds: float, err: Exception) -> dict[str, Any]:
    return {
        "estimator": name,
        "spearman_vs_exact": float("nan"),
        "spearman_vs_retrain": float("nan"),
        "seconds": seconds,
        "note": f"failed: {type(err).__name__}: {str(err)[:160]}",
    }


def solver_note(
    name: str,
    diagnostics: dict[str, Any],
    scores: np.ndarray,
    retrain: np.ndarray,
    n_train: int,
    damping: float,
    depth: int,
) -> str:
    """Convergence in a few words, plus the slope of the measured effect on score / n (1 = calibrated)."""
    solver = diagnostics.get("solver", {})
    parts = []
    if name == "cg":
        parts.append(
            f"{solver.get('iterations')} iterations, converged={all(solver.get('converged', [True]))}"
        )
    elif name == "lissa":
        needed = 3 * lissa_steps_needed(solver, damping)
        parts.append(
            f"scale {solver.get('scale', float('nan')):.3g}; depth {depth}"
            f"{' <' if depth < needed else ' >='} ~{needed:.0f} steps flat directions may need (3 x scale/damping)"
        )
    elif name in ("gradient_dot", "tracin"):
        parts.append("no curvature (H = I)")
    predicted = scores / n_train
    if name not in ("gradient_dot", "tracin") and np.any(predicted):
        slope = float(predicted @ retrain / (predicted @ predicted))
        parts.append(f"retrain = {slope:.3g} x score/n")
    return "; ".join(parts)


def validation_markdown(table: pd.DataFrame, influence_args: InfluenceArguments) -> str:
    header = (
        "# Influence estimators against the truth\n\n"
        "Surrogate: a ridge head (l2 = damping = "
        f"{influence_args.damping:g}) on the model's frozen, standardised pooled embeddings; query set: the "
        f"{influence_args.query_split} split. spearman_vs_exact: rank agreement with the exact influence "
        "(explicit Hessian); spearman_vs_retrain: with the measured query-loss change after refitting the head "
        "with each molecule added.\n\n"
    )
    return header + format_table(table) + "\n"


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    for column in ("spearman_vs_exact", "spearman_vs_retrain"):
        shown[column] = shown[column].map(lambda value: "nan" if not np.isfinite(value) else f"{value:.4f}")
    shown["seconds"] = shown["seconds"].map(lambda value: f"{value:.2f}")
    columns = list(shown.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for _, row in shown.iterrows()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def score_table(pool: pd.DataFrame, scores: np.ndarray, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per pool molecule, in pool order; rank 1 = most helpful (most negative score)."""
    order = np.argsort(scores, kind="stable")
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    in_split = np.full(len(pool), "", dtype=object)
    for name in SPLIT_NAMES:
        inside = pool["canonical_smiles"].isin(set(frames[name]["canonical_smiles"])).to_numpy()
        in_split[inside] = name
    overlap = {name: int((in_split == name).sum()) for name in SPLIT_NAMES}
    if overlap["validation"] or overlap["test"]:
        logger.warning(
            "Pool molecules already in the run's splits: %s (column in_run_split). Held-out ones score as "
            "helpful for the wrong reason; run_selection.py excludes them.",
            overlap,
        )
    return pd.DataFrame(
        {
            "index": np.arange(len(pool)),
            "smiles": pool["smiles"].to_numpy(),
            "canonical_smiles": pool["canonical_smiles"].to_numpy(),
            "label": pool["label"].to_numpy(),
            "score": scores,
            "rank": rank,
            "helpful": scores * HELPFUL_SIGN > 0,
            "direction": DIRECTION,
            "in_run_split": in_split,
        }
    )


def write_matrix(output_dir: Path, matrix: np.ndarray, query_frame: pd.DataFrame) -> None:
    """[queries x candidates] scores; row q is query molecule q of influence_queries.csv, column = pool index."""
    with atomic_path(output_dir / MATRIX_FILE) as tmp, tmp.open("wb") as handle:
        np.save(handle, matrix)
    queries = query_frame[["smiles", "canonical_smiles", "label"]].reset_index(drop=True)
    queries.insert(0, "query_row", np.arange(len(queries)))
    write_csv(output_dir / QUERIES_FILE, queries)


def score_statistics(scores: np.ndarray) -> dict[str, Any]:
    """Shape of the score distribution and the threshold each selection rule of run_selection.py implies."""
    ordered = np.sort(scores)
    anderson = scipy.stats.anderson(scores, dist="norm", method="interpolate") if len(scores) >= 8 else None
    statistics = {
        "n": len(scores),
        "mean": float(scores.mean()),
        "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
        "skew": float(scipy.stats.skew(scores)),
        "quantiles": {f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILES},
        "anderson_darling_normal": (
            None
            if anderson is None
            else {
                "statistic": float(anderson.statistic),
                "pvalue_interpolated": float(anderson.pvalue),
                "note": "p-value interpolated from scipy's tables, so clipped to [0.01, 0.15]",
            }
        ),
        "n_helpful": int((scores * HELPFUL_SIGN > 0).sum()),
    }
    thresholds: dict[str, Any] = {
        "helpful": {"rule": "score < 0", "threshold": 0.0, "n_selected": int((scores < 0).sum())}
    }
    for k in TOP_K:
        if k <= len(scores):
            thresholds[f"top_{k}"] = {
                "rule": f"the {k} most negative scores",
                "threshold": float(ordered[k - 1]),
                "n_selected": k,
            }
    for percentile in PERCENTILES:
        cut = float(np.percentile(scores, percentile))
        thresholds[f"percentile_{percentile}"] = {
            "rule": f"score <= {percentile}th percentile",
            "threshold": cut,
            "n_selected": int((scores <= cut).sum()),
        }
    statistics["selection_thresholds"] = thresholds
    return statistics


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_summary(
    arguments: tuple[Any, ...],
    checkpoint_kind: str,
    setup: ProblemSetup,
    diagnostics: dict[str, Any],
    scores: np.ndarray,
    loss_description: str,
    n_train: int,
    n_query: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    influence_args, estimator_args, pool_args, data_args, model_args, validation_args, output_args = arguments
    solver = diagnostics.get("solver", {})
    return {
        "estimator": diagnostics["estimator"],
        "estimator_options": diagnostics["options"],
        "damping": influence_args.damping,
        "scope": {
            "name": influence_args.scope,
            "last_k": influence_args.last_k if influence_args.scope == "last_k_layers" else None,
            "num_params": diagnostics["num_params"],
            "num_tensors": len(setup.model_names),
            "parameters": setup.model_names,
            "computed_on": "pooled embeddings (head alone)" if setup.on_features else "whole model",
        },
        "curvature": influence_args.curvature if influence_args.estimator in HESSIAN_ESTIMATORS else None,
        "sign_convention": DIRECTION,
        "loss": loss_description,
        "query": {
            "split": influence_args.query_split,
            "size": n_query,
            "per_query": influence_args.per_query,
        },
        "train_size_for_hessian": n_train,
        "checkpoint": {
            "path": str(model_args.model_name_or_path),
            "kind": checkpoint_kind,
            "base_model": model_args.base_model,
        },
        "split_file": data_args.split_file,
        "external_file": {
            "path": str(pool_args.external_file),
            "sha256": file_sha256(pool_args.external_file),
            "n_molecules": len(scores),
        },
        "timings": diagnostics["timings"],
        "query_grad_norm": diagnostics.get("query_grad_norm"),
        "ihvp_norm": diagnostics.get("ihvp_norm"),
        "convergence": solver,
        "fit": diagnostics.get("fit", {}),
        "score_statistics": score_statistics(scores),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "arguments": {type(group).__name__: asdict(group) for group in arguments},
    }


def log_result(scores_frame: pd.DataFrame, summary: dict[str, Any]) -> None:
    stats = summary["score_statistics"]
    logger.info(
        "%s scores: %d of %d helpful (negative); mean %.3g, std %.3g, skew %.2f; iHVP norm %s; %.1fs",
        summary["estimator"],
        stats["n_helpful"],
        stats["n"],
        stats["mean"],
        stats["std"],
        stats["skew"],
        summary["ihvp_norm"],
        summary["timings"]["total_s"],
    )
    trace = summary["convergence"].get("norm_trace")
    if trace:
        for repeat, steps in enumerate(trace):
            shown = ", ".join(f"{entry['step']}: {max(entry['ihvp_norm']):.4g}" for entry in steps)
            logger.info("LiSSA repeat %d, iHVP norm by step: %s", repeat, shown)
    best = scores_frame.nsmallest(5, "score")[["index", "canonical_smiles", "label", "score"]]
    logger.info("Most helpful molecules:\n%s", best.to_string(index=False))



def frame_batches(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int
) -> list:
    """Padded, labelled batches in frame order."""
    return smiles_batches(
        frame["canonical_smiles"].tolist(),
        tokenizer,
        batch_size,
        max_length,
        labels=frame["label"].to_numpy(),
    )


if __name__ == "__main__":
    main()
