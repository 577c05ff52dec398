"""The accuracy benchmark's tables: one row per run and target, mean ± std per method and split family, and the
MoLFormer/peer ratio on the runs both methods have. `benchmarks/bench_accuracy.py` runs the methods; this is what
it writes, kept apart so the rules for a row and a summary are read (and tested) in one place."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
import pandas as pd

from molft import baselines
from molft.benchmark_data import Data, Split
from molft.markdown import markdown_table
from molft.metrics import CLASSIFICATION_METRIC_NAMES

METHODS = ("molformer", "rf", "chemprop")
TABLE_METRICS = {"regression": ("rmse", "mae", "r2"), "classification": ("roc_auc", "pr_auc")}


def result_rows(
    method: str, split: Split, seed: int, metrics: dict[str, Any], wall: float, data: Data
) -> list[dict[str, Any]]:
    """One row per target (and, for several targets, a `mean` row first), the run's metrics as columns."""
    kind = "regression" if data.problem_type == baselines.REGRESSION else "classification"
    names = (
        ("rmse", "mae", "r2", "pearson", "spearman") if kind == "regression" else CLASSIFICATION_METRIC_NAMES
    )
    test = data.molecules.iloc[split.positions["test"]]
    base = {"method": method, "split": split.name, "family": split.family, "seed": seed}
    several = len(data.targets) > 1
    rows = []
    for target in (["mean"] if several else []) + data.targets:
        suffix = f"_{target}" if several and target != "mean" else ""
        n_test = len(test) if target == "mean" else int(test[target].notna().sum())
        row = {**base, "target": target, "n_train": len(split.positions["train"]), "n_test": n_test}
        row.update({name: float(metrics.get(name + suffix, np.nan)) for name in names})
        rows.append({**row, "wall_time_s": wall})
    return rows


def mean_std(values: pd.Series, digits: int = 3) -> str:
    """The non-missing values as mean ± sample std; the value alone for one, "n/a" for none."""
    values = values.dropna()
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def summarise(results: pd.DataFrame, problem_type: str) -> pd.DataFrame:
    """Mean ± std over splits x seeds per target, split family and method; MoLFormer's primary metric over each peer's."""
    kind = "regression" if problem_type == baselines.REGRESSION else "classification"
    primary, _ = baselines.PRIMARY_METRIC[problem_type]
    labels = {"rmse": "RMSE", "mae": "MAE", "r2": "R²", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC"}
    ratio_column = f"MoLFormer/peer {labels[primary]}"
    rows = []
    for (target, family), group in results.groupby(["target", "family"], sort=False):
        reference = group[group["method"] == "molformer"]
        for method in [m for m in METHODS if m in set(group["method"])]:
            runs = group[group["method"] == method]
            row = {"target": target, "split family": family, "method": method, "runs": len(runs)}
            row.update({labels[m]: mean_std(runs[m]) for m in TABLE_METRICS[kind]})
            paired = reference.merge(runs, on=["split", "seed"], suffixes=("_ref", ""))
            row[ratio_column] = (
                f"{paired[primary + '_ref'].mean() / paired[primary].mean():.3f}"
                if method != "molformer" and len(paired)
                else ""
            )
            row["wall s/run"] = mean_std(runs["wall_time_s"], digits=1)
            rows.append(row)
    summary = pd.DataFrame(rows)
    if results["target"].nunique() == 1:
        summary = summary.drop(columns="target")
    return summary


def machine(methods: list[str]) -> str:
    """The machine a report was measured on, with the GPU when a neural method ran and OMP_NUM_THREADS."""
    text = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    if "molformer" in methods or "chemprop" in methods:
        import torch  # only when a neural method runs: torch is slow to import

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name()}"
    threads = os.environ.get("OMP_NUM_THREADS")
    return text + (f", OMP_NUM_THREADS={threads}" if threads else "")


def report_markdown(
    results: pd.DataFrame, data: Data, notes: list[str], command: str, methods: list[str], rf_trees: int
) -> tuple[str, str]:
    """(the whole report: summary, command, machine, notes and every run; the summary table alone)."""
    summary = markdown_table(summarise(results, data.problem_type))
    lines = [
        "# Test accuracy beside peers, on the same split files",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine(methods)}  ",
        f"Data: {data.source}; targets {', '.join(data.targets)} ({data.problem_type}); "
        f"{results['split'].nunique()} splits x {results['seed'].nunique()} seeds",
        "",
        summary,
        "",
        "Mean ± sample std over splits x seeds. The ratio is MoLFormer's mean over the peer's, on the runs both "
        f"have. The forest trains on the train part only (its {rf_trees} trees and scikit-learn defaults "
        "leave nothing to choose on validation); MoLFormer and chemprop use the validation part for early stopping. Wall "
        "time is per run (a whole run_regression.py or chemprop process; fingerprints, fit and prediction for "
        "the forest).",
        *(f"- {note}" for note in notes),
        "",
        "## Every run",
        "",
        markdown_table(results),
        "",
    ]
    return "\n".join(lines), summary
