"""Model cards of run_regression.py and run_mlm.py outputs (written locally, and pushed with --push_to_hub).

The same text is written to `<output_dir>/README.md` whether or not the run is pushed, so an offline run
documents itself exactly as its Hub page would.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from molft.files import BASE_MODEL_DIR, MLM_DATA_SUMMARY_FILE

_METRIC_ROWS = ("rmse", "mae", "r2", "pearson", "spearman", "median_ae", "mse")
_CLASSIFICATION_ROWS = ("roc_auc", "pr_auc", "accuracy", "f1", "mcc", "loss")
_ADAPTER_METHODS = ("lora", "ia3")
# an absolute local path (POSIX or home-relative) inside a description: only its last part is published
_ABSOLUTE_PATH = re.compile(r"(?:~|(?<![\w.-]))/(?:[^\s,()=/]+/)*([^\s,()=/]+)")

# The "Use" code of every regression card; PATH stands for the model folder. It imports the installed
# package (`pip install .` in this repository), so it runs from any folder, for full models and adapters.
USAGE_CODE = """from molft.model_utils import unwrap_peft
from molft.peft_setup import load_regression_checkpoint
from tokenization_molformer import MolformerTokenizer

model = unwrap_peft(load_regression_checkpoint(PATH))  # an adapter is loaded onto its base model
tokenizer = MolformerTokenizer.from_pretrained(PATH)
model.predict(['CCO'], tokenizer)"""


def public_text(text: str) -> str:
    """`text` with every absolute local path replaced by its last part (a file or folder name)."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1), text)


def is_hub_id(name: str | None) -> bool:
    """A Hub model id ("name" or "owner/name") rather than a local folder."""
    if not name or Path(name).exists():
        return False
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def regression_model_card(
    *,
    model_args: Any,
    peft_method: str,
    data_source: str,
    split: Any,
    metrics: dict[str, Any],
    extra_file: str | None,
    n_extra: int,
    label_name: str = "label",
    base_model: str | None = None,
    problem_type: str = "regression",
    outputs: list[str] | None = None,
) -> str:
    """Markdown with Hub metadata: what was trained on what, its metrics in label units, and how to load it.

    Publishable as it is: no local absolute path (files and local models appear by name), the base of an
    adapter (`base_model`: what adapter_config.json records) is stated, and the usage code runs anywhere
    the package is installed. `problem_type` (config.json declares it too) and `outputs` (the targets,
    classes or labels) describe other tasks than one regression target.
    """
    checkpoint = model_args.model_name_or_path
    if checkpoint:
        start = checkpoint if is_hub_id(checkpoint) else f"the local model `{Path(checkpoint).name}`"
    else:
        start = f"a new model ({Path(model_args.config_name).name})"
    classifier = problem_type != "regression"
    tags = ["chemistry", "molformer", "classification" if classifier else "regression", "smiles"]
    if peft_method != "none":
        tags += ["peft", peft_method]
    lines = ["---", f"library_name: {'peft' if peft_method in _ADAPTER_METHODS else 'transformers'}"]
    if is_hub_id(checkpoint):
        lines.append(f"base_model: {checkpoint}")
    lines += [
        f"tags: [{', '.join(tags)}]",
        "---",
        "",
        f"# MoLFormer {'classification' if classifier else 'regression'} model",
        "",
        f"Fine-tuned from **{start}** with `run_regression.py` (fine-tuning method: **{peft_method}**; "
        f"head: {model_args.regression_head}, pooling: {model_args.pooling}, "
        + (
            f"problem type: `{problem_type}`). Outputs: one logit per entry of {outputs}; `predict` gives "
            "their probabilities."
            if classifier
            else f"loss: {model_args.loss}, target scaling: {model_args.target_scaling}). Predictions are in the "
            f"label's own units ({label_name})."
        ),
    ]
    if peft_method in _ADAPTER_METHODS:
        lines += ["", f"Base model: {_base_statement(checkpoint, base_model)}"]
    lines += [
        "",
        "## Data",
        f"- Source: {public_text(data_source)}",
        f"- Split: {split.method} ({', '.join(f'{k}={v}' for k, v in split.sizes.items())}); "
        "the exact molecules are in `split.json`.",
    ]
    if extra_file:
        lines.append(
            f"- External training molecules: {n_extra} from `{Path(extra_file).name}` (training split only)."
        )
    lines += ["", f"## Metrics ({label_name})", "", "| metric | validation | test |", "|---|---|---|"]
    for name in _CLASSIFICATION_ROWS if classifier else _METRIC_ROWS:
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
        "Install the molft repository as a package (`pip install .` in its folder: it provides `molft` and the "
        "MoLFormer modules), then, with `PATH` this folder (a Hub copy: `huggingface_hub.snapshot_download`):",
        "",
        "```python",
        USAGE_CODE,
        "```",
        "",
    ]
    if peft_method in _ADAPTER_METHODS:
        lines += [
            "This folder holds a peft adapter and the run's config (head, target statistics). Runs with "
            "`--merge_adapter` also hold a plain merged model in `merged/`.",
            "",
        ]
    return "\n".join(lines)


def _base_statement(checkpoint: str | None, recorded: str | None) -> str:
    """Which model an adapter applies to, and how adapter_config.json names it."""
    if checkpoint is None:
        return (
            f"the model trained from scratch saved with this run in `{BASE_MODEL_DIR}/` (adapter_config.json "
            f"names it `{recorded or './' + BASE_MODEL_DIR}`, relative to this folder); keep the two together."
        )
    if is_hub_id(checkpoint):
        return f"[{checkpoint}](https://huggingface.co/{checkpoint}) on the Hugging Face Hub."
    return (
        f"the local model `{Path(checkpoint).name}`, named `{recorded}` in adapter_config.json (relative to "
        "this folder); if it lies elsewhere, pass `base_model=` to `load_regression_checkpoint`."
    )


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
    return public_text(f"""---
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
""")
