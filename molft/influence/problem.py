"""Per-sample gradients and Hessian-vector products of a model's loss over a chosen parameter scope.

Everything is expressed as a function of one flat parameter vector `theta` (the scope parameters
concatenated in name order) through `torch.func.functional_call`, so the same code serves the MoLFormer
regressor, a PEFT-wrapped model and the toy models in the tests, and so checkpoints (TracIn) are just other
values of `theta`. Parameters outside the scope are held fixed at their current values.

Loss convention: the per-sample loss is `loss_fn(predictions, batch) -> Tensor[B]`; the training objective
whose Hessian the estimators invert is the MEAN of that loss over all training samples. The default
`squared_error_loss` is 0.5 * (prediction - label)^2: the 1/2 makes the Hessian with respect to the
prediction the identity, so the Gauss-Newton matrix, the (true) Fisher of a unit-variance Gaussian and
the Hessian of a linear model all coincide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
Batches = Iterable[Batch]
# what every estimator's score() returns: the scores and a record of how they were computed
ScoresAndInfo = tuple[torch.Tensor, dict[str, Any]]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]
ForwardFn = Callable[[nn.Module, Batch], torch.Tensor]

LABELS_KEY = "labels"
GRAD_METHODS = ("auto", "vmap", "loop")
HVP_MODES = ("auto", "forward_over_reverse", "reverse_over_reverse")


class NonFiniteGradientError(ValueError):
    """A per-sample gradient or Hessian-vector product contains NaN/inf: scores would be meaningless."""


def default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """`model(**inputs).logits` with the labels left out, so the loss stays under our control."""
    inputs = {key: value for key, value in batch.items() if key != LABELS_KEY}
    outputs = model(**inputs)
    return outputs.logits if hasattr(outputs, "logits") else outputs


def additive_mask_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Like `default_forward`, but hands the model a ready 4-D additive attention mask.

    Hugging Face models (transformers >= 5) inspect the 2-D padding mask with Python control flow
    (`if mask.all(): ...`), which `vmap` cannot trace; a prepared [B, 1, 1, T] mask is used as-is, so
    per-sample gradients stay vectorised. Padded positions get the dtype's most negative value.
    """
    inputs = {key: value for key, value in batch.items() if key != LABELS_KEY}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        keep = mask[:, None, None, :].to(dtype)
        inputs["attention_mask"] = (1.0 - keep) * torch.finfo(dtype).min
    outputs = model(**inputs)
    return outputs.logits if hasattr(outputs, "logits") else outputs


def squared_error_loss(predictions: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-sample 0.5 * ||prediction - label||^2 (summed over target dimensions), shape [B]."""
    if LABELS_KEY not in batch:
        raise KeyError(f"batch has no {LABELS_KEY!r} entry (keys: {sorted(batch)})")
    labels = batch[LABELS_KEY]
    num_samples = predictions.shape[0]
    predictions = predictions.reshape(num_samples, -1)
    labels = labels.reshape(labels.shape[0], -1).to(predictions.dtype)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions of shape {tuple(predictions.shape)} do not match labels of shape {tuple(labels.shape)}"
        )
    return 0.5 * (predictions - labels).pow(2).sum(dim=-1)


def batch_size(batch: Batch) -> int:
    """Number of samples in a dict batch; every tensor must share the leading (batch) dimension."""
    sizes = {
        key: value.shape[0] for key, value in batch.items() if isinstance(value, torch.Tensor) and value.dim()
    }
    if not sizes:
        raise ValueError(f"batch has no tensors with a batch dimension (keys: {sorted(batch)})")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors disagree on the batch dimension: {sizes}")
    return next(iter(sizes.values()))


def slice_batch(batch: Batch, index: slice | torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows `index` of every tensor in the batch (batch dimension kept)."""
    return {key: value[index] for key, value in batch.items()}


def reusable_batches(batches: Iterable[Batch]) -> Iterable[Batch]:
    """Estimators pass over the training data many times: turn one-shot iterators into a list."""
    if iter(batches) is batches:
        return list(batches)
    return batches


class BoundForward(nn.Module):
    """Binds `forward_fn` to the model so `functional_call` can swap the scope parameters in."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_fn(self.model, batch)


class InfluenceProblem:
    """A model, a parameter scope and a per-sample loss: the object every estimator works on.

    All derivatives are taken with torch.func transforms under `torch.no_grad()`, so frozen parameters
    that still have requires_grad=True never build an autograd graph, and with PyTorch's math attention
    kernel (fused kernels lack vmap rules, forward-mode AD and double backward).

    Mean-query scoring needs no per-sample gradients: the query gradient is one backward per batch, HVPs
    and candidate products (`grad_dot`) are forward-mode derivatives vectorised over directions, never over
    samples. Per-sample gradients (vmap over the data) serve per-query scores, DataInf and the reference
    loop; Hugging Face models need `forward_fn=additive_mask_forward` for that vmap to work.

    The model is put in eval mode (dropout would make gradients random and breaks `vmap`). The scope
    parameters are read once, at construction, into `theta`. To match a model whose own loss is
    `nn.MSELoss` (no 1/2), pass `loss_fn=lambda p, b: 2 * squared_error_loss(p, b)`.

    grad_method: "vmap" (one vectorised backward per batch), "loop" (one backward per sample; the
        reference implementation) or "auto" (vmap, falling back to loop with a logged warning when the
        model cannot be vmapped, e.g. because of data-dependent control flow).
    hvp_mode: "forward_over_reverse" (jvp of grad; cheapest), "reverse_over_reverse" (double backward;
        for models with operations lacking forward-mode AD, e.g. fused attention kernels) or "auto"
        (forward-over-reverse, switching to double backward with a logged warning when it fails).
    vmap_chunk_size: samples per vectorised chunk (caps memory on large models); None = whole batch.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        loss_fn: LossFn = squared_error_loss,
        forward_fn: ForwardFn = default_forward,
        grad_method: str = "auto",
        hvp_mode: str = "auto",
        vmap_chunk_size: int | None = None,
    ) -> None:
        if not params:
            raise ValueError("the parameter scope is empty: no parameter would receive a gradient")
        if grad_method not in GRAD_METHODS:
            raise ValueError(f"unknown grad_method {grad_method!r}; expected one of {GRAD_METHODS}")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; expected one of {HVP_MODES}")
        model_params = dict(model.named_parameters(remove_duplicate=False))
        unknown = [name for name in params if name not in model_params]
        if unknown:
            raise ValueError(f"scope names not found among the model's parameters: {unknown[:5]}")
        dtypes = {p.dtype for p in params.values()}
        devices = {p.device for p in params.values()}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"scope parameters must share one dtype and device, got {dtypes} and {devices}")

        model.eval()
        self.model = model
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn
        self.grad_method = grad_method
        self.hvp_mode = hvp_mode
        self.vmap_chunk_size = vmap_chunk_size
        self.names: tuple[str, ...] = tuple(params)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in params.values())
        self.numels: tuple[int, ...] = tuple(p.numel() for p in params.values())
        self.theta: torch.Tensor = torch.cat([p.detach().reshape(-1) for p in params.values()]).clone()
        self._module = BoundForward(model, forward_fn)
        self._forward_ad_ok = True
        logger.info("influence scope: %d tensors, %d parameters", len(self.names), self.num_params)

    # ----------------------------------------------------------------------------------------- layout
    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a [P] vector into the scope's named tensors (views)."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"expected a vector of {self.num_params} entries, got shape {tuple(flat.shape)}")
        pieces = torch.split(flat, self.numels)
        return {
            name: piece.view(shape)
            for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors (e.g. a checkpoint's state dict) into the scope's [P] layout."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise KeyError(f"state is missing {len(missing)} scope parameters, e.g. {missing[:3]}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = tensors[name]
            if value.shape != shape:
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
            parts.append(value.detach().reshape(-1).to(device=self.device, dtype=self.dtype))
        return torch.cat(parts)

    def block_slices(self) -> list[tuple[str, slice]]:
        """Position of each scope tensor in the flat vector (DataInf treats each as one layer)."""
        slices, start = [], 0
        for name, numel in zip(self.names, self.numels, strict=True):
            slices.append((name, slice(start, start + numel)))
            start += numel
        return slices

    def to_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {
            key: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }

    # ----------------------------------------------------------------------------------- functionals
    def predict(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Model predictions with the scope parameters replaced by `theta`."""
        params = {f"model.{name}": value for name, value in self.unflatten(theta).items()}
        return functional_call(self._module, params, (batch,))

    def _losses(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        losses = self.loss_fn(self.predict(theta, batch), batch)
        if losses.dim() != 1 or losses.shape[0] != batch_size(batch):
            raise ValueError(
                f"loss_fn must return one loss per sample (shape [{batch_size(batch)}]), got {tuple(losses.shape)}"
            )
        return losses

    def _summed_loss(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._losses(theta, batch).sum()

    def _single_sample_loss(self, theta: torch.Tensor, sample: Batch) -> torch.Tensor:
        # Under vmap each sample has lost its batch dimension: restore it for the model.
        return self._summed_loss(theta, {key: value.unsqueeze(0) for key, value in sample.items()})

    def _theta(self, theta: torch.Tensor | None) -> torch.Tensor:
        return self.theta if theta is None else theta.detach().to(device=self.device, dtype=self.dtype)

    # ----------------------------------------------------------------------------- per-sample grads
    def per_sample_grads(self, batch: Batch, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Gradients of each sample's loss w.r.t. the scope, shape [B, P]; raises on NaN/inf."""
        batch = self.to_device(batch)
        if self.grad_method == "loop":
            grads = self._looped_grads(batch, self._theta(theta))
        else:
            try:
                grads = self._vmapped_grads(batch, self._theta(theta))
            except (RuntimeError, NotImplementedError) as error:
                if self.grad_method == "vmap":
                    raise
                logger.warning(
                    "vmap over the model failed (%s); falling back to one backward pass per sample", error
                )
                self.grad_method = "loop"
                grads = self._looped_grads(batch, self._theta(theta))
        _raise_if_non_finite(grads, "per-sample gradient")
        return grads

    def per_sample_grads_looped(self, batch: Batch, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Reference implementation: one backward pass per sample."""
        grads = self._looped_grads(self.to_device(batch), self._theta(theta))
        _raise_if_non_finite(grads, "per-sample gradient")
        return grads

    @torch.no_grad()
    def _vmapped_grads(self, batch: Batch, theta: torch.Tensor) -> torch.Tensor:
        batch = dict(batch)
        batch_size(batch)  # validates a shared batch dimension before vmap gives a cryptic error
        per_sample_grad = vmap(
            grad(self._single_sample_loss), in_dims=(None, 0), chunk_size=self.vmap_chunk_size
        )
        # Fused attention kernels have no vmap batching rule (vmap would loop over samples internally).
        with sdpa_kernel(SDPBackend.MATH):
            return per_sample_grad(theta, batch)

    def _looped_grads(self, batch: Batch, theta: torch.Tensor) -> torch.Tensor:
        rows = []
        for index in range(batch_size(batch)):
            sample = slice_batch(batch, slice(index, index + 1))
            theta_leaf = theta.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self._summed_loss(theta_leaf, sample)
                (row,) = torch.autograd.grad(loss, theta_leaf, allow_unused=True)
            rows.append(torch.zeros_like(theta) if row is None else row)
        return torch.stack(rows)

    def iter_grads(
        self, batches: Iterable[Batch], theta: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        """Per-sample gradients batch by batch; errors name the offending batch."""
        for batch_index, batch in enumerate(batches):
            try:
                yield self.per_sample_grads(batch, theta)
            except NonFiniteGradientError as error:
                raise NonFiniteGradientError(f"batch {batch_index}: {error}") from None

    def stack_grads(self, batches: Iterable[Batch], theta: torch.Tensor | None = None) -> torch.Tensor:
        """All per-sample gradients of `batches` as one [N, P] matrix."""
        grads = list(self.iter_grads(batches, theta))
        if not grads:
            raise ValueError("no batches given")
        return torch.cat(grads)

    def mean_grad(self, batches: Iterable[Batch], theta: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient of the mean loss over all samples of `batches`, shape [P].

        One ordinary backward pass per batch (no per-sample gradients, so no vmap over the data).
        """
        theta = self._theta(theta)
        total, count = torch.zeros_like(theta), 0
        for batch_index, batch in enumerate(batches):
            batch_grad, losses = self._batch_grad(theta, self.to_device(batch))
            _raise_if_non_finite(losses[:, None], f"loss in batch {batch_index}")
            _raise_if_non_finite(batch_grad[None], f"gradient of batch {batch_index}")
            total += batch_grad
            count += losses.shape[0]
        if count == 0:
            raise ValueError("no samples in batches")
        return total / count

    @torch.no_grad()
    def _batch_grad(self, theta: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        def summed_with_losses(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            losses = self._losses(params, batch)
            return losses.sum(), losses

        return grad(summed_with_losses, has_aux=True)(theta)

    def grad_dot(
        self, batch: Batch, directions: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """g_i . d for every sample i of `batch` and row d of `directions` [Q, P]: shape [Q, B].

        Computed as forward-mode directional derivatives of the per-sample losses (one jvp per direction,
        vectorised), so per-sample gradients are never materialised and the data is never vmapped; falls
        back to per-sample gradients when the model lacks forward-mode AD.
        """
        batch = self.to_device(batch)
        theta = self._theta(theta)
        directions = directions.to(device=self.device, dtype=self.dtype)
        products = None
        if self._forward_ad_ok:
            try:
                products = self._jvp_losses(theta, batch, directions)
            except (RuntimeError, NotImplementedError) as error:
                logger.warning("forward-mode AD failed (%s); scoring with per-sample gradients", error)
                self._forward_ad_ok = False
        if products is None:
            products = directions @ self.per_sample_grads(batch, theta).T
        return checked_products(products)

    @torch.no_grad()
    def _jvp_losses(self, theta: torch.Tensor, batch: Batch, directions: torch.Tensor) -> torch.Tensor:
        def losses(params: torch.Tensor) -> torch.Tensor:
            return self._losses(params, batch)

        def directional(tangent: torch.Tensor) -> torch.Tensor:
            return jvp(losses, (theta,), (tangent,))[1]

        with sdpa_kernel(SDPBackend.MATH):
            return vmap(directional, chunk_size=self.vmap_chunk_size)(directions)

    # ------------------------------------------------------------------------------ second order
    def hvp(
        self,
        vectors: torch.Tensor,
        batches: Iterable[Batch],
        damping: float = 0.0,
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(H + damping * I) @ v for H the Hessian of the mean loss over `batches`; v is [P] or [Q, P]."""
        theta = self._theta(theta)
        single = vectors.dim() == 1
        tangents = (vectors.unsqueeze(0) if single else vectors).to(device=self.device, dtype=self.dtype)
        total, count = torch.zeros_like(tangents), 0
        for batch_index, batch in enumerate(batches):
            batch = self.to_device(batch)
            total += self._batch_hvp(theta, batch, tangents)
            count += batch_size(batch)
            if not torch.isfinite(total).all():
                raise NonFiniteGradientError(
                    f"Hessian-vector product became non-finite at batch {batch_index}"
                )
        if count == 0:
            raise ValueError("no samples in batches")
        result = total / count + damping * tangents
        return result[0] if single else result

    @torch.no_grad()
    def _batch_hvp(self, theta: torch.Tensor, batch: Batch, tangents: torch.Tensor) -> torch.Tensor:
        """Hessian of the batch's SUMMED loss times each row of `tangents`."""
        # Fused attention kernels have neither forward-mode AD nor double backward: use the math kernel.
        with sdpa_kernel(SDPBackend.MATH):
            return self._batch_hvp_unfused(theta, batch, tangents)

    def _batch_hvp_unfused(self, theta: torch.Tensor, batch: Batch, tangents: torch.Tensor) -> torch.Tensor:

        def loss_grad(params: torch.Tensor) -> torch.Tensor:
            return grad(self._summed_loss)(params, batch)

        if self.hvp_mode != "reverse_over_reverse":
            try:
                return vmap(lambda tangent: jvp(loss_grad, (theta,), (tangent,))[1])(tangents)
            except (RuntimeError, NotImplementedError) as error:
                if self.hvp_mode == "forward_over_reverse":
                    raise
                logger.warning("forward-mode AD failed (%s); using double backward for HVPs", error)
                self.hvp_mode = "reverse_over_reverse"
        _, vjp_fn = vjp(loss_grad, theta)
        return vmap(lambda tangent: vjp_fn(tangent)[0])(tangents)

    def hessian(
        self, batches: Iterable[Batch], theta: torch.Tensor | None = None, columns_per_pass: int = 256
    ) -> torch.Tensor:
        """Explicit [P, P] Hessian of the mean loss over `batches` (only for small scopes).

        Built from HVPs with identity columns, `columns_per_pass` at a time to bound memory.
        """
        theta = self._theta(theta)
        eye = torch.eye(self.num_params, device=self.device, dtype=self.dtype)
        rows = [self.hvp(chunk, batches, theta=theta) for chunk in torch.split(eye, columns_per_pass)]
        hessian = torch.cat(rows)
        return 0.5 * (hessian + hessian.T)


def _raise_if_non_finite(grads: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(grads).all(dim=-1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteGradientError(
            f"non-finite {what} for {len(rows)} sample(s) at rows {rows[:10]} of the batch: "
            "check those inputs/labels for NaN or inf, or the model for overflow"
        )


def describe_batches(batches: Iterable[Batch]) -> dict[str, Any]:
    """Counts for diagnostics (number of batches and samples)."""
    sizes = [batch_size(batch) for batch in batches]
    return {"num_batches": len(sizes), "num_samples": int(sum(sizes))}


def checked_products(products: torch.Tensor) -> torch.Tensor:
    """Gradient products [directions, batch], or an error naming the batch rows that are not finite."""
    bad = ~torch.isfinite(products).all(dim=0)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteGradientError(
            f"non-finite gradient products for {len(rows)} sample(s) at rows {rows[:10]} of the batch: "
            "check those inputs/labels for NaN or inf, or the model for overflow"
        )
    return products
