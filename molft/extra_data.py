"""External molecules for a run's training split (`--extra_train_file`): checked, kept off held-out splits,
weighted.

An external molecule that also sits in the validation or test split would score the model on what it trained on,
so it is reported and dropped (unless --keep_extra_overlap); one already in train is kept as an extra row and
counted; weights come from a column of the file, mapped by molft.weights, with bad values named by file row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from molft.data import read_table
from molft.labels import prepare_extra
from molft.overlap import drop_overlap
from molft.tasks import Task
from molft.weights import map_weights

if TYPE_CHECKING:
    from molft.run_data import RegressionDataArguments

logger = logging.getLogger(__name__)


def load_extra(
    data_args: RegressionDataArguments, frames: dict[str, pd.DataFrame], task: Task | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """External molecules for the training split: checked, de-duplicated against held-out splits, weighted."""
    path = data_args.extra_train_file
    table = read_table(path)
    keep = [data_args.extra_train_weights] if data_args.extra_train_weights else []
    extra = prepare_extra(
        table,
        task,
        source=path,
        smiles_option=data_args.extra_smiles_column,
        label_option=data_args.extra_label_column,
        strict=data_args.strict_smiles,
        keep_columns=keep,
        standardize=data_args.standardize,
    )
    n_valid = len(extra)
    extra, overlap = drop_overlap(
        extra,
        {"validation": frames["validation"], "test": frames["test"]},
        drop=not data_args.keep_extra_overlap,
    )
    in_train = extra["canonical_smiles"].isin(set(frames["train"]["canonical_smiles"]))
    if in_train.any():
        logger.warning(
            "%d extra molecules are already in the training split (kept as extra rows).", int(in_train.sum())
        )
    if extra.empty:
        raise ValueError(
            f"No extra molecules are left from {path} after checks (overlap with held-out splits: {overlap})."
        )
    extra["split"] = "train"
    extra["source"] = f"extra:{Path(path).name}"
    if data_args.extra_train_weights:
        extra["sample_weight"] = extra_weights(extra, data_args)
        frames["train"]["sample_weight"] = 1.0
    report = {
        "extra_train_file": str(path),
        "n_rows": len(table),
        "n_valid": n_valid,
        "n_added": len(extra),
        "overlap_with_heldout": overlap,
        "already_in_train": int(in_train.sum()),
        "weights": data_args.extra_train_weights
        and {"column": data_args.extra_train_weights, "mapping": data_args.weight_mapping},
    }
    logger.info("Added %d external molecules from %s to the training split.", len(extra), path)
    return extra, report


def extra_weights(extra: pd.DataFrame, data_args: RegressionDataArguments) -> np.ndarray:
    """Loss weights of the extra molecules from their --extra_train_weights column (errors name file rows)."""
    column, path = data_args.extra_train_weights, data_args.extra_train_file
    values = pd.to_numeric(extra[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{path}: weight column {column!r} is missing or not numeric at rows {extra['row'][bad].tolist()[:10]}."
        )
    if data_args.weight_mapping == "identity" and (values < 0).any():
        raise ValueError(
            f"{path}: weight column {column!r} is negative at rows {extra['row'][values < 0].tolist()[:10]}; "
            "identity weights must be >= 0 (map scores with clip or a softmax mapping)."
        )
    return map_weights(values, data_args.weight_mapping, temperature=data_args.weight_temperature)
