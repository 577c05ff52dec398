#!/usr/bin/env python
"""Write the demo tables of the two-target and classification configs, from the Lipophilicity and ESOL
copies embedded in chemloader (no download), into data/demo/ (git-ignored):

    python scripts/make_demo_tables.py [--output_dir data/demo]

- `lipo_esol_two_targets.csv` (configs/regression_lipo_esol_two_targets.yaml): columns `smiles`, `logD`, `logS` and
  `source`. Every Lipophilicity row (logD at pH 7.4) and every ESOL row (measured log solubility in mol/L)
  once, so each molecule has one of the two labels and the other is empty; a molecule in both datasets
  (same canonical SMILES) is one row with both labels (how many is printed).
- `lipo_logd_gt3.csv` (configs/regression_lipo_logd_gt3_classification.yaml): columns `CMPD_CHEMBLID`, `smiles` and
  `logD_gt_3`, a DERIVED binary label: 1 where Lipophilicity's measured logD is above 3, else 0. It is not
  a measured activity class; it only shows classification on data that ship with the toolkit.

Both tables are rebuilt byte for byte from the embedded files; a user's own tables need no such step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molft.chem import canonical_smiles  # noqa: E402
from molft.data import EMBEDDED_DATASETS, embedded_path  # noqa: E402
from molft.io import write_csv  # noqa: E402

TWO_TARGETS_FILE = "lipo_esol_two_targets.csv"
DERIVED_CLASSES_FILE = "lipo_logd_gt3.csv"
LOGD_THRESHOLD = 3.0


def two_target_table(lipophilicity: pd.DataFrame, esol: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Lipophilicity ∪ ESOL with a logD and a logS column; (table, molecules that got both labels)."""
    lipo = pd.DataFrame(
        {
            "smiles": lipophilicity["smiles"],
            "logD": lipophilicity["exp"],
            "logS": float("nan"),
            "source": "lipo",
        }
    )
    row_of = {}
    for i, smi in enumerate(lipo["smiles"]):
        row_of.setdefault(canonical_smiles(smi), i)
    measured = EMBEDDED_DATASETS["esol"].label_column
    esol_rows = []
    shared = 0
    for smi, value in zip(esol["SMILES"], esol[measured], strict=True):
        match = row_of.get(canonical_smiles(smi))
        if match is not None and pd.isna(lipo.at[match, "logS"]):
            lipo.at[match, "logS"], lipo.at[match, "source"] = value, "lipo+esol"
            shared += 1
        else:
            esol_rows.append({"smiles": smi, "logD": float("nan"), "logS": value, "source": "esol"})
    return pd.concat([lipo, pd.DataFrame(esol_rows)], ignore_index=True), shared


def derived_class_table(lipophilicity: pd.DataFrame) -> pd.DataFrame:
    """Lipophilicity with logD > 3 as a derived 0/1 label."""
    return pd.DataFrame(
        {
            "CMPD_CHEMBLID": lipophilicity["CMPD_CHEMBLID"],
            "smiles": lipophilicity["smiles"],
            "logD_gt_3": (lipophilicity["exp"] > LOGD_THRESHOLD).astype(int),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=ROOT / "data" / "demo", help="where to write")
    args = parser.parse_args(argv)
    lipophilicity = pd.read_csv(embedded_path("lipophilicity"))
    esol = pd.read_csv(embedded_path("esol"))
    table, shared = two_target_table(lipophilicity, esol)
    write_csv(args.output_dir / TWO_TARGETS_FILE, table, index=False)
    print(
        f"{args.output_dir / TWO_TARGETS_FILE}: {len(table)} rows ({table['logD'].notna().sum()} logD, "
        f"{table['logS'].notna().sum()} logS; {shared} molecules in both datasets have both)"
    )
    classes = derived_class_table(lipophilicity)
    write_csv(args.output_dir / DERIVED_CLASSES_FILE, classes, index=False)
    print(
        f"{args.output_dir / DERIVED_CLASSES_FILE}: {len(classes)} rows, {int(classes['logD_gt_3'].sum())} with "
        f"logD > {LOGD_THRESHOLD:g} (derived label)"
    )


if __name__ == "__main__":
    main()
