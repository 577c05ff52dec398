"""MolformerForRegression: heads, pooling, losses, label units, sample weights, saving and remote-code loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import micro_config
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification

from configuration_molformer import MolformerConfig
from modeling_molformer_reg import MolformerForRegression
from tokenization_molformer import MolformerTokenizer

HEAD_PARAMETERS = {
    "molformer": {"dense", "dense2", "out_proj"},
    "mlp": {"dense", "out_proj"},
    "linear": {"out_proj"},
}
SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1", "O=C(O)c1ccccc1"]


def tiny_config(**overrides) -> MolformerConfig:
    return micro_config(
        **{"num_hidden_layers": 1, "num_random_features": 8, "max_position_embeddings": 16, **overrides}
    )


def tiny_model(seed: int = 0, **overrides) -> MolformerForRegression:
    """A regression model with every parameter random, in eval mode."""
    torch.manual_seed(seed)
    model = MolformerForRegression(tiny_config(**overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 24, (4, 9), generator=generator)
    input_ids[1, 6:] = 2
    input_ids[3, 3:] = 2
    return {"input_ids": input_ids, "attention_mask": (input_ids != 2).long()}


LABELS = torch.tensor([1.5, -0.5, 3.0, 0.25])


@pytest.mark.parametrize("head", sorted(HEAD_PARAMETERS))
def test_head_parameter_names_and_formula(head):
    model = tiny_model(regression_head=head)
    names = {name for name, _ in model.named_parameters() if name.startswith("classifier.")}
    assert names == {
        f"classifier.{layer}.{kind}" for layer in HEAD_PARAMETERS[head] for kind in ("weight", "bias")
    }
    assert not any(name.startswith("classifier.") for name, _ in model.named_buffers())
    batch = inputs()
    with torch.no_grad():
        pooled = model.molformer(**batch).pooler_output
        logits = model(**batch).logits
    c = model.classifier
    if head == "molformer":  # the reference head: two GELU layers with skip connections
        hidden = F.gelu(F.linear(pooled, c.dense.weight, c.dense.bias)) + pooled
        hidden2 = F.gelu(F.linear(hidden, c.dense2.weight, c.dense2.bias)) + hidden
        expected = F.linear(hidden2, c.out_proj.weight, c.out_proj.bias)
    elif head == "mlp":
        expected = F.linear(
            torch.relu(F.linear(pooled, c.dense.weight, c.dense.bias)), c.out_proj.weight, c.out_proj.bias
        )
    else:
        expected = F.linear(pooled, c.out_proj.weight, c.out_proj.bias)
    assert logits.shape == (4, 1)
    torch.testing.assert_close(logits, expected)


def test_molformer_head_without_skip_connection():
    model = tiny_model(classifier_skip_connection=False)
    batch = inputs()
    with torch.no_grad():
        pooled = model.molformer(**batch).pooler_output
        logits = model(**batch).logits
    c = model.classifier
    hidden = F.gelu(F.linear(pooled, c.dense.weight, c.dense.bias))
    hidden2 = F.gelu(F.linear(hidden, c.dense2.weight, c.dense2.bias))
    torch.testing.assert_close(logits, F.linear(hidden2, c.out_proj.weight, c.out_proj.bias))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling(pooling):
    model = tiny_model(regression_pooling=pooling, regression_head="linear")
    batch = inputs()
    with torch.no_grad():
        out = model.molformer(**batch)
        embedded = model.embed(**batch)
        logits = model(**batch).logits
    if pooling == "cls":
        expected = out.last_hidden_state[:, 0]
    else:
        weights = batch["attention_mask"][..., None].float()
        expected = (out.last_hidden_state * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(embedded, expected)
    torch.testing.assert_close(logits, model.classifier.out_proj(expected))


@pytest.mark.parametrize("kind", ["mse", "l1", "huber"])
def test_losses_match_hand_formulas(kind):
    model = tiny_model(regression_loss=kind, huber_delta=0.5)
    batch = inputs()
    with torch.no_grad():
        out = model(**batch, labels=LABELS)
    residual = out.logits.view(-1) - LABELS
    if kind == "mse":
        expected = residual.square().mean()
    elif kind == "l1":
        expected = residual.abs().mean()
    else:
        small = residual.abs() <= 0.5  # both regimes are also checked with hand residuals below
        expected = torch.where(small, 0.5 * residual.square(), 0.5 * (residual.abs() - 0.25)).mean()
    torch.testing.assert_close(out.loss, expected)


def test_huber_regimes_by_hand():
    model = tiny_model(regression_loss="huber", huber_delta=1.0)
    pred = torch.tensor([0.0, 0.0, 0.0])
    target = torch.tensor([0.5, -2.0, 3.0])
    # 0.5·0.25 = 0.125; 1·(2 - 0.5) = 1.5; 1·(3 - 0.5) = 2.5
    torch.testing.assert_close(model.per_sample_loss(pred, target), torch.tensor([0.125, 1.5, 2.5]))


def test_sequence_regression_golden_loads_directly(golden_dir):
    path = golden_dir / "molformer-tiny" / "sequence-regression"
    model, info = MolformerForRegression.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    io = load_file(path / "io.safetensors")
    with torch.no_grad():
        out = model(
            input_ids=io["input.input_ids"],
            attention_mask=io["input.attention_mask"],
            labels=io["input.labels"],
        )
    torch.testing.assert_close(out.logits, io["output.logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, io["output.loss"], atol=1e-5, rtol=1e-5)


def test_masked_lm_checkpoint_initialises_backbone(golden_dir):
    """Fine-tuning starts from the MLM checkpoint: every backbone tensor (random features too) is loaded."""
    path = golden_dir / "molformer-tiny" / "masked-lm"
    model, info = MolformerForRegression.from_pretrained(path, output_loading_info=True)
    assert set(info["missing_keys"]) == {
        f"classifier.{n}.{k}" for n in ("dense", "dense2", "out_proj") for k in ("weight", "bias")
    }
    assert all(key.startswith("lm_head.") for key in info["unexpected_keys"])
    checkpoint = load_file(path / "model.safetensors")
    state = model.state_dict()
    backbone = [key for key in checkpoint if key.startswith("molformer.")]
    assert any(key.endswith("feature_map.weight") for key in backbone)
    for key in backbone:
        torch.testing.assert_close(state[key], checkpoint[key], atol=0, rtol=0, msg=key)


def test_target_normalisation():
    plain = tiny_model(regression_loss="mse")
    scaled = tiny_model(regression_loss="mse", target_mean=5.0, target_std=2.0)
    batch = inputs()
    with torch.no_grad():
        head = plain(**batch, labels=(LABELS - 5.0) / 2.0)
        out = scaled(**batch, labels=LABELS)
    torch.testing.assert_close(out.logits, head.logits * 2.0 + 5.0)
    torch.testing.assert_close(out.loss, head.loss)  # the loss is on normalised targets
    # labels given as [B, 1] are the same as [B]
    with torch.no_grad():
        column = scaled(**batch, labels=LABELS[:, None])
    torch.testing.assert_close(column.loss, out.loss)


def test_predict_returns_label_units():
    tokenizer = MolformerTokenizer.from_smiles(SMILES)
    model = tiny_model(target_mean=5.0, target_std=2.0, vocab_size=len(tokenizer))
    model.train()
    predictions = model.predict(SMILES, tokenizer, batch_size=2)
    assert model.training  # mode restored
    model.eval()
    batch = tokenizer(SMILES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits.view(-1)
    assert predictions.shape == (len(SMILES),)
    torch.testing.assert_close(predictions, expected, atol=1e-5, rtol=1e-5)
    assert model.predict([], tokenizer).numel() == 0


def test_sample_weight():
    model = tiny_model()
    batch = inputs()
    with torch.no_grad():
        unweighted = model(**batch, labels=LABELS).loss
        equal = model(**batch, labels=LABELS, sample_weight=torch.full((4,), 3.0)).loss
        weights = torch.tensor([1.0, 2.0, 0.0, 1.0])
        weighted = model(**batch, labels=LABELS, sample_weight=weights).loss
        keep = torch.tensor([0, 1, 3])
        dropped = model(**{k: v[keep] for k, v in batch.items()}, labels=LABELS[keep]).loss
        dropped_weighted = model(
            **{k: v[keep] for k, v in batch.items()}, labels=LABELS[keep], sample_weight=weights[keep]
        ).loss
        per_row = (model(**batch).logits.view(-1) - LABELS).square()
    torch.testing.assert_close(equal, unweighted)
    torch.testing.assert_close(weighted, dropped_weighted)  # zero weight == row left out
    torch.testing.assert_close(weighted, (weights * per_row).sum() / 4.0)
    assert not torch.allclose(weighted, dropped)  # the remaining weights do matter


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="regression_head"):
        tiny_config(regression_head="transformer")
    with pytest.raises(ValueError, match="regression_loss"):
        tiny_config(regression_loss="mae")
    with pytest.raises(ValueError, match="target_std"):
        tiny_config(target_std=0.0)


def _assert_same_model(loaded: MolformerForRegression, model: MolformerForRegression) -> None:
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0, msg=name)
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    options = dict(
        regression_head="mlp", regression_pooling="cls", regression_loss="huber", huber_delta=0.7,
        target_mean=-1.25, target_std=3.5,
    )  # fmt: skip
    model = tiny_model(**options)
    model.save_pretrained(tmp_path)
    loaded, info = MolformerForRegression.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, value in options.items():
        assert getattr(loaded.config, name) == value
    _assert_same_model(loaded, model)


def test_saved_folder_carries_code_and_auto_map(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    for name in (
        "configuration_molformer.py",
        "modeling_molformer.py",
        "modeling_molformer_reg.py",
        "config.json",
    ):
        assert (tmp_path / name).is_file(), name
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_molformer.MolformerConfig"
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_molformer_reg.MolformerForRegression"
    # in this process the native registration resolves it without remote code
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is MolformerForRegression
    _assert_same_model(loaded, model)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder, data = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    batch = torch.load(data)
    with torch.no_grad():
        logits = model(**batch).logits
    # the copied files were used, not the project's modules
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert not any(name.split(".")[0] in ("configuration_molformer", "modeling_molformer") for name in sys.modules)
    torch.save({"logits": logits, "class": type(model).__name__, "config": type(config).__name__}, data)
    """
)


def test_saved_folder_loads_with_trust_remote_code_in_clean_process(tmp_path):
    model = tiny_model()
    folder = tmp_path / "saved-model"
    model.save_pretrained(folder)
    data = tmp_path / "batch.pt"
    torch.save(inputs(), data)
    script = tmp_path / "load_remote.py"
    script.write_text(_REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    # -I: no PYTHONPATH, no script directory or cwd on sys.path, so the repo root cannot be imported
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(data)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(data)
    assert (remote["class"], remote["config"]) == ("MolformerForRegression", "MolformerConfig")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(**inputs()).logits, atol=0, rtol=0)


def test_auto_config_reads_regression_fields(tmp_path):
    tiny_model(regression_head="linear", target_mean=2.0).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MolformerConfig
    assert (config.regression_head, config.target_mean, config.num_labels) == ("linear", 2.0, 1)
