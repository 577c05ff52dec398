"""molft.accuracy_report: the accuracy benchmark's rows, summary and report, on hand-made results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from molft.accuracy_report import mean_std, report_markdown, result_rows, summarise
from molft.benchmark_data import Data, Split


def two_target_data() -> Data:
    molecules = pd.DataFrame({"smiles": ["C"] * 4, "logd": [1.0, 2.0, np.nan, 3.0], "logs": [0.5] * 4})
    return Data(molecules, ["logd", "logs"], "regression", "toy", 4, {})


def test_result_rows_put_the_mean_first_and_count_each_targets_labelled_test_molecules():
    split = Split(
        "random_s0", "random", Path("s.json"), {"train": np.array([0]), "test": np.array([1, 2, 3])}
    )
    metrics = {"rmse": 0.7, "rmse_logd": 0.6, "rmse_logs": 0.8, "r2_logd": 0.5}
    rows = result_rows("molformer", split, 1, metrics, 12.5, two_target_data())
    assert [row["target"] for row in rows] == ["mean", "logd", "logs"]
    assert [row["n_test"] for row in rows] == [3, 2, 3]  # logd is missing on one test molecule
    assert [row["rmse"] for row in rows] == [0.7, 0.6, 0.8]
    assert rows[1]["r2"] == 0.5 and np.isnan(rows[2]["r2"])  # absent metrics stay missing, never 0
    assert all(row["wall_time_s"] == 12.5 and row["n_train"] == 1 for row in rows)


def test_mean_std_uses_the_sample_std_and_skips_missing_values():
    assert mean_std(pd.Series([1.0, 2.0, np.nan])) == "1.500 ± 0.707"
    assert mean_std(pd.Series([0.25])) == "0.250"
    assert mean_std(pd.Series([np.nan])) == "n/a"


def results() -> pd.DataFrame:
    rows = []
    for method, rmses in (("molformer", (0.6, 0.8)), ("rf", (0.9, 0.7)), ("chemprop", (0.5,))):
        for seed, rmse in enumerate(rmses):
            rows.append(
                {"method": method, "split": "random_s0", "family": "random", "seed": seed, "target": "logd",
                 "rmse": rmse, "mae": rmse / 2, "r2": 1 - rmse, "wall_time_s": 10.0 * (seed + 1)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_summary_ratio_is_taken_on_the_runs_both_methods_have():
    summary = summarise(results(), "regression").set_index("method")
    assert list(summary.index) == ["molformer", "rf", "chemprop"]
    assert summary.loc["molformer", "RMSE"] == "0.700 ± 0.141"
    assert summary.loc["rf", "MoLFormer/peer RMSE"] == "0.875"  # 0.7 / 0.8
    assert summary.loc["chemprop", "MoLFormer/peer RMSE"] == "1.200"  # seed 0 only: 0.6 / 0.5
    assert summary.loc["molformer", "MoLFormer/peer RMSE"] == ""
    assert summary.loc["rf", "wall s/run"] == "15.0 ± 7.1"
    assert "target" not in summary.columns  # one target: no target column


def test_report_names_the_command_the_trees_and_every_note():
    text, summary = report_markdown(
        results(), two_target_data(), ["chemprop skipped: x."], "python b.py", ["rf"], rf_trees=123
    )
    assert summary in text and "Command: `python b.py`" in text
    assert "its 123 trees" in text and "- chemprop skipped: x." in text
    assert text.count("| molformer |") == 1 + 2  # once in the summary, once per run in "Every run"
