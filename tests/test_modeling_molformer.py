from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import modeling_molformer_reg  # noqa: F401  (registers the regression model)
from configuration_molformer import MolformerConfig
from modeling_molformer import MolformerForMaskedLM, MolformerModel

GOLDEN_CASES = [
    ("base", AutoModel, ["last_hidden_state", "pooler_output"]),
    ("masked-lm", AutoModelForMaskedLM, ["logits"]),
    ("sequence-regression", AutoModelForSequenceClassification, ["logits", "loss"]),
]


FAST_PATHS = {
    "default": {},  # the fast rotary is always on
    "fused_qkv": {"fused_qkv": True},
    "all": {"fused_qkv": True, "padding_free": True},
}


@pytest.mark.parametrize("fast_paths", list(FAST_PATHS))
@pytest.mark.parametrize(("folder", "auto_class", "outputs"), GOLDEN_CASES)
def test_golden_outputs_match_reference(golden_dir, folder, auto_class, outputs, fast_paths):
    """The reference's numbers with every fast path on. Padding-free leaves zeros at the padded positions
    of per-token outputs; every real token, the pooled output and the regression head must still match."""
    path = golden_dir / "molformer-tiny" / folder
    options = FAST_PATHS[fast_paths]
    model, info = auto_class.from_pretrained(path, output_loading_info=True, **options)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert all(getattr(model.config, key) is value for key, value in options.items())
    model.eval()
    io = load_file(path / "io.safetensors")
    kwargs = {"input_ids": io["input.input_ids"], "attention_mask": io["input.attention_mask"]}
    if "input.labels" in io:
        kwargs["labels"] = io["input.labels"]
    # row 3 is left-padded: the golden keeps positions 0..S-1 for it, as we do
    assert io["input.attention_mask"][3, 0] == 0
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
    real = io["input.attention_mask"].bool() if options.get("padding_free") else slice(None)
    per_token = {"last_hidden_state", "logits"} if folder != "sequence-regression" else set()
    for name in outputs:
        got, want = getattr(out, name), io[f"output.{name}"]
        if name in per_token:
            got, want = got[real], want[real]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for i in range(3):
        torch.testing.assert_close(
            out.hidden_states[i][real], io[f"output.hidden_states.{i}"][real], atol=1e-5, rtol=1e-5
        )


def test_xl_config_parameter_counts(golden_dir):
    config = MolformerConfig.from_pretrained(golden_dir / "ibm-molformer-xl-hub")
    with torch.device("meta"):
        base = MolformerModel(config)
        mlm = MolformerForMaskedLM(config)
    assert sum(p.numel() for p in base.parameters()) == 44_375_040
    assert sum(p.numel() for p in mlm.parameters()) == 46_781_184
    # the Hub's auto_map points at remote code and must be ignored
    assert getattr(config, "auto_map", None) is None
    assert config.feature_map_redraw == "train" and config.deterministic_eval is False
