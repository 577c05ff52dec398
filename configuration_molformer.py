"""MoLFormer configuration, field-compatible with the Hub's `ibm/MoLFormer-XL-both-10pct` config.json.

Kept importable on its own (no project imports) so that `save_pretrained` / `push_to_hub` can ship it for
`trust_remote_code` users.
"""

from __future__ import annotations

from transformers import PretrainedConfig

FEATURE_MAP_REDRAW_MODES = ("train", "always", "never")
REGRESSION_HEADS = ("molformer", "linear", "mlp")
REGRESSION_POOLINGS = ("mean", "cls")
REGRESSION_LOSSES = ("mse", "l1", "huber")
# what `save_pretrained` writes into auto_map for this project's own files (see register_for_auto_class)
NATIVE_AUTO_MAP_TARGETS = frozenset(
    {
        "configuration_molformer.MolformerConfig",
        "modeling_molformer.MolformerModel",
        "modeling_molformer.MolformerForMaskedLM",
        "modeling_molformer_reg.MolformerForRegression",
    }
)


class MolformerConfig(PretrainedConfig):
    """Configuration of MoLFormer (linear attention with rotary embeddings) and its task heads.

    Backbone fields keep the Hub names and XL defaults. Project-specific fields:

    * `feature_map_redraw` decides when the attention's random features are redrawn:
      ``"train"`` (default) redraws on every training forward and keeps them fixed in eval, which is the
      reference behaviour with deterministic evaluation; ``"always"`` also redraws in eval (what the Hub
      config's ``deterministic_eval=false`` does); ``"never"`` keeps the checkpoint's features (fixed random
      features). The Hub's `deterministic_eval` is kept for round-tripping but does not change behaviour, so
      evaluation is deterministic by default whatever the Hub config says; ask for ``"always"`` to get the
      Hub's non-deterministic evaluation.
    * `fused_qkv` computes query, key and value in one matmul over the checkpoint's three separate weights
      (which keep their names, so checkpoints load and save unchanged). Off by default: one matmul reduces
      in its own order on some backends (cuBLAS picks kernels by shape), so it is not bit-identical
      everywhere; it is within float32 rounding, and faster.
    * `padding_free` runs projections, LayerNorms and FFNs on the real tokens only (attention re-pads just
      for its sums over keys), which saves the padding's share of the compute on unsorted batches. Real
      tokens and pooled outputs keep their values; padded positions of `last_hidden_state` and
      `hidden_states` are zeros. Off by default; eager only (under torch.compile and torch.func transforms
      the padded layout runs).
    * `regression_*` and `target_mean` / `target_std` configure `MolformerForRegression`. The target
      statistics live here so that a saved model predicts in the label's own units: one number for one
      target, one list entry per target for several (`problem_type="regression"`, names in `id2label`).
    * `problem_type` (transformers' convention: regression, single_label_classification or
      multi_label_classification) chooses the loss; `class_weights` weights it: one weight per class for
      single-label classification, one positive-class weight per label for multi-label classification.
    """

    model_type = "molformer"

    def __init__(
        self,
        vocab_size: int = 2362,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 768,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        embedding_dropout_prob: float = 0.2,
        max_position_embeddings: int = 202,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        linear_attention_eps: float = 1e-6,
        num_random_features: int = 32,
        feature_map_kernel: str = "relu",
        deterministic_eval: bool = False,
        classifier_dropout_prob: float | None = None,
        classifier_skip_connection: bool = True,
        pad_token_id: int = 2,
        feature_map_redraw: str = "train",
        fused_qkv: bool = False,
        padding_free: bool = False,
        regression_head: str = "molformer",
        regression_pooling: str = "mean",
        regression_loss: str = "mse",
        huber_delta: float = 1.0,
        target_mean: float | list[float] = 0.0,
        target_std: float | list[float] = 1.0,
        class_weights: list[float] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("tie_word_embeddings", False)
        # The Hub config's auto_map points at remote code that does not run on transformers 5; this native
        # class replaces it. An auto_map naming only this project's own classes was written by save_pretrained
        # and is kept: loading a saved folder with trust_remote_code needs it.
        auto_map = kwargs.pop("auto_map", None)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if auto_map and all(isinstance(t, str) and t in NATIVE_AUTO_MAP_TARGETS for t in auto_map.values()):
            self.auto_map = auto_map
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.embedding_dropout_prob = embedding_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.linear_attention_eps = linear_attention_eps
        self.num_random_features = num_random_features
        self.feature_map_kernel = feature_map_kernel
        self.deterministic_eval = deterministic_eval
        self.classifier_dropout_prob = classifier_dropout_prob
        self.classifier_skip_connection = classifier_skip_connection
        self.feature_map_redraw = feature_map_redraw
        self.fused_qkv = bool(fused_qkv)
        self.padding_free = bool(padding_free)
        self.regression_head = regression_head
        self.regression_pooling = regression_pooling
        self.regression_loss = regression_loss
        self.huber_delta = huber_delta
        self.target_mean = _statistic(target_mean)
        self.target_std = _statistic(target_std)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self._validate_molformer()

    def _validate_molformer(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.feature_map_kernel != "relu":
            raise ValueError(
                f"Only the 'relu' feature map kernel exists in MoLFormer, got {self.feature_map_kernel!r}."
            )
        checks = {
            "feature_map_redraw": (self.feature_map_redraw, FEATURE_MAP_REDRAW_MODES),
            "regression_head": (self.regression_head, REGRESSION_HEADS),
            "regression_pooling": (self.regression_pooling, REGRESSION_POOLINGS),
            "regression_loss": (self.regression_loss, REGRESSION_LOSSES),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        stds = self.target_std if isinstance(self.target_std, list) else [self.target_std]
        if not all(std > 0 for std in stds):
            raise ValueError(f"target_std must be positive, got {self.target_std}.")
        if isinstance(self.target_mean, list) != isinstance(self.target_std, list) or (
            isinstance(self.target_mean, list) and len(self.target_mean) != len(self.target_std)
        ):
            raise ValueError(
                f"target_mean and target_std must both be numbers or lists of one length, got "
                f"{self.target_mean} and {self.target_std}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _statistic(value: float | list[float]) -> float | list[float]:
    """One target's statistic as a float; several targets' as a list of floats."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


__all__ = ["MolformerConfig"]
