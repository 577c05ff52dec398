"""molft.extra_data: external molecules for the training split, checked, kept off held-out splits, weighted."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from molft.data import prepare_molecules
from molft.extra_data import load_extra
from molft.run_data import RegressionDataArguments


def split_frames() -> dict[str, pd.DataFrame]:
    def frame(smiles: list[str]) -> pd.DataFrame:
        table = pd.DataFrame({"smiles": smiles, "y": np.arange(len(smiles), dtype=float)})
        return prepare_molecules(table, "smiles", "y", source="t")

    return {"train": frame(["CCO", "CCC"]), "validation": frame(["CCN"]), "test": frame(["c1ccccc1"])}


def options(path, **extra) -> RegressionDataArguments:
    return RegressionDataArguments(
        extra_train_file=str(path), extra_smiles_column="smiles", extra_label_column="label", **extra
    )


def test_held_out_molecules_are_dropped_and_train_ones_counted(tmp_path, caplog):
    path = tmp_path / "pool.csv"
    pd.DataFrame({
        "smiles": ["OCC", "NCC", "C1=CC=CC=C1", "CCCl", "not a smiles"],  # CCO, CCN, benzene, new, invalid
        "label": [1.0, 2.0, 3.0, 4.0, 5.0],
    }).to_csv(path, index=False)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        extra, report = load_extra(options(path), split_frames())
    assert extra["canonical_smiles"].tolist() == ["CCO", "CCCl"]
    assert extra["row"].tolist() == [0, 3] and set(extra["split"]) == {"train"}
    assert set(extra["source"]) == {"extra:pool.csv"}
    assert report == {
        "extra_train_file": str(path), "n_rows": 5, "n_valid": 4, "n_added": 2,
        "overlap_with_heldout": {"validation": 1, "test": 1, "dropped": 2}, "already_in_train": 1,
        "weights": None,
    }  # fmt: skip
    assert "1 extra molecules are already in the training split (kept as extra rows)" in caplog.text


def test_weights_are_mapped_and_bad_ones_named_by_file_row(tmp_path):
    path = tmp_path / "pool.csv"
    pd.DataFrame({"smiles": ["CCCl", "CCBr"], "label": [1.0, 2.0], "w": [0.5, 2.0]}).to_csv(path, index=False)
    frames = split_frames()
    extra, report = load_extra(options(path, extra_train_weights="w"), frames)
    assert extra["sample_weight"].tolist() == [0.5, 2.0]
    assert frames["train"]["sample_weight"].tolist() == [1.0, 1.0]  # the split's molecules weigh 1
    assert report["weights"] == {"column": "w", "mapping": "identity"}
    pd.DataFrame({"smiles": ["CCCl", "CCBr"], "label": [1.0, 2.0], "w": [0.5, -1.0]}).to_csv(
        path, index=False
    )
    with pytest.raises(ValueError, match=r"weight column 'w' is negative at rows \[1\]"):
        load_extra(options(path, extra_train_weights="w"), split_frames())


def test_a_file_of_held_out_molecules_only_is_an_error(tmp_path):
    path = tmp_path / "pool.csv"
    pd.DataFrame({"smiles": ["NCC"], "label": [1.0]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"No extra molecules are left from .*pool.csv .*'dropped': 1"):
        load_extra(options(path), split_frames())
