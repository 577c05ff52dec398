"""molft.influence.per_sample: layerwise per-sample gradients and their products on a small token model.

The MoLFormer cases (padded and padding-free, Gauss-Newton, LoRA) are in test_influence_molformer.py; here a
model small enough to read runs every module kind and every contraction path (a Linear with and without
bias, a LayerNorm with a weight only, an Embedding with a padding row, one row per sample or per token, tokens
packed or padded), and each result is held against one backward pass per sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from molft.influence.per_sample import LayerwiseProblem, PackedRows, layer_sites
from molft.influence.problem import squared_error_loss


class TokenModel(nn.Module):
    """Embed tokens, normalise, project (no bias), mix within each molecule by a masked mean, then a head.

    `packed` set: the token-wise layers run on the real tokens alone, [T, H] rows in row-major order, as
    MoLFormer's padding-free layout does; otherwise on the padded [B, S, H] grid.
    """

    def __init__(self, vocab: int = 11, hidden: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, padding_idx=0)
        self.norm = nn.LayerNorm(hidden, bias=False)
        self.project = nn.Linear(hidden, hidden, bias=False)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        self.packed: PackedRows | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[..., None].to(torch.float64)
        tokens = self.embed(input_ids)
        if self.packed is not None:
            rows = tokens.reshape(-1, tokens.shape[-1]).index_select(0, self.packed.index)
            hidden = self.packed.unpack(torch.tanh(self.project(self.norm(rows))))
        else:
            hidden = torch.tanh(self.project(self.norm(tokens)))
        pooled = (hidden * mask).sum(1) / mask.sum(1)  # molecules never mix: per-sample gradients stay exact
        return self.head(torch.relu(self.mix(pooled))).squeeze(-1)


def packed_layout(model: TokenModel):
    @contextmanager
    def layout(batch: dict[str, torch.Tensor]) -> Iterator[PackedRows]:
        mask = batch["attention_mask"]
        model.packed = PackedRows(mask.reshape(-1).nonzero().squeeze(1), *mask.shape)
        try:
            yield model.packed
        finally:
            model.packed = None

    return layout


def token_batch() -> dict[str, torch.Tensor]:
    """Four molecules of 2 to 5 tokens padded to 5, one with the padding id among its real tokens."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 11, (4, 5), generator=generator)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[0, 3:], mask[2, 2:] = 0, 0
    ids[mask == 0] = 0
    ids[3, 1] = 0  # a real token with the padding id: its embedding row gets no gradient
    labels = torch.randn(4, generator=generator, dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def problem_for(scope: str, packed: bool) -> LayerwiseProblem:
    torch.manual_seed(0)
    model = TokenModel().double().eval()
    params = {
        name: param
        for name, param in model.named_parameters()
        if scope == "all" or (scope == "bias" and name.endswith(".bias"))
    }
    return LayerwiseProblem(
        model,
        params,
        loss_fn=squared_error_loss,
        grad_method="layerwise",
        layout=packed_layout(model) if packed else None,
    )


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("scope", ["all", "bias"])
def test_gradients_and_products_equal_one_backward_per_sample(scope, packed):
    problem = problem_for(scope, packed)
    batch = token_batch()
    loop = problem.per_sample_grads_looped(batch)
    grads = problem.per_sample_grads(batch)  # checks itself against the first sample's backward, once
    np.testing.assert_allclose(grads, loop, rtol=0, atol=1e-13 * float(loop.abs().max()))
    directions = torch.randn(3, problem.num_params, generator=torch.Generator().manual_seed(2)).double()
    for count in (1, 3):  # one direction: contracted per row; several: per-sample gradients first
        products = problem.grad_dot(batch, directions[:count])
        expected = directions[:count] @ loop.T
        np.testing.assert_allclose(products, expected, rtol=1e-12, atol=1e-13 * float(expected.abs().max()))
    assert problem.layerwise is not None and problem.layerwise_error is None  # no fallback to the loop


def test_every_module_kind_is_read_and_the_padding_row_gets_nothing():
    problem = problem_for("all", packed=True)
    kinds = sorted({type(site.module).__name__ for site in problem.layerwise.sites})
    assert kinds == ["Embedding", "LayerNorm", "Linear"]
    grads = problem.per_sample_grads(token_batch())
    embed = dict(problem.block_slices())["embed.weight"]
    hidden = problem.model.embed.embedding_dim
    assert grads[:, embed.start : embed.start + hidden].abs().max() == 0  # row 0, the padding id
    assert grads[:, embed].abs().sum(1).min() > 0  # every molecule moves some other row


def test_packed_rows_unpack_to_the_grid_and_sum_per_sample():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    packed = PackedRows(mask.reshape(-1).nonzero().squeeze(1), *mask.shape)
    rows = torch.arange(1.0, 7.0)[:, None]  # six real tokens, one value each
    grid = packed.unpack(rows)[..., 0]
    assert grid.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0]]
    assert packed.sum_per_sample(rows)[:, 0].tolist() == [3.0, 3.0, 15.0]


def test_a_module_type_it_cannot_read_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(1, 1, 1))
    with pytest.raises(RuntimeError, match=r"1\.weight belongs to a Conv1d"):
        layer_sites(model, ("0.weight", "1.weight"))
