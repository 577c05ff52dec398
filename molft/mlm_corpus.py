"""The masked-LM corpus: which molecules run_mlm.py trains and evaluates on, and a record of how they were chosen.

Molecules of held-out sets (a split.json's validation and test molecules, any `exclude_files`) are never
trained on: they are removed by canonical SMILES and the overlap is logged and recorded in the summary that
run_mlm.py writes as `mlm_data_summary.json`.

With `max_train_samples` only the molecules needed are checked with RDKit (see `_sampled_corpus`), so a
quick run on a slice of a large corpus does not parse the whole file. `standardize` applies to every
molecule read (corpus, validation and exclude files) and must be the one the split.json was made with.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rdkit import Chem

from molft.chem import canonical_smiles, check_standardize, mol_from_smiles, standardize_mol
from molft.data import SMILES_CANDIDATES, find_column, load_raw_dataset, prepare_molecules, read_table
from molft.io import read_json
from molft.overlap import dataset_fingerprint, drop_overlap
from molft.splits import read_split_smiles

if TYPE_CHECKING:
    from molft.mlm import MlmDataArguments

logger = logging.getLogger(__name__)

PLAIN_SMILES_SUFFIXES = (".txt", ".smi")
_MAX_EXAMPLES = 5


@dataclass
class MlmCorpus:
    """Canonical SMILES to train and evaluate on, and a record of how they were chosen."""

    train: list[str]
    validation: list[str]
    summary: dict[str, Any]


def read_smiles_table(path: str | os.PathLike, smiles_column: str | None = None) -> tuple[pd.DataFrame, str]:
    """A SMILES file as read (no RDKit yet) and the name of its SMILES column."""
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
    return table, find_column(table, smiles_column, SMILES_CANDIDATES, "SMILES", str(path))


def read_smiles_file(
    path: str | os.PathLike,
    smiles_column: str | None = None,
    strict: bool = False,
    standardize: str | None = None,
) -> pd.DataFrame:
    """A SMILES file as a prepared frame (`smiles`, `canonical_smiles`, `row`); unparseable rows dropped or fatal."""
    table, column = read_smiles_table(path, smiles_column)
    return prepare_molecules(
        table, column, None, source=str(path), strict=strict, require_labels=False, standardize=standardize
    )


def corpus_standardize(data_args: MlmDataArguments) -> str | None:
    """The checked `standardize` of the corpus options (None: molecules as written)."""
    return check_standardize(getattr(data_args, "standardize", None))


def standardized_canonical(smiles: object, standardize: str | None) -> str | None:
    """Canonical SMILES of the (standardised) molecule, or None when it is invalid or cannot be standardised."""
    if not standardize:
        return canonical_smiles(smiles)
    mol = mol_from_smiles(smiles)
    if mol is None:
        return None
    try:
        return Chem.MolToSmiles(standardize_mol(mol, standardize))
    except Exception:  # RDKit raises its own error types for molecules it cannot standardise
        return None


def check_split_standardize(split_file: str | os.PathLike, standardize: str | None) -> None:
    """A split.json's molecules are comparable with the corpus only under the same standardisation."""
    made_with = read_json(split_file).get("standardize")
    if made_with != standardize:
        raise ValueError(
            f"split.json {split_file} was made with standardize={made_with!r}, the corpus uses {standardize!r}: "
            "give the run's --standardize, or its held-out molecules would not be recognised."
        )


def _read_plain_smiles(path: Path) -> pd.DataFrame:
    # one molecule per line; a .smi line may carry a name after whitespace; a header line is allowed
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    lines = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    names = {
        name.lower() for tier in SMILES_CANDIDATES for name in ([tier] if isinstance(tier, str) else tier)
    }
    if lines and lines[0].lower() in names:
        lines = lines[1:]
    return pd.DataFrame({"smiles": lines})


def training_frame(data_args: MlmDataArguments, cache_dir: str | None = None) -> tuple[pd.DataFrame, dict]:
    """All molecules the run may learn from, before held-out molecules are removed."""
    sources: dict[str, dict[str, int]] = {}
    frames = []
    standardize = corpus_standardize(data_args)
    if data_args.dataset_name is not None:
        frame = split_train_molecules(data_args.dataset_name, data_args.split_file, cache_dir, standardize)
        sources[_split_source(data_args)] = {"molecules": len(frame)}
        frames.append(frame)
    elif data_args.train_file is not None:
        frame = read_smiles_file(
            data_args.train_file, data_args.smiles_column, data_args.strict_smiles, standardize
        )
        sources[str(data_args.train_file)] = {"molecules": len(frame)}
        frames.append(frame)
    else:
        raise ValueError("No training corpus: set train_file, or dataset_name together with split_file.")
    if data_args.include_file is not None:
        extra = read_smiles_file(
            data_args.include_file, data_args.smiles_column, data_args.strict_smiles, standardize
        )
        sources[str(data_args.include_file)] = {"molecules": len(extra)}
        frames.append(extra)
    return pd.concat(frames, ignore_index=True)[["canonical_smiles"]], sources


def _split_source(data_args: MlmDataArguments) -> str:
    return f"{data_args.dataset_name} (train split of {data_args.split_file})"


def split_train_molecules(
    dataset_name: str, split_file: str, cache_dir: str | None = None, standardize: str | None = None
) -> pd.DataFrame:
    """The dataset's molecules that the split.json puts in its train split (checks the split fits the data)."""
    check_split_standardize(split_file, standardize)
    raw = load_raw_dataset(dataset_name, cache_dir=cache_dir)
    table = pd.concat(raw.frames.values(), ignore_index=True)
    column = find_column(table, None, SMILES_CANDIDATES, "SMILES", raw.source)
    molecules = prepare_molecules(
        table, column, None, source=raw.source, require_labels=False, standardize=standardize
    )
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


def heldout_frames(data_args: MlmDataArguments) -> dict[str, pd.DataFrame]:
    """Held-out molecule sets by name: the split's validation/test plus every exclude file."""
    paths = ([data_args.split_file] if data_args.split_file else []) + list(data_args.exclude_files)
    heldout: dict[str, pd.DataFrame] = {}
    standardize = corpus_standardize(data_args)
    for path in paths:
        if str(path).lower().endswith(".json"):
            check_split_standardize(path, standardize)
            split = read_split_smiles(path)
            for name in ("validation", "test"):
                heldout[f"{path} ({name})"] = pd.DataFrame({"canonical_smiles": split[name]})
        else:
            heldout[str(path)] = read_smiles_file(path, standardize=standardize)[["canonical_smiles"]]
    return heldout


def evaluation_corpus(data_args: MlmDataArguments) -> MlmCorpus:
    """Only --validation_file's molecules: an evaluation-only run (do_train false) needs no training corpus."""
    if data_args.validation_file is None:
        raise ValueError("An evaluation-only run (do_train false) needs --validation_file.")
    validation = _validation_file_smiles(data_args)
    summary: dict[str, Any] = {"sources": {str(data_args.validation_file): {"molecules": len(validation)}}}
    if data_args.max_eval_samples is not None:
        validation = validation[: data_args.max_eval_samples]
    summary.update(n_train=0, n_validation=len(validation))
    logger.info("Evaluation only: %d molecules of %s.", len(validation), data_args.validation_file)
    return MlmCorpus(train=[], validation=validation, summary=summary)


def prepare_corpus(data_args: MlmDataArguments, seed: int, cache_dir: str | None = None) -> MlmCorpus:
    """Read, clean, de-leak, deduplicate and split the molecules; record every count on the way."""
    if data_args.max_train_samples is not None:
        return _sampled_corpus(data_args, seed, cache_dir)
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

    validation_smiles = _validation_file_smiles(data_args)
    if validation_smiles is not None:
        held_out = set(validation_smiles)
        train = [smi for smi in molecules if smi not in held_out]
        _record_validation_overlap(summary, len(molecules) - len(train), train, data_args)
    else:
        n_validation = _n_validation(len(molecules), data_args.validation_split_percentage)
        validation_smiles, train = molecules[:n_validation], molecules[n_validation:]
    return _finish(train, validation_smiles, summary, data_args)


def _validation_file_smiles(data_args: MlmDataArguments) -> list[str] | None:
    if data_args.validation_file is None:
        return None
    validation = read_smiles_file(
        data_args.validation_file,
        data_args.smiles_column,
        data_args.strict_smiles,
        corpus_standardize(data_args),
    )
    return validation["canonical_smiles"].drop_duplicates().tolist()


def _record_validation_overlap(
    summary: dict[str, Any], n_dropped: int, train: list[str], data_args: MlmDataArguments
) -> None:
    summary["validation_overlap_dropped"] = n_dropped
    if n_dropped:
        logger.warning(
            "%d training molecules are also in %s; they are evaluated on, not trained on.",
            n_dropped,
            data_args.validation_file,
        )
    if not train:
        raise ValueError(f"Every training molecule is in {data_args.validation_file}; nothing to train on.")


def _n_validation(n_molecules: int, percentage: float) -> int:
    n_validation = math.ceil(n_molecules * percentage / 100)
    if n_validation >= n_molecules:
        raise ValueError(
            f"The corpus has {n_molecules} molecules: too few to hold out "
            f"{percentage}% for validation and still train."
        )
    return n_validation


def _finish(
    train: list[str], validation: list[str], summary: dict[str, Any], data_args: MlmDataArguments
) -> MlmCorpus:
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        validation = validation[: data_args.max_eval_samples]
    summary.update(n_train=len(train), n_validation=len(validation))
    logger.info("Corpus: %d training and %d validation molecules.", len(train), len(validation))
    return MlmCorpus(train=train, validation=validation, summary=summary)


# ----------------------------------------------------------------------------------------------------------
# With max_train_samples: check only the molecules that are used
# ----------------------------------------------------------------------------------------------------------


def _sampled_corpus(data_args: MlmDataArguments, seed: int, cache_dir: str | None) -> MlmCorpus:
    """The corpus of `prepare_corpus`, RDKit-checking rows in a seeded random order only until enough are found.

    The rows of the files are shuffled with the seed and split by position as the whole-corpus route splits
    molecules: the first `validation_split_percentage` percent of the rows hold the validation molecules,
    the rest the training ones. Each part is read in order, skipping invalid, held-out and repeated
    molecules, until it has `max_eval_samples` / `max_train_samples` molecules. When every row is a valid,
    distinct molecule outside the held-out sets, this picks exactly the molecules the whole-corpus route
    picks; otherwise the pick differs from it but is still fixed by the seed.
    """
    rows, sources = _training_rows(data_args, cache_dir)
    heldout = heldout_frames(data_args)
    heldout_sets = [set(frame["canonical_smiles"]) for frame in heldout.values()]
    order = np.random.default_rng(seed).permutation(len(rows))
    walk = _RowWalk(rows["smiles"].to_numpy(), corpus_standardize(data_args))
    validation_smiles = _validation_file_smiles(data_args)
    from_file = validation_smiles is not None
    seen: set[str] = set()
    if from_file:
        n_validation_rows = 0
    else:
        n_validation_rows = _n_validation(len(rows), data_args.validation_split_percentage)
        validation_smiles = walk.take(
            order[:n_validation_rows], data_args.max_eval_samples, _new_molecule(heldout_sets, (), seen)
        )
    excluded = set(validation_smiles) if from_file else ()
    train = walk.take(
        order[n_validation_rows:], data_args.max_train_samples, _new_molecule(heldout_sets, excluded, seen)
    )

    checked = rows.iloc[walk.checked]
    canonical = pd.Series(walk.canonical, index=checked.index)
    _report_invalid(checked[canonical.isna()], data_args.strict_smiles)
    valid = pd.DataFrame({"canonical_smiles": canonical.dropna()})
    summary: dict[str, Any] = {
        "sources": sources,
        "n_rows": len(rows),
        "n_checked": len(checked),
        "n_read": len(valid),
    }
    if heldout:
        valid, overlap = drop_overlap(valid, heldout)
        summary["heldout_sets"] = {name: len(frame) for name, frame in heldout.items()}
        summary["heldout_overlap"] = overlap
        logger.info("Held-out check: %d checked molecules removed (%s).", overlap["dropped"], overlap)
    in_file = valid["canonical_smiles"].isin(excluded) if from_file else np.zeros(len(valid), dtype=bool)
    used = train + ([] if from_file else validation_smiles)
    summary["duplicates_dropped"] = int((~in_file).sum()) - len(used)
    summary["n_corpus"] = len(used)
    summary["corpus_fingerprint"] = dataset_fingerprint(sorted(used))
    if from_file:
        _record_validation_overlap(summary, int(in_file.sum()), train, data_args)
    if not train:
        raise ValueError("No checked training molecule is left to train on (invalid, held-out or repeated).")
    logger.info(
        "Checked %d of %d corpus rows with RDKit, as many as the molecules used needed.",
        len(checked),
        len(rows),
    )
    return _finish(train, validation_smiles, summary, data_args)


def _training_rows(data_args: MlmDataArguments, cache_dir: str | None) -> tuple[pd.DataFrame, dict]:
    """The training sources' SMILES as given (`smiles`, `source`, `row`), not yet checked with RDKit."""
    sources: dict[str, dict[str, int]] = {}
    frames = []
    if data_args.dataset_name is not None:
        frame = split_train_molecules(
            data_args.dataset_name, data_args.split_file, cache_dir, corpus_standardize(data_args)
        )
        frames.append(_rows(frame["smiles"], _split_source(data_args), frame["row"]))
    elif data_args.train_file is not None:
        table, column = read_smiles_table(data_args.train_file, data_args.smiles_column)
        frames.append(_rows(table[column], str(data_args.train_file)))
    else:
        raise ValueError("No training corpus: set train_file, or dataset_name together with split_file.")
    if data_args.include_file is not None:
        table, column = read_smiles_table(data_args.include_file, data_args.smiles_column)
        frames.append(_rows(table[column], str(data_args.include_file)))
    for frame in frames:
        sources[frame["source"].iloc[0]] = {"rows": len(frame)}
    return pd.concat(frames, ignore_index=True), sources


def _rows(smiles: pd.Series, source: str, row: Sequence[int] | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "smiles": smiles.to_numpy(),
            "source": source,
            "row": np.arange(len(smiles)) if row is None else np.asarray(row),
        }
    )


def _new_molecule(
    heldout_sets: list[set[str]], excluded: Collection[str], seen: set[str]
) -> Callable[[str], bool]:
    """Whether a checked molecule is taken: not held out, not excluded, not taken before (then remembered)."""

    def accept(smiles: str) -> bool:
        if any(smiles in heldout for heldout in heldout_sets) or smiles in excluded or smiles in seen:
            return False
        seen.add(smiles)
        return True

    return accept


class _RowWalk:
    """Canonicalises rows one at a time, remembering every row it checked and its canonical SMILES."""

    def __init__(self, smiles: np.ndarray, standardize: str | None = None):
        self.smiles = smiles
        self.standardize = standardize
        self.checked: list[int] = []
        self.canonical: list[str | None] = []

    def take(self, order: np.ndarray, limit: int | None, accept: Callable[[str], bool]) -> list[str]:
        """Up to `limit` accepted molecules from the rows in `order`, checking no row beyond the last one taken."""
        taken: list[str] = []
        for index in order:
            if limit is not None and len(taken) >= limit:
                break
            molecule = standardized_canonical(self.smiles[index], self.standardize)
            self.checked.append(int(index))
            self.canonical.append(molecule)
            if molecule is not None and accept(molecule):
                taken.append(molecule)
        return taken


def _report_invalid(invalid: pd.DataFrame, strict: bool) -> None:
    if invalid.empty:
        return
    examples = "; ".join(
        f"{source} row {row}: {smiles!r}"
        for source, row, smiles in invalid[["source", "row", "smiles"]]
        .head(_MAX_EXAMPLES)
        .itertuples(index=False)
    )
    if strict:
        raise ValueError(f"{len(invalid)} SMILES could not be parsed by RDKit ({examples}).")
    logger.warning(
        "Dropping %d checked rows whose SMILES RDKit cannot parse, e.g. %s", len(invalid), examples
    )
