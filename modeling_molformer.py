"""Native MoLFormer for transformers 5: linear attention with rotary embeddings and ReLU random features.

Checkpoint-compatible with `ibm/MoLFormer-XL-both-10pct` (same state-dict names), without `trust_remote_code`.
Two deliberate differences from the Hub code, both because it is wrong on transformers 5:

* Rotary tables are computed from the sequence length at every forward instead of being cached in buffers
  that `from_pretrained`'s meta-device initialisation leaves uninitialised (the Hub code then gives NaN).
  The values are the same fp32 ops as the reference table, so outputs match it, and inputs longer than
  `max_position_embeddings` need no table growth.
* When the random features are redrawn is an explicit config choice (`feature_map_redraw`), and evaluation
  is deterministic by default.

Fast paths that keep the checkpoint and the numbers (benchmarks/bench_fast_paths.py times each beside the
plain one, `reference_attention`): rotary is applied with one temporary instead of four (the reference
formula's products and sums, bit for bit); `config.fused_qkv` computes query, key
and value in one matmul from the checkpoint's own three weights (the state dict keeps their names, so
checkpoints load and save unchanged); `config.padding_free` runs everything but the attention's sums on the
real tokens alone (`PackedTokens`); the forward has no data-dependent Python branches, so
`torch.compile(model, fullgraph=True)` captures it whole, train-mode redraws included.

Only relative imports among the modeling files, so `save_pretrained` can ship them for remote-code users.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedLMOutput

try:  # a package (remote code, or the project imported as one)
    from .configuration_molformer import MolformerConfig
except ImportError:  # top-level module next to the scripts
    from configuration_molformer import MolformerConfig


def orthogonal_random_features(head_dim: int, num_features: int, device=None, generator=None) -> torch.Tensor:
    """Blocks of orthogonal Gaussian features, [head_dim, num_features], as the reference draws them."""
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, device=device, generator=generator, dtype=torch.float32)
        q, _ = torch.linalg.qr(gaussian, mode="reduced")
        blocks.append(q * gaussian.norm(dim=1)[None, :])
    return torch.cat(blocks, dim=1)[:, :num_features]


def rotary_cos_sin(seq_len: int, dim: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, dim] for rotate-half rotary embeddings, in fp32 as the reference."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference formula (kept as the plain path the fast one is checked and timed against)."""
    return x * cos + rotate_half(x) * sin


def apply_rotary_fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` with one half-size temporary per half instead of four full-size ones, bit-identical.

    The tables repeat their first half (`emb = cat(freqs, freqs)`), so with s the half-width sine the reference
    computes `x1*c + (-x2)*s` and `x2*c + x1*s`. Negation is exact, so subtracting `x2*s` from `x1*c` in place
    rounds identically; the rotated copy, the negated half and the second full product are never built.
    `cos`/`sin` broadcast against x ([S, d] for [.., S, d], [S, 1, d] for [B, S, h, d], ...).
    """
    half = x.shape[-1] // 2
    s = sin[..., :half]
    out = x * cos
    out[..., :half].sub_(x[..., half:] * s)
    out[..., half:].add_(x[..., :half] * s)
    return out


class MolformerFeatureMap(nn.Module):
    """phi(x) = relu(x @ W) with W [head_dim, m] shared by all heads of a layer (a persistent buffer)."""

    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_features = config.num_random_features
        self.register_buffer(
            "weight", orthogonal_random_features(self.head_dim, self.num_features), persistent=True
        )

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        self.weight.copy_(
            orthogonal_random_features(self.head_dim, self.num_features, self.weight.device, generator)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a copy: a later in-place redraw must not change the features an earlier forward's graph saved
        return torch.relu(x @ self.weight.to(x.dtype, copy=True))


class MolformerEmbeddings(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.dropout = nn.Dropout(config.embedding_dropout_prob)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        return self.dropout(inputs_embeds)


class PackedTokens:
    """The real tokens of a padded batch as [T, ...] rows: the layout of `config.padding_free`.

    Only attention mixes tokens, and linear attention needs nothing but per-molecule sums over keys, so every
    projection, LayerNorm and FFN runs on the T real tokens alone; attention unpacks phi(q), phi(k) and v into
    [B, S, ...] with zeros at the padding for those sums (the reference's shapes and op order) and packs its
    result again. Rotary positions stay the columns of the padded batch, as in the reference.
    """

    def __init__(self, attention_mask: torch.Tensor):
        self.mask = attention_mask
        self.batch, self.seq = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # flat positions of the real tokens
        self.positions = self.index % self.seq

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...]"""
        return padded.reshape(self.batch * self.seq, *padded.shape[2:]).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...], zeros at the padding."""
        rows = packed.new_zeros(self.batch * self.seq, *packed.shape[1:]).index_copy(0, self.index, packed)
        return rows.view(self.batch, self.seq, *packed.shape[1:])


class MolformerSelfAttention(nn.Module):
    """Linear attention: all heads in one batched matmul chain, O(S·m·d) per head.

    Rotary and the feature map run on the projections' own [B, S, h, d] rows (contiguous, so the feature map's
    matmul copies nothing); the sums over keys then run in the reference's [B, h, S, *] shapes and order.
    """

    # the rotary implementation; `reference_attention` is the plain path that tests and benchmarks compare with
    rotary = staticmethod(apply_rotary_fast)

    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.eps = config.linear_attention_eps
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.feature_map = MolformerFeatureMap(config)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def _fusable(self) -> bool:
        """Fuse only plain Linear projections: a PEFT-wrapped one (LoRA, IA3) must run its own forward."""
        return self.config.fused_qkv and all(type(m) is nn.Linear for m in (self.query, self.key, self.value))

    def _features(self, hidden_states, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(rotary(q)), phi(rotary(k)) [*, h, m] and v [*, h, d] for tokens [*] = [B, S] or packed [T].

        `cos`/`sin` hold one row per position of the token axis just before the heads: [S, d] or [T, d].
        """
        heads = (*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        if self._fusable():
            # one [H, 3H] matmul over the three checkpoint weights, concatenated at every call (cheap next to
            # the matmul), so parameters, names, gradients and `functional_call` swaps stay the separate ones
            weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))
            bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))
            qkv = nn.functional.linear(hidden_states, weight, bias).view(*heads[:-2], 3, *heads[-2:])
            qk = self.feature_map(self.rotary(qkv[..., :2, :, :], cos[:, None, None], sin[:, None, None]))
            return qk[..., 0, :, :], qk[..., 1, :, :], qkv[..., 2, :, :]
        cos, sin = cos[:, None], sin[:, None]
        q = self.feature_map(self.rotary(self.query(hidden_states).view(heads), cos, sin))
        k = self.feature_map(self.rotary(self.key(hidden_states).view(heads), cos, sin))
        return q, k, self.value(hidden_states).view(heads)

    def forward(self, hidden_states, attention_mask: torch.Tensor | PackedTokens, cos, sin):
        """[B, S, H] with a [B, S] mask, or packed [T, H] with the `PackedTokens` of the batch."""
        if _should_redraw(self.config.feature_map_redraw, self.training):
            self.feature_map.redraw()
        q, k, v = self._features(hidden_states, cos, sin)
        packed = attention_mask if isinstance(attention_mask, PackedTokens) else None
        if packed is not None:
            q, k, v = packed.unpack(q), packed.unpack(k), packed.unpack(v)
            attention_mask = packed.mask
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, S, *]
        # keys in the reference's memory layout, so the sum over them reduces in the same order (bit-identical);
        # the matmul with v would copy them anyway
        context = self._attend(q, k.contiguous(), v, attention_mask)
        return context if packed is None else packed.pack(context)

    def _attend(self, q, k, v, attention_mask) -> torch.Tensor:
        """Linear attention over phi(q), phi(k), v [B, h, S, *] -> [B, S, H], in the reference's op order."""
        # where, not a product: padded rows must not leak a non-finite value (e.g. a forward-mode tangent of a
        # constant row's LayerNorm) into the sums over keys
        k = torch.where(attention_mask[:, None, :, None].bool(), k, 0.0)
        kv = k.transpose(-1, -2) @ v  # [B, h, m, d]
        denominator = (q @ k.sum(dim=2).unsqueeze(-1)).clamp(min=self.eps)  # [B, h, S, 1]
        context = (q @ kv) / denominator
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)


def reference_attention(
    attention: MolformerSelfAttention, hidden_states, attention_mask, cos, sin
) -> torch.Tensor:
    """The plain path: the reference's rotary formula on [B, h, S, d] views, separate projections.

    Outputs equal `attention(...)` bit for bit; kept as the baseline of tests and benchmarks (which set it
    as a module's forward with `functools.partial(reference_attention, module)`).
    """
    if _should_redraw(attention.config.feature_map_redraw, attention.training):
        attention.feature_map.redraw()
    q = apply_rotary(attention._split_heads(attention.query(hidden_states)), cos, sin)
    k = apply_rotary(attention._split_heads(attention.key(hidden_states)), cos, sin)
    v = attention._split_heads(attention.value(hidden_states))
    return attention._attend(attention.feature_map(q), attention.feature_map(k), v, attention_mask)


def _should_redraw(mode: str, training: bool) -> bool:
    return mode == "always" or (mode == "train" and training)


class MolformerSelfOutput(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class MolformerAttention(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.self = MolformerSelfAttention(config)
        self.output = MolformerSelfOutput(config)

    def forward(self, hidden_states, attention_mask, cos, sin):
        return self.output(self.self(hidden_states, attention_mask, cos, sin), hidden_states)


class MolformerIntermediate(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class MolformerOutput(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class MolformerLayer(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.attention = MolformerAttention(config)
        self.intermediate = MolformerIntermediate(config)
        self.output = MolformerOutput(config)

    def forward(self, hidden_states, attention_mask, cos, sin):
        attention_output = self.attention(hidden_states, attention_mask, cos, sin)
        return self.output(self.intermediate(attention_output), attention_output)


class MolformerEncoder(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.layer = nn.ModuleList([MolformerLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        # set with the flag by PreTrainedModel._set_gradient_checkpointing (gradient_checkpointing_enable)
        self._gradient_checkpointing_func = None

    def forward(self, hidden_states, attention_mask, cos, sin, output_hidden_states: bool = False):
        all_hidden = (hidden_states,) if output_hidden_states else None
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer, hidden_states, attention_mask, cos, sin
                )
            else:
                hidden_states = layer(hidden_states, attention_mask, cos, sin)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
        return hidden_states, all_hidden


class MolformerPreTrainedModel(PreTrainedModel):
    config_class = MolformerConfig
    base_model_prefix = "molformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MolformerLayer"]
    # an old Hub checkpoint may carry cached rotary tables; they are recomputed here, never loaded
    _keys_to_ignore_on_load_unexpected = [r"rotary", r"position_ids"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MolformerFeatureMap) and not getattr(
            module.weight, "_is_hf_initialized", False
        ):
            module.weight.copy_(
                orthogonal_random_features(module.head_dim, module.num_features, module.weight.device)
            )

    def redraw_feature_maps(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in every layer (the buffers that `save_pretrained` writes)."""
        for module in self.modules():
            if isinstance(module, MolformerFeatureMap):
                module.redraw(generator)

    @contextmanager
    def feature_map_redraw(self, mode: str) -> Iterator[None]:
        """Temporarily set `config.feature_map_redraw` (e.g. "never" for MC dropout or influence)."""
        previous = self.config.feature_map_redraw
        self.config.feature_map_redraw = mode
        try:
            yield
        finally:
            self.config.feature_map_redraw = previous


class MolformerModel(MolformerPreTrainedModel):
    """Bare encoder. `pooler_output` is the masked mean of the last hidden state (the reference pooler)."""

    def __init__(self, config: MolformerConfig):
        super().__init__(config)
        self.embeddings = MolformerEmbeddings(config)
        self.encoder = MolformerEncoder(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def _packed_tokens(self, attention_mask: torch.Tensor, embeddings: torch.Tensor) -> PackedTokens | None:
        """The padding-free layout when `config.padding_free` asks for it and it can run.

        Finding the real tokens is data-dependent (a host sync and a shape that depends on values): under
        torch.compile and inside torch.func transforms (influence's vmap/grad/jvp) the padded layout runs,
        and a batch without padding gains nothing from packing.
        """
        if not self.config.padding_free or torch.compiler.is_compiling():
            return None
        if torch._C._functorch.is_functorch_wrapped_tensor(embeddings):
            return None
        packed = PackedTokens(attention_mask)
        return None if packed.index.numel() == attention_mask.numel() else packed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embeddings = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        batch, seq = embeddings.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, device=embeddings.device, dtype=torch.long)
        cos, sin = rotary_cos_sin(seq, self.config.head_dim, embeddings.device, dtype=embeddings.dtype)
        packed = self._packed_tokens(attention_mask, embeddings)
        if packed is None:
            hidden, all_hidden = self.encoder(
                embeddings, attention_mask, cos, sin, output_hidden_states=output_hidden_states
            )
            last_hidden_state = self.LayerNorm(hidden)
        else:
            cos, sin = cos[packed.positions], sin[packed.positions]
            hidden, all_hidden = self.encoder(
                packed.pack(embeddings), packed, cos, sin, output_hidden_states=output_hidden_states
            )
            last_hidden_state = packed.unpack(self.LayerNorm(hidden))
            all_hidden = tuple(packed.unpack(h) for h in all_hidden) if all_hidden else None
        mask = attention_mask.unsqueeze(-1)
        real = torch.where(mask.bool(), last_hidden_state, 0.0)
        pooled = real.sum(dim=1) / mask.sum(dim=1).to(real.dtype).clamp(min=1e-9)
        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, all_hidden) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_hidden
        )


class MolformerLMPredictionTransform(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class MolformerLMHead(nn.Module):
    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.transform = MolformerLMPredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class MolformerForMaskedLM(MolformerPreTrainedModel):
    """The Hub checkpoint's architecture: encoder plus an untied masked-LM head.

    Given `num_items_in_batch` (the Trainer's count of masked tokens over all gradient-accumulation steps and,
    with `average_tokens_across_devices`, all processes), the loss is the summed cross-entropy over it, so
    accumulated and multi-process training average over tokens exactly as one large batch does. Without it
    (evaluation, plain calls) it is the batch's mean. The Trainer scales the loss for both cases by itself.
    """

    # the loss is normalised by `num_items_in_batch` when one is passed (see above)
    accepts_loss_kwargs = True

    def __init__(self, config: MolformerConfig):
        super().__init__(config)
        self.molformer = MolformerModel(config)
        self.lm_head = MolformerLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head.decoder = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.molformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            num_items = kwargs.get("num_items_in_batch")
            loss = nn.functional.cross_entropy(
                logits.view(-1, self.config.vocab_size).float(),
                labels.view(-1).to(logits.device),
                ignore_index=-100,
                reduction="mean" if num_items is None else "sum",
            )
            if num_items is not None:
                loss = loss / num_items
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "MolformerForMaskedLM",
    "MolformerModel",
    "MolformerPreTrainedModel",
    "PackedTokens",
    "apply_rotary",
    "apply_rotary_fast",
    "reference_attention",
    "orthogonal_random_features",
    "rotary_cos_sin",
]


def _register() -> None:
    """Make `Auto*` classes resolve model_type "molformer" natively, and let saved folders carry this code."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    AutoConfig.register("molformer", MolformerConfig, exist_ok=True)
    AutoModel.register(MolformerConfig, MolformerModel, exist_ok=True)
    AutoModelForMaskedLM.register(MolformerConfig, MolformerForMaskedLM, exist_ok=True)
    MolformerConfig.register_for_auto_class()
    MolformerModel.register_for_auto_class("AutoModel")
    MolformerForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")


_register()
