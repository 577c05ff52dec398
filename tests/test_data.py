from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest

from molft import data
from molft.data import (
    LABEL_CANDIDATES,
    LIPOPHILICITY_HUB_ID,
    SMILES_CANDIDATES,
    embedded_lipophilicity_path,
    find_column,
    frames_from_hub,
    load_raw_dataset,
    prepare_molecules,
    read_table,
)
from molft.overlap import duplicate_report


def _frame(smiles: list[object], labels: list[object] | None = None) -> pd.DataFrame:
    columns: dict[str, list[object]] = {"smiles": smiles}
    if labels is not None:
        columns["y"] = labels
    return pd.DataFrame(columns)


# ---------------------------------------------------------------- column detection


def test_find_column_detects_known_names_case_insensitively():
    df = pd.DataFrame(columns=["CMPD_CHEMBLID", "SMILES", "Exp"])
    assert find_column(df, None, SMILES_CANDIDATES, "SMILES", "f.csv") == "SMILES"
    assert find_column(df, None, LABEL_CANDIDATES, "label", "f.csv") == "Exp"


def test_find_column_prefers_earlier_candidates():
    # "label" is an earlier candidate than "y", and matches "Label" case-insensitively
    df = pd.DataFrame(columns=["y", "Label"])
    assert find_column(df, None, LABEL_CANDIDATES, "label", "f.csv") == "Label"


def test_find_column_explicit_name_wins_and_must_exist():
    df = pd.DataFrame(columns=["smiles", "my_target", "y"])
    assert find_column(df, "my_target", LABEL_CANDIDATES, "label", "f.csv") == "my_target"
    with pytest.raises(ValueError, match=r"'Target'.*f\.csv.*\['smiles', 'my_target', 'y'\]"):
        find_column(df, "Target", LABEL_CANDIDATES, "label", "f.csv")


def test_find_column_reports_source_and_columns_when_nothing_matches():
    df = pd.DataFrame(columns=["structure", "activity"])
    with pytest.raises(
        ValueError, match=r"No SMILES column found in data/x\.csv.*\['structure', 'activity'\]"
    ):
        find_column(df, None, SMILES_CANDIDATES, "SMILES", "data/x.csv")


def test_find_column_rejects_columns_differing_only_in_case():
    df = pd.DataFrame(columns=["Smiles", "SMILES_"])
    assert find_column(df, None, SMILES_CANDIDATES, "SMILES", "f") == "Smiles"
    df = pd.DataFrame(columns=["Smiles", "sMILES"])
    with pytest.raises(ValueError, match="differing only in case"):
        find_column(df, None, SMILES_CANDIDATES, "SMILES", "f")


def test_find_column_announces_a_guess_with_the_file(caplog):
    df = pd.DataFrame(columns=["mol", "y"])
    with caplog.at_level(logging.INFO, logger="molft.data"):
        assert find_column(df, None, SMILES_CANDIDATES, "SMILES", "data/mol_y.csv") == "mol"
        assert find_column(df, None, LABEL_CANDIDATES, "label", "data/mol_y.csv") == "y"
    guesses = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in guesses] == [logging.WARNING, logging.WARNING]
    assert "data/mol_y.csv" in guesses[0][1] and "using column 'mol'" in guesses[0][1]
    assert "data/mol_y.csv" in guesses[1][1] and "using column 'y'" in guesses[1][1]


def test_find_column_logs_the_expected_name_at_info_and_explicit_names_not_at_all(caplog):
    df = pd.DataFrame(columns=["SMILES", "label", "y"])
    with caplog.at_level(logging.INFO, logger="molft.data"):
        assert find_column(df, None, SMILES_CANDIDATES, "SMILES", "f.csv") == "SMILES"
        assert find_column(df, "y", LABEL_CANDIDATES, "label", "f.csv") == "y"
    assert [(r.levelno, "using column 'SMILES'" in r.getMessage()) for r in caplog.records] == [
        (logging.INFO, True)
    ]


@pytest.mark.parametrize(
    ("columns", "kind", "listed"),
    [
        (["mol", "smi", "y"], "SMILES", "['mol', 'smi']"),
        (["smiles", "exp", "target"], "label", "['exp', 'target']"),
        (["smiles", "label", "Labels"], "label", "['label', 'Labels']"),
    ],
)
def test_find_column_two_plausible_candidates_are_an_error(columns, kind, listed):
    candidates = SMILES_CANDIDATES if kind == "SMILES" else LABEL_CANDIDATES
    df = pd.DataFrame(columns=columns)
    with pytest.raises(
        ValueError, match=rf"f\.csv has several plausible {kind} columns: {re.escape(listed)}"
    ):
        find_column(df, None, candidates, kind, "f.csv")


def test_find_column_the_expected_name_beats_other_candidates():
    # a prepared frame written back out (predictions, merged training sets) has both
    df = pd.DataFrame(columns=["smiles", "canonical_smiles", "label", "y"])
    assert find_column(df, None, SMILES_CANDIDATES, "SMILES", "f") == "smiles"
    assert find_column(df, None, LABEL_CANDIDATES, "label", "f") == "label"
    # flat candidate lists still work: each name is a tier of its own, the first present wins
    assert find_column(df, None, ["y", "label"], "label", "f") == "y"


# ---------------------------------------------------------------- prepare_molecules


def test_prepare_canonicalises_and_keeps_rows():
    df = _frame(["OCC", "C1=CC=CC=C1", "C[C@H](N)C(=O)O"], [1.0, "2.5", 3])
    out = prepare_molecules(df, "smiles", "y", source="t.csv")
    assert list(out.columns) == ["smiles", "canonical_smiles", "label", "row"]
    assert out["smiles"].tolist() == ["OCC", "C1=CC=CC=C1", "C[C@H](N)C(=O)O"]
    assert out["canonical_smiles"].tolist() == ["CCO", "c1ccccc1", "C[C@H](N)C(=O)O"]
    assert out["label"].tolist() == [1.0, 2.5, 3.0]
    assert out["label"].dtype == np.float64
    assert out["row"].tolist() == [0, 1, 2]


def test_prepare_drops_invalid_smiles_with_warning(caplog):
    df = _frame(["CCO", "not_a_smiles", "c1ccccc1", "C1CC", None], [1, 2, 3, 4, 5])
    with caplog.at_level(logging.WARNING, logger="molft.data"):
        out = prepare_molecules(df, "smiles", "y", source="t.csv")
    assert out["canonical_smiles"].tolist() == ["CCO", "c1ccccc1"]
    assert out["row"].tolist() == [0, 2]
    assert out["label"].tolist() == [1.0, 3.0]
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "dropping 3 of 5 rows" in message
    assert (
        "row 1: 'not_a_smiles'" in message
        and "row 3: 'C1CC'" in message
        and re.search(r"row 4: (None|nan)", message)
    )


def test_prepare_strict_raises_naming_rows():
    df = _frame(["CCO", "xyz", "CCN"], [1, 2, 3])
    with pytest.raises(ValueError, match=r"t\.csv: 1 SMILES could not be parsed.*row 1: 'xyz'"):
        prepare_molecules(df, "smiles", "y", source="t.csv", strict=True)


def test_prepare_drops_text_rdkit_reads_only_in_part(caplog):
    df = _frame(["CCO", "CCN C", "Oc1ccccc1 Br", "CCO\u00e9", "c1ccccc1", " CCN "], [1, 2, 3, 4, 5, 6])
    with caplog.at_level(logging.WARNING, logger="molft.data"):
        out = prepare_molecules(df, "smiles", "y", source="t.csv")
    assert out["canonical_smiles"].tolist() == ["CCO", "c1ccccc1", "CCN"]
    assert out["row"].tolist() == [0, 4, 5]
    assert out["label"].tolist() == [1.0, 5.0, 6.0]
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "t.csv: dropping 3 of 6 rows" in message
    assert "row 1: 'CCN C' (whitespace inside the SMILES)" in message
    assert "row 2: 'Oc1ccccc1 Br' (whitespace inside the SMILES)" in message
    assert "row 3: 'CCO\u00e9' (characters outside the SMILES alphabet ['\u00e9'])" in message


def test_prepare_strict_rejects_text_rdkit_reads_only_in_part():
    df = _frame(["CCO", "CCN C", "CCO\u00e9"], [1, 2, 3])
    with pytest.raises(
        ValueError, match=r"t\.csv: 2 SMILES could not be parsed.*row 1: 'CCN C'.*row 2: 'CCO\u00e9'"
    ):
        prepare_molecules(df, "smiles", "y", source="t.csv", strict=True)


def test_prepare_reports_multi_component_molecules(caplog):
    df = _frame(["CN.Br", "CCO", "[Na+].[O-]C(=O)c1ccccc1", "C1.C1"], [1, 2, 3, 4])
    with caplog.at_level(logging.INFO, logger="molft.data"):
        out = prepare_molecules(df, "smiles", "y", source="salts.csv")
    assert out["canonical_smiles"].tolist() == ["Br.CN", "CCO", "O=C([O-])c1ccccc1.[Na+]", "CC"]  # used whole
    assert "standardize" not in out.attrs
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "salts.csv: 2 of 4 molecules have several components" in warning
    assert "row 0: 'CN.Br'" in warning and "row 2: '[Na+].[O-]C(=O)c1ccccc1'" in warning
    assert "row 3" not in warning


def test_prepare_standardizes_every_molecule_and_logs_changes(caplog):
    df = _frame(["CN.Br", "OCC", "[Na+].[O-]C(=O)c1ccccc1", "Oc1ccccn1"], [1, 2, 3, 4])
    with caplog.at_level(logging.INFO, logger="molft.data"):
        out = prepare_molecules(df, "smiles", "y", source="salts.csv", standardize="fragment_neutral")
    assert out["canonical_smiles"].tolist() == ["CN", "CCO", "O=C(O)c1ccccc1", "Oc1ccccn1"]
    assert out["smiles"].tolist() == df["smiles"].tolist()  # the text as given, for tracing
    assert out.attrs["standardize"] == "fragment_neutral"
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 of 4 molecules have several components" in m and "largest fragment" in m for m in messages)
    (changed,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "salts.csv: standardize='fragment_neutral' changed 2 of 4 molecules" in changed
    assert (
        "row 0: 'CN.Br' -> CN" in changed and "row 2: '[Na+].[O-]C(=O)c1ccccc1' -> O=C(O)c1ccccc1" in changed
    )

    tautomers = prepare_molecules(df, "smiles", "y", source="salts.csv", standardize="tautomer")
    assert tautomers["canonical_smiles"].tolist() == ["CN", "CCO", "O=C(O)c1ccccc1", "O=c1cccc[nH]1"]
    assert tautomers.attrs["standardize"] == "tautomer"
    unchanged = prepare_molecules(df, "smiles", "y", source="salts.csv", standardize="none")
    assert unchanged.attrs == {} and unchanged["canonical_smiles"].tolist()[1] == "CCO"
    with pytest.raises(ValueError, match="standardize must be one of"):
        prepare_molecules(df, "smiles", "y", source="salts.csv", standardize="salts")


def test_prepare_uses_integer_index_as_row_number():
    df = _frame(["CCO", "CCN", "CCC"], [1, 2, 3]).iloc[[2, 0]]
    out = prepare_molecules(df, "smiles", "y", source="t")
    assert out["row"].tolist() == [2, 0]
    assert out.index.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("bad_label", "shown"), [(np.nan, "nan"), (float("inf"), "inf"), ("high", "'high'"), (None, "None")]
)
def test_prepare_rejects_bad_labels_naming_row_and_source(bad_label, shown):
    df = _frame(["CCO", "CCN", "CCC"], [1.0, 2.0, 3.0])
    df["y"] = df["y"].astype(object)
    df.loc[2, "y"] = bad_label
    with pytest.raises(ValueError, match=rf"train\.csv: 1 labels in column 'y'.*\(row 2: {shown}\)"):
        prepare_molecules(df, "smiles", "y", source="train.csv")


def test_prepare_lists_at_most_ten_bad_labels():
    df = _frame(["C"] * 12, [np.nan] * 12)
    with pytest.raises(ValueError, match="12 labels") as err:
        prepare_molecules(df, "smiles", "y", source="t")
    assert "row 9:" in str(err.value) and "row 10:" not in str(err.value) and "..." in str(err.value)


def test_prepare_empty_result_is_an_error():
    with pytest.raises(ValueError, match="split/file test.csv has no valid molecules"):
        prepare_molecules(_frame(["xx", "yy"], [1, 2]), "smiles", "y", source="test.csv")
    with pytest.raises(ValueError, match="split/file empty.csv has no valid molecules"):
        prepare_molecules(_frame([], []), "smiles", "y", source="empty.csv")


def test_prepare_labels_optional_only_when_allowed():
    df = _frame(["CCO"])
    out = prepare_molecules(df, "smiles", None, source="t", require_labels=False)
    assert list(out.columns) == ["smiles", "canonical_smiles", "row"]
    with pytest.raises(ValueError, match="label column is required"):
        prepare_molecules(df, "smiles", None, source="t")
    with pytest.raises(ValueError, match=r"Column 'y' not found in t"):
        prepare_molecules(df, "smiles", "y", source="t")


def test_prepare_keeps_requested_columns_aligned():
    df = _frame(["CCO", "bad", "CCN"], [1, 2, 3])
    df["id"] = ["a", "b", "c"]
    out = prepare_molecules(df, "smiles", "y", source="t", keep_columns=["id"])
    assert out["id"].tolist() == ["a", "c"]


def test_duplicates_are_reported_and_kept(caplog):
    df = _frame(["CCO", "c1ccccc1", "OCC", "CCN", "C(C)O"], [1.0, 2.0, 1.5, 4.0, 0.5])
    with caplog.at_level(logging.WARNING, logger="molft.data"):
        out = prepare_molecules(df, "smiles", "y", source="t")
    assert len(out) == 5
    assert any(
        "1 molecules occur more than once (2 extra rows, kept)" in r.getMessage() for r in caplog.records
    )
    report = duplicate_report(out)
    assert report["n_duplicated_molecules"] == 1
    assert report["n_extra_rows"] == 2
    assert report["examples"] == [{"canonical_smiles": "CCO", "rows": [0, 2, 4], "labels": [1.0, 1.5, 0.5]}]
    assert report["max_label_spread"] == pytest.approx(1.0)


# ---------------------------------------------------------------- reading files


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".csv.gz"])
def test_read_table_by_suffix(tmp_path, suffix):
    df = pd.DataFrame({"smiles": ["CCO", "CCN"], "label": [1.5, -2.0]})
    path = tmp_path / f"data{suffix}"
    if suffix in (".csv", ".csv.gz"):
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".json":
        df.to_json(path, orient="records")
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    pd.testing.assert_frame_equal(read_table(path), df, check_dtype=False)


def test_read_table_accepts_json_lines_named_json(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"smiles": "CCO", "label": 1.0}\n{"smiles": "CCN", "label": 2.0}\n')
    assert read_table(path)["smiles"].tolist() == ["CCO", "CCN"]


def test_read_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv does not exist"):
        read_table(tmp_path / "missing.csv")
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"unknown file type '\.xlsx'"):
        read_table(odd)


def test_load_raw_dataset_from_files(tmp_path):
    pd.DataFrame({"smiles": ["CCO"], "y": [1.0]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"smiles": ["CCN", "CCC"], "y": [2.0, 3.0]}).to_json(
        tmp_path / "test.jsonl", orient="records", lines=True
    )
    raw = load_raw_dataset(None, train_file=tmp_path / "train.csv", test_file=tmp_path / "test.jsonl")
    assert sorted(raw.frames) == ["test", "train"]
    assert raw.is_presplit
    assert raw.frames["test"]["smiles"].tolist() == ["CCN", "CCC"]
    assert "train.csv" in raw.source and "test.jsonl" in raw.source
    # a lone train file is a dataset still to be split, whichever script reads it
    alone = load_raw_dataset(None, train_file=tmp_path / "train.csv")
    assert list(alone.frames) == ["all"] and not alone.is_presplit
    assert alone.frames["all"]["smiles"].tolist() == ["CCO"]


def test_load_raw_dataset_rejects_ambiguous_or_missing_input(tmp_path):
    with pytest.raises(ValueError, match="pass only one"):
        load_raw_dataset("lipophilicity", train_file=tmp_path / "train.csv")
    with pytest.raises(ValueError, match="No data given"):
        load_raw_dataset(None)


# ---------------------------------------------------------------- embedded Lipophilicity


@pytest.fixture
def chemloader_installed():
    try:
        embedded_lipophilicity_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"chemloader not available: {err}")


@pytest.mark.usefixtures("chemloader_installed")
def test_embedded_lipophilicity_path_and_content():
    path = embedded_lipophilicity_path()
    assert path.name == "Lipophilicity.csv" and path.is_file()
    raw = load_raw_dataset("LipoPhilicity")
    assert list(raw.frames) == ["all"] and not raw.is_presplit
    df = raw.frames["all"]
    assert df.shape == (4200, 3)
    assert list(df.columns) == ["CMPD_CHEMBLID", "exp", "smiles"]
    assert df.iloc[0].tolist() == ["CHEMBL596271", 3.54, "Cn1c(CN2CCN(CC2)c3ccc(Cl)cc3)nc4ccccc14"]
    assert df.iloc[1]["exp"] == -1.18
    assert "chemloader" in raw.source


@pytest.mark.usefixtures("chemloader_installed")
def test_embedded_lipophilicity_prepares_cleanly():
    df = load_raw_dataset("lipophilicity").frames["all"].head(200)
    smiles_col = find_column(df, None, SMILES_CANDIDATES, "SMILES", "lipo")
    label_col = find_column(df, None, LABEL_CANDIDATES, "label", "lipo")
    assert (smiles_col, label_col) == ("smiles", "exp")
    out = prepare_molecules(df, smiles_col, label_col, source="lipo")
    assert len(out) == 200
    assert out["label"].iloc[0] == 3.54


def test_embedded_path_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="chemloader"):
        embedded_lipophilicity_path()


# ---------------------------------------------------------------- Hub datasets (hub tests: skipped offline by conftest)


def test_frames_from_hub_names_splits():
    datasets = pytest.importorskip("datasets")

    def table(values: list[str]):
        return datasets.Dataset.from_dict({"smiles": values})

    single = datasets.DatasetDict({"train": table(["CCO", "CCN"])})
    assert list(frames_from_hub(single, "hub")) == ["all"]
    presplit = datasets.DatasetDict(
        {"train": table(["CCO"]), "valid": table(["CCN"]), "test": table(["CCC"])}
    )
    frames = frames_from_hub(presplit, "hub")
    assert list(frames) == ["train", "validation", "test"]
    assert frames["validation"]["smiles"].tolist() == ["CCN"]
    clash = datasets.DatasetDict({"train": table(["C"]), "valid": table(["N"]), "validation": table(["O"])})
    with pytest.raises(ValueError, match="both mean 'validation'"):
        frames_from_hub(clash, "hub")


@pytest.mark.hub
def test_hub_dataset_loads_lipophilicity():
    raw = load_raw_dataset(LIPOPHILICITY_HUB_ID)
    (frame,) = raw.frames.values()
    assert len(frame) == 4200
    assert find_column(frame, None, SMILES_CANDIDATES, "SMILES", raw.source)


@pytest.mark.hub
def test_lipophilicity_falls_back_to_hub_without_chemloader(monkeypatch, caplog):
    def missing() -> None:
        raise ImportError("chemloader not installed")

    monkeypatch.setattr(data, "embedded_lipophilicity_path", missing)
    with caplog.at_level(logging.WARNING, logger="molft.data"):
        raw = load_raw_dataset("lipophilicity")
    assert LIPOPHILICITY_HUB_ID in raw.source
    assert sum(len(f) for f in raw.frames.values()) == 4200
    assert any("falling back" in r.getMessage() for r in caplog.records)
