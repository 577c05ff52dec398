"""Label columns read into the labels a task trains on, every bad value reported with its row.

One regression target goes through `molft.data.prepare_molecules` as it always has (a missing label is an
error). The other tasks (molft/tasks.py) may have gaps: their raw values are kept while the molecules are
checked, then `encode_labels` turns them into class indices (`label`; classes chosen from every part of the
data at once) or one float column per target or 0/1 label (`label_<column>`, NaN where missing), and drops
rows without any label with a logged count.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column, prepare_molecules
from molft.tasks import LABEL_PREFIX, Task, parse_names

logger = logging.getLogger(__name__)

_RAW, _POSITION = "__raw_label__:", "__position__"
_MAX_ROWS = 10


def prepare_frame(
    frame: pd.DataFrame,
    task: Task | None,
    *,
    source: str,
    smiles_option: str | None,
    label_option: str | None,
    default_label: str | None = None,
    strict: bool = False,
    keep_columns: Sequence[str] = (),
    standardize: str | None = None,
) -> tuple[pd.DataFrame, str, list[str]]:
    """(checked molecules, SMILES column, label columns) of one table; `encode_labels` finishes new tasks.

    One regression target goes through `prepare_molecules` as it always has (a missing label is an error);
    other tasks keep their raw label values for `encode_labels`, which sees every part of the data at once.
    `default_label` is a dataset's own label column, used when none is named (ESOL).
    """
    smiles_col = find_column(frame, smiles_option, SMILES_CANDIDATES, "SMILES", source)
    if label_option is None and default_label in frame.columns:
        label_cols = [default_label]
    elif label_option is None:
        label_cols = [find_column(frame, None, LABEL_CANDIDATES, "label", source)]
    elif label_option in frame.columns:
        label_cols = [label_option]
    else:
        label_cols = [
            find_column(frame, n, (), "label", source) for n in parse_names(label_option, "--label_column")
        ]
    options = {"source": source, "strict": strict, "standardize": standardize}
    if task is None and len(label_cols) > 1:
        raise ValueError(
            f"{source}: several label columns {label_cols} need run_regression.py's task options."
        )
    if task is None or (task.problem_type == "regression" and len(label_cols) == 1):
        return (
            prepare_molecules(frame, smiles_col, label_cols[0], keep_columns=keep_columns, **options),
            smiles_col,
            label_cols,
        )
    if smiles_col in label_cols:
        raise ValueError(f"{source}: column {smiles_col!r} is both the SMILES column and a label column.")
    work = frame.assign(**{_POSITION: np.arange(len(frame))})
    prepared = prepare_molecules(
        work, smiles_col, None, require_labels=False, keep_columns=[*keep_columns, _POSITION], **options
    )
    positions = prepared.pop(_POSITION).to_numpy()
    for column in label_cols:
        prepared[_RAW + column] = frame[column].to_numpy()[positions]
    return prepared, smiles_col, label_cols


def prepare_extra(
    table: pd.DataFrame,
    task: Task | None,
    *,
    source: str,
    smiles_option: str | None,
    label_option: str | None,
    **options: Any,
) -> pd.DataFrame:
    """An extra training file's molecules with the task's labels: its label columns (default: the dataset's
    names) stand for the dataset's in order, and its classes must be the dataset's."""
    if task is None or task.is_legacy:
        return prepare_frame(
            table, None, source=source, smiles_option=smiles_option, label_option=label_option, **options
        )[0]
    option = label_option or ",".join(task.label_columns)
    prepared, _, columns = prepare_frame(
        table, task, source=source, smiles_option=smiles_option, label_option=option, **options
    )
    if len(columns) != len(task.label_columns) or not all(_RAW + c in prepared for c in columns):
        raise ValueError(
            f"{source}: label columns {columns} do not stand for the dataset's {task.label_columns} (one each, in order)."
        )
    prepared = prepared.rename(
        columns={_RAW + a: _RAW + b for a, b in zip(columns, task.label_columns, strict=True)}
    )
    return encode_labels({"extra": prepared}, task, task.label_columns, {"extra": source})["extra"]


def encode_labels(
    frames: dict[str, pd.DataFrame], task: Task | None, label_columns: list[str], sources: Mapping[str, str]
) -> dict[str, pd.DataFrame]:
    """Turn raw label values into class indices or label columns, checked, with every row of the error named.

    Classes come from all parts at once (or --class_names, or the task's classes for an extra file); rows
    without any label are dropped with a logged count.
    """
    if task is None:
        return frames
    if task.label_columns and task.label_columns != list(label_columns):
        raise ValueError(
            f"{list(sources.values())} name label columns {label_columns}, not {task.label_columns}."
        )
    task.label_columns = list(label_columns)
    if task.is_legacy:
        return frames
    for name, frame in frames.items():
        missing = [c for c in label_columns if _RAW + c not in frame]
        if missing:
            raise ValueError(
                f"{sources[name]} lacks label column(s) {missing}: every part needs the same ones."
            )
    if task.problem_type == "single_label_classification":
        (column,) = label_columns
        keys = {
            name: class_keys(frame[_RAW + column], frame["row"], column, sources[name])
            for name, frame in frames.items()
        }
        if not task.classes:
            task.classes = _choose_classes(np.concatenate(list(keys.values())), task, column)
        index = {name: i for i, name in enumerate(task.classes)}
        for name, frame in frames.items():
            unknown = [
                (r, k)
                for r, k in zip(frame["row"], keys[name], strict=True)
                if k is not None and k not in index
            ]
            if unknown:
                raise ValueError(
                    f"{sources[name]}: {len(unknown)} labels in {column!r} are not among the classes {task.classes} "
                    f"({_rows(unknown)})."
                )
            frame["label"] = np.array([-1 if k is None else index[k] for k in keys[name]], dtype=np.int64)
    else:
        binary = task.problem_type == "multi_label_classification"
        for name, frame in frames.items():
            for column in label_columns:
                values = numeric_labels(frame[_RAW + column], frame["row"], column, sources[name], binary)
                frame[LABEL_PREFIX + column] = values
    return {name: _drop_unlabelled(frame, task, sources[name]) for name, frame in frames.items()}


def class_keys(values: pd.Series, rows: pd.Series, column: str, source: str) -> np.ndarray:
    """Each value as a class name (integers, also written 1.0 or "1", as "1"); None where missing."""
    keys, bad = [], []
    for row, value in zip(rows, values, strict=True):
        if is_missing(value):
            keys.append(None)
        elif isinstance(value, (bool, np.bool_)):
            keys.append(str(bool(value)))
        elif pd.isna(number := pd.to_numeric(value, errors="coerce")):
            keys.append(str(value).strip())
        elif np.isfinite(number) and number == round(number):
            keys.append(str(int(number)))
        else:
            bad.append((row, value))
            keys.append(None)
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} labels in {column!r} are not class labels ({_rows(bad)}): classes are integers "
            "or names; a fractional number is a regression target (--problem_type regression)."
        )
    return np.array(keys, dtype=object)


def class_order(keys: Sequence[str | None], class_names: Sequence[str] | None, column: str) -> list[str]:
    """The classes in output order: `class_names` (which must hold every class found), else the classes
    found, sorted (numerically when all are integers); the last is the positive class of a binary task."""
    found = {k for k in keys if k is not None}
    numeric = all(k.lstrip("-").isdigit() for k in found)
    found = sorted(found, key=(lambda k: int(k)) if numeric else None)
    if not class_names:
        return found
    unknown = [k for k in found if k not in class_names]
    if unknown:
        raise ValueError(
            f"Column {column!r} holds classes {unknown} that --class_names {list(class_names)} lacks."
        )
    return list(class_names)


def _choose_classes(keys: np.ndarray, task: Task, column: str) -> list[str]:
    classes = class_order(keys, task.class_names, column)
    if len(classes) < 2:
        raise ValueError(
            f"single_label_classification needs two classes or more; column {column!r} has {classes}."
        )
    if task.num_labels is not None and len(classes) != task.num_labels:
        kind = "binary" if task.num_labels == 2 else f"{task.num_labels} classes"
        raise ValueError(
            f"--num_labels {task.num_labels} asks for {kind}, but column {column!r} holds {len(classes)} classes: "
            f"{classes}."
        )
    logger.info("Classes (output order): %s", classes)
    return classes


def numeric_labels(values: pd.Series, rows: pd.Series, column: str, source: str, binary: bool) -> np.ndarray:
    """Float labels, NaN where missing; text, infinities and (for 0/1 labels) other numbers are errors."""
    raw = values.to_numpy()
    missing = np.array([is_missing(v) for v in raw], dtype=bool)
    plain = [
        np.nan if m else float(v) if isinstance(v, (bool, np.bool_)) else v
        for v, m in zip(raw, missing, strict=True)
    ]
    numeric = np.array(pd.to_numeric(pd.Series(plain, dtype=object), errors="coerce"), dtype=np.float64)
    bad = ~missing & ~np.isfinite(numeric)
    if binary:
        bad |= ~missing & np.isfinite(numeric) & ~np.isin(numeric, (0.0, 1.0))
    if bad.any():
        shown = list(zip(np.asarray(rows)[bad], raw[bad], strict=True))
        wanted = "0 or 1 (or empty when missing)" if binary else "numbers (or empty when missing)"
        raise ValueError(
            f"{source}: {int(bad.sum())} labels in {column!r} are not {wanted} ({_rows(shown)})."
        )
    numeric[missing] = np.nan
    return numeric


def _drop_unlabelled(frame: pd.DataFrame, task: Task, source: str) -> pd.DataFrame:
    attrs = dict(frame.attrs)  # the standardisation, which split.json records
    frame = frame.drop(columns=[c for c in frame.columns if str(c).startswith(_RAW)])
    if task.problem_type == "single_label_classification":
        labelled = frame["label"].to_numpy() >= 0
    else:
        labelled = frame[task.frame_columns].notna().any(axis=1).to_numpy()
    if not labelled.all():
        logger.warning(
            "%s: dropping %d of %d molecules without any label (rows %s%s).",
            source,
            int((~labelled).sum()),
            len(frame),
            frame["row"][~labelled].tolist()[:_MAX_ROWS],
            " ..." if (~labelled).sum() > _MAX_ROWS else "",
        )
    if not labelled.any():
        raise ValueError(f"{source}: no molecule has a label in {task.label_columns}.")
    frame = frame[labelled].reset_index(drop=True)
    frame.attrs = attrs
    return frame


def is_missing(value: Any) -> bool:
    """An empty cell: None, NaN or blank text."""
    return value is None or (not isinstance(value, str) and bool(pd.isna(value))) or str(value).strip() == ""


def _rows(pairs: Sequence[tuple[Any, Any]]) -> str:
    # text quoted (it shows what was typed), numbers plain (2, not np.int64(2))
    shown = "; ".join(
        f"row {int(r)}: {v!r}" if isinstance(v, str) else f"row {int(r)}: {v}" for r, v in pairs[:_MAX_ROWS]
    )
    return shown + (" ..." if len(pairs) > _MAX_ROWS else "")


def dataset_labels(frame: pd.DataFrame, task: Task) -> list | None:
    """The `labels` column of a tokenised dataset (None when the frame has no labels)."""
    if task.problem_type == "single_label_classification":
        return frame["label"].astype(np.int64).tolist() if "label" in frame else None
    if not set(task.frame_columns) <= set(frame.columns):
        return None
    return frame[task.frame_columns].to_numpy(np.float64).tolist()
