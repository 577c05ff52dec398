"""The regression model of run_regression.py: its options, tokenizer, config and model, and its predictions.

A run starts from a pretrained encoder, a run_mlm.py output, a run_regression.py output (kept as saved) or
a new model from a config; the head, pooling, loss and target statistics come from the options, so
predictions are always in label units. A hyperparameter search builds one model per trial, hence a factory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainingArguments

import modeling_molformer_reg  # noqa: F401  registers MoLFormer with the Auto classes
import tokenization_molformer  # noqa: F401  registers the tokenizer with AutoTokenizer
from configuration_molformer import MolformerConfig
from modeling_molformer_reg import MolformerForRegression
from molft.arguments import CheckpointArguments
from molft.checkpoints import check_weights
from molft.data import SMILES_CANDIDATES, find_column, prepare_molecules, read_table
from molft.files import BASE_MODEL_DIR, PARITY_PLOT_FILE, PREDICTIONS_FILE
from molft.hp_search import CONFIG_HYPERPARAMETERS
from molft.io import write_csv
from molft.peft_setup import PeftOptions, apply_peft, is_adapter_checkpoint, load_regression_checkpoint
from molft.run_data import RegressionDataArguments
from molft.splits import SPLIT_NAMES
from tokenization_molformer import MolformerTokenizer

logger = logging.getLogger(__name__)

TARGET_SCALINGS = ("none", "standard", "minmax")


@dataclass
class RegressionModelArguments(CheckpointArguments):
    """The model options of run_regression.py: where it starts (CheckpointArguments), head and scaling."""

    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override config values of a new model, e.g. 'hidden_size=128,num_hidden_layers=4' "
            "(only with --config_name)."
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


def tokenise(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_length: int, lengths: bool = False
) -> datasets.Dataset:
    """Token ids without padding (the collator pads each batch) plus labels and optional loss weights.

    `lengths`: add the `length` column that length-grouped batching reads (training sets only; the Trainer
    logs every column the model does not take, at every evaluation).
    """
    encoded = tokenizer(frame["canonical_smiles"].tolist(), truncation=True, max_length=max_length)
    columns: dict[str, list] = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
    }
    if lengths:
        columns["length"] = [len(ids) for ids in encoded["input_ids"]]
    if "label" in frame:
        columns["labels"] = frame["label"].astype(np.float32).tolist()
    if "sample_weight" in frame:
        columns["sample_weight"] = frame["sample_weight"].astype(np.float32).tolist()
    return datasets.Dataset.from_dict(columns)


def load_tokenizer(
    model_args: CheckpointArguments, train_frame: pd.DataFrame | None
) -> PreTrainedTokenizerBase:
    """The given tokenizer or the checkpoint's; for a new model without one, built from the training SMILES."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
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
    model_args: RegressionModelArguments,
    peft_method: str,
    tokenizer: PreTrainedTokenizerBase,
    train_frame: pd.DataFrame,
) -> MolformerConfig:
    """The model config: architecture from the checkpoint or --config_name, head and scaling from the flags."""
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
    else:
        config_file = Path(model_args.config_name)
        config = MolformerConfig.from_json_file(
            str(config_file / "config.json" if config_file.is_dir() else config_file)
        )
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
    redraw = model_args.feature_map_redraw or ("never" if peft_method in ("lora", "ia3") else "train")
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
    revision: str = "main"

    @classmethod
    def create(
        cls,
        model_args: RegressionModelArguments,
        peft_options: PeftOptions,
        tokenizer: PreTrainedTokenizerBase,
        train_frame: pd.DataFrame,
        training_args: TrainingArguments,
    ) -> ModelFactory:
        config = build_config(model_args, peft_options.peft, tokenizer, train_frame)
        finetuned = is_regression_checkpoint(config, model_args.model_name_or_path)
        checkpoint = model_args.model_name_or_path
        check_weights(checkpoint)  # a corrupt file is named, and before any output is written
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
        # the PEFT settings alone, whatever else the script's PEFT argument group holds
        options = PeftOptions(
            **{f.name: getattr(peft_options, f.name) for f in dataclasses.fields(PeftOptions)}
        )
        return cls(
            config,
            options,
            checkpoint,
            model_args.cache_dir,
            finetuned,
            bool(training_args.gradient_checkpointing),
            model_args.model_revision,
        )

    def build(
        self, overrides: Mapping[str, Any] | None = None, output_dir: Path | None = None
    ) -> torch.nn.Module:
        """A new model; `overrides` are trial hyperparameters, `output_dir` receives an adapter's base model."""
        overrides = dict(overrides or {})
        if self.finetuned:
            if self.peft_options.peft != "none":
                logger.warning(
                    "--peft %s ignored: %s is already fine-tuned.", self.peft_options.peft, self.checkpoint
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
        if options.peft in ("lora", "ia3") and self.checkpoint is None and output_dir is not None:
            # a model trained from scratch has no saved base for its adapter to name, so keep one beside it
            base_dir = (output_dir / BASE_MODEL_DIR).resolve()
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
                self.checkpoint,
                config=config,
                cache_dir=self.cache_dir,
                revision=self.revision,
                output_loading_info=True,
            )
            new = sorted(k for k in info["missing_keys"] if not k.startswith("classifier."))
            if new:
                raise ValueError(f"{self.checkpoint} lacks encoder weights: {new[:5]} ...")
            if info["missing_keys"]:
                logger.info("Newly initialised regression head: %s", sorted(info["missing_keys"]))
        return model


def cap_splits(frames: dict[str, pd.DataFrame], caps: Mapping[str, int | None]) -> None:
    """Keep only the first `caps[name]` molecules of each capped split (quick or debugging runs), saying so."""
    for name, cap in caps.items():
        if cap is not None and cap < len(frames[name]):
            logger.info("Using the first %d of the %d %s molecules.", cap, len(frames[name]), name)
            frames[name] = frames[name].iloc[:cap].reset_index(drop=True)


def predict_splits(
    trainer: Trainer, tokenised: dict[str, datasets.Dataset], frames: dict[str, pd.DataFrame]
) -> pd.DataFrame:
    """Predictions in label units for every molecule of every split."""
    rows = []
    for name in SPLIT_NAMES:
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


def write_predictions(predictions: pd.DataFrame, output_dir: Path, label_name: str | None = None) -> None:
    """predictions.csv and the test set's parity plot (axes in `label_name`, e.g. logD)."""
    from molft import plots  # matplotlib is slow to import: only once results are written

    write_csv(output_dir / PREDICTIONS_FILE, predictions)
    test = predictions[predictions["split"] == "test"]
    plots.parity_plot(
        test["label"], test["prediction"], output_dir / PARITY_PLOT_FILE, title="Test set", unit=label_name
    )


def predict_unlabelled(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, data_args: RegressionDataArguments
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
        standardize=data_args.standardize,
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
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, peft_method: str
) -> None:
    """A plain model with the adapter folded in, for users without peft; the trained adapter stays as is."""
    if not hasattr(model, "merge_and_unload"):
        logger.info(
            "--merge_adapter: %s has no adapter to merge; the saved model is already plain.", peft_method
        )
        return
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    logger.info("Merged model written to %s", path)
