"""Native MoLFormer beyond the goldens: rotary past the table size, loading, redraw modes, gradients, dtypes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from helpers import micro_config
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForMaskedLM

from configuration_molformer import MolformerConfig
from modeling_molformer import (
    MolformerForMaskedLM,
    MolformerModel,
    MolformerSelfAttention,
    orthogonal_random_features,
    rotary_cos_sin,
)
from molft.model_utils import fixed_feature_maps

ASPIRIN_IDS = [0, 4, 4, 6, 12, 9, 7, 9, 5, 8, 5, 5, 5, 5, 5, 8, 4, 6, 12, 9, 7, 9, 1]
HUB_MODEL = "ibm/MoLFormer-XL-both-10pct"


tiny_config = micro_config


def randomised(model: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Every parameter random (LayerNorm affines and biases too), so that a missing term shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def batch(seq_len: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full length, right-padded, left-padded (pad id 2)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 24, (3, seq_len), generator=generator)
    input_ids[1, seq_len - 7 :] = 2
    input_ids[2, :5] = 2
    return input_ids, (input_ids != 2).long()


# --- an independent float64 implementation of the spec's forward -------------------------------------


def _rotate_complex(x: torch.Tensor) -> torch.Tensor:
    """Rotary as a complex rotation of the pairs (i, i + d/2) by position * 10000^(-2i/d)."""
    seq, dim = x.shape[1], x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * theta[None, :]  # [S, d/2]
    rotation = torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    z = torch.complex(x[..., : dim // 2], x[..., dim // 2 :]) * rotation
    return torch.cat((z.real, z.imag), dim=-1)


def _reference_layer(layer, x: torch.Tensor, mask: torch.Tensor, config: MolformerConfig) -> torch.Tensor:
    """One post-LN block with quadratic-form linear attention: sum_t phi(q_s)·phi(k_t) v_t / sum_t phi(q_s)·phi(k_t)."""
    attn = layer.attention.self
    batch_size, seq, hidden = x.shape
    heads = config.num_attention_heads

    def split(linear: nn.Linear) -> torch.Tensor:
        return F.linear(x, linear.weight, linear.bias).view(batch_size, seq, heads, hidden // heads)

    w = attn.feature_map.weight
    q = torch.relu(_rotate_complex(split(attn.query)) @ w)
    k = torch.relu(_rotate_complex(split(attn.key)) @ w)
    v = split(attn.value)
    scores = torch.einsum("bshm,bthm->bhst", q, k) * mask[:, None, None, :]
    numerator = torch.einsum("bhst,bthd->bshd", scores, v)
    denominator = scores.sum(-1).clamp(min=config.linear_attention_eps).transpose(1, 2)[..., None]
    context = (numerator / denominator).reshape(batch_size, seq, hidden)

    def norm(module: nn.LayerNorm, value: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(value, (hidden,), module.weight, module.bias, config.layer_norm_eps)

    out = layer.attention.output
    a = norm(out.LayerNorm, F.linear(context, out.dense.weight, out.dense.bias) + x)
    inner = F.gelu(F.linear(a, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
    return norm(
        layer.output.LayerNorm, F.linear(inner, layer.output.dense.weight, layer.output.dense.bias) + a
    )


def _reference_forward(model: MolformerModel, input_ids: torch.Tensor, mask: torch.Tensor):
    config = model.config
    hidden = model.embeddings.word_embeddings.weight[input_ids]
    states = [hidden]
    for layer in model.encoder.layer:
        hidden = _reference_layer(layer, hidden, mask.to(hidden.dtype), config)
        states.append(hidden)
    last = F.layer_norm(
        hidden, (config.hidden_size,), model.LayerNorm.weight, model.LayerNorm.bias, config.layer_norm_eps
    )
    weights = mask.to(last.dtype)[..., None]
    return last, (last * weights).sum(1) / weights.sum(1), states


# --- rotary -----------------------------------------------------------------------------------------


def test_rotary_tables_match_formula_past_max_positions():
    cos, sin = rotary_cos_sin(20, 8, device="cpu")
    assert cos.shape == sin.shape == (20, 8) and cos.dtype == torch.float32
    for pos in (0, 1, 7, 8, 19):  # 8 and 19 lie beyond max_position_embeddings=8 of the tiny config
        for i in range(8):
            angle = pos * 10000.0 ** (-2 * (i % 4) / 8)
            assert cos[pos, i].item() == pytest.approx(math.cos(angle), abs=2e-6)
            assert sin[pos, i].item() == pytest.approx(math.sin(angle), abs=2e-6)


def test_forward_matches_spec_reference_beyond_max_positions():
    model = randomised(MolformerModel(tiny_config())).double().eval()
    input_ids, mask = batch(seq_len=20)  # 20 > max_position_embeddings = 8
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        last, pooled, states = _reference_forward(model, input_ids, mask)
    # the model's angles are fp32 (as the reference's); ours are fp64, hence not bit-exact
    for got, want in zip(out.hidden_states, states, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=1e-5)


def test_pad_tokens_do_not_influence_real_tokens():
    model = randomised(MolformerModel(tiny_config())).eval()
    input_ids, mask = batch(seq_len=12)
    other_pads = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, 7))
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask)
        swapped = model(input_ids=other_pads, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], swapped.last_hidden_state[real])
    torch.testing.assert_close(out.pooler_output, swapped.pooler_output)
    assert torch.isfinite(out.last_hidden_state).all()  # pad query rows stay finite


@pytest.mark.parametrize("auto_class", [None, AutoModel])
def test_from_pretrained_keeps_outputs_and_rotary(tmp_path, auto_class):
    """transformers 5 builds the model on the meta device; rotary must not come from uninitialised buffers."""
    model = randomised(MolformerModel(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    loader = auto_class or MolformerModel
    loaded, info = loader.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert type(loaded) is MolformerModel
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("rotary" in name for name in loaded.state_dict())
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0, msg=name)
    input_ids, mask = batch(seq_len=20)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        after = loaded(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before, atol=0, rtol=0)


# --- random features --------------------------------------------------------------------------------


def test_orthogonal_random_features_structure():
    generator = torch.Generator().manual_seed(3)
    w = orthogonal_random_features(8, 12, generator=generator)
    assert w.shape == (8, 12)
    replay = torch.Generator().manual_seed(3)
    gaussians = [torch.randn(8, 8, generator=replay) for _ in range(2)]
    for block in (w[:, :8], w[:, 8:]):
        gram = block.T @ block
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-4  # columns of one block are orthogonal
    # column j of a block has the norm of row j of its Gaussian draw (the last block is truncated to 4)
    torch.testing.assert_close(w[:, :8].norm(dim=0), gaussians[0].norm(dim=1))
    torch.testing.assert_close(w[:, 8:].norm(dim=0), gaussians[1].norm(dim=1)[:4])


def _feature_weights(model: nn.Module) -> list[torch.Tensor]:
    return [layer.attention.self.feature_map.weight.clone() for layer in model.encoder.layer]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _changed(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_redraw_mode_train_redraws_in_train_only():
    model = MolformerModel(tiny_config(feature_map_redraw="train"))
    input_ids, mask = batch(seq_len=10)
    model.train()
    w0 = _feature_weights(model)
    model(input_ids=input_ids, attention_mask=mask)
    w1 = _feature_weights(model)
    model(input_ids=input_ids, attention_mask=mask)
    w2 = _feature_weights(model)
    assert _changed(w0, w1) and _changed(w1, w2)
    model.eval()
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        second = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert _same(_feature_weights(model), w2)
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_redraw_mode_always_redraws_in_eval():
    model = randomised(MolformerModel(tiny_config(feature_map_redraw="always"))).eval()
    input_ids, mask = batch(seq_len=10)
    w0 = _feature_weights(model)
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        w1 = _feature_weights(model)
        second = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert _changed(w0, w1) and _changed(w1, _feature_weights(model))
    assert not torch.allclose(first, second)


def test_redraw_mode_never_keeps_features_in_train():
    model = MolformerModel(tiny_config(feature_map_redraw="never")).train()
    input_ids, mask = batch(seq_len=10)
    w0 = _feature_weights(model)
    for _ in range(2):
        model(input_ids=input_ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert _same(_feature_weights(model), w0)


def test_hub_deterministic_eval_false_does_not_randomise_eval(golden_dir):
    hub = MolformerConfig.from_pretrained(golden_dir / "ibm-molformer-xl-hub")
    assert hub.deterministic_eval is False and hub.feature_map_redraw == "train"
    model = randomised(MolformerModel(tiny_config(deterministic_eval=False))).eval()
    input_ids, mask = batch(seq_len=10)
    w0 = _feature_weights(model)
    with torch.no_grad():
        outputs = [model(input_ids=input_ids, attention_mask=mask).pooler_output for _ in range(3)]
    assert _same(_feature_weights(model), w0)
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], atol=0, rtol=0)


class _Wrapper(nn.Module):
    """Stands in for a PEFT/Trainer wrapper: the MoLFormer config sits on an inner module."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner


def test_fixed_feature_maps_pins_features_and_restores_mode():
    model = MolformerForMaskedLM(tiny_config(feature_map_redraw="train")).train()
    input_ids, mask = batch(seq_len=10)
    w0 = _feature_weights(model.molformer)
    with fixed_feature_maps(_Wrapper(model)):
        assert model.config.feature_map_redraw == "never"
        for _ in range(2):
            model(input_ids=input_ids, attention_mask=mask)
        assert _same(_feature_weights(model.molformer), w0)
    assert model.config.feature_map_redraw == "train"
    model(input_ids=input_ids, attention_mask=mask)
    assert _changed(w0, _feature_weights(model.molformer))

    with pytest.raises(RuntimeError), fixed_feature_maps(model):
        raise RuntimeError("boom")
    assert model.config.feature_map_redraw == "train"
    with fixed_feature_maps(nn.Linear(2, 2)):  # no MoLFormer inside: a no-op
        pass


def test_model_feature_map_redraw_context_manager():
    model = MolformerModel(tiny_config(feature_map_redraw="never")).eval()
    input_ids, mask = batch(seq_len=10)
    w0 = _feature_weights(model)
    with model.feature_map_redraw("always"):
        model(input_ids=input_ids, attention_mask=mask)
    assert model.config.feature_map_redraw == "never"
    w1 = _feature_weights(model)
    assert _changed(w0, w1)
    model(input_ids=input_ids, attention_mask=mask)
    assert _same(_feature_weights(model), w1)


def test_redraw_feature_maps_is_reproducible_with_a_generator():
    a, b = MolformerModel(tiny_config()), MolformerModel(tiny_config())
    assert _changed(_feature_weights(a), _feature_weights(b))
    a.redraw_feature_maps(torch.Generator().manual_seed(5))
    b.redraw_feature_maps(torch.Generator().manual_seed(5))
    assert _same(_feature_weights(a), _feature_weights(b))


# --- gradients and dtypes ---------------------------------------------------------------------------


def _pooled_square_sum(model: MolformerModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=mask).pooler_output.square().sum()


def test_two_train_forwards_then_one_backward():
    """Two losses from one train-mode model (R-Drop, pairwise losses) must backpropagate through their own features."""
    model = MolformerModel(tiny_config(hidden_dropout_prob=0.0, embedding_dropout_prob=0.0)).train()
    input_ids, mask = batch(seq_len=10)
    torch.manual_seed(0)
    (_pooled_square_sum(model, input_ids, mask) + _pooled_square_sum(model, input_ids, mask)).backward()
    joint = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(0)  # the same two feature draws, one backward each
    _pooled_square_sum(model, input_ids, mask).backward()
    _pooled_square_sum(model, input_ids, mask).backward()
    for got, want in zip(joint, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want)


def test_activation_checkpointing_matches_plain_backward():
    model = randomised(MolformerModel(tiny_config())).train()  # redraws and dropout both active
    input_ids, mask = batch(seq_len=10)

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)
        _pooled_square_sum(model, input_ids, mask).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.activation_checkpointing_enable(
        {"use_reentrant": False}
    )  # what Trainer(gradient_checkpointing=True) calls
    assert model.encoder.gradient_checkpointing
    # checkpointing restores the RNG state for the recomputation, so redraws and dropout masks repeat
    for got, want in zip(gradients(), plain, strict=True):
        torch.testing.assert_close(got, want)
    model.activation_checkpointing_disable()
    assert not model.encoder.gradient_checkpointing


def test_attention_gradcheck_with_padding():
    config = tiny_config()
    attention = randomised(MolformerSelfAttention(config), seed=2).double().eval()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cos, sin = rotary_cos_sin(5, config.head_dim, "cpu", dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: attention(x, mask, cos, sin), (hidden,))


def test_model_gradcheck_wrt_inputs_embeds_with_padding():
    model = randomised(MolformerModel(tiny_config(num_hidden_layers=1)), seed=4).double().eval()
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs_embeds=x, attention_mask=mask)
        return out.last_hidden_state, out.pooler_output

    # fast mode checks random projections of the Jacobian: the full one is covered for attention above
    assert torch.autograd.gradcheck(forward, (embeds,), fast_mode=True)


def test_bf16_autocast_close_to_fp32():
    model = randomised(MolformerModel(tiny_config())).eval()
    input_ids, mask = batch(seq_len=20)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(input_ids=input_ids, attention_mask=mask)
    for name in ("last_hidden_state", "pooler_output"):
        got, want = getattr(mixed, name).float(), getattr(reference, name)
        assert torch.isfinite(got).all()
        relative = ((got - want).norm() / want.norm()).item()
        assert 0 < relative < 5e-2, (name, relative)  # > 0: autocast really ran in bf16


def test_bf16_weights_forward():
    model = randomised(MolformerModel(tiny_config())).eval()
    input_ids, mask = batch(seq_len=12)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        half = model.to(torch.bfloat16)(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert half.dtype == torch.bfloat16
    relative = ((half.float() - reference).norm() / reference.norm()).item()
    assert relative < 5e-2


def test_torch_compile_matches_eager():
    # backend="aot_eager" traces with dynamo and AOTAutograd (graph breaks fail with fullgraph=True) but
    # skips inductor's C++ code generation, which takes ~90 s on two CPU cores; see the slow test below.
    torch._dynamo.reset()
    model = randomised(MolformerModel(tiny_config(hidden_dropout_prob=0.0, embedding_dropout_prob=0.0)))
    input_ids, mask = batch(seq_len=12)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=input_ids, attention_mask=mask).last_hidden_state,
            model(input_ids=input_ids, attention_mask=mask).last_hidden_state,
        )
    model.train()
    with fixed_feature_maps(model):
        compiled(input_ids=input_ids, attention_mask=mask).pooler_output.square().sum().backward()
        compiled_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(input_ids=input_ids, attention_mask=mask).pooler_output.square().sum().backward()
    for got, want in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MOLFT_RUN_SLOW") != "1", reason="inductor compiles C++ for ~90 s; set MOLFT_RUN_SLOW=1"
)
def test_torch_compile_inductor_matches_eager():
    torch._dynamo.reset()
    model = randomised(MolformerModel(tiny_config())).eval()
    input_ids, mask = batch(seq_len=12)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=input_ids, attention_mask=mask).last_hidden_state,
            model(input_ids=input_ids, attention_mask=mask).last_hidden_state,
        )


# --- the real checkpoint ----------------------------------------------------------------------------


@pytest.mark.hub
@pytest.mark.slow
def test_hub_checkpoint_aspirin_numbers():
    input_ids = torch.tensor([ASPIRIN_IDS])
    mlm = AutoModelForMaskedLM.from_pretrained(HUB_MODEL).eval()
    base = AutoModel.from_pretrained(HUB_MODEL).eval()
    assert type(mlm) is MolformerForMaskedLM and type(base) is MolformerModel
    with torch.no_grad():
        logits = mlm(input_ids=input_ids).logits
        pooled = base(input_ids=input_ids).pooler_output
    expected_logits = torch.tensor(
        [[-12.1811, -12.2346, -12.3054], [-9.0371, -11.0436, -10.6556], [-8.2395, -9.6526, -9.6713]]
    )
    torch.testing.assert_close(logits[0, :3, :3], expected_logits, atol=1e-4, rtol=0)
    expected_pooled = torch.tensor([0.59427, 0.45265, 0.34374, 0.66782, -0.69957])
    torch.testing.assert_close(pooled[0, :5], expected_pooled, atol=1e-4, rtol=0)


def test_forward_mode_derivatives_stay_finite_on_padded_batches():
    """Padded rows hold constant hidden states whose LayerNorm tangents overflow in float32; they must not
    leak into keys or the pooled output (influence scores use forward-mode products)."""
    from modeling_molformer_reg import MolformerForRegression
    from molft.influence import InfluenceProblem, select_parameters

    torch.manual_seed(0)
    config = MolformerConfig.from_json_file(
        str(Path(__file__).resolve().parents[1] / "configs/molformer-tiny.json")
    )
    config.vocab_size = 20
    model = MolformerForRegression(config).eval()
    ids = torch.tensor([[0, 5, 6, 7, 1, 2, 2], [0, 5, 1, 2, 2, 2, 2], [0, 5, 6, 7, 8, 9, 1]])
    batch = {"input_ids": ids, "attention_mask": (ids != 2).long(), "labels": torch.tensor([1.0, 2.0, 0.5])}
    problem = InfluenceProblem(model, select_parameters(model, "all"))
    products = problem.grad_dot(batch, torch.randn(2, problem.num_params))
    assert products.dtype == torch.float32 and torch.isfinite(products).all()


def test_masked_lm_loss_normalised_by_num_items_in_batch():
    """Given the Trainer's token count over several micro-batches (or processes), the losses of the parts add
    up to the mean over all their masked tokens, as one large batch gives."""
    model = randomised(MolformerForMaskedLM(tiny_config())).eval()
    assert model.accepts_loss_kwargs  # the Trainer then passes num_items_in_batch and stops rescaling itself
    input_ids, mask = batch(seq_len=10)
    labels = torch.full_like(input_ids, -100)
    labels[0, [1, 2, 5]] = input_ids[0, [1, 2, 5]]
    labels[1, [3]] = input_ids[1, [3]]
    labels[2, [6, 8]] = input_ids[2, [6, 8]]
    with torch.no_grad():
        whole = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        parts = [
            model(
                input_ids=input_ids[rows],
                attention_mask=mask[rows],
                labels=labels[rows],
                num_items_in_batch=6,
            ).loss
            for rows in ([0], [1, 2])
        ]
        first_alone = model(input_ids=input_ids[:1], attention_mask=mask[:1], labels=labels[:1]).loss
    torch.testing.assert_close(parts[0] + parts[1], whole)
    torch.testing.assert_close(parts[0], first_alone * 3 / 6)  # a sum over its 3 tokens, divided by all 6
