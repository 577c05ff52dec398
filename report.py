"""Summarise a sweep directory: per-cell tables, paired tests against baselines, and figures.

Usage: `python report.py --sweep_dir runs/sweep --test wilcoxon`, or a YAML/JSON config file as the
sole argument. Safe to run while the sweep is still going: unfinished runs are skipped.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

from molft.cli import parse_args
from molft.report import write_report

logger = logging.getLogger(__name__)


@dataclass
class ReportArguments:
    sweep_dir: str = field(metadata={"help": "Directory holding the sweep's run directories, at any depth."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write the report; unset means <sweep_dir>/report."}
    )
    metric: str = field(default="test_rmse", metadata={"help": "Metric compared in the paired tests."})
    test: Literal["wilcoxon", "ttest"] = field(
        default="wilcoxon", metadata={"help": "Paired test: Wilcoxon signed-rank or paired t-test."}
    )


def main(args: list[str] | None = None) -> dict:
    (report_args,) = parse_args((ReportArguments,), args)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    for name in (__name__, "molft"):
        logging.getLogger(name).setLevel(logging.INFO)
    logger.info("Report arguments %s", report_args)

    paths = write_report(
        report_args.sweep_dir, report_args.output_dir, metric=report_args.metric, test=report_args.test
    )
    for name, path in paths.items():
        logger.info("%s: %s", name, path)
    return paths


if __name__ == "__main__":
    main()
