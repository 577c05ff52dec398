"""The molecules, labels and split files a benchmark runs every method on, read as run_regression.py reads them.

benchmarks/bench_accuracy.py runs this project's recipe by subprocess and a baseline (molft.baselines) in
process; both must see the same molecules. Molecules go through `molft.data.prepare_molecules` (the same
SMILES checks, standardisation and canonical SMILES), labels keep their gaps (NaN: one target of several
without a value), and split files number the rows of the data table (0-based, header excluded; the
../shared/splits layout `{"train": [...], "valid": [...], "test": [...]}`), so a dropped invalid row cannot
shift them. `check_lineup` confirms afterwards that a run_regression.py run used the same rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from molft.baselines import MULTI_LABEL, REGRESSION, SINGLE_LABEL, check_problem_type
from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column, load_raw_dataset, prepare_molecules
from molft.io import read_json, write_json
from molft.labels import class_keys, class_order, numeric_labels
from molft.splits import make_split

logger = logging.getLogger(__name__)

# ../shared/splits/README.md: the deterministic scaffold_s0 is harder than the balanced s1/s2; report it apart
FAMILIES = {"scaffold_s0": "scaffold_s0", "scaffold_s1": "scaffold_s1-2", "scaffold_s2": "scaffold_s1-2"}
# what `load_data` reads from its options (run_regression.py's names)
DATA_OPTIONS = (
    "dataset_name", "dataset_config_name", "train_file", "smiles_column", "label_column", "problem_type",
    "class_names", "standardize", "strict_smiles",
)  # fmt: skip


@dataclass
class Data:
    """The checked molecules (prepare_molecules, as run_regression.py reads them) and their labels."""

    molecules: pd.DataFrame  # row, smiles, canonical_smiles, then one column per target
    targets: list[str]
    problem_type: str
    source: str
    n_rows: int  # rows of the table read, which split files number
    # single-label classification: each target's classes in output order (its labels are their indices)
    classes: dict[str, list[str]]


@dataclass
class Split:
    name: str
    family: str
    path: Path
    positions: dict[str, np.ndarray]  # train/validation/test -> positions in Data.molecules


def load_data(options: dict[str, Any]) -> Data:
    """The molecules as run_regression.py prepares them, with their labels; missing labels stay NaN.

    `options`: run_regression.py's values of `DATA_OPTIONS` (absent ones take its defaults).
    """
    opts = {name: options.get(name) for name in DATA_OPTIONS}
    raw = load_raw_dataset(
        None if opts["train_file"] else opts["dataset_name"] or "lipophilicity",
        train_file=opts["train_file"],
        dataset_config_name=opts["dataset_config_name"],
    )
    if set(raw.frames) != {"all"}:
        raise ValueError(
            f"{raw.source} comes already split ({sorted(raw.frames)}); the benchmark needs one table."
        )
    frame = raw.frames["all"]
    smiles_col = find_column(frame, opts["smiles_column"], SMILES_CANDIDATES, "SMILES", raw.source)
    label_option = opts["label_column"]
    if label_option and label_option not in frame.columns:
        targets = [t.strip() for t in str(label_option).split(",")]
    else:  # a dataset may name its own label (ESOL's file also holds model predictions)
        own_label = getattr(raw, "label_column", None)
        targets = [
            label_option or own_label or find_column(frame, None, LABEL_CANDIDATES, "label", raw.source)
        ]
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    missing = [t for t in targets if t not in frame.columns]
    if repeated or missing:
        raise ValueError(f"{raw.source}: label columns {repeated} are listed twice, {missing} do not exist.")
    clash = sorted(set(targets) & {"row", "smiles", "canonical_smiles"})
    if clash:
        raise ValueError(f"Label columns {clash} clash with the benchmark's own columns; rename them.")
    molecules = prepare_molecules(
        frame,
        smiles_col,
        None,
        source=raw.source,
        strict=bool(opts["strict_smiles"]),
        require_labels=False,
        standardize=None if opts["standardize"] == "none" else opts["standardize"],
    )
    problem_type = check_problem_type(opts["problem_type"] or REGRESSION)
    values = {t: frame.loc[molecules["row"], t] for t in targets}
    # the label rules of run_regression.py (molft.labels), so both sides of a benchmark read the same labels
    if problem_type == SINGLE_LABEL:
        names = [n.strip() for n in opts["class_names"].split(",")] if opts["class_names"] else None
        keys = {t: class_keys(v, v.index, t, raw.source) for t, v in values.items()}
        classes = {t: class_order(k, names, t) for t, k in keys.items()}
        labels = {t: class_indices(k, classes[t]) for t, k in keys.items()}
    else:
        classes = {}
        binary = problem_type == MULTI_LABEL
        labels = {t: numeric_labels(v, v.index, t, raw.source, binary) for t, v in values.items()}
    molecules = molecules[["row", "smiles", "canonical_smiles"]].assign(**labels)
    unlabelled = molecules[targets].isna().all(axis=1).to_numpy()
    if unlabelled.any():
        logger.warning(
            "%s: %d rows have no label at all and are left out.", raw.source, int(unlabelled.sum())
        )
        molecules = molecules[~unlabelled].reset_index(drop=True)
    return Data(molecules, targets, problem_type, raw.source, len(frame), classes)


def class_indices(keys: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each class name's position in `classes` as a float label, NaN where missing."""
    position = {name: float(i) for i, name in enumerate(classes)}
    return np.array([np.nan if k is None else position[k] for k in keys], dtype=np.float64)


def read_split(path: Path, data: Data, family: str | None = None) -> Split:
    """A JSON split of row numbers (../shared/splits layout; molft's own split.json is not one)."""
    content = read_json(path)
    if not isinstance(content, dict) or "dataset_fingerprint" in content:
        raise ValueError(
            f"{path}: the benchmark wants a JSON object of train/valid/test lists of row numbers."
        )
    content = {("validation" if k in ("valid", "val") else k): v for k, v in content.items()}
    position_of = {int(r): i for i, r in enumerate(data.molecules["row"])}
    positions, seen = {}, set()
    for part in ("train", "validation", "test"):
        rows = content.get(part)
        if not isinstance(rows, list) or not all(isinstance(r, int) for r in rows):
            raise ValueError(
                f"{path}: {part!r} must be a list of integer row numbers (keys: {sorted(content)})."
            )
        outside = [r for r in rows if not 0 <= r < data.n_rows]
        if outside:
            raise ValueError(
                f"{path}: {part} rows {outside[:5]} lie outside {data.source} ({data.n_rows} rows)."
            )
        if seen & set(rows):
            raise ValueError(f"{path}: rows {sorted(seen & set(rows))[:5]} sit in two parts.")
        seen |= set(rows)
        absent = [r for r in rows if r not in position_of]
        if absent:
            logger.warning(
                "%s: %d %s rows are no usable molecule (invalid SMILES, or no label), e.g. %s; left out.",
                path, len(absent), part, absent[:5],
            )  # fmt: skip
        positions[part] = np.array([position_of[r] for r in rows if r in position_of], dtype=np.int64)
        if not len(positions[part]):
            raise ValueError(f"{path}: the {part} part holds no usable molecule.")
    name = path.stem
    stem, _, number = name.rpartition("_s")
    family = family or FAMILIES.get(
        name, stem if stem and number.isdigit() else name
    )  # random_s0..2 -> random
    return Split(name, family, path, positions)


def make_split_file(data: Data, method: str, fractions: Sequence[float], seed: int, path: Path) -> Path:
    """A split of the molecules (molft.splits) written to `path` as a split file every method reads.

    An existing file must hold the same split: one made of other data is an error, never overwritten.
    """
    frame, params = data.molecules[["canonical_smiles"]].copy(), {}
    if method == "stratified":
        target = data.targets[0]
        if len(data.targets) > 1 or data.molecules[target].isna().any():
            raise ValueError("A stratified split needs one target without missing labels.")
        frame["label"] = data.molecules[target]
        if data.problem_type != REGRESSION:
            params["by_class"] = True  # on the classes, as run_regression.py stratifies a classification
    split = make_split(frame, method, fractions=fractions, seed=seed, **params)
    rows = data.molecules["row"].to_numpy()
    content = {
        name: rows[idx].tolist()
        for name, idx in zip(("train", "valid", "test"), split.indices().values(), strict=True)
    }
    if path.is_file() and read_json(path) != content:
        raise ValueError(
            f"{path} holds another split than the {method} split of these data; remove it or write elsewhere."
        )
    if not path.is_file():
        write_json(path, content)
    return path


def check_lineup(path: Path, split: Split, data: Data) -> None:
    """A run_regression.py predictions.csv (`path`) holds the split's rows in each part, each the same molecule.

    Checked by the `row` and `canonical_smiles` columns, whatever else the file holds (one or several targets,
    classes); a file without them is logged as unchecked.
    """
    predictions = pd.read_csv(path)
    if not {"split", "row", "canonical_smiles"} <= set(predictions.columns):
        logger.warning(
            "%s lacks split/row/canonical_smiles columns: the split's rows cannot be checked.", path
        )
        return
    if "source" in predictions:
        # not the molecules of --extra_train_file
        predictions = predictions[predictions["source"] == "dataset"]
    molecule_of = dict(zip(data.molecules["row"], data.molecules["canonical_smiles"], strict=True))
    for part, positions in split.positions.items():
        theirs = predictions[predictions["split"] == part]
        ours = set(data.molecules["row"].iloc[positions].tolist())
        their_rows = set(theirs["row"].astype(int).tolist())
        if their_rows != ours:
            raise ValueError(
                f"{path}: the run's {part} rows are not those of {split.path} ({len(their_rows - ours)} only in the "
                f"run, e.g. {sorted(their_rows - ours)[:5]}; {len(ours - their_rows)} only in the split file, e.g. "
                f"{sorted(ours - their_rows)[:5]}). A --max_*_samples flag, pre-split data or another dataset does this."
            )
        other = [
            r
            for r, smi in zip(theirs["row"], theirs["canonical_smiles"], strict=True)
            if molecule_of[int(r)] != smi
        ]
        if other:
            raise ValueError(
                f"{path}: {part} rows {other[:5]} are other molecules in the run than in {data.source}."
            )
