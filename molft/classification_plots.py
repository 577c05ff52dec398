"""Figures of a classification run's test set: ROC curves and a reliability diagram.

A ROC curve shows how well the scores rank positives above negatives (what ROC-AUC sums up); a reliability
diagram shows whether a predicted probability of 0.8 means "positive 8 times in 10", which ranking metrics
cannot tell. Both take one (labels, probabilities) pair per curve: the positive class of a binary task, each
class against the rest, or each label of a multi-label task. Figures are built and saved as in molft.plots.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from molft.io import save_figure
from molft.plots import PathLike  # importing molft.plots selects the headless backend

logger = logging.getLogger(__name__)

Curves = Mapping[str, tuple[Any, Any]]  # name -> (0/1 labels, predicted probabilities of 1)


def roc_curves(curves: Curves, path: PathLike | None = None, title: str = "Test set") -> Figure:
    """One ROC curve per entry (AUC and number of molecules in the legend); curves with one class are skipped."""
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="chance")
    drawn = 0
    for name, (y_true, score) in curves.items():
        y_true, score = np.asarray(y_true).astype(int), np.asarray(score, dtype=np.float64)
        if np.unique(y_true).size < 2:
            logger.info("No ROC curve for %s: its %d test molecules hold one class.", name, y_true.size)
            continue
        fpr, tpr, _ = skm.roc_curve(y_true, score)
        auc = skm.roc_auc_score(y_true, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f}, n = {y_true.size})")
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "one class only: no ROC curve", ha="center", va="center", transform=ax.transAxes)
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
    )
    ax.legend(loc="lower right", fontsize="small")
    return _finish(fig, path)


def reliability_diagram(
    curves: Curves, path: PathLike | None = None, n_bins: int = 10, title: str = "Test set"
) -> Figure:
    """Observed frequency of positives against the mean predicted probability in equal-width bins (top),
    and how many predictions fall in each bin (bottom); the diagonal is perfect calibration. The legend gives
    the expected calibration error of these bins (count-weighted mean |frequency - mean probability|)."""
    fig = Figure(figsize=(5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for name, (y_true, prob) in curves.items():
        y_true, prob = np.asarray(y_true, dtype=np.float64), np.clip(np.asarray(prob, dtype=np.float64), 0, 1)
        bins = np.clip(np.digitize(prob, edges[1:-1]), 0, n_bins - 1)
        counts = np.bincount(bins, minlength=n_bins)
        filled = counts > 0
        mean_prob = np.bincount(bins, weights=prob, minlength=n_bins)[filled] / counts[filled]
        frequency = np.bincount(bins, weights=y_true, minlength=n_bins)[filled] / counts[filled]
        gap = float(np.sum(counts[filled] * np.abs(frequency - mean_prob)) / counts.sum())
        top.plot(mean_prob, frequency, "o-", label=f"{name} (ECE {gap:.3f}, n = {int(counts.sum())})")
        bottom.stairs(counts, edges, label=name)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency of positives", title=title)
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="predicted probability", ylabel="molecules")
    return _finish(fig, path)


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        save_figure(path, fig)
        logger.info("Wrote figure %s", path)
    return fig
