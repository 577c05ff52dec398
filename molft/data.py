"""Loading molecule tables and turning them into clean, canonicalised frames.

Every script reads its molecules through here so that column detection, invalid-SMILES handling and label
checks behave the same everywhere, and so that a bad row is always reported with its row number instead of
silently changing the data a model is trained or evaluated on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rdkit import Chem

from molft.chem import check_standardize, n_components, parse_smiles, standardize_mol
from molft.overlap import MAX_EXAMPLES, duplicate_report

logger = logging.getLogger(__name__)

LIPOPHILICITY_HUB_ID = "scikit-fingerprints/MoleculeNet_Lipophilicity"
ESOL_HUB_ID = "scikit-fingerprints/MoleculeNet_ESOL"


@dataclass(frozen=True)
class EmbeddedDataset:
    """A --dataset_name read from chemloader's copy, else from its Hub copy; `label_column`: the copy's
    label, used unless one is named (ESOL's file also holds Delaney's model predictions: never guessed)."""

    title: str
    file_name: str
    hub_id: str
    label_column: str | None = None


EMBEDDED_DATASETS = {
    "lipophilicity": EmbeddedDataset("MoleculeNet Lipophilicity", "Lipophilicity.csv", LIPOPHILICITY_HUB_ID),
    "esol": EmbeddedDataset(
        "ESOL (Delaney)", "ci034243xsi20040112_053635.txt", ESOL_HUB_ID, "measured log(solubility:mol/L)"
    ),
}
# Column names tried when none is given, in tiers of equal plausibility (matched case-insensitively): the
# first tier with a match wins; two matches in one tier are ambiguous and an error.
SMILES_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("smiles",),
    ("canonical_smiles", "smi", "mol", "molecule"),
)
LABEL_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("label", "labels"),
    ("y", "target", "exp", "logd", "value"),
)

# Hub datasets name their held-out splits in several ways; scripts only know these three.
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
_MAX_BAD_ROWS = 10


@dataclass
class RawData:
    """Tables as read, before any SMILES/label checks.

    `frames` is either {"all": df} for a dataset that still has to be split, or holds "train",
    "validation" and/or "test" when the files or the Hub dataset come already split.
    """

    frames: dict[str, pd.DataFrame]
    source: str
    label_column: str | None = None  # the dataset's own label column, used unless one is named

    @property
    def is_presplit(self) -> bool:
        return "all" not in self.frames


def embedded_lipophilicity_path() -> Path:
    """Path of the Lipophilicity CSV shipped inside the `chemloader` package."""
    return embedded_dataset_path("lipophilicity")


def embedded_path(name: str) -> Path:
    """The chemloader file of an `EMBEDDED_DATASETS` name (Lipophilicity's through its own function)."""
    return embedded_lipophilicity_path() if name == "lipophilicity" else embedded_dataset_path(name)


def embedded_dataset_path(name: str) -> Path:
    """Path of a dataset file (`EMBEDDED_DATASETS`) shipped inside the `chemloader` package.

    Only the package location is looked up (no import), because importing chemloader pulls in heavy
    optional dependencies that the toolkit does not need.
    """
    dataset = EMBEDDED_DATASETS[name]
    spec = importlib.util.find_spec("chemloader")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The 'chemloader' package (which ships a copy of {dataset.title}) is not installed; "
            "install it with `pip install chemloader` or pass --train_file/--dataset_name explicitly."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "datasets" / "_local" / dataset.file_name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"chemloader is installed at {list(spec.submodule_search_locations)} but has no "
        f"datasets/_local/{dataset.file_name}; reinstall chemloader or pass the data file explicitly."
    )


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read csv/tsv/json/jsonl/parquet by suffix (a trailing .gz/.bz2/.xz/.zip compression suffix is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in {".gz", ".bz2", ".xz", ".zip"}:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix == ".tsv":
        return pd.read_csv(path, sep="\t")
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    if suffix == ".json":
        try:
            return pd.read_json(path)
        except ValueError:
            # Hugging Face scripts accept JSON-lines files named .json; pandas needs to be told.
            logger.info("%s is not a single JSON document; reading it as JSON lines.", path)
            return pd.read_json(path, lines=True)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(
        f"Cannot read {path}: unknown file type {suffix or '(no suffix)'!r}; "
        "use .csv, .tsv, .json, .jsonl or .parquet."
    )


def load_raw_dataset(
    dataset_name: str | None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> RawData:
    """Read a named dataset or local files; exactly one of the two must be given."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: path for split, path in files.items() if path is not None}
    if dataset_name and files:
        raise ValueError(
            f"Got both dataset_name={dataset_name!r} and data files {sorted(files)}; pass only one of them."
        )
    if files:
        frames = {split: read_table(path) for split, path in files.items()}
        source = ", ".join(f"{split}={path}" for split, path in files.items())
        # one file is a dataset still to be split, like a single-split Hub upload
        if set(frames) == {"train"}:
            frames = {"all": frames["train"]}
        return RawData(frames=frames, source=f"files ({source})")
    if not dataset_name:
        raise ValueError("No data given: set dataset_name (e.g. 'lipophilicity') or train_file.")
    if dataset_name.lower() in EMBEDDED_DATASETS:
        return _load_embedded(dataset_name.lower(), cache_dir)
    return _load_hub_dataset(dataset_name, dataset_config_name, cache_dir)


def _load_embedded(name: str, cache_dir: str | os.PathLike | None) -> RawData:
    """chemloader's copy of an `EMBEDDED_DATASETS` dataset, else its Hub copy (which names its label 'label')."""
    dataset = EMBEDDED_DATASETS[name]
    try:
        path = embedded_path(name)
    except (ImportError, FileNotFoundError) as err:
        logger.warning(
            "Embedded %s copy unavailable (%s); falling back to the Hub dataset %s.",
            dataset.title,
            err,
            dataset.hub_id,
        )
        return _load_hub_dataset(dataset.hub_id, None, cache_dir)
    source = f"{name} (chemloader copy at {path})"
    return RawData(frames={"all": pd.read_csv(path)}, source=source, label_column=dataset.label_column)


def _load_hub_dataset(name: str, config: str | None, cache_dir: str | os.PathLike | None) -> RawData:
    import datasets  # imported lazily: it is slow to import and only needed for Hub datasets

    loaded = datasets.load_dataset(name, config, cache_dir=None if cache_dir is None else str(cache_dir))
    source = f"Hugging Face Hub {name}" + (f" ({config})" if config else "")
    return RawData(frames=frames_from_hub(loaded, source), source=source)


def frames_from_hub(loaded: Any, source: str) -> dict[str, pd.DataFrame]:
    """Convert a `datasets` Dataset/DatasetDict to pandas frames keyed like `RawData.frames`.

    A dataset with a single split is treated as unsplit ({"all": df}): Hub uploads of MoleculeNet put
    everything under "train", and using that as the training set would leave nothing to evaluate on.
    """
    if not isinstance(loaded, Mapping):
        return {"all": loaded.to_pandas()}
    if len(loaded) == 1:
        (only_split,) = loaded
        logger.info("%s has a single split %r; treating it as an unsplit dataset.", source, only_split)
        return {"all": loaded[only_split].to_pandas()}
    frames: dict[str, pd.DataFrame] = {}
    for split_name in loaded:
        key = _SPLIT_ALIASES.get(str(split_name).lower(), str(split_name))
        if key in frames:
            raise ValueError(f"{source} has two splits that both mean {key!r}: {list(loaded)}")
        frames[key] = loaded[split_name].to_pandas()
    return frames


def find_column(
    df: pd.DataFrame,
    explicit: str | None,
    candidates: Sequence[str | Sequence[str]],
    kind: str,
    source: str,
) -> str:
    """Return the `kind` column: `explicit` if given, else the one candidate present (case-insensitive).

    `candidates` are tiers of names (a plain string is a tier of its own), tried in order. A guessed
    column is logged with the file it was found in (WARNING unless it has the first tier's name), so a
    run never uses a column nobody chose without saying so; two columns of the same tier are an error.
    """
    available = [str(c) for c in df.columns]
    if explicit is not None:
        if explicit not in df.columns:
            raise ValueError(
                f"{kind} column {explicit!r} not found in {source}; available columns: {available}"
            )
        return explicit
    tiers = [(c,) if isinstance(c, str) else tuple(c) for c in candidates]
    for level, tier in enumerate(tiers):
        found = [c for c in df.columns if str(c).lower() in {name.lower() for name in tier}]
        lowered = [str(c).lower() for c in found]
        same = [str(c) for c, low in zip(found, lowered, strict=True) if lowered.count(low) > 1]
        if same:
            raise ValueError(
                f"{source} has several {kind} columns differing only in case: {same}; name one explicitly."
            )
        if len(found) > 1:
            raise ValueError(
                f"{source} has several plausible {kind} columns: {[str(c) for c in found]}; "
                f"name the {kind} column explicitly."
            )
        if found:
            logger.log(
                logging.INFO if level == 0 else logging.WARNING,
                "%s: no %s column named; using column %r (guessed from its name; name the column to choose another).",
                source,
                kind,
                str(found[0]),
            )
            return found[0]
    raise ValueError(
        f"No {kind} column found in {source}: looked for {[n for tier in tiers for n in tier]} "
        f"(case-insensitive); available columns: {available}. Name the column explicitly."
    )


def prepare_molecules(
    df: pd.DataFrame,
    smiles_column: str,
    label_column: str | None,
    *,
    source: str,
    strict: bool = False,
    require_labels: bool = True,
    keep_columns: Sequence[str] = (),
    standardize: str | None = None,
) -> pd.DataFrame:
    """Canonicalise SMILES and validate labels, returning a fresh frame.

    Columns: `smiles` (as given), `canonical_smiles` (RDKit, isomeric; of the standardised molecule when
    `standardize` is set), `label` (float, when a label column is given), `row` (the input row number,
    i.e. the frame's integer index, so messages and predictions can be traced back to the file), plus any
    `keep_columns` copied unchanged (e.g. IDs or a predefined split column).

    Invalid SMILES (see `molft.chem.smiles_problem`: text RDKit would read only in part is invalid too)
    are dropped with a warning naming the rows (an error when `strict`); bad labels are always an error,
    because a silently dropped or zero-filled label changes the task. Multi-component molecules (salts,
    mixtures) are reported. `standardize` ("fragment_neutral" or "tautomer", see
    `molft.chem.standardize_mol`; None keeps molecules as written) is applied to every molecule, the
    changes are logged, and the value is kept in `out.attrs["standardize"]` so `save_split` records it.
    """
    standardize = check_standardize(standardize)
    for column in [smiles_column, label_column, *keep_columns]:
        if column is not None and column not in df.columns:
            raise ValueError(
                f"Column {column!r} not found in {source}; available: {[str(c) for c in df.columns]}"
            )
    if label_column is None and require_labels:
        raise ValueError(f"{source}: a label column is required but none was given.")
    rows = df.index.to_numpy() if pd.api.types.is_integer_dtype(df.index) else np.arange(len(df))

    labels = None
    if label_column is not None:
        labels = _checked_labels(df[label_column], rows, label_column, source)

    raw_smiles = df[smiles_column].to_numpy()
    parsed = [_canonical_row(smi, standardize) for smi in raw_smiles]
    canonical = [c for c, _, _, _ in parsed]
    valid = np.array([c is not None for c in canonical], dtype=bool)
    n_invalid = int((~valid).sum())
    if n_invalid:
        bad = [f"row {rows[i]}: {raw_smiles[i]!r} ({parsed[i][1]})" for i in np.flatnonzero(~valid)]
        if strict:
            raise ValueError(
                f"{source}: {n_invalid} SMILES could not be parsed by RDKit as written "
                f"({'; '.join(bad[:_MAX_BAD_ROWS])}{' ...' if n_invalid > _MAX_BAD_ROWS else ''})."
            )
        logger.warning(
            "%s: dropping %d of %d rows whose SMILES are invalid or RDKit cannot parse, e.g. %s",
            source,
            n_invalid,
            len(df),
            "; ".join(bad[:MAX_EXAMPLES]),
        )
    if not valid.any():
        raise ValueError(f"split/file {source} has no valid molecules ({len(df)} rows read).")
    _report_components(parsed, raw_smiles, rows, source, standardize)

    out = pd.DataFrame(
        {
            "smiles": [str(s) for s in raw_smiles[valid]],
            "canonical_smiles": [c for c in canonical if c is not None],
        }
    )
    if labels is not None:
        out["label"] = labels[valid]
    out["row"] = rows[valid].astype(np.int64)
    for column in keep_columns:
        out[column] = df[column].to_numpy()[valid]

    report = duplicate_report(out)
    if report["n_duplicated_molecules"]:
        examples = "; ".join(f"{e['canonical_smiles']} (rows {e['rows']})" for e in report["examples"])
        logger.warning(
            "%s: %d molecules occur more than once (%d extra rows, kept), e.g. %s",
            source,
            report["n_duplicated_molecules"],
            report["n_extra_rows"],
            examples,
        )
    logger.info("%s: %d valid molecules (%d invalid SMILES dropped).", source, len(out), n_invalid)
    if standardize is not None:
        out.attrs["standardize"] = standardize
    return out


def _canonical_row(smiles: object, standardize: str | None) -> tuple[str | None, str | None, int, bool]:
    """(canonical SMILES or None, why invalid, number of components as written, changed by standardize)."""
    mol, problem = parse_smiles(smiles)
    if mol is None:
        return None, problem, 0, False
    canonical = Chem.MolToSmiles(mol)
    if standardize is None:
        return canonical, None, n_components(mol), False
    try:
        standardized = Chem.MolToSmiles(standardize_mol(mol, standardize))
    except Exception as err:  # RDKit raises its own error types for molecules it cannot standardise
        return None, f"standardize={standardize!r} failed: {err}", 0, False
    return standardized, None, n_components(mol), standardized != canonical


def _report_components(
    parsed: Sequence[tuple[str | None, str | None, int, bool]],
    raw_smiles: np.ndarray,
    rows: np.ndarray,
    source: str,
    standardize: str | None,
) -> None:
    """Log multi-component molecules (salts, mixtures) and what standardisation changed."""
    n_valid = sum(c is not None for c, _, _, _ in parsed)

    def examples(positions: list[int], show_result: bool = False) -> str:
        return "; ".join(
            f"row {rows[i]}: {raw_smiles[i]!r}" + (f" -> {parsed[i][0]}" if show_result else "")
            for i in positions[:MAX_EXAMPLES]
        )

    multi = [i for i, (_, _, n, _) in enumerate(parsed) if n > 1]
    if multi and standardize is None:
        logger.warning(
            "%s: %d of %d molecules have several components (salts or mixtures) and are used whole, e.g. %s. "
            "Standardise them (keep the largest fragment) or remove them if that is not intended.",
            source,
            len(multi),
            n_valid,
            examples(multi),
        )
    elif multi:
        logger.info(
            "%s: %d of %d molecules have several components (salts or mixtures), e.g. %s; "
            "standardize=%r keeps the largest fragment.",
            source,
            len(multi),
            n_valid,
            examples(multi),
            standardize,
        )
    if standardize is not None:
        changed = [i for i, (_, _, _, c) in enumerate(parsed) if c]
        logger.log(
            logging.WARNING if changed else logging.INFO,
            "%s: standardize=%r changed %d of %d molecules%s",
            source,
            standardize,
            len(changed),
            n_valid,
            f", e.g. {examples(changed, show_result=True)}" if changed else ".",
        )


def _checked_labels(values: pd.Series, rows: np.ndarray, column: str, source: str) -> np.ndarray:
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~np.isfinite(numeric))
    if bad.size:
        raw = values.to_numpy()
        # strings quoted (they show what was typed), numbers plain (nan, not np.float64(nan))
        shown = "; ".join(
            f"row {rows[i]}: {raw[i]!r}" if isinstance(raw[i], str) else f"row {rows[i]}: {raw[i]}"
            for i in bad[:_MAX_BAD_ROWS]
        )
        raise ValueError(
            f"{source}: {bad.size} labels in column {column!r} are missing, infinite or not numeric "
            f"({shown}{' ...' if bad.size > _MAX_BAD_ROWS else ''}). Fix or remove these rows."
        )
    return numeric
