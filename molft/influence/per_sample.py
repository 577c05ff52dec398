"""Exact per-sample gradients from one batched backward, read off each layer's inputs and output gradients.

For a Linear layer applied to the tokens of molecule i, dl_i/dW = sum_t g_it^T x_it and dl_i/db = sum_t g_it,
with x its inputs and g = dl/dy its output gradients; LayerNorm (with the normalised input) and Embedding (a
scatter of g into the rows of the token ids) likewise. In eval mode with the feature maps pinned molecules do
not interact (MoLFormer's attention mixes the tokens of one molecule only), so the output gradients of the
batch's SUMMED loss are each molecule's own: one forward and one backward give every per-sample gradient,
exactly, where the loop runs one backward per molecule and vmap carries B copies of every weight gradient
through the whole backward. Products with a few directions (influence scores, g_i . x for an inverse-HVP x)
contract each layer's contribution as soon as it is formed, so the [B, P] matrix is never held. A model that
runs its layers on the real tokens alone (`PackedRows`) is read in that layout, skipping the padding's share.
The arithmetic is that of one training step (forward, backward to the layer outputs, and per layer one
projection or per-sample product), which is also what the loop does molecule by molecule: the gain is the
loop's per-molecule overhead, small matrix products and padding, so it depends on the hardware.

`LayerwiseProblem` is an `InfluenceProblem` that uses this wherever it applies: every scope tensor is the
weight or bias of a Linear, LayerNorm or Embedding module that the forward calls as a module. Once per
problem it checks its first batch's first molecule against a backward pass of that molecule alone (which
catches a parameter also used outside its module, e.g. tied or concatenated weights, and molecules that
interact); anything unsupported falls back to the parent's methods with a logged warning.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from molft.influence.problem import (
    GRAD_METHODS,
    Batch,
    BoundForward,
    ForwardFn,
    InfluenceProblem,
    _raise_if_non_finite,
    batch_size,
    checked_products,
    slice_batch,
)

logger = logging.getLogger(__name__)

LAYERWISE_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding)
LAYERWISE = "layerwise"


@dataclass(frozen=True)
class PackedRows:
    """Where a model that runs real tokens only (MoLFormer's `padding_free`) put them: their flat positions
    in the padded [B, S] grid, in row order. Module calls with one row per real token are read through it."""

    index: torch.Tensor
    batch: int
    seq: int

    @property
    def rows(self) -> int:
        return int(self.index.numel())

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...], zeros at the padding."""
        padded = rows.new_zeros(self.batch * self.seq, *rows.shape[1:]).index_copy(0, self.index, rows)
        return padded.view(self.batch, self.seq, *rows.shape[1:])

    def sum_per_sample(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, ...]: each sample's sum over its rows."""
        samples = torch.div(self.index, self.seq, rounding_mode="floor")
        return rows.new_zeros(self.batch, *rows.shape[1:]).index_add_(0, samples, rows)


# the layout a batch runs in: a context manager yielding the PackedRows of packed module calls, or None
LayoutFactory = Callable[[Batch], AbstractContextManager["PackedRows | None"]]


@dataclass
class Record:
    """One module call: its site, input, output gradient and, for packed token rows, where they belong."""

    site: Site
    x: torch.Tensor
    g: torch.Tensor
    packed: PackedRows | None


class LayerwiseUnsupported(RuntimeError):
    """The layerwise path cannot give exact per-sample gradients for this model, scope or batch."""


@dataclass
class Site:
    """A module that owns scope tensors, and the (input, output) of each of its calls in the last forward."""

    name: str
    module: nn.Module
    slots: dict[str, int]  # "weight" / "bias" -> position among the problem's tensors
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def layer_sites(model: nn.Module, names: tuple[str, ...]) -> list[Site]:
    """The modules owning the scope tensors `names`; LayerwiseUnsupported names the first one not covered."""
    sites: dict[str, Site] = {}
    for index, name in enumerate(names):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        # the exact types: a subclass may use its weight differently (e.g. outside its forward)
        if type(module) not in LAYERWISE_MODULES or leaf not in ("weight", "bias"):
            raise LayerwiseUnsupported(
                f"{name} belongs to a {type(module).__name__}; layerwise gradients cover the weights and biases "
                "of nn.Linear, nn.LayerNorm and nn.Embedding"
            )
        if isinstance(module, nn.Embedding) and (
            module.max_norm is not None or module.scale_grad_by_freq or module.sparse
        ):
            raise LayerwiseUnsupported(f"{name}: an embedding with max_norm, scale_grad_by_freq or sparse")
        sites.setdefault(module_name, Site(module_name, module, {})).slots[leaf] = index
    return list(sites.values())


class LayerwiseGradients:
    """Per-sample gradients of one model and scope, and their products with directions, per batch."""

    def __init__(
        self, problem: InfluenceProblem, forward: nn.Module, layout: LayoutFactory | None = None
    ) -> None:
        self.problem = problem
        self.forward = forward
        self.layout = layout or (lambda batch: nullcontext())
        self.sites = layer_sites(problem.model, problem.names)
        self.slices = [piece for _, piece in problem.block_slices()]

    def record(self, theta: torch.Tensor, batch: Batch) -> tuple[list[Record], int]:
        """One forward and one backward of the summed loss: every scoped module call's input and output grad.

        No parameter requires grad: the first scoped module's output is where the graph starts, so the
        backward computes output gradients only, never the (batch-summed) weight gradients.
        """
        size = batch_size(batch)
        hooks = [site.module.register_forward_hook(self._hook(site)) for site in self.sites]
        try:
            with torch.enable_grad(), self.layout(batch) as packed:
                params = {
                    f"model.{name}": value for name, value in self.problem.unflatten(theta.detach()).items()
                }
                predictions = functional_call(self.forward, params, (batch,))
                losses = self.problem.loss_fn(predictions, batch)
                if losses.dim() != 1 or losses.shape[0] != size:
                    raise ValueError(
                        f"loss_fn must return one loss per sample, got shape {tuple(losses.shape)}"
                    )
                silent = [site.name for site in self.sites if not site.calls]
                if silent:
                    raise LayerwiseUnsupported(f"{silent[0]} is never called as a module in the forward")
                calls = [(site, x, y) for site in self.sites for x, y in site.calls]
                grads = torch.autograd.grad(losses.sum(), [y for _, _, y in calls], allow_unused=True)
        except LayerwiseUnsupported:
            raise
        except RuntimeError as error:  # e.g. an in-place change of a module's output
            raise LayerwiseUnsupported(f"the hooked forward and backward failed: {error}") from error
        finally:
            for hook in hooks:
                hook.remove()
            for site in self.sites:
                site.calls = []
        records = []
        for (site, x, y), g in zip(calls, grads, strict=True):
            g = torch.zeros_like(y) if g is None else g
            if x.shape[0] == size and g.shape[0] == size:
                records.append(Record(site, x, g, None))
            elif packed is not None and x.shape[0] == packed.rows == g.shape[0]:
                records.append(Record(site, x, g, packed))
            else:
                raise LayerwiseUnsupported(
                    f"{site.name} saw inputs of shape {tuple(x.shape)} for a batch of {size}: neither one row per "
                    "sample nor one per packed token"
                )
        return records, size

    @staticmethod
    def _hook(site: Site) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:  # nothing upstream depends on theta: the graph starts here
                output = output.detach().requires_grad_()
            site.calls.append((args[0].detach(), output))
            return output

        return hook

    def grads(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, P] per-sample gradients."""
        records, size = self.record(theta, batch)
        out = torch.empty(size, self.problem.num_params, dtype=self.problem.dtype, device=self.problem.device)
        written = set()
        for record in records:
            slots = record.site.slots
            fresh = {leaf: self._block(out, index) for leaf, index in slots.items() if index not in written}
            values = per_sample_tensors(
                record.site.module, slots, record.x, record.g, record.packed, into=fresh
            )
            for leaf, value in values.items():
                if leaf not in fresh:  # a module called more than once: its calls add up
                    self._block(out, slots[leaf]).add_(value)
            written.update(slots.values())
        return out

    def _block(self, out: torch.Tensor, index: int) -> torch.Tensor:
        """Scope tensor `index` of every row of a [B, P] matrix, as a [B, *shape] view."""
        return out[:, self.slices[index]].view(out.shape[0], *self.problem.shapes[index])

    def grad_dot(self, theta: torch.Tensor, batch: Batch, directions: torch.Tensor) -> torch.Tensor:
        """[Q, B] products g_i . d with the rows of `directions`, without the [B, P] matrix.

        Each call's contributions are contracted per input row (token or sample) where that is cheap
        (`row_products`); the packed token rows of every call are summed into one [T, Q] buffer and summed per
        sample once, instead of once per call.
        """
        records, size = self.record(theta, batch)
        products = directions.new_zeros(directions.shape[0], size)
        packed_rows: torch.Tensor | None = None
        for record in records:
            blocks = {
                leaf: directions[:, self.slices[index]].view(-1, *self.problem.shapes[index])
                for leaf, index in record.site.slots.items()
            }
            rows, rest = row_products(record, blocks)
            if rows is not None and record.packed is not None:
                packed_rows = rows if packed_rows is None else packed_rows.add_(rows)
            elif rows is not None:
                products += rows.view(size, -1, rows.shape[-1]).sum(1).T
            if rest:
                products += site_products(record, {leaf: blocks[leaf] for leaf in rest})
        if packed_rows is not None:
            packed = next(record.packed for record in records if record.packed is not None)
            products += packed.sum_per_sample(packed_rows).T
        return products


def per_sample_tensors(
    module: nn.Module,
    leaves: Collection[str],
    x: torch.Tensor,
    g: torch.Tensor,
    packed: PackedRows | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each sample's gradient of the module's tensors `leaves` from one call: {leaf: [B, *shape]}.

    `packed`: x and g hold packed token rows (see `PackedRows`). `into` ({leaf: [B, *shape]}, e.g. strided
    views of the [B, P] result) receives them in place; a Linear's batched matmul then writes there directly.
    """
    size = packed.batch if packed is not None else x.shape[0]
    into = into or {}
    out = {}

    def place(leaf: str, rows: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Each sample's sum of `rows` (one per token or per sample, each of `shape`)."""
        rows = rows.reshape(-1, *shape)
        value = packed.sum_per_sample(rows) if packed is not None else rows.view(size, -1, *shape).sum(1)
        out[leaf] = into[leaf].copy_(value) if leaf in into else value

    if isinstance(module, nn.Embedding):
        if "weight" in leaves:
            ids, rows = _embedding_rows(module, *((packed.unpack(x), packed.unpack(g)) if packed else (x, g)))
            zeros = into["weight"].zero_() if "weight" in into else rows.new_zeros(size, *module.weight.shape)
            out["weight"] = zeros.scatter_add_(1, ids[..., None].expand_as(rows), rows)
        return out
    if isinstance(module, nn.LayerNorm):
        dims = tuple(module.normalized_shape)
        if "weight" in leaves:
            place("weight", g * nn.functional.layer_norm(x, dims, eps=module.eps), dims)
        if "bias" in leaves:
            place("bias", g, dims)
        return out
    if "weight" in leaves:  # nn.Linear
        inputs, grads = (packed.unpack(x), packed.unpack(g)) if packed is not None else (x, g)
        factors = (
            grads.reshape(size, -1, g.shape[-1]).transpose(1, 2),
            inputs.reshape(size, -1, x.shape[-1]),
        )
        out["weight"] = torch.bmm(*factors, out=into["weight"]) if "weight" in into else torch.bmm(*factors)
    if "bias" in leaves:
        place("bias", g, (g.shape[-1],))
    return out


def row_products(record: Record, blocks: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, list[str]]:
    """Each input row's share [rows, Q] of g_i . d for the leaves it contracts directly, and the leaves left.

    Linear: (D x_t + d_b) . g_t, one addmm per call (the bias rides along), when that costs no more than forming
    the per-sample weight gradients (one direction, or one row per sample). LayerNorm: (d_w * xhat_t + d_b) . g_t.
    A row's share is summed over its sample's rows by the caller. Embeddings are left to `site_products`.
    """
    module, x, g = record.site.module, record.x, record.g
    queries = next(iter(blocks.values())).shape[0]
    rows = g.reshape(-1, 1, g.shape[-1])  # [rows, 1, out]
    if isinstance(module, nn.Linear):
        inputs = x.reshape(-1, x.shape[-1])
        per_sample = inputs.shape[0] // (record.packed.batch if record.packed else x.shape[0])
        if "weight" not in blocks or queries * per_sample > queries + per_sample:
            return None, list(blocks)
        weight = blocks["weight"].reshape(-1, x.shape[-1])  # [Q * out, in]
        if "bias" in blocks:
            projected = torch.addmm(blocks["bias"].reshape(-1), inputs, weight.T)
        else:
            projected = inputs @ weight.T
        return (projected.view(inputs.shape[0], queries, -1) * rows).sum(-1), []
    if isinstance(module, nn.LayerNorm):
        dims = tuple(module.normalized_shape)
        rows = rows.reshape(-1, math.prod(dims))
        share = rows @ blocks["bias"].reshape(queries, -1).T if "bias" in blocks else None
        if "weight" in blocks:
            normalised = nn.functional.layer_norm(x, dims, eps=module.eps).reshape(rows.shape)
            weighted = (rows * normalised) @ blocks["weight"].reshape(queries, -1).T
            share = weighted if share is None else share.add_(weighted)
        return share, []
    return None, list(blocks)


def site_products(record: Record, blocks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[Q, B] products of one call's per-sample gradients with `blocks` ({leaf: [Q, *shape]} directions).

    For the leaves `row_products` leaves: an Embedding's weight is contracted directly (a gather of the token
    rows of D) when that is cheaper than forming the B per-sample weight gradients; everything else (a Linear
    weight under several directions, a Linear bias without its weight) forms them first.
    """
    module, x, g, packed = record.site.module, record.x, record.g, record.packed
    queries = next(iter(blocks.values())).shape[0]
    size = packed.batch if packed is not None else x.shape[0]
    products = g.new_zeros(queries, size)
    rest = list(blocks)
    if "weight" in blocks and isinstance(module, nn.Embedding) and packed is None:
        ids, rows = _embedding_rows(module, x, g)
        if queries * ids.shape[1] <= module.num_embeddings:
            products += torch.einsum("qbth,bth->qb", blocks["weight"][:, ids], rows)
            rest.remove("weight")
    for leaf, values in per_sample_tensors(module, rest, x, g, packed).items():
        products += blocks[leaf].reshape(queries, -1) @ values.reshape(size, -1).T
    return products


def _embedding_rows(
    module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and their output gradients [B, T, H], zero at the padding index (which gets none)."""
    size = ids.shape[0]
    ids = ids.reshape(size, -1)
    rows = g.reshape(size, ids.shape[1], -1)
    if module.padding_idx is not None:
        rows = torch.where((ids != module.padding_idx)[..., None], rows, 0.0)
    return ids, rows


class LayerwiseProblem(InfluenceProblem):
    """An InfluenceProblem whose per-sample gradients and candidate products come from `LayerwiseGradients`.

    grad_method: "auto" (layerwise where it applies, else the parent's vmap with its loop fallback),
        "layerwise" (layerwise or an error), or the parent's "vmap" / "loop", which also keep the parent's
        forward-mode `grad_dot`: the earlier paths stay selectable for comparison.
    layout: for each batch, the context the layerwise pass runs under, yielding the `PackedRows` of module
        calls on packed tokens or None (MoLFormer: real tokens only, q/k/v through their own modules; see
        `molft.influence.molformer.molformer_layout`).
    plain_forward: when `forward_fn` is a linearisation at the problem's theta (Gauss-Newton), the forward it
        linearises: both have the same gradients there, and only the plain one calls its modules.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        *,
        grad_method: str = "auto",
        layout: LayoutFactory | None = None,
        plain_forward: ForwardFn | None = None,
        **kwargs,
    ) -> None:
        if grad_method not in (*GRAD_METHODS, LAYERWISE):
            raise ValueError(
                f"unknown grad_method {grad_method!r}; expected one of {(*GRAD_METHODS, LAYERWISE)}"
            )
        super().__init__(
            model, params, grad_method="auto" if grad_method == LAYERWISE else grad_method, **kwargs
        )
        self.layerwise_mode = grad_method
        self.plain_forward = plain_forward
        self.layerwise: LayerwiseGradients | None = None
        self.layerwise_error: str | None = None
        self._checked = False
        if grad_method in ("auto", LAYERWISE):
            forward = BoundForward(model, plain_forward) if plain_forward is not None else self._module
            try:
                self.layerwise = LayerwiseGradients(self, forward, layout)
            except LayerwiseUnsupported as error:
                self._unsupported(error)

    def with_forward(self, forward_fn: ForwardFn, plain_forward: ForwardFn | None) -> LayerwiseProblem:
        """The same scope, batches and layerwise pass under another forward (the plain model or its
        Gauss-Newton linearisation), for scoring several estimators on one problem; nothing is recomputed."""
        other = copy.copy(self)
        other.forward_fn, other.plain_forward = forward_fn, plain_forward
        other._module = BoundForward(self.model, forward_fn)
        return other

    def _unsupported(self, error: Exception) -> None:
        if self.layerwise_mode == LAYERWISE:
            raise LayerwiseUnsupported(f"grad_method='layerwise': {error}") from None
        logger.warning("Layerwise per-sample gradients do not apply (%s); using %s", error, self.grad_method)
        self.layerwise, self.layerwise_error = None, str(error)

    def _applies(self, theta: torch.Tensor) -> bool:
        # the linearisation has the model's gradients at its anchor (the problem's theta) only
        return self.layerwise is not None and (self.plain_forward is None or torch.equal(theta, self.theta))

    def per_sample_grads(self, batch: Batch, theta: torch.Tensor | None = None) -> torch.Tensor:
        batch, resolved = self.to_device(batch), self._theta(theta)
        if self._applies(resolved):
            try:
                grads = self._checked_grads(batch, resolved)
                if not torch.isfinite(grads.sum(dim=1)).all():  # one pass; the full check names the rows
                    _raise_if_non_finite(grads, "per-sample gradient")
                return grads
            except LayerwiseUnsupported as error:
                self._unsupported(error)
        return super().per_sample_grads(batch, theta)

    def grad_dot(
        self, batch: Batch, directions: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, resolved = self.to_device(batch), self._theta(theta)
        if not self._applies(resolved):
            return super().grad_dot(batch, directions, theta)
        directions = directions.to(device=self.device, dtype=self.dtype)
        try:
            if self._checked:
                products = self.layerwise.grad_dot(resolved, batch, directions)
            else:
                products = directions @ self._checked_grads(batch, resolved).T
        except LayerwiseUnsupported as error:
            self._unsupported(error)
            return super().grad_dot(batch, directions, theta)
        return checked_products(products)

    def _checked_grads(self, batch: Batch, theta: torch.Tensor) -> torch.Tensor:
        """Layerwise gradients; the first batch's first sample is checked against a backward of it alone."""
        grads = self.layerwise.grads(theta, batch)
        if not self._checked and torch.isfinite(grads[0]).all():
            alone = self._looped_grads(slice_batch(batch, slice(0, 1)), theta)[0]
            mismatch = first_mismatch(grads[0], alone, self.block_slices())
            if mismatch:
                raise LayerwiseUnsupported(f"{mismatch} differs from a backward pass of the sample alone")
            self._checked = True
        return grads


def first_mismatch(
    layerwise: torch.Tensor, reference: torch.Tensor, blocks: list[tuple[str, slice]]
) -> str | None:
    """The first scope tensor whose two gradients differ by more than rounding, or None."""
    if not torch.isfinite(reference).all():
        return None  # the caller's non-finite check names the rows
    tolerance = math.sqrt(torch.finfo(reference.dtype).eps)
    scale = float(reference.norm()) / math.sqrt(len(blocks))
    for name, piece in blocks:
        difference = float((layerwise[piece] - reference[piece]).norm())
        if difference > tolerance * (float(reference[piece].norm()) + 1e-3 * scale):
            return f"the gradient of {name} (|difference| {difference:.3g})"
    return None
