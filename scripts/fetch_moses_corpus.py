"""Fetch the MOSES training molecules (1.58M drug-like ZINC SMILES, MIT licence) for masked-LM pretraining.

The `molsets` wheel on PyPI carries them in `moses/dataset/data/train.csv.gz`. The wheel is downloaded with
`pip download --no-deps` and read as a zip file, never installed (it pins `pomegranate==0.12.0`, which does not
build). Every molecule that is in Lipophilicity (the embedded copy) or in the external pool is removed by
canonical SMILES, as are molecules already in the shared pretraining corpus and repeats, and each count is
written to `<output>.summary.json` beside the corpus (a molecule in both held-out sets counts under both):

    python scripts/fetch_moses_corpus.py                       # -> data/moses_train.csv (git-ignored)
    python scripts/fetch_moses_corpus.py --limit 200000        # the first 200,000 rows only

The corpus file is written atomically and only after the summary is complete, so an interrupted run leaves
nothing that looks finished; run it again.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molft.chem import canonical_smiles  # noqa: E402
from molft.data import embedded_lipophilicity_path, read_table  # noqa: E402
from molft.io import write_csv, write_json  # noqa: E402

logger = logging.getLogger("fetch_moses_corpus")

WHEEL = "molsets==0.3.1"
MEMBER = "moses/dataset/data/train.csv.gz"


def wheel_path(wheel_dir: Path) -> Path:
    """The molsets wheel in `wheel_dir`, downloaded there (no dependencies, not installed) when missing."""
    found = sorted(wheel_dir.glob("molsets-0.3.1-*.whl"))
    if not found:
        logger.info("Downloading %s into %s (about 52 MB)", WHEEL, wheel_dir)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheel_dir)], check=True
        )
        found = sorted(wheel_dir.glob("molsets-0.3.1-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download of {WHEEL} left no wheel in {wheel_dir}")
    return found[0]


def read_moses_train(wheel: Path) -> pd.Series:
    with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as raw:
        frame = pd.read_csv(io.BytesIO(gzip.decompress(raw.read())))
    if "SMILES" not in frame.columns:
        raise ValueError(f"{wheel}:{MEMBER} has no SMILES column (columns: {list(frame.columns)})")
    return frame["SMILES"]


def canonical_set(smiles: pd.Series) -> set[str]:
    return {c for c in (canonical_smiles(s) for s in smiles) if c is not None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", default="data/moses_train.csv", help="corpus CSV to write (column smiles)"
    )
    parser.add_argument(
        "--wheel_dir", default=None, help="where the wheel is or goes (default: a temp folder)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="read only the first N rows of the MOSES file"
    )
    parser.add_argument(
        "--shared", default="../shared/data", help="folder with external_300.csv and the corpus"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    shared = Path(args.shared)
    heldout = {
        "lipophilicity": read_table(embedded_lipophilicity_path())["smiles"],
        "external_300": pd.read_csv(shared / "external_300.csv")["SMILES"],
    }
    heldout_sets = {name: canonical_set(values) for name, values in heldout.items()}
    shared_corpus = canonical_set(pd.read_csv(shared / "pretrain_chembl30_zinc_120k.csv")["smiles"])

    with tempfile.TemporaryDirectory() as tmp:
        wheel = wheel_path(Path(args.wheel_dir) if args.wheel_dir else Path(tmp))
        raw = read_moses_train(wheel)
    if args.limit is not None:
        raw = raw.iloc[: args.limit]
    counts = {"moses_rows": len(raw), "invalid": 0, "repeats": 0, "in_shared_corpus": 0}
    counts.update({f"in_{name}": 0 for name in heldout_sets})
    kept: list[str] = []
    seen: set[str] = set()
    start = time.time()
    for i, smiles in enumerate(raw):
        if i and i % 200_000 == 0:
            logger.info("%d / %d rows canonicalised (%.0f s)", i, len(raw), time.time() - start)
        canonical = canonical_smiles(smiles)
        if canonical is None:
            counts["invalid"] += 1
            continue
        held = [name for name, values in heldout_sets.items() if canonical in values]
        for name in held:
            counts[f"in_{name}"] += 1
        if held:
            continue
        if canonical in seen:
            counts["repeats"] += 1
            continue
        seen.add(canonical)
        if canonical in shared_corpus:
            counts["in_shared_corpus"] += 1
            continue
        kept.append(canonical)
    counts["kept"] = len(kept)
    summary = {
        "source": f"PyPI {WHEEL}, {MEMBER} (MOSES, MIT licence)",
        "removed_against": {
            "lipophilicity": str(embedded_lipophilicity_path()),
            "external_300": str(shared / "external_300.csv"),
            "shared_corpus": str(shared / "pretrain_chembl30_zinc_120k.csv"),
        },
        "counts": counts,
        "seconds": round(time.time() - start, 1),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output.with_suffix(".summary.json"), summary)
    write_csv(output, pd.DataFrame({"smiles": kept}), index=False)
    logger.info("Wrote %d molecules to %s; counts %s", len(kept), output, counts)
    return summary


if __name__ == "__main__":
    main()
