"""The MoLFormer regression model as an influence task (molft.influence.molformer)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from configuration_molformer import MolformerConfig
from molft.influence import InfluenceProblem, squared_error_loss
from molft.influence.molformer import LinearisedForward, influence_loss


def test_linearised_forward_gives_the_gauss_newton_matrix():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    params = dict(head.named_parameters())
    batches = [{"x": torch.randn(6, 4, dtype=torch.float64), "labels": torch.randn(6, dtype=torch.float64)}]

    def forward(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    true = InfluenceProblem(head, params, forward_fn=forward)
    gauss_newton = InfluenceProblem(head, params, forward_fn=LinearisedForward(forward, params))
    features = batches[0]["x"]
    jacobian = torch.func.jacrev(lambda p: torch.func.functional_call(head, p, (features,)).reshape(-1))(
        {name: param.detach() for name, param in params.items()}
    )
    jacobian = torch.cat([jacobian[name].reshape(6, -1) for name in params], dim=1)
    expected = jacobian.T @ jacobian / 6
    np.testing.assert_allclose(gauss_newton.hessian(batches), expected, atol=1e-12)
    assert torch.linalg.eigvalsh(true.hessian(batches))[0] < -1e-3  # the true Hessian is indefinite here
    np.testing.assert_allclose(gauss_newton.per_sample_grads(batches[0]), true.per_sample_grads(batches[0]))


def test_influence_loss_is_half_the_normalised_training_loss():
    config = MolformerConfig(target_mean=3.0, target_std=2.0)
    loss_fn, description = influence_loss(config)
    predictions = torch.tensor([[1.0], [5.0]], dtype=torch.float64)
    batch = {"labels": torch.tensor([2.0, 2.0], dtype=torch.float64)}
    # 0.5 * ((1 - 2) / 2)^2 and 0.5 * ((5 - 2) / 2)^2
    np.testing.assert_allclose(loss_fn(predictions, batch), [0.125, 1.125])
    assert "0.5" in description
    np.testing.assert_allclose(
        squared_error_loss(predictions / 2, {"labels": batch["labels"] / 2}), loss_fn(predictions, batch)
    )
