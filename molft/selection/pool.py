"""The external pool: reading it, which of its molecules may be picked, and the arrays strategies use.

A pool molecule's id is its row in the pool file (0-based, header excluded: the `row` column), so rows
with invalid SMILES can be skipped and score, selection and manifest files still name the same molecules.
Score files are matched by that id and checked molecule by molecule before their scores are attached.
Inside a script the pool frame is addressed by position; ids are what goes into files. Molecules that sit
in the run's validation or test split are found here and left out of the candidates (adding them would
leak evaluation data).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from molft.chem import canonical_smiles
from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column, prepare_molecules, read_table
from molft.splits import SPLIT_NAMES

if TYPE_CHECKING:
    from molft.selection.model_outputs import ModelArrays

logger = logging.getLogger(__name__)


# Where each input of a strategy comes from, for error messages that say what to pass.
FIELD_SOURCES: dict[str, str] = {
    "labels": "pool labels (the label column of the pool file, --external_label_column)",
    "influence_scores": "influence scores for this pool (run_influence.py's scores file, --scores_file)",
    "embeddings": "pool embeddings (--model_name_or_path, a run_regression.py output, embeds the pool)",
    "mc_predictions": "MC-dropout predictions [passes, pool] (--model_name_or_path, with --n_passes)",
    "train_smiles": "the training split of the run (--split_file, or the split.json beside --model_name_or_path)",
    "train_embeddings": "training-set embeddings (--model_name_or_path and the run's --split_file)",
    "train_labels": "the run's training labels (--split_file, or the split.json beside --model_name_or_path)",
    "val_embeddings": "validation embeddings (--model_name_or_path and the run's --split_file)",
    "val_labels": "the run's validation labels (--split_file, or the split.json beside --model_name_or_path)",
}


@dataclass
class SelectionPool:
    """The external candidates plus every precomputed array a strategy may need.

    `smiles` should be canonical (they identify the pool in manifests). Influence scores follow the
    convention NEGATIVE = helpful (a predicted decrease of the query loss when the molecule is added).
    `mc_predictions` is [passes, pool]. The train_* and val_* arrays describe the current training and
    validation data, for strategies that judge candidates relative to them.
    """

    smiles: list[str]
    labels: np.ndarray | None = None
    influence_scores: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    mc_predictions: np.ndarray | None = None
    train_smiles: list[str] | None = None
    train_embeddings: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    val_embeddings: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.smiles = list(self.smiles)
        n_pool = len(self.smiles)
        self.labels = _vector(self.labels, "labels", n_pool)
        self.influence_scores = _vector(self.influence_scores, "influence_scores", n_pool)
        self.embeddings = _matrix(self.embeddings, "embeddings", n_pool)
        if self.mc_predictions is not None:
            self.mc_predictions = np.asarray(self.mc_predictions, dtype=np.float64)
            if self.mc_predictions.ndim != 2 or self.mc_predictions.shape[1] != n_pool:
                raise ValueError(
                    f"mc_predictions must be [passes, {n_pool}] (one column per pool molecule), "
                    f"got shape {self.mc_predictions.shape}."
                )
            if not np.isfinite(self.mc_predictions).all():
                raise ValueError("mc_predictions contain non-finite values.")
        n_train = _common_length(
            {
                "train_smiles": self.train_smiles,
                "train_embeddings": self.train_embeddings,
                "train_labels": self.train_labels,
            }
        )
        if self.train_smiles is not None:
            self.train_smiles = list(self.train_smiles)
        self.train_labels = _vector(self.train_labels, "train_labels", n_train)
        self.train_embeddings = _matrix(self.train_embeddings, "train_embeddings", n_train)
        n_val = _common_length({"val_embeddings": self.val_embeddings, "val_labels": self.val_labels})
        self.val_labels = _vector(self.val_labels, "val_labels", n_val)
        self.val_embeddings = _matrix(self.val_embeddings, "val_embeddings", n_val)
        dims = {
            name: getattr(self, name).shape[1]
            for name in ("embeddings", "train_embeddings", "val_embeddings")
            if getattr(self, name) is not None
        }
        if len(set(dims.values())) > 1:
            raise ValueError(f"Embedding sizes differ between inputs: {dims}; they must come from one model.")

    def __len__(self) -> int:
        return len(self.smiles)

    def require(self, *names: str, purpose: str) -> None:
        """Fail early, naming what is missing and which input provides it."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            details = "; ".join(f"{name}: {FIELD_SOURCES.get(name, name)}" for name in missing)
            raise ValueError(f"{purpose} needs inputs that were not given — {details}.")


def load_pool(
    path: str | os.PathLike,
    smiles_column: str | None = None,
    label_column: str | None = None,
    *,
    require_labels: bool = True,
    strict: bool = False,
    standardize: str | None = None,
) -> pd.DataFrame:
    """Read an external pool through molft.data: columns smiles, canonical_smiles, label, row (the pool id).

    Invalid SMILES are skipped with a count and their rows named (an error when `strict`); the others
    keep their file row as id. `standardize` should be the run's, so pool molecules compare with its
    splits. Columns are auto-detected unless named; a missing label column is allowed unless
    `require_labels`, an ambiguous one is always an error.
    """
    table = read_table(path)
    source = str(path)
    smiles_col = find_column(table, smiles_column, SMILES_CANDIDATES, "SMILES", source)
    label_col = label_column
    if label_col is None:
        try:
            label_col = find_column(table, None, LABEL_CANDIDATES, "label", source)
        except ValueError as err:
            if require_labels or not str(err).startswith("No label column"):
                raise
            logger.info("Pool file %s has no label column; label-based strategies are unavailable.", path)
    pool = prepare_molecules(
        table,
        smiles_col,
        label_col,
        source=source,
        strict=strict,
        require_labels=require_labels,
        standardize=standardize,
    )
    pool.attrs["n_rows"] = len(table)
    if len(pool) < len(table):
        logger.warning(
            "Pool %s: %d of %d rows skipped (invalid SMILES); the others keep their row number as pool id.",
            source,
            len(table) - len(pool),
            len(table),
        )
    return pool


def pool_ids(pool_frame: pd.DataFrame) -> np.ndarray:
    """The id of each pool molecule: its row in the pool file (its position for frames without `row`)."""
    if "row" in pool_frame.columns:
        return pool_frame["row"].to_numpy(dtype=np.int64)
    return np.arange(len(pool_frame))


def check_scores_match_pool(
    scores_frame: pd.DataFrame,
    pool_frame: pd.DataFrame,
    *,
    score_column: str = "score",
    smiles_column: str = "smiles",
    index_column: str = "index",
) -> np.ndarray:
    """Return the scores in pool order after checking they were computed for this very pool.

    With an `index_column` (run_influence.py writes the pool id, see `pool_ids`) rows are matched by id,
    and pool molecules the file leaves out (e.g. held-out ones) get NaN; without one, the file must hold
    one row per pool molecule in pool order. Every row's SMILES is checked against its pool molecule: a
    file written for another external set (or a reordered one) would otherwise silently attach scores
    to the wrong molecules.
    """
    missing = [c for c in (score_column, smiles_column) if c not in scores_frame.columns]
    if missing:
        raise ValueError(f"Score file lacks column(s) {missing}; it has {list(scores_frame.columns)}.")
    n_pool = len(pool_frame)
    if index_column in scores_frame.columns:
        positions = _positions_of_ids(scores_frame[index_column], pool_ids(pool_frame), index_column)
    elif len(scores_frame) != n_pool:
        raise ValueError(
            f"Score file has {len(scores_frame)} rows but the pool has {n_pool} molecules: "
            "the scores were computed for another pool."
        )
    else:
        positions = np.arange(n_pool)
    ids = pool_ids(pool_frame)
    score_smiles = [canonical_smiles(s) or str(s) for s in scores_frame[smiles_column]]
    pool_smiles = canonical_column(pool_frame)[positions].tolist()
    mismatched = [i for i, (a, b) in enumerate(zip(score_smiles, pool_smiles, strict=True)) if a != b]
    if mismatched:
        examples = ", ".join(
            f"{ids[positions[i]]}: {score_smiles[i]!r} vs pool {pool_smiles[i]!r}" for i in mismatched[:3]
        )
        raise ValueError(
            f"Score file does not match the pool at {len(mismatched)} of {len(positions)} pool ids "
            f"({examples}): the scores were computed for another pool."
        )
    values = pd.to_numeric(scores_frame[score_column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(
            f"Score file column {score_column!r} is missing or not finite at pool ids "
            f"{ids[positions[bad]][:10].tolist()}."
        )
    scores = np.full(n_pool, np.nan)
    scores[positions] = values
    return scores


def _positions_of_ids(index: pd.Series, ids: np.ndarray, column: str) -> np.ndarray:
    """Positions in the pool frame of a score file's pool ids (each id once, all in the pool)."""
    values = pd.to_numeric(index, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise ValueError(f"Score file column {column!r} holds values that are not pool ids (row numbers).")
    values = values.astype(np.int64)
    repeated = sorted({int(v) for v in values[pd.Series(values).duplicated().to_numpy()]})
    if repeated:
        raise ValueError(f"Score file column {column!r} repeats pool ids {repeated[:10]}.")
    position = {int(pool_id): i for i, pool_id in enumerate(ids)}
    unknown = [int(v) for v in values if int(v) not in position]
    if unknown:
        raise ValueError(
            f"Score file names pool ids {unknown[:10]} that the pool does not hold (ids: its valid rows "
            f"{ids[:3].tolist()}...): the scores were computed for another pool."
        )
    return np.array([position[int(v)] for v in values], dtype=np.int64)


def check_candidate_scores(
    scores: np.ndarray, pool_frame: pd.DataFrame, candidates: np.ndarray, scores_file: str | os.PathLike
) -> None:
    """Every candidate needs a score; a score file leaves out held-out molecules unless told to keep them."""
    missing = candidates[~np.isfinite(scores[candidates])]
    if len(missing):
        raise ValueError(
            f"--scores_file {scores_file} has no score for {len(missing)} candidate pool molecules (pool ids "
            f"{pool_ids(pool_frame)[missing][:10].tolist()}). run_influence.py leaves molecules of the run's "
            "validation/test split out unless --keep_heldout_overlap; score the pool with the options used here."
        )


def read_influence_scores(scores_file: str | os.PathLike, pool_frame: pd.DataFrame) -> np.ndarray:
    """Scores of a run_influence.py scores file in pool order, after checking it was written for this pool."""
    try:
        return check_scores_match_pool(read_table(scores_file), pool_frame)
    except ValueError as err:
        raise ValueError(f"--scores_file {scores_file}: {err}") from err


def heldout_overlap(pool_frame: pd.DataFrame, frames: dict[str, pd.DataFrame] | None) -> dict[str, list[int]]:
    """Pool positions whose molecule (canonical SMILES) is in each split of the run."""
    if frames is None:
        return {}
    overlap = {}
    for name in SPLIT_NAMES:
        inside = pool_frame["canonical_smiles"].isin(set(frames[name]["canonical_smiles"]))
        overlap[name] = np.flatnonzero(inside.to_numpy()).tolist()
    return overlap


def candidate_positions(pool_frame: pd.DataFrame, overlap: dict[str, list[int]], keep: bool) -> np.ndarray:
    """Pool positions a strategy may pick: all, minus validation/test molecules unless `keep`."""
    heldout = sorted(set(overlap.get("validation", [])) | set(overlap.get("test", [])))
    ids = pool_ids(pool_frame)
    if overlap.get("train"):
        logger.info(
            "%d pool molecules are already in the training split (pool ids %s).",
            len(overlap["train"]),
            ids[overlap["train"][:10]].tolist(),
        )
    if heldout:
        counts = f"validation {len(overlap['validation'])}, test {len(overlap['test'])}"
        logger.warning(
            "%d pool molecules are in the run's held-out splits (%s; pool ids %s) and are %s.",
            len(heldout),
            counts,
            ids[heldout[:10]].tolist(),
            "KEPT as candidates (--keep_heldout_overlap)" if keep else "excluded from the candidates",
        )
    if keep:
        return np.arange(len(pool_frame))
    candidates = np.setdiff1d(np.arange(len(pool_frame)), heldout)
    if len(candidates) == 0:
        raise ValueError(
            "Every pool molecule is in the run's validation/test split; nothing can be selected."
        )
    return candidates


def selection_pool(
    pool_frame: pd.DataFrame,
    candidates: np.ndarray,
    frames: dict[str, pd.DataFrame] | None,
    scores: np.ndarray | None,
    arrays: ModelArrays,
) -> SelectionPool:
    """The candidates' arrays (positions 0..len(candidates)-1) plus the run's train/validation data."""

    def take(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else values[candidates]

    train = frames["train"] if frames is not None else None
    validation = frames["validation"] if frames is not None else None
    has_validation_embeddings = arrays.validation_embeddings is not None
    return SelectionPool(
        smiles=pool_frame["canonical_smiles"].to_numpy()[candidates].tolist(),
        labels=take(pool_frame["label"].to_numpy()) if "label" in pool_frame else None,
        influence_scores=take(scores),
        embeddings=take(arrays.pool_embeddings),
        mc_predictions=None if arrays.mc_predictions is None else arrays.mc_predictions[:, candidates],
        train_smiles=train["canonical_smiles"].tolist() if train is not None else None,
        train_embeddings=arrays.train_embeddings,
        train_labels=train["label"].to_numpy() if train is not None else None,
        val_embeddings=arrays.validation_embeddings,
        val_labels=validation["label"].to_numpy() if has_validation_embeddings else None,
    )


def canonical_column(frame: pd.DataFrame, smiles_column: str = "smiles") -> np.ndarray:
    """Canonical SMILES of a frame: molft.data frames carry them already, other frames are canonicalised."""
    if "canonical_smiles" in frame.columns:
        return frame["canonical_smiles"].astype(str).to_numpy()
    if smiles_column not in frame.columns:
        raise ValueError(f"Frame needs a {smiles_column!r} column; it has {list(frame.columns)}.")
    return np.array([canonical_smiles(s) or str(s) for s in frame[smiles_column]], dtype=object)


def _vector(values: Any, name: str, length: int | None) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or (length is not None and len(array) != length):
        raise ValueError(f"{name} must be 1-D with {length} entries, got shape {array.shape}.")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{name} are missing or not finite at positions {bad[:10].tolist()}.")
    return array


def _matrix(values: Any, name: str, length: int | None) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or (length is not None and len(array) != length):
        raise ValueError(f"{name} must be 2-D [{length}, D], got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain non-finite values.")
    return array


def _common_length(arrays: dict[str, Any]) -> int | None:
    lengths = {name: len(value) for name, value in arrays.items() if value is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Inputs that describe the same molecules differ in length: {lengths}.")
    return next(iter(lengths.values()), None)
