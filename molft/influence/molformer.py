"""The MoLFormer regression model as an influence task: everything model-specific, behind one seam.

The estimators (`molft.influence`) know a model only through an `InfluenceProblem`: a module, a scope of
parameters, a forward and a per-sample loss. This module builds that problem for a fine-tuned
run_regression.py model (full or PEFT adapter), as kronfluence's `Task` separates the user's model from
its algorithms: the checkpoint check, the training loss in normalised target units, the regression head
on pooled embeddings, the Gauss-Newton linearisation, the layout layerwise per-sample gradients read
the model in, the embeddings and batches, and TracIn checkpoints.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, jvp
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from molft.arguments import PoolArguments
from molft.cli import parse_list
from molft.files import RUN_CONFIG_FILE, TRAINER_STATE_FILE
from molft.influence.api import HESSIAN_ESTIMATORS
from molft.influence.features import feature_batch_size, feature_batches
from molft.influence.per_sample import LayerwiseProblem, LayoutFactory, PackedRows
from molft.influence.problem import BoundForward, InfluenceProblem, default_forward, squared_error_loss
from molft.influence.scope import select_parameters
from molft.model_utils import embed_batches, molformer_config, smiles_batches, unwrap_peft
from molft.peft_setup import is_adapter_checkpoint, load_regression_checkpoint
from molft.selection import load_pool

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]
ForwardFn = Callable[[nn.Module, Batch], torch.Tensor]

REGRESSION_ARCHITECTURE = "MolformerForRegression"
HEAD_ATTRIBUTE = "classifier"
PEFT_FROZEN_COPY = ".original_module."
CURVATURES = ("gauss_newton", "hessian")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """The precision a `--dtype` option names (float32 | float64)."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be float32 or float64, got {name!r}.")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------------
# The run's checkpoint and data
# ----------------------------------------------------------------------------------------------------------


def check_regression_checkpoint(path: str | Path) -> str:
    """'full' or 'adapter'; anything without a trained regression head (e.g. an MLM checkpoint) is an error.

    Loading an MLM checkpoint as a regression model would silently attach a random head, and every score
    would describe that random head.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model_name_or_path {path} is not a directory (a run_regression.py output)."
        )
    if is_adapter_checkpoint(path):
        return "adapter"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{path} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json)."
        )
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    head_keys = [key for key in checkpoint_weight_names(path) if key.startswith(f"{HEAD_ATTRIBUTE}.")]
    if REGRESSION_ARCHITECTURE not in architectures or not head_keys:
        raise ValueError(
            f"{path} is not a fine-tuned regression checkpoint: architectures {architectures}, "
            f"{len(head_keys)} regression-head ({HEAD_ATTRIBUTE}.*) weights. Influence needs the trained head "
            "of a run_regression.py output; an MLM checkpoint (run_mlm.py) must be fine-tuned first."
        )
    return "full"


def checkpoint_weight_names(path: Path) -> list[str]:
    """Tensor names in the checkpoint's safetensors file(s), without loading them."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return list(handle.keys())
    raise ValueError(f"{path} has no model.safetensors weights.")


def load_candidate_pool(pool_args: PoolArguments, standardize: str | None = None) -> pd.DataFrame:
    """The external molecules through run_selection's loader, so scores carry its pool ids (file rows).

    Invalid SMILES are skipped with a count unless --external_strict_smiles; `standardize` is the run's.
    """
    try:
        return load_pool(
            pool_args.external_file,
            pool_args.external_smiles_column,
            pool_args.external_label_column,
            strict=pool_args.external_strict_smiles,
            standardize=standardize,
        )
    except ValueError as err:
        raise ValueError(
            f"--external_file {pool_args.external_file}: {err} (influence needs each molecule's SMILES and "
            "label: the candidate's gradient is that of its own loss)."
        ) from err


def warn_about_extra_training_data(model_path: str) -> None:
    """A run trained with --extra_train_file saw molecules the split does not hold: say so."""
    run_config = Path(model_path) / RUN_CONFIG_FILE
    if not run_config.is_file():
        return
    extra = json.loads(run_config.read_text()).get("data", {}).get("extra_train_file")
    if extra:
        logger.warning(
            "The run also trained on --extra_train_file %s; the Hessian here uses the split's training "
            "molecules only.",
            extra,
        )


def training_subset(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of `limit` training molecules (in their order), or the whole frame."""
    if limit is None or limit >= len(frame):
        return frame
    rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=limit, replace=False))
    logger.info("Hessian/Fisher over %d of %d training molecules (--max_train_samples).", limit, len(frame))
    return frame.iloc[rows].reset_index(drop=True)


def frame_batches(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int
) -> list:
    """Padded, labelled batches in frame order."""
    return smiles_batches(
        frame["canonical_smiles"].tolist(),
        tokenizer,
        batch_size,
        max_length,
        labels=frame["label"].to_numpy(),
    )


# ----------------------------------------------------------------------------------------------------------
# The influence problem
# ----------------------------------------------------------------------------------------------------------


def influence_loss(config: Any) -> tuple[LossFn, str]:
    """The per-sample loss the model was trained on, in normalised target units, with the library's 1/2.

    Training minimises mean (normalised prediction - normalised label)^2, so 0.5 x that error keeps the
    Hessian's scale relative to --damping what it was in training: (logits - label) / target_std.
    """
    std = float(config.target_std)
    kind = getattr(config, "regression_loss", "mse")
    if kind == "huber":
        delta = float(config.huber_delta)

        def huber(predictions: torch.Tensor, batch: Batch) -> torch.Tensor:
            residual = (predictions.reshape(predictions.shape[0], -1) - batch["labels"].reshape(-1, 1)) / std
            zeros = torch.zeros_like(residual)
            return nn.functional.huber_loss(residual, zeros, reduction="none", delta=delta).sum(dim=-1)

        return huber, f"huber(delta={delta}) on (prediction - label) / {std:.6g}"
    if kind == "l1":
        logger.warning(
            "The model was trained with an L1 loss, whose Hessian is zero almost everywhere; influence uses "
            "0.5 x squared error instead (same residuals)."
        )

    def squared_error(predictions: torch.Tensor, batch: Batch) -> torch.Tensor:
        return squared_error_loss(predictions / std, {"labels": batch["labels"] / std})

    return squared_error, f"0.5 * ((prediction - label) / {std:.6g})^2"


class HeadOnFeatures(nn.Module):
    """The model's regression head on precomputed pooled embeddings, with its label-unit output.

    For the head scope the encoder is fixed, so differentiating this small module is exactly
    differentiating the whole model, without running the encoder for every gradient and HVP.
    """

    def __init__(self, head: nn.Module, target_mean: float, target_std: float) -> None:
        super().__init__()
        self.head = head
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) * self.target_std + self.target_mean


@dataclass
class ProblemSetup:
    """The influence problem plus the batches each role feeds it and how its names map to the model's."""

    problem: InfluenceProblem
    batches: dict[str, list[Batch]]
    model_names: list[str]  # the scope's parameter names in the model, in problem order
    on_features: bool
    features: dict[str, np.ndarray] | None = None


def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the regression head; for PEFT the wrapper that runs the trained copy."""
    head = getattr(unwrap_peft(model), HEAD_ATTRIBUTE, None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no regression head ({HEAD_ATTRIBUTE!r}).")
    for name, module in model.named_modules():
        if module is head:
            return name, head
    raise ValueError("The regression head is not a submodule of the model.")


def scope_parameters(model: nn.Module, scope: str, last_k: int) -> dict[str, nn.Parameter]:
    """The scope's parameters, without PEFT's frozen, unused copy of the head."""
    params = select_parameters(model, scope, last_k=last_k)
    params = {name: param for name, param in params.items() if PEFT_FROZEN_COPY not in name}
    if not params:
        raise ValueError(f"--scope {scope} selects no parameters of this model.")
    return params


def build_problem(
    model: nn.Module,
    loss_fn: LossFn,
    token_batches: dict[str, list[Batch]],
    *,
    scope: str,
    last_k: int,
    head_on_features: bool,
    curvature: str,
    estimator: str,
    grad_method: str,
    vmap_chunk_size: int | None,
    batch_size: int,
    quiet: bool,
) -> ProblemSetup:
    """The whole model over the chosen scope, or, for the head scope, the head alone on pooled embeddings."""
    problem_kwargs = {"loss_fn": loss_fn, "grad_method": grad_method, "vmap_chunk_size": vmap_chunk_size}
    if scope == "head" and head_on_features:
        prefix, head = head_module(model)
        config = unwrap_peft(model).config
        module = HeadOnFeatures(head, config.target_mean, config.target_std)
        params = {name: param for name, param in module.named_parameters() if PEFT_FROZEN_COPY not in name}
        features = embed_all(model, token_batches, quiet)
        dtype = next(iter(params.values())).dtype
        size = feature_batch_size(batch_size, sum(param.numel() for param in params.values()))
        batches = {
            role: feature_batches(features[role], labels_of(token_batches[role]), size, dtype)
            for role in token_batches
        }
        model_names = [prefix + name.removeprefix("head") for name in params]
        forward_fn = curvature_forward(curvature, estimator, default_forward, params)
        problem = LayerwiseProblem(
            module, params, forward_fn=forward_fn, **plain_forward_of(forward_fn), **problem_kwargs
        )
        return ProblemSetup(problem, batches, model_names, on_features=True, features=features)
    params = scope_parameters(model, scope, last_k)
    forward_fn = curvature_forward(curvature, estimator, default_forward, params)
    problem = LayerwiseProblem(
        model, params, forward_fn=forward_fn, layout=layerwise_layout(model), **plain_forward_of(forward_fn),
        **problem_kwargs,
    )  # fmt: skip
    return ProblemSetup(problem, dict(token_batches), list(params), on_features=False)


def plain_forward_of(forward_fn: ForwardFn) -> dict[str, ForwardFn]:
    """LayerwiseProblem's plain_forward for a Gauss-Newton linearisation (same gradients at its anchor)."""
    return {"plain_forward": forward_fn.forward_fn} if isinstance(forward_fn, LinearisedForward) else {}


def layerwise_layout(model: nn.Module) -> LayoutFactory:
    """LayerwiseProblem's layout for MoLFormer: `molformer_layout` of the model for each batch."""
    return lambda batch: molformer_layout(model, batch)


@contextmanager
def molformer_layout(model: nn.Module, batch: Batch) -> Iterator[PackedRows | None]:
    """MoLFormer on the real tokens alone, with q/k/v through their own modules, while gradients are read.

    Layerwise per-sample gradients read each module call's inputs: `fused_qkv` multiplies by the three
    weights without calling their modules, so it is off; `padding_free` skips the padding's share of every
    projection (its output is the same), so it is on, and the packed rows' positions are yielded so each
    token's contribution goes to its molecule. A batch without padding, or with as many real tokens as
    molecules (packed rows could not be told from per-molecule ones), runs padded (yields None).
    """
    config = molformer_config(model)
    if config is None:
        yield None
        return
    mask = batch.get("attention_mask")
    packed = None
    if mask is not None and mask.dim() == 2:
        # the model's own packing (modeling_molformer.PackedTokens): real tokens in row-major order
        index = mask.reshape(-1).nonzero().squeeze(1)
        if index.numel() not in (mask.numel(), mask.shape[0]):
            packed = PackedRows(index, *mask.shape)
    saved = (getattr(config, "padding_free", False), getattr(config, "fused_qkv", False))
    config.padding_free, config.fused_qkv = packed is not None, False
    try:
        yield packed
    finally:
        config.padding_free, config.fused_qkv = saved


def curvature_forward(
    curvature: str, estimator: str, forward_fn: ForwardFn, params: dict[str, nn.Parameter]
) -> ForwardFn:
    """The linearised forward for the Gauss-Newton curvature of the Hessian-based estimators, else as is."""
    if curvature == "gauss_newton" and estimator in HESSIAN_ESTIMATORS:
        return LinearisedForward(forward_fn, params)
    return forward_fn


def problem_for_estimator(problem: InfluenceProblem, estimator: str, curvature: str) -> InfluenceProblem:
    """`problem` with the forward `estimator` needs, when one problem serves several (--validate lds).

    exact/cg/lissa under Gauss-Newton curvature need the linearised forward; the others need the model's own
    (TracIn's gradients at its checkpoints, kronfluence's hooks), which a linearisation only matches at the
    trained parameters.
    """
    linearised = isinstance(problem.forward_fn, LinearisedForward)
    if linearised == (curvature == "gauss_newton" and estimator in HESSIAN_ESTIMATORS):
        return problem
    if not isinstance(problem, LayerwiseProblem):
        raise TypeError(f"cannot change the forward of a {type(problem).__name__}; build one for {estimator}")
    if linearised:
        return problem.with_forward(problem.forward_fn.forward_fn, None)
    anchor = dict(zip(problem.names, problem.unflatten(problem.theta).values(), strict=True))
    return problem.with_forward(LinearisedForward(problem.forward_fn, anchor), problem.forward_fn)


class LinearisedForward:
    """forward_fn of the model linearised at its trained parameters: f(theta0) + J (theta - theta0).

    At theta0 values and gradients equal the model's, while the Hessian of a convex loss of this
    forward is exactly the generalised Gauss-Newton matrix J^T H_loss J (Martens 2010): positive
    semi-definite, so exact/cg/lissa see a well-posed problem even when the model is not at a minimum.
    """

    def __init__(self, forward_fn: ForwardFn, params: Mapping[str, torch.Tensor]) -> None:
        self.forward_fn = forward_fn
        self.anchor = {name: param.detach().clone() for name, param in params.items()}

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # Inside the library's functional_call the scope attributes hold the current theta.
        delta = {name: _attribute(model, name) - value for name, value in self.anchor.items()}
        bound = BoundForward(model, self.forward_fn)

        def at(params: dict[str, torch.Tensor]) -> torch.Tensor:
            named = {f"model.{name}": value for name, value in params.items()}
            return functional_call(bound, named, (batch,))

        value, tangent = jvp(at, (self.anchor,), (delta,))
        return value + tangent


def _attribute(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)


def embed_all(model: nn.Module, token_batches: dict[str, list[Batch]], quiet: bool) -> dict[str, np.ndarray]:
    """Pooled embeddings (what the head sees) of every role's molecules, in eval mode."""
    return {
        role: embed_batches(model, tqdm(batches, desc=f"Embedding {role}", disable=quiet, leave=False))
        for role, batches in token_batches.items()
    }


def labels_of(batches: Sequence[Batch]) -> np.ndarray:
    """The labels of token batches, in order, as float64."""
    return torch.cat([batch["labels"].reshape(-1) for batch in batches]).double().cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# TracIn checkpoints
# ----------------------------------------------------------------------------------------------------------


def tracin_checkpoints(
    setup: ProblemSetup,
    spec: str,
    learning_rates: str | None,
    run_dir: str | Path,
    base_model: str | None,
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """(scope state, learning rate) of each checkpoint, named as in the problem.

    `spec`: comma-separated checkpoint folders, or 'auto' (the run's checkpoint-* folders, in step order);
    `learning_rates`: comma-separated, one per checkpoint (default: each one's last logged rate).
    """
    run_dir = Path(run_dir)
    if spec.strip().lower() == "auto":
        folders = sorted(
            (path for path in run_dir.glob("checkpoint-*") if path.is_dir()),
            key=lambda path: (
                int(path.name.rsplit("-", 1)[-1]) if path.name.rsplit("-", 1)[-1].isdigit() else 0
            ),
        )
        if not folders:
            raise ValueError(f"--tracin_checkpoints auto: {run_dir} has no checkpoint-* folders.")
    else:
        folders = [Path(part) for part in parse_list(spec)]
    rates = [float(value) for value in parse_list(learning_rates or "")]
    if rates and len(rates) != len(folders):
        raise ValueError(f"--tracin_learning_rates has {len(rates)} values for {len(folders)} checkpoints.")
    checkpoints = []
    for position, folder in enumerate(folders):
        rate = rates[position] if rates else logged_learning_rate(folder)
        model = load_regression_checkpoint(folder, base_model)
        named = dict(model.named_parameters())
        missing = [name for name in setup.model_names if name not in named]
        if missing:
            raise ValueError(f"TracIn checkpoint {folder} lacks scope parameters, e.g. {missing[:3]}.")
        state = {
            problem_name: named[model_name].detach()
            for problem_name, model_name in zip(setup.problem.names, setup.model_names, strict=True)
        }
        checkpoints.append((state, rate))
        logger.info("TracIn checkpoint %s with learning rate %.3g", folder, rate)
    return checkpoints


def logged_learning_rate(folder: Path) -> float:
    """The last learning rate a Trainer checkpoint logged (its trainer_state.json)."""
    state_file = folder / TRAINER_STATE_FILE
    history = json.loads(state_file.read_text()).get("log_history", []) if state_file.is_file() else []
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    if not rates:
        raise ValueError(
            f"TracIn checkpoint {folder} has no logged learning rate (trainer_state.json); give "
            "--tracin_learning_rates."
        )
    return float(rates[-1])
