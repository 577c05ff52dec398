#!/usr/bin/env python
"""Fine-tune MoLFormer for molecular property regression (default: MoleculeNet Lipophilicity, logD).

Full fine-tuning or PEFT (LoRA, IA3, BitFit), in the style of the transformers examples:

    accelerate launch run_regression.py --peft lora --output_dir runs/lora
    python run_regression.py configs/regression_small.yaml --seed 3

Writes the model (or adapter), `all_results.json` (validation and test metrics in label units),
`predictions.csv`, `split.json`, plots, the resolved config and a model card, then `run_complete.json` last.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import modeling_molformer_reg  # noqa: F401  registers MoLFormer with the Auto classes
import tokenization_molformer  # noqa: F401
from configuration_molformer import MolformerConfig
from modeling_molformer_reg import MolformerForRegression
from molft import plots
from molft.cli import parse_args, setup_logging
from molft.data import (
    LABEL_CANDIDATES,
    SMILES_CANDIDATES,
    drop_overlap,
    find_column,
    load_raw_dataset,
    prepare_molecules,
    read_table,
)
from molft.io import mark_done, write_csv, write_json, write_text
from molft.metrics import make_compute_metrics
from molft.model_card import regression_model_card
from molft.model_utils import unwrap_peft
from molft.peft_setup import PeftOptions, apply_peft, trainable_parameters
from molft.splits import SplitResult, load_split, make_split, save_split, split_frames
from molft.weights import WEIGHT_MAPPINGS, map_weights
from tokenization_molformer import MolformerTokenizer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Starting checkpoint: a Hub id (e.g. ibm/MoLFormer-XL-both-10pct), a local directory, or a "
            "run_mlm.py output. Leave empty and set --config_name to train a new model from scratch."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "JSON config of a new MoLFormer (e.g. configs/molformer-small.json)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory or Hub id. Default: the checkpoint's; from scratch: built from the "
                  "training SMILES."},
    )
    regression_head: str = field(default="molformer", metadata={"help": "Head: molformer | mlp | linear."})
    pooling: str = field(default="mean", metadata={"help": "Pooling: mean (the reference pooler) | cls."})
    loss: str = field(default="mse", metadata={"help": "Loss: mse | l1 | huber."})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber delta, in standardised label units."})
    hidden_dropout_prob: float | None = field(default=None, metadata={"help": "Override the encoder dropout."})
    classifier_dropout_prob: float | None = field(default=None, metadata={"help": "Override the head dropout."})
    target_scaling: str = field(
        default="standard",
        metadata={"help": "Label scaling inside the model: none | standard | minmax. Metrics and predictions "
                  "are always in label units."},
    )
    feature_map_redraw: str | None = field(
        default=None,
        metadata={"help": "When attention random features are redrawn: train | always | never. Default: train "
                  "for full fine-tuning and BitFit, never for LoRA/IA3 (their adapters do not save the base's "
                  "feature maps, so redrawing would make saved adapters irreproducible)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})


@dataclass
class PeftArguments:
    peft: str = field(default="none", metadata={"help": "Fine-tuning method: none (full) | lora | ia3 | bitfit."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "LoRA targets: a regex over module names or a comma list of suffixes. Default: every "
                  "encoder layer's query/key/value, attention output and both FFN projections (never the head)."},
    )
    ia3_target_modules: str | None = field(
        default=None, metadata={"help": "IA3 targets (regex or comma list). Default: key, value, FFN output."}
    )
    ia3_feedforward_modules: str | None = field(
        default=None, metadata={"help": "IA3 feed-forward modules (input scaling). Default: FFN output dense."}
    )
    ia3_init_value: float = field(default=1.0, metadata={"help": "Initial value of the IA3 scaling vectors."})
    merge_adapter: bool = field(
        default=False, metadata={"help": "Also export a plain model with the adapter merged, to <output_dir>/merged."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default="lipophilicity",
        metadata={"help": "'lipophilicity' (the copy embedded in the chemloader package; falls back to the Hub "
                  "dataset scikit-fingerprints/MoleculeNet_Lipophilicity) or any Hub dataset id. Ignored when "
                  "--train_file is given."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "csv/tsv/json/jsonl/parquet with SMILES and labels."})
    validation_file: str | None = field(default=None, metadata={"help": "Optional pre-split validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Optional pre-split test file."})
    smiles_column: str | None = field(default=None, metadata={"help": "SMILES column (default: found by name)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: found by name)."})
    strict_smiles: bool = field(default=False, metadata={"help": "Error on invalid SMILES instead of dropping them."})
    split: str = field(
        default="random",
        metadata={"help": "random | scaffold | stratified | predefined | butina | maxmin | molecular_weight | "
                  "fingerprint. Ignored with --split_file or pre-split files."},
    )
    split_fractions: str = field(default="0.8,0.1,0.1", metadata={"help": "train,validation,test fractions."})
    split_seed: int = field(
        default=42, metadata={"help": "Seed of the split, separate from --seed so seeds vary on one split."}
    )
    split_column: str | None = field(default=None, metadata={"help": "Column with train/validation/test labels "
                                                                    "(--split predefined)."})
    split_file: str | None = field(
        default=None, metadata={"help": "Reuse a split.json (checked against the data) or an index file."}
    )
    extra_train_file: str | None = field(
        default=None, metadata={"help": "External molecules (e.g. a selection) added to the training split only."}
    )
    extra_smiles_column: str | None = field(default=None, metadata={"help": "SMILES column of the extra file."})
    extra_label_column: str | None = field(default=None, metadata={"help": "Label column of the extra file."})
    keep_extra_overlap: bool = field(
        default=False,
        metadata={"help": "Keep extra molecules that also sit in validation/test (default: report and drop)."},
    )
    extra_train_weights: str | None = field(
        default=None,
        metadata={"help": "Column of the extra file with per-molecule values turned into loss weights "
                  "(see --weight_mapping). Dataset molecules get weight 1."},
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
        default=None, metadata={"help": "With --do_predict: unlabelled SMILES to predict (csv/json/parquet)."}
    )


@dataclass
class RunArguments:
    early_stopping_patience: int = field(
        default=5, metadata={"help": "Evaluations without validation-RMSE improvement before stopping; 0 disables."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh even if the output directory holds checkpoints."}
    )
    selection_name: str | None = field(
        default=None,
        metadata={"help": "Label of the external-data strategy, recorded for sweep reports (default: none, "
                  "or the extra file's stem)."},
    )


def main() -> None:
    model_args, peft_args, data_args, run_args, training_args = parse_args(
        (ModelArguments, PeftArguments, DataArguments, RunArguments, TrainingArguments)
    )
    setup_logging(training_args.get_process_log_level())
    logger.info("Training parameters %s", training_args)
    output_dir = Path(training_args.output_dir)
    last_checkpoint = detect_last_checkpoint(training_args, run_args)
    configure_training(training_args, data_args, run_args)
    set_seed(training_args.seed)
    start = time.perf_counter()

    # Data: load, check every SMILES and label, split, and add external molecules to train only
    frames, split, source = load_and_split(data_args, output_dir, training_args.process_index == 0)
    extra = load_extra(data_args, frames) if data_args.extra_train_file else None
    train_frame = frames["train"] if extra is None else pd.concat([frames["train"], extra], ignore_index=True)
    if data_args.max_train_samples is not None:
        train_frame = train_frame.iloc[: data_args.max_train_samples]
    frames["train"] = train_frame

    # Model and tokenizer
    tokenizer = load_tokenizer(model_args, train_frame)
    config = build_config(model_args, peft_args, tokenizer, train_frame["label"].to_numpy())
    model = load_model(model_args, config)
    if training_args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    peft_options = PeftOptions(
        method=peft_args.peft,
        lora_r=peft_args.lora_r,
        lora_alpha=peft_args.lora_alpha,
        lora_dropout=peft_args.lora_dropout,
        lora_target_modules=peft_args.lora_target_modules,
        ia3_target_modules=peft_args.ia3_target_modules,
        ia3_feedforward_modules=peft_args.ia3_feedforward_modules,
        ia3_init_value=peft_args.ia3_init_value,
    )
    base_dir = save_untrained_base(model, model_args, peft_args, output_dir, training_args)
    model = apply_peft(model, peft_options)
    if base_dir is not None:
        model.peft_config["default"].base_model_name_or_path = str(base_dir)
    param_counts = trainable_parameters(model)
    logger.info(
        "Trainable parameters (%s): %s of %s (%.4f%%)",
        peft_args.peft,
        f"{param_counts['trainable_params']:,}",
        f"{param_counts['total_params']:,}",
        100 * param_counts["trainable_share"],
    )

    # Tokenised datasets; dynamic padding happens in the collator
    with training_args.main_process_first(desc="tokenisation"):
        tokenised = {
            name: tokenise(frame, tokenizer, data_args.max_seq_length, with_weights=name == "train" and extra is not None)
            for name, frame in frames.items()
        }
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenised["train"] if training_args.do_train else None,
        eval_dataset=tokenised["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics(),
        callbacks=early_stopping(run_args, training_args),
    )

    metrics: dict[str, float] = {**param_counts}
    if training_args.do_train:
        resume = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        metrics.update(train_result.metrics)
        metrics["train_samples"] = len(tokenised["train"])
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            unwrap_peft(trainer.model).config.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)

    # early stopping watches validation RMSE only; the final test evaluation must not feed it
    trainer.remove_callback(EarlyStoppingCallback)
    if training_args.do_eval:
        for name, prefix in (("validation", "eval"), ("test", "test")):
            split_metrics = trainer.evaluate(eval_dataset=tokenised[name], metric_key_prefix=prefix)
            trainer.log_metrics(prefix, split_metrics)
            metrics.update(split_metrics)

    if trainer.is_world_process_zero():
        write_predictions(trainer, tokenised, frames, output_dir)
        if training_args.do_predict and data_args.predict_file:
            predict_unlabelled(trainer, tokenizer, data_args, output_dir)
        plots.loss_curves(trainer.state.log_history, output_dir / "loss_curves.png")
        if peft_args.merge_adapter:
            export_merged(trainer.model, tokenizer, output_dir / "merged", peft_args)

    metrics["train_wall_time_s"] = time.perf_counter() - start
    trainer.save_metrics("all", metrics, combined=True)

    if trainer.is_world_process_zero():
        selection = run_args.selection_name or (Path(data_args.extra_train_file).stem if extra is not None else "none")
        resolved = {
            "model": asdict(model_args), "peft": asdict(peft_args), "data": asdict(data_args), "run": asdict(run_args),
            "training": training_args.to_dict(), "data_source": source,
        }
        write_json(output_dir / "run_config.json", resolved)
        card = regression_model_card(
            model_args=model_args, peft_method=peft_args.peft, data_source=source, split=split,
            metrics=metrics, extra_file=data_args.extra_train_file, n_extra=0 if extra is None else len(extra),
        )
        write_text(output_dir / "README.md", card)
        if training_args.push_to_hub:
            trainer.push_to_hub(commit_message="MoLFormer regression fine-tuning")
        mark_done(output_dir, {
            "peft": peft_args.peft, "selection": selection, "seed": training_args.seed,
            "split_seed": data_args.split_seed, "split": split.method,
            "test_rmse": metrics.get("test_rmse"), "wall_time_s": metrics["train_wall_time_s"],
        })


def detect_last_checkpoint(training_args: TrainingArguments, run_args: RunArguments) -> str | None:
    """Resume from the newest checkpoint in output_dir unless told to overwrite."""
    output_dir = training_args.output_dir
    if not training_args.do_train or not os.path.isdir(output_dir) or run_args.overwrite_output_dir:
        return None
    last = get_last_checkpoint(output_dir)
    if last is not None and training_args.resume_from_checkpoint is None:
        logger.info("Resuming from %s (pass --overwrite_output_dir to start afresh).", last)
    return last


def configure_training(training_args: TrainingArguments, data_args: DataArguments, run_args: RunArguments) -> None:
    """Defaults this task needs: epoch-wise evaluation, best-by-validation-RMSE checkpoint, length grouping."""
    if data_args.length_grouping:
        training_args.train_sampling_strategy = "group_by_length"
    training_args.length_column_name = "length"
    if run_args.early_stopping_patience > 0 or training_args.load_best_model_at_end:
        if training_args.eval_strategy == "no":
            logger.info("Early stopping needs evaluations: evaluating and saving every epoch.")
            training_args.eval_strategy = transformers.IntervalStrategy.EPOCH
            training_args.save_strategy = transformers.trainer_utils.SaveStrategy.EPOCH
        training_args.load_best_model_at_end = True
        if training_args.metric_for_best_model in (None, "loss", "eval_loss"):
            training_args.metric_for_best_model = "eval_rmse"
            training_args.greater_is_better = False
    if training_args.label_names is None:
        training_args.label_names = ["labels"]


def early_stopping(run_args: RunArguments, training_args: TrainingArguments) -> list:
    if run_args.early_stopping_patience > 0:
        return [EarlyStoppingCallback(early_stopping_patience=run_args.early_stopping_patience)]
    return []


def load_and_split(
    data_args: DataArguments, output_dir: Path, is_main_process: bool
) -> tuple[dict[str, pd.DataFrame], SplitResult, str]:
    """Prepared train/validation/test frames, the split (also written to split.json), and the data source."""
    raw = load_raw_dataset(
        None if data_args.train_file else data_args.dataset_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        dataset_config_name=data_args.dataset_config_name,
    )
    if set(raw.frames) == {"train"}:  # one file: split it like an unsplit dataset
        raw.frames = {"all": raw.frames["train"]}
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
        missing = [name for name in ("train", "validation", "test") if name not in prepared]
        if missing:
            raise ValueError(f"Pre-split data needs train, validation and test files; missing {missing}.")
        df = pd.concat([prepared[name] for name in ("train", "validation", "test")], ignore_index=True)
        bounds = np.cumsum([0] + [len(prepared[name]) for name in ("train", "validation", "test")])
        split = SplitResult(*(np.arange(bounds[i], bounds[i + 1]) for i in range(3)), method="predefined",
                            params={"source": "pre-split files"})
    else:
        df = prepared["all"]
        if data_args.split_file and Path(data_args.split_file).name == "split.json":
            split = load_split(data_args.split_file, df)
        else:
            fractions = tuple(float(x) for x in data_args.split_fractions.split(","))
            params = {}
            if data_args.split == "predefined":
                params = {"split_column": data_args.split_column, "split_file": data_args.split_file}
            split = make_split(df, data_args.split, fractions=fractions, seed=data_args.split_seed, **params)
    frames = split_frames(df, split)
    for name, frame in frames.items():
        if frame.empty:
            raise ValueError(f"The {name} split is empty; check the split fractions or files.")
        frame["split"] = name
        frame["source"] = "dataset"
    if is_main_process:
        save_split(output_dir / "split.json", df, split, dataset_source=raw.source)
    return frames, split, raw.source


def load_extra(data_args: DataArguments, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """External molecules for the training split: checked, de-duplicated against held-out splits, weighted."""
    path = data_args.extra_train_file
    table = read_table(path)
    smiles_col = find_column(table, data_args.extra_smiles_column, SMILES_CANDIDATES, "SMILES", path)
    label_col = find_column(table, data_args.extra_label_column, LABEL_CANDIDATES, "label", path)
    keep = [data_args.extra_train_weights] if data_args.extra_train_weights else []
    extra = prepare_molecules(table, smiles_col, label_col, source=path, strict=data_args.strict_smiles,
                              keep_columns=keep)
    extra, report = drop_overlap(
        extra, {"validation": frames["validation"], "test": frames["test"]}, drop=not data_args.keep_extra_overlap
    )
    in_train = extra["canonical_smiles"].isin(set(frames["train"]["canonical_smiles"]))
    if in_train.any():
        logger.warning("%d extra molecules are already in the training split (kept as extra rows).", int(in_train.sum()))
    if extra.empty:
        raise ValueError(f"No extra molecules are left from {path} after checks (overlap report: {report}).")
    extra["split"] = "train"
    extra["source"] = f"extra:{Path(path).name}"
    if data_args.extra_train_weights:
        extra["sample_weight"] = map_weights(
            extra[data_args.extra_train_weights].to_numpy(dtype=float),
            data_args.weight_mapping,
            temperature=data_args.weight_temperature,
        )
        frames["train"]["sample_weight"] = 1.0
    logger.info("Added %d external molecules from %s to the training split.", len(extra), path)
    return extra


def load_tokenizer(model_args: ModelArguments, train_frame: pd.DataFrame):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir)
    logger.info("No tokenizer given: building a vocabulary from the %d training SMILES.", len(train_frame))
    return MolformerTokenizer.from_smiles(train_frame["canonical_smiles"])


def build_config(model_args: ModelArguments, peft_args: PeftArguments, tokenizer, train_labels: np.ndarray):
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    elif model_args.config_name:
        config = MolformerConfig.from_json_file(model_args.config_name)
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
    else:
        raise ValueError("Give --model_name_or_path (a checkpoint) or --config_name (a new model's config).")
    if config.model_type != "molformer":
        raise ValueError(f"{model_args.model_name_or_path} is a {config.model_type!r} model, not MoLFormer.")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"Tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}.")
    config.regression_head = model_args.regression_head
    config.regression_pooling = model_args.pooling
    config.regression_loss = model_args.loss
    config.huber_delta = model_args.huber_delta
    if model_args.hidden_dropout_prob is not None:
        config.hidden_dropout_prob = model_args.hidden_dropout_prob
    if model_args.classifier_dropout_prob is not None:
        config.classifier_dropout_prob = model_args.classifier_dropout_prob
    redraw = model_args.feature_map_redraw or ("never" if peft_args.peft in ("lora", "ia3") else "train")
    config.feature_map_redraw = redraw
    config.target_mean, config.target_std = target_statistics(train_labels, model_args.target_scaling)
    config._validate_molformer()
    return config


def target_statistics(labels: np.ndarray, scaling: str) -> tuple[float, float]:
    """(shift, scale) with label = shift + scale · model_output."""
    if scaling == "none":
        return 0.0, 1.0
    if scaling == "standard":
        std = float(np.std(labels))
        return float(np.mean(labels)), std if std > 0 else 1.0
    if scaling == "minmax":
        spread = float(np.max(labels) - np.min(labels))
        return float(np.min(labels)), spread if spread > 0 else 1.0
    raise ValueError(f"--target_scaling must be none, standard or minmax, got {scaling!r}.")


def load_model(model_args: ModelArguments, config) -> MolformerForRegression:
    if model_args.model_name_or_path:
        model, info = MolformerForRegression.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, output_loading_info=True
        )
        new = sorted(k for k in info["missing_keys"] if not k.startswith("classifier."))
        if new:
            raise ValueError(f"{model_args.model_name_or_path} lacks encoder weights: {new[:5]} ...")
        if info["missing_keys"]:
            logger.info("Newly initialised regression head: %s", sorted(info["missing_keys"]))
        return model
    return MolformerForRegression(config)


def save_untrained_base(model, model_args, peft_args, output_dir: Path, training_args) -> Path | None:
    """An adapter needs its base; a model trained from scratch has no saved base, so keep one beside it."""
    if peft_args.peft not in ("lora", "ia3") or model_args.model_name_or_path:
        return None
    base_dir = output_dir / "base_model"
    if training_args.process_index == 0:
        model.save_pretrained(base_dir)
    return base_dir


def tokenise(frame: pd.DataFrame, tokenizer, max_length: int, with_weights: bool) -> datasets.Dataset:
    columns = {"smiles": frame["canonical_smiles"].tolist(), "labels": frame["label"].astype(np.float32).tolist()}
    if with_weights:
        columns["sample_weight"] = frame["sample_weight"].astype(np.float32).tolist()
    encoded = tokenizer(columns["smiles"], truncation=True, max_length=max_length)
    dataset = datasets.Dataset.from_dict({
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "length": [len(ids) for ids in encoded["input_ids"]],
        **{k: v for k, v in columns.items() if k != "smiles"},
    })
    return dataset


def write_predictions(trainer: Trainer, tokenised, frames, output_dir: Path) -> None:
    rows = []
    for name in ("train", "validation", "test"):
        output = trainer.predict(tokenised[name], metric_key_prefix=f"predict_{name}")
        frame = frames[name]
        rows.append(pd.DataFrame({
            "smiles": frame["smiles"], "canonical_smiles": frame["canonical_smiles"], "label": frame["label"],
            "prediction": np.asarray(output.predictions).reshape(-1), "split": name, "source": frame["source"],
        }))
    predictions = pd.concat(rows, ignore_index=True)
    write_csv(output_dir / "predictions.csv", predictions)
    test = predictions[predictions["split"] == "test"]
    plots.parity_plot(test["label"], test["prediction"], output_dir / "parity_test.png", title="Test set")


def predict_unlabelled(trainer: Trainer, tokenizer, data_args: DataArguments, output_dir: Path) -> None:
    table = read_table(data_args.predict_file)
    smiles_col = find_column(table, data_args.smiles_column, SMILES_CANDIDATES, "SMILES", data_args.predict_file)
    molecules = prepare_molecules(table, smiles_col, None, source=data_args.predict_file,
                                  strict=data_args.strict_smiles, require_labels=False)
    molecules["label"] = np.nan
    dataset = tokenise(molecules.assign(label=0.0), tokenizer, data_args.max_seq_length, with_weights=False)
    output = trainer.predict(dataset.remove_columns("labels"), metric_key_prefix="predict")
    out = pd.DataFrame({
        "row": molecules["row"], "smiles": molecules["smiles"], "canonical_smiles": molecules["canonical_smiles"],
        "prediction": np.asarray(output.predictions).reshape(-1),
    })
    write_csv(output_dir / "predict_predictions.csv", out)
    logger.info("Wrote %d predictions for %s", len(out), data_args.predict_file)


def export_merged(model, tokenizer, path: Path, peft_args: PeftArguments) -> None:
    if peft_args.peft not in ("lora", "ia3"):
        logger.info("--merge_adapter: %s has no adapter to merge; the saved model is already plain.", peft_args.peft)
        return
    merged = model.merge_and_unload()
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    logger.info("Merged model written to %s", path)


if __name__ == "__main__":
    main()
