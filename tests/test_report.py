from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from molft.io import DONE_MARKER
from molft.report import (
    cell_table,
    collect_runs,
    overview_table,
    paired_overview,
    paired_table,
    pooled_paired_table,
    write_report,
)

STRATEGIES = ("none", "random", "influence_top", "influence_bottom")
SEEDS = (0, 1, 2)
# test RMSE per (method, strategy) for seeds 0, 1, 2
RMSE = {
    ("full", "none"): (0.70, 0.72, 0.68),
    ("full", "random"): (0.74, 0.75, 0.71),
    ("full", "influence_top"): (0.695, 0.70, 0.69),
    ("full", "influence_bottom"): (0.80, 0.78, 0.83),
    ("lora", "none"): (0.76, 0.79, 0.73),
    ("lora", "random"): (0.78, 0.80, 0.77),
    ("lora", "influence_top"): (0.75, 0.77, 0.745),
    ("lora", "influence_bottom"): (0.85, 0.84, 0.88),
}
PARAMS = {"full": (46_800_000, 46_800_000), "lora": (294_912, 47_094_912)}
T_975_DF2 = stats.t.ppf(0.975, df=2)


def _write_run(
    run_dir: Path, method: str, strategy: str, seed: int, rmse: float, marker: bool = True, **extra
):
    run_dir.mkdir(parents=True)
    trainable, total = PARAMS[method]
    results = {
        "test_rmse": rmse,
        "test_mae": 0.8 * rmse,
        "test_r2": 1.0 - rmse,
        "eval_rmse": rmse + 0.01,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "train_wall_time_s": 100.0 + seed,
        "config": {"learning_rate": 1e-4},
    }
    (run_dir / "all_results.json").write_text(json.dumps(results))
    if marker:
        info = {"peft": method, "selection": strategy, "seed": seed, "split_seed": 0, **extra}
        (run_dir / DONE_MARKER).write_text(json.dumps(info))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for (method, strategy), values in RMSE.items():
        # runs may sit at any depth
        base = root / method if method == "full" else root / "group_b" / method
        for seed, rmse in zip(SEEDS, values, strict=True):
            _write_run(base / strategy / f"seed_{seed}", method, strategy, seed, rmse)
    # crashed run: results but no marker
    _write_run(root / "full" / "none" / "seed_7", "full", "none", 7, 9.9, marker=False)
    # a different kind of run with a marker of its own
    (root / "influence").mkdir()
    (root / "influence" / DONE_MARKER).write_text(json.dumps({"stage": "influence"}))
    return root


def _row(frame: pd.DataFrame, **match) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in match.items():
        mask &= frame[column] == value
    (index,) = frame.index[mask]
    return frame.loc[index]


def test_collect_runs_reads_complete_runs_only(sweep, caplog):
    with caplog.at_level(logging.INFO, logger="molft.report"):
        runs = collect_runs(sweep)
    assert len(runs) == 2 * 4 * 3
    assert set(runs["seed"]) == set(SEEDS)  # seed 7 never finished
    assert 9.9 not in set(runs["test_rmse"])
    assert "Ignoring incomplete run" in caplog.text and "seed_7" in caplog.text
    assert "not a regression run" in caplog.text
    for column in ("method", "strategy", "split_seed", "test_mae", "trainable_params", "train_wall_time_s"):
        assert column in runs
    assert "config" not in runs  # nested entries are not metrics
    row = _row(runs, method="lora", strategy="influence_top", seed=1)
    assert row["test_rmse"] == 0.77 and row["trainable_share"] == pytest.approx(294_912 / 47_094_912)
    assert Path(row["run_dir"]) == sweep / "group_b" / "lora" / "influence_top" / "seed_1"
    # strategies in reading order within each method
    assert list(runs["strategy"].iloc[:12:3]) == list(STRATEGIES)


def test_cell_table_matches_hand_computation(sweep):
    cells = cell_table(collect_runs(sweep))
    assert len(cells) == 8
    assert list(cells["method"]) == ["full"] * 4 + ["lora"] * 4
    full_none = _row(cells, method="full", strategy="none")
    # 0.70, 0.72, 0.68: mean 0.70, deviations 0, 0.02, -0.02 -> std 0.02
    half_width = T_975_DF2 * 0.02 / math.sqrt(3)
    assert full_none["n"] == 3
    assert full_none["test_rmse_mean"] == pytest.approx(0.70)
    assert full_none["test_rmse_std"] == pytest.approx(0.02)
    assert full_none["test_rmse_ci_low"] == pytest.approx(0.70 - half_width)
    assert full_none["test_rmse_ci_high"] == pytest.approx(0.70 + half_width)
    assert full_none["test_mae_mean"] == pytest.approx(0.8 * 0.70)
    assert full_none["test_r2_mean"] == pytest.approx(0.30)
    lora_bottom = _row(cells, method="lora", strategy="influence_bottom")
    # 0.85, 0.84, 0.88: mean 0.8566..., deviations -0.00667, -0.01667, 0.02333
    std = math.sqrt((0.02 / 3) ** 2 + (0.05 / 3) ** 2 + (0.07 / 3) ** 2) / math.sqrt(2)
    assert lora_bottom["test_rmse_mean"] == pytest.approx(2.57 / 3)
    assert lora_bottom["test_rmse_ci_high"] == pytest.approx(2.57 / 3 + T_975_DF2 * std / math.sqrt(3))
    assert lora_bottom["trainable_params"] == 294_912
    assert lora_bottom["train_wall_time_s"] == pytest.approx(101.0)


def test_paired_table_matches_hand_computation(sweep):
    paired = paired_table(collect_runs(sweep))
    # per method: 3 vs none, 2 vs random, top vs bottom
    assert len(paired) == 12
    assert set(zip(paired["comparison"], paired["baseline"], strict=True)) == {
        ("random", "none"),
        ("influence_top", "none"),
        ("influence_bottom", "none"),
        ("influence_top", "random"),
        ("influence_bottom", "random"),
        ("influence_top", "influence_bottom"),
    }
    top_vs_none = _row(paired, method="full", comparison="influence_top", baseline="none")
    # diffs -0.005, -0.02, +0.01: ranks 1-, 3-, 2+ so R+ = 2; P(R+ <= 2) = 3/8, two-sided 0.75
    diff_mean = (-0.005 - 0.02 + 0.01) / 3
    diff_std = math.sqrt(((-0.005 - diff_mean) ** 2 + (-0.02 - diff_mean) ** 2 + (0.01 - diff_mean) ** 2) / 2)
    assert top_vs_none["n_pairs"] == 3 and top_vs_none["n_dropped"] == 0
    assert top_vs_none["mean_diff"] == pytest.approx(diff_mean)
    assert top_vs_none["ci_low"] == pytest.approx(diff_mean - T_975_DF2 * diff_std / math.sqrt(3))
    assert top_vs_none["ci_high"] == pytest.approx(diff_mean + T_975_DF2 * diff_std / math.sqrt(3))
    assert top_vs_none["p_value"] == pytest.approx(0.75)
    assert top_vs_none["test"] == "wilcoxon"

    top_vs_bottom = _row(paired, method="lora", comparison="influence_top", baseline="influence_bottom")
    # diffs -0.10, -0.07, -0.135: all negative, smallest two-sided exact p for 3 pairs
    assert top_vs_bottom["mean_diff"] == pytest.approx(-0.305 / 3)
    assert top_vs_bottom["p_value"] == pytest.approx(0.25)
    assert (paired["p_holm"] >= paired["p_value"]).all()


def test_paired_table_ttest(sweep):
    paired = paired_table(collect_runs(sweep), test="ttest")
    row = _row(paired, method="lora", comparison="random", baseline="none")
    diffs = [0.02, 0.01, 0.04]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert row["mean_diff"] == pytest.approx(mean)
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(mean / (std / math.sqrt(3)), df=2))
    assert row["test"] == "ttest"


def test_unmatched_seeds_are_dropped_and_counted(sweep):
    (sweep / "group_b" / "lora" / "random" / "seed_2" / DONE_MARKER).unlink()
    runs = collect_runs(sweep)
    assert _row(cell_table(runs), method="lora", strategy="random")["n"] == 2
    paired = paired_table(runs)
    row = _row(paired, method="lora", comparison="random", baseline="none")
    assert row["n_pairs"] == 2 and row["n_dropped"] == 1
    assert row["mean_diff"] == pytest.approx((0.02 + 0.01) / 2)
    assert _row(paired, method="full", comparison="random", baseline="none")["n_dropped"] == 0


def test_split_seed_is_part_of_the_pairing(tmp_path):
    root = tmp_path / "sweep"
    for seed in SEEDS:
        _write_run(root / f"none_{seed}", "full", "none", seed, 0.7)
    _write_run(root / "random_0", "full", "random", 0, 0.8)
    _write_run(root / "random_1", "full", "random", 1, 0.9, split_seed=5)
    paired = paired_table(collect_runs(root))
    row = _row(paired, comparison="random", baseline="none")
    assert row["n_pairs"] == 1 and row["n_dropped"] == 3
    assert row["mean_diff"] == pytest.approx(0.1)
    assert math.isnan(row["p_value"])


def test_missing_baseline_is_skipped_with_log(sweep, caplog):
    shutil.rmtree(sweep / "group_b" / "lora" / "random")
    with caplog.at_level(logging.INFO, logger="molft.report"):
        paired = paired_table(collect_runs(sweep))
    lora = paired[paired["method"] == "lora"]
    assert set(lora["baseline"]) == {"none", "influence_bottom"}
    assert len(lora) == 3 and len(paired) == 9
    assert "Method lora has no 'random' runs" in caplog.text


def test_duplicate_runs_are_rejected(sweep):
    _write_run(sweep / "copy", "full", "none", 0, 0.5)
    with pytest.raises(ValueError, match="More than one complete run"):
        collect_runs(sweep)


def test_bad_seed_names_the_marker(sweep):
    _write_run(sweep / "bad", "full", "none", 0, 0.5)
    (sweep / "bad" / DONE_MARKER).write_text(
        json.dumps({"peft": "full", "selection": "none", "seed": "zero"})
    )
    with pytest.raises(ValueError, match=r"bad/run_complete.json.*'seed'"):
        collect_runs(sweep)


def test_write_report(sweep, tmp_path):
    out_dir = tmp_path / "report"
    paths = write_report(sweep, out_dir)
    for name in ("report", "runs", "cells", "paired", "bars", "params", "tradeoff"):
        assert paths[name].parent == out_dir
        assert paths[name].stat().st_size > 0, name
    cells = pd.read_csv(paths["cells"])
    assert len(cells) == 8
    assert _row(cells, method="full", strategy="none")["test_rmse_mean"] == pytest.approx(0.70)
    assert len(pd.read_csv(paths["paired"])) == 12 + 6  # 6 per method, and 6 pooled over both
    report = paths["report"].read_text()
    assert "Wilcoxon signed-rank" in report
    assert "negative differences mean lower test_rmse, which is better" in report
    assert "| full | none | 3 | 0.7 [" in report
    assert "294,912" in report
    assert "![bars](bars_ci.png)" in report


def test_write_report_default_dir_and_higher_is_better(sweep):
    paths = write_report(sweep, metric="test_r2", test="ttest")
    assert paths["report"] == sweep / "report" / "report.md"
    report = paths["report"].read_text()
    assert "positive differences mean higher test_r2" in report and "ttest_rel" in report
    # the report directory holds no run outputs, so a second pass sees the same runs
    assert len(collect_runs(sweep)) == 24


def test_write_report_without_runs_fails(tmp_path):
    with pytest.raises(ValueError, match="No complete runs"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError):
        collect_runs(tmp_path / "missing")


def test_cli(sweep, tmp_path):
    import report

    paths = report.main(["--sweep_dir", str(sweep), "--output_dir", str(tmp_path / "cli"), "--test", "ttest"])
    assert paths["report"] == tmp_path / "cli" / "report.md"
    assert (pd.read_csv(paths["paired"])["test"] == "ttest").all()


def test_peft_none_is_reported_as_full_fine_tuning(tmp_path):
    run = tmp_path / "sweep" / "a"
    run.mkdir(parents=True)
    (run / "all_results.json").write_text(json.dumps({"test_rmse": 0.5}))
    (run / "run_complete.json").write_text(json.dumps({"peft": "none", "selection": "none", "seed": 1}))
    runs = collect_runs(tmp_path / "sweep")
    assert runs["method"].tolist() == ["full"]
    assert runs["strategy"].tolist() == ["none"]


def test_splitters_are_separate_cells_and_never_paired_across(tmp_path):
    root = tmp_path / "splitters"
    scaffold = {"none": (0.9, 1.0, 1.1), "random": (0.8, 0.95, 1.0)}
    for seed in SEEDS:
        _write_run(
            root / "random_split" / f"s{seed}", "full", "none", seed, 0.7 + 0.01 * seed, split="random"
        )
        for strategy, values in scaffold.items():
            _write_run(root / f"scaffold_{strategy}" / f"s{seed}", "full", strategy, seed, values[seed],
                       split="scaffold")  # fmt: skip
    runs = collect_runs(root)  # same method, strategy and seed on two splitters: not duplicates
    cells = cell_table(runs)
    assert len(cells) == 3
    assert _row(cells, split="random", strategy="none")["test_rmse_mean"] == pytest.approx(0.71)
    assert _row(cells, split="scaffold", strategy="none")["test_rmse_mean"] == pytest.approx(1.0)
    paired = paired_table(runs)
    # only the scaffold split has a random baseline; its none runs are the pairs, not the random split's
    assert paired[["split", "comparison", "baseline"]].values.tolist() == [["scaffold", "random", "none"]]
    assert paired["mean_diff"].iloc[0] == pytest.approx((-0.1 - 0.05 - 0.1) / 3)
    report = write_report(root, tmp_path / "report")["report"].read_text()
    assert "2 splitter(s)" in report and "| split | method | strategy | n |" in report


def test_overview_puts_strategies_down_and_methods_across(sweep):
    overview = overview_table(cell_table(collect_runs(sweep)))
    assert list(overview.columns) == ["strategy", "full", "lora"]
    assert overview["strategy"].tolist() == list(STRATEGIES)
    row = overview.set_index("strategy").loc["influence_bottom"]
    assert row["full"] == "0.803 ± 0.025 (3)"  # (0.80, 0.78, 0.83): mean 0.8033, sample std 0.0252
    assert row["lora"] == "0.857 ± 0.021 (3)"


def test_paired_overview_puts_comparisons_down_and_methods_across(sweep):
    overview = paired_overview(paired_table(collect_runs(sweep))).set_index("comparison")
    assert list(overview.columns) == ["full", "lora"]
    assert overview.index[0] == "random − none" and overview.index[-1] == "influence_top − influence_bottom"
    # full: top (0.695, 0.70, 0.69) − none (0.70, 0.72, 0.68) = (−0.005, −0.02, +0.01); sd 0.015,
    # t(0.975, 2) · 0.015 / √3 = 0.0373; Wilcoxon W+ = 2 of ranks 1..3, exact two-sided p = 6/8
    assert overview.loc["influence_top − none", "full"] == "-0.005 [-0.042, +0.032] p=0.75 (n=3)"


def test_paired_overview_cells_without_an_interval():
    paired = pd.DataFrame(
        {
            "method": ["full", "full"],
            "comparison": ["random", "influence_top"],
            "baseline": ["none", "none"],
            "n_pairs": [1, 0],
            "mean_diff": [0.0123, math.nan],
            "ci_low": [math.nan, math.nan],
            "ci_high": [math.nan, math.nan],
            "p_value": [math.nan, math.nan],
        }
    )
    overview = paired_overview(paired).set_index("comparison")["full"]
    assert overview.to_dict() == {"random − none": "+0.012 (n=1)", "influence_top − none": "no pairs"}


def test_pooled_comparisons_pair_within_method_and_seed(sweep):
    pooled = pooled_paired_table(collect_runs(sweep), test="ttest")
    row = _row(pooled, comparison="influence_top", baseline="none")
    assert row["method"] == "pooled" and row["n_pairs"] == 6
    diffs = [
        a - b
        for m in ("full", "lora")
        for a, b in zip(RMSE[(m, "influence_top")], RMSE[(m, "none")], strict=True)
    ]
    assert row["mean_diff"] == pytest.approx(sum(diffs) / 6)
    assert row["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    paired = pd.read_csv(write_report(sweep, sweep / "out")["paired"])
    assert set(paired["method"]) == {"full", "lora", "pooled"}
    assert paired["p_holm"].max() <= 1.0 and len(paired) == 3 * 6  # 6 comparisons for each of 3 columns
