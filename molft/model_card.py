"""Model card text for run_regression.py outputs (written locally, and pushed with --push_to_hub).

The same text is written to `<output_dir>/README.md` whether or not the run is pushed, so an offline run
documents itself exactly as its Hub page would.
"""

from __future__ import annotations

from typing import Any

_METRIC_ROWS = ("rmse", "mae", "r2", "pearson", "spearman", "median_ae", "mse")
_ADAPTER_METHODS = ("lora", "ia3")


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
    """Markdown with Hub metadata: what was trained on what, its metrics in label units, and how to load it."""
    start = model_args.model_name_or_path or f"a new model ({model_args.config_name})"
    tags = ["chemistry", "molformer", "regression", "smiles"]
    if peft_method != "none":
        tags += ["peft", peft_method]
    lines = ["---", f"library_name: {'peft' if peft_method in _ADAPTER_METHODS else 'transformers'}"]
    if model_args.model_name_or_path and "/" in model_args.model_name_or_path:
        lines.append(f"base_model: {model_args.model_name_or_path}")
    lines += [
        f"tags: [{', '.join(tags)}]",
        "---",
        "",
        "# MoLFormer regression model",
        "",
        f"Fine-tuned from **{start}** with `run_regression.py` (fine-tuning method: **{peft_method}**; "
        f"head: {model_args.regression_head}, pooling: {model_args.pooling}, loss: {model_args.loss}, "
        f"target scaling: {model_args.target_scaling}). Predictions are in the label's own units.",
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
        f"Trainable parameters: {metrics.get('trainable_params', 0):,} of {metrics.get('total_params', 0):,} "
        f"({100 * metrics.get('trainable_share', 0.0):.2f}%). "
        f"Wall time: {metrics.get('train_wall_time_s', 0.0) / 60:.1f} min.",
        "",
        "## Use",
        "",
        "```python",
    ]
    if peft_method in _ADAPTER_METHODS:
        lines += [
            "from transformers import AutoTokenizer",
            "from molft.peft_setup import load_regression_checkpoint  # this repository's library",
            "model = load_regression_checkpoint(PATH)  # the adapter on its base model",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
            "model.base_model.model.predict(['CCO'], tokenizer)",
        ]
    else:
        lines += [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "model = AutoModelForSequenceClassification.from_pretrained(PATH, trust_remote_code=True)",
            "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
            "model.predict(['CCO'], tokenizer)",
        ]
    lines += ["```", ""]
    if peft_method in _ADAPTER_METHODS:
        lines += [
            "This folder holds a peft adapter and the run's config (head, target statistics); its base model "
            "is named in `adapter_config.json`. Runs with `--merge_adapter` also hold a plain merged model in "
            "`merged/`.",
            "",
        ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
