"""Masked-language-model training of MoLFormer on SMILES: pretraining from scratch or continued (domain) training.

The output folder is a complete checkpoint (MLM weights, tokenizer, config) that `run_regression.py
--model_name_or_path` loads directly; only the regression head is then newly initialised.

    python run_mlm.py configs/mlm_pretrain_small.yaml               # from scratch on the unlabeled corpus
    python run_mlm.py configs/mlm_adapt_lipophilicity.yaml          # continued on Lipophilicity TRAIN molecules
    python run_mlm.py configs/mlm_pretrain_small.yaml --bf16 true   # flags after the file override it

Molecules of held-out splits (`--split_file`, `--exclude_files`) are never trained on: they are removed from the
training corpus by canonical SMILES, and the overlap is logged and recorded in `mlm_data_summary.json`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
from matplotlib.figure import Figure
from rdkit import Chem
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    EarlyStoppingCallback,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import modeling_molformer  # noqa: F401  (registers model_type "molformer" with the Auto classes)
from molft.cli import parse_args
from molft.data import (
    SMILES_CANDIDATES,
    dataset_fingerprint,
    drop_overlap,
    find_column,
    load_raw_dataset,
    prepare_molecules,
    read_table,
)
from molft.io import DONE_MARKER, is_done, mark_done, save_figure, write_json, write_text
from molft.splits import read_split_smiles
from tokenization_molformer import MolformerTokenizer

logger = logging.getLogger(__name__)

PLAIN_SMILES_SUFFIXES = (".txt", ".smi")
DATA_SUMMARY_FILE = "mlm_data_summary.json"
LOSS_CURVE_FILE = "mlm_loss_curve.png"
_MAX_SEED = 2**31 - 1
_CARD_METRIC_SUFFIXES = ("_loss", "_perplexity", "_masked_accuracy")
_CARD_METRICS = ("epoch", "train_samples", "eval_samples")


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a MoLFormer MLM checkpoint to continue from; leave unset to "
            "train from scratch with --config_name."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Model config (a JSON file such as configs/molformer-small.json, or a folder) for "
            "training from scratch."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (Hub id or folder) if not the one of model_name_or_path."}
    )
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
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit of the model."})

    def __post_init__(self) -> None:
        if self.build_tokenizer_from_corpus is None:
            self.build_tokenizer_from_corpus = self.model_name_or_path is None and self.tokenizer_name is None
        if self.build_tokenizer_from_corpus and self.model_name_or_path is not None:
            raise ValueError(
                "build_tokenizer_from_corpus=true with model_name_or_path would give the pretrained embeddings a "
                "different vocabulary; continue with the checkpoint's tokenizer instead."
            )
        if self.model_name_or_path is None and self.config_name is None:
            raise ValueError(
                "Set model_name_or_path (continue training) or config_name (train from scratch)."
            )
        if self.min_token_frequency < 1:
            raise ValueError(f"min_token_frequency must be >= 1, got {self.min_token_frequency}.")


@dataclass
class DataTrainingArguments:
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
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many molecules."})
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


@dataclass
class MlmCorpus:
    """Canonical SMILES to train and evaluate on, and a record of how they were chosen."""

    train: list[str]
    validation: list[str]
    summary: dict[str, Any]


def read_smiles_file(
    path: str | os.PathLike, smiles_column: str | None = None, strict: bool = False
) -> pd.DataFrame:
    """A SMILES file as a prepared frame (`smiles`, `canonical_smiles`, `row`); unparseable rows dropped or fatal."""
    path = Path(path)
    if path.suffix.lower() in PLAIN_SMILES_SUFFIXES:
        table = _read_plain_smiles(path)
    else:
        try:
            table = read_table(path)
        except pd.errors.EmptyDataError as err:
            raise ValueError(f"SMILES file {path} is empty.") from err
    if table.empty:
        raise ValueError(f"SMILES file {path} holds no rows (columns: {[str(c) for c in table.columns]}).")
    column = find_column(table, smiles_column, SMILES_CANDIDATES, "SMILES", str(path))
    return prepare_molecules(table, column, None, source=str(path), strict=strict, require_labels=False)


def _read_plain_smiles(path: Path) -> pd.DataFrame:
    # one molecule per line; a .smi line may carry a name after whitespace; a header line is allowed
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    lines = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if lines and lines[0].lower() in {c.lower() for c in SMILES_CANDIDATES}:
        lines = lines[1:]
    return pd.DataFrame({"smiles": lines})


def training_frame(
    data_args: DataTrainingArguments, cache_dir: str | None = None
) -> tuple[pd.DataFrame, dict]:
    """All molecules the run may learn from, before held-out molecules are removed."""
    sources: dict[str, dict[str, int]] = {}
    frames = []
    if data_args.dataset_name is not None:
        frame = split_train_molecules(data_args.dataset_name, data_args.split_file, cache_dir)
        sources[f"{data_args.dataset_name} (train split of {data_args.split_file})"] = {
            "molecules": len(frame)
        }
        frames.append(frame)
    elif data_args.train_file is not None:
        frame = read_smiles_file(data_args.train_file, data_args.smiles_column, data_args.strict_smiles)
        sources[str(data_args.train_file)] = {"molecules": len(frame)}
        frames.append(frame)
    else:
        raise ValueError("No training corpus: set train_file, or dataset_name together with split_file.")
    if data_args.include_file is not None:
        extra = read_smiles_file(data_args.include_file, data_args.smiles_column, data_args.strict_smiles)
        sources[str(data_args.include_file)] = {"molecules": len(extra)}
        frames.append(extra)
    return pd.concat(frames, ignore_index=True)[["canonical_smiles"]], sources


def split_train_molecules(dataset_name: str, split_file: str, cache_dir: str | None = None) -> pd.DataFrame:
    """The dataset's molecules that the split.json puts in its train split (checks the split fits the data)."""
    raw = load_raw_dataset(dataset_name, cache_dir=cache_dir)
    table = pd.concat(raw.frames.values(), ignore_index=True)
    column = find_column(table, None, SMILES_CANDIDATES, "SMILES", raw.source)
    molecules = prepare_molecules(table, column, None, source=raw.source, require_labels=False)
    train = set(read_split_smiles(split_file)["train"])
    frame = molecules[molecules["canonical_smiles"].isin(train)]
    missing = len(train - set(frame["canonical_smiles"]))
    if frame.empty:
        raise ValueError(
            f"None of the train molecules of {split_file} are in {raw.source}; is it a split of it?"
        )
    if missing:
        logger.warning(
            "%d train molecules of %s are not in %s; they are not used.", missing, split_file, raw.source
        )
    logger.info("Corpus: %d training molecules of %s (split %s).", len(frame), raw.source, split_file)
    return frame


def heldout_frames(data_args: DataTrainingArguments) -> dict[str, pd.DataFrame]:
    """Held-out molecule sets by name: the split's validation/test plus every exclude file."""
    paths = ([data_args.split_file] if data_args.split_file else []) + list(data_args.exclude_files)
    heldout: dict[str, pd.DataFrame] = {}
    for path in paths:
        if str(path).lower().endswith(".json"):
            split = read_split_smiles(path)
            for name in ("validation", "test"):
                heldout[f"{path} ({name})"] = pd.DataFrame({"canonical_smiles": split[name]})
        else:
            heldout[str(path)] = read_smiles_file(path)[["canonical_smiles"]]
    return heldout


def prepare_corpus(data_args: DataTrainingArguments, seed: int, cache_dir: str | None = None) -> MlmCorpus:
    """Read, clean, de-leak, deduplicate and split the molecules; record every count on the way."""
    corpus, sources = training_frame(data_args, cache_dir)
    summary: dict[str, Any] = {"sources": sources, "n_read": len(corpus)}
    heldout = heldout_frames(data_args)
    if heldout:
        corpus, overlap = drop_overlap(corpus, heldout)
        summary["heldout_sets"] = {name: len(frame) for name, frame in heldout.items()}
        summary["heldout_overlap"] = overlap
        logger.info("Held-out check: %d training molecules removed (%s).", overlap["dropped"], overlap)
        if corpus.empty:
            raise ValueError(
                "Every training molecule belongs to a held-out set; nothing is left to train on."
            )
    unique = corpus["canonical_smiles"].drop_duplicates()
    summary["duplicates_dropped"] = len(corpus) - len(unique)
    if summary["duplicates_dropped"]:
        logger.info("Dropped %d repeated molecules from the corpus.", summary["duplicates_dropped"])
    molecules = unique.to_numpy()[np.random.default_rng(seed).permutation(len(unique))].tolist()
    summary["n_corpus"] = len(molecules)
    summary["corpus_fingerprint"] = dataset_fingerprint(sorted(molecules))

    if data_args.validation_file is not None:
        validation = read_smiles_file(
            data_args.validation_file, data_args.smiles_column, data_args.strict_smiles
        )
        validation_smiles = validation["canonical_smiles"].drop_duplicates().tolist()
        held_out = set(validation_smiles)
        train = [smi for smi in molecules if smi not in held_out]
        summary["validation_overlap_dropped"] = len(molecules) - len(train)
        if summary["validation_overlap_dropped"]:
            logger.warning(
                "%d training molecules are also in %s; they are evaluated on, not trained on.",
                summary["validation_overlap_dropped"],
                data_args.validation_file,
            )
        if not train:
            raise ValueError(
                f"Every training molecule is in {data_args.validation_file}; nothing to train on."
            )
    else:
        n_validation = math.ceil(len(molecules) * data_args.validation_split_percentage / 100)
        if n_validation >= len(molecules):
            raise ValueError(
                f"The corpus has {len(molecules)} molecules: too few to hold out "
                f"{data_args.validation_split_percentage}% for validation and still train."
            )
        validation_smiles, train = molecules[:n_validation], molecules[n_validation:]
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        validation_smiles = validation_smiles[: data_args.max_eval_samples]
    summary.update(n_train=len(train), n_validation=len(validation_smiles))
    logger.info("Corpus: %d training and %d validation molecules.", len(train), len(validation_smiles))
    return MlmCorpus(train=train, validation=validation_smiles, summary=summary)


def randomised_smiles(smiles: Sequence[str], seed: int) -> list[str]:
    """One random (non-canonical) SMILES per molecule: a new atom order and branch order per seed."""
    variants = []
    for offset, smi in enumerate(smiles):
        mol = Chem.MolFromSmiles(smi)
        if mol is None:  # cannot happen for RDKit canonical SMILES; keep the string rather than lose a row
            variants.append(smi)
            continue
        # RDKit treats seed 0 as "unseeded", so seeds live in [1, 2**31 - 1)
        variants.append(
            Chem.MolToRandomSmilesVect(mol, 1, randomSeed=(seed + offset) % (_MAX_SEED - 1) + 1)[0]
        )
    return variants


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

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_length: int,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        pad_to_multiple_of: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.masking = DataCollatorForLanguageModeling(
            tokenizer=tokenizer,
            mlm=True,
            mlm_probability=mlm_probability,
            mask_replace_prob=mask_replace_prob,
            random_replace_prob=random_replace_prob,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": example["input_ids"]} for example in examples]
        to_randomise = [i for i, example in enumerate(examples) if "smiles" in example]
        if to_randomise:
            seed = int(torch.randint(1, _MAX_SEED, (1,)).item())
            variants = randomised_smiles([examples[i]["smiles"] for i in to_randomise], seed)
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
    data_args: DataTrainingArguments,
    pad_to_multiple_of: int | None = None,
) -> SmilesMlmCollator:
    """The collator exactly as the script configures it (the tests check its masking statistics)."""
    return SmilesMlmCollator(
        tokenizer,
        data_args.max_seq_length,
        mlm_probability=data_args.mlm_probability,
        mask_replace_prob=data_args.mask_replace_prob,
        random_replace_prob=data_args.random_replace_prob,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def load_tokenizer(
    model_args: ModelArguments, data_args: DataTrainingArguments, train_smiles: list[str], seed: int
) -> PreTrainedTokenizerBase:
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
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> PreTrainedModel:
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    if model_args.model_name_or_path is not None:
        model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path, **hub)
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
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    selected = labels != -100
    if not selected.any():
        return {"masked_accuracy": float("nan")}
    return {"masked_accuracy": float((predictions[selected] == labels[selected]).mean())}


def with_perplexity(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        try:
            metrics[f"{prefix}_perplexity"] = math.exp(loss)
        except OverflowError:
            metrics[f"{prefix}_perplexity"] = float("inf")
    return metrics


def detect_last_checkpoint(training_args: TrainingArguments, data_args: DataTrainingArguments) -> str | None:
    """Resume an interrupted run; refuse to mix a new run into a folder holding another one."""
    output_dir = Path(training_args.output_dir)
    if not (training_args.do_train and output_dir.is_dir() and any(output_dir.iterdir())):
        return None
    if data_args.overwrite_output_dir:
        (output_dir / DONE_MARKER).unlink(missing_ok=True)  # a stale marker would claim the new run finished
        return None
    if is_done(output_dir):
        raise ValueError(
            f"Output directory {output_dir} already holds a finished run ({DONE_MARKER}); "
            "use --overwrite_output_dir true or another output_dir."
        )
    last_checkpoint = get_last_checkpoint(str(output_dir))
    if last_checkpoint is None:
        raise ValueError(
            f"Output directory {output_dir} is not empty and holds no checkpoint to resume; "
            "use --overwrite_output_dir true or another output_dir."
        )
    if training_args.resume_from_checkpoint is None:
        logger.info("Checkpoint detected, resuming training at %s.", last_checkpoint)
    return last_checkpoint


def plot_loss_curve(
    log_history: list[dict[str, Any]], initial_metrics: dict[str, float] | None, path: str | os.PathLike
) -> bool:
    """Loss (train and eval) and masked-token accuracy against steps; False when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    accuracy = [(e["step"], e["eval_masked_accuracy"]) for e in log_history if "eval_masked_accuracy" in e]
    if initial_metrics and "eval_initial_loss" in initial_metrics:
        evaluation.insert(0, (0, initial_metrics["eval_initial_loss"]))
        if "eval_initial_masked_accuracy" in initial_metrics:
            accuracy.insert(0, (0, initial_metrics["eval_initial_masked_accuracy"]))
    if not (train or evaluation):
        logger.info("No losses were logged; no loss curve written.")
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    for points, label, style in ((train, "train", "-"), (evaluation, "eval", "o-")):
        if points:
            loss_ax.plot(*zip(*points, strict=True), style, label=label)
    loss_ax.set(xlabel="step", ylabel="masked-token cross-entropy", title="MLM loss")
    loss_ax.legend()
    if accuracy:
        accuracy_ax.plot(*zip(*accuracy, strict=True), "o-", color="tab:green")
    accuracy_ax.set(xlabel="step", ylabel="accuracy", title="eval masked-token accuracy")
    save_figure(path, fig)
    return True


def model_card(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    model: PreTrainedModel,
    summary: dict[str, Any],
    metrics: dict[str, float],
) -> str:
    start = model_args.model_name_or_path or f"random initialisation ({model_args.config_name})"
    config = model.config
    sources = "\n".join(
        f"- `{name}`: {info['molecules']} molecules" for name, info in summary["sources"].items()
    )
    overlap = summary.get("heldout_overlap", {})
    shown = {k: v for k, v in metrics.items() if k.endswith(_CARD_METRIC_SUFFIXES) or k in _CARD_METRICS}
    metric_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(shown.items()))
    return f"""---
library_name: transformers
tags: [chemistry, smiles, molformer, fill-mask]
---

# MoLFormer masked-language model

Trained with `run_mlm.py` from {start}.

- Architecture: MoLFormer (linear attention, rotary embeddings), hidden {config.hidden_size},
  {config.num_hidden_layers} layers, {config.num_attention_heads} heads, {model.num_parameters():,} parameters,
  vocabulary {config.vocab_size} tokens.
- Masking: {data_args.mlm_probability:.0%} of tokens, of which {data_args.mask_replace_prob:.0%} `<mask>`,
  {data_args.random_replace_prob:.0%} random; SMILES enumeration: {data_args.smiles_enumeration};
  max length {data_args.max_seq_length} tokens.

## Data

{sources}

{summary["n_train"]} training and {summary["n_validation"]} validation molecules after removing invalid SMILES,
duplicates ({summary["duplicates_dropped"]}) and {overlap.get("dropped", 0)} molecules of held-out sets
({", ".join(summary.get("heldout_sets", {})) or "none given"}). Details: `{DATA_SUMMARY_FILE}`.

## Results

| metric | value |
|---|---|
{metric_lines}

## Use

Fine-tune for regression with `python run_regression.py --model_name_or_path <this folder> ...`; the encoder
weights load as they are and only the regression head is newly initialised. SMILES pieces outside the
vocabulary are encoded as `<unk>`.
"""


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


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for name in (__name__, "molft", "tokenization_molformer"):
        logging.getLogger(name).setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def main(args: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments), args
    )
    setup_logging(training_args)
    logger.warning(
        "Process rank: %s, device: %s, n_gpu: %s, distributed: %s, 16-bits: %s",
        training_args.local_process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
        training_args.fp16 or training_args.bf16,
    )
    logger.info("Training/evaluation parameters %s", training_args)
    if data_args.early_stopping_patience is not None and not (
        training_args.load_best_model_at_end and training_args.eval_strategy != "no"
    ):
        raise ValueError("early_stopping_patience needs load_best_model_at_end=true and an eval_strategy.")
    if training_args.remove_unused_columns:
        logger.info(
            "remove_unused_columns set to false: the collator reads the SMILES and mask seeds of items."
        )
        training_args.remove_unused_columns = False
    last_checkpoint = detect_last_checkpoint(training_args, data_args)
    set_seed(training_args.seed)

    corpus = prepare_corpus(data_args, training_args.seed, model_args.cache_dir)
    evaluating = training_args.do_eval or training_args.eval_strategy != "no"
    if evaluating and not corpus.validation:
        raise ValueError(
            "Evaluation needs validation molecules: set validation_file or validation_split_percentage."
        )
    tokenizer = load_tokenizer(model_args, data_args, corpus.train, training_args.seed)
    model = load_model(model_args, tokenizer, data_args.max_seq_length)

    train_dataset = encode_smiles(
        corpus.train, tokenizer, data_args.max_seq_length, randomise=data_args.smiles_enumeration
    )
    eval_dataset = encode_smiles(
        corpus.validation, tokenizer, data_args.max_seq_length, mask_seed=training_args.seed
    )
    half_precision = training_args.fp16 or training_args.bf16
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if evaluating else None,
        processing_class=tokenizer,
        data_collator=mlm_collator(tokenizer, data_args, pad_to_multiple_of=8 if half_precision else None),
        compute_metrics=compute_metrics if evaluating else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if evaluating else None,
    )

    results: dict[str, float] = {}
    initial_metrics = None
    training_history: list[dict[str, Any]] = []
    resuming = training_args.resume_from_checkpoint is not None or last_checkpoint is not None
    if evaluating and data_args.eval_before_training and training_args.do_train and not resuming:
        initial_metrics = with_perplexity(trainer.evaluate(metric_key_prefix="eval_initial"), "eval_initial")
        trainer.log_metrics("eval_initial", initial_metrics)
        trainer.save_metrics("eval_initial", initial_metrics)
        results.update(initial_metrics)
    if data_args.early_stopping_patience is not None:
        # added after the baseline evaluation, whose metric names the callback would not recognise
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))

    if training_args.do_train:
        train_result = trainer.train(
            resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint
        )
        trainer.save_model()  # model, config and tokenizer: a checkpoint run_regression.py loads directly
        train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)
        training_history = list(trainer.state.log_history)  # the curve ends before the final re-evaluation

    if evaluating and training_args.do_eval:
        eval_metrics = with_perplexity(trainer.evaluate(), "eval")
        eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)

    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        write_json(output_dir / DATA_SUMMARY_FILE, corpus.summary)
        if training_args.do_train:
            plot_loss_curve(training_history, initial_metrics, output_dir / LOSS_CURVE_FILE)
            card = model_card(model_args, data_args, trainer.model, corpus.summary, results)
            write_text(output_dir / "README.md", card)
            if training_args.push_to_hub:
                push_output(trainer, training_args)
        mark_done(output_dir, {"script": "run_mlm.py", "metrics": results, "data": corpus.summary})
    return results


if __name__ == "__main__":
    main()
