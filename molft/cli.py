"""Argument parsing shared by every script.

A script takes either flags, or a YAML/JSON config file as its sole positional argument, optionally
followed by flags that override single values of that file:

    python run_regression.py configs/regression_lora.yaml --seed 3
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    with path.open() as fh:
        data = yaml.safe_load(fh)  # YAML is a superset of JSON
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option names to values.")
    return data


def parse_args(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse `args` (default: sys.argv[1:]) into instances of `dataclass_types`.

    Unknown keys in a config file are an error, so a typo never silently falls back to a default.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(dataclass_types)
    if args and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        config = load_config_file(args[0])
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown option(s) in {args[0]}: {', '.join(unknown)}")
        overrides = args[1:]
        # config values become the new defaults; flags given after the file still win
        for action in parser._actions:
            if action.dest in config:
                action.required = False
        parser.set_defaults(**config)
        args = overrides
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


def setup_logging(log_level: int) -> None:
    """Script logging as in the transformers examples: one stdout handler, libraries at the same level."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    logging.getLogger().setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_explicit_format()


LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def log_level(name: str) -> int:
    """The logging level of a `--log_level` name."""
    if name.lower() not in LOG_LEVELS:
        raise ValueError(f"--log_level must be one of {sorted(LOG_LEVELS)}, got {name!r}.")
    return LOG_LEVELS[name.lower()]


def parse_list(value: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option value."""
    return [part.strip() for part in value.split(",") if part.strip()]
