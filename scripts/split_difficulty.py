#!/usr/bin/env python
"""How hard is each splitter? Mean nearest-neighbour Tanimoto from test (and validation) to train.

    python scripts/split_difficulty.py [--seed 42] [--dataset_name lipophilicity | --train_file F] [--save_dir DIR]

Lower similarity means test molecules look less like anything seen in training: a harder split.
With --save_dir each split is also written as DIR/<method>.json, a split.json that
`run_regression.py --split_file` and `scripts/sweep.sh` accept, so a per-splitter sweep trains on
exactly the splits whose similarity is printed here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column, load_raw_dataset, prepare_molecules  # noqa: E402
from molft.splits import SPLIT_METHODS, make_split, save_split, split_similarity  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset_name", default="lipophilicity", help="dataset, as for run_regression.py")
    parser.add_argument(
        "--train_file", help="a local csv/tsv/json/parquet to split instead (SMILES and label)"
    )
    parser.add_argument("--seed", type=int, default=42, help="split seed")
    parser.add_argument("--save_dir", type=Path, help="also write each split here as <method>.json")
    args = parser.parse_args(argv)
    raw = load_raw_dataset(None if args.train_file else args.dataset_name, train_file=args.train_file)
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
        if args.save_dir is not None:
            save_split(
                args.save_dir / f"{method}.json", df, split, dataset_source=raw.source, similarity=similarity
            )
        sizes = "/".join(str(n) for n in split.sizes.values())
        print(
            f"{method:<18}{sizes:>18}{similarity['test_to_train']['mean']:>13.3f}"
            f"{similarity['validation_to_train']['mean']:>12.3f}{time.perf_counter() - start:>9.1f}"
        )


if __name__ == "__main__":
    main()
