"""Markdown tables for the reports (sweep report, influence validation), in one format."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def format_cell(value: Any) -> str:
    """A cell: 4 significant digits, large whole numbers with thousands separators, pipes escaped."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) >= 1e4:
            return f"{int(value):,}"  # parameter counts read better in full
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    """`frame` as a Markdown table, header from its columns, cells through format_cell."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    divider = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, divider, *body])
