"""Hyperparameter search for run_regression.py: the search space file, the objective, the Ray set-up.

The space is read from YAML so one file drives both backends of `Trainer.hyperparameter_search`
(optuna and Ray Tune); the objective is a trial's best validation RMSE, so the test split never
takes part in choosing hyperparameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback, TrainingArguments

logger = logging.getLogger(__name__)

# hyperparameters that live in the model config or the PEFT options rather than in TrainingArguments
CONFIG_HYPERPARAMETERS = ("hidden_dropout_prob", "embedding_dropout_prob", "classifier_dropout_prob")
PEFT_HYPERPARAMETERS = {"lora": ("lora_r", "lora_alpha", "lora_dropout"), "ia3": ("ia3_init_value",)}


@dataclass(frozen=True)
class SearchDimension:
    """One hyperparameter of the search space: a float or int range (optionally log-scaled) or choices."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @classmethod
    def from_spec(cls, name: str, spec: Any, source: str) -> SearchDimension:
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ValueError(
                f"{source}: {name!r} needs a mapping with 'type' (float, int or categorical), got {spec!r}."
            )
        kind = spec["type"]
        unknown = set(spec) - {"type", "low", "high", "log", "choices"}
        if unknown:
            raise ValueError(f"{source}: {name!r} has unknown keys {sorted(unknown)}.")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{source}: categorical {name!r} needs a non-empty 'choices' list.")
            return cls(name, kind, choices=tuple(choices))
        if kind not in ("float", "int"):
            raise ValueError(f"{source}: {name!r} has type {kind!r}; use float, int or categorical.")
        if "low" not in spec or "high" not in spec:
            raise ValueError(f"{source}: {kind} {name!r} needs 'low' and 'high'.")
        low, high, log = float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))
        if not low < high:
            raise ValueError(f"{source}: {name!r} needs low < high, got {low} and {high}.")
        if log and low <= 0:
            raise ValueError(f"{source}: log-scaled {name!r} needs low > 0, got {low}.")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise ValueError(f"{source}: int {name!r} needs integer bounds, got {low} and {high}.")
        return cls(name, kind, low, high, log)

    def suggest(self, trial) -> Any:
        """Optuna: the same name and range give the same value when asked again within a trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def ray_domain(self, tune) -> Any:
        if self.kind == "categorical":
            return tune.choice(list(self.choices))
        if self.kind == "int":  # Ray's integer upper bounds are exclusive
            sampler = tune.lograndint if self.log else tune.randint
            return sampler(int(self.low), int(self.high) + 1)
        return (tune.loguniform if self.log else tune.uniform)(self.low, self.high)


@dataclass
class SearchSpace:
    """The hyperparameters a search varies, read from a YAML file (see configs/hp_space.yaml)."""

    dimensions: list[SearchDimension]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, peft_method: str) -> SearchSpace:
        with open(path) as fh:
            spec = yaml.safe_load(fh) or {}
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"Search space {path} must map hyperparameter names to ranges.")
        training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        peft_names = {name for names in PEFT_HYPERPARAMETERS.values() for name in names}
        dimensions = []
        for name, entry in spec.items():
            if name in peft_names and name not in PEFT_HYPERPARAMETERS.get(peft_method, ()):
                logger.warning(
                    "Search space %s: %r skipped, it does not apply to --peft %s.", path, name, peft_method
                )
                continue
            if name not in training_fields and name not in CONFIG_HYPERPARAMETERS and name not in peft_names:
                raise ValueError(
                    f"Search space {path}: {name!r} is not a TrainingArguments field nor one of "
                    f"{CONFIG_HYPERPARAMETERS + tuple(sorted(peft_names))}."
                )
            dimensions.append(SearchDimension.from_spec(name, entry, str(path)))
        if not dimensions:
            raise ValueError(f"Search space {path} has nothing to search for --peft {peft_method}.")
        return cls(dimensions)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def sample_optuna(self, trial) -> dict[str, Any]:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def ray_space(self) -> dict[str, Any]:
        from ray import tune

        return {d.name: d.ray_domain(tune) for d in self.dimensions}

    def training_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The sampled values that the Trainer sets on TrainingArguments (the rest go to the model)."""
        training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        return {k: v for k, v in params.items() if k in training_fields}

    def trial_params(self, trial) -> dict[str, Any]:
        """All sampled values of an optuna trial or a Ray config (None: the defaults)."""
        if trial is None:
            return {}
        if isinstance(trial, Mapping):
            return {k: trial[k] for k in self.names if k in trial}
        return self.sample_optuna(trial)


class BestValidationRMSE(TrainerCallback):
    """Search objective: the best validation RMSE a trial reached (the epoch a rerun restores).

    Used as `compute_objective`, which the Trainer calls after every evaluation of a trial.
    """

    def __init__(self) -> None:
        self.best = math.inf

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.best = math.inf

    def __call__(self, metrics: Mapping[str, float]) -> float:
        if "eval_rmse" not in metrics:
            raise KeyError(f"The search objective needs eval_rmse; the evaluation gave {sorted(metrics)}.")
        self.best = min(self.best, float(metrics["eval_rmse"]))
        return self.best


def ray_search_kwargs(
    address: str | None, resources_per_trial: str | None, output_dir: Path
) -> dict[str, Any]:
    """Connect to the Ray cluster (--ray_address, else $RAY_ADDRESS, else local) and set trial resources."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address)
    kwargs: dict[str, Any] = {"storage_path": str((output_dir / "ray_results").resolve())}
    if resources_per_trial:
        resources = {}
        for item in resources_per_trial.split(","):
            key, _, value = item.partition("=")
            if not value:
                raise ValueError(
                    f"--ray_resources_per_trial wants 'cpu=N,gpu=M', got {resources_per_trial!r}."
                )
            resources[key.strip()] = float(value)
        kwargs["resources_per_trial"] = resources
    return kwargs


def plain_value(value: Any) -> Any:
    """Python scalars for YAML (numpy scalars come back from some samplers)."""
    return value.item() if hasattr(value, "item") else value
