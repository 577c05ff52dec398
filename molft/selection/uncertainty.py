"""MC-dropout predictions: the model's spread over dropout masks, which the uncertainty strategy ranks by."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch


def mc_dropout_predictions(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    n_passes: int,
    seed: int,
    forward_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> np.ndarray:
    """Predictions [n_passes, N] with dropout active and everything else as in evaluation.

    The model is put in train mode so that every dropout (also functional dropout guarded by
    `self.training`) is on, normalisation layers are kept in eval mode, and MoLFormer's random feature
    maps are pinned with `molft.model_utils.fixed_feature_maps`. The torch RNG is seeded
    inside a forked RNG state, so the caller's random stream is untouched. `batches` must yield the same
    molecules in the same order on every pass (no shuffling); an iterator is materialised once.
    """
    # torch only once MC dropout runs: importing molft.selection stays light
    import torch

    from molft.influence import default_forward
    from molft.model_utils import fixed_feature_maps

    stateful_norms = (
        torch.nn.BatchNorm1d,
        torch.nn.BatchNorm2d,
        torch.nn.BatchNorm3d,
        torch.nn.SyncBatchNorm,
        torch.nn.InstanceNorm1d,
        torch.nn.InstanceNorm2d,
        torch.nn.InstanceNorm3d,
    )
    if n_passes < 1:
        raise ValueError(f"n_passes must be >= 1, got {n_passes}.")
    forward = forward_fn or default_forward
    if isinstance(batches, Iterator):
        batches = list(batches)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = {module: module.training for module in model.modules()}
    passes = []
    try:
        model.train()
        for module in model.modules():
            if isinstance(module, stateful_norms):
                module.eval()
        devices = (
            [torch.cuda.current_device() if device.index is None else device.index]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=devices), torch.no_grad(), fixed_feature_maps(model):
            torch.manual_seed(seed)
            for _ in range(n_passes):
                outputs = []
                for batch in batches:
                    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    prediction = forward(model, moved)
                    if prediction.ndim == 2 and prediction.shape[1] == 1:
                        prediction = prediction[:, 0]
                    if prediction.ndim != 1:
                        raise ValueError(
                            "forward_fn must return one prediction per molecule, "
                            f"got shape {tuple(prediction.shape)}."
                        )
                    outputs.append(prediction.detach().to("cpu", torch.float64).numpy())
                passes.append(np.concatenate(outputs) if outputs else np.empty(0))
    finally:
        for module, was_training in flags.items():
            module.train(was_training)
    if len({len(p) for p in passes}) != 1:
        raise ValueError(
            "batches yielded a different number of molecules on different passes; pass a re-iterable."
        )
    return np.stack(passes)


def mc_predictions(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], n_passes: int, seed: int, quiet: bool
) -> np.ndarray:
    """`mc_dropout_predictions` [n_passes, N] with a progress bar over all passes."""
    from molft.influence import default_forward

    with tqdm(total=n_passes * len(batches), desc="MC dropout", unit="batch", disable=quiet) as bar:

        def forward(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            bar.update(1)
            return default_forward(model, batch)

        return mc_dropout_predictions(model, batches, n_passes, seed, forward_fn=forward)
