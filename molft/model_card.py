"""Model card text for run_regression.py outputs (written locally, and pushed with --push_to_hub)."""

from __future__ import annotations

from typing import Any

_METRIC_ROWS = ("rmse", "mae", "r2", "pearson", "spearman", "median_ae", "mse")


def regression_model_card(
    *,
    model_args: Any,
    peft_method: str,
    data_source: str,
    split: Any,
    metrics: dict[str, Any],
    extra_file: str | None,
    n_extra: int,
) -> str:
    start = model_args.model_name_or_path or f"new model from {model_args.config_name}"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [chemistry, molformer, regression, smiles" + (f", peft, {peft_method}" if peft_method != "none" else "")
        + "]",
        "---",
        "",
        "# MoLFormer regression model",
        "",
        f"Fine-tuned from **{start}** with `run_regression.py` (fine-tuning method: **{peft_method}**; "
        f"head: {model_args.regression_head}, pooling: {model_args.pooling}, loss: {model_args.loss}, "
        f"target scaling: {model_args.target_scaling}).",
        "",
        "## Data",
        f"- Source: {data_source}",
        f"- Split: {split.method} ({', '.join(f'{k}={v}' for k, v in split.sizes.items())}); "
        "the exact molecules are in `split.json`.",
    ]
    if extra_file:
        lines.append(f"- External training molecules: {n_extra} from `{extra_file}` (training split only).")
    lines += ["", "## Metrics (label units)", "", "| metric | validation | test |", "|---|---|---|"]
    for name in _METRIC_ROWS:
        val, test = metrics.get(f"eval_{name}"), metrics.get(f"test_{name}")
        if val is None and test is None:
            continue
        lines.append(f"| {name} | {_fmt(val)} | {_fmt(test)} |")
    lines += [
        "",
        f"Trainable parameters: {metrics.get('trainable_params', 0):,} of {metrics.get('total_params', 0):,}.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "model = AutoModelForSequenceClassification.from_pretrained(PATH, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
        "model.predict(['CCO'], tokenizer)  # values in the label's own units",
        "```",
        "",
    ]
    if peft_method in ("lora", "ia3"):
        lines += ["This folder holds a peft adapter; load it with `peft.PeftModel.from_pretrained` on its base model.", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
