"""molft.run_data: a run's dataset prepared once, and rebuilt by the downstream scripts from its split.json."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from molft.data import prepare_molecules
from molft.io import read_json
from molft.run_data import PreparedData, RegressionDataArguments, RunDataArguments, prepare_data
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


# ------------------------------------------------------------------------- the run's record (issue #11, 10)


def _own_data(tmp_path):
    """A user's file with column names nobody would guess, and salts the run standardises."""
    smiles = SMILES[:18] + ["CC[NH3+].[Cl-]", "[Na+].[O-]C(=O)c1ccccc1"]
    frame = pd.DataFrame({"structure": smiles, "pIC50": [0.1 * i for i in range(len(smiles))]})
    path = tmp_path / "own.csv"
    frame.to_csv(path, index=False)
    options = {
        "train_file": str(path),
        "smiles_column": "structure",
        "label_column": "pIC50",
        "standardize": "fragment_neutral",
    }
    data = prepare_data(RegressionDataArguments(**options, split_seed=3))
    save_split(
        tmp_path / "split.json",
        data.dataset,
        data.split,
        dataset_source=data.source,
        columns=data.columns,
        data=data.record,
    )
    return path, data


def test_split_json_records_the_data_files_columns_and_standardisation(tmp_path):
    path, data = _own_data(tmp_path)
    record = read_json(tmp_path / "split.json")
    assert record["columns"] == {"smiles_column": "structure", "label_column": "pIC50"}
    assert record["standardize"] == "fragment_neutral"
    assert record["data"]["train_file"] == str(path.resolve()) and record["data"]["dataset_name"] is None
    assert record["data"]["file_sha256"] == {"train_file": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert data.label_name == "pIC50"
    assert "CCN" in data.dataset["canonical_smiles"].tolist()  # the salt, standardised
    # run_config.json's data section holds the columns used, not the flags (which may be None)
    guessed_file = tmp_path / "guessed.csv"
    pd.read_csv(path).rename(columns={"structure": "SMILES", "pIC50": "Label"}).to_csv(
        guessed_file, index=False
    )
    guessed = prepare_data(RegressionDataArguments(train_file=str(guessed_file)))
    resolved = guessed.resolved_options(RegressionDataArguments(train_file=str(guessed_file)))
    assert (resolved["smiles_column"], resolved["label_column"], resolved["standardize"]) == (
        "SMILES",
        "Label",
        None,
    )


def test_a_finished_run_is_enough_to_rebuild_its_data(tmp_path):
    path, data = _own_data(tmp_path)
    args = RunDataArguments(split_file=str(tmp_path / "split.json"))
    frames = args.load_frames()
    assert (args.train_file, args.smiles_column, args.label_column) == (
        str(path.resolve()),
        "structure",
        "pIC50",
    )
    assert (
        args.standardize == "fragment_neutral" and args.dataset_name is None and args.strict_smiles is False
    )
    for name, frame in frames.items():
        assert frame["canonical_smiles"].tolist() == data.frames[name]["canonical_smiles"].tolist()
    # a flag still overrides: another file is another dataset
    other = tmp_path / "other.csv"
    pd.read_csv(path).iloc[::-1].to_csv(other, index=False)
    with pytest.raises(ValueError, match="different dataset"):
        RunDataArguments(split_file=str(tmp_path / "split.json"), train_file=str(other)).load_frames()
    with pytest.raises(
        ValueError, match="was made with standardize='fragment_neutral', this data with 'tautomer'"
    ):
        RunDataArguments(split_file=str(tmp_path / "split.json"), standardize="tautomer").load_frames()
    with pytest.raises(ValueError, match="was made with standardize='fragment_neutral', this data with None"):
        RunDataArguments(split_file=str(tmp_path / "split.json"), standardize="none").load_frames()


def test_a_recorded_file_that_changed_or_moved_is_an_error_naming_it(tmp_path):
    path, _ = _own_data(tmp_path)
    split_file = str(tmp_path / "split.json")
    path.write_text(path.read_text() + "CCCCCC,9.9\n")  # one more row: the split would index other rows
    with pytest.raises(
        ValueError, match=rf"The run's train_file {path.resolve()} has changed since the run read it"
    ):
        RunDataArguments(split_file=split_file).load_frames()
    path.unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"The run's train_file {path.resolve()} \(recorded in .*split.json\)"
    ):
        RunDataArguments(split_file=split_file).load_frames()


def test_older_runs_fill_from_run_config(tmp_path):
    """A split.json written before it recorded its data: run_config.json beside it has the flags."""
    path, _ = _own_data(tmp_path)
    record = read_json(tmp_path / "split.json")
    del record["data"]
    (tmp_path / "split.json").write_text(json.dumps(record))
    flags = {"dataset_name": "lipophilicity", "train_file": str(path), "smiles_column": "structure"}
    flags |= {"label_column": "pIC50", "standardize": "fragment_neutral", "strict_smiles": False}
    (tmp_path / "run_config.json").write_text(json.dumps({"data": flags}))
    args = RunDataArguments(split_file=str(tmp_path / "split.json"))
    assert len(args.load_frames()["train"]) == 16
    assert args.dataset_name is None and args.train_file == str(path)  # files win over dataset_name


def test_standardize_is_checked_and_reaches_the_extra_molecules(tmp_path):
    with pytest.raises(ValueError, match=r"standardize must be one of \['fragment_neutral', 'tautomer'\]"):
        RegressionDataArguments(standardize="salts")
    assert RegressionDataArguments(standardize="none").standardize is None
    with pytest.raises(ValueError, match="got 'salt'"):
        RunDataArguments(standardize="salt")
    path, _ = _own_data(tmp_path)
    extra = tmp_path / "extra.csv"
    pd.DataFrame({"smiles": ["CCCC[NH3+].[Br-]"], "label": [1.0]}).to_csv(extra, index=False)
    data = prepare_data(
        RegressionDataArguments(
            train_file=str(path),
            smiles_column="structure",
            label_column="pIC50",
            standardize="fragment_neutral",
            split_seed=3,
            extra_train_file=str(extra),
        )
    )
    assert data.extra["canonical_smiles"].tolist() == ["CCCCN"]
    assert data.frames["train"]["canonical_smiles"].iloc[-1] == "CCCCN"


def test_label_name_of_lipophilicity_is_logd():
    data = PreparedData(
        pd.DataFrame(),
        None,
        {},
        "lipophilicity",
        record={"dataset_name": "lipophilicity"},
        columns={"label_column": "exp"},
    )
    assert data.label_name == "logD"


def test_a_reader_without_record_or_options_reads_lipophilicity(run_files, tmp_path):
    """No record and no source given: the default dataset (whose split this is not: the check says so)."""
    _, split_file, _, _ = run_files
    args = RunDataArguments(split_file=str(split_file))
    with pytest.raises(ValueError, match="different dataset"):
        args.load_frames()
    assert args.dataset_name == "lipophilicity" and args.strict_smiles is False
