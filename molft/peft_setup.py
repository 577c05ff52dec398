"""Parameter-efficient fine-tuning set-up: LoRA and IA3 through peft, BitFit by freezing, and accounting.

The regression head (`classifier.*`) is always trained and saved (`modules_to_save`), and adapters never
target it. BitFit has no peft implementation, so it is done by freezing every non-bias parameter; its
checkpoints are ordinary full models.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from molft.checkpoints import check_weights
from molft.files import BASE_MODEL_DIR
from molft.io import write_json

logger = logging.getLogger(__name__)

PEFT_METHODS = ("none", "lora", "ia3", "bitfit")
HEAD_PREFIX = "classifier"
# Encoder attention and FFN projections of every layer (regexes match the full module name, so the head's
# `classifier.dense` can never be hit by accident).
_LAYER = r".*encoder\.layer\.\d+\."
DEFAULT_LORA_TARGETS = (
    _LAYER
    + r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$"
)
# IA3 (Liu et al. 2022) rescales keys, values and the FFN's inner activation; the last is the input of the
# second FFN linear (`output.dense`), which peft scales when it is listed as a feed-forward module.
DEFAULT_IA3_TARGETS = _LAYER + r"(attention\.self\.(key|value)|output\.dense)$"
DEFAULT_IA3_FEEDFORWARD = _LAYER + r"output\.dense$"


@dataclass
class PeftOptions:
    """The fine-tuning method and its settings; also the PEFT argument group of the training scripts."""

    peft: str = field(
        default="none", metadata={"help": "Fine-tuning method: none (full) | lora | ia3 | bitfit."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "LoRA targets: a regex over module names or a comma list of suffixes. Default: every "
            "encoder layer's query/key/value, attention output and both FFN projections (never the head)."
        },
    )
    ia3_target_modules: str | None = field(
        default=None, metadata={"help": "IA3 targets (regex or comma list). Default: key, value, FFN output."}
    )
    ia3_feedforward_modules: str | None = field(
        default=None,
        metadata={"help": "IA3 feed-forward modules (input scaling). Default: FFN output dense."},
    )
    ia3_init_value: float = field(default=1.0, metadata={"help": "Initial value of the IA3 scaling vectors."})


def _as_targets(value: str | None, default: str) -> str | list[str]:
    """A regex string, or a comma-separated list of module-name suffixes."""
    if not value:
        return default
    if "," in value:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def apply_peft(model: nn.Module, options: PeftOptions) -> nn.Module:
    """Wrap or freeze `model` for the chosen method; the head stays trainable in every case."""
    method = options.peft.lower()
    if method not in PEFT_METHODS:
        raise ValueError(f"--peft must be one of {PEFT_METHODS}, got {options.peft!r}.")
    if method == "none":
        return model
    if method == "bitfit":
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith(".bias") or name.startswith(HEAD_PREFIX + ".")
        return model

    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    if method == "lora":
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=_as_targets(options.lora_target_modules, DEFAULT_LORA_TARGETS),
            modules_to_save=[HEAD_PREFIX],
        )
    else:
        config = IA3Config(
            task_type=TaskType.SEQ_CLS,
            target_modules=_as_targets(options.ia3_target_modules, DEFAULT_IA3_TARGETS),
            feedforward_modules=_as_targets(options.ia3_feedforward_modules, DEFAULT_IA3_FEEDFORWARD),
            modules_to_save=[HEAD_PREFIX],
        )
    peft_model = get_peft_model(model, config)
    # peft's sequence-classification wrapper appends its own head names to ours: keep each name once
    adapter_config = peft_model.peft_config["default"]
    adapter_config.modules_to_save = list(dict.fromkeys(adapter_config.modules_to_save))
    if method == "ia3" and options.ia3_init_value != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "ia3_l" in name:
                    param.fill_(options.ia3_init_value)
    return peft_model


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts, and the trainable share, of the model a user gets.

    peft keeps a frozen copy of the head (`original_module`) next to the trained one (`modules_to_save`);
    that copy is neither trained nor used, so it is not counted.
    """
    trainable = total = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": trainable / total,
    }


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_regression_checkpoint(
    path: str | Path, base_model: str | None = None, trainable: bool = False, **model_kwargs
) -> nn.Module:
    """Load a full `MolformerForRegression` checkpoint, or a peft adapter on top of its base model.

    An adapter folder names its base in `adapter_config.json`; `base_model` overrides that path (e.g. when
    the run directory moved). The adapter folder's own config.json (head, pooling, target statistics) wins
    over the base's. Errors say which piece is missing, or which weight file is truncated or corrupt.
    `trainable`: an adapter's parameters (and its head copy) are loaded trainable, to train it further.
    """
    import modeling_molformer_reg  # noqa: F401  registers the Auto classes
    from modeling_molformer_reg import MolformerForRegression

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist.")
    if not is_adapter_checkpoint(path):
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is neither a model checkpoint (config.json) nor a peft adapter.")
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "molformer":
            raise ValueError(
                f"{path} holds a {config.get('model_type')!r} model, not a MoLFormer regression model."
            )
        check_weights(path)
        return MolformerForRegression.from_pretrained(path, **model_kwargs)

    from peft import PeftModel

    from configuration_molformer import MolformerConfig

    adapter = json.loads((path / "adapter_config.json").read_text())
    base = base_model or _find_base_model(path, adapter.get("base_model_name_or_path"))
    if Path(base).exists() and not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"Base model {base} of adapter {path} has no config.json; {_base_advice(path)}"
        )
    check_weights(path)
    check_weights(base)
    # run_regression saves the run's config (head, pooling, target statistics) next to the adapter
    if (path / "config.json").is_file():
        model_kwargs.setdefault("config", MolformerConfig.from_pretrained(path))
    model = MolformerForRegression.from_pretrained(base, **model_kwargs)
    return PeftModel.from_pretrained(model, path, is_trainable=trainable)


def _find_base_model(adapter_dir: Path, recorded: str | None) -> str:
    """The adapter's base: the recorded path or Hub id, else a `base_model` folder of the run it belongs to.

    run_regression.py keeps the base of a model trained from scratch in `<output_dir>/base_model`, so a run
    directory that was moved (or a checkpoint-N inside it) still finds it. A relative local path is
    relative to the adapter folder (see `publish_base_reference`), else to the working directory.
    """
    if recorded and _looks_like_local_path(recorded) and not Path(recorded).is_absolute():
        if (adapter_dir / recorded / "config.json").is_file():
            return str(adapter_dir / recorded)
    if recorded and (Path(recorded).exists() or not _looks_like_local_path(recorded)):
        return recorded
    for candidate in (adapter_dir / BASE_MODEL_DIR, adapter_dir.parent / BASE_MODEL_DIR):
        if (candidate / "config.json").is_file():
            if recorded:
                logger.info(
                    "Base model %s of adapter %s not found; using %s.", recorded, adapter_dir, candidate
                )
            return str(candidate)
    if not recorded:
        raise ValueError(f"Adapter {adapter_dir} does not name its base model; {_base_advice(adapter_dir)}")
    raise FileNotFoundError(
        f"Base model {recorded!r} of adapter {adapter_dir} was not found (nor a {BASE_MODEL_DIR} folder next "
        f"to it); restore that folder, or {_base_advice(adapter_dir)}"
    )


def publish_base_reference(model: nn.Module, adapter_dir: str | Path) -> str | None:
    """Name a trained adapter's base without a local absolute path: a Hub id as is, a local folder relative
    to the adapter folder ("./base_model", "../mlm_run"), in the model's peft config and in the saved
    adapter_config.json. Returns the name recorded (None for a model without adapter)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or not config.base_model_name_or_path:
        return None
    base, adapter_dir = config.base_model_name_or_path, Path(adapter_dir)
    if Path(base).exists():
        relative = os.path.relpath(Path(base).resolve(), adapter_dir.resolve())
        config.base_model_name_or_path = relative if relative.startswith("..") else f"./{relative}"
    saved = adapter_dir / "adapter_config.json"
    if saved.is_file():
        record = json.loads(saved.read_text())
        record["base_model_name_or_path"] = config.base_model_name_or_path
        record["modules_to_save"] = list(dict.fromkeys(record.get("modules_to_save") or [])) or None
        write_json(saved, record)
    return config.base_model_name_or_path


def _base_advice(adapter_dir: Path) -> str:
    """How to point an adapter at its base, in terms every script accepts (run_regression.py has no flag)."""
    return (
        f"set base_model_name_or_path in {adapter_dir / 'adapter_config.json'} to the base model's folder or "
        "Hub id (run_influence.py and run_selection.py also take --base_model)."
    )


def _looks_like_local_path(name: str) -> bool:
    # a Hub id is "name" or "owner/name"; anything absolute, relative or deeper is a path
    return name.startswith((".", "/", "~")) or name.count("/") > 1
