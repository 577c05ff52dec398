"""A run's dataset: the options that define it and the one path that prepares it.

run_regression.py prepares, splits and extends the dataset; run_influence.py and run_selection.py must
rebuild it exactly as run_regression.py prepared it, or the indices in its split.json point at other
molecules. Both go through `load_dataset`. The run records its data options (files with their sha256,
the columns it found, the standardisation) in split.json, so RunDataArguments fills every option a reader
does not give from that record: a finished run is enough to rebuild its data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from molft.chem import STANDARDIZE_OPTIONS, check_standardize
from molft.data import load_raw_dataset
from molft.extra_data import load_extra
from molft.files import SPLIT_FILE
from molft.io import read_json
from molft.labels import encode_labels, prepare_frame
from molft.run_record import (
    FILE_OPTIONS,
    SOURCE_OPTIONS,
    check_file_unchanged,
    data_record,
    recorded_data_options,
)
from molft.splits import SPLIT_NAMES, SplitResult, load_split, make_split, split_frames
from molft.tasks import Task, split_params
from molft.weights import WEIGHT_MAPPINGS

logger = logging.getLogger(__name__)

PRESPLIT_SOURCE = "pre-split files"  # the `source` parameter of the split of data that came already split
DEFAULT_DATASET = "lipophilicity"
STANDARDIZE_CHOICES = [*STANDARDIZE_OPTIONS, "none"]
STANDARDIZE_HELP = (
    "Standardise every molecule of the run (all splits, extra, predict and pool molecules) with RDKit: "
    "fragment_neutral (largest fragment, neutralised) | tautomer (that, then the canonical tautomer) | none."
)


class DatasetOptions(Protocol):
    """Where a run's molecules come from: what RegressionDataArguments and RunDataArguments share."""

    dataset_name: str | None
    dataset_config_name: str | None
    train_file: str | None
    validation_file: str | None
    test_file: str | None
    smiles_column: str | None
    label_column: str | None
    strict_smiles: bool
    standardize: str | None


@dataclass
class RegressionDataArguments:
    """The data options of run_regression.py: the dataset, its split, and the molecules added to train."""

    dataset_name: str | None = field(
        default="lipophilicity",
        metadata={
            "help": "'lipophilicity' or 'esol' (the copies embedded in the chemloader package; each falls back "
            "to its Hub copy, scikit-fingerprints/MoleculeNet_Lipophilicity or _ESOL) or any Hub dataset id. "
            "Ignored when --train_file is given."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(
        default=None, metadata={"help": "csv/tsv/json/jsonl/parquet with SMILES and labels."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Optional pre-split validation file."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Optional pre-split test file."})
    smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column (default: found by name)."}
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Label column (default: found by name); 'a,b,c': one output per column."},
    )
    strict_smiles: bool = field(
        default=False, metadata={"help": "Error on invalid SMILES instead of dropping them."}
    )
    standardize: str | None = field(
        default=None, metadata={"help": STANDARDIZE_HELP, "choices": STANDARDIZE_CHOICES}
    )
    split: str = field(
        default="random",
        metadata={
            "help": "random | scaffold | stratified | predefined | butina | maxmin | molecular_weight | "
            "fingerprint. Ignored with --split_file or pre-split files."
        },
    )
    split_fractions: str = field(default="0.8,0.1,0.1", metadata={"help": "train,validation,test fractions."})
    split_seed: int = field(
        default=42, metadata={"help": "Seed of the split, separate from --seed so seeds vary on one split."}
    )
    split_column: str | None = field(
        default=None,
        metadata={"help": "Column with train/validation/test labels (implies --split predefined)."},
    )
    split_file: str | None = field(
        default=None,
        metadata={
            "help": "Reuse a split.json (checked against the data) or a JSON index file of row numbers."
        },
    )
    extra_train_file: str | None = field(
        default=None,
        metadata={"help": "External molecules (e.g. a selection) added to the training split only."},
    )
    extra_smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column of the extra file."}
    )
    extra_label_column: str | None = field(
        default=None, metadata={"help": "Label column(s) of the extra file (default: the dataset's)."}
    )
    keep_extra_overlap: bool = field(
        default=False,
        metadata={
            "help": "Keep extra molecules that also sit in validation/test (default: report and drop)."
        },
    )
    extra_train_weights: str | None = field(
        default=None,
        metadata={
            "help": "Column of the extra file with per-molecule values turned into loss weights "
            "(see --weight_mapping). Dataset molecules get weight 1."
        },
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
    train_order: str = field(
        default="random",
        metadata={
            "help": "random: the Trainer shuffles train + extra molecules from --seed every epoch | fixed: the "
            "split's molecules in one order drawn from --seed, each extra molecule at a place drawn from its "
            "SMILES and --seed, the same every epoch, no length grouping; runs that differ only in their extra "
            "molecules then see the split's molecules in the same order (LDS retraining: --lds_retrain_args "
            "'--train_order fixed')."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Debug: cap the training set."})
    predict_file: str | None = field(
        default=None, metadata={"help": "Unlabelled SMILES to predict (csv/json/parquet), with --do_predict."}
    )

    def __post_init__(self) -> None:
        self.standardize = check_standardize(self.standardize)


@dataclass
class RunDataArguments:
    """The run's dataset, rebuilt as run_regression.py prepares it, so split.json indexes it.

    Options left unset are read from what the run recorded; a data source given here (a dataset or a
    file) replaces the run's source.
    """

    split_file: str | None = field(
        default=None,
        metadata={
            "help": "The run's split.json (checked against the data). Default: <model_name_or_path>/split.json."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Dataset of the run. Default: the run's recorded data, else {DEFAULT_DATASET}. "
            "Ignored with --train_file."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(
        default=None, metadata={"help": "The run's --train_file (default: the one the run recorded)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "The run's --validation_file."})
    test_file: str | None = field(default=None, metadata={"help": "The run's --test_file."})
    smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column of the run's data (default: the one the run used)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column of the run's data (default: the one the run used)."}
    )
    strict_smiles: bool | None = field(
        default=None, metadata={"help": "The run's --strict_smiles (default: the run's)."}
    )
    standardize: str | None = field(
        default=None,
        metadata={"help": "The run's --standardize (default: the run's).", "choices": STANDARDIZE_CHOICES},
    )

    def __post_init__(self) -> None:
        check_standardize(self.standardize)  # "none" stays as given until `fill_from_run`: it is not unset

    def use_model_split(self, model_name_or_path: str | None, required: bool) -> None:
        """Without --split_file, take the split.json that run_regression.py wrote beside the model.

        `required`: a missing file is an error (influence has no meaning without the run's training set);
        otherwise the split stays unset and the caller does without one.
        """
        if self.split_file:
            return
        candidate = Path(model_name_or_path) / SPLIT_FILE if model_name_or_path else None
        if candidate is not None and candidate.is_file():
            logger.info("Using the model's split %s (pass --split_file to choose another).", candidate)
            self.split_file = str(candidate)
        elif required:
            raise FileNotFoundError(
                f"No --split_file given and {candidate or 'no model'} holds no split.json: pass the split.json "
                "of the run that trained this model, so training, query and test molecules are the run's own."
            )

    def fill_from_run(self) -> None:
        """Set the options left unset to the run's (split.json, or the run_config.json beside it).

        A data source given here (a dataset or any file) replaces the run's whole source; columns, strict
        and standardisation are still the run's unless given. A recorded data file must still be the one
        the run read: a missing or changed file is an error naming it.
        """
        if not self.split_file:
            raise ValueError("No split file: give --split_file (the run's split.json).")
        recorded, hashes, where = recorded_data_options(self.split_file)
        own_source = any(getattr(self, name) is not None for name in SOURCE_OPTIONS)
        taken = {}
        for name, value in recorded.items():
            if own_source and name in SOURCE_OPTIONS:
                continue
            if getattr(self, name) is None and value is not None:
                setattr(self, name, value)
                taken[name] = value
        if taken:
            logger.info("The run's data options, from %s: %s", where, taken)
        for name, digest in hashes.items():
            if name in taken:
                check_file_unchanged(name, taken[name], digest, where)
        if self.dataset_name is None and not any(getattr(self, name) for name in FILE_OPTIONS):
            self.dataset_name = DEFAULT_DATASET
        self.strict_smiles = bool(self.strict_smiles)
        self.standardize = check_standardize(self.standardize)

    def load_frames(self) -> dict[str, pd.DataFrame]:
        """The run's train/validation/test frames; `split_file` must be set.

        The split records a fingerprint of the prepared data, so other data is an error.
        """
        self.fill_from_run()
        dataset, _, source, _ = load_dataset(self)
        try:
            split = load_split(self.split_file, dataset)
        except ValueError as err:
            raise ValueError(
                f"{err} Give the run's own data options (--dataset_name/--train_file, columns) or its split.json."
            ) from err
        logger.info("Split %s of %s: %s", self.split_file, source, split.sizes)
        return split_frames(dataset, split)


@dataclass
class PreparedData:
    """Checked molecules, their split, and the training frame with any external molecules added."""

    dataset: pd.DataFrame  # the prepared molecules that `split` indexes
    split: SplitResult
    frames: dict[str, pd.DataFrame]  # train (with extra molecules), validation, test
    source: str
    extra: pd.DataFrame | None = None
    extra_report: dict[str, Any] = field(default_factory=dict)
    # the columns found ({"smiles_column": ..., "label_column": ...}), and where the data came from (with
    # file hashes), both recorded in split.json
    columns: dict[str, str | None] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def is_presplit(self) -> bool:
        """The data came already split, so no split.json is needed to rebuild the run's split."""
        return self.split.params.get("source") == PRESPLIT_SOURCE

    @property
    def label_name(self) -> str:
        """What the label is, for plots and cards: logD for Lipophilicity, logS for ESOL, else the label column."""
        name = str(self.record.get("dataset_name") or "").lower()
        known = [unit for key, unit in (("lipophilicity", "logD"), ("esol", "logS")) if key in name]
        return known[0] if known else self.columns.get("label_column") or "label"

    def resolved_options(self, data_args: RegressionDataArguments) -> dict[str, Any]:
        """The run's data options for run_config.json, with the columns actually used (not the flags)."""
        return {**dataclasses.asdict(data_args), **self.columns}


def load_dataset(
    options: DatasetOptions, keep_columns: Sequence[str] = (), task: Task | None = None
) -> tuple[pd.DataFrame, SplitResult | None, str, dict[str, str | None]]:
    """The prepared dataset (every SMILES and label checked), where the data came from, and its columns.

    Data that come already split are concatenated in train, validation, test order and returned with
    that predefined split; otherwise the split is None (the caller makes or loads one). The columns are
    the ones found (None where the parts of pre-split data name them differently). `task`: molft.tasks.
    """
    raw = load_raw_dataset(
        None if options.train_file else options.dataset_name,
        train_file=options.train_file,
        validation_file=options.validation_file,
        test_file=options.test_file,
        dataset_config_name=options.dataset_config_name,
    )
    prepared, found, sources = {}, {"smiles_column": set(), "label_column": set()}, {}
    for name, frame in raw.frames.items():
        sources[name] = f"{raw.source} [{name}]"
        prepared[name], smiles_col, label_cols = prepare_frame(
            frame,
            task,
            source=sources[name],
            smiles_option=options.smiles_column,
            label_option=options.label_column,
            default_label=raw.label_column,
            strict=bool(options.strict_smiles),
            keep_columns=keep_columns,
            standardize=options.standardize,
        )
        found["smiles_column"].add(smiles_col)
        found["label_column"].add(",".join(label_cols))
    prepared = encode_labels(prepared, task, label_cols, sources)
    columns = {key: next(iter(names)) if len(names) == 1 else None for key, names in found.items()}
    if not raw.is_presplit:
        return prepared["all"], None, raw.source, columns
    missing = [name for name in SPLIT_NAMES if name not in prepared]
    if missing:
        raise ValueError(
            f"Pre-split data needs train, validation and test parts; missing {missing} "
            "(give --validation_file and --test_file, or only --train_file to split it here)."
        )
    dataset = pd.concat([prepared[name] for name in SPLIT_NAMES], ignore_index=True)
    bounds = np.cumsum([0] + [len(prepared[name]) for name in SPLIT_NAMES])
    split = SplitResult(
        *(np.arange(bounds[i], bounds[i + 1]) for i in range(3)),
        method="predefined",
        params={"source": PRESPLIT_SOURCE},
    )
    dataset.attrs = dict(prepared["train"].attrs)  # the standardisation, which save_split records
    return dataset, split, raw.source, columns


def prepare_data(
    data_args: RegressionDataArguments, reuse_split: Path | None = None, task: Task | None = None
) -> PreparedData:
    """Load, check and split the dataset, then add external molecules to the training split."""
    dataset, split, source, columns = load_and_split(data_args, reuse_split, task)
    frames = split_frames(dataset, split)
    for name, frame in frames.items():
        if frame.empty:
            raise ValueError(
                f"The {name} split is empty; check the split fractions, split column or split file."
            )
        frame["split"] = name
        frame["source"] = "dataset"
    report_cross_split_duplicates(frames)
    extra, extra_report = None, {}
    if data_args.extra_train_file:
        extra, extra_report = load_extra(data_args, frames, task)
        frames["train"] = pd.concat([frames["train"], extra], ignore_index=True)
    if data_args.max_train_samples is not None:
        frames["train"] = frames["train"].iloc[: data_args.max_train_samples].reset_index(drop=True)
    record = data_record(data_args)
    return PreparedData(dataset, split, frames, source, extra, extra_report, columns, record)


def load_and_split(
    data_args: RegressionDataArguments, reuse_split: Path | None, task: Task | None = None
) -> tuple[pd.DataFrame, SplitResult, str, dict[str, str | None]]:
    """The prepared dataset (all molecules, checked), its split, where the data came from, its columns."""
    keep = [data_args.split_column] if data_args.split_column else []
    dataset, presplit, source, columns = load_dataset(data_args, keep_columns=keep, task=task)
    if presplit is not None:
        if data_args.split_file:
            logger.warning("--split_file is ignored: the data come already split (%s).", source)
        return dataset, presplit, source, columns

    split_file = data_args.split_file or (str(reuse_split) if reuse_split and reuse_split.is_file() else None)
    if split_file and is_split_json(split_file):
        split = load_split(split_file, dataset)
        logger.info("Reusing the %s split in %s: %s", split.method, split_file, split.sizes)
    elif split_file:
        split = make_split(dataset, "predefined", split_file=split_file)
    elif data_args.split_column or data_args.split == "predefined":
        if data_args.split not in ("random", "predefined"):
            raise ValueError(
                f"--split_column gives a predefined split; it cannot be combined with --split {data_args.split}."
            )
        split = make_split(dataset, "predefined", split_column=data_args.split_column)
    else:
        try:
            fractions = tuple(float(x) for x in data_args.split_fractions.split(","))
        except ValueError as err:
            raise ValueError(
                f"--split_fractions wants 'train,validation,test', got {data_args.split_fractions!r}."
            ) from err
        params = split_params(task, data_args.split)
        split = make_split(dataset, data_args.split, fractions=fractions, seed=data_args.split_seed, **params)
    return dataset, split, source, columns


def is_split_json(path: str | os.PathLike) -> bool:
    """A split.json written by molft (as opposed to a plain file of row numbers per split)."""
    content = read_json(path)
    return isinstance(content, dict) and "dataset_fingerprint" in content


def report_cross_split_duplicates(frames: dict[str, pd.DataFrame]) -> None:
    """Warn when one molecule sits in train and in a held-out split (e.g. repeated measurements)."""
    train = set(frames["train"]["canonical_smiles"])
    for name in ("validation", "test"):
        shared = frames[name]["canonical_smiles"][frames[name]["canonical_smiles"].isin(train)]
        if len(shared):
            logger.warning(
                "%d %s molecules also occur in train (duplicates in the data), e.g. %s",
                len(shared),
                name,
                "; ".join(shared.iloc[:3]),
            )
