"""molft.run_record: the options a run was given reparse to the same settings; the resolved record."""

from __future__ import annotations

import json

import yaml
from transformers import TrainingArguments

from molft.cli import parse_args
from molft.peft_setup import PeftOptions
from molft.regression import RegressionModelArguments
from molft.run_data import RegressionDataArguments
from molft.run_record import explicit_options, write_options, write_run_config

GROUPS = (RegressionModelArguments, PeftOptions, RegressionDataArguments, TrainingArguments)


def test_recorded_options_rerun_the_same_options(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"config_name": "configs/molformer-tiny.json", "peft": "lora", "seed": 3})
    )
    args = [str(config), "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "2", "--lora_r", "4",
            "--do_train", "--split", "scaffold", "--learning_rate", "1e-3"]  # fmt: skip
    options = explicit_options(GROUPS, args)
    assert options == {
        "config_name": "configs/molformer-tiny.json", "peft": "lora", "seed": 3, "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 2.0, "lora_r": 4, "do_train": True, "split": "scaffold", "learning_rate": 1e-3,
    }  # fmt: skip
    path = tmp_path / "run_options.yaml"
    write_options(path, options, "the options this run was given", script="run_regression.py")
    assert path.read_text().startswith(
        f"# run_regression.py config: the options this run was given.\n# Rerun: python run_regression.py {path}\n"
    )
    original, rerun = parse_args(GROUPS, args), parse_args(GROUPS, [str(path)])
    for before, after in zip(original[:3], rerun[:3], strict=True):
        assert before == after
    assert original[3].to_dict() == rerun[3].to_dict()


def test_credentials_are_never_recorded(tmp_path):
    options = explicit_options(GROUPS, ["--output_dir", str(tmp_path), "--hub_token", "secret"])
    assert options == {"output_dir": str(tmp_path)}


def test_run_config_holds_every_resolved_setting(tmp_path):
    training = TrainingArguments(output_dir=str(tmp_path), seed=7)
    sections = {"peft": PeftOptions(peft="ia3"), "training": training, "split": {"method": "random"}}
    write_run_config(tmp_path, {"peft": "ia3"}, sections, script="run_regression.py")
    record = json.loads((tmp_path / "run_config.json").read_text())
    assert list(record) == ["peft", "training", "split", "versions"]
    assert record["peft"]["peft"] == "ia3" and record["peft"]["lora_r"] == 8
    assert record["training"]["seed"] == 7 and record["split"] == {"method": "random"}
    assert {"python", "torch", "transformers", "peft", "datasets"} <= set(record["versions"])
    assert yaml.safe_load((tmp_path / "run_options.yaml").read_text()) == {"peft": "ia3"}
