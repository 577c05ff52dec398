"""Which parameters influence is computed over: the head, the last layers, biases, LoRA adapters or all.

Only parameters in the scope get gradients; everything else is held fixed, so the scope decides both the
cost (P = number of scoped parameters) and which part of the fine-tuned model the scores describe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

SCOPES = ("head", "last_k_layers", "bias", "lora", "all")
HEAD_KEYWORDS = ("classifier", "head", "regressor")
LAYER_PATTERN = r"(?:^|\.)encoder\.layer\.(\d+)\."
LORA_MARKER = "lora_"


def is_head_parameter(name: str, keywords: Sequence[str] = HEAD_KEYWORDS) -> bool:
    """Default head predicate: the name contains one of `keywords` (e.g. "classifier.dense.weight")."""
    return any(keyword in name for keyword in keywords)


def select_parameters(
    model: nn.Module,
    scope: str | Callable[[str], bool],
    last_k: int = 1,
    head_predicate: Callable[[str], bool] = is_head_parameter,
    layer_pattern: str = LAYER_PATTERN,
    trainable_only: bool = False,
) -> dict[str, nn.Parameter]:
    """Named parameters of `model` in `scope`, in the model's own order.

    scope: one of SCOPES, or a predicate on the parameter name.
      "head": names accepted by `head_predicate` (by default containing classifier/head/regressor).
      "last_k_layers": transformer blocks `encoder.layer.{i}` with i >= L - last_k (the layer index is the
          first group of `layer_pattern`), plus the head.
      "bias": every bias, plus the head.
      "lora": names containing "lora_" (PEFT adapters only; the head is not included).
      "all": every parameter.
    trainable_only: drop parameters with requires_grad=False (e.g. a frozen PEFT base).
    Raises ValueError if the scope selects nothing.
    """
    named = list(model.named_parameters())
    if trainable_only:
        named = [(name, param) for name, param in named if param.requires_grad]
    predicate = _scope_predicate(scope, [name for name, _ in named], last_k, head_predicate, layer_pattern)
    selected = {name: param for name, param in named if predicate(name)}
    if not selected:
        examples = ", ".join(name for name, _ in named[:8])
        raise ValueError(
            f"scope {scope!r} selects no parameters of {type(model).__name__} (names: {examples}, ...)"
        )
    return selected


def _scope_predicate(
    scope: str | Callable[[str], bool],
    names: list[str],
    last_k: int,
    head_predicate: Callable[[str], bool],
    layer_pattern: str,
) -> Callable[[str], bool]:
    if callable(scope):
        return scope
    if scope == "head":
        return head_predicate
    if scope == "bias":
        return lambda name: name.endswith("bias") or head_predicate(name)
    if scope == "lora":
        return lambda name: LORA_MARKER in name
    if scope == "all":
        return lambda name: True
    if scope == "last_k_layers":
        if last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {last_k}")
        regex = re.compile(layer_pattern)
        indices = {int(match.group(1)) for name in names if (match := regex.search(name))}
        if not indices:
            raise ValueError(f"no parameter name matches the layer pattern {layer_pattern!r}")
        first_kept = max(indices) + 1 - last_k

        def in_last_layers(name: str) -> bool:
            match = regex.search(name)
            return bool(match and int(match.group(1)) >= first_kept) or head_predicate(name)

        return in_last_layers
    raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES} or a callable")
