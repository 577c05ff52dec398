#!/usr/bin/env python
"""Fine-tune MoLFormer for molecular property regression (default: MoleculeNet Lipophilicity, logD).

Also several targets with gaps (`--label_column a,b,c`) and classification (`--problem_type
single_label_classification` or `multi_label_classification`); see molft/tasks.py.

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

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from transformers import DataCollatorWithPadding, TrainingArguments, set_seed

from molft import cli, preflight
from molft.augment import AugmentationArguments, augment_training_set, vocabulary_variants
from molft.files import (
    ALL_RESULTS_FILE,
    MODEL_CARD_FILE,
    PREDICTIONS_FILE,
    SPLIT_FILE,
)
from molft.hp_search import run_hp_search
from molft.io import mark_done
from molft.labels import dataset_labels
from molft.peft_setup import PEFT_METHODS, PeftOptions, trainable_parameters
from molft.regression import (
    TARGET_SCALINGS,
    ModelFactory,
    RegressionModelArguments,
    cap_splits,
    load_tokenizer,
    predict_splits,
    predict_unlabelled,
    tokenise,
)
from molft.run_data import RegressionDataArguments, prepare_data
from molft.run_outputs import write_outputs
from molft.run_record import explicit_options
from molft.splits import SPLIT_NAMES, save_split
from molft.task_outputs import done_fields, make_compute_metrics
from molft.tasks import TaskArguments, best_metric, check_split_labels, make_task
from molft.threads import choose_cpu_threads
from molft.train_order import TRAIN_ORDERS, fixed_training_order
from molft.trainer import (
    RegressionTrainer,
    configure_training,
    detect_last_checkpoint,
    evaluate_splits,
    train_model,
    training_callbacks,
)
from molft.uncertainty import (
    UncertaintyArguments,
    check_ensemble_members,
    check_prediction_options,
    predict_with_uncertainty,
    split_molecules,
)
from molft.weights import WEIGHT_MAPPINGS

logger = logging.getLogger(__name__)

SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_HP_SPACE = SCRIPT_DIR / "configs" / "hp_space.yaml"
HP_SEARCH_BACKENDS = ("none", "optuna", "ray")


@dataclass
class PeftArguments(PeftOptions):
    """The PEFT options, plus what this script does with a trained adapter."""

    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Also export a plain model with the adapter merged, to <output_dir>/merged."},
    )


@dataclass
class RunArguments:
    """What this script does around the training: early stopping, the output folder, precision, the search."""

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
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Debug or quick runs: evaluate on the first this many validation molecules only."},
    )
    max_predict_samples: int | None = field(
        default=None,
        metadata={
            "help": "Debug or quick runs: test metrics and predictions of the first this many test molecules."
        },
    )
    predict_train_split: bool = field(
        default=True,
        metadata={
            "help": "Write the training molecules' predictions to predictions.csv too (false: validation and "
            "test only; LDS retrainings need one split, and predicting 3,360 molecules costs as much as 100 "
            "training steps)."
        },
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


ARGUMENT_TYPES = (
    RegressionModelArguments,
    PeftArguments,
    RegressionDataArguments,
    TaskArguments,
    RunArguments,
    AugmentationArguments,
    UncertaintyArguments,
    TrainingArguments,
)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run one fine-tuning (or a hyperparameter search) and return the metrics written to all_results.json."""
    all_args = cli.parse_args(ARGUMENT_TYPES, args, description=__doc__)
    model_args, peft_args, data_args, task_args, run_args, aug_args, unc_args, training_args = all_args
    options = explicit_options(ARGUMENT_TYPES, args)
    if training_args.should_log:  # log_level "passive" then means info, as in the transformers examples
        transformers.utils.logging.set_verbosity_info()
    cli.setup_logging(training_args.get_process_log_level())
    validate_arguments(model_args, peft_args, data_args, run_args, training_args)
    task = make_task(task_args, data_args.label_column, run_args.hp_search, model_args.model_name_or_path)
    check_prediction_options(aug_args.tta, unc_args, training_args.do_predict, run_args.hp_search != "none")
    # what the run needs from outside, checked before any data work or output (fails in seconds)
    preflight.check_run_needs(
        models={
            "Model": model_args.model_name_or_path,
            "Tokenizer": model_args.tokenizer_name,
            "Base model of the adapter": preflight.adapter_base_model(model_args.model_name_or_path),
        },
        dataset=preflight.hub_dataset(data_args.dataset_name, local_files=bool(data_args.train_file)),
        push_to_hub=training_args.push_to_hub,
        report_to=training_args.report_to,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
    )
    logger.info("Training parameters %s", training_args)
    output_dir = Path(training_args.output_dir)
    is_main_process = training_args.process_index == 0
    search = run_args.hp_search != "none"
    last_checkpoint = detect_last_checkpoint(
        output_dir,
        do_train=training_args.do_train and not search,
        overwrite=run_args.overwrite_output_dir,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        process_index=training_args.process_index,
    )
    configure_training(
        training_args,
        length_grouping=data_args.length_grouping,
        fixed_order=data_args.train_order == "fixed",
        early_stopping_patience=run_args.early_stopping_patience,
        auto_mixed_precision=run_args.auto_mixed_precision,
        search=search,
        best_metric=best_metric(task.problem_type),
    )
    set_seed(training_args.seed)
    start = time.perf_counter()

    # Data: every SMILES and label checked, split, external molecules added to train only
    reuse_split = output_dir / SPLIT_FILE if last_checkpoint and not data_args.split_file else None
    data = prepare_data(data_args, reuse_split=reuse_split, task=task)
    if data_args.train_order == "fixed":  # the split's molecules in one order, extra ones at their own places
        data.frames["train"] = fixed_training_order(data.frames["train"], training_args.seed)
    logger.info(
        "Data: %s, SMILES column %r, label column %r; %s split %s",
        data.source,
        data.columns.get("smiles_column"),
        data.columns.get("label_column"),
        data.split.method,
        data.split.sizes,
    )
    cap_splits(data.frames, {"validation": run_args.max_eval_samples, "test": run_args.max_predict_samples})
    picks_by_auc = (
        training_args.load_best_model_at_end and training_args.metric_for_best_model == "eval_roc_auc"
    )
    check_split_labels(data.frames, task, needs_validation_auc=training_args.do_train and picks_by_auc)
    if unc_args.ensemble_dirs:  # before any training: members must share this run's split
        check_ensemble_members(
            unc_args.ensemble_paths(), split_molecules(data.dataset, data.split.indices()), output_dir
        )

    # Tokenizer, config and a model factory (a search builds one model per trial)
    train_smiles = data.frames["train"]["canonical_smiles"].tolist()
    augmenting = aug_args.augment_smiles > 0 or aug_args.tta > 0  # a built vocabulary covers random SMILES
    tokenizer = load_tokenizer(
        model_args,
        data.frames["train"],
        vocabulary_variants(train_smiles, training_args.seed, 1) if augmenting else (),
    )
    factory = ModelFactory.create(model_args, peft_args, tokenizer, data.frames["train"], training_args, task)
    # written once every check that can fail early has passed, so a refused run leaves no folder behind
    if is_main_process:
        save_split(
            output_dir / SPLIT_FILE,
            data.dataset,
            data.split,
            dataset_source=data.source,
            extra=data.extra_report,
            columns=data.columns,
            data=data.record,
            task=task.record(),
        )
    with training_args.main_process_first(desc="tokenisation"):
        tokenised = {
            name: tokenise(frame, tokenizer, data_args.max_seq_length, lengths=name == "train", task=task)
            for name, frame in data.frames.items()
        }
    collator = DataCollatorWithPadding(tokenizer)
    train_dataset = tokenised["train"]
    if aug_args.augment_smiles:  # items carry their SMILES, which the collator re-writes at random
        train_dataset, collator = augment_training_set(
            train_dataset,
            train_smiles,
            aug_args.augment_smiles,
            collator,
            tokenizer,
            data_args.max_seq_length,
        )
        training_args.remove_unused_columns = False

    if search:
        return run_hp_search(
            factory,
            {**tokenised, "train": train_dataset},
            tokenizer,
            collator,
            training_args,
            backend=run_args.hp_search,
            n_trials=run_args.n_trials,
            space_path=run_args.hp_space or DEFAULT_HP_SPACE,
            callbacks=training_callbacks(run_args.early_stopping_patience),
            options=options,
            split_file=None if data.is_presplit else output_dir / SPLIT_FILE,
            start=start,
            ray_address=run_args.ray_address,
            ray_resources_per_trial=run_args.ray_resources_per_trial,
            compute_metrics=make_compute_metrics(task),
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
    choose_cpu_threads(param_counts["total_params"], on_cpu=training_args.device.type == "cpu")
    trainer = RegressionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=tokenised["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=make_compute_metrics(task),
        callbacks=training_callbacks(run_args.early_stopping_patience),
    )

    metrics: dict[str, Any] = {**param_counts, "n_extra_train": 0 if data.extra is None else len(data.extra)}
    if training_args.do_train:
        metrics.update(
            train_model(trainer, tokenizer, training_args.resume_from_checkpoint or last_checkpoint)
        )
    if training_args.do_eval:
        metrics.update(evaluate_splits(trainer, tokenised))
    # predict() gathers across processes, so every rank runs it and only rank 0 writes
    splits = SPLIT_NAMES if run_args.predict_train_split else tuple(n for n in SPLIT_NAMES if n != "train")
    predictions = predict_splits(trainer, tokenised, data.frames, task, splits)
    unlabelled = predict_unlabelled(trainer, tokenizer, data_args, task) if data_args.predict_file else None
    if training_args.do_predict and not data_args.predict_file:
        logger.info("--do_predict without --predict_file: test-set predictions are in %s.", PREDICTIONS_FILE)
    if training_args.do_predict and (aug_args.tta or unc_args.mc_dropout_samples or unc_args.ensemble_dirs):
        predict_metrics = predict_with_uncertainty(
            trainer.model,
            tokenizer,
            predictions,
            unlabelled,
            tta=aug_args.tta,
            options=unc_args,
            seed=training_args.seed,
            batch_size=training_args.per_device_eval_batch_size,
            max_length=data_args.max_seq_length,
            output_dir=output_dir,
            labels=None if task.is_legacy else np.asarray(dataset_labels(data.frames["test"], task), float),
        )
        trainer.log_metrics("predict", predict_metrics)
        trainer.save_metrics("predict", predict_metrics, combined=False)
        metrics.update(predict_metrics)
    metrics["train_wall_time_s"] = time.perf_counter() - start

    if trainer.is_world_process_zero():
        write_outputs(trainer, tokenizer, metrics, predictions, unlabelled, options, data, all_args, task)
    if training_args.push_to_hub:  # config.json declares the problem type
        trainer.push_to_hub(commit_message=f"MoLFormer {task.problem_type.replace('_', ' ')} fine-tuning")
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
                **done_fields(task, metrics),
            },
        )
        logger.info(
            "Outputs are in %s: metrics in %s, predictions in %s, the model card in %s.",
            output_dir.resolve(),
            ALL_RESULTS_FILE,
            PREDICTIONS_FILE,
            MODEL_CARD_FILE,
        )
    return metrics


def validate_arguments(
    model_args: RegressionModelArguments,
    peft_args: PeftArguments,
    data_args: RegressionDataArguments,
    run_args: RunArguments,
    training_args: TrainingArguments,
) -> None:
    """Fail before any data is read or model trained when options cannot work together."""
    checks = {
        "--peft": (peft_args.peft, PEFT_METHODS),
        "--target_scaling": (model_args.target_scaling, TARGET_SCALINGS),
        "--weight_mapping": (data_args.weight_mapping, WEIGHT_MAPPINGS),
        "--hp_search": (run_args.hp_search, HP_SEARCH_BACKENDS),
        "--train_order": (data_args.train_order, TRAIN_ORDERS),
    }
    for flag, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {allowed}, got {value!r}.")
    if model_args.model_name_or_path and (model_args.config_name or model_args.config_overrides):
        # lets a config file for a new model also start from a checkpoint (--model_name_or_path on top)
        logger.warning(
            "--model_name_or_path %s given: its own config is used; --config_name/--config_overrides are ignored.",
            model_args.model_name_or_path,
        )
    if data_args.extra_train_weights and not data_args.extra_train_file:
        raise ValueError("--extra_train_weights names a column of --extra_train_file, which is not given.")
    for flag, cap in (
        ("--max_eval_samples", run_args.max_eval_samples),
        ("--max_predict_samples", run_args.max_predict_samples),
    ):
        if cap is not None and cap < 1:
            raise ValueError(f"{flag} must be at least 1, got {cap}.")
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


if __name__ == "__main__":
    preflight.exit_on_missing_needs(main)
