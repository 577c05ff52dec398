"""What a run records about itself: the options it was given (a config that reruns it), every resolved
setting, and the library versions, so a result can be traced back to how it was made."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers
import yaml
from transformers import HfArgumentParser

from molft.cli import CONFIG_SUFFIXES, load_config_file
from molft.files import RUN_CONFIG_FILE, RUN_OPTIONS_FILE
from molft.io import write_json, write_text


def explicit_options(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> dict[str, Any]:
    """The options a run was given (config file, then flags), as a mapping its script takes as a config file.

    Read from the command line itself rather than diffed against defaults: building a second
    TrainingArguments for its defaults would reset the process group of a distributed run.
    """
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
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
    }


def _resolved(value: Any) -> Any:
    if isinstance(value, transformers.TrainingArguments):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
