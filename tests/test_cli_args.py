"""molft.cli.parse_args: every config value is type-checked against its dataclass field, naming key and file.

The shipped configs are parsed with the argument groups their scripts declare (`ARGUMENT_TYPES`, read as
constants: no script runs here, except the last test, which calls run_regression.main()).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

import run_influence
import run_regression
import run_selection
from molft.cli import check_config_types, parse_args
from molft.mlm import MlmDataArguments, MlmModelArguments
from molft.peft_setup import PeftOptions
from molft.regression import RegressionModelArguments
from molft.run_data import RegressionDataArguments

ROOT = Path(__file__).resolve().parents[1]
MLM_TYPES = (MlmModelArguments, MlmDataArguments, TrainingArguments)
REGRESSION_TYPES = (RegressionModelArguments, PeftOptions, RegressionDataArguments, TrainingArguments)
SCRIPT_TYPES = {
    "regression": run_regression.ARGUMENT_TYPES,
    "mlm": MLM_TYPES,
    "influence": run_influence.ARGUMENT_TYPES,
    "selection": run_selection.ARGUMENT_TYPES,
}
NOT_OPTIONS = {"hp_space.yaml"}  # a search space that --hp_space reads, not a script's options


def write_config(path: Path, options: dict) -> Path:
    path.write_text(yaml.safe_dump(options))
    return path


def test_every_shipped_config_still_parses():
    configs = sorted(path for path in (ROOT / "configs").glob("*.yaml") if path.name not in NOT_OPTIONS)
    names = {path.name for path in configs}
    assert {"regression_small.yaml", "regression_scratch.yaml", "mlm_pretrain_cpu.yaml"} <= names, names
    for config in configs:
        script = config.stem.split("_")[0]
        parsed = parse_args(SCRIPT_TYPES[script], [str(config)])
        options = yaml.safe_load(config.read_text())
        # every value of the scripts' own groups arrives as written (TrainingArguments normalises its own)
        values = {
            k: v
            for group in parsed
            if not isinstance(group, TrainingArguments)
            for k, v in vars(group).items()
        }
        for key, value in options.items():
            if key in values:
                assert values[key] == value, (config.name, key)
        if "learning_rate" in options:
            assert parsed[-1].learning_rate == options["learning_rate"] > 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("per_device_train_batch_size", [16], "per_device_train_batch_size must be an integer, got [16] (a list)"),
        ("learning_rate", "fast", "learning_rate must be a number, got 'fast' (a string)"),
        ("seed", 1.5, "seed must be an integer, got 1.5 (a number)"),
        ("do_train", 3, "do_train must be true or false, got 3 (an integer)"),
        ("do_eval", "maybe", "do_eval must be true or false, got 'maybe' (a string)"),
        ("lora_alpha", True, "lora_alpha must be a number, got true (a boolean)"),
        ("peft", None, "peft must be a string, got null"),
        ("config_name", ["a", "b"], 'config_name must be a string or null, got ["a", "b"] (a list)'),
        ("eval_strategy", "epcoh", "eval_strategy must be one of ['no', 'steps', 'epoch'], got 'epcoh' (a string)"),
        ("report_to", {"to": "wandb"}, "report_to must be a string, a list of strings or null, got"),
    ],
)  # fmt: skip
def test_wrong_type_names_file_and_key(key, value, message, tmp_path):
    config = write_config(tmp_path / "x.yaml", {key: value})
    with pytest.raises(ValueError) as error:
        parse_args(REGRESSION_TYPES, [str(config)])
    assert str(error.value).startswith(f"{config}: {message}")


def test_every_wrong_value_is_reported_at_once(tmp_path):
    config = write_config(tmp_path / "x.yaml", {"lora_r": "eight", "max_seq_length": [202], "split_seed": 42})
    with pytest.raises(ValueError) as error:
        parse_args(REGRESSION_TYPES, [str(config)])
    assert str(error.value) == (
        f"{config}: lora_r must be an integer, got 'eight' (a string); "
        "max_seq_length must be an integer, got [202] (a list)."
    )


def test_list_items_are_checked(tmp_path):
    config = write_config(tmp_path / "mlm.yaml", {"exclude_files": ["a.csv", 3]})
    with pytest.raises(
        ValueError, match=r'exclude_files must be a list of strings, got \["a.csv", 3\] \(a list\)'
    ):
        parse_args(MLM_TYPES, [str(config)])


def test_text_is_read_as_the_flag_would_be(tmp_path):
    """YAML reads 1e-4 (no dot) as text; a flag gives the number. Integers are numbers too."""
    config = tmp_path / "x.yaml"
    config.write_text("learning_rate: 1e-4\ndo_train: 'false'\nlora_alpha: 16\nexclude_files: a.csv\n")
    checked = check_config_types(yaml.safe_load(config.read_text()), (PeftOptions, *MLM_TYPES), config)
    assert checked == {"learning_rate": 1e-4, "do_train": False, "lora_alpha": 16, "exclude_files": ["a.csv"]}
    peft, _, data, training_args = parse_args(
        (PeftOptions, *MLM_TYPES), [str(config), "--output_dir", str(tmp_path)]
    )
    assert training_args.learning_rate == 1e-4 and training_args.do_train is False
    assert peft.lora_alpha == 16 and data.exclude_files == ["a.csv"]


def test_flags_after_the_file_still_override_it(tmp_path):
    config = write_config(tmp_path / "x.yaml", {"seed": 1, "lora_r": 4})
    _, peft, _, training_args = parse_args(REGRESSION_TYPES, [str(config), "--seed", "7"])
    assert (training_args.seed, peft.lora_r) == (7, 4)


def test_wrong_type_fails_before_any_output(tmp_path, data_dir):
    """run_regression.py with a bad config: the error names key and file, and no output folder appears."""
    output_dir = tmp_path / "never_written"
    config = write_config(
        tmp_path / "bad.yaml",
        {
            "train_file": str(data_dir / "lipophilicity.csv"),
            "config_name": str(ROOT / "configs" / "molformer-tiny.json"),
            "output_dir": str(output_dir),
            "do_train": True,
            "per_device_train_batch_size": [16],
        },
    )
    with pytest.raises(ValueError, match=rf"^{config}: per_device_train_batch_size must be an integer"):
        run_regression.main([str(config)])
    assert not output_dir.exists()


def test_setup_logging_prints_each_transformers_message_once():
    """transformers propagates to the root logger when $CI is set; each message would then print twice."""
    import logging

    from molft.cli import setup_logging

    logging.getLogger("transformers").propagate = True  # what transformers does under CI=true
    setup_logging(logging.INFO)
    assert logging.getLogger("transformers").propagate is False
