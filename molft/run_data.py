"""The data options of a finished run_regression.py run, shared by the scripts that read such runs.

run_influence.py and run_selection.py must rebuild the run's dataset exactly as run_regression.py
prepared it, or the indices in its split.json point at other molecules; one dataclass keeps their
options (and so their config files) identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from molft.splits import load_run_frames


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
