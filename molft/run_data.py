"""The data options of a finished run_regression.py run, shared by the scripts that read such runs.

run_influence.py and run_selection.py must rebuild the run's dataset exactly as run_regression.py
prepared it, or the indices in its split.json point at other molecules; one dataclass keeps their
options (and so their config files) identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from molft.splits import load_run_frames

logger = logging.getLogger(__name__)


@dataclass
class RunDataArguments:
    """The run's dataset, rebuilt as run_regression.py prepares it, so split.json indexes it."""

    split_file: str | None = field(
        default=None,
        metadata={
            "help": "The run's split.json (checked against the data). Default: <model_name_or_path>/split.json."
        },
    )
    dataset_name: str | None = field(
        default="lipophilicity",
        metadata={"help": "Dataset of the run, as given to run_regression.py. Ignored with --train_file."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "The run's --train_file, if it had one."})
    validation_file: str | None = field(default=None, metadata={"help": "The run's --validation_file."})
    test_file: str | None = field(default=None, metadata={"help": "The run's --test_file."})
    smiles_column: str | None = field(default=None, metadata={"help": "The run's --smiles_column."})
    label_column: str | None = field(default=None, metadata={"help": "The run's --label_column."})
    strict_smiles: bool = field(default=False, metadata={"help": "The run's --strict_smiles."})

    def use_model_split(self, model_name_or_path: str | None, required: bool) -> None:
        """Without --split_file, take the split.json that run_regression.py wrote beside the model.

        `required`: a missing file is an error (influence has no meaning without the run's training set);
        otherwise the split stays unset and the caller does without one.
        """
        if self.split_file:
            return
        candidate = Path(model_name_or_path) / "split.json" if model_name_or_path else None
        if candidate is not None and candidate.is_file():
            logger.info("Using the model's split %s (pass --split_file to choose another).", candidate)
            self.split_file = str(candidate)
        elif required:
            raise FileNotFoundError(
                f"No --split_file given and {candidate or 'no model'} holds no split.json: pass the split.json "
                "of the run that trained this model, so training, query and test molecules are the run's own."
            )

    def load_frames(self) -> dict[str, pd.DataFrame]:
        """The run's train/validation/test frames; `split_file` must be set."""
        if not self.split_file:
            raise ValueError("No split file: give --split_file (the run's split.json).")
        return load_run_frames(
            self.split_file,
            dataset_name=self.dataset_name,
            train_file=self.train_file,
            validation_file=self.validation_file,
            test_file=self.test_file,
            dataset_config_name=self.dataset_config_name,
            smiles_column=self.smiles_column,
            label_column=self.label_column,
            strict_smiles=self.strict_smiles,
        )
