"""Hyperparameter search for run_regression.py: the search space file, the objective, the Ray set-up, the run.

The space is read from YAML so one file drives both backends of `Trainer.hyperparameter_search`
(optuna and Ray Tune); the objective is a trial's best validation RMSE, so the test split never
takes part in choosing hyperparameters. The search ends in best_config.yaml, an ordinary run's config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from molft.files import BEST_CONFIG_FILE, HP_SEARCH_FILE
from molft.io import mark_done, write_json
from molft.metrics import make_compute_metrics
from molft.run_record import write_options
from molft.threads import choose_cpu_threads
from molft.trainer import RegressionTrainer

if TYPE_CHECKING:
    import datasets
    import torch

    from molft.regression import ModelFactory

logger = logging.getLogger(__name__)

# hyperparameters that live in the model config or the PEFT options rather than in TrainingArguments
CONFIG_HYPERPARAMETERS = ("hidden_dropout_prob", "embedding_dropout_prob", "classifier_dropout_prob")
PEFT_HYPERPARAMETERS = {"lora": ("lora_r", "lora_alpha", "lora_dropout"), "ia3": ("ia3_init_value",)}
# run_regression.py options that ask for a search; best_config.yaml leaves them out, so it reruns one model
SEARCH_OPTIONS = ("hp_search", "n_trials", "hp_space", "ray_address", "ray_resources_per_trial")


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


def run_hp_search(
    factory: ModelFactory,
    tokenised: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
    collator: DataCollatorWithPadding,
    training_args: TrainingArguments,
    *,
    backend: str,
    n_trials: int,
    space_path: str | os.PathLike,
    callbacks: list[TrainerCallback],
    options: Mapping[str, Any],
    split_file: Path | None,
    start: float,
    ray_address: str | None = None,
    ray_resources_per_trial: str | None = None,
    compute_metrics: Any = None,
) -> dict[str, Any]:
    """Search hyperparameters on the validation split only and write best_config.yaml (a rerunnable config).

    `options` are the options the search was given; `split_file`, when set, pins best_config.yaml to the
    very molecules the search used. `compute_metrics` (default: one regression target's) must give eval_rmse.
    """
    output_dir = Path(training_args.output_dir)
    space = SearchSpace.from_yaml(space_path, factory.peft_options.peft)
    objective = BestValidationRMSE()

    def model_init(trial: Any = None) -> torch.nn.Module:
        model = factory.build(space.trial_params(trial))
        choose_cpu_threads(model.num_parameters(), on_cpu=training_args.device.type == "cpu")
        # The Trainer seeds before model_init; a plain run's Trainer seeds again after its model is built.
        # Seeding here too gives a trial the data order and dropout draws of a plain run with its
        # hyperparameters, so best_config.yaml reproduces the best trial.
        set_seed(training_args.seed)
        return model

    trainer = RegressionTrainer(
        model_init=model_init,
        args=training_args,
        train_dataset=tokenised["train"],
        eval_dataset=tokenised["validation"],  # the test split is never shown to the search
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics or make_compute_metrics(),
        callbacks=[*callbacks, objective],
    )
    backend_kwargs: dict[str, Any] = {}
    if backend == "optuna":
        import optuna

        storage = optuna.storages.InMemoryStorage()
        backend_kwargs = {
            "sampler": optuna.samplers.TPESampler(seed=training_args.seed),
            "storage": storage,
            "study_name": "run_regression",
        }

        def hp_space(trial):
            return space.training_params(space.sample_optuna(trial))

    else:
        backend_kwargs = ray_search_kwargs(ray_address, ray_resources_per_trial, output_dir)

        def hp_space(trial):
            return space.ray_space()

    logger.info("Hyperparameter search (%s, %d trials) over %s", backend, n_trials, space.names)
    best = trainer.hyperparameter_search(
        hp_space=hp_space,
        compute_objective=objective,
        n_trials=n_trials,
        direction="minimize",
        backend=backend,
        hp_name=lambda trial: f"trial-{getattr(trial, 'number', 'ray')}",
        **backend_kwargs,
    )
    if not trainer.is_world_process_zero() or best is None:
        return {}
    best_params = {k: plain_value(v) for k, v in best.hyperparameters.items() if k in space.names}
    trials = []
    if backend == "optuna":
        study = optuna.load_study(study_name="run_regression", storage=backend_kwargs["storage"])
        trials = [
            {"number": t.number, "state": t.state.name, "validation_rmse": t.value, "params": t.params}
            for t in study.trials
        ]
    results = {
        "backend": backend,
        "objective": "validation RMSE (best evaluation of each trial); the test split is never evaluated",
        "n_trials": n_trials,
        "search_space": str(space_path),
        "best_trial": best.run_id,
        "best_validation_rmse": best.objective,
        "best_params": best_params,
        "trials": trials,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(output_dir / HP_SEARCH_FILE, results)
    best_options = {k: v for k, v in options.items() if k not in SEARCH_OPTIONS}
    best_options.update(best_params)
    best_options.update({"do_train": True, "do_eval": True, "output_dir": str(output_dir / "best")})
    if split_file is not None:
        best_options["split_file"] = str(split_file)
    write_options(
        output_dir / BEST_CONFIG_FILE,
        best_options,
        f"the search's options with the best of {n_trials} trials (trial {best.run_id}, "
        f"validation RMSE {best.objective:.4f})",
        script="run_regression.py",
    )
    logger.info("Best trial %s: validation RMSE %.4f with %s", best.run_id, best.objective, best_params)
    logger.info(
        "Outputs are in %s: the trials in %s; rerun the best trial with `python run_regression.py %s`.",
        output_dir.resolve(),
        HP_SEARCH_FILE,
        output_dir / BEST_CONFIG_FILE,
    )
    mark_done(
        output_dir,
        {
            "hp_search": backend,
            "best_validation_rmse": best.objective,
            "best_params": best_params,
            "wall_time_s": results["wall_time_s"],
        },
    )
    return results
