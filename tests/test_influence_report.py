"""The score table and the score statistics of an influence run (molft.influence.report)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from molft.influence.report import leave_out_heldout, score_statistics, score_table


def test_score_statistics_by_hand():
    scores = np.arange(-20.0, 40.0)  # 60 values, 20 negative, symmetric around 9.5
    stats = score_statistics(scores)
    assert stats["n_helpful"] == 20 and stats["mean"] == 9.5 and stats["skew"] == pytest.approx(0.0)
    thresholds = stats["selection_thresholds"]
    assert [thresholds[f"top_{k}"]["threshold"] for k in (10, 30, 50)] == [-11.0, 9.0, 29.0]
    assert thresholds["helpful"] == {"rule": "score < 0", "threshold": 0.0, "n_selected": 20}
    # linear interpolation: position 0.1 * 59 = 5.9 -> -14.1 (6 scores at or below); 0.25 * 59 -> -5.25 (15)
    assert thresholds["percentile_10"]["threshold"] == pytest.approx(-14.1)
    assert thresholds["percentile_10"]["n_selected"] == 6
    assert thresholds["percentile_25"]["threshold"] == pytest.approx(-5.25)
    assert thresholds["percentile_25"]["n_selected"] == 15


def test_score_table_ranks_and_flags_split_members():
    pool = pd.DataFrame(
        {"smiles": ["C", "CC", "CCC"], "canonical_smiles": ["C", "CC", "CCC"], "label": [1.0, 2.0, 3.0]}
    )
    frames = {
        "train": pd.DataFrame({"canonical_smiles": ["CC"]}),
        "validation": pd.DataFrame({"canonical_smiles": ["N"]}),
        "test": pd.DataFrame({"canonical_smiles": ["CCC"]}),
    }
    table = score_table(pool, np.array([0.5, -2.0, -0.1]), frames)
    # a test-split molecule (kept with --keep_heldout_overlap) is marked but never ranked (issue #13)
    assert table["rank"].tolist() == [2, 1, pd.NA]
    assert table["helpful"].tolist() == [False, True, pd.NA]
    assert table["in_run_split"].tolist() == ["", "train", "test"]
    assert table["index"].tolist() == [0, 1, 2]  # pool ids: positions for a frame without `row`


def test_heldout_pool_molecules_are_left_out_unless_kept():
    pool = pd.DataFrame(
        {
            "smiles": ["C", "CC", "CCC", "CCCC"],
            "canonical_smiles": ["C", "CC", "CCC", "CCCC"],
            "label": [1.0, 2.0, 3.0, 4.0],
            "row": [0, 2, 3, 5],  # rows 1 and 4 of the file held invalid SMILES
        }
    )
    pool.attrs["n_rows"] = 6
    frames = {
        "train": pd.DataFrame({"canonical_smiles": ["CC"]}),
        "validation": pd.DataFrame({"canonical_smiles": ["CCCC"]}),
        "test": pd.DataFrame({"canonical_smiles": ["CCC"]}),
    }
    scored, report = leave_out_heldout(pool, frames, keep=False)
    assert scored["row"].tolist() == [0, 2] and scored["in_run_split"].tolist() == ["", "train"]
    assert report == {
        "n_rows": 6,
        "n_invalid_skipped": 2,
        "n_scored": 2,
        "heldout_overlap": {"train": 1, "validation": 1, "test": 1, "left_out": 2, "kept_unranked": 0},
    }
    kept, report = leave_out_heldout(pool, frames, keep=True)
    assert report["n_scored"] == 4 and report["heldout_overlap"]["kept_unranked"] == 2
    table = score_table(kept, np.array([0.3, -0.2, -5.0, -4.0]), frames)
    assert table["index"].tolist() == [0, 2, 3, 5]  # pool ids, the file's rows
    assert table["rank"].tolist() == [2, 1, pd.NA, pd.NA]
    with pytest.raises(ValueError, match="Every pool molecule is in the run's validation/test split"):
        leave_out_heldout(pool.iloc[2:], frames, keep=False)
