"""The search space file, the Ray domains built from it, and the search objective."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml

from molft.hp_search import BestValidationRMSE, SearchDimension, SearchSpace, plain_value

ROOT = Path(__file__).resolve().parents[1]


def test_search_space_file_checks(tmp_path):
    space = SearchSpace.from_yaml(ROOT / "configs" / "hp_space.yaml", "none")
    assert "lora_r" not in space.names and {"learning_rate", "hidden_dropout_prob"} <= set(space.names)
    bad = {
        "no_such_option": ({"type": "float", "low": 0, "high": 1}, "is not a TrainingArguments field"),
        "learning_rate": ({"type": "float", "low": 0.0, "high": 1e-3, "log": True}, "needs low > 0"),
        "weight_decay": ({"type": "float", "low": 0.1, "high": 0.1}, "needs low < high"),
        "warmup_steps": ({"type": "gaussian"}, "use float, int or categorical"),
        "seed": ({"type": "categorical", "choices": []}, "non-empty 'choices'"),
    }
    for name, (spec, message) in bad.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({name: spec}))
        with pytest.raises(ValueError, match=message):
            SearchSpace.from_yaml(path, "lora")


def test_ray_search_space_is_built_from_the_same_file(monkeypatch):
    def domain(kind):
        return lambda *args: (kind, *args)

    tune = types.SimpleNamespace(
        **{k: domain(k) for k in ("choice", "uniform", "loguniform", "randint", "lograndint")}
    )
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(tune=tune))
    space = SearchSpace.from_yaml(ROOT / "configs" / "hp_space.yaml", "lora").ray_space()
    assert space["learning_rate"] == ("loguniform", 1e-5, 1e-3)
    assert space["weight_decay"] == ("uniform", 0.0, 0.1)
    assert space["lora_r"] == ("choice", [4, 8, 16, 32])
    int_space = SearchDimension.from_spec("warmup_steps", {"type": "int", "low": 0, "high": 10}, "x")
    assert int_space.ray_domain(tune) == ("randint", 0, 11)  # Ray's upper bound is exclusive


def test_objective_is_the_best_validation_rmse_of_a_trial():
    objective = BestValidationRMSE()
    assert [objective({"eval_rmse": v}) for v in (1.0, 0.7, 0.9)] == [1.0, 0.7, 0.7]
    objective.on_train_begin(None, types.SimpleNamespace(global_step=0), None)
    assert objective({"eval_rmse": 0.8}) == 0.8
    with pytest.raises(KeyError, match="needs eval_rmse"):
        objective({"test_rmse": 0.1})


def test_plain_value_turns_numpy_scalars_into_python():
    import numpy as np

    value = plain_value(np.float32(0.25))
    assert type(value) is float and value == 0.25
    assert plain_value("lora") == "lora"
