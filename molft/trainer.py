"""Training set-up for the regression runs: the Trainer subclass, its callbacks, defaults and checkpoints.

Everything the Trainer does differently from its stock behaviour for this task lives here: predictions in
dataset order, the regression model card, early stopping on validation RMSE that restarts per trial, and the
run's config next to every adapter checkpoint. Where an interrupted run resumes is molft/checkpoints.py's
`detect_last_checkpoint`, re-exported here. `ResultsTrainer` (run_mlm.py's Trainer too) writes the usual
`{split}_results.json` files atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import SequentialSampler
from transformers import (
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    IntervalStrategy,
    SaveStrategy,
    has_length,
)

from molft.checkpoints import detect_last_checkpoint  # noqa: F401  re-exported: where a run resumes
from molft.files import ALL_RESULTS_FILE, MODEL_CARD_FILE
from molft.io import read_json, write_json, write_text
from molft.model_utils import unwrap_peft

logger = logging.getLogger(__name__)


class ResultsTrainer(Trainer):
    """Trainer whose `save_metrics` files (train_results.json, ..., all_results.json) are written atomically."""

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        write_json(output_dir / f"{split}_results.json", metrics)
        if combined:
            path = output_dir / ALL_RESULTS_FILE
            write_json(path, {**(read_json(path) if path.is_file() else {}), **metrics})


class RegressionTrainer(ResultsTrainer):
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
            write_text(Path(self.args.output_dir) / MODEL_CARD_FILE, self.model_card_text)
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
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                unwrap_peft(model).config.save_pretrained(checkpoint)


def training_callbacks(early_stopping_patience: int) -> list[TrainerCallback]:
    """The callbacks of every regression training; a patience of 0 disables early stopping."""
    callbacks: list[TrainerCallback] = [RegressionConfigCallback()]
    if early_stopping_patience > 0:
        callbacks.append(ValidationEarlyStopping(early_stopping_patience=early_stopping_patience))
    return callbacks


def configure_training(
    training_args: TrainingArguments,
    *,
    length_grouping: bool,
    early_stopping_patience: int,
    fixed_order: bool = False,
    auto_mixed_precision: bool,
    search: bool = False,
    best_metric: str = "rmse",
) -> None:
    """Defaults this task needs: epoch-wise evaluation, best-by-validation-RMSE checkpoint, length grouping.

    `fixed_order`: batches follow the training frame's order (`--train_order fixed`). `search`: the run is a
    hyperparameter search, whose trials keep no checkpoint. `best_metric`: the
    validation metric that picks the best checkpoint unless one is given, lower-is-better "rmse" or a
    higher-is-better one (a classifier's "roc_auc").
    """
    if fixed_order:  # the training frame is already in its order (molft.train_order)
        training_args.train_sampling_strategy = "sequential"
    elif length_grouping:
        training_args.train_sampling_strategy = "group_by_length"
    training_args.length_column_name = "length"
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    if early_stopping_patience > 0 or training_args.load_best_model_at_end:
        if training_args.eval_strategy == IntervalStrategy.NO:
            logger.info("Early stopping needs evaluations: evaluating every epoch.")
            training_args.eval_strategy = IntervalStrategy.EPOCH
        # a classifier keeps an --metric_for_best_model eval_loss that was asked for ("loss" is transformers')
        if training_args.metric_for_best_model in (
            None,
            "loss",
            "eval_loss" if best_metric == "rmse" else None,
        ):
            training_args.metric_for_best_model = f"eval_{best_metric}"
            training_args.greater_is_better = best_metric != "rmse"
        training_args.load_best_model_at_end = True
        # the best checkpoint can only be restored if one is saved at every evaluation
        if training_args.save_strategy != training_args.eval_strategy:
            training_args.save_strategy = SaveStrategy(training_args.eval_strategy.value)
        if training_args.eval_strategy == IntervalStrategy.STEPS:
            training_args.save_steps = training_args.eval_steps
    if search:
        # trials are judged by their best validation RMSE; no checkpoint of a trial is kept
        training_args.save_strategy = SaveStrategy.NO
        training_args.load_best_model_at_end = False
    use_gpu = torch.cuda.is_available() and not training_args.use_cpu
    if not use_gpu:
        training_args.dataloader_pin_memory = (
            False  # pinning needs an accelerator; avoids a warning per loader
        )
    if auto_mixed_precision:
        enable_mixed_precision(training_args)


def enable_mixed_precision(training_args: TrainingArguments) -> None:
    """On a GPU without --bf16/--fp16, train in bf16 where supported, else fp16 (both training scripts)."""
    use_gpu = torch.cuda.is_available() and not training_args.use_cpu
    if not use_gpu or training_args.bf16 or training_args.fp16:
        return
    if torch.cuda.is_bf16_supported():
        training_args.bf16, training_args.mixed_precision = True, "bf16"
    else:
        training_args.fp16, training_args.mixed_precision = True, "fp16"
    logger.info(
        "Mixed precision: %s (--auto_mixed_precision false to train in fp32).", training_args.mixed_precision
    )


def train_model(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, resume_from: str | bool | None
) -> dict[str, Any]:
    """Train (resuming if asked), keep the best checkpoint's weights, and save what reloading needs.

    The train metrics go to train_results.json; the caller writes all_results.json once the run is complete.
    """
    result = trainer.train(resume_from_checkpoint=resume_from)
    log_best_model(trainer)
    trainer.save_model()
    metrics = {**result.metrics, "train_samples": len(trainer.train_dataset)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics, combined=False)
    trainer.save_state()
    if trainer.is_world_process_zero():
        # an adapter folder needs the run's config (head, pooling, target statistics) next to it
        unwrap_peft(trainer.model).config.save_pretrained(trainer.args.output_dir)
        tokenizer.save_pretrained(trainer.args.output_dir)
    return metrics


def log_best_model(trainer: Trainer) -> None:
    """Say which evaluation's weights a training ends with, when the best one was restored."""
    state, metric = trainer.state, trainer.args.metric_for_best_model
    if not (trainer.args.load_best_model_at_end and state.best_model_checkpoint and metric):
        return
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    epoch = next(
        (
            e.get("epoch")
            for e in state.log_history
            if e.get("step") == state.best_global_step and metric in e
        ),
        None,
    )
    logger.info(
        "Best model restored: %s (epoch %s, step %s, %s %.4f).",
        Path(state.best_model_checkpoint).name,
        "?" if epoch is None else f"{epoch:g}",
        state.best_global_step,
        metric,
        state.best_metric,
    )


def evaluate_splits(trainer: Trainer, tokenised: dict[str, datasets.Dataset]) -> dict[str, float]:
    """Validation (eval_*) and test (test_*) metrics of the final model, in label units.

    Each split's metrics also go to eval_results.json / test_results.json, as in the transformers examples.
    """
    # early stopping watches validation RMSE during training only; these evaluations must not feed it
    trainer.remove_callback(ValidationEarlyStopping)
    metrics: dict[str, float] = {}
    for name, prefix in (("validation", "eval"), ("test", "test")):
        split_metrics = trainer.evaluate(eval_dataset=tokenised[name], metric_key_prefix=prefix)
        trainer.log_metrics(prefix, split_metrics)
        trainer.save_metrics(prefix, split_metrics, combined=False)
        metrics.update(split_metrics)
    return metrics
