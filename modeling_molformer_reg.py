"""MolformerForRegression: MoLFormer plus a task head; regression predictions come out in label units.

The model normalises labels with `config.target_mean` / `config.target_std` inside the loss and de-normalises
its outputs, so `logits` and `predict` are always in the label's own units and a saved model needs no
separate scaler file. With the defaults (mean 0, std 1, "molformer" head, MSE) it is the reference
`MolformerForSequenceClassification` with one label, and loads its checkpoints key for key.

`config.problem_type` follows transformers' convention. "regression" (the default) has one output per
target (several when the statistics are lists); a missing label (NaN) is masked out of the loss.
"single_label_classification" has one logit per class (cross-entropy; a negative label is ignored) and
"multi_label_classification" one logit per 0/1 label (binary cross-entropy; NaN masked). The class keeps
its name for every problem type, so every saved checkpoint loads unchanged.
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

    def __init__(self, config: MolformerConfig, n_outputs: int = 1):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, n_outputs)
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

    def __init__(self, config: MolformerConfig, n_outputs: int = 1):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(_head_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, n_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.relu(self.dense(self.dropout(pooled)))))


class MolformerLinearHead(nn.Module):
    """Dropout then one linear layer (`classifier.out_proj`): a linear probe when the encoder is frozen."""

    def __init__(self, config: MolformerConfig, n_outputs: int = 1):
        super().__init__()
        self.dropout = nn.Dropout(_head_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, n_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(pooled))


REGRESSION_HEAD_CLASSES = {
    "molformer": MolformerClassificationHead,
    "mlp": MolformerMLPHead,
    "linear": MolformerLinearHead,
}
CLASSIFICATION_PROBLEMS = ("single_label_classification", "multi_label_classification")
PROBLEM_TYPES = ("regression", *CLASSIFICATION_PROBLEMS)


def num_outputs(config: MolformerConfig) -> int:
    """Outputs of the head: one per regression target (statistics lists), else one per label."""
    if (config.problem_type or "regression") == "regression":
        return len(config.target_mean) if isinstance(config.target_mean, list) else 1
    return config.num_labels


def _masked_mean(
    losses: torch.Tensor, observed: torch.Tensor | None, sample_weight: torch.Tensor | None
) -> torch.Tensor:
    """Mean of `losses` [batch, outputs] over observed entries (None: all), weighted per molecule.

    A masked entry has weight 0, so it adds exactly nothing to the loss or its gradient; without gaps or
    weights this is the plain mean. The choice is made from the arguments, never from tensor values, so
    torch.compile captures one graph.
    """
    if observed is None:
        if sample_weight is None:
            return losses.mean()
        observed = torch.ones_like(losses, dtype=torch.bool)
    weight = observed.to(losses.dtype)
    if sample_weight is not None:
        weight = weight * sample_weight.to(losses.dtype).view(-1, 1)
    return (weight * losses).sum() / weight.sum().clamp(min=1e-12)


class MolformerForRegression(MolformerPreTrainedModel):
    """MoLFormer encoder, pooling (`mean` or `cls`), a head under `classifier.*`, and the problem type's loss
    (regression: MSE/L1/Huber on standardised targets; classification: cross-entropy or binary cross-entropy).

    `sample_weight` (one weight per molecule) turns the loss into a weighted mean, sum(w·l) / sum(w), so a
    zero weight is the same as leaving the molecule out of the batch and equal weights change nothing.
    """

    # forward takes **kwargs but its loss is a per-batch mean, not normalised by `num_items_in_batch`: the
    # Trainer must scale it for gradient accumulation and multi-process training itself
    accepts_loss_kwargs = False

    def __init__(self, config: MolformerConfig):
        super().__init__(config)
        problem = config.problem_type or "regression"
        if problem not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem!r}.")
        n_outputs = num_outputs(config)
        if problem == "regression":
            config.num_labels = n_outputs
            config.problem_type = "regression"
        elif n_outputs < (2 if problem == "single_label_classification" else 1):
            raise ValueError(f"{problem} needs more labels than num_labels={n_outputs}.")
        self.molformer = MolformerModel(config)
        self.classifier = REGRESSION_HEAD_CLASSES[config.regression_head](config, n_outputs)
        self.post_init()

    @property
    def is_classifier(self) -> bool:
        return self.config.problem_type in CLASSIFICATION_PROBLEMS

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

    def classification_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, sample_weight: torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-entropy (one class index per molecule; negative = no label) or masked binary cross-entropy.

        Class weights follow torch's weighted mean: sum(w_class · w_molecule · nll) / sum(w_class · w_molecule).
        """
        logits = logits.float()
        weights = self.config.class_weights
        weights = None if weights is None else logits.new_tensor(weights)
        if self.config.problem_type == "single_label_classification":
            labels = labels.view(-1).long()
            scale = (labels >= 0).to(logits.dtype)
            labels = labels.clamp(min=0)
            losses = nn.functional.cross_entropy(logits, labels, reduction="none")
            if weights is not None:
                scale = scale * weights[labels]
            if sample_weight is not None:
                scale = scale * sample_weight.to(logits.dtype).view(-1)
            return (scale * losses).sum() / scale.sum().clamp(min=1e-12)
        labels = labels.to(logits.dtype).view(logits.shape)
        observed = ~torch.isnan(labels)
        target = torch.where(observed, labels, torch.zeros_like(labels))
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=weights, reduction="none"
        )
        return _masked_mean(losses, observed, sample_weight)

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
        loss = None
        if self.is_classifier:
            logits = normalised
            if labels is not None:
                loss = self.classification_loss(logits, labels, sample_weight)
        else:
            mean, std = self.config.target_mean, self.config.target_std
            if isinstance(mean, list):  # several targets, each with its own statistics
                mean, std = normalised.new_tensor(mean), normalised.new_tensor(std)
            logits = normalised * std + mean
            if labels is not None:
                labels = labels.to(normalised.dtype).view(normalised.shape)
                # one target: labels were checked finite when read; several: a gap (NaN) is masked
                observed = ~torch.isnan(labels) if isinstance(self.config.target_mean, list) else None
                if observed is not None:
                    labels = torch.where(observed, labels, torch.zeros_like(labels))
                target = (labels - mean) / std
                losses = self.per_sample_loss(normalised.float(), target.float())
                loss = _masked_mean(losses, observed, sample_weight)
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
        """Predictions for a list of SMILES, in eval mode (deterministic feature maps).

        Regression: label units, shape [n] for one target and [n, targets] for several. Classification: class
        probabilities [n, classes] (softmax) or label probabilities [n, labels] (sigmoid).
        """
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
                predictions.append(self.output_values(out.logits).float().cpu())
        finally:
            self.train(was_training)
        if not predictions:
            return torch.empty(0)
        values = torch.cat(predictions)
        return values.view(-1) if values.shape[-1] == 1 and not self.is_classifier else values

    def output_values(self, logits: torch.Tensor) -> torch.Tensor:
        """What `predict` reports for `logits`: label units (regression) or probabilities (classification)."""
        if self.config.problem_type == "single_label_classification":
            return torch.softmax(logits.float(), dim=-1)
        if self.config.problem_type == "multi_label_classification":
            return torch.sigmoid(logits.float())
        return logits


def _register() -> None:
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.register(MolformerConfig, MolformerForRegression, exist_ok=True)
    MolformerForRegression.register_for_auto_class("AutoModelForSequenceClassification")


_register()

__all__ = ["MolformerForRegression", "REGRESSION_HEAD_CLASSES", "PROBLEM_TYPES", "num_outputs"]
