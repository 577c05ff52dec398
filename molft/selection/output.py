"""What a selection leaves behind: the chosen molecules, the manifest, and the merged training set.

The chosen molecules (`molft.files.SELECTED_FILE`) are what run_regression.py's --extra_train_file reads;
the manifest holds everything needed to reproduce the choice and to check later that it refers to the
same pool. A `Selection` holds positions in the pool frame; the files name pool ids (rows of the pool
file, `molft.selection.pool.pool_ids`), which stay valid when invalid rows were skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from molft import __version__
from molft.files import MANIFEST_FILE, MERGED_TRAIN_FILE, SELECTED_FILE
from molft.io import write_csv, write_json
from molft.overlap import dataset_fingerprint
from molft.selection.pool import canonical_column, pool_ids
from molft.selection.registry import Selection

logger = logging.getLogger(__name__)


def selection_manifest(
    selection: Selection, pool_source: str | os.PathLike, pool_fingerprint: str
) -> dict[str, Any]:
    """Everything needed to reproduce a selection and to check later that it refers to the same pool."""
    return _jsonable(
        {
            "strategy": selection.strategy,
            "params": selection.params,
            "seed": selection.seed,
            "budget": selection.budget,
            "n_selected": len(selection),
            "indices": selection.indices,
            "scores": selection.scores,
            "pool_file": str(pool_source),
            "pool_sha256": pool_fingerprint,
            "info": selection.info,
            "molft_version": __version__,
        }
    )


def selected_frame(pool_frame: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """One row per chosen molecule in pick order: rank, index (pool id), smiles (canonical), label, score.

    The smiles/label columns are the ones run_regression.py's --extra_train_file detects by itself.
    """
    canonical = canonical_column(pool_frame)
    if len(selection) and (selection.indices.min() < 0 or selection.indices.max() >= len(pool_frame)):
        raise ValueError(f"Selection indices fall outside the pool of {len(pool_frame)} molecules.")
    rows = pool_frame.iloc[selection.indices]
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(selection) + 1),
            "index": pool_ids(pool_frame)[selection.indices],
            "smiles": canonical[selection.indices],
        }
    )
    if "label" in pool_frame.columns:
        frame["label"] = rows["label"].to_numpy()
    frame["score"] = selection.scores if selection.scores is not None else np.nan
    return frame


def merge_selected_into_train(
    train_frame: pd.DataFrame,
    pool_frame: pd.DataFrame,
    selection: Selection,
    *,
    smiles_column: str = "smiles",
    label_column: str = "label",
    duplicates: str = "warn",
    source_column: str | None = "source",
) -> pd.DataFrame:
    """Training rows followed by the chosen pool molecules, in the training file's column names.

    Chosen molecules already in the training set (same canonical SMILES): duplicates="warn" keeps them
    and logs, "drop" leaves them out and logs, "error" raises. `source_column` marks rows train/external.
    """
    if duplicates not in ("warn", "drop", "error"):
        raise ValueError(f"duplicates must be 'warn', 'drop' or 'error', got {duplicates!r}.")
    missing = [c for c in (smiles_column, label_column) if c not in train_frame.columns]
    if missing:
        raise ValueError(f"Training frame lacks column(s) {missing}; it has {list(train_frame.columns)}.")
    if "label" not in pool_frame.columns:
        raise ValueError("The pool has no labels, so its molecules cannot be added to the training set.")
    chosen = selected_frame(pool_frame, selection)
    train_canonical = set(canonical_column(train_frame, smiles_column))
    overlap = chosen["smiles"].isin(train_canonical).to_numpy()
    if overlap.any():
        message = (
            f"{int(overlap.sum())} chosen molecules are already in the training set "
            f"(pool indices {chosen['index'][overlap].tolist()[:10]})"
        )
        if duplicates == "error":
            raise ValueError(message + ".")
        if duplicates == "drop":
            logger.warning("%s; leaving them out.", message)
            chosen = chosen[~overlap]
        else:
            logger.warning("%s; keeping them.", message)
    added = pd.DataFrame(
        {smiles_column: chosen["smiles"].to_numpy(), label_column: chosen["label"].to_numpy()}
    )
    train = train_frame.copy()
    if source_column:
        train[source_column] = "train"
        added[source_column] = "external"
    return pd.concat([train, added], ignore_index=True)


def write_selection(
    output_dir: str | os.PathLike,
    pool_frame: pd.DataFrame,
    selection: Selection,
    manifest: dict[str, Any],
    merged_train: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write SELECTED_FILE, MANIFEST_FILE and optionally MERGED_TRAIN_FILE, each atomically."""
    output_dir = Path(output_dir)
    paths = {"selected": output_dir / SELECTED_FILE, "manifest": output_dir / MANIFEST_FILE}
    write_csv(paths["selected"], selected_frame(pool_frame, selection))
    write_json(paths["manifest"], manifest)
    if merged_train is not None:
        paths["merged_train"] = output_dir / MERGED_TRAIN_FILE
        write_csv(paths["merged_train"], merged_train)
    return paths


def run_manifest(
    selection: Selection,
    pool_frame: pd.DataFrame,
    candidates: np.ndarray,
    overlap: dict[str, list[int]],
    *,
    pool_file: str | os.PathLike,
    keep_heldout_overlap: bool,
    split_file: str | None,
    model_name_or_path: str | None,
    scores_file: str | None,
    arguments: Sequence[Any],
) -> dict[str, Any]:
    """The selection manifest plus what the run was given (`arguments`: its dataclass groups) and left out.

    Indices in the manifest are pool ids, as in SELECTED_FILE.
    """
    ids = pool_ids(pool_frame)
    manifest = selection_manifest(
        dataclasses.replace(selection, indices=ids[selection.indices]),
        pool_file,
        dataset_fingerprint(pool_frame["canonical_smiles"].tolist()),
    )
    overlap_ids = {name: ids[positions].tolist() for name, positions in overlap.items()}
    manifest.update(
        {
            "n_pool": len(pool_frame),
            "n_pool_rows": pool_frame.attrs.get("n_rows", len(pool_frame)),
            "n_candidates": len(candidates),
            "heldout_overlap": {**overlap_ids, "excluded": not keep_heldout_overlap and bool(overlap)},
            "split_file": split_file,
            "model_name_or_path": model_name_or_path,
            "scores_file": scores_file if selection.strategy == "influence" else None,
            "arguments": {type(group).__name__: dataclasses.asdict(group) for group in arguments},
        }
    )
    return manifest


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(value) for value in obj]
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj
