"""What an influence run hands on: the score table, the per-query matrix, the summary and its statistics.

The score table is what run_selection.py --strategy influence reads; the summary records the settings,
timings, solver convergence, the shape of the score distribution and the threshold each selection rule
implies, so a selection can be judged without rerunning the scores.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.stats
import torch

from molft.files import INFLUENCE_MATRIX_FILE, INFLUENCE_QUERIES_FILE
from molft.influence import HELPFUL_SIGN
from molft.influence.api import HESSIAN_ESTIMATORS
from molft.io import atomic_path, write_csv
from molft.splits import SPLIT_NAMES

if TYPE_CHECKING:
    from molft.influence.molformer import ProblemSetup

logger = logging.getLogger(__name__)

DIRECTION = "negative=helpful (predicted query-loss decrease)"
TOP_K = (10, 30, 50)
PERCENTILES = (10, 25)
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def score_table(pool: pd.DataFrame, scores: np.ndarray, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per pool molecule, in pool order; rank 1 = most helpful (most negative score)."""
    order = np.argsort(scores, kind="stable")
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    in_split = np.full(len(pool), "", dtype=object)
    for name in SPLIT_NAMES:
        inside = pool["canonical_smiles"].isin(set(frames[name]["canonical_smiles"])).to_numpy()
        in_split[inside] = name
    overlap = {name: int((in_split == name).sum()) for name in SPLIT_NAMES}
    if overlap["validation"] or overlap["test"]:
        logger.warning(
            "Pool molecules already in the run's splits: %s (column in_run_split). Held-out ones score as "
            "helpful for the wrong reason; run_selection.py excludes them.",
            overlap,
        )
    return pd.DataFrame(
        {
            "index": np.arange(len(pool)),
            "smiles": pool["smiles"].to_numpy(),
            "canonical_smiles": pool["canonical_smiles"].to_numpy(),
            "label": pool["label"].to_numpy(),
            "score": scores,
            "rank": rank,
            "helpful": scores * HELPFUL_SIGN > 0,
            "direction": DIRECTION,
            "in_run_split": in_split,
        }
    )


def write_matrix(output_dir: Path, matrix: np.ndarray, query_frame: pd.DataFrame) -> None:
    """[queries x candidates] scores; row q is query molecule q of influence_queries.csv, column = pool index."""
    with atomic_path(output_dir / INFLUENCE_MATRIX_FILE) as tmp, tmp.open("wb") as handle:
        np.save(handle, matrix)
    queries = query_frame[["smiles", "canonical_smiles", "label"]].reset_index(drop=True)
    queries.insert(0, "query_row", np.arange(len(queries)))
    write_csv(output_dir / INFLUENCE_QUERIES_FILE, queries)


def score_statistics(scores: np.ndarray) -> dict[str, Any]:
    """Shape of the score distribution and the threshold each selection rule of run_selection.py implies."""
    ordered = np.sort(scores)
    anderson = scipy.stats.anderson(scores, dist="norm", method="interpolate") if len(scores) >= 8 else None
    statistics = {
        "n": len(scores),
        "mean": float(scores.mean()),
        "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
        "skew": float(scipy.stats.skew(scores)),
        "quantiles": {f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILES},
        "anderson_darling_normal": (
            None
            if anderson is None
            else {
                "statistic": float(anderson.statistic),
                "pvalue_interpolated": float(anderson.pvalue),
                "note": "p-value interpolated from scipy's tables, so clipped to [0.01, 0.15]",
            }
        ),
        "n_helpful": int((scores * HELPFUL_SIGN > 0).sum()),
    }
    thresholds: dict[str, Any] = {
        "helpful": {"rule": "score < 0", "threshold": 0.0, "n_selected": int((scores < 0).sum())}
    }
    for k in TOP_K:
        if k <= len(scores):
            thresholds[f"top_{k}"] = {
                "rule": f"the {k} most negative scores",
                "threshold": float(ordered[k - 1]),
                "n_selected": k,
            }
    for percentile in PERCENTILES:
        cut = float(np.percentile(scores, percentile))
        thresholds[f"percentile_{percentile}"] = {
            "rule": f"score <= {percentile}th percentile",
            "threshold": cut,
            "n_selected": int((scores <= cut).sum()),
        }
    statistics["selection_thresholds"] = thresholds
    return statistics


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, so the summary names the exact pool that was scored."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_summary(
    arguments: Sequence[Any],
    checkpoint_kind: str,
    setup: ProblemSetup,
    diagnostics: dict[str, Any],
    scores: np.ndarray,
    loss_description: str,
    n_train: int,
    n_query: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """The influence_summary.json of a run; `arguments` are the script's parsed argument groups.

    The settings are read from the groups by flag name (flags are unique across a script's groups), and
    every group is recorded in full under "arguments".
    """
    flags = {name: value for group in arguments for name, value in asdict(group).items()}
    solver = diagnostics.get("solver", {})
    return {
        "estimator": diagnostics["estimator"],
        "estimator_options": diagnostics["options"],
        "damping": flags["damping"],
        "scope": {
            "name": flags["scope"],
            "last_k": flags["last_k"] if flags["scope"] == "last_k_layers" else None,
            "num_params": diagnostics["num_params"],
            "num_tensors": len(setup.model_names),
            "parameters": setup.model_names,
            "computed_on": "pooled embeddings (head alone)" if setup.on_features else "whole model",
        },
        "curvature": flags["curvature"] if flags["estimator"] in HESSIAN_ESTIMATORS else None,
        "sign_convention": DIRECTION,
        "loss": loss_description,
        "query": {
            "split": flags["query_split"],
            "size": n_query,
            "per_query": flags["per_query"],
        },
        "train_size_for_hessian": n_train,
        "checkpoint": {
            "path": str(flags["model_name_or_path"]),
            "kind": checkpoint_kind,
            "base_model": flags["base_model"],
        },
        "split_file": flags["split_file"],
        "external_file": {
            "path": str(flags["external_file"]),
            "sha256": file_sha256(flags["external_file"]),
            "n_molecules": len(scores),
        },
        "timings": diagnostics["timings"],
        "query_grad_norm": diagnostics.get("query_grad_norm"),
        "ihvp_norm": diagnostics.get("ihvp_norm"),
        "convergence": solver,
        "fit": diagnostics.get("fit", {}),
        "score_statistics": score_statistics(scores),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "arguments": {type(group).__name__: asdict(group) for group in arguments},
    }


def log_result(scores_frame: pd.DataFrame, summary: dict[str, Any]) -> None:
    """The run in a few log lines: helpful count, score shape, LiSSA's norm trace, the best molecules."""
    stats = summary["score_statistics"]
    logger.info(
        "%s scores: %d of %d helpful (negative); mean %.3g, std %.3g, skew %.2f; iHVP norm %s; %.1fs",
        summary["estimator"],
        stats["n_helpful"],
        stats["n"],
        stats["mean"],
        stats["std"],
        stats["skew"],
        summary["ihvp_norm"],
        summary["timings"]["total_s"],
    )
    trace = summary["convergence"].get("norm_trace")
    if trace:
        for repeat, steps in enumerate(trace):
            shown = ", ".join(f"{entry['step']}: {max(entry['ihvp_norm']):.4g}" for entry in steps)
            logger.info("LiSSA repeat %d, iHVP norm by step: %s", repeat, shown)
    best = scores_frame.nsmallest(5, "score")[["index", "canonical_smiles", "label", "score"]]
    logger.info("Most helpful molecules:\n%s", best.to_string(index=False))
