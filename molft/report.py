"""Aggregate a finished (or partly finished) sweep into tables, paired tests and figures.

A run counts only once its completion marker exists, so a sweep that is still running or crashed part-way
can be reported at any time without half-written runs leaking into the numbers. Comparisons pair runs on
seed (and split seed) inside each PEFT method, because seed-to-seed spread is of the same size as the
effects being measured. Runs on different splitters (scaffold, butina, ...) form separate cells and are
never paired with each other.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from molft import plots
from molft.io import DONE_MARKER, read_json, write_csv, write_text
from molft.markdown import format_cell, markdown_table
from molft.stats import (
    WILCOXON_ZERO_METHOD,
    PairedTest,
    holm_correction,
    paired_comparison,
    require_columns,
    summarize,
)

logger = logging.getLogger(__name__)

RESULTS_FILE = "all_results.json"
RUN_KEYS = ("split", "method", "strategy", "seed", "split_seed")
UNRECORDED_SPLIT = "unrecorded"
COST_COLUMNS = ("trainable_params", "total_params", "trainable_share", "train_wall_time_s")
DEFAULT_METRICS = ("test_rmse", "test_mae", "test_r2")
# selections in the order a reader compares them; unknown ones follow alphabetically
STRATEGY_ORDER = ("none", "random", "influence_top", "influence_bottom")
METHOD_ORDER = ("full", "lora", "ia3", "bitfit", "pooled")
HIGHER_IS_BETTER_SUFFIXES = ("r2", "pearson", "spearman")


def collect_runs(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per complete run found at any depth under `sweep_dir`; incomplete runs are logged and skipped."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"Sweep directory {sweep_dir} does not exist.")
    complete_dirs = sorted(marker.parent for marker in sweep_dir.rglob(DONE_MARKER))
    _log_incomplete_runs(sweep_dir, set(complete_dirs))

    rows = [row for run_dir in complete_dirs if (row := _read_run(run_dir)) is not None]
    if not rows:
        return pd.DataFrame(columns=[*RUN_KEYS, "run_dir"])
    runs = pd.DataFrame(rows)
    runs["split_seed"] = runs["split_seed"].astype("Int64")
    if 0 < runs["split_seed"].notna().sum() < len(runs):
        logger.warning("Only some runs record a split_seed; runs without one pair only with each other.")
    duplicated = runs[runs.duplicated(list(RUN_KEYS), keep=False)]
    if not duplicated.empty:
        raise ValueError(
            "More than one complete run for the same (split, method, strategy, seed, split_seed): "
            + ", ".join(duplicated["run_dir"])
        )
    runs = _sort_cells(runs, extra=["seed", "split_seed"])
    logger.info("Collected %d complete run(s) from %s", len(runs), sweep_dir)
    return runs


def cell_table(runs: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> pd.DataFrame:
    """Per (split, method, strategy): run count, and mean, std and 95% t-interval over seeds per metric."""
    require_columns(runs, ["method", "strategy", *metrics], "Runs table")
    runs = _with_split(runs)
    rows = []
    for (split, method, strategy), cell in runs.groupby(["split", "method", "strategy"], sort=False):
        row: dict[str, Any] = {"split": split, "method": method, "strategy": strategy, "n": len(cell)}
        for metric in metrics:
            values = cell[metric].to_numpy(dtype=np.float64)
            finite = np.isfinite(values)
            if not finite.all():
                logger.warning(
                    "%s/%s: %d run(s) have a non-finite %s and are left out of its summary: %s",
                    method,
                    strategy,
                    (~finite).sum(),
                    metric,
                    ", ".join(cell.loc[~finite, "run_dir"].astype(str)) if "run_dir" in cell else "",
                )
            summary = summarize(values[finite]) if finite.any() else {"n": 0}
            for stat in ("n", "mean", "std", "ci_low", "ci_high"):
                row[f"{metric}_{stat}"] = summary.get(stat, np.nan)
        for column in COST_COLUMNS:
            if column in cell:
                row[column] = cell[column].mean()
        rows.append(row)
    return _sort_cells(pd.DataFrame(rows))


def paired_table(
    runs: pd.DataFrame, metric: str = "test_rmse", test: PairedTest = "wilcoxon"
) -> pd.DataFrame:
    """Paired differences (comparison − baseline) within each split and method, matched on seed and split seed.

    Baselines: every strategy against "none" and against "random", and "influence_top" against
    "influence_bottom". `p_holm` adjusts the p-values over all rows of the table.
    """
    require_columns(runs, ["method", "strategy", "seed", metric], "Runs table")
    runs = _with_split(runs)
    keys = ["seed"]
    if "split_seed" in runs and runs["split_seed"].notna().any():
        keys.append("split_seed")
    rows = []
    for (split, method), method_runs in runs.groupby(["split", "method"], sort=True):
        present = _ordered_strategies(method_runs["strategy"])
        for comparison, baseline in _comparisons(str(method), present):
            row = _paired_row(method_runs, str(method), comparison, baseline, metric, test, keys)
            rows.append({"split": split, **row})
    columns = [
        "split",
        "method",
        "comparison",
        "baseline",
        "n_pairs",
        "n_dropped",
        "mean_diff",
        "std_diff",
        "ci_low",
        "ci_high",
        "p_value",
        "p_holm",
        "test",
        "note",
    ]
    table = pd.DataFrame(rows, columns=columns)
    table["p_holm"] = holm_correction(table["p_value"].to_numpy(dtype=np.float64))
    return table


def overview_table(cells: pd.DataFrame, metric: str = "test_rmse") -> pd.DataFrame:
    """Strategies (and splitters) down, methods across, "mean ± std (n)" in each cell: the grid at a glance."""
    require_columns(cells, ["method", "strategy", "n", f"{metric}_mean", f"{metric}_std"], "Cell table")
    cells = _with_split(cells)
    rows = ["split", "strategy"] if cells["split"].nunique() > 1 else ["strategy"]
    text = [
        f"{mean:.3f} ({n})" if math.isnan(std) else f"{mean:.3f} ± {std:.3f} ({n})"
        for mean, std, n in cells[[f"{metric}_mean", f"{metric}_std", "n"]].itertuples(index=False)
    ]
    table = _methods_across(cells.assign(_text=text).pivot(index=rows, columns="method", values="_text"))
    order = table["strategy"].map(lambda s: _strategy_rank(s)[0])
    sort_keys = [*rows[:-1], "_rank", "strategy"]
    table = table.assign(_rank=order).sort_values(sort_keys, kind="stable").drop(columns="_rank")
    table.columns.name = None
    return table.reset_index(drop=True)


def pooled_paired_table(
    runs: pd.DataFrame, metric: str = "test_rmse", test: PairedTest = "wilcoxon"
) -> pd.DataFrame:
    """The paired comparisons with every method's runs as further pairs (method "pooled").

    Three seeds per cell cannot give a Wilcoxon p below 0.25; pooling the methods (each pair still within
    one method and seed) asks whether a strategy helps fine-tuning in general, with four times the pairs.
    Only strategies every pooled method has are compared, so no method's pairs are silently missing.
    """
    require_columns(runs, ["method", "strategy", "seed", metric], "Runs table")
    runs = _with_split(runs)
    common = set.intersection(*(set(group["strategy"]) for _, group in runs.groupby(["split", "method"])))
    pooled = runs[runs["strategy"].isin(common)].assign(
        seed=runs["method"].astype(str) + ":" + runs["seed"].astype(str), method="pooled"
    )
    return paired_table(pooled, metric, test)


def paired_overview(paired: pd.DataFrame) -> pd.DataFrame:
    """Comparisons down, methods across, "difference [95% CI] p" in each cell (Holm-adjusted p in the CSV)."""
    stats = ["n_pairs", "mean_diff", "ci_low", "ci_high", "p_value"]
    require_columns(paired, ["method", "comparison", "baseline", *stats], "Paired table")
    paired = _with_split(paired)
    text = [
        _paired_cell(int(n), diff, low, high, p)
        for n, diff, low, high, p in paired[stats].fillna({"n_pairs": 0}).itertuples(index=False)
    ]
    rows = ["split", "comparison"] if paired["split"].nunique() > 1 else ["comparison"]
    # against none, then random, then top vs bottom; strategies in their usual order within each
    rank = {
        f"{comparison} − {baseline}": (_strategy_rank(baseline), _strategy_rank(comparison))
        for comparison, baseline in paired[["comparison", "baseline"]].itertuples(index=False)
    }
    order = {label: i for i, label in enumerate(sorted(rank, key=rank.get))}
    labelled = paired.assign(comparison=paired["comparison"] + " − " + paired["baseline"], _text=text)
    table = _methods_across(labelled.pivot(index=rows, columns="method", values="_text"))
    table = table.assign(_rank=table["comparison"].map(order))
    table = table.sort_values([*rows[:-1], "_rank"], kind="stable").drop(columns="_rank")
    table.columns.name = None
    return table.reset_index(drop=True)


def _paired_cell(n: int, diff: float, low: float, high: float, p: float) -> str:
    if n == 0:
        return "no pairs"
    if n == 1:
        return f"{diff:+.3f} (n=1)"
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}] p={format_cell(p)} (n={n})"


def write_report(
    sweep_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    metric: str = "test_rmse",
    test: PairedTest = "wilcoxon",
) -> dict[str, Path]:
    """Write report.md, runs/cells/paired CSVs and sweep figures to `out_dir` (default sweep_dir/report)."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    runs = collect_runs(sweep_dir)
    if runs.empty:
        raise ValueError(f"No complete runs (directories with {DONE_MARKER}) under {sweep_dir}.")
    metrics = [metric] + [m for m in DEFAULT_METRICS if m != metric and m in runs]
    cells = cell_table(runs, metrics)
    paired = paired_table(runs, metric, test)
    if runs["method"].nunique() > 1:
        paired = pd.concat([paired, pooled_paired_table(runs, metric, test)], ignore_index=True)
        paired["p_holm"] = holm_correction(paired["p_value"].to_numpy(dtype=np.float64))

    paths = {
        "runs": out_dir / "runs.csv",
        "cells": out_dir / "cells.csv",
        "paired": out_dir / "paired.csv",
    }
    write_csv(paths["runs"], runs)
    write_csv(paths["cells"], cells)
    write_csv(paths["paired"], paired)
    paths.update(_write_figures(cells, metric, out_dir))
    paths["report"] = out_dir / "report.md"
    write_text(paths["report"], _markdown_report(sweep_dir, runs, cells, paired, metric, test, paths))
    logger.info("Wrote report to %s", paths["report"])
    return paths


def lower_is_better(metric: str) -> bool:
    return not metric.endswith(HIGHER_IS_BETTER_SUFFIXES)


def _read_run(run_dir: Path) -> dict[str, Any] | None:
    marker_path = run_dir / DONE_MARKER
    marker = _read_json_object(marker_path)
    missing = [key for key in ("peft", "selection", "seed") if key not in marker]
    if missing:
        logger.warning("Skipping %s: its %s lacks %s (not a regression run).", run_dir, DONE_MARKER, missing)
        return None
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        logger.warning("Skipping %s: marked complete but %s is missing.", run_dir, RESULTS_FILE)
        return None
    for key in ("seed", "split_seed"):
        value = marker.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{marker_path}: {key!r} must be an integer, got {value!r}.")

    row: dict[str, Any] = {
        # --peft none is full fine-tuning; "none" is kept for the strategy that adds no external data
        "split": str(marker.get("split") or UNRECORDED_SPLIT),
        "method": "full" if marker["peft"] == "none" else str(marker["peft"]),
        "strategy": str(marker["selection"]),
        "seed": marker["seed"],
        "split_seed": marker.get("split_seed"),
    }
    results = _read_json_object(results_path)
    for key, value in results.items():
        # scalars only: metrics, parameter counts and timings; nested entries are run details
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in row:
            row[key] = value
    row["run_dir"] = str(run_dir)
    return row


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return data


def _log_incomplete_runs(sweep_dir: Path, complete_dirs: set[Path]) -> None:
    # run outputs without a marker: crashed, killed or still running
    candidates = {path.parent for path in sweep_dir.rglob(RESULTS_FILE)}
    candidates |= {path.parent for path in sweep_dir.rglob("checkpoint-*") if path.is_dir()}
    incomplete = sorted(
        d for d in candidates if d not in complete_dirs and not any(p in complete_dirs for p in d.parents)
    )
    for run_dir in incomplete:
        logger.warning("Ignoring incomplete run %s (no %s).", run_dir, DONE_MARKER)


def _comparisons(method: str, present: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for baseline in ("none", "random"):
        if baseline not in present:
            logger.info("Method %s has no %r runs: skipping comparisons against it.", method, baseline)
            continue
        # "none" vs "random" is already covered as "random" vs "none"
        skip = {baseline, "none"}
        pairs += [(strategy, baseline) for strategy in present if strategy not in skip]
    top, bottom = "influence_top", "influence_bottom"
    if top in present and bottom in present:
        pairs.append((top, bottom))
    elif top in present or bottom in present:
        logger.info("Method %s lacks %s or %s runs: skipping top vs bottom.", method, top, bottom)
    return pairs


def _paired_row(
    method_runs: pd.DataFrame,
    method: str,
    comparison: str,
    baseline: str,
    metric: str,
    test: PairedTest,
    keys: list[str],
) -> dict[str, Any]:
    sides = []
    for strategy in (comparison, baseline):
        side = method_runs.loc[method_runs["strategy"] == strategy, [*keys, metric]]
        if side.duplicated(keys).any():
            raise ValueError(f"{method}/{strategy} has more than one run per {keys}; cannot pair.")
        sides.append(side)
    matched = sides[0].merge(sides[1], on=keys, suffixes=("_a", "_b"))
    matched = matched[
        np.isfinite(matched[[f"{metric}_a", f"{metric}_b"]].to_numpy(dtype=np.float64)).all(axis=1)
    ]
    n_dropped = len(sides[0]) + len(sides[1]) - 2 * len(matched)
    if n_dropped:
        logger.info(
            "%s: %s vs %s drops %d unmatched or non-finite run(s).", method, comparison, baseline, n_dropped
        )
    row: dict[str, Any] = {"method": method, "comparison": comparison, "baseline": baseline}
    if matched.empty:
        row.update(n_pairs=0, n_dropped=n_dropped, test=test, note="no matched seeds")
        return row
    result = paired_comparison(matched[f"{metric}_a"], matched[f"{metric}_b"], test=test)
    row.update(
        n_pairs=result["n"],
        n_dropped=n_dropped,
        **{k: result[k] for k in ("mean_diff", "std_diff", "ci_low", "ci_high", "p_value", "test", "note")},
    )
    return row


def _ordered_strategies(strategies: Iterable[str]) -> list[str]:
    return sorted(set(strategies), key=_strategy_rank)


def _strategy_rank(strategy: str) -> tuple[int, str]:
    if strategy in STRATEGY_ORDER:
        return STRATEGY_ORDER.index(strategy), ""
    return len(STRATEGY_ORDER), strategy


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _methods_across(pivoted: pd.DataFrame) -> pd.DataFrame:
    """A pivot with one column per method, known methods first, its index back as columns; gaps empty."""
    columns = sorted(pivoted.columns, key=lambda m: (_method_rank(m), m))
    return pivoted[columns].fillna("").reset_index()


def _with_split(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs tables built by hand (or by older versions) may lack the split column: one unnamed split."""
    return runs if "split" in runs else runs.assign(split=UNRECORDED_SPLIT)


def _sort_cells(frame: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    frame = _with_split(frame)
    rank = frame["strategy"].map(lambda s: _strategy_rank(s)[0])
    method_rank = frame["method"].map(_method_rank)
    ordered = frame.assign(_rank=rank, _method_rank=method_rank).sort_values(
        ["split", "_method_rank", "method", "_rank", "strategy", *extra], kind="stable"
    )
    return ordered.drop(columns=["_rank", "_method_rank"]).reset_index(drop=True)


def _write_figures(cells: pd.DataFrame, metric: str, out_dir: Path) -> dict[str, Path]:
    if cells["split"].nunique() > 1:  # one bar group per method and splitter
        cells = cells.assign(method=cells["method"] + " / " + cells["split"])
    paths = {"bars": out_dir / "bars_ci.png"}
    plots.bars_with_ci(cells, value=metric, path=paths["bars"])
    if "trainable_params" in cells:
        paths["params"] = out_dir / "metric_vs_params.png"
        plots.metric_vs_params(cells, value=metric, path=paths["params"])
    else:
        logger.info("No trainable_params in the results: skipping the parameter plot.")
    if {"trainable_share", "train_wall_time_s"} <= set(cells.columns):
        paths["tradeoff"] = out_dir / "tradeoff.png"
        plots.tradeoff_figure(cells, value=metric, path=paths["tradeoff"])
    else:
        logger.info("No trainable_share/train_wall_time_s in the results: skipping the trade-off figure.")
    return paths


def _markdown_report(
    sweep_dir: Path,
    runs: pd.DataFrame,
    cells: pd.DataFrame,
    paired: pd.DataFrame,
    metric: str,
    test: PairedTest,
    paths: dict[str, Path],
) -> str:
    metrics = [c.removesuffix("_mean") for c in cells.columns if c.endswith("_mean")]
    several_splits = cells["split"].nunique() > 1
    cell_view = cells[[*(["split"] if several_splits else []), "method", "strategy", "n"]].copy()
    for m in metrics:
        cell_view[f"{m} (95% CI)"] = [
            f"{format_cell(mean)} [{format_cell(low)}, {format_cell(high)}]"
            for mean, low, high in cells[[f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high"]].itertuples(index=False)
        ]
    for column in COST_COLUMNS:
        if column in cells:
            cell_view[column] = cells[column]

    better = "lower" if lower_is_better(metric) else "higher"
    sign = "negative" if better == "lower" else "positive"
    keys = "seed and split seed" if runs["split_seed"].notna().any() else "seed"
    if test == "wilcoxon":
        test_sentence = (
            f"two-sided Wilcoxon signed-rank test on the paired differences (scipy.stats.wilcoxon, "
            f"zero_method={WILCOXON_ZERO_METHOD!r}: zero differences are dropped)"
        )
    else:
        test_sentence = "two-sided paired t-test (scipy.stats.ttest_rel)"
    figures = [f"![{name}]({path.name})\n" for name, path in paths.items() if path.suffix == ".png"]

    lines = [
        "# Sweep report",
        "",
        f"Sweep directory: `{sweep_dir}`. {len(runs)} complete run(s), {cells['method'].nunique()} method(s), "
        f"{cells['strategy'].nunique()} strategy(ies), {cells['split'].nunique()} splitter(s).",
        "",
        f"## Overview ({metric})",
        "",
        f"{metric} mean ± std over seeds (number of runs).",
        "",
        markdown_table(overview_table(cells, metric)),
        "",
        "## Cells",
        "",
        "Mean over seeds with a 95% Student-t confidence interval (nan with a single seed).",
        "",
        markdown_table(cell_view),
        "",
        f"## Paired comparisons ({metric})",
        "",
        f"Each row gives `comparison − baseline` in {metric} over runs of the same method matched on {keys}; "
        f"{sign} differences mean {better} {metric}, which is better. The interval is a 95% Student-t "
        f"interval on the differences and p-values come from the {test_sentence}; p_holm is Holm-adjusted "
        f"over all {len(paired)} comparisons. n_dropped counts runs without a matching partner."
        + (
            " The `pooled` column takes every method's runs as pairs (each pair within one method and seed), "
            "for the strategies all methods have."
            if (paired["method"] == "pooled").any()
            else ""
        ),
        "",
        markdown_table(paired_overview(paired))
        if not paired.empty
        else "No comparison had its baseline present.",
        "",
        "All columns:",
        "",
        markdown_table(paired if several_splits else paired.drop(columns="split"))
        if not paired.empty
        else "",
        "",
        "## Figures",
        "",
        *figures,
    ]
    return "\n".join(lines)
