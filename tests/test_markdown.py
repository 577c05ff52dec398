"""molft.markdown: the one Markdown table format of the reports."""

from __future__ import annotations

import numpy as np
import pandas as pd

from molft.markdown import format_cell, markdown_table


def test_cells_are_short_numbers_full_counts_and_escaped_text():
    assert [format_cell(v) for v in (0.123456, 2521089.0, np.float64("nan"), None, 7, "a|b")] == [
        "0.1235",
        "2,521,089",
        "nan",
        "",
        "7",
        "a\\|b",
    ]


def test_table_has_header_divider_and_one_line_per_row():
    table = markdown_table(pd.DataFrame({"method": ["full", "lora"], "rmse": [0.98312, 0.92686]}))
    assert table.splitlines() == ["| method | rmse |", "|---|---|", "| full | 0.9831 |", "| lora | 0.9269 |"]
