"""Model cards of run_regression.py and run_mlm.py outputs (written locally, and pushed with --push_to_hub).

The same text is written to `<output_dir>/README.md` whether or not the run is pushed, so an offline run
documents itself exactly as its Hub page would.
"""

from __future__ import annotations

from typing import Any

from molft.files import MLM_DATA_SUMMARY_FILE

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


_MLM_METRIC_SUFFIXES = ("_loss", "_perplexity", "_masked_accuracy")
_MLM_METRICS = ("epoch", "train_samples", "eval_samples")


def mlm_model_card(
    model_args: Any, data_args: Any, model: Any, summary: dict[str, Any], metrics: dict[str, float]
) -> str:
    """Markdown with Hub metadata for a run_mlm.py checkpoint: start, architecture, masking, data, losses."""
    start = model_args.model_name_or_path or f"random initialisation ({model_args.config_name})"
    config = model.config
    sources = "\n".join(
        f"- `{name}`: {info['molecules']} molecules"
        if "molecules" in info
        else f"- `{name}`: {info['rows']} rows"
        for name, info in summary["sources"].items()
    )
    if "n_checked" in summary:
        sources += (
            f"\n\nOnly {summary['n_checked']} of these {summary['n_rows']} rows were read (in a seeded random "
            "order, until enough molecules were found)."
        )
    overlap = summary.get("heldout_overlap", {})
    shown = {k: v for k, v in metrics.items() if k.endswith(_MLM_METRIC_SUFFIXES) or k in _MLM_METRICS}
    metric_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(shown.items()))
    return f"""---
library_name: transformers
tags: [chemistry, smiles, molformer, fill-mask]
---

# MoLFormer masked-language model

Trained with `run_mlm.py` from {start}.

- Architecture: MoLFormer (linear attention, rotary embeddings), hidden {config.hidden_size},
  {config.num_hidden_layers} layers, {config.num_attention_heads} heads, {model.num_parameters():,} parameters,
  vocabulary {config.vocab_size} tokens.
- Masking: {data_args.mlm_probability:.0%} of tokens, of which {data_args.mask_replace_prob:.0%} `<mask>`,
  {data_args.random_replace_prob:.0%} random; SMILES enumeration: {data_args.smiles_enumeration};
  max length {data_args.max_seq_length} tokens.

## Data

{sources}

{summary["n_train"]} training and {summary["n_validation"]} validation molecules after removing invalid SMILES,
duplicates ({summary["duplicates_dropped"]}) and {overlap.get("dropped", 0)} molecules of held-out sets
({", ".join(summary.get("heldout_sets", {})) or "none given"}). Details: `{MLM_DATA_SUMMARY_FILE}`.

## Results

| metric | value |
|---|---|
{metric_lines}

## Use

Fine-tune for regression with `python run_regression.py --model_name_or_path <this folder> ...`; the encoder
weights load as they are and only the regression head is newly initialised. SMILES pieces outside the
vocabulary are encoded as `<unk>`.
"""
