"""The score table and the score statistics of an influence run (molft.influence.report)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from molft.influence.report import score_statistics, score_table


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
    assert table["rank"].tolist() == [3, 1, 2]
    assert table["helpful"].tolist() == [False, True, True]
    assert table["in_run_split"].tolist() == ["", "train", "test"]
