"""Figures for single runs (parity, loss curves, influence scores) and for sweep reports.

Figures are built as `matplotlib.figure.Figure` objects rather than through pyplot's global registry, so a
report that draws hundreds of them does not leak memory and callers need not close anything. Every
function returns the Figure and, given `path`, also writes it atomically (format from the suffix).

Sweep-level plots read a cell table with one row per (method, strategy) and the columns
`{value}_mean`, `{value}_ci_low`, `{value}_ci_high` (as written by `molft.report.cell_table`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on compute nodes without a display

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from molft.io import save_figure  # noqa: E402
from molft.metrics import regression_metrics  # noqa: E402
from molft.stats import finite_vector, require_columns  # noqa: E402

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def parity_plot(
    y_true: Any,
    y_pred: Any,
    path: PathLike | None = None,
    title: str | None = None,
    unit: str | None = None,
) -> Figure:
    """Predicted vs measured; the band shows where half of the predictions fall (± median absolute error).

    `unit` names the label on the axes (e.g. "logD"); the annotation gives the number of molecules.
    """
    scores = regression_metrics(y_true, y_pred)
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    low = float(min(y_true.min(), y_pred.min()))
    high = float(max(y_true.max(), y_pred.max()))
    pad = 0.05 * (high - low or 1.0)
    limits = np.array([low - pad, high + pad])
    band = scores["median_ae"]

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.fill_between(
        limits,
        limits - band,
        limits + band,
        color="tab:gray",
        alpha=0.2,
        label=f"± median |error| ({band:.2f})",
    )
    ax.plot(limits, limits, "k--", linewidth=1, label="y = x")
    ax.scatter(y_true, y_pred, s=12, alpha=0.6, color="tab:blue", edgecolors="none")
    suffix = f" {unit}" if unit else ""
    ax.set(xlim=limits, ylim=limits, xlabel=f"measured{suffix}", ylabel=f"predicted{suffix}", aspect="equal")
    ax.text(
        0.04,
        0.96,
        f"n = {y_true.size} molecules\nRMSE = {scores['rmse']:.3f}\nMAE = {scores['mae']:.3f}\n"
        f"R² = {scores['r2']:.3f}",
        transform=ax.transAxes,
        va="top",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def loss_curves(
    log_history: Sequence[dict[str, Any]],
    path: PathLike | None = None,
    *,
    metric: str = "eval_rmse",
    metric_name: str = "RMSE",
    loss_name: str = "loss",
    title: str = "loss",
    x_axis: str = "step",
    best_step: int | None = None,
    metric_title: str | None = None,
) -> Figure:
    """Training/evaluation loss (left) and an evaluation metric (right) from a Trainer `state.log_history`.

    The defaults draw a regression run (evaluation RMSE); run_mlm.py draws masked-token accuracy.
    `x_axis` is "step" or "epoch" (entries without it are left out); `best_step` marks the evaluation
    at that step (e.g. the checkpoint kept) on both panels.
    """
    if x_axis not in ("step", "epoch"):
        raise ValueError(f"x_axis must be 'step' or 'epoch', got {x_axis!r}.")
    train = [(entry[x_axis], entry["loss"]) for entry in log_history if "loss" in entry and x_axis in entry]
    eval_loss = [(e[x_axis], e["eval_loss"]) for e in log_history if "eval_loss" in e and x_axis in e]
    eval_metric = [(e[x_axis], e[metric]) for e in log_history if metric in e and x_axis in e]
    if not (train or eval_loss or eval_metric):
        raise ValueError(
            f"log_history holds no entries with {x_axis!r} and 'loss', 'eval_loss' or {metric!r}."
        )

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    for points, label, style in ((train, "train loss", ".-"), (eval_loss, "eval loss", "o-")):
        if points:
            steps, values = zip(*points, strict=True)
            loss_ax.plot(steps, values, style, label=label)
    if eval_metric:
        steps, values = zip(*eval_metric, strict=True)
        metric_ax.plot(steps, values, "o-", color="tab:green")
    else:
        logger.info("No %s entries in log_history; the evaluation panel stays empty.", metric)
        metric_ax.text(
            0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=metric_ax.transAxes
        )
    best = [e for e in log_history if best_step is not None and e.get("step") == best_step and x_axis in e]
    if best:
        for ax in (loss_ax, metric_ax):
            ax.axvline(
                best[0][x_axis], color="tab:red", linestyle=":", label=f"best {x_axis} {best[0][x_axis]:g}"
            )
        metric_ax.legend()
    loss_ax.set(xlabel=x_axis, ylabel=loss_name, title=title)
    loss_ax.legend()
    metric_ax.set(xlabel=x_axis, ylabel=metric_name, title=metric_title or f"evaluation {metric_name}")
    return _finish(fig, path)


TARGET_UNITS = {"standard": "standardised targets", "minmax": "min-max scaled targets", "none": "label units"}


def regression_loss_curves(
    log_history: Sequence[dict[str, Any]],
    path: PathLike | None = None,
    *,
    loss: str = "mse",
    target_scaling: str = "standard",
    label_name: str = "label",
    n_train: int | None = None,
    n_validation: int | None = None,
    best_step: int | None = None,
) -> Figure | None:
    """A run_regression.py run by epoch: the training/validation loss, which the model computes on its
    scaled targets (said on the axis), and validation RMSE in label units, the best epoch marked.

    `best_step` is the step of the checkpoint the run kept (Trainer `state.best_global_step`); without
    one, the evaluation with the lowest RMSE is marked.
    """
    if not any("epoch" in e and ("loss" in e or "eval_loss" in e or "eval_rmse" in e) for e in log_history):
        # a short run with no evaluation and fewer steps than --logging_steps logs nothing to draw;
        # its results are complete, so this must not fail the run
        logger.info("No losses were logged (see --logging_steps, --eval_strategy); no loss curve written.")
        return None
    targets = TARGET_UNITS.get(target_scaling, target_scaling)
    if best_step is None:
        evaluations = [e for e in log_history if "eval_rmse" in e and "step" in e]
        best_step = min(evaluations, key=lambda e: e["eval_rmse"])["step"] if evaluations else None
    trained_on = f", {n_train} training molecules" if n_train else ""
    checked_on = f" ({n_validation} molecules)" if n_validation else ""
    return loss_curves(
        log_history,
        path,
        metric="eval_rmse",
        metric_name=f"RMSE ({label_name})",
        loss_name=f"{loss} loss on {targets}",
        title=f"loss ({loss} on {targets}{trained_on})",
        x_axis="epoch",
        best_step=best_step,
        metric_title=f"validation RMSE{checked_on}",
    )


def score_histogram(
    scores: Any,
    path: PathLike | None = None,
    xlabel: str = "influence score",
    title: str | None = None,
    bins: int = 50,
) -> Figure:
    """Distribution of per-example scores, e.g. to see how heavy the tails of the influence scores are."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("No scores to plot.")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{bad.size} non-finite score(s), first at index {bad[0]}.")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.hist(scores, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.set(xlabel=xlabel, ylabel="count")
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def bars_with_ci(
    table: pd.DataFrame,
    value: str = "test_rmse",
    group: str = "strategy",
    hue: str = "method",
    path: PathLike | None = None,
) -> Figure:
    """Grouped bars of the cell means with their 95% intervals as error bars."""
    mean, ci_low, ci_high = _require_value_columns(table, value)
    require_columns(table, (group, hue))
    if table.duplicated([group, hue]).any():
        raise ValueError(f"Table holds more than one row per ({group}, {hue}); aggregate it first.")
    groups = list(dict.fromkeys(table[group]))
    hues = list(dict.fromkeys(table[hue]))
    width = 0.8 / len(hues)

    fig = Figure(figsize=(max(5.0, 1.5 * len(groups) + 2), 4), layout="constrained")
    ax = fig.subplots()
    for k, hue_value in enumerate(hues):
        rows = table[table[hue] == hue_value].set_index(group).reindex(groups)
        x = np.arange(len(groups)) + (k - (len(hues) - 1) / 2) * width
        yerr = _yerr(rows[mean], rows[ci_low], rows[ci_high])
        ax.bar(x, rows[mean], width=width, yerr=yerr, capsize=3, label=str(hue_value))
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups])
    ax.set(xlabel=group, ylabel=f"{value} (mean, 95% CI)")
    ax.legend(title=hue)
    return _finish(fig, path)


def metric_vs_params(
    table: pd.DataFrame,
    path: PathLike | None = None,
    value: str = "test_rmse",
    params: str = "trainable_params",
) -> Figure:
    """Score against trainable parameter count (log scale), one point per method × strategy cell.

    Strategies of a method share a parameter count, so they are dodged sideways to keep the CIs readable.
    """
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    _cell_errorbars(ax, table, params, value, log_x=True)
    ax.legend(fontsize="small")
    return _finish(fig, path)


def tradeoff_figure(
    table: pd.DataFrame,
    path: PathLike | None = None,
    value: str = "test_rmse",
    share: str = "trainable_share",
    wall_time: str = "train_wall_time_s",
) -> Figure:
    """What each method buys: score against trainable share (left) and against training wall time (right)."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    share_ax, time_ax = fig.subplots(1, 2, sharey=True)
    _cell_errorbars(share_ax, table, share, value, log_x=True)
    _cell_errorbars(time_ax, table, wall_time, value, log_x=False, label_y=False)
    time_ax.legend(fontsize="small")
    return _finish(fig, path)


def shift_diagnostics_plot(
    nn_sim_external: Any,
    nn_sim_reference: Any,
    labels_external: Any,
    labels_train: Any,
    path: PathLike | None = None,
    reference_label: str = "test → train",
) -> Figure:
    """How far an external set lies from the training data, in structure (left) and in label (right)."""
    sims = {
        "external → train": finite_vector(np.ravel(nn_sim_external), "nn_sim_external"),
        reference_label: finite_vector(np.ravel(nn_sim_reference), "nn_sim_reference"),
    }
    for name, values in sims.items():
        if np.any((values < 0) | (values > 1)):
            raise ValueError(f"Tanimoto similarities for {name!r} must lie in [0, 1].")
    labels = {
        "train": finite_vector(np.ravel(labels_train), "labels_train"),
        "external": finite_vector(np.ravel(labels_external), "labels_external"),
    }

    fig = Figure(figsize=(11, 4), layout="constrained")
    sim_ax, label_ax = fig.subplots(1, 2)
    sim_bins = np.linspace(0.0, 1.0, 41)
    for name, values in sims.items():
        sim_ax.hist(
            values, bins=sim_bins, density=True, alpha=0.5, label=f"{name} (median {np.median(values):.2f})"
        )
    sim_ax.set(xlabel="nearest-neighbour Tanimoto similarity", ylabel="density")
    sim_ax.legend()
    label_bins = np.histogram_bin_edges(np.concatenate(list(labels.values())), bins=30)
    for name, values in labels.items():
        label_ax.hist(values, bins=label_bins, density=True, alpha=0.5, label=f"{name} (n={values.size})")
    label_ax.set(xlabel="label", ylabel="density")
    label_ax.legend()
    return _finish(fig, path)


def _cell_errorbars(
    ax: Axes, table: pd.DataFrame, x_column: str, value: str, log_x: bool, label_y: bool = True
) -> None:
    """One errorbar per (method, strategy) row: colour per method, marker per strategy; labels the axes
    (`label_y` false for a panel that shares its neighbour's y axis)."""
    mean, ci_low, ci_high = _require_value_columns(table, value)
    require_columns(table, ("method", "strategy", x_column))
    x_values = table[x_column].to_numpy(dtype=np.float64)
    invalid = ~np.isfinite(x_values) | ((x_values <= 0) if log_x else False)
    if invalid.any():
        first = table.loc[invalid, ["method", "strategy"]].iloc[0].tolist()
        raise ValueError(f"Column {x_column!r} has no usable value for cell {first} (log axes need > 0).")
    methods = list(dict.fromkeys(table["method"]))
    strategies = list(dict.fromkeys(table["strategy"]))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(strategies)}
    for (_, row), x in zip(table.iterrows(), x_values, strict=True):
        offset = (strategies.index(row["strategy"]) - (len(strategies) - 1) / 2) * 0.03
        x_plot = x * 10**offset if log_x else x
        ax.errorbar(
            x_plot,
            row[mean],
            yerr=_yerr(row[mean], row[ci_low], row[ci_high]),
            fmt=markers[row["strategy"]],
            color=colours[row["method"]],
            capsize=3,
            label=f"{row['method']}, {row['strategy']}",
        )
    if log_x:
        ax.set(xscale="log", xlabel=f"{x_column} (log scale)")
    else:
        ax.set(xlabel=x_column)
    if label_y:
        ax.set(ylabel=f"{value} (mean, 95% CI)")


def _yerr(mean: Any, ci_low: Any, ci_high: Any) -> np.ndarray:
    # matplotlib wants distances from the mean; a nan interval (single seed) draws no bar
    mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    lower = mean - np.atleast_1d(np.asarray(ci_low, dtype=np.float64))
    upper = np.atleast_1d(np.asarray(ci_high, dtype=np.float64)) - mean
    return np.vstack([lower, upper])


def _require_value_columns(table: pd.DataFrame, value: str) -> tuple[str, str, str]:
    columns = (f"{value}_mean", f"{value}_ci_low", f"{value}_ci_high")
    require_columns(table, columns)
    if table.empty:
        raise ValueError("Cannot plot an empty table.")
    return columns


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        save_figure(path, fig)
        logger.info("Wrote figure %s", path)
    return fig
