"""Train/validation/test splitters and the split.json file that makes a split reusable.

How molecules are split decides how optimistic a benchmark is (random splits leak close analogues into
the test set), so every method is deterministic for its parameters, records all of them, and is saved
together with a fingerprint of the dataset it was made for, so a split cannot be applied to other data.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from rdkit import DataStructs
from rdkit.ML.Cluster import Butina
from rdkit.SimDivFilters import rdSimDivPickers
from sklearn.model_selection import train_test_split

from molft import chem
from molft.io import read_json, write_json
from molft.overlap import dataset_fingerprint

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_FORMAT_VERSION = 1
_COLUMN_VALUES = {
    "train": "train",
    "valid": "validation",
    "validation": "validation",
    "val": "validation",
    "test": "test",
}
# One fingerprint definition for every similarity-based splitter and for the difficulty report.
_FP_RADIUS = 2
_FP_BITS = 2048


@dataclass
class SplitResult:
    """Positions into the prepared frame for each split, plus everything needed to reproduce them."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))

    def indices(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.indices().items()}


def make_split(
    df: pd.DataFrame,
    method: str,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    **params: Any,
) -> SplitResult:
    """Split a prepared frame (columns `canonical_smiles`, `label`) with one of `SPLIT_METHODS`.

    Unknown parameters for a method are an error rather than ignored, so a typo cannot silently
    produce a different split from the one the user asked for.
    """
    if method not in SPLIT_METHODS:
        raise ValueError(f"Unknown split method {method!r}; choose one of {sorted(SPLIT_METHODS)}.")
    splitter, defaults = SPLIT_METHODS[method]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(
            f"Split method {method!r} does not take {sorted(unknown)}; its parameters are {sorted(defaults)}."
        )
    options = {**defaults, **params}
    if method == "predefined":
        split = _predefined_split(df, **options)
    else:
        fractions = _checked_fractions(fractions)
        sizes = _target_sizes(len(df), fractions, method)
        parts = splitter(df, sizes, seed, **options)
        split = SplitResult(
            *parts, method=method, params={"fractions": list(fractions), "seed": seed, **options}
        )
    _check_split(split, len(df), require_cover=method != "predefined")
    logger.info("%s split: %s", method, split.sizes)
    return split


def _checked_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ValueError(f"fractions must be (train, validation, test); got {list(fractions)}.")
    if any(not math.isfinite(f) or f <= 0 for f in values):
        raise ValueError(
            f"Every split fraction must be > 0 (a validation set is required); got {list(values)}."
        )
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"Split fractions must sum to 1; got {list(values)} (sum {sum(values):.6g}).")
    return values  # type: ignore[return-value]


def _target_sizes(n: int, fractions: tuple[float, float, float], method: str) -> tuple[int, int, int]:
    # Held-out sizes are rounded half up, the training set takes the remainder.
    n_validation = math.floor(fractions[1] * n + 0.5)
    n_test = math.floor(fractions[2] * n + 0.5)
    n_train = n - n_validation - n_test
    if min(n_train, n_validation, n_test) < 1:
        raise ValueError(
            f"{n} molecules are too few for a {method} split with fractions {list(fractions)}: "
            f"it would give train/validation/test sizes {n_train}/{n_validation}/{n_test}."
        )
    return n_train, n_validation, n_test


def _check_split(split: SplitResult, n: int, require_cover: bool) -> None:
    seen = np.zeros(n, dtype=np.int64)
    for name, idx in split.indices().items():
        if idx.size == 0:
            raise ValueError(
                f"The {split.method} split left the {name} set empty (sizes {split.sizes}); the dataset is too "
                "small or too homogeneous for this method; change fractions or use another method."
            )
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{name} indices of the {split.method} split are outside 0..{n - 1}.")
        np.add.at(seen, idx, 1)
    if (seen > 1).any():
        raise ValueError(f"{int((seen > 1).sum())} molecules are in more than one split ({split.method}).")
    if (seen == 0).any():
        if require_cover:
            raise RuntimeError(f"{split.method} split did not assign {int((seen == 0).sum())} molecules.")
        logger.warning("%d molecules are in no split and will not be used.", int((seen == 0).sum()))


def _cut(order: np.ndarray, sizes: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split an ordering of all molecules into consecutive train, validation, test blocks."""
    n_train, n_validation, _ = sizes
    blocks = np.split(np.asarray(order, dtype=np.int64), [n_train, n_train + n_validation])
    return tuple(np.sort(block) for block in blocks)  # type: ignore[return-value]


def _assign_groups(
    groups: Sequence[Sequence[int]], capacity: dict[str, int], overflow: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place whole groups, in order, into the first split of `capacity` they still fit in, else `overflow`."""
    members: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for group in groups:
        target = next((n for n, cap in capacity.items() if len(members[n]) + len(group) <= cap), overflow)
        members[target].extend(int(i) for i in group)
    return tuple(np.sort(np.array(members[name], dtype=np.int64)) for name in SPLIT_NAMES)  # type: ignore[return-value]


def _fingerprints(df: pd.DataFrame) -> list:
    return chem.morgan_fingerprints(df["canonical_smiles"].tolist(), radius=_FP_RADIUS, n_bits=_FP_BITS)


def _random_split(df: pd.DataFrame, sizes: tuple[int, int, int], seed: int) -> tuple:
    return _cut(np.random.default_rng(seed).permutation(len(df)), sizes)


def _scaffold_split(df: pd.DataFrame, sizes: tuple[int, int, int], seed: int, balanced: bool) -> tuple:
    """Bemis–Murcko scaffold split.

    Default (DeepChem convention): scaffold sets by size, largest first (ties by scaffold SMILES), fill
    train, then validation, the rest goes to test, so held-out sets hold the rarest scaffolds and the seed
    plays no role. `balanced=True` (Chemprop's variant) keeps sets larger than half a held-out set first,
    sorted the same way, but puts the small ones in seeded random order so held-out sets are not just
    singleton scaffolds.
    """
    by_scaffold: dict[str, list[int]] = {}
    for i, smi in enumerate(df["canonical_smiles"]):
        by_scaffold.setdefault(chem.murcko_scaffold(smi), []).append(i)
    ordered = sorted(by_scaffold.items(), key=lambda item: (-len(item[1]), item[0]))
    groups = [members for _, members in ordered]
    if balanced:
        big_limit = min(sizes[1], sizes[2]) / 2
        big = [g for g in groups if len(g) > big_limit]
        small = [g for g in groups if len(g) <= big_limit]
        permutation = np.random.default_rng(seed).permutation(len(small))
        groups = big + [small[i] for i in permutation]
    return _assign_groups(groups, {"train": sizes[0], "validation": sizes[1]}, overflow="test")


def _stratified_split(
    df: pd.DataFrame, sizes: tuple[int, int, int], seed: int, n_bins: int, by_class: bool
) -> tuple:
    """Stratify on label quantile bins so every split covers the whole label range in the same proportions;
    `by_class`: on the classes themselves (a classification label), so every split has each class's share."""
    if "label" not in df:
        raise ValueError("The stratified split needs a 'label' column.")
    if by_class:
        bins = df["label"].to_numpy()
    else:
        bins = pd.qcut(df["label"].to_numpy(dtype=np.float64), q=n_bins, labels=False, duplicates="drop")
    positions = np.arange(len(df))
    n_train, n_validation, n_test = sizes
    try:
        train, heldout = train_test_split(
            positions, test_size=n_validation + n_test, random_state=seed, stratify=bins
        )
        validation, test = train_test_split(
            heldout, test_size=n_test, random_state=seed, stratify=bins[heldout]
        )
    except ValueError as err:
        raise ValueError(
            f"Stratified split with {'classes' if by_class else f'n_bins={n_bins}'} failed for {len(df)} "
            f"molecules ({err}); use {'another split' if by_class else 'fewer bins'} or larger validation/test "
            "fractions."
        ) from err
    return np.sort(train), np.sort(validation), np.sort(test)


def _butina_split(df: pd.DataFrame, sizes: tuple[int, int, int], seed: int, cutoff: float) -> tuple:
    """Butina clusters (Tanimoto distance <= `cutoff`) kept whole.

    Clusters are taken in seeded random order; each goes to test if it still fits there, else to
    validation if it fits, else to train. Held-out sets therefore never exceed their target size and
    the occasional very large cluster ends up in train rather than dominating a held-out set.
    The full distance matrix is held in memory (n² floats: about 140 MB for Lipophilicity's 4200).
    """
    fps = _fingerprints(df)
    distances = 1.0 - chem.tanimoto_matrix(fps, fps).astype(np.float64)
    clusters = Butina.ClusterData(distances, len(fps), cutoff, isDistData=True)
    clusters = sorted((sorted(c) for c in clusters), key=lambda c: c[0])  # independent of Butina's ordering
    permutation = np.random.default_rng(seed).permutation(len(clusters))
    return _assign_groups(
        [clusters[i] for i in permutation], {"test": sizes[2], "validation": sizes[1]}, overflow="train"
    )


def _maxmin_split(df: pd.DataFrame, sizes: tuple[int, int, int], seed: int) -> tuple:
    """MaxMin diversity picking: test first, then validation continuing the same pick sequence.

    Both held-out sets are spread over the whole chemical space and far from each other; train is the rest.
    """
    fps = _fingerprints(df)
    n_train, n_validation, n_test = sizes
    picks = list(
        rdSimDivPickers.MaxMinPicker().LazyBitVectorPick(fps, len(fps), n_test + n_validation, seed=seed)
    )
    test = np.array(picks[:n_test], dtype=np.int64)
    validation = np.array(picks[n_test:], dtype=np.int64)
    train = np.setdiff1d(np.arange(len(df)), picks)
    return np.sort(train), np.sort(validation), np.sort(test)


def _molecular_weight_split(df: pd.DataFrame, sizes: tuple[int, int, int], seed: int) -> tuple:
    """Lightest molecules train, heaviest test: probes extrapolation to larger molecules."""
    weights = np.array([chem.molecular_weight(smi) for smi in df["canonical_smiles"]])
    return _cut(np.argsort(weights, kind="stable"), sizes)


def _fingerprint_split(df: pd.DataFrame, sizes: tuple[int, int, int], seed: int, n_reference: int) -> tuple:
    """Order molecules by typicality, most typical in train and least typical in test.

    Typicality is a molecule's mean Morgan Tanimoto similarity to the rest of the dataset: low values
    mark molecules in sparsely populated chemical space, which a model has seen least like. Above
    `n_reference` molecules the mean is taken over a seeded random reference sample to keep the cost
    linear; otherwise all molecules are used and the seed plays no role. Ties keep dataset order.
    """
    fps = _fingerprints(df)
    n = len(fps)
    if n > n_reference:
        reference = np.sort(np.random.default_rng(seed).choice(n, size=n_reference, replace=False))
    else:
        reference = np.arange(n)
    in_reference = np.zeros(n, dtype=bool)
    in_reference[reference] = True
    reference_fps = [fps[i] for i in reference]
    typicality = np.empty(n, dtype=np.float64)
    for i, fp in enumerate(fps):
        total = float(np.sum(DataStructs.BulkTanimotoSimilarity(fp, reference_fps)))
        count = len(reference_fps)
        if in_reference[i]:  # leave out the molecule's similarity to itself
            total, count = total - 1.0, count - 1
        typicality[i] = total / max(count, 1)
    return _cut(np.argsort(-typicality, kind="stable"), sizes)


def _predefined_split(df: pd.DataFrame, split_column: str | None, split_file: str | None) -> SplitResult:
    """Use a split given with the data: a column of train/valid(ation)/test labels or an index file.

    An index file is either our split.json (validated against the dataset) or JSON with train/validation/
    test lists of original row numbers (the `row` column of the prepared frame, i.e. rows of the data
    file; positions when the frame has no `row` column), so rows dropped as invalid cannot shift them.
    """
    if (split_column is None) == (split_file is None):
        raise ValueError("The predefined split needs exactly one of split_column or split_file.")
    if split_column is not None:
        if split_column not in df:
            raise ValueError(f"Split column {split_column!r} not in the data; available: {list(df.columns)}.")
        values = df[split_column]
        names = values.map(
            lambda v: _COLUMN_VALUES.get(str(v).strip().lower()) if isinstance(v, str) else None
        )
        unknown = names.isna().to_numpy()
        if unknown.any():
            rows = df["row"].to_numpy() if "row" in df else np.arange(len(df))
            shown = "; ".join(f"row {rows[i]}: {values.iloc[i]!r}" for i in np.flatnonzero(unknown)[:10])
            raise ValueError(
                f"Split column {split_column!r} has {int(unknown.sum())} values that are not "
                f"train/valid/validation/test ({shown})."
            )
        parts = [np.flatnonzero((names == name).to_numpy()) for name in SPLIT_NAMES]
        return SplitResult(*parts, method="predefined", params={"split_column": split_column})

    content = read_json(split_file)
    if isinstance(content, dict) and "dataset_fingerprint" in content:
        saved = load_split(split_file, df)
        params = {"split_file": str(split_file), "source_method": saved.method, "source_params": saved.params}
        return SplitResult(saved.train, saved.validation, saved.test, method="predefined", params=params)
    if not isinstance(content, dict):
        raise ValueError(f"Split file {split_file} must hold a JSON object with train/validation/test lists.")
    content = {("validation" if k in ("valid", "val") else k): v for k, v in content.items()}
    missing = [name for name in SPLIT_NAMES if name not in content]
    if missing:
        raise ValueError(f"Split file {split_file} lacks {missing}; it has keys {sorted(content)}.")
    row_numbers = df["row"].to_numpy() if "row" in df else np.arange(len(df))
    position_of = {int(r): i for i, r in enumerate(row_numbers)}
    parts = []
    for name in SPLIT_NAMES:
        requested = content[name]
        if not isinstance(requested, list) or not all(isinstance(r, int) for r in requested):
            raise ValueError(f"Split file {split_file}: {name!r} must be a list of integer row numbers.")
        absent = [r for r in requested if r not in position_of]
        if absent:
            logger.warning(
                "Split file %s: %d %s rows are not in the prepared data (invalid SMILES or out of "
                "range), e.g. %s; they are skipped.",
                split_file,
                len(absent),
                name,
                absent[:5],
            )
        parts.append(np.array(sorted(position_of[r] for r in requested if r in position_of), dtype=np.int64))
    return SplitResult(*parts, method="predefined", params={"split_file": str(split_file)})


# name -> (splitter, its keyword parameters with defaults); splitters take (df, sizes, seed, **params)
SPLIT_METHODS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "random": (_random_split, {}),
    "scaffold": (_scaffold_split, {"balanced": False}),
    "stratified": (_stratified_split, {"n_bins": 10, "by_class": False}),
    "predefined": (_predefined_split, {"split_column": None, "split_file": None}),
    "butina": (_butina_split, {"cutoff": 0.6}),
    "maxmin": (_maxmin_split, {}),
    "molecular_weight": (_molecular_weight_split, {}),
    "fingerprint": (_fingerprint_split, {"n_reference": 5000}),
}


def split_frames(df: pd.DataFrame, split: SplitResult) -> dict[str, pd.DataFrame]:
    """The prepared frame cut into train/validation/test frames (fresh 0-based index each)."""
    return {name: df.iloc[idx].reset_index(drop=True) for name, idx in split.indices().items()}


def split_similarity(df: pd.DataFrame, split: SplitResult) -> dict[str, Any]:
    """Nearest-neighbour Tanimoto similarity of held-out molecules to train: how hard the split is."""
    fps = _fingerprints(df)
    train_fps = [fps[i] for i in split.train]
    report: dict[str, Any] = {"fingerprint": f"Morgan radius {_FP_RADIUS}, {_FP_BITS} bits"}
    for name in ("validation", "test"):
        nearest = chem.nearest_neighbour_similarity([fps[i] for i in getattr(split, name)], train_fps)
        report[f"{name}_to_train"] = {"mean": float(nearest.mean()), "median": float(np.median(nearest))}
    return report


def save_split(
    path: str | os.PathLike,
    df: pd.DataFrame,
    split: SplitResult,
    *,
    dataset_source: str,
    extra: dict[str, Any] | None = None,
    similarity: dict[str, Any] | None = None,
    standardize: str | None = None,
    columns: dict[str, str | None] | None = None,
    data: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
) -> None:
    """Write split.json: indices, molecules, parameters and the fingerprint of the dataset it belongs to.

    `similarity` is `split_similarity(df, split)` when the caller has it already (it is computed otherwise).
    `standardize` (default: `df.attrs`, set by `prepare_molecules`), `columns` (the SMILES/label columns
    used, {"smiles_column": ..., "label_column": ...}) and `data` (where the data came from, with file
    hashes: `molft.run_record.data_record`) are recorded, so a reader can rebuild the data from this file;
    `task` (`molft.tasks.Task.record`) says what the labels are.
    """
    smiles = df["canonical_smiles"].tolist()
    sizes = split.sizes
    record = {
        "format_version": SPLIT_FORMAT_VERSION,
        "method": split.method,
        "params": split.params,
        "fractions": split.params.get("fractions"),
        "seed": split.params.get("seed"),
        "sizes": sizes,
        "actual_fractions": {name: size / len(df) for name, size in sizes.items()},
        "dataset_source": dataset_source,
        "n_molecules": len(df),
        "dataset_fingerprint": dataset_fingerprint(smiles),
        "indices": {name: idx.tolist() for name, idx in split.indices().items()},
        "smiles": {name: [smiles[i] for i in idx] for name, idx in split.indices().items()},
        "similarity": similarity if similarity is not None else split_similarity(df, split),
        "extra": extra or {},
        "standardize": standardize or df.attrs.get("standardize"),
        "columns": columns,
        "data": data,
    }
    if task is not None:
        record["task"] = task
    write_json(path, record)


def load_split(path: str | os.PathLike, df: pd.DataFrame, standardize: str | None = None) -> SplitResult:
    """Read split.json and check that it was made for exactly this prepared dataset (and standardisation,
    `standardize` defaulting to `df.attrs`)."""
    record = read_json(path)
    made_with, given = record.get("standardize"), standardize or df.attrs.get("standardize")
    if made_with != given:
        raise ValueError(
            f"split.json {path} was made with standardize={made_with!r}, this data with {given!r}; use the same."
        )
    missing = [
        key for key in ("method", "indices", "n_molecules", "dataset_fingerprint") if key not in record
    ]
    if missing:
        raise ValueError(f"{path} is not a split.json written by molft (missing {missing}).")
    if record["n_molecules"] != len(df):
        raise ValueError(
            f"split.json {path} was made for a different dataset: it covers {record['n_molecules']} molecules, "
            f"the data has {len(df)} (source recorded: {record.get('dataset_source')!r})."
        )
    fingerprint = dataset_fingerprint(df["canonical_smiles"].tolist())
    if record["dataset_fingerprint"] != fingerprint:
        raise ValueError(
            f"split.json {path} was made for a different dataset (fingerprint {record['dataset_fingerprint'][:12]}"
            f"..., this data {fingerprint[:12]}...; source recorded: {record.get('dataset_source')!r})."
        )
    split = SplitResult(
        *(record["indices"][name] for name in SPLIT_NAMES),
        method=record["method"],
        params=record.get("params", {}),
    )
    _check_split(split, len(df), require_cover=False)
    return split


def read_split_smiles(path: str | os.PathLike) -> dict[str, list[str]]:
    """Canonical SMILES per split, for scripts that only need the molecule sets (no dataset check)."""
    record = read_json(path)
    if "smiles" not in record:
        raise ValueError(f"{path} has no 'smiles' entry; it is not a split.json written by molft.")
    return {name: list(record["smiles"][name]) for name in SPLIT_NAMES}
