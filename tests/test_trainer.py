"""molft.trainer: the training defaults, predictions in dataset order, and where an interrupted run resumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import model_predictions, tiny_config
from transformers import DataCollatorWithPadding, TrainingArguments

from modeling_molformer_reg import MolformerForRegression
from molft.files import DONE_MARKER
from molft.regression import tokenise
from molft.trainer import RegressionTrainer, configure_training, detect_last_checkpoint
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


def test_detect_last_checkpoint(tmp_path):
    def detect(**kwargs):
        return detect_last_checkpoint(tmp_path / "run", **{"do_train": True, "overwrite": False, **kwargs})

    assert detect() is None  # no folder yet
    (tmp_path / "run").mkdir()
    assert detect() is None and detect(require_checkpoint=True) is None  # an empty folder is a fresh start
    (tmp_path / "run" / "notes.txt").write_text("")
    assert detect() is None
    with pytest.raises(ValueError, match="holds no checkpoint to resume"):
        detect(require_checkpoint=True)
    for step in (2, 4):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir()
    assert detect() == str(tmp_path / "run" / "checkpoint-4")
    assert detect(do_train=False) is None  # evaluation only never resumes

    marker = tmp_path / "run" / DONE_MARKER
    marker.write_text("{}")
    with pytest.raises(ValueError, match="already holds a finished run"):
        detect()
    assert detect(overwrite=True, process_index=1) is None and marker.is_file()  # only rank 0 removes it
    assert detect(overwrite=True) is None and not marker.exists()
