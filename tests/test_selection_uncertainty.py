"""molft.selection.uncertainty: MC-dropout predictions on a tiny torch model."""

from __future__ import annotations

import types
from contextlib import contextmanager

import numpy as np
import pytest

from molft.selection import mc_dropout_predictions, mc_predictions


def _tiny_model(p: float):
    torch = pytest.importorskip("torch")

    class TinyRegressor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(12, 8)
            self.norm = torch.nn.BatchNorm1d(8)
            self.dropout = torch.nn.Dropout(p)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).float()
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
            return types.SimpleNamespace(logits=self.head(self.dropout(self.norm(pooled))))

    torch.manual_seed(0)
    model = TinyRegressor()
    model.eval()
    ids = torch.randint(0, 12, (10, 5))
    mask = torch.ones(10, 5, dtype=torch.long)
    batches = [{"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4]} for i in range(0, 10, 4)]
    return torch, model, batches


def test_mc_dropout_is_seeded_and_restores_the_model():
    torch, model, batches = _tiny_model(0.5)
    running_mean = model.norm.running_mean.clone()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = mc_dropout_predictions(model, batches, n_passes=5, seed=0)
    assert torch.rand(1) == expected_next  # the caller's random stream is untouched
    again = mc_dropout_predictions(model, iter(batches), n_passes=5, seed=0)
    other = mc_dropout_predictions(model, batches, n_passes=5, seed=1)
    assert first.shape == (5, 10)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (first.var(axis=0) > 0).all()
    assert not model.training and not model.dropout.training
    assert torch.equal(model.norm.running_mean, running_mean)  # batch norm stayed in eval mode


def test_mc_dropout_without_dropout_matches_eval_predictions():
    torch, model, batches = _tiny_model(0.0)
    with torch.no_grad():
        expected = torch.cat([model(**b).logits[:, 0] for b in batches]).double().numpy()
    predictions = mc_dropout_predictions(model, batches, n_passes=3, seed=0)
    np.testing.assert_allclose(predictions, np.tile(expected, (3, 1)), rtol=1e-6)


def test_mc_dropout_pins_feature_maps(monkeypatch):
    _, model, batches = _tiny_model(0.5)
    events = []

    @contextmanager
    def fixed_feature_maps(m):
        events.append(("enter", m is model))
        yield
        events.append(("exit", m is model))

    monkeypatch.setattr("molft.model_utils.fixed_feature_maps", fixed_feature_maps)
    mc_dropout_predictions(model, batches, n_passes=2, seed=0)
    assert events == [("enter", True), ("exit", True)]
    monkeypatch.undo()  # the real one: a no-op for a model without MoLFormer attention
    assert mc_dropout_predictions(model, batches, n_passes=2, seed=0).shape == (2, 10)


def test_mc_dropout_custom_forward_and_shape_check():
    _, model, batches = _tiny_model(0.5)
    predictions = mc_dropout_predictions(
        model, batches, n_passes=2, seed=0, forward_fn=lambda m, b: m(**b).logits[:, 0] * 0 + 1
    )
    np.testing.assert_array_equal(predictions, np.ones((2, 10)))
    with pytest.raises(ValueError, match="one prediction per molecule"):
        mc_dropout_predictions(
            model, batches, n_passes=1, seed=0, forward_fn=lambda m, b: m(**b).logits.repeat(1, 2)
        )


def test_mc_predictions_match_mc_dropout_with_the_default_forward():
    _, model, batches = _tiny_model(0.5)
    np.testing.assert_array_equal(
        mc_predictions(model, batches, n_passes=3, seed=4, quiet=True),
        mc_dropout_predictions(model, batches, n_passes=3, seed=4),
    )
