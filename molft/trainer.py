"""Training set-up for the regression runs: the Trainer subclass, its callbacks, defaults and checkpoints.

Everything the Trainer does differently from its stock behaviour for this task lives here: predictions in
dataset order, the regression model card, early stopping on validation RMSE that restarts per trial, the
run's config next to every adapter checkpoint, and resuming an interrupted run in its own folder.
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
    get_last_checkpoint,
    has_length,
)

from molft.files import DONE_MARKER, MODEL_CARD_FILE
from molft.io import is_done, write_text
from molft.model_utils import unwrap_peft

logger = logging.getLogger(__name__)


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
    auto_mixed_precision: bool,
    search: bool = False,
) -> None:
    """Defaults this task needs: epoch-wise evaluation, best-by-validation-RMSE checkpoint, length grouping.

    `search`: the run is a hyperparameter search, whose trials keep no checkpoint.
    """
    if length_grouping:
        training_args.train_sampling_strategy = "group_by_length"
    training_args.length_column_name = "length"
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    if early_stopping_patience > 0 or training_args.load_best_model_at_end:
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
    if search:
        # trials are judged by their best validation RMSE; no checkpoint of a trial is kept
        training_args.save_strategy = SaveStrategy.NO
        training_args.load_best_model_at_end = False
    use_gpu = torch.cuda.is_available() and not training_args.use_cpu
    if not use_gpu:
        training_args.dataloader_pin_memory = (
            False  # pinning needs an accelerator; avoids a warning per loader
        )
    if auto_mixed_precision and use_gpu and not (training_args.bf16 or training_args.fp16):
        if torch.cuda.is_bf16_supported():
            training_args.bf16, training_args.mixed_precision = True, "bf16"
        else:
            training_args.fp16, training_args.mixed_precision = True, "fp16"
        logger.info(
            "Mixed precision: %s (--auto_mixed_precision false to train in fp32).",
            training_args.mixed_precision,
        )


def detect_last_checkpoint(
    output_dir: str | Path,
    *,
    do_train: bool,
    overwrite: bool,
    resume_from_checkpoint: str | bool | None = None,
    process_index: int = 0,
    require_checkpoint: bool = False,
) -> str | None:
    """The checkpoint to resume an interrupted run from; refuse to mix a new run into a finished one.

    `overwrite` starts afresh (dropping a stale completion marker, on the main process only).
    `require_checkpoint`: a non-empty folder without a checkpoint is an error rather than a fresh start.
    """
    output_dir = Path(output_dir)
    if not (do_train and output_dir.is_dir() and any(output_dir.iterdir())):
        return None
    if overwrite:
        if process_index == 0:  # a stale marker would claim the new run finished
            (output_dir / DONE_MARKER).unlink(missing_ok=True)
        return None
    if is_done(output_dir):
        raise ValueError(
            f"Output directory {output_dir} already holds a finished run ({DONE_MARKER}); "
            "use --overwrite_output_dir true or another --output_dir."
        )
    last = get_last_checkpoint(str(output_dir))
    if last is None and require_checkpoint:
        raise ValueError(
            f"Output directory {output_dir} is not empty and holds no checkpoint to resume; "
            "use --overwrite_output_dir true or another --output_dir."
        )
    if last is not None and resume_from_checkpoint is None:
        logger.info("Resuming from %s (pass --overwrite_output_dir true to start afresh).", last)
    return last


def train_model(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, resume_from: str | bool | None
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


def evaluate_splits(trainer: Trainer, tokenised: dict[str, datasets.Dataset]) -> dict[str, float]:
    """Validation (eval_*) and test (test_*) metrics of the final model, in label units."""
    # early stopping watches validation RMSE during training only; these evaluations must not feed it
    trainer.remove_callback(ValidationEarlyStopping)
    metrics: dict[str, float] = {}
    for name, prefix in (("validation", "eval"), ("test", "test")):
        split_metrics = trainer.evaluate(eval_dataset=tokenised[name], metric_key_prefix=prefix)
        trainer.log_metrics(prefix, split_metrics)
        metrics.update(split_metrics)
    return metrics
