"""molft.weights.map_weights: hand-computed mappings, bad input, and what the weights do to the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from configuration_molformer import MolformerConfig
from modeling_molformer_reg import MolformerForRegression
from molft.weights import WEIGHT_MAPPINGS, map_weights


def test_identity_keeps_values():
    np.testing.assert_array_equal(map_weights([0.0, 0.5, 2.0], "identity"), [0.0, 0.5, 2.0])


def test_clip_mappings_by_hand():
    # influence convention: negative = helpful, so helpful_clip keeps the negated negatives
    np.testing.assert_array_equal(map_weights([-1.5, 0.0, 2.0], "clip"), [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(map_weights([-1.5, 0.0, 2.0], "helpful_clip"), [1.5, 0.0, 0.0])


def test_softmax_mappings_by_hand():
    # exp([0, ln 2]) = [1, 2] -> softmax [1/3, 2/3] -> times n = 2
    np.testing.assert_allclose(map_weights([0.0, math.log(2)], "softmax"), [2 / 3, 4 / 3])
    # negated: exp([0, -ln 2]) = [1, 1/2] -> [2/3, 1/3] -> times 2
    np.testing.assert_allclose(map_weights([0.0, math.log(2)], "helpful_softmax"), [4 / 3, 2 / 3])
    # temperature 2 on [0, 2 ln 2] is the same as temperature 1 on [0, ln 2]
    np.testing.assert_allclose(
        map_weights([0.0, 2 * math.log(2)], "softmax", temperature=2.0), [2 / 3, 4 / 3]
    )


def test_softmax_weights_have_mean_one_and_do_not_overflow():
    weights = map_weights([1000.0, 1001.0, 999.0, 1000.5], "softmax")
    assert np.all(np.isfinite(weights))
    assert weights.mean() == pytest.approx(1.0)
    assert np.argmax(weights) == 1


@pytest.mark.parametrize(
    "values, mapping, kwargs, message",
    [
        ([1.0, float("nan"), 2.0, float("inf")], "identity", {}, r"non-finite at rows \[1, 3\]"),
        ([1.0, -0.5, -2.0], "identity", {}, r"rows \[1, 2\] are negative"),
        ([1.0, 2.0], "square", {}, "Unknown weight mapping 'square'"),
        ([1.0, 2.0], "softmax", {"temperature": 0.0}, "temperature must be positive"),
        ([-1.0, -2.0], "clip", {}, "All weights are zero under mapping 'clip'"),
    ],
)
def test_bad_input_is_an_error(values, mapping, kwargs, message):
    with pytest.raises(ValueError, match=message):
        map_weights(values, mapping, **kwargs)


def test_every_mapping_gives_non_negative_weights():
    values = np.array([-2.0, -0.1, 0.0, 0.3, 4.0])
    for mapping in WEIGHT_MAPPINGS:
        if mapping == "identity":
            continue
        assert np.all(map_weights(values, mapping) >= 0), mapping


def _model() -> MolformerForRegression:
    torch.manual_seed(0)
    config = MolformerConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_random_features=8,
        target_mean=1.0,
        target_std=2.0,
    )
    return MolformerForRegression(config).eval()  # eval: no dropout, fixed feature maps


def _loss_and_grads(model, input_ids, labels, weights=None):
    model.zero_grad()
    loss = model(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, sample_weight=weights
    ).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_zero_weight_is_leaving_the_molecule_out_and_equal_weights_change_nothing():
    """The contract run_regression relies on: weights from map_weights scale each molecule's loss share."""
    model = _model()
    input_ids = torch.randint(4, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0.5, 2.0, -1.0])
    zero_last = torch.tensor(map_weights([1.0, 1.0, 0.0], "identity"), dtype=torch.float32)
    weighted_loss, weighted_grads = _loss_and_grads(model, input_ids, labels, zero_last)
    kept_loss, kept_grads = _loss_and_grads(model, input_ids[:2], labels[:2])
    torch.testing.assert_close(weighted_loss, kept_loss)
    for weighted, kept in zip(weighted_grads, kept_grads, strict=True):
        torch.testing.assert_close(weighted, kept)

    ones = torch.tensor(map_weights([1.0, 1.0, 1.0], "identity"), dtype=torch.float32)
    equal_loss, _ = _loss_and_grads(model, input_ids, labels, ones)
    plain_loss, _ = _loss_and_grads(model, input_ids, labels)
    assert equal_loss.item() == plain_loss.item()
    assert kept_loss.item() != pytest.approx(plain_loss.item())  # the left-out molecule did matter
