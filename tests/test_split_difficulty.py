"""scripts/split_difficulty.py: the printed similarities and the saved split files agree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from helpers import head_copy

from molft.data import prepare_molecules
from molft.io import read_json
from molft.splits import SPLIT_METHODS, load_split, split_similarity

ROOT = Path(__file__).resolve().parents[1]
SHARED_LIPOPHILICITY = ROOT.parent / "shared" / "data" / "lipophilicity.csv"


def _script():
    spec = importlib.util.spec_from_file_location(
        "split_difficulty", ROOT / "scripts" / "split_difficulty.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not SHARED_LIPOPHILICITY.is_file(), reason="needs ../shared/data/lipophilicity.csv")
def test_saved_splits_reload_and_match_the_printed_table(tmp_path, capsys):
    data = head_copy(SHARED_LIPOPHILICITY, tmp_path / "lipo_120.csv", 120)
    _script().main(["--train_file", str(data), "--seed", "3", "--save_dir", str(tmp_path / "splits")])
    printed = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    methods = [m for m in SPLIT_METHODS if m != "predefined"]
    assert sorted(printed) == sorted(methods)

    frame = pd.read_csv(data)
    df = prepare_molecules(frame, "smiles", "exp", source=str(data))
    for method in methods:
        path = tmp_path / "splits" / f"{method}.json"
        record = read_json(path)
        assert record["method"] == method and record["seed"] == 3
        split = load_split(path, df)  # same molecules, so usable as --split_file
        similarity = split_similarity(df, split)
        assert record["similarity"]["test_to_train"]["mean"] == pytest.approx(
            similarity["test_to_train"]["mean"]
        )
        assert float(printed[method][2]) == pytest.approx(similarity["test_to_train"]["mean"], abs=5e-4)
