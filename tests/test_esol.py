"""ESOL as an embedded dataset (`--dataset_name esol`) and the demo tables built from the embedded copies."""

from __future__ import annotations

import pandas as pd
import pytest

from molft import preflight
from molft.data import EMBEDDED_DATASETS, ESOL_HUB_ID, embedded_path, load_raw_dataset
from molft.run_data import RegressionDataArguments, load_dataset, prepare_data

MEASURED = "measured log(solubility:mol/L)"


@pytest.fixture(scope="module")
def esol_file():
    try:
        return embedded_path("esol")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"chemloader's ESOL copy not available: {err}")


def test_esol_loads_every_molecule_with_its_measured_solubility(esol_file):
    raw = load_raw_dataset("ESOL")
    assert esol_file.name == "ci034243xsi20040112_053635.txt" and "chemloader" in raw.source
    assert raw.label_column == MEASURED
    dataset, split, source, columns = load_dataset(RegressionDataArguments(dataset_name="esol"))
    assert len(dataset) == 1144 and split is None  # Delaney's 1,144 molecules, all valid
    assert columns == {"smiles_column": "SMILES", "label_column": MEASURED}  # never "ESOL predicted ..."
    table = pd.read_csv(esol_file)
    assert dataset["label"].tolist() == table[MEASURED].tolist()
    assert dataset["label"].iloc[0] == -2.18 and dataset["smiles"].iloc[0] == "ClCC(Cl)(Cl)Cl"


def test_esol_runs_like_lipophilicity(esol_file):
    data = prepare_data(RegressionDataArguments(dataset_name="esol"))
    assert data.split.sizes == {"train": 916, "validation": 114, "test": 114}
    assert data.label_name == "logS" and data.record["dataset_name"] == "esol"
    assert preflight.hub_dataset("esol", local_files=False) is None  # no download needed


def test_esol_falls_back_to_its_hub_copy(monkeypatch):
    def missing(name):
        raise ImportError("chemloader not installed")

    monkeypatch.setattr("molft.data.embedded_dataset_path", missing)
    assert preflight.hub_dataset("esol", local_files=False) == ESOL_HUB_ID
    assert EMBEDDED_DATASETS["esol"].hub_id == ESOL_HUB_ID


def test_demo_tables(esol_file, tmp_path, capsys):
    from scripts.make_demo_tables import DERIVED_CLASSES_FILE, TWO_TARGETS_FILE, main

    main(["--output_dir", str(tmp_path)])
    two = pd.read_csv(tmp_path / TWO_TARGETS_FILE)
    assert (
        len(two) == 4200 + 1144 - 50
        and two["logD"].notna().sum() == 4200
        and two["logS"].notna().sum() == 1144
    )
    assert (two[["logD", "logS"]].notna().sum(axis=1) >= 1).all()
    assert (two["source"] == "lipo+esol").sum() == 50  # the molecules in both datasets have both labels
    derived = pd.read_csv(tmp_path / DERIVED_CLASSES_FILE)
    lipo = pd.read_csv(embedded_path("lipophilicity"))
    assert derived["logD_gt_3"].tolist() == (lipo["exp"] > 3).astype(int).tolist()
    assert "derived label" in capsys.readouterr().out
