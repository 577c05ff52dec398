"""Property-based tests of the molecule loaders (molft.data), bounded to run in seconds.

Rows are built from valid SMILES, mutations of them and junk. Whatever the rows, a loader either keeps a
row as exactly the molecule its whole text means, or reports it (dropped with a count and named, or an
error under strict); it never crashes otherwise, and labels that are not finite numbers never get through.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rdkit import Chem
from rdkit.Chem.MolStandardize import rdMolStandardize

from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column, prepare_molecules, read_table

BOUNDED = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

VALID = [
    "CCO",
    "c1ccccc1",
    "C[C@H](N)C(=O)O",
    "Cl/C=C/Cl",
    "CC(=O)Nc1ccc(O)cc1",
    "[2H]C",
    "C1CC1",
    "Oc1ccccn1",
    "CN.Br",
    "[Na+].[O-]C(=O)c1ccccc1",
    "Cn1c(CN2CCN(CC2)c3ccc(Cl)cc3)nc4ccccc14",
]
# Independent statement of what plain SMILES text may contain (OpenSMILES plus RDKit's dative bonds).
PLAIN = set(string.ascii_letters + string.digits + "()[]=#$:/\\.+-@%*<>")


def _whole_text_molecule(value: object) -> str | None:
    """Oracle: canonical SMILES of the molecule the *whole* text means, or None if it means none."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or not set(text) <= PLAIN:
        return None
    mol = Chem.MolFromSmiles(text)  # no whitespace or foreign characters left: RDKit reads all of it
    return None if mol is None else Chem.MolToSmiles(mol)


@st.composite
def smiles_cell(draw) -> tuple[object, str]:
    """(cell value, kind): kinds 'valid' must be kept, 'partial' must be dropped, others either way."""
    base = draw(st.sampled_from(VALID))
    kind = draw(st.sampled_from(["valid", "tail", "inner_space", "foreign", "edit", "junk", "nontext"]))
    if kind == "valid":
        pad = draw(st.sampled_from(["", " ", "\t", "\u00a0"]))
        return pad + base + pad, "valid"
    if kind == "tail":  # RDKit would read the part before the space and call the rest the name
        rest = draw(st.one_of(st.sampled_from(VALID), st.text(min_size=1, max_size=5)))
        space = draw(st.sampled_from([" ", "\t", "  "]))
        value = base + space + rest
        return value, "partial" if value.strip() != base else "valid"
    if kind == "inner_space":
        i = draw(st.integers(1, len(base) - 1))
        return base[:i] + " " + base[i:], "partial"
    if kind == "foreign":  # a stray non-ASCII character, inside or at the end
        ch = draw(st.characters(min_codepoint=0x80, exclude_categories=["Cs", "Zs", "Zl", "Zp", "Cc"]))
        i = draw(st.integers(1, len(base)))
        return base[:i] + ch + base[i:], "partial"
    if kind == "edit":  # insert, delete or replace one character with a SMILES character
        i = draw(st.integers(0, len(base) - 1))
        ch = draw(st.sampled_from(sorted(PLAIN)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        value = {
            "insert": base[:i] + ch + base[i:],
            "delete": base[:i] + base[i + 1 :],
            "replace": base[:i] + ch + base[i + 1 :],
        }[op]
        return value, "either"
    if kind == "junk":
        return draw(st.text(max_size=12)), "either"
    return draw(st.one_of(st.none(), st.floats(), st.integers(), st.booleans())), "nontext"


def label_cell() -> st.SearchStrategy[tuple[object, float | None]]:
    """(cell value, the finite number it means or None)."""
    finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
    return st.one_of(
        finite.map(lambda v: (v, float(v))),
        st.integers(-1000, 1000).map(lambda v: (v, float(v))),
        finite.map(lambda v: (repr(float(v)), float(v))),
        st.sampled_from([float("nan"), float("inf"), -float("inf"), None, "high", "", "n/a"]).map(
            lambda v: (v, None)
        ),
    )


@contextmanager
def captured(logger_name: str = "molft.data") -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _frame(rows: list[tuple[object, object]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "smiles": pd.Series([s for s, _ in rows], dtype=object),
            "y": pd.Series([y for _, y in rows], dtype=object),
        }
    )


def check_outcome(
    cells: list[object],
    kinds: list[str],
    labels: list[float | None],
    strict: bool,
    run,
    label_column: str = "y",
) -> None:
    """Run the loader and check every row was kept as its molecule or reported."""
    expected = [_whole_text_molecule(c) for c in cells]
    n_bad_labels = sum(v is None for v in labels)
    n_invalid = sum(e is None for e in expected)
    with captured() as records:
        try:
            out = run()
        except ValueError as err:
            message = str(err)
            if n_bad_labels:
                assert f"{n_bad_labels} labels in column {label_column!r}" in message
            elif strict and n_invalid:
                assert f"{n_invalid} SMILES could not be parsed" in message
                first = next(i for i, e in enumerate(expected) if e is None)
                assert f"row {first}: " in message
            else:
                assert n_invalid == len(cells) and "no valid molecules" in message
            return
    assert n_bad_labels == 0, "a label that is not a finite number got through"
    assert not (strict and n_invalid)
    kept = out["row"].tolist()
    assert kept == [i for i, e in enumerate(expected) if e is not None]
    assert out["canonical_smiles"].tolist() == [e for e in expected if e is not None]
    for i, kind in enumerate(kinds):
        if kind == "valid":
            assert i in kept
        if kind in ("partial", "nontext"):
            assert i not in kept
    if "label" in out:
        assert np.isfinite(out["label"].to_numpy()).all()
        assert out["label"].tolist() == [labels[i] for i in kept]
    if n_invalid:
        warning = next(r.getMessage() for r in records if "dropping" in r.getMessage())
        assert f"dropping {n_invalid} of {len(cells)} rows" in warning
        dropped = [i for i, e in enumerate(expected) if e is None]
        for i in dropped[:5]:
            assert re.search(rf"row {i}: ", warning)


@BOUNDED
@given(
    rows=st.lists(st.tuples(smiles_cell(), label_cell()), min_size=1, max_size=12),
    strict=st.booleans(),
)
def test_prepare_molecules_keeps_exact_molecules_or_reports(rows, strict):
    cells = [cell for (cell, _), _ in rows]
    kinds = [kind for (_, kind), _ in rows]
    frame = _frame([(cell, label) for (cell, _), (label, _) in rows])
    labels = [value for _, (_, value) in rows]
    check_outcome(
        cells,
        kinds,
        labels,
        strict,
        lambda: prepare_molecules(frame, "smiles", "y", source="p.csv", strict=strict),
    )


@BOUNDED
@given(rows=st.lists(smiles_cell(), min_size=1, max_size=12))
def test_unlabelled_loading_keeps_exact_molecules_or_reports(rows):
    # the masked-LM corpus and predict files: no labels
    cells = [cell for cell, _ in rows]
    frame = pd.DataFrame({"smiles": pd.Series(cells, dtype=object)})
    check_outcome(
        cells,
        [kind for _, kind in rows],
        [0.0] * len(cells),
        False,
        lambda: prepare_molecules(frame, "smiles", None, source="p.csv", require_labels=False),
    )


@BOUNDED
@given(
    rows=st.lists(st.tuples(smiles_cell(), label_cell()), min_size=1, max_size=8),
    layout=st.sampled_from([("smiles", "label"), ("SMILES", "Label"), ("mol", "y"), ("smi", "exp")]),
)
def test_files_load_through_guessed_columns(tmp_path, rows, layout):
    """A CSV written from such rows loads through read_table and guessed columns like the scripts do."""
    smiles_name, label_name = layout
    path = tmp_path / "rows.csv"
    pd.DataFrame(
        {
            "id": [f"m{i}" for i in range(len(rows))],
            smiles_name: pd.Series([cell for (cell, _), _ in rows], dtype=object),
            label_name: pd.Series([label for _, (label, _) in rows], dtype=object),
        }
    ).to_csv(path, index=False)
    table = read_table(path)
    smiles_col = find_column(table, None, SMILES_CANDIDATES, "SMILES", str(path))
    label_col = find_column(table, None, LABEL_CANDIDATES, "label", str(path))
    assert (smiles_col, label_col) == layout
    cells = table[smiles_col].tolist()  # what the file holds once read (e.g. '' and 'NA' read as missing)
    numeric = pd.to_numeric(table[label_col], errors="coerce")
    labels = [float(v) if math.isfinite(v) else None for v in numeric]
    kinds = ["either"] * len(cells)
    for i, ((cell, kind), _) in enumerate(rows):
        if kind == "valid" and cells[i] == cell:
            kinds[i] = "valid"
    check_outcome(
        cells,
        kinds,
        labels,
        False,
        lambda: prepare_molecules(table, smiles_col, label_col, source=str(path)),
        label_column=label_col,
    )


@BOUNDED
@given(rows=st.lists(smiles_cell(), min_size=1, max_size=10))
def test_standardized_loading_keeps_the_parent_of_what_the_text_means(rows):
    cells = [cell for cell, _ in rows]
    frame = pd.DataFrame({"smiles": pd.Series(cells, dtype=object)})
    try:
        out = prepare_molecules(
            frame, "smiles", None, source="p", require_labels=False, standardize="fragment_neutral"
        )
    except ValueError as err:
        assert "no valid molecules" in str(err) and all(_whole_text_molecule(c) is None for c in cells)
        return
    assert out.attrs["standardize"] == "fragment_neutral"
    for row, canonical in zip(out["row"], out["canonical_smiles"], strict=True):
        mol = Chem.MolFromSmiles(_whole_text_molecule(cells[row]))
        parent = rdMolStandardize.Uncharger().uncharge(rdMolStandardize.LargestFragmentChooser().choose(mol))
        assert canonical == Chem.MolToSmiles(parent)
    assert all(i in out["row"].tolist() for i, c in enumerate(cells) if _whole_text_molecule(c) is not None)


@pytest.mark.parametrize("text", ["CCN C", "Oc1ccccc1 Br", "CCO\u00e9"])
def test_examples_from_the_issue_are_reported(text):
    with captured() as records:
        out = prepare_molecules(_frame([("CCO", 1.0), (text, 2.0)]), "smiles", "y", source="issue.csv")
    assert out["row"].tolist() == [0]
    assert any(f"row 1: {text!r}" in r.getMessage() for r in records)
