"""The one SMILES check and standardisation in molft.chem."""

from __future__ import annotations

import pytest
from rdkit import Chem

from molft.chem import (
    canonical_smiles,
    check_standardize,
    mol_from_smiles,
    n_components,
    parse_smiles,
    smiles_problem,
    standardize_smiles,
)

VALID = ["CCO", "c1ccccc1", "C[C@H](N)C(=O)O", "Cl/C=C/Cl", "[2H]C", "C%10CC%10", "CN.Br", "C->[Fe]"]


def _rdkit(smiles: str) -> str:
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))


@pytest.mark.parametrize("smiles", VALID)
def test_valid_smiles_are_unchanged(smiles):
    assert smiles_problem(smiles) is None
    assert canonical_smiles(smiles) == _rdkit(smiles)
    assert canonical_smiles(f"  {smiles}\t") == _rdkit(smiles)  # surrounding whitespace is not part of it


@pytest.mark.parametrize(
    ("text", "rdkit_reads", "reason"),
    [
        ("CCN C", "CCN", "whitespace inside"),
        ("Oc1ccccc1 Br", "Oc1ccccc1", "whitespace inside"),
        ("C[C@H](F)Cl |&1:1|", "C[C@H](F)Cl", "whitespace inside"),
        ("C\tC", "C", "whitespace inside"),
        ("CCO\u00e9", "CCO", "outside the SMILES alphabet ['\u00e9']"),
        ("C~C", "C~C", "outside the SMILES alphabet ['~']"),
    ],
)
def test_text_rdkit_reads_only_in_part_is_invalid(text, rdkit_reads, reason):
    # what plain RDKit would silently make of it: a different molecule
    assert Chem.MolToSmiles(Chem.MolFromSmiles(text)) == _rdkit(rdkit_reads)
    mol, problem = parse_smiles(text)
    assert mol is None and reason in problem
    assert mol_from_smiles(text) is None and canonical_smiles(text) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "not text"),
        (float("nan"), "not text"),
        (3, "not text"),
        ("", "empty"),
        ("  ", "empty"),
        ("C1CC", "RDKit"),
    ],
)
def test_other_invalid_values_name_their_reason(value, reason):
    mol, problem = parse_smiles(value)
    assert mol is None and reason in problem


def test_components_are_counted_on_the_molecule_not_the_text():
    assert n_components(mol_from_smiles("[Na+].[O-]C(=O)c1ccccc1")) == 2
    assert n_components(mol_from_smiles("CN.Br")) == 2
    assert n_components(mol_from_smiles("C1.C1")) == 1  # a ring bond across the dot: ethane
    assert n_components(mol_from_smiles("CCO")) == 1


def test_standardize_keeps_largest_fragment_and_neutralises():
    benzoic_acid = _rdkit("OC(=O)c1ccccc1")
    assert standardize_smiles("[Na+].[O-]C(=O)c1ccccc1") == (benzoic_acid, True)
    assert standardize_smiles("CN.Br") == ("CN", True)
    assert standardize_smiles("C[NH3+]") == ("CN", True)
    assert standardize_smiles("OCC") == ("CCO", False)  # only canonicalised: not a change


def test_standardize_tautomers_only_when_asked():
    assert standardize_smiles("Oc1ccccn1") == (_rdkit("Oc1ccccn1"), False)
    assert standardize_smiles("Oc1ccccn1", tautomers=True) == (_rdkit("O=c1cccc[nH]1"), True)
    assert standardize_smiles("O=c1cccc[nH]1", tautomers=True) == (_rdkit("O=c1cccc[nH]1"), False)


def test_standardize_rejects_invalid_input_and_options():
    with pytest.raises(ValueError, match="whitespace inside"):
        standardize_smiles("CCN C")
    assert check_standardize(None) is None and check_standardize("none") is None
    assert check_standardize("tautomer") == "tautomer"
    with pytest.raises(ValueError, match=r"standardize must be one of \['fragment_neutral', 'tautomer'\]"):
        check_standardize("largest")
    with pytest.raises(ValueError, match="got True"):
        check_standardize(True)
