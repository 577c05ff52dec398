#!/usr/bin/env python
"""How hard is each splitter? Mean nearest-neighbour Tanimoto from test (and validation) to train.

    python scripts/split_difficulty.py [--seed 42] [--dataset_name lipophilicity]

Lower similarity means test molecules look less like anything seen in training: a harder split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column, load_raw_dataset, prepare_molecules  # noqa: E402
from molft.splits import SPLIT_METHODS, make_split, split_similarity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="lipophilicity", help="dataset, as for run_regression.py")
    parser.add_argument("--seed", type=int, default=42, help="split seed")
    args = parser.parse_args()
    raw = load_raw_dataset(args.dataset_name)
    frame = raw.frames["all"]
    df = prepare_molecules(
        frame,
        find_column(frame, None, SMILES_CANDIDATES, "SMILES", raw.source),
        find_column(frame, None, LABEL_CANDIDATES, "label", raw.source),
        source=raw.source,
    )
    print(f"{'split':<18}{'train/val/test':>18}{'test->train':>13}{'val->train':>12}{'seconds':>9}")
    for method in SPLIT_METHODS:
        if method == "predefined":
            continue
        start = time.perf_counter()
        split = make_split(df, method, seed=args.seed)
        similarity = split_similarity(df, split)
        sizes = "/".join(str(n) for n in split.sizes.values())
        print(
            f"{method:<18}{sizes:>18}{similarity['test_to_train']['mean']:>13.3f}"
            f"{similarity['validation_to_train']['mean']:>12.3f}{time.perf_counter() - start:>9.1f}"
        )


if __name__ == "__main__":
    main()
