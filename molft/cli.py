"""Argument parsing shared by every script.

A script takes either flags, or a YAML/JSON config file as its sole positional argument, optionally
followed by flags that override single values of that file:

    python run_regression.py configs/regression_lora.yaml --seed 3
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import sys
import types
import typing
from argparse import ArgumentDefaultsHelpFormatter, ArgumentTypeError, RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

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


class HelpFormatter(RawDescriptionHelpFormatter, ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks (its example commands) and shows every default."""


def help_description(docstring: str | None) -> str | None:
    """The start of a script's docstring for --help: its text up to and including its first example block."""
    if not docstring:
        return None
    blocks = docstring.strip().split("\n\n")
    for end, block in enumerate(blocks):
        if block.startswith("    "):  # the indented example commands
            return "\n\n".join(blocks[: end + 1])
    return blocks[0]


def parse_args(
    dataclass_types: tuple[type, ...], args: list[str] | None = None, description: str | None = None
) -> tuple[Any, ...]:
    """Parse `args` (default: sys.argv[1:]) into instances of `dataclass_types`.

    Unknown keys in a config file are an error, so a typo never silently falls back to a default.
    `description`: the script's docstring, whose start (up to its first example) opens --help.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(
        dataclass_types,
        description=help_description(description),
        usage="%(prog)s [CONFIG_FILE] [--option VALUE ...]",  # the full list of options follows
        formatter_class=HelpFormatter,
    )
    if args and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        config = load_config_file(args[0])
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown option(s) in {args[0]}: {', '.join(unknown)}")
        config = check_config_types(config, dataclass_types, args[0])
        overrides = args[1:]
        # config values become the new defaults; flags given after the file still win
        for action in parser._actions:
            if action.dest in config:
                action.required = False
        parser.set_defaults(**config)
        args = overrides
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


def check_config_types(
    config: dict[str, Any], dataclass_types: tuple[type, ...], source: str | Path
) -> dict[str, Any]:
    """`config` with every value checked against its dataclass field's type; errors name the key and `source`.

    argparse types only what comes as text, so without this a config's `per_device_train_batch_size: [16]`
    would reach torch. Text for a number, boolean or list is read as the same flag would be (YAML reads
    `1e-4` as text); anything else of the wrong type is an error, all of them reported at once.
    """
    hints: dict[str, Any] = {}
    for dataclass_type in dataclass_types:
        resolved = typing.get_type_hints(dataclass_type)
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(dataclass_type) if f.init})
    checked, problems = dict(config), []
    for key, value in config.items():
        if key not in hints:
            continue
        hint = _as_parsed(hints[key])
        for convert in (False, True):
            fits, converted = _fits(value, hint, convert)
            if fits:
                checked[key] = converted
                break
        else:
            problems.append(f"{key} must be {_expected(hint)}, got {_shown(value)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ".")
    return checked


def _union_members(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _as_parsed(hint: Any) -> Any:
    """The type HfArgumentParser parses a field as: `Enum | str` (TrainingArguments' strategies) is the Enum."""
    members = _union_members(hint)
    if members and len(members) == 2 and str in members:
        other = members[0] if members[1] is str else members[1]
        if isinstance(other, type) and issubclass(other, enum.Enum):
            return other
    return hint


def _fits(value: Any, hint: Any, convert: bool) -> tuple[bool, Any]:
    """Whether `value` is of type `hint` (with `convert`: after reading text as a flag would), and the value."""
    members = _union_members(hint)
    if members is not None:
        for member in members:
            fits, converted = _fits(value, member, convert)
            if fits:
                return True, converted
        return False, value
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(hint), value
    if origin is list or hint is list:
        item_hint = (typing.get_args(hint) or (Any,))[0]
        if isinstance(value, list):
            items = [_fits(item, item_hint, convert) for item in value]
            return all(fits for fits, _ in items), [item for _, item in items]
        if convert:  # a single value is the one-item list a flag would give
            fits, item = _fits(value, item_hint, convert)
            return fits, [item]
        return False, value
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}, value
    readers = {bool: string_to_bool, int: int, float: float}
    if hint in readers:
        if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True, value
        if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
            return True, value
        if convert and isinstance(value, str):
            try:
                return True, readers[hint](value.strip())
            except (ValueError, TypeError, ArgumentTypeError):
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    return True, value  # a type argparse cannot give from a config either (e.g. accelerate's configs)


def _expected(hint: Any) -> str:
    members = _union_members(hint)
    if members is not None:
        parts = [_expected(member) for member in members if member is not type(None)]
        parts += ["null"] if type(None) in members else []
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin is list or hint is list:
        item_hint = (typing.get_args(hint) or (Any,))[0]
        if item_hint is str:
            return "a list of strings"
        return "a list" if item_hint is Any else f"a list whose items are each {_expected(item_hint)}"
    if origin is dict or hint is dict:
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[member.value for member in hint]}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    """A config value as the user wrote it, and what YAML read it as."""
    if value is None:
        return "null"
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "a mapping")]  # fmt: skip
    kind = next((name for kind_type, name in kinds if isinstance(value, kind_type)), type(value).__name__)
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list | dict):
        text = json.dumps(value, default=str)
    else:
        text = repr(value)
    return f"{text} ({kind})"


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
    # transformers propagates to the root logger whenever $CI is set, which would print each of its messages
    # twice (its own handler and ours); its own handler alone, as everywhere else
    transformers.utils.logging.disable_propagation()


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
