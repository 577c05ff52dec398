"""molft.selection.pool: the pool file, score files, held-out molecules and the strategies' input arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from molft.selection import (
    ModelArrays,
    SelectionPool,
    candidate_positions,
    check_candidate_scores,
    check_scores_match_pool,
    heldout_overlap,
    load_pool,
    pool_ids,
    read_influence_scores,
    selection_pool,
)


def test_pool_validates_shapes():
    with pytest.raises(ValueError, match=r"embeddings must be 2-D \[2, D\]"):
        SelectionPool(smiles=["C", "CC"], embeddings=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"influence_scores are missing or not finite at positions \[1\]"):
        SelectionPool(smiles=["C", "CC"], influence_scores=[0.1, np.nan])
    with pytest.raises(ValueError, match="Embedding sizes differ"):
        SelectionPool(
            smiles=["C"], embeddings=np.zeros((1, 4)), val_embeddings=np.zeros((2, 3)), val_labels=[1, 2]
        )


def _pool_frame():
    return pd.DataFrame({"smiles": ["CCO", "c1ccccc1", "CCN"], "label": [1.0, 2.0, 3.0]})


def test_check_scores_match_pool_aligns_by_index():
    scores = pd.DataFrame(
        {"index": [2, 0, 1], "smiles": ["NCC", "OCC", "C1=CC=CC=C1"], "score": [-3.0, -1.0, -2.0]}
    )
    np.testing.assert_array_equal(check_scores_match_pool(scores, _pool_frame()), [-1.0, -2.0, -3.0])


def test_check_scores_match_pool_rejects_another_pool():
    other = pd.DataFrame({"index": [0, 1, 2], "smiles": ["CCO", "CCCl", "CCN"], "score": [0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="another pool"):
        check_scores_match_pool(other, _pool_frame())
    shorter = pd.DataFrame({"smiles": ["CCO", "c1ccccc1"], "score": [0.0, 0.0]})
    with pytest.raises(ValueError, match="2 rows but the pool has 3"):
        check_scores_match_pool(shorter, _pool_frame())
    with pytest.raises(ValueError, match="lacks column"):
        check_scores_match_pool(shorter.rename(columns={"score": "value"}), _pool_frame())


def test_load_pool_keeps_every_row_and_reports_bad_ones(tmp_path):
    good = tmp_path / "pool.csv"
    good.write_text("SMILES,Label\nOCC,1.5\nC1=CC=CC=C1,2.0\n")
    frame = load_pool(good)
    assert frame["canonical_smiles"].tolist() == ["CCO", "c1ccccc1"]
    assert frame["label"].tolist() == [1.5, 2.0] and frame["row"].tolist() == [0, 1]
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("smiles\nCCO\n")
    assert "label" not in load_pool(unlabelled, require_labels=False).columns
    with pytest.raises(ValueError, match="No label column"):
        load_pool(unlabelled)
    bad = tmp_path / "bad.csv"
    bad.write_text("SMILES,Label\nCCO,1.0\nC1CC,2.0\n")
    with pytest.raises(ValueError, match="row 1: 'C1CC'"):  # strict: an error naming the row
        load_pool(bad, strict=True)


def test_load_pool_skips_invalid_rows_with_a_count_and_keeps_file_rows_as_ids(tmp_path, caplog):
    """Issue #13: one invalid SMILES no longer stops a pool; the others keep their row as pool id."""
    bad = tmp_path / "bad.csv"
    bad.write_text("SMILES,Label\nCCO,1.0\nC1CC,2.0\nCCN,3.0\nnot a smiles,4.0\nc1ccccc1,5.0\n")
    with caplog.at_level("WARNING"):
        frame = load_pool(bad)
    assert frame["row"].tolist() == [0, 2, 4] and pool_ids(frame).tolist() == [0, 2, 4]
    assert frame["canonical_smiles"].tolist() == ["CCO", "CCN", "c1ccccc1"]
    assert frame["label"].tolist() == [1.0, 3.0, 5.0] and frame.attrs["n_rows"] == 5
    assert "2 of 5 rows skipped (invalid SMILES)" in caplog.text and "row 1: 'C1CC'" in caplog.text
    assert pool_ids(pd.DataFrame({"smiles": ["C", "CC"]})).tolist() == [0, 1]  # frames without `row`


def test_load_pool_standardises_like_the_run(tmp_path):
    salts = tmp_path / "salts.csv"
    salts.write_text("SMILES,Label\nCC[NH3+].[Cl-],1.0\nCCO,2.0\n")
    assert load_pool(salts)["canonical_smiles"].tolist() == ["CC[NH3+].[Cl-]", "CCO"]
    neutral = load_pool(salts, standardize="fragment_neutral")
    assert neutral["canonical_smiles"].tolist() == ["CCN", "CCO"] and neutral.attrs["standardize"]


def test_load_pool_reraises_an_ambiguous_label_column(tmp_path):
    """Only a missing label column is allowed without labels; two plausible ones stay an error."""
    ambiguous = tmp_path / "ambiguous.csv"
    ambiguous.write_text("smiles,y,target\nCCO,1.0,2.0\n")
    with pytest.raises(ValueError, match=r"several plausible label columns: \['y', 'target'\]"):
        load_pool(ambiguous, require_labels=False)
    assert load_pool(ambiguous, label_column="y")["label"].tolist() == [1.0]


def test_scores_are_matched_by_pool_id_and_candidates_need_one(tmp_path):
    pool_file = tmp_path / "pool.csv"
    pool_file.write_text("SMILES,Label\nCCO,1.0\nC1CC,2.0\nCCN,3.0\nc1ccccc1,4.0\n")
    pool = load_pool(pool_file)  # ids 0, 2, 3
    # what run_influence.py writes when pool id 3 sits in the run's test split: no row for it
    scores_frame = pd.DataFrame({"index": [2, 0], "smiles": ["NCC", "OCC"], "score": [-2.0, 0.5]})
    scores = check_scores_match_pool(scores_frame, pool)
    np.testing.assert_array_equal(scores[:2], [0.5, -2.0])
    assert np.isnan(scores[2])
    check_candidate_scores(scores, pool, np.array([0, 1]), "scores.csv")  # id 3 is not a candidate
    with pytest.raises(ValueError, match=r"no score for 1 candidate pool molecules \(pool ids \[3\]\)"):
        check_candidate_scores(scores, pool, np.array([0, 1, 2]), "scores.csv")
    wrong_id = scores_frame.assign(index=[1, 0])  # id 1 is the skipped invalid row
    with pytest.raises(ValueError, match=r"names pool ids \[1\] that the pool does not hold"):
        check_scores_match_pool(wrong_id, pool)
    with pytest.raises(ValueError, match=r"repeats pool ids \[0\]"):
        check_scores_match_pool(scores_frame.assign(index=[0, 0]), pool)
    shifted = scores_frame.assign(smiles=["OCC", "NCC"])  # positions instead of ids: other molecules
    with pytest.raises(
        ValueError, match=r"does not match the pool at 2 of 2 pool ids \(2: 'CCO' vs pool 'CCN'"
    ):
        check_scores_match_pool(shifted, pool)


def test_read_influence_scores_names_the_file(tmp_path):
    path = tmp_path / "scores.csv"
    pd.DataFrame({"index": [1, 0, 2], "smiles": ["c1ccccc1", "CCO", "CCN"], "score": [2.0, 1.0, 3.0]}).to_csv(
        path, index=False
    )
    np.testing.assert_array_equal(read_influence_scores(path, _pool_frame()), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=f"--scores_file {path}: .*another pool"):
        read_influence_scores(path, _pool_frame().iloc[::-1])


def _frame(*smiles, labels=None):
    frame = pd.DataFrame({"canonical_smiles": list(smiles)})
    if labels is not None:
        frame["label"] = labels
    return frame


def test_heldout_molecules_are_found_and_left_out():
    pool = _frame("CCO", "CCN", "CCC", "c1ccccc1")
    frames = {"train": _frame("CCC"), "validation": _frame("CCO"), "test": _frame("c1ccccc1", "CO")}
    overlap = heldout_overlap(pool, frames)
    assert overlap == {"train": [2], "validation": [0], "test": [3]}
    assert heldout_overlap(pool, None) == {}
    np.testing.assert_array_equal(candidate_positions(pool, overlap, keep=False), [1, 2])
    np.testing.assert_array_equal(candidate_positions(pool, overlap, keep=True), [0, 1, 2, 3])
    np.testing.assert_array_equal(candidate_positions(pool, {}, keep=False), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="Every pool molecule is in the run's validation/test split"):
        candidate_positions(_frame("CCO", "CCN"), {"train": [], "validation": [0], "test": [1]}, keep=False)


def test_selection_pool_holds_the_candidates_arrays():
    pool = _frame("C", "CC", "CCC", labels=[1.0, 2.0, 3.0])
    frames = {"train": _frame("CO", "CN", labels=[0.5, 0.7]), "validation": _frame("CS", labels=[0.1])}
    arrays = ModelArrays(
        pool_embeddings=np.arange(6.0).reshape(3, 2),
        train_embeddings=np.zeros((2, 2)),
        validation_embeddings=np.ones((1, 2)),
        mc_predictions=np.arange(6.0).reshape(2, 3),
    )
    candidates = np.array([0, 2])
    chosen = selection_pool(pool, candidates, frames, np.array([-1.0, 0.0, 1.0]), arrays)
    assert chosen.smiles == ["C", "CCC"] and chosen.train_smiles == ["CO", "CN"]
    np.testing.assert_array_equal(chosen.labels, [1.0, 3.0])
    np.testing.assert_array_equal(chosen.influence_scores, [-1.0, 1.0])
    np.testing.assert_array_equal(chosen.embeddings, [[0.0, 1.0], [4.0, 5.0]])
    np.testing.assert_array_equal(chosen.mc_predictions, [[0.0, 2.0], [3.0, 5.0]])
    np.testing.assert_array_equal(chosen.train_labels, [0.5, 0.7])
    np.testing.assert_array_equal(chosen.val_labels, [0.1])
    bare = selection_pool(_frame("C", "CC"), np.array([1]), None, None, ModelArrays())
    assert bare.smiles == ["CC"] and bare.labels is None and bare.train_smiles is None
    assert bare.embeddings is None and bare.val_labels is None
