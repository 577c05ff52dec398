"""molft.peft_setup: which parameters each method trains (counted by hand), and reloading checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from modeling_molformer_reg import MolformerForRegression
from molft.files import BASE_MODEL_DIR
from molft.peft_setup import PeftOptions, apply_peft, load_regression_checkpoint, trainable_parameters

VOCAB = 40
# configs/molformer-tiny.json: hidden 32, 2 layers, FFN 32, the reference two-layer head
EMBEDDINGS = VOCAB * 32
PER_LAYER = 3 * (32 * 32 + 32) + (32 * 32 + 32 + 2 * 32) + (32 * 32 + 32) + (32 * 32 + 32 + 2 * 32)
HEAD = 2 * (32 * 32 + 32) + (32 + 1)
TOTAL = EMBEDDINGS + 2 * PER_LAYER + 2 * 32 + HEAD  # + the final LayerNorm
LAYER_BIASES = 8 * 32  # q, k, v, attention output, its LayerNorm, FFN in, FFN out, its LayerNorm


def tiny_model(seed: int = 0, **overrides) -> MolformerForRegression:
    torch.manual_seed(seed)
    return MolformerForRegression(tiny_config(vocab_size=VOCAB, **overrides))


def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(4, VOCAB, (3, 8), generator=torch.Generator().manual_seed(3))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def trainable_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


@torch.no_grad()
def predict(model) -> torch.Tensor:
    return model.eval()(**batch()).logits.view(-1)


def test_hand_count_matches_the_model():
    assert sum(p.numel() for p in tiny_model().parameters()) == TOTAL == 16417


def test_full_fine_tuning_trains_everything():
    model = tiny_model()
    assert apply_peft(model, PeftOptions(peft="none")) is model
    assert trainable_parameters(model) == {
        "trainable_params": TOTAL,
        "total_params": TOTAL,
        "trainable_share": 1.0,
    }


def test_bitfit_trains_only_biases_and_the_head():
    model = apply_peft(tiny_model(), PeftOptions(peft="bitfit"))
    names = trainable_names(model)
    assert names and all(n.endswith(".bias") or n.startswith("classifier.") for n in names)
    assert (
        "classifier.dense.weight" in names
        and "molformer.encoder.layer.0.attention.self.query.weight" not in names
    )
    counts = trainable_parameters(model)
    assert counts["trainable_params"] == 2 * LAYER_BIASES + 32 + HEAD == 2689
    assert counts["total_params"] == TOTAL
    assert counts["trainable_share"] == pytest.approx(2689 / TOTAL)


def test_lora_trains_only_adapters_and_the_head_and_starts_as_the_base():
    base = tiny_model()
    before = predict(base)
    model = apply_peft(base, PeftOptions(peft="lora", lora_r=4))
    names = trainable_names(model)
    assert all("lora_" in n or ".classifier.modules_to_save." in n for n in names)
    # every default target of both layers is adapted, the head never is
    lora_modules = {n.split(".lora_")[0] for n in names if "lora_" in n}
    suffixes = {m.split("layer.")[1][2:] for m in lora_modules}
    assert suffixes == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert len(lora_modules) == 12 and not any("classifier" in m for m in lora_modules)
    adapters = 12 * 4 * (32 + 32)  # r x (in + out) per adapted 32x32 linear
    counts = trainable_parameters(model)
    assert counts == {
        "trainable_params": adapters + HEAD,
        "total_params": TOTAL + adapters,  # peft's frozen copy of the head is not counted
        "trainable_share": (adapters + HEAD) / (TOTAL + adapters),
    }
    torch.testing.assert_close(predict(model), before)  # B = 0: LoRA starts as the base model


def test_lora_comma_list_targets():
    model = apply_peft(tiny_model(), PeftOptions(peft="lora", lora_r=2, lora_target_modules="query,value"))
    lora_modules = {n.split(".lora_")[0] for n in trainable_names(model) if "lora_" in n}
    assert {m.rsplit(".", 1)[1] for m in lora_modules} == {"query", "value"} and len(lora_modules) == 4
    assert trainable_parameters(model)["trainable_params"] == 4 * 2 * 64 + HEAD


def test_ia3_trains_only_scalings_and_the_head():
    base = tiny_model()
    before = predict(base)
    model = apply_peft(base, PeftOptions(peft="ia3"))
    names = trainable_names(model)
    assert all("ia3_l" in n or ".classifier.modules_to_save." in n for n in names)
    scaled = sorted(n.split("layer.")[1].split(".ia3_l")[0] for n in names if "ia3_l" in n)
    assert scaled == [
        f"{i}.{m}" for i in (0, 1) for m in ("attention.self.key", "attention.self.value", "output.dense")
    ]
    assert trainable_parameters(model)["trainable_params"] == 2 * 3 * 32 + HEAD == 2337
    torch.testing.assert_close(predict(model), before)  # all scalings 1: IA3 starts as the base model


def test_ia3_init_value():
    model = apply_peft(tiny_model(), PeftOptions(peft="ia3", ia3_init_value=0.5))
    scalings = [p for n, p in model.named_parameters() if "ia3_l" in n]
    assert len(scalings) == 6 and all(torch.all(p == 0.5) for p in scalings)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="--peft must be one of"):
        apply_peft(tiny_model(), PeftOptions(peft="prefix"))


def _train_a_little(model) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))


def test_full_checkpoint_reloads(tmp_path):
    model = apply_peft(tiny_model(target_mean=3.0, target_std=2.0), PeftOptions(peft="bitfit"))
    _train_a_little(model)
    model.save_pretrained(tmp_path / "run")
    reloaded = load_regression_checkpoint(tmp_path / "run")
    torch.testing.assert_close(predict(reloaded), predict(model))


@pytest.fixture
def adapter_run(tmp_path) -> tuple[Path, torch.Tensor]:
    """An adapter saved like run_regression.py saves it: base in <run>/base_model, run config next to it."""
    base = tiny_model(target_mean=3.0, target_std=2.0)
    run = tmp_path / "run"
    base.save_pretrained(run / BASE_MODEL_DIR)
    model = apply_peft(base, PeftOptions(peft="lora", lora_r=2))
    model.peft_config["default"].base_model_name_or_path = str(run / BASE_MODEL_DIR)
    _train_a_little(model)
    model.save_pretrained(run)
    model.base_model.model.config.save_pretrained(run)
    return run, predict(model)


def test_adapter_reloads_on_its_base(adapter_run):
    run, expected = adapter_run
    torch.testing.assert_close(predict(load_regression_checkpoint(run)), expected)


def test_moved_run_directory_still_finds_its_base(adapter_run, tmp_path):
    run, expected = adapter_run
    moved = shutil.move(run, tmp_path / "elsewhere")
    torch.testing.assert_close(predict(load_regression_checkpoint(moved)), expected)


def test_missing_base_is_a_clear_error(adapter_run):
    run, _ = adapter_run
    shutil.rmtree(run / BASE_MODEL_DIR)
    with pytest.raises(FileNotFoundError, match="was not found"):
        load_regression_checkpoint(run)
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (run / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not name its base model"):
        load_regression_checkpoint(run)


def test_missing_base_advice_is_what_every_script_accepts(adapter_run):
    """run_regression.py has no --base_model: the fix it can use is the adapter's own config (or the folder)."""
    run, expected = adapter_run
    moved_base = shutil.move(run / BASE_MODEL_DIR, run.parent / "kept_base")
    with pytest.raises(FileNotFoundError) as error:
        load_regression_checkpoint(run)
    message = str(error.value)
    assert (
        "restore that folder, or set base_model_name_or_path in " + str(run / "adapter_config.json")
        in message
    )
    assert "run_influence.py and run_selection.py also take --base_model" in message
    # the advice works: the adapter config pointed at the moved base reloads the same model
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(moved_base)
    (run / "adapter_config.json").write_text(json.dumps(config))
    torch.testing.assert_close(predict(load_regression_checkpoint(run)), expected)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_corrupt_full_checkpoint_names_its_file(tmp_path):
    tiny_model().save_pretrained(tmp_path / "run")
    _truncate(tmp_path / "run" / "model.safetensors")
    with pytest.raises(
        ValueError, match=rf"{tmp_path}/run/model.safetensors cannot be read, it is truncated"
    ):
        load_regression_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", f"{BASE_MODEL_DIR}/model.safetensors"])
def test_corrupt_adapter_or_base_names_its_file(damaged, adapter_run):
    run, _ = adapter_run
    _truncate(run / damaged)
    with pytest.raises(ValueError, match=rf"{run / damaged} cannot be read, it is truncated or corrupt"):
        load_regression_checkpoint(run)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_regression_checkpoint(tmp_path / "nothing")
    with pytest.raises(ValueError, match="neither a model checkpoint"):
        load_regression_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model, not a MoLFormer"):
        load_regression_checkpoint(tmp_path)
