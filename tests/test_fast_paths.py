"""MoLFormer fast paths: the same numbers as the plain path, the checkpoint's own names, no graph breaks."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from helpers import micro_config
from safetensors.torch import load_file
from torch.func import functional_call, grad, jvp, vmap
from torch.profiler import profile
from transformers import AutoModel

import modeling_molformer
from configuration_molformer import MolformerConfig
from modeling_molformer import (
    MolformerForMaskedLM,
    MolformerModel,
    MolformerSelfAttention,
    apply_rotary,
    apply_rotary_fast,
    reference_attention,
    rotary_cos_sin,
)
from modeling_molformer_reg import MolformerForRegression


def tiny_config(**overrides) -> MolformerConfig:
    return micro_config(**{"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 40, **overrides})


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and every layer's random features drawn from `seed`, so two models are the same."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.redraw_feature_maps(generator)
    return model


def padded_batch(seq_len: int = 14, rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """Full, right-padded and left-padded rows (pad id 2)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 24, (rows, seq_len), generator=generator)
    input_ids[1, seq_len - 5 :] = 2
    input_ids[2, :4] = 2
    return {"input_ids": input_ids, "attention_mask": (input_ids != 2).long()}


def use_plain_path(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, MolformerSelfAttention):
            module.forward = functools.partial(reference_attention, module)
    return model


# --- rotary -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_dtype", "table_dtype"),
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
)
def test_fast_rotary_is_bit_identical_to_the_reference_formula(x_dtype, table_dtype):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 11, 4, 16, generator=generator).to(x_dtype)  # [B, S, h, d], as the projections give
    cos, sin = rotary_cos_sin(11, 16, "cpu", dtype=table_dtype)
    reference = apply_rotary(rows.transpose(1, 2), cos, sin)  # the reference's [B, h, S, d] views
    fast = apply_rotary_fast(rows, cos[:, None], sin[:, None])
    assert fast.dtype == reference.dtype  # bf16 rows times fp32 tables compute in fp32, as the reference
    assert torch.equal(fast.transpose(1, 2), reference)
    # queries and keys together ([B, S, 2, h, d], the fused path's strided slice of the qkv output)
    stacked = torch.randn(3, 11, 3, 4, 16, generator=generator).to(x_dtype)[:, :, :2]
    both = apply_rotary_fast(stacked, cos[:, None, None], sin[:, None, None])
    assert torch.equal(both, apply_rotary(stacked, cos[:, None, None], sin[:, None, None]))


def test_fast_rotary_builds_one_temporary_instead_of_four():
    rows = torch.randn(4, 30, 6, 16)
    cos, sin = rotary_cos_sin(30, 16, "cpu")

    def allocated(fn) -> float:
        with profile(profile_memory=True) as prof:
            fn()
        positive = sum(event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0)
        return positive / (rows.numel() * rows.element_size())

    # reference: x*cos, -x2 (half), cat, rotated*sin, then the sum: 4.5 sizes of x; fast: result + 2 halves
    assert allocated(lambda: apply_rotary(rows.transpose(1, 2), cos, sin)) == pytest.approx(4.5)
    assert allocated(lambda: apply_rotary_fast(rows, cos[:, None], sin[:, None])) == pytest.approx(2.0)


# --- whole models: fast paths against the plain path -------------------------------------------------

MODEL_CLASSES = [MolformerModel, MolformerForMaskedLM, MolformerForRegression]


def first_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_default_and_fused_paths_equal_the_plain_path(model_class):
    batch = padded_batch()
    plain = use_plain_path(randomised(model_class(tiny_config())).eval())
    default = randomised(model_class(tiny_config())).eval()
    fused = randomised(model_class(tiny_config(fused_qkv=True))).eval()
    with torch.no_grad():
        want = first_output(plain, batch)
        assert torch.equal(first_output(default, batch), want)  # same ops, same order: bit for bit
        # one [H, 3H] matmul: bit-identical on this CPU, but a BLAS may reduce it in another order
        torch.testing.assert_close(first_output(fused, batch), want, atol=1e-6, rtol=1e-6)
        hidden = default(**batch, output_hidden_states=True).hidden_states
        plain_hidden = plain(**batch, output_hidden_states=True).hidden_states
    for got, expected in zip(hidden, plain_hidden, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_padding_free_keeps_every_real_token_and_zeros_the_padding(model_class, fused_qkv):
    batch = padded_batch(seq_len=16, rows=4)
    batch["input_ids"][3, 9:] = 2  # one more right-padded row: rows 1-3 padded, row 2 on the left
    batch["attention_mask"] = (batch["input_ids"] != 2).long()
    real = batch["attention_mask"].bool()
    plain = use_plain_path(randomised(model_class(tiny_config()))).eval()
    packed = randomised(model_class(tiny_config(padding_free=True, fused_qkv=fused_qkv))).eval()
    with torch.no_grad():
        want = plain(**batch, output_hidden_states=True)
        got = packed(**batch, output_hidden_states=True)
    for expected, output in zip(want.hidden_states, got.hidden_states, strict=True):
        torch.testing.assert_close(output[real], expected[real], atol=1e-6, rtol=1e-6)
        assert not output[~real].any()  # padded positions are zeros
    if model_class is MolformerModel:
        torch.testing.assert_close(
            got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-6, rtol=1e-6
        )
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-6, rtol=1e-6)
    elif model_class is MolformerForRegression:
        torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(got.logits[real], want.logits[real], atol=1e-6, rtol=1e-6)


def test_padding_free_trains_like_the_padded_layout():
    """Gradients, and a train-mode forward with dropout off (its masks are drawn over other shapes)."""
    batch = padded_batch()
    labels = torch.tensor([0.5, -1.0, 2.0])
    grads = {}
    for padding_free in (False, True):
        model = randomised(
            MolformerForRegression(
                tiny_config(padding_free=padding_free, hidden_dropout_prob=0.0, embedding_dropout_prob=0.0)
            )
        )
        with model.feature_map_redraw("never"):
            model.train()(**batch, labels=labels).loss.backward()
        grads[padding_free] = {name: param.grad for name, param in model.named_parameters()}
    for name, value in grads[True].items():
        assert value.abs().sum() > 0, name
        torch.testing.assert_close(value, grads[False][name], atol=1e-6, rtol=1e-5, msg=name)


def test_padding_free_steps_aside_where_shapes_must_not_depend_on_values():
    """Under torch.func transforms (influence) and torch.compile the padded layout runs, so both keep working."""
    model = randomised(MolformerModel(tiny_config(padding_free=True))).eval()
    batch = padded_batch()
    calls = []
    original = modeling_molformer.PackedTokens.__init__

    def counting(self, mask):
        calls.append(mask.shape)
        original(self, mask)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_molformer.PackedTokens, "__init__", counting)
        with torch.no_grad():
            model(**batch)
        assert len(calls) == 1  # eager: packed
        params = {name: param.detach() for name, param in model.named_parameters()}
        jvp(lambda theta: functional_call(model, theta, (), batch).pooler_output, (params,), (params,))
        vmap(lambda ids, mask: model(input_ids=ids[None], attention_mask=mask[None]).pooler_output)(
            batch["input_ids"], batch["attention_mask"]
        )
        explanation = torch._dynamo.explain(model)(**batch)
        assert len(calls) == 1 and explanation.graph_break_count == 0
        with torch.no_grad():
            model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1])  # no padding
        assert len(calls) == 2


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_gradients_match_the_plain_path(fused_qkv):
    batch = padded_batch()
    models = {
        "plain": use_plain_path(randomised(MolformerForRegression(tiny_config()))),
        "fast": randomised(MolformerForRegression(tiny_config(fused_qkv=fused_qkv))),
    }
    grads = {}
    for name, model in models.items():
        model.eval()  # no dropout, no redraw
        model(**batch, labels=torch.tensor([0.5, -1.0, 2.0])).loss.backward()
        grads[name] = {key: param.grad for key, param in model.named_parameters()}
    assert grads["fast"].keys() == grads["plain"].keys()
    for key, value in grads["fast"].items():
        assert value.abs().sum() > 0, key
        torch.testing.assert_close(value, grads["plain"][key], atol=1e-6, rtol=1e-5, msg=key)


def test_train_mode_redraw_and_dropout_follow_the_seed_on_every_path():
    batch = padded_batch()
    outputs = []
    for model in (
        use_plain_path(randomised(MolformerModel(tiny_config()))),
        randomised(MolformerModel(tiny_config())),
        randomised(MolformerModel(tiny_config(fused_qkv=True))),
    ):
        model.train()
        torch.manual_seed(3)
        outputs.append(model(**batch).pooler_output)
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)
    torch.testing.assert_close(outputs[2], outputs[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_per_sample_gradients_and_forward_mode_match_the_plain_path(fused_qkv):
    """What influence runs: functional_call with vmap(grad(...)) and jvp over the parameters."""
    batch = padded_batch()
    plain = use_plain_path(randomised(MolformerForRegression(tiny_config()))).eval()
    fast = randomised(MolformerForRegression(tiny_config(fused_qkv=fused_qkv))).eval()
    params = {name: param.detach() for name, param in plain.named_parameters()}
    labels = torch.tensor([0.5, -1.0, 2.0])

    def per_sample(model):
        def loss(theta, ids, mask, label):
            out = functional_call(model, theta, (ids[None], mask[None]))
            return (out.logits.view(-1) - label).square().sum()

        return vmap(grad(loss), in_dims=(None, 0, 0, 0))(
            params, batch["input_ids"], batch["attention_mask"], labels
        )

    def tangent_outputs(model):
        tangents = {name: torch.ones_like(value) * 1e-2 for name, value in params.items()}
        return jvp(lambda theta: functional_call(model, theta, (), batch).logits, (params,), (tangents,))

    want, got = per_sample(plain), per_sample(fast)
    for name in params:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    for got_t, want_t in zip(tangent_outputs(fast), tangent_outputs(plain), strict=True):
        assert torch.isfinite(got_t).all()
        torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=1e-5)


# --- fused qkv: the checkpoint's own weights ---------------------------------------------------------


def test_fused_qkv_loads_and_saves_the_separate_checkpoint_weights(tmp_path):
    unfused = randomised(MolformerModel(tiny_config())).eval()
    unfused.save_pretrained(tmp_path / "plain")
    fused, info = AutoModel.from_pretrained(tmp_path / "plain", fused_qkv=True, output_loading_info=True)
    fused.eval()
    assert fused.config.fused_qkv and not any(info.values()), info
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    batch = padded_batch()
    with torch.no_grad():
        want = unfused(**batch).last_hidden_state
        torch.testing.assert_close(fused(**batch).last_hidden_state, want, atol=1e-6, rtol=1e-6)

    fused.save_pretrained(tmp_path / "fused")
    names = set(load_file(tmp_path / "fused" / "model.safetensors"))
    assert names == set(load_file(tmp_path / "plain" / "model.safetensors"))  # Hub layout, no qkv tensor
    assert {
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.attention.self.value.bias",
    } <= names
    assert not any("qkv" in name for name in names)
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["fused_qkv"] is True
    reloaded = AutoModel.from_pretrained(tmp_path / "fused", fused_qkv=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).last_hidden_state, want, atol=1e-6, rtol=1e-6)


def test_fused_qkv_leaves_peft_wrapped_projections_to_their_own_forward():
    from peft import LoraConfig, get_peft_model

    batch = padded_batch()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    outputs = {}
    for fused_qkv in (False, True):
        base = randomised(MolformerModel(tiny_config(fused_qkv=fused_qkv))).eval()
        with torch.no_grad():
            outputs["base"] = base(**batch).last_hidden_state
        torch.manual_seed(0)  # the same random LoRA weights
        model = get_peft_model(base, lora).eval()
        attention = model.base_model.model.encoder.layer[0].attention.self
        assert attention._fusable() is False  # the LoRA layers must run
        with torch.no_grad():
            outputs[fused_qkv] = model(**batch).last_hidden_state
    assert torch.equal(outputs[True], outputs[False])
    assert not torch.allclose(outputs[True], outputs["base"])  # the adapters do act


# --- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_class", "fused_qkv", "train"),
    [
        (model_class, fused, train)
        for model_class in MODEL_CLASSES
        for fused, train in ((False, True), (True, False))
    ],
)
def test_torch_compile_captures_one_graph_without_breaks(model_class, fused_qkv, train):
    torch._dynamo.reset()
    model = model_class(tiny_config(fused_qkv=fused_qkv)).train(train)  # train: redraw and dropout inside
    batch = padded_batch()
    if model_class is MolformerForRegression:
        batch["labels"] = torch.tensor([0.5, -1.0, 2.0])
    explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dynamic_compile_serves_every_batch_shape_with_one_graph():
    """Length-grouped batches change shape at every step; one dynamic graph must serve them all."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = randomised(MolformerModel(tiny_config(fused_qkv=True))).eval()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows, seq_len in ((3, 9), (5, 14), (4, 21)):  # 21 > max_position_embeddings
            batch = padded_batch(seq_len=seq_len, rows=rows)
            torch.testing.assert_close(
                compiled(**batch).last_hidden_state, model(**batch).last_hidden_state, atol=1e-6, rtol=1e-6
            )
    assert len(graphs) == 1


# --- CUDA (skipped without a GPU) --------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_cuda_bf16_fast_paths_agree_with_the_plain_path(fused_qkv):
    batch = {key: value.cuda() for key, value in padded_batch(seq_len=40, rows=8).items()}
    plain = use_plain_path(randomised(MolformerModel(tiny_config())).cuda().eval())
    fast = randomised(MolformerModel(tiny_config(fused_qkv=fused_qkv))).cuda().eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fast(**batch).last_hidden_state, plain(**batch).last_hidden_state, atol=1e-5, rtol=1e-5
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = fast(**batch).last_hidden_state.float(), plain(**batch).last_hidden_state.float()
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.cuda
def test_cuda_inductor_compile_matches_eager():
    torch._dynamo.reset()
    batch = {key: value.cuda() for key, value in padded_batch(seq_len=40, rows=8).items()}
    model = randomised(MolformerModel(tiny_config(fused_qkv=True))).cuda().eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(**batch).last_hidden_state, model(**batch).last_hidden_state, atol=1e-4, rtol=1e-4
        )
