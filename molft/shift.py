"""How far an external pool lies from the training data: structure, embeddings and labels.

Whether adding external molecules helps depends on how they differ from the training set, so every
selection run reports three views of that shift: nearest-neighbour Tanimoto similarity to the training
set (compared with a reference split drawn from the same data), an MMD two-sample test on model
embeddings, and a comparison of the label distributions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics.pairwise import euclidean_distances

from molft.chem import morgan_fingerprints, nearest_neighbour_similarity
from molft.files import SHIFT_PLOT_FILE, SHIFT_REPORT_FILE
from molft.io import write_json

logger = logging.getLogger(__name__)

SIMILARITY_THRESHOLDS = (0.4, 0.6)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def nearest_neighbour_tanimoto(
    external_smiles: Sequence[str],
    train_smiles: Sequence[str],
    reference_smiles: Sequence[str] | None = None,
    *,
    radius: int = 2,
    n_bits: int = 2048,
) -> dict[str, Any]:
    """Per molecule, the Tanimoto similarity (Morgan bits) of its nearest training molecule, plus summaries.

    The reference set (e.g. the test split) shows what "in distribution" looks like for this training
    set, so the external numbers have something to be compared with. `share_above_t` counts
    similarities strictly greater than t.
    """
    train_fps = _fingerprints(train_smiles, "training", radius, n_bits)
    report: dict[str, Any] = {"radius": radius, "n_bits": n_bits, "n_train": len(train_fps)}
    for name, smiles in (("external", external_smiles), ("reference", reference_smiles)):
        if smiles is None:
            report[name] = None
            continue
        similarity = nearest_neighbour_similarity(_fingerprints(smiles, name, radius, n_bits), train_fps)
        report[name] = {"nn_similarity": similarity, "summary": _similarity_summary(similarity)}
    return report


def mmd_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    n_permutations: int = 1000,
    seed: int = 0,
    bandwidth: str | float = "median",
    *,
    permutation_batch: int = 100,
) -> dict[str, Any]:
    """Unbiased RBF-kernel MMD² between two embedding sets with a permutation p-value.

    Kernel k(a, b) = exp(-|a - b|² / (2 σ²)); `bandwidth="median"` sets σ to the median pairwise
    Euclidean distance of the pooled sample. p = (1 + #{permuted MMD² >= observed}) / (1 + n_permutations).
    Each permutation costs one kernel-matrix-vector product, done for `permutation_batch` at a time.
    """
    x = _embedding_set(x, "x")
    y = _embedding_set(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} embedding dimensions, y has {y.shape[1]}.")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}.")
    pooled = np.concatenate([x, y])
    squared = euclidean_distances(pooled, squared=True)  # BLAS-backed; scipy's cdist is far slower here
    if bandwidth == "median":
        sigma = float(np.median(np.sqrt(squared[np.triu_indices(len(pooled), k=1)])))
        if sigma == 0:
            raise ValueError("Median pairwise distance is 0 (mostly identical embeddings); pass a bandwidth.")
    elif isinstance(bandwidth, int | float) and not isinstance(bandwidth, bool) and bandwidth > 0:
        sigma = float(bandwidth)
    else:
        raise ValueError(f"bandwidth must be 'median' or a positive number, got {bandwidth!r}.")
    kernel = np.exp(-squared / (2 * sigma**2))
    del squared
    n_x, n_y = len(x), len(y)
    row_sums = kernel.sum(axis=1)
    total = row_sums.sum()
    trace = np.trace(kernel)

    def mmd2(in_x: np.ndarray) -> np.ndarray:
        # in_x: [n, P] 0/1 membership of the first sample, one column per labelling
        xx = np.einsum("ip,ip->p", in_x, kernel @ in_x)  # sum over x-x pairs, diagonal included
        x_all = row_sums @ in_x  # sum over pairs with the first element in x
        yy = total - 2 * x_all + xx
        xy = x_all - xx
        diag_x = np.diag(kernel) @ in_x
        return (
            (xx - diag_x) / (n_x * (n_x - 1))
            + (yy - (trace - diag_x)) / (n_y * (n_y - 1))
            - 2 * xy / (n_x * n_y)
        )

    observed_membership = np.zeros((n_x + n_y, 1))
    observed_membership[:n_x] = 1
    observed = float(mmd2(observed_membership)[0])
    rng = np.random.default_rng(seed)
    permuted = []
    for start in range(0, n_permutations, permutation_batch):
        n_batch = min(permutation_batch, n_permutations - start)
        membership = np.zeros((n_x + n_y, n_batch))
        for column in range(n_batch):
            membership[rng.permutation(n_x + n_y)[:n_x], column] = 1
        permuted.append(mmd2(membership))
    permuted = np.concatenate(permuted)
    p_value = (1 + int(np.sum(permuted >= observed))) / (1 + n_permutations)
    return {
        "mmd2": observed,
        "p_value": p_value,
        "n_permutations": n_permutations,
        "bandwidth": sigma,
        "n_x": n_x,
        "n_y": n_y,
        "seed": seed,
    }


def label_distribution_summary(external_labels: np.ndarray, train_labels: np.ndarray) -> dict[str, Any]:
    """Location and spread of both label sets plus a two-sample Kolmogorov–Smirnov test."""
    external = _labels(external_labels, "external")
    train = _labels(train_labels, "training")
    ks = stats.ks_2samp(external, train)
    return {
        "external": _distribution_summary(external),
        "train": _distribution_summary(train),
        "mean_difference": float(external.mean() - train.mean()),
        "ks_statistic": float(ks.statistic),
        "ks_p_value": float(ks.pvalue),
    }


def shift_report(
    external_smiles: Sequence[str],
    train_smiles: Sequence[str],
    *,
    reference_smiles: Sequence[str] | None = None,
    external_embeddings: np.ndarray | None = None,
    train_embeddings: np.ndarray | None = None,
    external_labels: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All three diagnostics; a part whose inputs are missing is None (and logged)."""
    report: dict[str, Any] = {
        "tanimoto": nearest_neighbour_tanimoto(external_smiles, train_smiles, reference_smiles),
        "mmd": None,
        "labels": None,
    }
    if external_embeddings is not None and train_embeddings is not None:
        report["mmd"] = mmd_permutation_test(external_embeddings, train_embeddings, n_permutations, seed)
    else:
        logger.info("No embeddings for both sets: skipping the MMD test.")
    if external_labels is not None and train_labels is not None:
        report["labels"] = label_distribution_summary(external_labels, train_labels)
    else:
        logger.info("No labels for both sets: skipping the label comparison.")
    return report


def shift_diagnostics(
    output_dir: str | os.PathLike,
    pool_frame: pd.DataFrame,
    candidates: np.ndarray,
    frames: dict[str, pd.DataFrame],
    *,
    pool_embeddings: np.ndarray | None = None,
    train_embeddings: np.ndarray | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Shift of a pool's candidates relative to the run's training split (test split as the reference).

    `candidates` are positions in `pool_frame` (and in `pool_embeddings`, which cover the whole pool);
    `frames` the run's train/validation/test frames. Logged, saved to SHIFT_REPORT_FILE and drawn in
    SHIFT_PLOT_FILE (when the pool has labels).
    """
    from molft import plots

    candidate_frame = pool_frame.iloc[candidates]
    external_labels = candidate_frame["label"].to_numpy() if "label" in candidate_frame else None
    train_labels = frames["train"]["label"].to_numpy()
    report = shift_report(
        candidate_frame["canonical_smiles"].tolist(),
        frames["train"]["canonical_smiles"].tolist(),
        reference_smiles=frames["test"]["canonical_smiles"].tolist(),
        external_embeddings=None if pool_embeddings is None else pool_embeddings[candidates],
        train_embeddings=train_embeddings,
        external_labels=external_labels,
        train_labels=train_labels,
        n_permutations=n_permutations,
        seed=seed,
    )
    report["reference"] = "test split"
    # pool ids (rows of the pool file), as in selected.csv
    report["pool_indices"] = (
        pool_frame["row"].to_numpy()[candidates] if "row" in pool_frame else candidates
    ).tolist()
    logger.info("%s", format_shift_report(report))
    output_dir = Path(output_dir)
    write_json(output_dir / SHIFT_REPORT_FILE, report)
    if external_labels is None:
        logger.info("The pool has no labels: %s is not drawn.", SHIFT_PLOT_FILE)
    else:
        tanimoto = report["tanimoto"]
        plots.shift_diagnostics_plot(
            tanimoto["external"]["nn_similarity"],
            tanimoto["reference"]["nn_similarity"],
            external_labels,
            train_labels,
            output_dir / SHIFT_PLOT_FILE,
        )
    return report


def format_shift_report(report: dict[str, Any]) -> str:
    """Human-readable summary of `shift_report` for logs and the console."""
    lines = ["Shift of the external pool relative to the training set"]
    tanimoto = report["tanimoto"]
    for name in ("external", "reference"):
        part = tanimoto.get(name)
        if part is None:
            continue
        s = part["summary"]
        shares = ", ".join(f">{t}: {s[f'share_above_{t}']:.1%}" for t in SIMILARITY_THRESHOLDS)
        lines.append(
            f"  NN Tanimoto to train ({name}, n={s['n']}): mean {s['mean']:.3f}, median {s['median']:.3f}, "
            f"5-95% [{s['q05']:.3f}, {s['q95']:.3f}]; share {shares}"
        )
    mmd = report.get("mmd")
    if mmd is not None:
        lines.append(
            f"  Embedding MMD² {mmd['mmd2']:.4g} (sigma {mmd['bandwidth']:.3g}), "
            f"permutation p = {mmd['p_value']:.3g} ({mmd['n_permutations']} permutations)"
        )
    labels = report.get("labels")
    if labels is not None:
        ext, train = labels["external"], labels["train"]
        lines.append(
            f"  Labels: external mean {ext['mean']:.3f} ± {ext['std']:.3f} (n={ext['n']}), "
            f"train mean {train['mean']:.3f} ± {train['std']:.3f} (n={train['n']}); "
            f"KS D = {labels['ks_statistic']:.3f}, p = {labels['ks_p_value']:.3g}"
        )
    return "\n".join(lines)


def _fingerprints(smiles: Sequence[str], which: str, radius: int, n_bits: int) -> list:
    if len(smiles) == 0:
        raise ValueError(f"The {which} SMILES list is empty.")
    try:
        return morgan_fingerprints(list(smiles), radius=radius, n_bits=n_bits)
    except ValueError as err:
        raise ValueError(f"In the {which} SMILES: {err}") from err


def _similarity_summary(similarity: np.ndarray) -> dict[str, Any]:
    summary = _distribution_summary(similarity)
    for threshold in SIMILARITY_THRESHOLDS:
        summary[f"share_above_{threshold}"] = float(np.mean(similarity > threshold))
    return summary


def _distribution_summary(values: np.ndarray) -> dict[str, Any]:
    quantiles = np.quantile(values, QUANTILES)
    summary: dict[str, Any] = {
        "n": len(values),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for q, value in zip(QUANTILES, quantiles, strict=True):
        summary["median" if q == 0.5 else f"q{round(q * 100):02d}"] = float(value)
    return summary


def _embedding_set(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"{name} must be 2-D [N >= 2, D], got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} embeddings contain non-finite values.")
    return array


def _labels(values: np.ndarray, which: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(array) == 0:
        raise ValueError(f"The {which} labels are empty.")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"The {which} labels are missing or not finite at positions {bad[:10].tolist()}.")
    return array
