"""Every result file of a run_regression.py run, written by the main process once training has ended.

predictions.csv (and the --predict_file predictions), the loss curves, the merged adapter, all_results.json,
run_config.json (the options that rerun it) and the model card: each written atomically, so a crash leaves the
earlier file or none, never a half-written one that looks complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import PreTrainedTokenizerBase

from molft.files import (
    ALL_RESULTS_FILE,
    LOSS_CURVES_FILE,
    MERGED_DIR,
    MODEL_CARD_FILE,
    PREDICT_PREDICTIONS_FILE,
)
from molft.io import write_csv, write_json, write_text
from molft.model_card import regression_model_card
from molft.peft_setup import publish_base_reference
from molft.regression import export_merged, write_predictions
from molft.run_data import PreparedData
from molft.run_record import write_run_config
from molft.task_outputs import write_loss_curves
from molft.tasks import Task
from molft.trainer import RegressionTrainer

logger = logging.getLogger(__name__)


def write_outputs(
    trainer: RegressionTrainer,
    tokenizer: PreTrainedTokenizerBase,
    metrics: dict[str, Any],
    predictions: pd.DataFrame,
    unlabelled: pd.DataFrame | None,
    options: dict[str, Any],
    data: PreparedData,
    all_args: tuple,
    task: Task,
) -> None:
    """Every result file of a run (main process only), each written atomically."""
    model_args, peft_args, data_args, task_args, run_args, aug_args, unc_args, training_args = all_args
    output_dir = Path(training_args.output_dir)
    write_predictions(predictions, output_dir, data.label_name, task)
    if unlabelled is not None:
        write_csv(output_dir / PREDICT_PREDICTIONS_FILE, unlabelled)
        logger.info("Wrote %d predictions for %s", len(unlabelled), data_args.predict_file)
    if training_args.do_train:
        write_loss_curves(
            trainer.state.log_history,
            output_dir / LOSS_CURVES_FILE,
            task,
            loss=model_args.loss,
            target_scaling=model_args.target_scaling,
            label_name=data.label_name,
            n_train=len(data.frames["train"]),
            n_validation=len(data.frames["validation"]),
            best_step=trainer.state.best_global_step,
        )
    if peft_args.merge_adapter:
        export_merged(trainer.model, tokenizer, output_dir / MERGED_DIR, peft_args.peft)
    write_json(output_dir / ALL_RESULTS_FILE, metrics)
    sections = {
        "model": model_args,
        "peft": peft_args,
        "data": data.resolved_options(data_args),
        "task": {**vars(task_args), **task.record()},
        "run": run_args,
        "augmentation": aug_args,
        "uncertainty": unc_args,
        "training": training_args,
        "data_source": data.source,
        "split": {"method": data.split.method, "sizes": data.split.sizes},
        "extra": data.extra_report,
    }
    write_run_config(output_dir, options, sections, script="run_regression.py")
    trainer.model_card_text = regression_model_card(
        model_args=model_args,
        peft_method=peft_args.peft,
        data_source=data.source,
        split=data.split,
        metrics=metrics,
        extra_file=data_args.extra_train_file,
        n_extra=metrics["n_extra_train"],
        label_name=data.label_name,
        base_model=publish_base_reference(trainer.model, output_dir),  # relative or a Hub id
        problem_type=task.problem_type,
        outputs=task.output_names,
    )
    write_text(output_dir / MODEL_CARD_FILE, trainer.model_card_text)
