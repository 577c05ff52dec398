"""What an influence run hands on: the score table, the per-query matrix, the summary and its statistics.

The score table is what run_selection.py --strategy influence reads; the summary records the settings,
timings, solver convergence, the shape of the score distribution and the threshold each selection rule
implies, so a selection can be judged without rerunning the scores.

Pool molecules that sit in the run's validation or test split are left out before scoring (they would
score as helpful because they are the query, and picking them leaks evaluation data); kept on request,
they are scored but marked and unranked, so no top-k of the table can pick them. Every row names its
molecule by pool id (its row in the pool file), so skipped invalid rows shift nothing.
"""

from __future__ import annotations

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
from molft.run_record import file_sha256
from molft.selection import pool_ids
from molft.splits import SPLIT_NAMES

if TYPE_CHECKING:
    from molft.influence.molformer import ProblemSetup

logger = logging.getLogger(__name__)

DIRECTION = "negative=helpful (predicted query-loss decrease)"
TOP_K = (10, 30, 50)
PERCENTILES = (10, 25)
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


HELDOUT_SPLITS = ("validation", "test")


def run_split_of(pool: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> np.ndarray:
    """The run's split each pool molecule sits in (by canonical SMILES), "" for molecules new to the run."""
    in_split = np.full(len(pool), "", dtype=object)
    for name in SPLIT_NAMES:
        inside = pool["canonical_smiles"].isin(set(frames[name]["canonical_smiles"])).to_numpy()
        in_split[inside] = name
    return in_split


def leave_out_heldout(
    pool: pd.DataFrame, frames: dict[str, pd.DataFrame], keep: bool
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The pool molecules to score, with an `in_run_split` column, and the pool's counts for the summary.

    Held-out (validation/test) molecules are left out unless `keep`; kept, they are scored but unranked.
    """
    pool = pool.assign(in_run_split=run_split_of(pool, frames))
    heldout = pool["in_run_split"].isin(HELDOUT_SPLITS).to_numpy()
    counts = {name: int((pool["in_run_split"] == name).sum()) for name in SPLIT_NAMES}
    counts.update(left_out=0 if keep else int(heldout.sum()), kept_unranked=int(heldout.sum()) if keep else 0)
    if heldout.any():
        logger.warning(
            "%d pool molecules sit in the run's held-out splits (validation %d, test %d; pool ids %s): %s",
            int(heldout.sum()),
            counts["validation"],
            counts["test"],
            pool_ids(pool)[heldout][:10].tolist(),
            "scored but unranked and marked in column in_run_split (--keep_heldout_overlap)"
            if keep
            else "left out of the scores (they are the query's own molecules; --keep_heldout_overlap keeps them)",
        )
    n_rows, n_valid = pool.attrs.get("n_rows", len(pool)), len(pool)
    if not keep:
        pool = pool[~heldout].reset_index(drop=True)
        if pool.empty:
            raise ValueError("Every pool molecule is in the run's validation/test split; nothing to score.")
    report = {
        "n_rows": n_rows,
        "n_invalid_skipped": n_rows - n_valid,
        "n_scored": len(pool),
        "heldout_overlap": counts,
    }
    return pool, report


def score_table(pool: pd.DataFrame, scores: np.ndarray, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per scored pool molecule, in pool order; rank 1 = most helpful (most negative score).

    `index` is the pool id. Molecules of the run's validation/test split get no rank and no helpful flag.
    """
    in_split = pool["in_run_split"].to_numpy() if "in_run_split" in pool else run_split_of(pool, frames)
    ranked = ~np.isin(in_split, HELDOUT_SPLITS)
    rank = pd.array([pd.NA] * len(scores), dtype="Int64")
    positions = np.flatnonzero(ranked)[np.argsort(scores[ranked], kind="stable")]
    rank[positions] = np.arange(1, len(positions) + 1)
    helpful = pd.array(scores * HELPFUL_SIGN > 0, dtype="boolean")
    helpful[~ranked] = pd.NA
    return pd.DataFrame(
        {
            "index": pool_ids(pool),
            "smiles": pool["smiles"].to_numpy(),
            "canonical_smiles": pool["canonical_smiles"].to_numpy(),
            "label": pool["label"].to_numpy(),
            "score": scores,
            "rank": rank,
            "helpful": helpful,
            "direction": DIRECTION,
            "in_run_split": in_split,
        }
    )


def write_matrix(output_dir: Path, matrix: np.ndarray, query_frame: pd.DataFrame) -> None:
    """[queries x candidates] scores; row q is query molecule q of influence_queries.csv, column j is row j
    of the score table (its pool id in the `index` column)."""
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
    pool_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The influence_summary.json of a run; `arguments` are the script's parsed argument groups.

    `scores` are the ranked molecules' (the statistics describe what a selection chooses from);
    `pool_report` the pool's counts (rows read, invalid rows skipped, held-out molecules left out or kept).
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
            **(pool_report or {}),
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
    ranked = scores_frame[scores_frame["rank"].notna()]
    best = ranked.nsmallest(5, "score")[["index", "canonical_smiles", "label", "score"]]
    logger.info("Most helpful molecules:\n%s", best.to_string(index=False))
