"""scripts/fetch_moses_corpus.py on a hand-made wheel: held-out molecules, repeats and invalid rows removed, counted."""

from __future__ import annotations

import gzip
import importlib.util
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from molft.chem import canonical_smiles
from molft.data import embedded_lipophilicity_path, read_table
from molft.io import read_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not (SHARED / "external_300.csv").is_file(), reason="needs ../shared/data")


def load_script():
    spec = importlib.util.spec_from_file_location(
        "fetch_moses_corpus", ROOT / "scripts" / "fetch_moses_corpus.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_repeated_and_invalid_rows_are_removed_and_counted(tmp_path):
    lipo = read_table(embedded_lipophilicity_path())["smiles"].iloc[0]
    in_lipophilicity = {canonical_smiles(s) for s in read_table(embedded_lipophilicity_path())["smiles"]}
    external = next(  # ten external molecules are also in Lipophilicity; those count under both
        s
        for s in pd.read_csv(SHARED / "external_300.csv")["SMILES"]
        if canonical_smiles(s) not in in_lipophilicity
    )
    shared = pd.read_csv(SHARED / "pretrain_chembl30_zinc_120k.csv")["smiles"].iloc[0]
    rows = ["CCO", "OCC", "c1ccccc1O", "not_a_smiles", lipo, external, shared, "CCN"]
    csv = "SMILES,SPLIT\n" + "".join(f"{smi},train\n" for smi in rows)
    wheel = tmp_path / "molsets-0.3.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("moses/dataset/data/train.csv.gz", gzip.compress(csv.encode()))
    output = tmp_path / "corpus.csv"

    summary = load_script().main(
        ["--output", str(output), "--wheel_dir", str(tmp_path), "--shared", str(SHARED)]
    )

    kept = pd.read_csv(output)["smiles"].tolist()
    assert kept == [canonical_smiles(s) for s in ("CCO", "c1ccccc1O", "CCN")]  # OCC repeats CCO
    counts = summary["counts"]
    assert counts == {
        "moses_rows": 8,
        "invalid": 1,
        "repeats": 1,
        "in_shared_corpus": 1,
        "in_lipophilicity": 1,
        "in_external_300": 1,
        "kept": 3,
    }
    assert read_json(output.with_suffix(".summary.json"))["counts"] == counts
