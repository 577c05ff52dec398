"""Which molecules a prepared dataset repeats, shares with held-out splits, and which dataset it is.

Repeated canonical SMILES (above all with different labels) and external molecules that also sit in a
validation or test split change results silently, so both are reported; the fingerprint ties a split file or
a selection to the exact prepared molecules it was made for."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # rows named in a warning or report


def duplicate_report(df: pd.DataFrame) -> dict[str, Any]:
    """Summarise repeated canonical SMILES in a prepared frame (repeats with different labels matter most)."""
    counts = df["canonical_smiles"].value_counts(sort=False)
    repeated = counts[counts > 1]
    examples = []
    max_label_spread = 0.0
    if len(repeated):
        groups = df[df["canonical_smiles"].isin(repeated.index)].groupby("canonical_smiles", sort=True)
        for smi, group in groups:
            rows = group["row"].tolist() if "row" in group else group.index.tolist()
            example: dict[str, Any] = {"canonical_smiles": smi, "rows": [int(r) for r in rows]}
            if "label" in group:
                spread = float(group["label"].max() - group["label"].min())
                example["labels"] = [float(v) for v in group["label"]]
                max_label_spread = max(max_label_spread, spread)
            if len(examples) < MAX_EXAMPLES:
                examples.append(example)
    report: dict[str, Any] = {
        "n_duplicated_molecules": len(repeated),
        "n_extra_rows": int((repeated - 1).sum()),
        "examples": examples,
    }
    if "label" in df:
        report["max_label_spread"] = max_label_spread
    return report


def drop_overlap(
    extra: pd.DataFrame, heldout: Mapping[str, pd.DataFrame], drop: bool = True
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Remove molecules of `extra` (e.g. an external or pretraining set) that also appear in held-out splits.

    Keeping them would leak evaluation molecules into training; the overlap is always reported.
    """
    report: dict[str, int] = {}
    in_any = np.zeros(len(extra), dtype=bool)
    examples: list[str] = []
    for split_name, frame in heldout.items():
        overlap = extra["canonical_smiles"].isin(set(frame["canonical_smiles"])).to_numpy()
        report[split_name] = int(overlap.sum())
        in_any |= overlap
        examples += [f"{split_name}: {s}" for s in extra["canonical_smiles"][overlap][:MAX_EXAMPLES]]
    report["dropped"] = int(in_any.sum()) if drop else 0
    if in_any.any():
        counts = ", ".join(f"{k}={v}" for k, v in report.items() if k != "dropped")
        logger.warning(
            "%d of %d molecules also occur in held-out splits (%s) and are %s, e.g. %s",
            int(in_any.sum()),
            len(extra),
            counts,
            "dropped" if drop else "KEPT",
            "; ".join(examples[:MAX_EXAMPLES]),
        )
    kept = extra[~in_any] if drop else extra
    return kept.reset_index(drop=True), report


def dataset_fingerprint(canonical_smiles: Sequence[str]) -> str:
    """sha256 of the ordered canonical SMILES: identifies the exact prepared dataset a split belongs to."""
    digest = hashlib.sha256()
    for smi in canonical_smiles:
        digest.update(str(smi).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
