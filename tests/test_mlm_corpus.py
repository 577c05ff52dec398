"""molft.mlm_corpus with --standardize: the corpus is standardised like the regression run it must not leak."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from molft.data import prepare_molecules
from molft.mlm import MlmDataArguments
from molft.mlm_corpus import prepare_corpus, standardized_canonical
from molft.splits import make_split, save_split

MOLECULES = [f"C{'C' * i}O" for i in range(30)]  # 30 distinct alcohols
SALTS = ["CCCCN.Cl", "[Na+].[O-]C(=O)c1ccccc1"]


def _write(path: Path, smiles: list[str]) -> str:
    pd.DataFrame({"smiles": smiles}).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("max_train_samples", [None, 40], ids=["whole", "sampled"])
def test_salts_of_heldout_molecules_are_recognised_only_when_standardised(tmp_path, max_train_samples):
    train = _write(tmp_path / "corpus.csv", MOLECULES + SALTS)
    heldout = _write(tmp_path / "heldout.csv", ["CCCCN", "O=C(O)c1ccccc1"])
    options = {"train_file": train, "exclude_files": [heldout], "validation_split_percentage": 10}
    options["max_train_samples"] = max_train_samples
    plain = prepare_corpus(MlmDataArguments(**options), seed=0)
    assert plain.summary["heldout_overlap"]["dropped"] == 0  # written as salts, nothing matches
    standardised = prepare_corpus(MlmDataArguments(**options, standardize="fragment_neutral"), seed=0)
    assert standardised.summary["heldout_overlap"]["dropped"] == 2
    kept = set(standardised.train) | set(standardised.validation)
    assert len(kept) == len(MOLECULES) and not kept & {"CCCCN", "O=C(O)c1ccccc1"}
    assert len(set(plain.train) | set(plain.validation)) == len(MOLECULES) + len(SALTS)


def test_standardized_canonical():
    assert standardized_canonical("CCCCN.Cl", "fragment_neutral") == "CCCCN"
    assert standardized_canonical("CCCCN.Cl", None) == "CCCCN.Cl"
    assert standardized_canonical("C1CC", "fragment_neutral") is None


def test_a_split_made_with_another_standardisation_is_refused(tmp_path):
    frame = pd.DataFrame({"smiles": MOLECULES + SALTS, "y": range(len(MOLECULES) + 2)})
    prepared = prepare_molecules(frame, "smiles", "y", source="t", standardize="fragment_neutral")
    split_file = tmp_path / "split.json"
    save_split(split_file, prepared, make_split(prepared, "random", seed=0), dataset_source="t")
    options = {"train_file": _write(tmp_path / "corpus.csv", MOLECULES), "split_file": str(split_file)}
    with pytest.raises(
        ValueError, match="was made with standardize='fragment_neutral', the corpus uses None"
    ):
        prepare_corpus(MlmDataArguments(**options), seed=0)
    corpus = prepare_corpus(MlmDataArguments(**options, standardize="fragment_neutral"), seed=0)
    heldout = set(prepared["canonical_smiles"]) - set(corpus.train) - set(corpus.validation)
    assert corpus.summary["heldout_overlap"]["dropped"] == len(heldout & set(MOLECULES)) > 0
