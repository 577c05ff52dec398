"""molft.trainer: the training defaults and predictions in dataset order (where a run resumes: test_checkpoints.py)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from helpers import model_predictions, tiny_config
from transformers import DataCollatorWithPadding, TrainingArguments

from modeling_molformer_reg import MolformerForRegression
from molft.io import read_json
from molft.regression import tokenise
from molft.trainer import RegressionTrainer, ResultsTrainer, configure_training, log_best_model
from tokenization_molformer import MolformerTokenizer


def test_mixed_precision_where_the_gpu_supports_it(monkeypatch, tmp_path):
    def configured(bf16_supported: bool, auto_mixed_precision: bool = True, use_cpu: bool = False):
        training_args = TrainingArguments(output_dir=str(tmp_path), use_cpu=use_cpu)
        with monkeypatch.context() as gpu:  # pretend only after parsing: TrainingArguments would pick the GPU
            gpu.setattr(torch.cuda, "is_available", lambda: True)
            gpu.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
            configure_training(
                training_args,
                length_grouping=True,
                early_stopping_patience=5,
                auto_mixed_precision=auto_mixed_precision,
            )
        return training_args

    assert configured(True).bf16 and configured(True).mixed_precision == "bf16"
    assert configured(False).fp16 and configured(False).mixed_precision == "fp16"
    assert configured(True, auto_mixed_precision=False).mixed_precision == "no"
    assert configured(True, use_cpu=True).mixed_precision == "no"


def test_predictions_keep_dataset_order_and_loss_is_not_left_to_the_model(tmp_path):
    """transformers applies group_by_length to evaluation too; the regression Trainer must not reorder."""
    smiles = ["C" * n for n in (12, 2, 9, 1, 15, 4, 7, 3)]
    tokenizer = MolformerTokenizer.from_smiles(smiles)
    frame = pd.DataFrame({"canonical_smiles": smiles, "label": np.arange(len(smiles), dtype=float)})
    model = MolformerForRegression(tiny_config(vocab_size=len(tokenizer)))
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=3,
        train_sampling_strategy="group_by_length", label_names=["labels"],
    )  # fmt: skip
    trainer = RegressionTrainer(
        model=model, args=args, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer)
    )
    output = trainer.predict(tokenise(frame, tokenizer, 64))
    assert output.label_ids.tolist() == frame["label"].tolist()
    expected = model_predictions(model, tokenizer, smiles)
    np.testing.assert_allclose(output.predictions.reshape(-1), expected, atol=1e-5)
    # the model ignores num_items_in_batch, so the Trainer must average over gradient accumulation itself
    assert trainer.model_accepts_loss_kwargs is False


def tiny_trainer(tmp_path) -> RegressionTrainer:
    tokenizer = MolformerTokenizer.from_smiles(["CCO", "c1ccccc1"])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return RegressionTrainer(model=MolformerForRegression(tiny_config(vocab_size=len(tokenizer))), args=args)


def test_results_files_are_the_trainer_conventions_written_atomically(tmp_path):
    trainer = tiny_trainer(tmp_path)
    assert isinstance(trainer, ResultsTrainer)
    trainer.save_metrics("train", {"train_loss": 0.5}, combined=False)
    assert read_json(tmp_path / "train_results.json") == {"train_loss": 0.5}
    assert not (tmp_path / "all_results.json").exists()
    trainer.save_metrics("eval", {"eval_rmse": 0.7})
    trainer.save_metrics("test", {"test_rmse": 0.8})
    assert read_json(tmp_path / "all_results.json") == {"eval_rmse": 0.7, "test_rmse": 0.8}
    assert read_json(tmp_path / "test_results.json") == {"test_rmse": 0.8}
    assert not list(tmp_path.glob("*.tmp"))


def test_the_restored_best_epoch_is_logged(tmp_path, caplog):
    trainer = tiny_trainer(tmp_path)
    trainer.args.load_best_model_at_end, trainer.args.metric_for_best_model = True, "rmse"
    state = trainer.state
    state.log_history = [
        {"eval_rmse": rmse, "epoch": epoch, "step": 4 * epoch}
        for epoch, rmse in ((1, 0.9), (2, 0.6), (3, 0.7))
    ]
    state.best_model_checkpoint = str(tmp_path / "checkpoint-8")
    state.best_global_step, state.best_metric = 8, 0.6
    with caplog.at_level(logging.INFO, logger="molft.trainer"):
        log_best_model(trainer)
    assert "Best model restored: checkpoint-8 (epoch 2, step 8, eval_rmse 0.6000)." in caplog.messages
    caplog.clear()
    trainer.args.load_best_model_at_end = False  # the last epoch's weights are kept: nothing to say
    log_best_model(trainer)
    assert not caplog.messages
