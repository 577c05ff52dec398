"""The regression model of run_regression.py: its options, tokenizer, config and model, and its predictions.

A run starts from a pretrained encoder, a run_mlm.py output, a run_regression.py output (kept as saved) or
a new model from a config; the head, pooling, loss and target statistics come from the options, so
predictions are always in label units. A hyperparameter search builds one model per trial, hence a factory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
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
from molft.labels import dataset_labels
from molft.peft_setup import PeftOptions, apply_peft, is_adapter_checkpoint, load_regression_checkpoint
from molft.run_data import RegressionDataArguments
from molft.splits import SPLIT_NAMES
from molft.task_outputs import prediction_columns, write_test_figures
from molft.tasks import Task, check_checkpoint_task, configure_config
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
    continue_training: bool = field(
        default=False,
        metadata={
            "help": "With --model_name_or_path a run_regression.py output: train it further with its own method "
            "(a LoRA/IA3 adapter stays trainable, --peft bitfit keeps the encoder weights frozen; default: a "
            "saved adapter cannot be trained and --peft is ignored). run_influence.py --validate lds "
            "--lds_retrain warm uses it."
        },
    )


def tokenise(
    frame: pd.DataFrame,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    lengths: bool = False,
    task: Task | None = None,
) -> datasets.Dataset:
    """Token ids without padding (the collator pads each batch) plus labels and optional loss weights.

    `lengths`: add the `length` column that length-grouped batching reads (training sets only; the Trainer
    logs every column the model does not take, at every evaluation). `task`: the labels of other tasks than
    one regression target (molft.tasks).
    """
    encoded = tokenizer(frame["canonical_smiles"].tolist(), truncation=True, max_length=max_length)
    columns: dict[str, list] = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
    }
    if lengths:
        columns["length"] = [len(ids) for ids in encoded["input_ids"]]
    labels = None if task is None or task.is_legacy else dataset_labels(frame, task)
    if labels is not None:
        columns["labels"] = labels
    elif "label" in frame:
        columns["labels"] = frame["label"].astype(np.float32).tolist()
    if "sample_weight" in frame:
        columns["sample_weight"] = frame["sample_weight"].astype(np.float32).tolist()
    return datasets.Dataset.from_dict(columns)


def load_tokenizer(
    model_args: CheckpointArguments, train_frame: pd.DataFrame | None, extra_smiles: Sequence[str] = ()
) -> PreTrainedTokenizerBase:
    """The given tokenizer or the checkpoint's; for a new model without one, built from the training SMILES.

    `extra_smiles` join a built vocabulary's corpus (random SMILES of the training molecules, see
    molft.augment.vocabulary_variants), so augmented inputs are no <unk>.
    """
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
    logger.info("No tokenizer given: building a vocabulary from the %d training SMILES.", len(train_frame))
    return MolformerTokenizer.from_smiles([*train_frame["canonical_smiles"], *extra_smiles])


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
    task: Task | None = None,
) -> MolformerConfig:
    """The model config: architecture from the checkpoint or --config_name, head and scaling from the flags,
    problem type and outputs from `task` (default: one regression target)."""
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
        if task is not None:
            check_checkpoint_task(config, task, model_args.model_name_or_path)
        if task is not None and not task.is_legacy:
            logger.info(
                "%s is a fine-tuned %s model: keeping its head.",
                model_args.model_name_or_path,
                task.problem_type,
            )
            return config
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
    if task is not None and not task.is_legacy:
        configure_config(config, task, train_frame, model_args.target_scaling)
        config._validate_molformer()
        return config
    config.problem_type = "regression"
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
    continue_training: bool = False  # a fine-tuned checkpoint is trained further with its own method

    @classmethod
    def create(
        cls,
        model_args: RegressionModelArguments,
        peft_options: PeftOptions,
        tokenizer: PreTrainedTokenizerBase,
        train_frame: pd.DataFrame,
        training_args: TrainingArguments,
        task: Task | None = None,
    ) -> ModelFactory:
        config = build_config(model_args, peft_options.peft, tokenizer, train_frame, task)
        finetuned = is_regression_checkpoint(config, model_args.model_name_or_path)
        checkpoint = model_args.model_name_or_path
        check_weights(checkpoint)  # a corrupt file is named, and before any output is written
        adapter = finetuned and checkpoint and is_adapter_checkpoint(checkpoint)
        if adapter and training_args.do_train and not model_args.continue_training:
            raise ValueError(
                f"{checkpoint} holds a trained adapter: it can be evaluated and used for prediction "
                "(drop --do_train), resumed by rerunning its own run with the same --output_dir, or "
                "trained further with --continue_training."
            )
        if model_args.continue_training and not finetuned:
            logger.warning(
                "--continue_training has no effect: %s is not a run_regression.py output.", checkpoint
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
            model_args.continue_training,
        )

    def build(
        self, overrides: Mapping[str, Any] | None = None, output_dir: Path | None = None
    ) -> torch.nn.Module:
        """A new model; `overrides` are trial hyperparameters, `output_dir` receives an adapter's base model."""
        overrides = dict(overrides or {})
        if self.finetuned:
            adapter = is_adapter_checkpoint(self.checkpoint)
            model = load_regression_checkpoint(
                self.checkpoint,
                config=self.config,
                cache_dir=self.cache_dir,
                trainable=self.continue_training,
            )
            if self.continue_training and not adapter and self.peft_options.peft == "bitfit":
                return apply_peft(model, self.peft_options)  # a BitFit run goes on training biases + head
            if self.peft_options.peft != "none" and not (self.continue_training and adapter):
                logger.warning(
                    "--peft %s ignored: %s is already fine-tuned.", self.peft_options.peft, self.checkpoint
                )
            return model
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
    trainer: Trainer,
    tokenised: dict[str, datasets.Dataset],
    frames: dict[str, pd.DataFrame],
    task: Task | None = None,
    splits: Sequence[str] = SPLIT_NAMES,
) -> pd.DataFrame:
    """Predictions in label units (classification: probabilities) for every molecule of `splits`."""
    rows = []
    for name in splits:
        output = trainer.predict(tokenised[name], metric_key_prefix=f"predict_{name}")
        frame = frames[name]
        values = np.asarray(output.predictions, dtype=np.float64)
        if task is None or task.is_legacy:
            outputs = {"label": frame["label"], "prediction": values.reshape(-1)}
        else:
            outputs = prediction_columns(values, task, frame)
        part = pd.DataFrame(
            {
                "smiles": frame["smiles"],
                "canonical_smiles": frame["canonical_smiles"],
                **outputs,
                "split": name,
                "source": frame["source"],
                "row": frame["row"],
            }
        )
        if "sample_weight" in frame:
            part["sample_weight"] = frame["sample_weight"]
        rows.append(part)
    return pd.concat(rows, ignore_index=True)


def write_predictions(
    predictions: pd.DataFrame, output_dir: Path, label_name: str | None = None, task: Task | None = None
) -> None:
    """predictions.csv and the test set's parity plot (axes in `label_name`, e.g. logD); other tasks'
    figures: molft.task_outputs."""
    from molft import plots  # matplotlib is slow to import: only once results are written

    write_csv(output_dir / PREDICTIONS_FILE, predictions)
    test = predictions[predictions["split"] == "test"]
    if task is not None and not task.is_legacy:
        write_test_figures(test, output_dir, task)
        return
    plots.parity_plot(
        test["label"], test["prediction"], output_dir / PARITY_PLOT_FILE, title="Test set", unit=label_name
    )


def predict_unlabelled(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    data_args: RegressionDataArguments,
    task: Task | None = None,
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
    values = np.asarray(trainer.predict(dataset, metric_key_prefix="predict").predictions, dtype=np.float64)
    if task is None or task.is_legacy:
        outputs = {"prediction": values.reshape(-1)}
    else:
        outputs = prediction_columns(values, task)
    return pd.DataFrame(
        {
            "row": molecules["row"],
            "smiles": molecules["smiles"],
            "canonical_smiles": molecules["canonical_smiles"],
            **outputs,
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
