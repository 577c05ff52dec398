"""Parameter scopes of molft.influence.scope."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molft.influence.scope import is_head_parameter, select_parameters


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(5, 3)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
        self.classifier = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))


def test_named_scopes_select_the_documented_parameters() -> None:
    model = Encoder()
    head = ["classifier.0.weight", "classifier.0.bias", "classifier.1.weight"]
    assert list(select_parameters(model, "head")) == head
    assert list(select_parameters(model, "last_k_layers", last_k=1)) == [
        "encoder.layer.2.weight",
        "encoder.layer.2.bias",
        *head,
    ]
    assert list(select_parameters(model, "last_k_layers", last_k=2))[:4] == [
        "encoder.layer.1.weight",
        "encoder.layer.1.bias",
        "encoder.layer.2.weight",
        "encoder.layer.2.bias",
    ]
    assert list(select_parameters(model, "bias")) == [
        "encoder.layer.0.bias",
        "encoder.layer.1.bias",
        "encoder.layer.2.bias",
        *head,
    ]
    assert len(select_parameters(model, "all")) == 1 + 6 + 3
    selected = select_parameters(model, "head")
    assert selected["classifier.0.weight"] is model.classifier[0].weight  # the live parameters, not copies


def test_head_predicate_and_callable_scope_are_pluggable() -> None:
    model = Encoder()
    assert is_head_parameter("model.regressor.weight") and not is_head_parameter("encoder.layer.0.weight")
    only_embeddings = select_parameters(model, lambda name: name.startswith("embeddings"))
    assert list(only_embeddings) == ["embeddings.weight"]
    last_layer_only = select_parameters(model, "last_k_layers", head_predicate=lambda name: False)
    assert list(last_layer_only) == ["encoder.layer.2.weight", "encoder.layer.2.bias"]


def test_lora_scope_selects_only_adapter_weights() -> None:
    peft = pytest.importorskip("peft")

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.regressor = nn.Linear(6, 1)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.regressor(torch.tanh(self.fc1(features)))

    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    selected = select_parameters(model, "lora")
    assert sorted(selected) == [
        "base_model.model.fc1.lora_A.default.weight",
        "base_model.model.fc1.lora_B.default.weight",
    ]


def test_bad_scopes_raise() -> None:
    model = Encoder()
    with pytest.raises(ValueError, match="selects no parameters"):
        select_parameters(model, "lora")
    with pytest.raises(ValueError, match="unknown scope"):
        select_parameters(model, "heads")
    with pytest.raises(ValueError, match="last_k"):
        select_parameters(model, "last_k_layers", last_k=0)
    with pytest.raises(ValueError, match="layer pattern"):
        select_parameters(nn.Linear(2, 1), "last_k_layers")
    frozen = Encoder().requires_grad_(False)
    with pytest.raises(ValueError, match="selects no parameters"):
        select_parameters(frozen, "all", trainable_only=True)
