"""MolformerForRegression: MoLFormer plus a regression head whose predictions come out in label units.

The model normalises labels with `config.target_mean` / `config.target_std` inside the loss and de-normalises
its outputs, so `logits` and `predict` are always in the label's own units and a saved model needs no
separate scaler file. With the defaults (mean 0, std 1, "molformer" head, MSE) it is the reference
`MolformerForSequenceClassification` with one label, and loads its checkpoints key for key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput

try:
    from .configuration_molformer import MolformerConfig
    from .modeling_molformer import MolformerModel, MolformerPreTrainedModel
except ImportError:
    from configuration_molformer import MolformerConfig
    from modeling_molformer import MolformerModel, MolformerPreTrainedModel


def _head_dropout(config: MolformerConfig) -> float:
    if config.classifier_dropout_prob is not None:
        return config.classifier_dropout_prob
    return config.hidden_dropout_prob


class MolformerClassificationHead(nn.Module):
    """The reference two-layer head with skip connections (`classifier.dense`, `.dense2`, `.out_proj`)."""

    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.dropout = nn.Dropout(_head_dropout(config))
        self.act = ACT2FN[config.hidden_act]
        self.skip = config.classifier_skip_connection

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.dropout(self.dense(pooled)))
        if self.skip:
            hidden = hidden + pooled
        hidden2 = self.act(self.dropout(self.dense2(hidden)))
        if self.skip:
            hidden2 = hidden2 + hidden
        return self.out_proj(hidden2)


class MolformerMLPHead(nn.Module):
    """Two layers with ReLU and dropout (`classifier.dense`, `classifier.out_proj`)."""

    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(_head_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.relu(self.dense(self.dropout(pooled)))))


class MolformerLinearHead(nn.Module):
    """Dropout then one linear layer (`classifier.out_proj`): a linear probe when the encoder is frozen."""

    def __init__(self, config: MolformerConfig):
        super().__init__()
        self.dropout = nn.Dropout(_head_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(pooled))


REGRESSION_HEAD_CLASSES = {
    "molformer": MolformerClassificationHead,
    "mlp": MolformerMLPHead,
    "linear": MolformerLinearHead,
}


class MolformerForRegression(MolformerPreTrainedModel):
    """MoLFormer encoder, pooling (`mean` or `cls`), a head under `classifier.*`, and an MSE/L1/Huber loss.

    `sample_weight` (one weight per molecule) turns the loss into a weighted mean, sum(w·l) / sum(w), so a
    zero weight is the same as leaving the molecule out of the batch and equal weights change nothing.
    """

    # forward takes **kwargs but its loss is a per-batch mean, not normalised by `num_items_in_batch`: the
    # Trainer must scale it for gradient accumulation and multi-process training itself
    accepts_loss_kwargs = False

    def __init__(self, config: MolformerConfig):
        super().__init__(config)
        config.num_labels = 1
        config.problem_type = "regression"
        self.molformer = MolformerModel(config)
        self.classifier = REGRESSION_HEAD_CLASSES[config.regression_head](config)
        self.post_init()

    def pool(self, last_hidden_state: torch.Tensor, pooler_output: torch.Tensor) -> torch.Tensor:
        if self.config.regression_pooling == "cls":
            return last_hidden_state[:, 0]
        return pooler_output

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled representation the head sees (used for diversity, valuation and shift diagnostics)."""
        outputs = self.molformer(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return self.pool(outputs.last_hidden_state, outputs.pooler_output)

    def per_sample_loss(self, normalised_pred: torch.Tensor, normalised_target: torch.Tensor) -> torch.Tensor:
        kind = self.config.regression_loss
        if kind == "mse":
            return (normalised_pred - normalised_target) ** 2
        if kind == "l1":
            return (normalised_pred - normalised_target).abs()
        return nn.functional.huber_loss(
            normalised_pred, normalised_target, reduction="none", delta=self.config.huber_delta
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.molformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        normalised = self.classifier(self.pool(outputs.last_hidden_state, outputs.pooler_output))
        mean, std = self.config.target_mean, self.config.target_std
        logits = normalised * std + mean
        loss = None
        if labels is not None:
            target = (labels.to(normalised.dtype).view(-1) - mean) / std
            losses = self.per_sample_loss(normalised.view(-1).float(), target.float())
            if sample_weight is None:
                loss = losses.mean()
            else:
                weight = sample_weight.to(losses.dtype).view(-1)
                loss = (weight * losses).sum() / weight.sum().clamp(min=1e-12)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    @torch.no_grad()
    def predict(
        self,
        smiles: Sequence[str],
        tokenizer,
        batch_size: int = 64,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Predictions in label units for a list of SMILES, in eval mode (deterministic feature maps)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        predictions = []
        try:
            for start in range(0, len(smiles), batch_size):
                batch = tokenizer(
                    list(smiles[start : start + batch_size]),
                    padding=True,
                    truncation=max_length is not None,
                    max_length=max_length,
                    return_tensors="pt",
                )
                out = self(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                )
                predictions.append(out.logits.view(-1).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(predictions) if predictions else torch.empty(0)


def _register() -> None:
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.register(MolformerConfig, MolformerForRegression, exist_ok=True)
    MolformerForRegression.register_for_auto_class("AutoModelForSequenceClassification")


_register()

__all__ = ["MolformerForRegression", "REGRESSION_HEAD_CLASSES"]
