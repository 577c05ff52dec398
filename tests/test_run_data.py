"""molft.run_data: a run's dataset prepared once, and rebuilt by the downstream scripts from its split.json."""

from __future__ import annotations

import pandas as pd
import pytest

from molft.data import prepare_molecules
from molft.run_data import RegressionDataArguments, RunDataArguments, prepare_data
from molft.splits import make_split, save_split

SMILES = [
    "CCO", "CCN", "CCC", "CCCl", "CCBr", "CC(=O)O", "CC(=O)N", "c1ccccc1", "c1ccncc1", "c1ccoc1",
    "CCOC", "CCCO", "CCCN", "CCCC", "OCCO", "NCCN", "CC(C)O", "CC(C)N", "CC(C)C", "c1ccsc1",
]  # fmt: skip


@pytest.fixture
def run_files(tmp_path):
    frame = pd.DataFrame({"smiles": SMILES, "y": [0.1 * i for i in range(len(SMILES))]})
    data_file = tmp_path / "data.csv"
    frame.to_csv(data_file, index=False)
    prepared = prepare_molecules(frame, "smiles", "y", source=str(data_file))
    split = make_split(prepared, "random", seed=3)
    split_file = tmp_path / "split.json"
    save_split(split_file, prepared, split, dataset_source=str(data_file))
    return data_file, split_file, prepared, split


def test_load_frames_rebuilds_the_runs_split(run_files):
    data_file, split_file, prepared, split = run_files
    frames = RunDataArguments(split_file=str(split_file), train_file=str(data_file)).load_frames()
    assert {name: len(frame) for name, frame in frames.items()} == split.sizes
    for name, idx in split.indices().items():
        assert frames[name]["canonical_smiles"].tolist() == prepared["canonical_smiles"].iloc[idx].tolist()
        assert frames[name]["label"].tolist() == pytest.approx(prepared["label"].iloc[idx].tolist())


def test_load_frames_refuses_other_data(run_files, tmp_path):
    _, split_file, _, _ = run_files
    other = tmp_path / "other.csv"
    pd.DataFrame({"smiles": SMILES[::-1], "y": range(len(SMILES))}).to_csv(other, index=False)
    with pytest.raises(ValueError, match="different dataset"):
        RunDataArguments(split_file=str(split_file), train_file=str(other)).load_frames()


def test_load_frames_needs_a_split_file():
    with pytest.raises(ValueError, match="--split_file"):
        RunDataArguments().load_frames()


def test_use_model_split_takes_the_runs_own_file(run_files, tmp_path):
    _, split_file, _, _ = run_files  # written into tmp_path, as run_regression.py writes it beside the model
    args = RunDataArguments()
    args.use_model_split(str(tmp_path), required=True)
    assert args.split_file == str(split_file)
    given = RunDataArguments(split_file="elsewhere/split.json")
    given.use_model_split(str(tmp_path), required=True)
    assert given.split_file == "elsewhere/split.json"


def test_use_model_split_without_a_file(tmp_path):
    optional = RunDataArguments()
    optional.use_model_split(str(tmp_path), required=False)
    assert optional.split_file is None
    with pytest.raises(FileNotFoundError, match="holds no split.json"):
        RunDataArguments().use_model_split(str(tmp_path), required=True)


def test_presplit_files_are_the_same_dataset_for_the_run_and_its_readers(tmp_path):
    frame = pd.DataFrame({"smiles": SMILES, "y": [0.1 * i for i in range(len(SMILES))]})
    files = {}
    for name, rows in (("train", slice(0, 14)), ("validation", slice(14, 17)), ("test", slice(17, 20))):
        files[name] = str(tmp_path / f"{name}.csv")
        frame.iloc[rows].to_csv(files[name], index=False)
    options = {
        "train_file": files["train"],
        "validation_file": files["validation"],
        "test_file": files["test"],
    }
    data = prepare_data(RegressionDataArguments(**options))
    assert data.is_presplit and data.split.sizes == {"train": 14, "validation": 3, "test": 3}
    save_split(tmp_path / "split.json", data.dataset, data.split, dataset_source=data.source)
    frames = RunDataArguments(split_file=str(tmp_path / "split.json"), **options).load_frames()
    for name, part in frames.items():
        assert part["canonical_smiles"].tolist() == data.frames[name]["canonical_smiles"].tolist()
    with pytest.raises(
        ValueError, match=r"Pre-split data needs train, validation and test parts; missing \['test'\]"
    ):
        RunDataArguments(
            split_file=str(tmp_path / "split.json"), **{**options, "test_file": None}
        ).load_frames()
