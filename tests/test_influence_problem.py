"""Per-sample gradients, HVPs and input checks of molft.influence.problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molft.influence.problem import (
    InfluenceProblem,
    NonFiniteGradientError,
    additive_mask_forward,
    batch_size,
    squared_error_loss,
)
from molft.influence.scope import select_parameters


def features_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["features"])


class TokenRegressor(nn.Module):
    """Embedding -> per-token layers -> masked mean pool -> head: a transformer-shaped toy."""

    def __init__(self, vocab: int = 11, width: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, width)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.regressor = nn.Linear(width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            hidden = torch.tanh(layer(hidden)) + hidden
        hidden = self.norm(hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return self.regressor(pooled)


def token_batch(seed: int = 0, size: int = 5, length: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 11, (size, length), generator=generator)
    attention_mask = torch.ones(size, length, dtype=torch.long)
    attention_mask[0, 3:] = 0
    attention_mask[2, 1:] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.randn(size, generator=generator, dtype=torch.float64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def linear_problem(num_features: int = 3) -> tuple[InfluenceProblem, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(num_features, 1).double()
    return InfluenceProblem(model, dict(model.named_parameters()), forward_fn=features_forward), model


def test_linear_per_sample_grads_are_hand_computed() -> None:
    problem, model = linear_problem()
    features = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grads = problem.per_sample_grads({"features": features, "labels": labels})
    with torch.no_grad():
        residuals = model(features).squeeze(-1) - labels
    # d/dw 0.5 (w.x + b - y)^2 = r x ; d/db = r ; layout: weight (row-major) then bias.
    expected = torch.cat([residuals[:, None] * features, residuals[:, None]], dim=1)
    assert torch.allclose(grads, expected)


def test_vmapped_grads_equal_looped_on_masked_token_model() -> None:
    torch.manual_seed(0)
    model = TokenRegressor().double()
    problem = InfluenceProblem(model, select_parameters(model, "all"), grad_method="vmap")
    batch = token_batch()
    vmapped = problem.per_sample_grads(batch)
    looped = problem.per_sample_grads_looped(batch)
    assert vmapped.shape == (5, problem.num_params)
    assert torch.allclose(vmapped, looped, atol=1e-12)
    # The mask must reach each vmapped sample: changing padded token ids leaves every gradient unchanged,
    # while changing a real token changes its sample's gradient.
    repadded = dict(batch, input_ids=torch.where(batch["attention_mask"] == 0, 7, batch["input_ids"]))
    assert torch.allclose(problem.per_sample_grads(repadded), vmapped, atol=1e-12)
    edited = dict(batch, input_ids=batch["input_ids"].clone())
    edited["input_ids"][0, 0] = (edited["input_ids"][0, 0] % 10) + 1
    changed = problem.per_sample_grads(edited)
    assert not torch.allclose(changed[0], vmapped[0])
    assert torch.allclose(changed[1:], vmapped[1:], atol=1e-12)


def test_vmapped_grads_equal_looped_on_hugging_face_bert() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=1,
    )
    model = transformers.BertForSequenceClassification(config)
    params = select_parameters(model, "last_k_layers", last_k=1)
    assert all("encoder.layer.1." in name or "classifier" in name for name in params)
    problem = InfluenceProblem(model, params, forward_fn=additive_mask_forward, grad_method="vmap")
    batch = token_batch(size=4)
    batch["input_ids"] = batch["input_ids"] % 20
    batch["labels"] = batch["labels"].float()
    vmapped = problem.per_sample_grads(batch)
    assert torch.allclose(vmapped, problem.per_sample_grads_looped(batch), atol=1e-5, rtol=1e-4)
    # The HVP must run through fused attention (math kernel is forced) and be symmetric: u.Hv == v.Hu.
    u, v = torch.randn(2, problem.num_params)
    hu, hv = problem.hvp(torch.stack([u, v]), [batch])
    assert torch.isclose(u @ hv, v @ hu, rtol=1e-3, atol=1e-6)

    # With the plain 2-D mask the model cannot be vmapped over samples, but everything the mean-query
    # scoring needs (mean gradient, HVPs, forward-mode candidate products) never vmaps over the data.
    plain = InfluenceProblem(model, params, grad_method="vmap")
    with pytest.raises(RuntimeError, match="vmap"):
        plain.per_sample_grads(batch)
    directions = torch.stack([u, v])
    assert torch.allclose(plain.grad_dot(batch, directions), directions @ vmapped.T, atol=1e-5, rtol=1e-4)
    assert torch.allclose(plain.mean_grad([batch]), vmapped.mean(dim=0), atol=1e-6)
    assert torch.allclose(plain.hvp(u, [batch]), hu, atol=1e-5, rtol=1e-4)


def test_grad_dot_and_mean_grad_match_per_sample_gradients() -> None:
    torch.manual_seed(0)
    model = TokenRegressor().double()
    problem = InfluenceProblem(model, select_parameters(model, "all"))
    batch = token_batch()
    grads = problem.per_sample_grads_looped(batch)
    directions = torch.randn(3, problem.num_params, dtype=torch.float64)
    assert torch.allclose(problem.grad_dot(batch, directions), directions @ grads.T, atol=1e-12)
    second = token_batch(seed=1, size=3)
    expected = torch.cat([grads, problem.per_sample_grads_looped(second)]).mean(dim=0)
    assert torch.allclose(problem.mean_grad([batch, second]), expected, atol=1e-12)
    assert torch.allclose(problem.mean_grad([batch]), grads.mean(dim=0), atol=1e-12)


def test_auto_grad_method_falls_back_to_loop_for_data_dependent_models() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 1)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            out = self.head(features)
            return out * 2 if out.sum() > 0 else out  # Python branch on data: vmap cannot trace it

    model = Branchy().double()
    batch = {
        "features": torch.randn(4, 2, dtype=torch.float64),
        "labels": torch.randn(4, dtype=torch.float64),
    }
    strict = InfluenceProblem(
        model, dict(model.named_parameters()), forward_fn=features_forward, grad_method="vmap"
    )
    with pytest.raises(RuntimeError):
        strict.per_sample_grads(batch)
    auto = InfluenceProblem(model, dict(model.named_parameters()), forward_fn=features_forward)
    assert torch.allclose(auto.per_sample_grads(batch), auto.per_sample_grads_looped(batch))
    assert auto.grad_method == "loop"


def test_hvp_and_hessian_equal_design_matrix_for_linear_model() -> None:
    problem, _ = linear_problem()
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    batches = [
        {"features": features[:4], "labels": torch.zeros(4, dtype=torch.float64)},
        {"features": features[4:], "labels": torch.ones(3, dtype=torch.float64)},
    ]
    augmented = torch.cat([features, torch.ones(7, 1, dtype=torch.float64)], dim=1)
    expected = augmented.T @ augmented / 7  # Hessian of the mean of 0.5 * squared error
    assert torch.allclose(problem.hessian(batches), expected)
    vector = torch.arange(4, dtype=torch.float64)
    assert torch.allclose(problem.hvp(vector, batches, damping=0.5), expected @ vector + 0.5 * vector)
    problem.hvp_mode = "reverse_over_reverse"
    assert torch.allclose(problem.hvp(vector, batches), expected @ vector)


def test_non_finite_gradient_names_batch_and_rows() -> None:
    problem, _ = linear_problem()
    good = {"features": torch.ones(2, 3, dtype=torch.float64), "labels": torch.zeros(2, dtype=torch.float64)}
    bad = {
        "features": torch.ones(3, 3, dtype=torch.float64),
        "labels": torch.tensor([0.0, float("nan"), 1.0]),
    }
    with pytest.raises(NonFiniteGradientError, match=r"batch 1: .*rows \[1\]"):
        problem.stack_grads([good, bad])
    with pytest.raises(NonFiniteGradientError, match=r"loss in batch 1 .*rows \[1\]"):
        problem.mean_grad([good, bad])
    with pytest.raises(NonFiniteGradientError, match=r"rows \[1\]"):
        problem.grad_dot(bad, torch.ones(2, 4, dtype=torch.float64))


def test_bad_inputs_are_rejected_clearly() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="scope is empty"):
        InfluenceProblem(model, {})
    with pytest.raises(ValueError, match="not found"):
        InfluenceProblem(model, {"other.weight": nn.Parameter(torch.zeros(1))})
    with pytest.raises(ValueError, match="disagree on the batch dimension"):
        batch_size({"features": torch.zeros(3, 2), "labels": torch.zeros(2)})
    with pytest.raises(ValueError, match="do not match labels"):
        squared_error_loss(torch.zeros(3, 2), {"labels": torch.zeros(3)})
    with pytest.raises(KeyError, match="labels"):
        squared_error_loss(torch.zeros(3, 1), {"features": torch.zeros(3)})
