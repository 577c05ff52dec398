#!/usr/bin/env python
"""Fine-tune MoLFormer for molecular property regression (default: MoleculeNet Lipophilicity, logD).

Full fine-tuning or PEFT (LoRA, IA3, BitFit), in the style of the transformers examples:

    python run_regression.py configs/regression_small.yaml
    python run_regression.py configs/regression_small.yaml --peft lora --output_dir runs/lora --seed 3
    accelerate launch run_regression.py configs/regression_xl_lora.yaml
    python run_regression.py configs/regression_small.yaml --hp_search optuna --n_trials 20

Writes the model (or adapter), `all_results.json` (validation and test metrics in label units),
`predictions.csv`, `split.json`, plots, the resolved settings (`run_config.json`), the options given
(`run_options.yaml`, which reruns the run) and a model card, then `run_complete.json` last. A
hyperparameter search (`--hp_search`) only ever evaluates on the validation split and writes
`best_config.yaml`, which reruns the best trial as an ordinary run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import logging
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import peft
import torch
import transformers
import yaml
from torch.utils.data import SequentialSampler
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, get_last_checkpoint, has_length

import modeling_molformer_reg  # noqa: F401  registers MoLFormer with the Auto classes
import tokenization_molformer  # noqa: F401
from configuration_molformer import MolformerConfig
from modeling_molformer_reg import MolformerForRegression
from molft import plots
from molft.cli import CONFIG_SUFFIXES, load_config_file, parse_args, setup_logging
from molft.data import (
    LABEL_CANDIDATES,
    SMILES_CANDIDATES,
    drop_overlap,
    find_column,
    load_raw_dataset,
    prepare_molecules,
    read_table,
)
from molft.hp_search import (
    CONFIG_HYPERPARAMETERS,
    BestValidationRMSE,
    SearchSpace,
    plain_value,
    ray_search_kwargs,
)
from molft.io import DONE_MARKER, is_done, mark_done, read_json, write_csv, write_json, write_text
from molft.metrics import make_compute_metrics
from molft.model_card import regression_model_card
from molft.model_utils import unwrap_peft
from molft.peft_setup import (
    PEFT_METHODS,
    PeftOptions,
    apply_peft,
    is_adapter_checkpoint,
    load_regression_checkpoint,
    trainable_parameters,
)
from molft.splits import SplitResult, load_split, make_split, save_split, split_frames
from molft.weights import WEIGHT_MAPPINGS, map_weights
from tokenization_molformer import MolformerTokenizer

logger = logging.getLogger(__name__)

SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_HP_SPACE = SCRIPT_DIR / "configs" / "hp_space.yaml"
HP_SEARCH_BACKENDS = ("none", "optuna", "ray")
TARGET_SCALINGS = ("none", "standard", "minmax")
SPLITS = ("train", "validation", "test")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Starting checkpoint: a Hub id (e.g. ibm/MoLFormer-XL-both-10pct), a local directory, a "
            "run_mlm.py output, or a run_regression.py output (evaluation/prediction only for adapters). Leave "
            "empty and set --config_name to train a new model from scratch."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "JSON config of a new MoLFormer (e.g. configs/molformer-tiny.json)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override config values of a new model, e.g. 'hidden_size=128,num_hidden_layers=4' "
            "(only with --config_name)."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer directory or Hub id. Default: the checkpoint's; from scratch: built from the "
            "training SMILES."
        },
    )
    regression_head: str = field(default="molformer", metadata={"help": "Head: molformer | mlp | linear."})
    pooling: str = field(default="mean", metadata={"help": "Pooling: mean (the reference pooler) | cls."})
    loss: str = field(default="mse", metadata={"help": "Loss: mse | l1 | huber."})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber delta, in scaled label units."})
    hidden_dropout_prob: float | None = field(
        default=None, metadata={"help": "Override the encoder dropout."}
    )
    embedding_dropout_prob: float | None = field(
        default=None, metadata={"help": "Override the embedding dropout."}
    )
    classifier_dropout_prob: float | None = field(
        default=None, metadata={"help": "Override the head dropout."}
    )
    target_scaling: str = field(
        default="standard",
        metadata={
            "help": "Label scaling inside the model: none | standard | minmax. Metrics and predictions "
            "are always in label units."
        },
    )
    feature_map_redraw: str | None = field(
        default=None,
        metadata={
            "help": "When attention random features are redrawn: train | always | never. Default: train "
            "for full fine-tuning and BitFit, never for LoRA/IA3 (their adapters do not save the base's "
            "feature maps, so redrawing would make saved adapters irreproducible)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})


@dataclass
class PeftArguments:
    peft: str = field(
        default="none", metadata={"help": "Fine-tuning method: none (full) | lora | ia3 | bitfit."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "LoRA targets: a regex over module names or a comma list of suffixes. Default: every "
            "encoder layer's query/key/value, attention output and both FFN projections (never the head)."
        },
    )
    ia3_target_modules: str | None = field(
        default=None, metadata={"help": "IA3 targets (regex or comma list). Default: key, value, FFN output."}
    )
    ia3_feedforward_modules: str | None = field(
        default=None,
        metadata={"help": "IA3 feed-forward modules (input scaling). Default: FFN output dense."},
    )
    ia3_init_value: float = field(default=1.0, metadata={"help": "Initial value of the IA3 scaling vectors."})
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Also export a plain model with the adapter merged, to <output_dir>/merged."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default="lipophilicity",
        metadata={
            "help": "'lipophilicity' (the copy embedded in the chemloader package; falls back to the Hub "
            "dataset scikit-fingerprints/MoleculeNet_Lipophilicity) or any Hub dataset id. Ignored when "
            "--train_file is given."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(
        default=None, metadata={"help": "csv/tsv/json/jsonl/parquet with SMILES and labels."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Optional pre-split validation file."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Optional pre-split test file."})
    smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column (default: found by name)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column (default: found by name)."}
    )
    strict_smiles: bool = field(
        default=False, metadata={"help": "Error on invalid SMILES instead of dropping them."}
    )
    split: str = field(
        default="random",
        metadata={
            "help": "random | scaffold | stratified | predefined | butina | maxmin | molecular_weight | "
            "fingerprint. Ignored with --split_file or pre-split files."
        },
    )
    split_fractions: str = field(default="0.8,0.1,0.1", metadata={"help": "train,validation,test fractions."})
    split_seed: int = field(
        default=42, metadata={"help": "Seed of the split, separate from --seed so seeds vary on one split."}
    )
    split_column: str | None = field(
        default=None,
        metadata={"help": "Column with train/validation/test labels (implies --split predefined)."},
    )
    split_file: str | None = field(
        default=None,
        metadata={
            "help": "Reuse a split.json (checked against the data) or a JSON index file of row numbers."
        },
    )
    extra_train_file: str | None = field(
        default=None,
        metadata={"help": "External molecules (e.g. a selection) added to the training split only."},
    )
    extra_smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column of the extra file."}
    )
    extra_label_column: str | None = field(default=None, metadata={"help": "Label column of the extra file."})
    keep_extra_overlap: bool = field(
        default=False,
        metadata={
            "help": "Keep extra molecules that also sit in validation/test (default: report and drop)."
        },
    )
    extra_train_weights: str | None = field(
        default=None,
        metadata={
            "help": "Column of the extra file with per-molecule values turned into loss weights "
            "(see --weight_mapping). Dataset molecules get weight 1."
        },
    )
    weight_mapping: str = field(
        default="identity",
        metadata={"help": f"How --extra_train_weights values become weights: {', '.join(WEIGHT_MAPPINGS)}."},
    )
    weight_temperature: float = field(default=1.0, metadata={"help": "Temperature of the softmax mappings."})
    max_seq_length: int = field(default=202, metadata={"help": "Longer SMILES are truncated (and reported)."})
    length_grouping: bool = field(
        default=True, metadata={"help": "Batch molecules of similar token length (less padding)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Debug: cap the training set."})
    predict_file: str | None = field(
        default=None, metadata={"help": "Unlabelled SMILES to predict (csv/json/parquet), with --do_predict."}
    )


@dataclass
class RunArguments:
    early_stopping_patience: int = field(
        default=5,
        metadata={"help": "Evaluations without validation-RMSE improvement before stopping; 0 disables."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh even if the output directory holds checkpoints."}
    )
    auto_mixed_precision: bool = field(
        default=True,
        metadata={"help": "On a GPU without --bf16/--fp16, train in bf16 where supported, else fp16."},
    )
    selection_name: str | None = field(
        default=None,
        metadata={
            "help": "Label of the external-data strategy, recorded for sweep reports (default: none, "
            "or the extra file's stem)."
        },
    )
    hp_search: str = field(
        default="none",
        metadata={"help": "Hyperparameter search backend: none | optuna | ray (objective: validation RMSE)."},
    )
    n_trials: int = field(default=10, metadata={"help": "Number of hyperparameter-search trials."})
    hp_space: str | None = field(
        default=None,
        metadata={"help": f"YAML search space (default: {DEFAULT_HP_SPACE.relative_to(SCRIPT_DIR)})."},
    )
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster to run trials on ('auto' or host:port); default: $RAY_ADDRESS, else a local "
            "Ray instance."
        },
    )
    ray_resources_per_trial: str | None = field(
        default=None,
        metadata={"help": "Ray resources per trial, e.g. 'cpu=4,gpu=1' (default: 1 CPU, 1 GPU if any)."},
    )


ARGUMENT_TYPES = (ModelArguments, PeftArguments, DataArguments, RunArguments, TrainingArguments)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run one fine-tuning (or a hyperparameter search) and return the metrics written to all_results.json."""
    all_args = parse_args(ARGUMENT_TYPES, args)
    model_args, peft_args, data_args, run_args, training_args = all_args
    options = explicit_options(args)
    setup_logging(training_args.get_process_log_level())
    validate_arguments(model_args, peft_args, data_args, run_args, training_args)
    logger.info("Training parameters %s", training_args)
    output_dir = Path(training_args.output_dir)
    is_main_process = training_args.process_index == 0
    last_checkpoint = detect_last_checkpoint(training_args, run_args)
    configure_training(training_args, data_args, run_args)
    set_seed(training_args.seed)
    start = time.perf_counter()

    # Data: every SMILES and label checked, split, external molecules added to train only
    reuse_split = output_dir / "split.json" if last_checkpoint and not data_args.split_file else None
    data = prepare_data(data_args, reuse_split=reuse_split)
    if is_main_process:
        save_split(
            output_dir / "split.json",
            data.dataset,
            data.split,
            dataset_source=data.source,
            extra=data.extra_report,
        )

    # Tokenizer, config and a model factory (a search builds one model per trial)
    tokenizer = load_tokenizer(model_args, data.frames["train"])
    factory = ModelFactory.create(model_args, peft_args, tokenizer, data.frames["train"], training_args)
    with training_args.main_process_first(desc="tokenisation"):
        tokenised = {
            name: tokenise(frame, tokenizer, data_args.max_seq_length) for name, frame in data.frames.items()
        }
    collator = DataCollatorWithPadding(tokenizer)

    if run_args.hp_search != "none":
        return run_hp_search(
            factory, tokenised, tokenizer, collator, run_args, training_args, options, data, start
        )

    model = factory.build(output_dir=output_dir if is_main_process else None)
    param_counts = trainable_parameters(model)
    logger.info(
        "Trainable parameters (%s): %s of %s (%.4f%%)",
        peft_args.peft,
        f"{param_counts['trainable_params']:,}",
        f"{param_counts['total_params']:,}",
        100 * param_counts["trainable_share"],
    )
    trainer = RegressionTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenised["train"] if training_args.do_train else None,
        eval_dataset=tokenised["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=make_compute_metrics(),
        callbacks=training_callbacks(run_args, training_args),
    )

    metrics: dict[str, Any] = {**param_counts, "n_extra_train": 0 if data.extra is None else len(data.extra)}
    if training_args.do_train:
        metrics.update(
            train_model(trainer, tokenizer, training_args.resume_from_checkpoint or last_checkpoint)
        )
    if training_args.do_eval:
        metrics.update(evaluate_splits(trainer, tokenised))
    # predict() gathers across processes, so every rank runs it and only rank 0 writes
    predictions = predict_splits(trainer, tokenised, data.frames)
    unlabelled = predict_unlabelled(trainer, tokenizer, data_args) if data_args.predict_file else None
    if training_args.do_predict and not data_args.predict_file:
        logger.info("--do_predict without --predict_file: test-set predictions are in predictions.csv.")
    metrics["train_wall_time_s"] = time.perf_counter() - start

    if trainer.is_world_process_zero():
        write_outputs(trainer, tokenizer, metrics, predictions, unlabelled, options, data, all_args)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="MoLFormer regression fine-tuning")
    if trainer.is_world_process_zero():
        selection = run_args.selection_name or (
            Path(data_args.extra_train_file).stem if data.extra is not None else "none"
        )
        mark_done(
            output_dir,
            {
                "peft": peft_args.peft,
                "selection": selection,
                "seed": training_args.seed,
                "split_seed": data_args.split_seed,
                "split": data.split.method,
                "test_rmse": metrics.get("test_rmse"),
                "wall_time_s": metrics["train_wall_time_s"],
            },
        )
    return metrics


def train_model(
    trainer: RegressionTrainer, tokenizer: PreTrainedTokenizerBase, resume_from: str | None
) -> dict[str, Any]:
    """Train (resuming if asked), keep the best checkpoint's weights, and save what reloading needs."""
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        # an adapter folder needs the run's config (head, pooling, target statistics) next to it
        unwrap_peft(trainer.model).config.save_pretrained(trainer.args.output_dir)
        tokenizer.save_pretrained(trainer.args.output_dir)
    return {**result.metrics, "train_samples": len(trainer.train_dataset)}


def evaluate_splits(trainer: RegressionTrainer, tokenised: dict[str, datasets.Dataset]) -> dict[str, float]:
    """Validation (eval_*) and test (test_*) metrics of the final model, in label units."""
    # early stopping watches validation RMSE during training only; these evaluations must not feed it
    trainer.remove_callback(ValidationEarlyStopping)
    metrics: dict[str, float] = {}
    for name, prefix in (("validation", "eval"), ("test", "test")):
        split_metrics = trainer.evaluate(eval_dataset=tokenised[name], metric_key_prefix=prefix)
        trainer.log_metrics(prefix, split_metrics)
        metrics.update(split_metrics)
    return metrics


def write_outputs(
    trainer: RegressionTrainer,
    tokenizer: PreTrainedTokenizerBase,
    metrics: dict[str, Any],
    predictions: pd.DataFrame,
    unlabelled: pd.DataFrame | None,
    options: dict[str, Any],
    data: PreparedData,
    all_args: tuple,
) -> None:
    """Every result file of a run (main process only), each written atomically."""
    model_args, peft_args, data_args, run_args, training_args = all_args
    output_dir = Path(training_args.output_dir)
    write_predictions(predictions, output_dir)
    if unlabelled is not None:
        write_csv(output_dir / "predict_predictions.csv", unlabelled)
        logger.info("Wrote %d predictions for %s", len(unlabelled), data_args.predict_file)
    if training_args.do_train:
        plots.loss_curves(trainer.state.log_history, output_dir / "loss_curves.png")
    if peft_args.merge_adapter:
        export_merged(trainer.model, tokenizer, output_dir / "merged", peft_args)
    write_json(output_dir / "all_results.json", metrics)
    write_run_config(output_dir, options, *all_args, data)
    trainer.model_card_text = regression_model_card(
        model_args=model_args,
        peft_method=peft_args.peft,
        data_source=data.source,
        split=data.split,
        metrics=metrics,
        extra_file=data_args.extra_train_file,
        n_extra=metrics["n_extra_train"],
    )
    write_text(output_dir / "README.md", trainer.model_card_text)


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def validate_arguments(
    model_args: ModelArguments,
    peft_args: PeftArguments,
    data_args: DataArguments,
    run_args: RunArguments,
    training_args: TrainingArguments,
) -> None:
    """Fail before any data is read or model trained when options cannot work together."""
    checks = {
        "--peft": (peft_args.peft, PEFT_METHODS),
        "--target_scaling": (model_args.target_scaling, TARGET_SCALINGS),
        "--weight_mapping": (data_args.weight_mapping, WEIGHT_MAPPINGS),
        "--hp_search": (run_args.hp_search, HP_SEARCH_BACKENDS),
    }
    for flag, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {allowed}, got {value!r}.")
    if model_args.model_name_or_path is None and model_args.config_name is None:
        raise ValueError("Give --model_name_or_path (a checkpoint) or --config_name (a new model's config).")
    if model_args.model_name_or_path and (model_args.config_name or model_args.config_overrides):
        # lets a config file for a new model also start from a checkpoint (--model_name_or_path on top)
        logger.warning(
            "--model_name_or_path %s given: its own config is used; --config_name/--config_overrides are ignored.",
            model_args.model_name_or_path,
        )
    if data_args.extra_train_weights and not data_args.extra_train_file:
        raise ValueError("--extra_train_weights names a column of --extra_train_file, which is not given.")
    files = {
        "--predict_file": data_args.predict_file,
        "--extra_train_file": data_args.extra_train_file,
        "--split_file": data_args.split_file,
        "--hp_space": run_args.hp_space,
    }
    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist.")
    if run_args.hp_search != "none":
        if not training_args.do_train:
            raise ValueError("--hp_search trains one model per trial; add --do_train.")
        if run_args.n_trials < 1:
            raise ValueError(f"--n_trials must be at least 1, got {run_args.n_trials}.")
        if run_args.hp_search == "ray" and importlib.util.find_spec("ray") is None:
            raise ImportError(
                "--hp_search ray needs Ray Tune, which is not installed: `pip install 'ray[tune]'` (or use "
                "--hp_search optuna, which runs without a cluster)."
            )


def detect_last_checkpoint(training_args: TrainingArguments, run_args: RunArguments) -> str | None:
    """Resume an interrupted run; refuse to mix a new run into a folder holding a finished one."""
    output_dir = Path(training_args.output_dir)
    if not training_args.do_train or run_args.hp_search != "none" or not output_dir.is_dir():
        return None
    if run_args.overwrite_output_dir:
        if training_args.process_index == 0:  # a stale marker would claim the new run finished
            (output_dir / DONE_MARKER).unlink(missing_ok=True)
        return None
    if is_done(output_dir):
        raise ValueError(
            f"Output directory {output_dir} already holds a finished run ({DONE_MARKER}); "
            "use --overwrite_output_dir true or another --output_dir."
        )
    last = get_last_checkpoint(str(output_dir))
    if last is not None and training_args.resume_from_checkpoint is None:
        logger.info("Resuming from %s (pass --overwrite_output_dir true to start afresh).", last)
    return last


def configure_training(
    training_args: TrainingArguments, data_args: DataArguments, run_args: RunArguments
) -> None:
    """Defaults this task needs: epoch-wise evaluation, best-by-validation-RMSE checkpoint, length grouping."""
    if data_args.length_grouping:
        training_args.train_sampling_strategy = "group_by_length"
    training_args.length_column_name = "length"
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    if run_args.early_stopping_patience > 0 or training_args.load_best_model_at_end:
        if training_args.eval_strategy == IntervalStrategy.NO:
            logger.info("Early stopping needs evaluations: evaluating every epoch.")
            training_args.eval_strategy = IntervalStrategy.EPOCH
        if training_args.metric_for_best_model in (None, "loss", "eval_loss"):
            training_args.metric_for_best_model = "eval_rmse"
            training_args.greater_is_better = False
        training_args.load_best_model_at_end = True
        # the best checkpoint can only be restored if one is saved at every evaluation
        if training_args.save_strategy != training_args.eval_strategy:
            training_args.save_strategy = SaveStrategy(training_args.eval_strategy.value)
        if training_args.eval_strategy == IntervalStrategy.STEPS:
            training_args.save_steps = training_args.eval_steps
    if run_args.hp_search != "none":
        # trials are judged by their best validation RMSE; no checkpoint of a trial is kept
        training_args.save_strategy = SaveStrategy.NO
        training_args.load_best_model_at_end = False
    use_gpu = torch.cuda.is_available() and not training_args.use_cpu
    if not use_gpu:
        training_args.dataloader_pin_memory = (
            False  # pinning needs an accelerator; avoids a warning per loader
        )
    if run_args.auto_mixed_precision and use_gpu and not (training_args.bf16 or training_args.fp16):
        if torch.cuda.is_bf16_supported():
            training_args.bf16, training_args.mixed_precision = True, "bf16"
        else:
            training_args.fp16, training_args.mixed_precision = True, "fp16"
        logger.info(
            "Mixed precision: %s (--auto_mixed_precision false to train in fp32).",
            training_args.mixed_precision,
        )


def explicit_options(args: list[str] | None = None) -> dict[str, Any]:
    """The options a run was given (config file, then flags), as a mapping `run_regression.py <file>.yaml` takes.

    Read from the command line itself rather than diffed against defaults: building a second
    TrainingArguments for its defaults would reset the process group of a distributed run.
    """
    args = list(sys.argv[1:] if args is None else args)
    options: dict[str, Any] = {}
    if args and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        options.update(load_config_file(args[0]))
        args = args[1:]
    parser = HfArgumentParser(ARGUMENT_TYPES)
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    options.update(vars(parser.parse_args(args)))
    return {k: v for k, v in options.items() if not k.endswith("_token")}  # never write credentials


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Checked molecules, their split, and the training frame with any external molecules added."""

    dataset: pd.DataFrame  # the prepared molecules that `split` indexes
    split: SplitResult
    frames: dict[str, pd.DataFrame]  # train (with extra molecules), validation, test
    source: str
    extra: pd.DataFrame | None = None
    extra_report: dict[str, Any] = field(default_factory=dict)


def prepare_data(data_args: DataArguments, reuse_split: Path | None = None) -> PreparedData:
    """Load, check and split the dataset, then add external molecules to the training split."""
    dataset, split, source = load_and_split(data_args, reuse_split)
    frames = split_frames(dataset, split)
    for name, frame in frames.items():
        if frame.empty:
            raise ValueError(
                f"The {name} split is empty; check the split fractions, split column or split file."
            )
        frame["split"] = name
        frame["source"] = "dataset"
    report_cross_split_duplicates(frames)
    extra, extra_report = None, {}
    if data_args.extra_train_file:
        extra, extra_report = load_extra(data_args, frames)
        frames["train"] = pd.concat([frames["train"], extra], ignore_index=True)
    if data_args.max_train_samples is not None:
        frames["train"] = frames["train"].iloc[: data_args.max_train_samples].reset_index(drop=True)
    return PreparedData(dataset, split, frames, source, extra, extra_report)


def load_and_split(
    data_args: DataArguments, reuse_split: Path | None
) -> tuple[pd.DataFrame, SplitResult, str]:
    """The prepared dataset (all molecules, checked), its split, and where the data came from."""
    raw = load_raw_dataset(
        None if data_args.train_file else data_args.dataset_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        dataset_config_name=data_args.dataset_config_name,
    )
    prepared = {}
    for name, frame in raw.frames.items():
        source = f"{raw.source} [{name}]"
        smiles_col = find_column(frame, data_args.smiles_column, SMILES_CANDIDATES, "SMILES", source)
        label_col = find_column(frame, data_args.label_column, LABEL_CANDIDATES, "label", source)
        keep = [data_args.split_column] if data_args.split_column else []
        prepared[name] = prepare_molecules(
            frame, smiles_col, label_col, source=source, strict=data_args.strict_smiles, keep_columns=keep
        )
    if raw.is_presplit:
        missing = [name for name in SPLITS if name not in prepared]
        if missing:
            raise ValueError(
                f"Pre-split data needs train, validation and test parts; missing {missing} "
                "(give --validation_file and --test_file, or only --train_file to split it here)."
            )
        if data_args.split_file:
            logger.warning("--split_file is ignored: the data come already split (%s).", raw.source)
        dataset = pd.concat([prepared[name] for name in SPLITS], ignore_index=True)
        bounds = np.cumsum([0] + [len(prepared[name]) for name in SPLITS])
        split = SplitResult(
            *(np.arange(bounds[i], bounds[i + 1]) for i in range(3)),
            method="predefined",
            params={"source": "pre-split files"},
        )
        return dataset, split, raw.source

    dataset = prepared["all"]
    split_file = data_args.split_file or (str(reuse_split) if reuse_split and reuse_split.is_file() else None)
    if split_file and is_split_json(split_file):
        split = load_split(split_file, dataset)
        logger.info("Reusing the %s split in %s: %s", split.method, split_file, split.sizes)
    elif split_file:
        split = make_split(dataset, "predefined", split_file=split_file)
    elif data_args.split_column or data_args.split == "predefined":
        if data_args.split not in ("random", "predefined"):
            raise ValueError(
                f"--split_column gives a predefined split; it cannot be combined with --split {data_args.split}."
            )
        split = make_split(dataset, "predefined", split_column=data_args.split_column)
    else:
        try:
            fractions = tuple(float(x) for x in data_args.split_fractions.split(","))
        except ValueError as err:
            raise ValueError(
                f"--split_fractions wants 'train,validation,test', got {data_args.split_fractions!r}."
            ) from err
        split = make_split(dataset, data_args.split, fractions=fractions, seed=data_args.split_seed)
    return dataset, split, raw.source


def is_split_json(path: str | os.PathLike) -> bool:
    """A split.json written by molft (as opposed to a plain file of row numbers per split)."""
    content = read_json(path)
    return isinstance(content, dict) and "dataset_fingerprint" in content


def report_cross_split_duplicates(frames: dict[str, pd.DataFrame]) -> None:
    """Warn when one molecule sits in train and in a held-out split (e.g. repeated measurements)."""
    train = set(frames["train"]["canonical_smiles"])
    for name in ("validation", "test"):
        shared = frames[name]["canonical_smiles"][frames[name]["canonical_smiles"].isin(train)]
        if len(shared):
            logger.warning(
                "%d %s molecules also occur in train (duplicates in the data), e.g. %s",
                len(shared),
                name,
                "; ".join(shared.iloc[:3]),
            )


def load_extra(
    data_args: DataArguments, frames: dict[str, pd.DataFrame]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """External molecules for the training split: checked, de-duplicated against held-out splits, weighted."""
    path = data_args.extra_train_file
    table = read_table(path)
    smiles_col = find_column(table, data_args.extra_smiles_column, SMILES_CANDIDATES, "SMILES", path)
    label_col = find_column(table, data_args.extra_label_column, LABEL_CANDIDATES, "label", path)
    keep = [data_args.extra_train_weights] if data_args.extra_train_weights else []
    extra = prepare_molecules(
        table, smiles_col, label_col, source=path, strict=data_args.strict_smiles, keep_columns=keep
    )
    n_valid = len(extra)
    extra, overlap = drop_overlap(
        extra,
        {"validation": frames["validation"], "test": frames["test"]},
        drop=not data_args.keep_extra_overlap,
    )
    in_train = extra["canonical_smiles"].isin(set(frames["train"]["canonical_smiles"]))
    if in_train.any():
        logger.warning(
            "%d extra molecules are already in the training split (kept as extra rows).", int(in_train.sum())
        )
    if extra.empty:
        raise ValueError(
            f"No extra molecules are left from {path} after checks (overlap with held-out splits: {overlap})."
        )
    extra["split"] = "train"
    extra["source"] = f"extra:{Path(path).name}"
    if data_args.extra_train_weights:
        extra["sample_weight"] = extra_weights(extra, data_args)
        frames["train"]["sample_weight"] = 1.0
    report = {
        "extra_train_file": str(path),
        "n_rows": len(table),
        "n_valid": n_valid,
        "n_added": len(extra),
        "overlap_with_heldout": overlap,
        "already_in_train": int(in_train.sum()),
        "weights": data_args.extra_train_weights
        and {"column": data_args.extra_train_weights, "mapping": data_args.weight_mapping},
    }
    logger.info("Added %d external molecules from %s to the training split.", len(extra), path)
    return extra, report


def extra_weights(extra: pd.DataFrame, data_args: DataArguments) -> np.ndarray:
    """Loss weights of the extra molecules from their --extra_train_weights column (errors name file rows)."""
    column, path = data_args.extra_train_weights, data_args.extra_train_file
    values = pd.to_numeric(extra[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{path}: weight column {column!r} is missing or not numeric at rows {extra['row'][bad].tolist()[:10]}."
        )
    if data_args.weight_mapping == "identity" and (values < 0).any():
        raise ValueError(
            f"{path}: weight column {column!r} is negative at rows {extra['row'][values < 0].tolist()[:10]}; "
            "identity weights must be >= 0 (map scores with clip or a softmax mapping)."
        )
    return map_weights(values, data_args.weight_mapping, temperature=data_args.weight_temperature)


def tokenise(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """Token ids without padding (the collator pads each batch) plus labels and optional loss weights."""
    encoded = tokenizer(frame["canonical_smiles"].tolist(), truncation=True, max_length=max_length)
    columns: dict[str, list] = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "length": [len(ids) for ids in encoded["input_ids"]],
    }
    if "label" in frame:
        columns["labels"] = frame["label"].astype(np.float32).tolist()
    if "sample_weight" in frame:
        columns["sample_weight"] = frame["sample_weight"].astype(np.float32).tolist()
    return datasets.Dataset.from_dict(columns)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def load_tokenizer(model_args: ModelArguments, train_frame: pd.DataFrame) -> PreTrainedTokenizerBase:
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir)
    logger.info("No tokenizer given: building a vocabulary from the %d training SMILES.", len(train_frame))
    return MolformerTokenizer.from_smiles(train_frame["canonical_smiles"])


def target_statistics(
    labels: np.ndarray, scaling: str, weights: np.ndarray | None = None
) -> tuple[float, float]:
    """(shift, scale) with label = shift + scale · model_output.

    Loss weights weight the statistics too, so a molecule with weight 0 is exactly a molecule left out.
    """
    labels = np.asarray(labels, dtype=np.float64)
    weights = np.ones_like(labels) if weights is None else np.asarray(weights, dtype=np.float64)
    if scaling == "none":
        return 0.0, 1.0
    if scaling == "standard":
        mean = float(np.average(labels, weights=weights))
        std = float(np.sqrt(np.average((labels - mean) ** 2, weights=weights)))
        return mean, std if std > 0 else 1.0
    if scaling == "minmax":
        used = labels[weights > 0]
        spread = float(used.max() - used.min())
        return float(used.min()), spread if spread > 0 else 1.0
    raise ValueError(f"--target_scaling must be one of {TARGET_SCALINGS}, got {scaling!r}.")


def is_regression_checkpoint(config: MolformerConfig, path: str | None) -> bool:
    """A run_regression.py output (its head and target statistics belong to it), not a pretrained encoder."""
    if path is not None and is_adapter_checkpoint(path):
        return True
    return "MolformerForRegression" in (getattr(config, "architectures", None) or [])


def build_config(
    model_args: ModelArguments,
    peft_args: PeftArguments,
    tokenizer: PreTrainedTokenizerBase,
    train_frame: pd.DataFrame,
) -> MolformerConfig:
    """The model config: architecture from the checkpoint or --config_name, head and scaling from the flags."""
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    else:
        config = MolformerConfig.from_json_file(model_args.config_name)
        if model_args.config_overrides:
            logger.info("Overriding config: %s", model_args.config_overrides)
            config.update_from_string(model_args.config_overrides)
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if config.model_type != "molformer":
        raise ValueError(f"{model_args.model_name_or_path} is a {config.model_type!r} model, not MoLFormer.")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"Tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}.")
    for name in ("hidden_dropout_prob", "embedding_dropout_prob", "classifier_dropout_prob"):
        if getattr(model_args, name) is not None:
            setattr(config, name, getattr(model_args, name))
    if is_regression_checkpoint(config, model_args.model_name_or_path):
        logger.info(
            "%s is a fine-tuned regression model: keeping its head (%s), pooling and target statistics "
            "(mean %.4g, std %.4g).",
            model_args.model_name_or_path,
            config.regression_head,
            config.target_mean,
            config.target_std,
        )
        return config
    config.regression_head = model_args.regression_head
    config.regression_pooling = model_args.pooling
    config.regression_loss = model_args.loss
    config.huber_delta = model_args.huber_delta
    redraw = model_args.feature_map_redraw or ("never" if peft_args.peft in ("lora", "ia3") else "train")
    config.feature_map_redraw = redraw
    weights = train_frame["sample_weight"].to_numpy() if "sample_weight" in train_frame else None
    config.target_mean, config.target_std = target_statistics(
        train_frame["label"].to_numpy(), model_args.target_scaling, weights
    )
    logger.info(
        "Target scaling %s: label = %.4g + %.4g · output",
        model_args.target_scaling,
        config.target_mean,
        config.target_std,
    )
    config._validate_molformer()
    return config


@dataclass
class ModelFactory:
    """Builds the model to train: a fresh one per run, or per trial with the trial's hyperparameters."""

    config: MolformerConfig
    peft_options: PeftOptions
    checkpoint: str | None
    cache_dir: str | None
    finetuned: bool  # the checkpoint is a run_regression.py output: load it as saved, apply no new PEFT
    gradient_checkpointing: bool = False

    @classmethod
    def create(
        cls,
        model_args: ModelArguments,
        peft_args: PeftArguments,
        tokenizer: PreTrainedTokenizerBase,
        train_frame: pd.DataFrame,
        training_args: TrainingArguments,
    ) -> ModelFactory:
        config = build_config(model_args, peft_args, tokenizer, train_frame)
        finetuned = is_regression_checkpoint(config, model_args.model_name_or_path)
        checkpoint = model_args.model_name_or_path
        if finetuned and checkpoint and is_adapter_checkpoint(checkpoint) and training_args.do_train:
            raise ValueError(
                f"{checkpoint} holds a trained adapter: it can be evaluated and used for prediction "
                "(drop --do_train), or resumed by rerunning its own run with the same --output_dir."
            )
        if not finetuned and not training_args.do_train:
            logger.warning(
                "No --do_train and %s is not a fine-tuned regression model: its regression head is untrained, "
                "so evaluation and predictions are meaningless.",
                checkpoint or "the new model",
            )
        options = PeftOptions(
            method=peft_args.peft,
            lora_r=peft_args.lora_r,
            lora_alpha=peft_args.lora_alpha,
            lora_dropout=peft_args.lora_dropout,
            lora_target_modules=peft_args.lora_target_modules,
            ia3_target_modules=peft_args.ia3_target_modules,
            ia3_feedforward_modules=peft_args.ia3_feedforward_modules,
            ia3_init_value=peft_args.ia3_init_value,
        )
        return cls(
            config,
            options,
            checkpoint,
            model_args.cache_dir,
            finetuned,
            bool(training_args.gradient_checkpointing),
        )

    def build(
        self, overrides: Mapping[str, Any] | None = None, output_dir: Path | None = None
    ) -> torch.nn.Module:
        """A new model; `overrides` are trial hyperparameters, `output_dir` receives an adapter's base model."""
        overrides = dict(overrides or {})
        if self.finetuned:
            if self.peft_options.method != "none":
                logger.warning(
                    "--peft %s ignored: %s is already fine-tuned.", self.peft_options.method, self.checkpoint
                )
            return load_regression_checkpoint(self.checkpoint, config=self.config, cache_dir=self.cache_dir)
        config = copy.deepcopy(self.config)
        for name in CONFIG_HYPERPARAMETERS:
            if name in overrides:
                setattr(config, name, float(overrides[name]))
        model = self._base_model(config)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        options = dataclasses.replace(
            self.peft_options,
            **{k: v for k, v in overrides.items() if k in dataclasses.asdict(self.peft_options)},
        )
        base_dir = None
        if options.method in ("lora", "ia3") and self.checkpoint is None and output_dir is not None:
            # a model trained from scratch has no saved base for its adapter to name, so keep one beside it
            base_dir = (output_dir / "base_model").resolve()
            model.save_pretrained(base_dir)
        model = apply_peft(model, options)
        if base_dir is not None:
            model.peft_config["default"].base_model_name_or_path = str(base_dir)
        return model

    def _base_model(self, config: MolformerConfig) -> MolformerForRegression:
        if self.checkpoint is None:
            model = MolformerForRegression(config)
        else:
            model, info = MolformerForRegression.from_pretrained(
                self.checkpoint, config=config, cache_dir=self.cache_dir, output_loading_info=True
            )
            new = sorted(k for k in info["missing_keys"] if not k.startswith("classifier."))
            if new:
                raise ValueError(f"{self.checkpoint} lacks encoder weights: {new[:5]} ...")
            if info["missing_keys"]:
                logger.info("Newly initialised regression head: %s", sorted(info["missing_keys"]))
        return model


# ----------------------------------------------------------------------------------------------------------
# Trainer pieces
# ----------------------------------------------------------------------------------------------------------


class RegressionTrainer(Trainer):
    """Trainer whose model card (also the one `push_to_hub` uploads) is the regression card."""

    model_card_text: str | None = None

    def _get_eval_sampler(self, eval_dataset):
        # transformers also applies train_sampling_strategy="group_by_length" to evaluation, which reorders
        # predict() outputs; they must stay in dataset order to be matched with their molecules
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.model_card_text is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            write_text(Path(self.args.output_dir) / "README.md", self.model_card_text)
        return None


class ValidationEarlyStopping(EarlyStoppingCallback):
    """Early stopping on validation RMSE whose patience restarts with every fresh training.

    The stock callback keeps its counter from one hyperparameter-search trial to the next; a resumed run
    still gets its counter back from the checkpoint.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.early_stopping_patience_counter = 0
        if args.metric_for_best_model is None or args.eval_strategy == IntervalStrategy.NO:
            raise ValueError("Early stopping needs --metric_for_best_model and an --eval_strategy.")


class RegressionConfigCallback(TrainerCallback):
    """Put the run's config next to every adapter checkpoint, so each one reloads in label units."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None and hasattr(model, "peft_config"):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                unwrap_peft(model).config.save_pretrained(checkpoint)


def training_callbacks(run_args: RunArguments, training_args: TrainingArguments) -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = [RegressionConfigCallback()]
    if run_args.early_stopping_patience > 0:
        callbacks.append(ValidationEarlyStopping(early_stopping_patience=run_args.early_stopping_patience))
    return callbacks


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def predict_splits(
    trainer: Trainer, tokenised: dict[str, datasets.Dataset], frames: dict[str, pd.DataFrame]
) -> pd.DataFrame:
    """Predictions in label units for every molecule of every split."""
    rows = []
    for name in SPLITS:
        output = trainer.predict(tokenised[name], metric_key_prefix=f"predict_{name}")
        frame = frames[name]
        part = pd.DataFrame(
            {
                "smiles": frame["smiles"],
                "canonical_smiles": frame["canonical_smiles"],
                "label": frame["label"],
                "prediction": np.asarray(output.predictions, dtype=np.float64).reshape(-1),
                "split": name,
                "source": frame["source"],
                "row": frame["row"],
            }
        )
        if "sample_weight" in frame:
            part["sample_weight"] = frame["sample_weight"]
        rows.append(part)
    return pd.concat(rows, ignore_index=True)


def write_predictions(predictions: pd.DataFrame, output_dir: Path) -> None:
    write_csv(output_dir / "predictions.csv", predictions)
    test = predictions[predictions["split"] == "test"]
    plots.parity_plot(test["label"], test["prediction"], output_dir / "parity_test.png", title="Test set")


def predict_unlabelled(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments
) -> pd.DataFrame:
    """Predictions for the SMILES of --predict_file; rows with invalid SMILES are reported and left out."""
    table = read_table(data_args.predict_file)
    smiles_col = find_column(
        table, data_args.smiles_column, SMILES_CANDIDATES, "SMILES", data_args.predict_file
    )
    molecules = prepare_molecules(
        table,
        smiles_col,
        None,
        source=data_args.predict_file,
        strict=data_args.strict_smiles,
        require_labels=False,
    )
    dataset = tokenise(molecules, tokenizer, data_args.max_seq_length)
    output = trainer.predict(dataset, metric_key_prefix="predict")
    return pd.DataFrame(
        {
            "row": molecules["row"],
            "smiles": molecules["smiles"],
            "canonical_smiles": molecules["canonical_smiles"],
            "prediction": np.asarray(output.predictions, dtype=np.float64).reshape(-1),
        }
    )


def export_merged(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, peft_args: PeftArguments
) -> None:
    """A plain model with the adapter folded in, for users without peft; the trained adapter stays as is."""
    if not hasattr(model, "merge_and_unload"):
        logger.info(
            "--merge_adapter: %s has no adapter to merge; the saved model is already plain.", peft_args.peft
        )
        return
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    logger.info("Merged model written to %s", path)


def write_run_config(
    output_dir: Path,
    options: dict[str, Any],
    model_args: ModelArguments,
    peft_args: PeftArguments,
    data_args: DataArguments,
    run_args: RunArguments,
    training_args: TrainingArguments,
    data: PreparedData,
) -> None:
    """run_config.json records every resolved setting; run_options.yaml holds the options given, to rerun."""
    resolved = {
        "model": dataclasses.asdict(model_args),
        "peft": dataclasses.asdict(peft_args),
        "data": dataclasses.asdict(data_args),
        "run": dataclasses.asdict(run_args),
        "training": training_args.to_dict(),
        "data_source": data.source,
        "split": {"method": data.split.method, "sizes": data.split.sizes},
        "extra": data.extra_report,
        "versions": library_versions(),
    }
    write_json(output_dir / "run_config.json", resolved)
    write_options(output_dir / "run_options.yaml", options, "the options this run was given")


def write_options(path: Path, options: Mapping[str, Any], what: str) -> None:
    header = f"# run_regression.py config: {what}.\n# Rerun: python run_regression.py {path}\n"
    write_text(path, header + yaml.safe_dump(dict(options), sort_keys=False))


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
    }


# ----------------------------------------------------------------------------------------------------------
# Hyperparameter search
# ----------------------------------------------------------------------------------------------------------


def run_hp_search(
    factory: ModelFactory,
    tokenised: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
    collator: DataCollatorWithPadding,
    run_args: RunArguments,
    training_args: TrainingArguments,
    options: dict[str, Any],
    data: PreparedData,
    start: float,
) -> dict[str, Any]:
    """Search hyperparameters on the validation split only and write best_config.yaml (a rerunnable config)."""
    output_dir = Path(training_args.output_dir)
    space_path = run_args.hp_space or DEFAULT_HP_SPACE
    space = SearchSpace.from_yaml(space_path, factory.peft_options.method)
    objective = BestValidationRMSE()
    callbacks = [*training_callbacks(run_args, training_args), objective]

    def model_init(trial: Any = None) -> torch.nn.Module:
        model = factory.build(space.trial_params(trial))
        # The Trainer seeds before model_init; a plain run's Trainer seeds again after its model is built.
        # Seeding here too gives a trial the data order and dropout draws of a plain run with its
        # hyperparameters, so best_config.yaml reproduces the best trial.
        set_seed(training_args.seed)
        return model

    trainer = RegressionTrainer(
        model_init=model_init,
        args=training_args,
        train_dataset=tokenised["train"],
        eval_dataset=tokenised["validation"],  # the test split is never shown to the search
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=make_compute_metrics(),
        callbacks=callbacks,
    )
    backend_kwargs: dict[str, Any] = {}
    if run_args.hp_search == "optuna":
        import optuna

        storage = optuna.storages.InMemoryStorage()
        backend_kwargs = {
            "sampler": optuna.samplers.TPESampler(seed=training_args.seed),
            "storage": storage,
            "study_name": "run_regression",
        }

        def hp_space(trial):
            return space.training_params(space.sample_optuna(trial))

    else:
        backend_kwargs = ray_search_kwargs(run_args.ray_address, run_args.ray_resources_per_trial, output_dir)

        def hp_space(trial):
            return space.ray_space()

    logger.info(
        "Hyperparameter search (%s, %d trials) over %s", run_args.hp_search, run_args.n_trials, space.names
    )
    best = trainer.hyperparameter_search(
        hp_space=hp_space,
        compute_objective=objective,
        n_trials=run_args.n_trials,
        direction="minimize",
        backend=run_args.hp_search,
        hp_name=lambda trial: f"trial-{getattr(trial, 'number', 'ray')}",
        **backend_kwargs,
    )
    if not trainer.is_world_process_zero() or best is None:
        return {}
    best_params = {k: plain_value(v) for k, v in best.hyperparameters.items() if k in space.names}
    trials = []
    if run_args.hp_search == "optuna":
        study = optuna.load_study(study_name="run_regression", storage=backend_kwargs["storage"])
        trials = [
            {"number": t.number, "state": t.state.name, "validation_rmse": t.value, "params": t.params}
            for t in study.trials
        ]
    results = {
        "backend": run_args.hp_search,
        "objective": "validation RMSE (best evaluation of each trial); the test split is never evaluated",
        "n_trials": run_args.n_trials,
        "search_space": str(space_path),
        "best_trial": best.run_id,
        "best_validation_rmse": best.objective,
        "best_params": best_params,
        "trials": trials,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(output_dir / "hp_search.json", results)
    best_options = {
        k: v
        for k, v in options.items()
        if k not in ("hp_search", "n_trials", "hp_space", "ray_address", "ray_resources_per_trial")
    }
    best_options.update(best_params)
    best_options.update({"do_train": True, "do_eval": True, "output_dir": str(output_dir / "best")})
    if data.split.params.get("source") != "pre-split files":
        best_options["split_file"] = str(output_dir / "split.json")  # the very molecules the search used
    write_options(
        output_dir / "best_config.yaml",
        best_options,
        f"the search's options with the best of {run_args.n_trials} trials (trial {best.run_id}, "
        f"validation RMSE {best.objective:.4f})",
    )
    logger.info("Best trial %s: validation RMSE %.4f with %s", best.run_id, best.objective, best_params)
    mark_done(
        output_dir,
        {
            "hp_search": run_args.hp_search,
            "best_validation_rmse": best.objective,
            "best_params": best_params,
            "wall_time_s": results["wall_time_s"],
        },
    )
    return results


if __name__ == "__main__":
    main()
