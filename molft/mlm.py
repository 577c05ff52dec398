"""Masked-language-model training pieces of run_mlm.py: its options, SMILES enumeration, masking and metrics.

The corpus itself (which molecules, held-out exclusion) lives in `molft.mlm_corpus`; this module turns those
SMILES into masked batches for the Trainer and the Trainer's results into metrics, curves and checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

import modeling_molformer  # noqa: F401  (registers model_type "molformer" with the Auto classes)
from molft.arguments import CheckpointArguments
from molft.augment import draw_seed, randomised_smiles
from molft.checkpoints import check_weights
from molft.chem import STANDARDIZE_OPTIONS
from tokenization_molformer import MolformerTokenizer

logger = logging.getLogger(__name__)


@dataclass
class MlmModelArguments(CheckpointArguments):
    """Which model, config and tokenizer to start from, and how a new vocabulary is built."""

    build_tokenizer_from_corpus: bool | None = field(
        default=None,
        metadata={
            "help": "Build the vocabulary from the training SMILES. Default: true when training from "
            "scratch without --tokenizer_name, false otherwise."
        },
    )
    min_token_frequency: int = field(
        default=1,
        metadata={"help": "Tokens seen fewer times in the corpus become <unk> (built vocabularies)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # from scratch only with config_name: model_name_or_path is None only then
        if self.build_tokenizer_from_corpus is None:
            self.build_tokenizer_from_corpus = self.model_name_or_path is None and self.tokenizer_name is None
        if self.build_tokenizer_from_corpus and self.model_name_or_path is not None:
            raise ValueError(
                "build_tokenizer_from_corpus=true with model_name_or_path would give the pretrained embeddings a "
                "different vocabulary; continue with the checkpoint's tokenizer instead."
            )
        if self.min_token_frequency < 1:
            raise ValueError(f"min_token_frequency must be >= 1, got {self.min_token_frequency}.")


@dataclass
class MlmDataArguments:
    """Which molecules to train and evaluate on, which to refuse, and how to mask them."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A labelled dataset (e.g. 'lipophilicity') whose TRAINING molecules, as given by "
            "--split_file, form the corpus."
        },
    )
    split_file: str | None = field(
        default=None,
        metadata={
            "help": "A split.json from run_regression.py: its validation and test molecules are never "
            "trained on; with --dataset_name its train molecules are the corpus."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "SMILES file (csv/tsv/json/jsonl/parquet, or .txt/.smi one per line)."},
    )
    include_file: str | None = field(
        default=None, metadata={"help": "Extra unlabeled SMILES added to the training corpus."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "SMILES for evaluation; otherwise a part of the corpus is held out."}
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Percent of the corpus held out for evaluation without --validation_file."},
    )
    exclude_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Held-out molecule sets never to train on: split.json files (their validation and "
            "test molecules) or SMILES files (all their molecules)."
        },
    )
    smiles_column: str | None = field(
        default=None,
        metadata={"help": "SMILES column of the train/include/validation files (default: detected)."},
    )
    strict_smiles: bool = field(
        default=False, metadata={"help": "Fail on SMILES RDKit cannot parse instead of dropping them."}
    )
    standardize: str | None = field(
        default=None,
        metadata={
            "help": "Standardise every corpus molecule with RDKit: fragment_neutral | tautomer | none. Must be "
            "the --standardize of the run whose split.json is given, so its held-out molecules are recognised.",
            "choices": [*STANDARDIZE_OPTIONS, "none"],
        },
    )
    max_seq_length: int = field(default=202, metadata={"help": "Longer token sequences are truncated."})
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Fraction of tokens selected for the loss."}
    )
    mask_replace_prob: float = field(default=0.8, metadata={"help": "Selected tokens replaced by <mask>."})
    random_replace_prob: float = field(
        default=0.1, metadata={"help": "Selected tokens replaced by a random one."}
    )
    smiles_enumeration: bool = field(
        default=False,
        metadata={"help": "Train on a new random SMILES of each molecule every time it is drawn (seeded)."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use at most this many molecules (a seeded random pick; only the rows needed are "
            "checked with RDKit)."
        },
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without a lower eval_loss."}
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate the starting model first (the baseline for eval_loss)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into a non-empty output_dir instead of resuming or failing."}
    )
    auto_mixed_precision: bool = field(
        default=True,
        metadata={"help": "On a GPU without --bf16/--fp16, train in bf16 where supported, else fp16."},
    )

    def __post_init__(self) -> None:
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("Give either dataset_name or train_file as the corpus, not both.")
        if self.dataset_name is not None and self.split_file is None:
            raise ValueError(
                f"dataset_name={self.dataset_name!r} needs --split_file (the run_regression split.json): "
                "without it the validation and test molecules would be trained on."
            )
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )
        if self.max_seq_length < 3:
            raise ValueError(
                f"max_seq_length must leave room for <bos>, <eos> and a token, got {self.max_seq_length}."
            )


class EncodedSmiles(torch.utils.data.Dataset):
    """Tokenized canonical SMILES, plus what the collator needs to treat train and eval items differently.

    With `randomise`, items carry their SMILES so the collator can enumerate them; with `mask_seed`, items
    carry a seed so that an evaluation set is masked the same way at every evaluation and eval losses of
    different epochs compare the model, not the masks. A plain torch dataset (not `datasets`) so that
    Trainer's length grouping reads the lengths once instead of row by row every epoch.
    """

    def __init__(
        self,
        smiles: list[str],
        input_ids: list[list[int]],
        randomise: bool = False,
        mask_seed: int | None = None,
    ):
        self.smiles = smiles
        self.input_ids = input_ids
        self.randomise = randomise
        self.mask_seed = mask_seed

    def __len__(self) -> int:
        return len(self.smiles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[index]}
        if self.randomise:
            item["smiles"] = self.smiles[index]
        if self.mask_seed is not None:
            item["mask_seed"] = self.mask_seed + index
        return item


def encode_smiles(
    smiles: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    randomise: bool = False,
    mask_seed: int | None = None,
) -> EncodedSmiles:
    ids = tokenizer(smiles, truncation=True, max_length=max_seq_length)["input_ids"] if smiles else []
    return EncodedSmiles(smiles, ids, randomise=randomise, mask_seed=mask_seed)


class SmilesMlmCollator:
    """Masks a batch as `DataCollatorForLanguageModeling` does, after re-writing enumerated molecules.

    Examples that carry `smiles` are re-encoded from a random SMILES; the enumeration seed is drawn from
    torch's RNG, so it follows `set_seed` and differs per epoch and per dataloader worker. In a batch whose
    examples all carry `mask_seed`, each example is masked from its own seed, so an evaluation molecule
    gets the same masks whatever batch, position or worker it lands in (samplers may reorder eval sets).
    """

    def __init__(self, masking: DataCollatorForLanguageModeling, max_seq_length: int):
        """`masking` (mlm=True) carries the tokenizer and masking options, so they are stated once."""
        self.masking = masking
        self.tokenizer = masking.tokenizer
        self.max_seq_length = max_seq_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": example["input_ids"]} for example in examples]
        to_randomise = [i for i, example in enumerate(examples) if "smiles" in example]
        if to_randomise:
            variants = randomised_smiles([examples[i]["smiles"] for i in to_randomise], draw_seed())
            encoded = self.tokenizer(variants, truncation=True, max_length=self.max_seq_length)["input_ids"]
            for i, ids in zip(to_randomise, encoded, strict=True):
                features[i] = {"input_ids": ids}
        if all("mask_seed" in example for example in examples):
            return self._mask_each_from_its_seed(features, [example["mask_seed"] for example in examples])
        return self._mask(features)

    def _mask(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Mask as transformers does, but never put a special token at a random-replacement position.

        transformers draws random replacements from the whole vocabulary, so a real position can become
        `<pad>`; its embedding is the all-zero padding row, the layer inputs there are constant, and with the
        checkpoint's LayerNorm eps of 1e-12 the backward pass overflows to NaN. Such draws are redrawn from
        the ordinary tokens.
        """
        batch = self.masking(features)
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids) - {self.tokenizer.mask_token_id}))
        bad = (batch["labels"] != -100) & torch.isin(batch["input_ids"], special)
        if bad.any():
            ordinary = torch.tensor(
                [i for i in range(len(self.tokenizer)) if i not in set(self.tokenizer.all_special_ids)]
            )
            batch["input_ids"][bad] = ordinary[torch.randint(len(ordinary), (int(bad.sum()),))]
        return batch

    def _mask_each_from_its_seed(self, features: list[dict], seeds: list[int]) -> dict[str, torch.Tensor]:
        rows = []
        for feature, seed in zip(features, seeds, strict=True):
            with torch.random.fork_rng(devices=[]):
                # only the CPU generator, which the masking draws from; CUDA dropout and redraws stay as they are
                torch.default_generator.manual_seed(seed)
                rows.append(self._mask([feature]))
        length = max(row["input_ids"].shape[1] for row in rows)
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        left = self.tokenizer.padding_side == "left"

        def stacked(key: str) -> torch.Tensor:
            padded = []
            for row in rows:
                missing = length - row[key].shape[1]
                padded.append(
                    nn.functional.pad(row[key], (missing, 0) if left else (0, missing), value=fill[key])
                )
            return torch.cat(padded)

        return {key: stacked(key) for key in fill}


def mlm_collator(
    tokenizer: PreTrainedTokenizerBase,
    data_args: MlmDataArguments,
    pad_to_multiple_of: int | None = None,
) -> SmilesMlmCollator:
    """The collator exactly as the script configures it (the tests check its masking statistics)."""
    masking = DataCollatorForLanguageModeling(
        tokenizer=tokenizer,
        mlm=True,
        mlm_probability=data_args.mlm_probability,
        mask_replace_prob=data_args.mask_replace_prob,
        random_replace_prob=data_args.random_replace_prob,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return SmilesMlmCollator(masking, data_args.max_seq_length)


def load_tokenizer(
    model_args: MlmModelArguments, data_args: MlmDataArguments, train_smiles: list[str], seed: int
) -> PreTrainedTokenizerBase:
    """The checkpoint's (or --tokenizer_name's) tokenizer, or a vocabulary built from the training SMILES."""
    if not model_args.build_tokenizer_from_corpus:
        name = model_args.tokenizer_name or model_args.model_name_or_path
        if name is None:
            raise ValueError("No tokenizer: set tokenizer_name, or build_tokenizer_from_corpus=true.")
        return AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
    vocabulary_corpus = list(train_smiles)
    if data_args.smiles_enumeration:
        # random SMILES use tokens canonical ones rarely need (e.g. more ring-closure digits)
        vocabulary_corpus += randomised_smiles(train_smiles, seed)
    tokenizer = MolformerTokenizer.from_smiles(
        vocabulary_corpus, min_frequency=model_args.min_token_frequency
    )
    logger.info(
        "Vocabulary of %d tokens built from %d training molecules.", len(tokenizer), len(train_smiles)
    )
    return tokenizer


def load_model(
    model_args: MlmModelArguments, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> PreTrainedModel:
    """The checkpoint's MLM model, or a new one from the config sized to the tokenizer."""
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    if model_args.model_name_or_path is not None:
        check_weights(model_args.model_name_or_path)  # a corrupt file is named, not a bare SafetensorError
        model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path, **hub)
        logger.info(
            "Model %s: %s parameters, all trained.",
            model_args.model_name_or_path,
            f"{model.num_parameters():,}",
        )
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but {model_args.model_name_or_path} only "
                f"{model.config.vocab_size} embeddings; use the checkpoint's own tokenizer."
            )
    else:
        config = AutoConfig.from_pretrained(model_args.config_name, **hub)
        config.vocab_size = len(tokenizer)  # one embedding row per token, whatever the config file says
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        model = AutoModelForMaskedLM.from_config(config)
        logger.info(
            "New model from %s: %s parameters.", model_args.config_name, f"{model.num_parameters():,}"
        )
    if max_seq_length > model.config.max_position_embeddings:
        logger.warning(
            "max_seq_length %d exceeds the config's max_position_embeddings %d (rotary positions still work, "
            "but the model never saw such lengths).",
            max_seq_length,
            model.config.max_position_embeddings,
        )
    return model


def preprocess_logits_for_metrics(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted ids: full logits for a whole eval set would not fit in memory."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Accuracy on the masked positions (the loss itself comes from the model)."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    selected = labels != -100
    if not selected.any():
        return {"masked_accuracy": float("nan")}
    return {"masked_accuracy": float((predictions[selected] == labels[selected]).mean())}


def with_perplexity(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """Add `{prefix}_perplexity`, exp of the masked-token loss (inf when it overflows)."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        try:
            metrics[f"{prefix}_perplexity"] = math.exp(loss)
        except OverflowError:
            metrics[f"{prefix}_perplexity"] = float("inf")
    return metrics


def plot_loss_curve(
    log_history: Sequence[dict[str, Any]], initial_metrics: dict[str, float] | None, path: str | os.PathLike
) -> bool:
    """Loss and masked-token accuracy against steps, the starting model at step 0; False when nothing was logged."""
    history = list(log_history)
    if initial_metrics and "eval_initial_loss" in initial_metrics:
        start = {"step": 0, "eval_loss": initial_metrics["eval_initial_loss"]}
        if "eval_initial_masked_accuracy" in initial_metrics:
            start["eval_masked_accuracy"] = initial_metrics["eval_initial_masked_accuracy"]
        history.insert(0, start)
    if not any("loss" in entry or "eval_loss" in entry for entry in history):
        logger.info("No losses were logged; no loss curve written.")
        return False
    from molft import plots  # matplotlib is slow to import: only once results are written

    plots.loss_curves(
        history,
        path,
        metric="eval_masked_accuracy",
        metric_name="masked-token accuracy",
        loss_name="masked-token cross-entropy",
        title="MLM loss",
    )
    return True


def push_output(trainer: Trainer, training_args: TrainingArguments) -> None:
    """Upload the finished folder with this script's model card (Trainer.push_to_hub would replace it)."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=training_args.output_dir,
        commit_message="End of MLM training",
        token=training_args.hub_token,
        ignore_patterns=["_*", "checkpoint-*"],
    )
