from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rdkit.ML.Cluster import Butina

from molft import chem
from molft.data import embedded_lipophilicity_path, prepare_molecules
from molft.overlap import dataset_fingerprint
from molft.splits import (
    SPLIT_METHODS,
    SplitResult,
    load_split,
    make_split,
    read_split_smiles,
    save_split,
    split_frames,
    split_similarity,
)

SHARED_LIPOPHILICITY = Path(__file__).resolve().parents[2] / "shared" / "data" / "lipophilicity.csv"
N_MOLECULES = 150
SPLITTING_METHODS = sorted(m for m in SPLIT_METHODS if m != "predefined")


def _prepare(smiles: list[str], labels: list[float] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"smiles": smiles, "y": labels if labels is not None else np.arange(len(smiles), dtype=float)}
    )
    return prepare_molecules(frame, "smiles", "y", source="test")


@pytest.fixture(scope="module")
def lipo() -> pd.DataFrame:
    """The first 150 Lipophilicity molecules, prepared."""
    if SHARED_LIPOPHILICITY.is_file():
        path = SHARED_LIPOPHILICITY
    else:
        try:
            path = embedded_lipophilicity_path()
        except (ImportError, FileNotFoundError):
            pytest.skip("no copy of Lipophilicity available")
    raw = pd.read_csv(path, nrows=N_MOLECULES)
    return prepare_molecules(raw, "smiles", "exp", source=str(path))


@pytest.fixture(scope="module")
def splits_by_method(lipo) -> dict[tuple[str, int], SplitResult]:
    """Every method at seeds 0 and 1 (computed once: butina and fingerprint are the slow ones)."""
    options = {"fingerprint": {"n_reference": 60}}  # below the dataset size, so the seed matters
    return {
        (method, seed): make_split(lipo, method, seed=seed, **options.get(method, {}))
        for method in SPLITTING_METHODS
        for seed in (0, 1)
    }


# ---------------------------------------------------------------- properties shared by all methods


@pytest.mark.parametrize("method", SPLITTING_METHODS)
def test_split_is_deterministic_disjoint_and_covering(lipo, splits_by_method, method):
    split = splits_by_method[(method, 0)]
    options = {"fingerprint": {"n_reference": 60}}.get(method, {})
    again = make_split(lipo, method, seed=0, **options)
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(split, name), getattr(again, name))
        assert getattr(split, name).dtype == np.int64
    everything = np.concatenate([split.train, split.validation, split.test])
    assert sorted(everything.tolist()) == list(range(len(lipo)))
    assert split.method == method
    assert split.params["seed"] == 0 and split.params["fractions"] == [0.8, 0.1, 0.1]


@pytest.mark.parametrize("method", ["random", "stratified", "maxmin", "molecular_weight", "fingerprint"])
def test_exact_sizes_for_methods_without_groups(splits_by_method, method):
    assert splits_by_method[(method, 0)].sizes == {"train": 120, "validation": 15, "test": 15}


@pytest.mark.parametrize("method", ["scaffold", "butina"])
def test_group_methods_stay_near_fractions(splits_by_method, method):
    sizes = splits_by_method[(method, 0)].sizes
    # whole groups move together, so sizes are only approximately 120/15/15
    assert abs(sizes["train"] - 120) <= 15
    assert 8 <= sizes["validation"] <= 15
    assert 8 <= sizes["test"] <= 30


@pytest.mark.parametrize("method", ["random", "stratified", "butina", "maxmin", "fingerprint"])
def test_seed_changes_the_split_where_it_matters(splits_by_method, method):
    assert splits_by_method[(method, 0)].test.tolist() != splits_by_method[(method, 1)].test.tolist()


@pytest.mark.parametrize("method", ["scaffold", "molecular_weight"])
def test_seed_is_irrelevant_for_deterministic_orderings(splits_by_method, method):
    first, second = splits_by_method[(method, 0)], splits_by_method[(method, 1)]
    assert first.indices().keys() == second.indices().keys()
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_fingerprint_split_ignores_seed_when_all_molecules_are_the_reference(lipo):
    first = make_split(lipo, "fingerprint", seed=0)
    second = make_split(lipo, "fingerprint", seed=7)
    np.testing.assert_array_equal(first.test, second.test)
    assert first.params["n_reference"] == 5000


# ---------------------------------------------------------------- defining properties


def _scaffolds(df: pd.DataFrame, idx: np.ndarray) -> set[str]:
    return {chem.murcko_scaffold(df["canonical_smiles"].iloc[i]) for i in idx}


@pytest.mark.parametrize("balanced", [False, True])
def test_scaffold_split_never_shares_a_scaffold(lipo, balanced):
    split = make_split(lipo, "scaffold", balanced=balanced, seed=3)
    sets = [_scaffolds(lipo, idx) for idx in split.indices().values()]
    for a, b in itertools.combinations(sets, 2):
        assert not a & b


def test_scaffold_split_hand_computed():
    benzenes = ["c1ccccc1C", "c1ccccc1O", "c1ccccc1N", "c1ccccc1Cl", "c1ccccc1F", "c1ccccc1CC"]
    cyclohexanes = ["C1CCCCC1C", "C1CCCCC1O"]
    others = ["c1ccncc1C", "c1ccc2ccccc2c1C"]
    df = _prepare(benzenes + cyclohexanes + others)
    split = make_split(df, "scaffold", fractions=(0.6, 0.2, 0.2))
    # largest scaffold set (benzene, 6) fills train, cyclohexane (2) fills validation, singletons go to test
    assert split.train.tolist() == [0, 1, 2, 3, 4, 5]
    assert split.validation.tolist() == [6, 7]
    assert split.test.tolist() == [8, 9]
    assert split.params == {"fractions": [0.6, 0.2, 0.2], "seed": 42, "balanced": False}


def test_balanced_scaffold_split_depends_on_seed(lipo):
    tests = {tuple(make_split(lipo, "scaffold", balanced=True, seed=s).test) for s in range(3)}
    assert len(tests) > 1


def test_butina_split_keeps_clusters_whole(lipo, splits_by_method):
    split = splits_by_method[("butina", 0)]
    fps = chem.morgan_fingerprints(lipo["canonical_smiles"].tolist())
    distances = 1.0 - chem.tanimoto_matrix(fps, fps).astype(np.float64)
    clusters = Butina.ClusterData(distances, len(fps), 0.6, isDistData=True)
    split_of = np.empty(len(lipo), dtype=object)
    for name, idx in split.indices().items():
        split_of[idx] = name
    assert any(len(c) > 1 for c in clusters)
    for cluster in clusters:
        assert len({split_of[i] for i in cluster}) == 1
    assert split.params["cutoff"] == 0.6


def test_molecular_weight_split_orders_by_weight(lipo, splits_by_method):
    split = splits_by_method[("molecular_weight", 0)]
    weights = np.array([chem.molecular_weight(s) for s in lipo["canonical_smiles"]])
    assert weights[split.train].max() <= weights[split.validation].min()
    assert weights[split.validation].max() <= weights[split.test].min()


def _mean_pairwise_similarity(fps: list) -> float:
    matrix = chem.tanimoto_matrix(fps, fps)
    return float(matrix[np.triu_indices(len(fps), k=1)].mean())


def test_maxmin_test_set_is_more_diverse_than_random_subsets(lipo, splits_by_method):
    fps = chem.morgan_fingerprints(lipo["canonical_smiles"].tolist())
    split = splits_by_method[("maxmin", 0)]
    picked = _mean_pairwise_similarity([fps[i] for i in split.test])
    rng = np.random.default_rng(0)
    random_subsets = [
        _mean_pairwise_similarity([fps[i] for i in rng.choice(len(fps), size=len(split.test), replace=False)])
        for _ in range(20)
    ]
    assert picked < np.mean(random_subsets)
    assert picked < min(random_subsets)


def test_stratified_split_preserves_label_quantiles(lipo, splits_by_method):
    split = splits_by_method[("stratified", 0)]
    bins = pd.qcut(lipo["label"], q=10, labels=False, duplicates="drop").to_numpy()
    overall = np.bincount(bins, minlength=10) / len(bins)
    for name, idx in split.indices().items():
        counts = np.bincount(bins[idx], minlength=10)
        assert (counts > 0).all(), f"{name} misses a label decile"
        np.testing.assert_allclose(counts, overall * len(idx), atol=1.0)
    assert split.params["n_bins"] == 10


def test_stratified_split_with_too_many_bins_explains(lipo):
    with pytest.raises(ValueError, match="fewer bins"):
        make_split(lipo.head(40), "stratified", fractions=(0.8, 0.1, 0.1), n_bins=10)


def test_fingerprint_split_puts_least_typical_molecules_in_test():
    # four close analogues and two unrelated molecules: the outliers must be held out
    df = _prepare(["CCCCCCO", "CCCCCCCO", "CCCCCCCCO", "CCCCCCCCCO", "c1ccc2ccccc2c1", "FC(F)(F)S(=O)(=O)N"])
    split = make_split(df, "fingerprint", fractions=(4 / 6, 1 / 6, 1 / 6))
    assert sorted(split.validation.tolist() + split.test.tolist()) == [4, 5]
    assert split.train.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- predefined splits


def test_predefined_split_from_column():
    frame = pd.DataFrame(
        {
            "smiles": ["CCO", "CCN", "bad", "CCC", "CCCl", "c1ccccc1"],
            "y": [1.0, 2, 3, 4, 5, 6],
            "set": ["Train", " VALID", "train", "test", "validation", "TRAIN"],
        }
    )
    df = prepare_molecules(frame, "smiles", "y", source="t", keep_columns=["set"])
    split = make_split(df, "predefined", split_column="set")
    assert split.train.tolist() == [0, 4]
    assert split.validation.tolist() == [1, 3]
    assert split.test.tolist() == [2]
    assert split.params == {"split_column": "set"}


def test_predefined_column_rejects_unknown_values():
    frame = pd.DataFrame(
        {"smiles": ["CCO", "CCN", "CCC"], "y": [1.0, 2, 3], "set": ["train", "holdout", None]}
    )
    df = prepare_molecules(frame, "smiles", "y", source="t", keep_columns=["set"])
    with pytest.raises(ValueError, match=r"2 values.*row 1: 'holdout'; row 2:"):
        make_split(df, "predefined", split_column="set")


def test_predefined_split_from_index_file_uses_row_numbers(tmp_path, caplog):
    frame = pd.DataFrame(
        {"smiles": ["CCO", "bad", "CCN", "CCC", "CCCl", "c1ccccc1"], "y": [1.0, 2, 3, 4, 5, 6]}
    )
    df = prepare_molecules(frame, "smiles", "y", source="t")
    path = tmp_path / "indices.json"
    path.write_text(json.dumps({"train": [0, 2, 5], "valid": [3, 1], "test": [4]}))
    with caplog.at_level(logging.WARNING, logger="molft.splits"):
        split = make_split(df, "predefined", split_file=str(path))
    # row 1 was dropped as invalid, so file rows 2..5 are positions 1..4
    assert split.train.tolist() == [0, 1, 4]
    assert split.validation.tolist() == [2]
    assert split.test.tolist() == [3]
    assert any("not in the prepared data" in r.getMessage() for r in caplog.records)


def test_predefined_split_from_saved_split_json(lipo, splits_by_method, tmp_path):
    original = splits_by_method[("scaffold", 0)]
    save_split(tmp_path / "split.json", lipo, original, dataset_source="lipo")
    split = make_split(lipo, "predefined", split_file=str(tmp_path / "split.json"))
    np.testing.assert_array_equal(split.test, original.test)
    assert split.params["source_method"] == "scaffold"


def test_predefined_needs_exactly_one_source(lipo):
    with pytest.raises(ValueError, match="exactly one"):
        make_split(lipo, "predefined")


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.1, 0.2), "sum to 1"),
        ((0.9, 0.0, 0.1), "must be > 0"),
        ((1.1, -0.2, 0.1), "must be > 0"),
        ((0.9, 0.1), r"\(train, validation, test\)"),
    ],
)
def test_bad_fractions_are_rejected(lipo, fractions, message):
    with pytest.raises(ValueError, match=message):
        make_split(lipo, "random", fractions=fractions)


def test_tiny_dataset_is_rejected():
    df = _prepare(["CCO", "CCN", "CCC", "CCCl"])
    with pytest.raises(ValueError, match=r"4 molecules are too few .* sizes 4/0/0"):
        make_split(df, "random")
    # five molecules are just enough: held-out sizes round half up to one each
    five = _prepare(["CCO", "CCN", "CCC", "CCCl", "CCBr"])
    assert make_split(five, "random").sizes == {"train": 3, "validation": 1, "test": 1}


def test_group_split_that_empties_a_set_is_rejected():
    # a single scaffold cannot be spread over three sets
    df = _prepare(["c1ccccc1C", "c1ccccc1O", "c1ccccc1N", "c1ccccc1Cl", "c1ccccc1F", "c1ccccc1CC"])
    with pytest.raises(ValueError, match="scaffold split left the train set empty"):
        make_split(df, "scaffold", fractions=(0.5, 0.25, 0.25))


def test_unknown_method_and_parameters_are_rejected(lipo):
    with pytest.raises(ValueError, match="Unknown split method 'cluster'"):
        make_split(lipo, "cluster")
    with pytest.raises(ValueError, match=r"does not take \['cutof'\]"):
        make_split(lipo, "butina", cutof=0.4)


# ---------------------------------------------------------------- similarity report, save and load


def test_split_similarity_hand_computed():
    df = _prepare(["c1ccccc1", "CCO", "OCC", "c1ccccc1", "[Na+].[Cl-]"])
    split = SplitResult(train=[0, 1], validation=[2], test=[3, 4], method="manual")
    report = split_similarity(df, split)
    # validation: ethanol again (1.0); test: benzene again (1.0) and NaCl sharing no bits (0.0)
    assert report["validation_to_train"] == {"mean": 1.0, "median": 1.0}
    assert report["test_to_train"] == {"mean": 0.5, "median": 0.5}


def test_split_frames(lipo, splits_by_method):
    split = splits_by_method[("random", 0)]
    frames = split_frames(lipo, split)
    assert frames["test"]["canonical_smiles"].tolist() == lipo["canonical_smiles"].iloc[split.test].tolist()
    assert frames["test"].index.tolist() == list(range(len(split.test)))


def test_save_and_load_round_trip(lipo, splits_by_method, tmp_path):
    split = splits_by_method[("butina", 1)]
    path = tmp_path / "out" / "split.json"
    save_split(path, lipo, split, dataset_source="lipophilicity slice", extra={"note": "x"})
    record = json.loads(path.read_text())
    assert record["method"] == "butina"
    assert record["params"] == {"fractions": [0.8, 0.1, 0.1], "seed": 1, "cutoff": 0.6}
    assert record["seed"] == 1 and record["fractions"] == [0.8, 0.1, 0.1]
    assert record["sizes"] == split.sizes
    assert record["n_molecules"] == len(lipo)
    assert record["dataset_source"] == "lipophilicity slice"
    assert record["dataset_fingerprint"] == dataset_fingerprint(lipo["canonical_smiles"].tolist())
    assert record["indices"]["test"] == split.test.tolist()
    assert record["smiles"]["test"] == lipo["canonical_smiles"].iloc[split.test].tolist()
    assert 0.0 < record["similarity"]["test_to_train"]["mean"] < 1.0
    assert record["extra"] == {"note": "x"}
    assert not list(path.parent.glob(".*tmp"))

    loaded = load_split(path, lipo)
    assert loaded.method == "butina" and loaded.params == split.params
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(split, name))
    assert read_split_smiles(path) == record["smiles"]


def test_load_split_rejects_another_dataset(lipo, splits_by_method, tmp_path):
    path = tmp_path / "split.json"
    save_split(path, lipo, splits_by_method[("random", 0)], dataset_source="lipo")
    shuffled = lipo.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match=r"was made for a different dataset \(fingerprint"):
        load_split(path, shuffled)
    with pytest.raises(
        ValueError, match="was made for a different dataset: it covers 150 molecules, the data has 149"
    ):
        load_split(path, lipo.head(149))


def test_load_split_rejects_out_of_range_indices(lipo, splits_by_method, tmp_path):
    path = tmp_path / "split.json"
    save_split(path, lipo, splits_by_method[("random", 0)], dataset_source="lipo")
    record = json.loads(path.read_text())
    record["indices"]["test"].append(len(lipo))
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="outside 0..149"):
        load_split(path, lipo)


def test_split_records_standardisation_and_refuses_other_preparation(tmp_path):
    smiles = [f"C{'C' * i}O" for i in range(10)] + ["CN.Br", "[Na+].[O-]C(=O)c1ccccc1"]
    frame = pd.DataFrame({"smiles": smiles, "y": np.arange(len(smiles), dtype=float)})
    standardized = prepare_molecules(frame, "smiles", "y", source="t", standardize="fragment_neutral")
    path = tmp_path / "split.json"
    split = make_split(standardized, "random", seed=0)
    columns = {"smiles_column": "smiles", "label_column": "y"}
    save_split(path, standardized, split, dataset_source="t", columns=columns)
    record = json.loads(path.read_text())
    assert record["standardize"] == "fragment_neutral" and record["columns"] == columns
    recorded = sum(record["smiles"].values(), [])
    assert "CN" in recorded and "O=C(O)c1ccccc1" in recorded and "Br.CN" not in recorded
    np.testing.assert_array_equal(load_split(path, standardized).test, split.test)
    again = make_split(standardized, "predefined", split_file=str(path))  # reads the frame's record too
    np.testing.assert_array_equal(again.test, split.test)
    plain = prepare_molecules(frame, "smiles", "y", source="t")
    with pytest.raises(ValueError, match="was made with standardize='fragment_neutral', this data with None"):
        load_split(path, plain)

    # molecules standardisation leaves alone: same fingerprint, still refused either way round
    neutral = frame.head(10)
    save_split(
        path,
        prepare_molecules(neutral, "smiles", "y", source="t"),
        make_split(_prepare(smiles[:10]), "random"),
        dataset_source="t",
    )
    assert json.loads(path.read_text())["standardize"] is None
    with pytest.raises(ValueError, match="was made with standardize=None, this data with 'tautomer'"):
        load_split(path, prepare_molecules(neutral, "smiles", "y", source="t", standardize="tautomer"))
    record = json.loads(path.read_text())
    del record["standardize"], record["columns"]  # a split.json written before these fields
    path.write_text(json.dumps(record))
    assert load_split(path, prepare_molecules(neutral, "smiles", "y", source="t")).sizes == record["sizes"]
