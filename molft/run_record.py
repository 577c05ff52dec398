"""What a run records about itself: the options it was given (a config that reruns it), every resolved
setting, the library versions, and where its data came from (files and their sha256), so a result can be
traced back to how it was made and a later reader can rebuild the run's data from the record alone."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from molft.cli import CONFIG_SUFFIXES, load_config_file
from molft.files import RUN_CONFIG_FILE, RUN_OPTIONS_FILE
from molft.io import read_json, write_json, write_text

# The data options of run_regression.py that say where its molecules come from; a reader that gives one
# of SOURCE_OPTIONS reads its own data, not the run's.
FILE_OPTIONS = ("train_file", "validation_file", "test_file")
SOURCE_OPTIONS = ("dataset_name", "dataset_config_name", *FILE_OPTIONS)
COLUMN_OPTIONS = ("smiles_column", "label_column")


def explicit_options(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> dict[str, Any]:
    """The options a run was given (config file, then flags), as a mapping its script takes as a config file.

    Read from the command line itself rather than diffed against defaults: building a second
    TrainingArguments for its defaults would reset the process group of a distributed run.
    """
    from transformers import HfArgumentParser

    args = list(sys.argv[1:] if args is None else args)
    options: dict[str, Any] = {}
    if args and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        options.update(load_config_file(args[0]))
        args = args[1:]
    parser = HfArgumentParser(dataclass_types)
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    options.update(vars(parser.parse_args(args)))
    return {k: v for k, v in options.items() if not k.endswith("_token")}  # never write credentials


def write_run_config(
    output_dir: Path, options: Mapping[str, Any], sections: Mapping[str, Any], script: str
) -> None:
    """run_config.json records every resolved setting; run_options.yaml holds the options given, to rerun.

    `sections` are argument groups (dataclasses; TrainingArguments as its `to_dict()`) or plain values,
    written in order, followed by the library versions.
    """
    resolved = {name: _resolved(value) for name, value in sections.items()}
    resolved["versions"] = library_versions()
    write_json(output_dir / RUN_CONFIG_FILE, resolved)
    write_options(output_dir / RUN_OPTIONS_FILE, options, "the options this run was given", script)


def write_options(path: Path, options: Mapping[str, Any], what: str, script: str) -> None:
    """A config file for `script` holding `options`, with a header saying what it is and how to rerun it."""
    header = f"# {script} config: {what}.\n# Rerun: python {script} {path}\n"
    write_text(path, header + yaml.safe_dump(dict(options), sort_keys=False))


def library_versions() -> dict[str, str]:
    import datasets
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
    }


def _resolved(value: Any) -> Any:
    import transformers

    if isinstance(value, transformers.TrainingArguments):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file: tells a reader whether a data file is still the one a run read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_record(options: Any) -> dict[str, Any]:
    """Where a run's data came from, as split.json records it: absolute file paths and their sha256.

    `options` holds the data options of run_regression.py (SOURCE_OPTIONS and strict_smiles).
    """
    files = {name: getattr(options, name) for name in FILE_OPTIONS if getattr(options, name)}
    return {
        "dataset_name": None if files else options.dataset_name,
        "dataset_config_name": options.dataset_config_name,
        **{name: str(Path(files[name]).resolve()) if name in files else None for name in FILE_OPTIONS},
        "strict_smiles": options.strict_smiles,
        "file_sha256": {name: file_sha256(path) for name, path in files.items()},
    }


def recorded_data_options(split_file: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str], str]:
    """(options, file hashes, where they were read) of the run that wrote `split_file`.

    split.json holds them since it records its data; older runs have only the flags in run_config.json.
    """
    split = read_json(split_file)
    if split.get("data"):
        data = dict(split["data"])
        hashes = data.pop("file_sha256", {}) or {}
        options = {**data, **(split.get("columns") or {}), "standardize": split.get("standardize")}
        return options, hashes, str(split_file)
    run_config = Path(split_file).parent / RUN_CONFIG_FILE
    if not run_config.is_file():
        return {}, {}, str(split_file)
    data = read_json(run_config).get("data", {})
    names = (*SOURCE_OPTIONS, *COLUMN_OPTIONS, "strict_smiles", "standardize")
    options = {name: data.get(name) for name in names}
    if any(options[name] for name in FILE_OPTIONS):
        options["dataset_name"] = None  # run_regression.py ignores its dataset_name with files
    return options, {}, str(run_config)


def check_file_unchanged(option: str, path: str, digest: str, where: str) -> None:
    """A recorded data file must exist and hold what the run read (else the split indexes other rows)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"The run's {option} {path} (recorded in {where}) does not exist; pass --{option} with its new place."
        )
    now = file_sha256(path)
    if now != digest:
        raise ValueError(
            f"The run's {option} {path} has changed since the run read it (sha256 {digest[:12]}... recorded in "
            f"{where}, now {now[:12]}...): its split no longer fits the file. Restore it or pass --{option}."
        )
