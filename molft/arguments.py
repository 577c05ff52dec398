"""Argument groups that more than one script takes, declared once.

Each script parses its own groups plus these with `molft.cli.parse_args`; a group that two scripts share
lives here so its flags, defaults and help read the same everywhere (and a config file written for one
script's group works for the other's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "ibm/MoLFormer-XL-both-10pct"


@dataclass
class CheckpointArguments:
    """Where a training script's model starts: a checkpoint, or a new model from a config.

    Shared by run_regression.py and run_mlm.py, whose script-specific model options subclass it.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": f"Starting checkpoint: a Hub id, a local folder, a run_mlm.py or run_regression.py output. "
            f"Default: {DEFAULT_MODEL} (needs the Hub, or its files in the cache), unless --config_name "
            "asks for a new model."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Config of a NEW model trained from scratch (e.g. configs/molformer-small.json, or a "
            "folder); the offline route when the Hub cannot be reached."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id. Default: the checkpoint's; for a new model, one built from "
            "the training SMILES."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit of the model."})

    def __post_init__(self) -> None:
        if self.model_name_or_path is None and self.config_name is None:
            self.model_name_or_path = DEFAULT_MODEL


@dataclass
class RunModelArguments:
    """A finished run_regression.py run to read: full model or PEFT adapter (run_influence/run_selection)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A run_regression.py output folder: a full regression model or a PEFT adapter."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model of an adapter, if it is no longer where adapter_config.json says."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the one saved with the model)."}
    )
    max_seq_length: int = field(
        default=202,
        metadata={"help": "The run's --max_seq_length; longer SMILES are truncated (and reported)."},
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when available) | cpu | cuda | cuda:N."}
    )


@dataclass
class PoolArguments:
    """The external molecules that are scored or selected (run_influence/run_selection)."""

    external_file: str = field(
        metadata={"help": "External molecules: csv/tsv/json/jsonl/parquet with SMILES and (usually) labels."}
    )
    external_smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column of the pool (default: found by name)."}
    )
    external_label_column: str | None = field(
        default=None,
        metadata={
            "help": "Label column of the pool (default: found by name). Influence needs labels; a pool "
            "without them can still be ranked by other strategies, but not added to training."
        },
    )
    keep_heldout_overlap: bool = field(
        default=False,
        metadata={
            "help": "Keep pool molecules that sit in the run's validation/test split, marked (default: report "
            "and exclude them; choosing them leaks evaluation data)."
        },
    )
    external_strict_smiles: bool = field(
        default=False,
        metadata={
            "help": "Error on an invalid SMILES in the pool (default: skip it with a count; every molecule "
            "keeps its row in the file as pool id)."
        },
    )


@dataclass
class OutputArguments:
    """Where a scoring or selection script writes, and how loudly (run_influence/run_selection)."""

    output_dir: str = field(metadata={"help": "Folder for the result files."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Redo a run whose output_dir already holds a finished result."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error."})
