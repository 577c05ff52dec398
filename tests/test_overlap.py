"""molft.overlap: repeated molecules, external molecules shared with held-out splits, dataset fingerprints."""

from __future__ import annotations

import hashlib
import logging

import pandas as pd

from molft.data import prepare_molecules
from molft.overlap import dataset_fingerprint, drop_overlap, duplicate_report


def _prepared(smiles: list[str], labels: list[float] | None = None) -> pd.DataFrame:
    columns = {"smiles": smiles} if labels is None else {"smiles": smiles, "y": labels}
    return prepare_molecules(
        pd.DataFrame(columns), "smiles", None if labels is None else "y", source="t", require_labels=False
    )


def test_duplicate_report_without_duplicates():
    out = _prepared(["CCO", "CCN"], [1, 2])
    assert duplicate_report(out) == {
        "n_duplicated_molecules": 0,
        "n_extra_rows": 0,
        "examples": [],
        "max_label_spread": 0.0,
    }


def test_drop_overlap_reports_per_split_and_drops(caplog):
    extra = _prepared(["CCO", "CCN", "c1ccccc1", "CCCl", "OCC"])
    heldout = {"validation": _prepared(["NCC", "CCCC"]), "test": _prepared(["C1=CC=CC=C1", "CCN"])}
    with caplog.at_level(logging.WARNING, logger="molft.overlap"):
        kept, report = drop_overlap(extra, heldout)
    assert report == {"validation": 1, "test": 2, "dropped": 2}
    assert kept["canonical_smiles"].tolist() == ["CCO", "CCCl", "CCO"]
    assert kept["smiles"].tolist() == ["CCO", "CCCl", "OCC"]
    assert kept["row"].tolist() == [0, 3, 4]
    assert any("2 of 5 molecules also occur" in r.getMessage() for r in caplog.records)


def test_drop_overlap_can_keep_but_still_reports(caplog):
    extra = _prepared(["CCO", "CCN"])
    with caplog.at_level(logging.WARNING, logger="molft.overlap"):
        kept, report = drop_overlap(extra, {"test": _prepared(["CCN"])}, drop=False)
    assert report == {"test": 1, "dropped": 0}
    assert len(kept) == 2
    assert any("KEPT" in r.getMessage() for r in caplog.records)


def test_dataset_fingerprint_is_sha256_of_ordered_smiles():
    expected = hashlib.sha256(b"CCO\nc1ccccc1\n").hexdigest()
    assert dataset_fingerprint(["CCO", "c1ccccc1"]) == expected
    assert dataset_fingerprint(["c1ccccc1", "CCO"]) != expected
    assert dataset_fingerprint(["CCOc1ccccc1"]) != expected
