#!/usr/bin/env python
"""Choose external molecules to add to a MoLFormer regression run's training set, and say how far they lie.

A thin command line over `molft.selection` (strategies), `molft.valuation` (data Shapley) and `molft.shift`
(shift diagnostics). The external pool is checked like every other data file; molecules that sit in the
run's validation or test split are reported and left out (adding them would leak evaluation data):

    python run_selection.py configs/selection_example.yaml
    python run_selection.py configs/selection_example.yaml --strategy random --seed 3 --output_dir sel/random
    python run_selection.py --external_file pool.csv --strategy influence --k 50 \
        --scores_file outputs/influence/influence_scores.csv --split_file outputs/run/split.json \
        --output_dir sel/influence_top

Writes `selected.csv` (columns rank, index, smiles, label, score; what `run_regression.py
--extra_train_file` reads), `manifest.json` (strategy, parameters, seed, chosen pool indices, pool
fingerprint, held-out overlap), optionally `merged_train.csv`, the shift diagnostics `shift_report.json`
and `shift_diagnostics.png`, then `run_complete.json` last.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

import modeling_molformer_reg  # noqa: F401  registers MoLFormer with the Auto classes
import tokenization_molformer  # noqa: F401  registers the tokenizer with AutoTokenizer
from molft import plots
from molft.cli import log_level, parse_args, setup_logging
from molft.data import (
    dataset_fingerprint,
    read_table,
)
from molft.io import mark_done, prepare_output_dir, write_json
from molft.model_utils import embed_batches, smiles_batches
from molft.peft_setup import load_regression_checkpoint
from molft.run_data import RunDataArguments
from molft.selection import (
    Selection,
    SelectionPool,
    available_strategies,
    check_scores_match_pool,
    load_pool,
    mc_dropout_predictions,
    merge_selected_into_train,
    resolve_budget,
    select,
    selection_manifest,
    strategy_parameters,
    write_selection,
)
from molft.shift import format_shift_report, shift_report
from molft.splits import SPLIT_NAMES

logger = logging.getLogger(__name__)

VALUATION_STRATEGIES = ("knn_shapley", "ts_dshapley")
SHIFT_REPORT_FILE = "shift_report.json"
SHIFT_PLOT_FILE = "shift_diagnostics.png"


@dataclass
class SelectionArguments:
    strategy: str = field(
        metadata={
            "help": "influence (needs --scores_file) | random | uncertainty (MC-dropout variance; needs "
            "--model_name_or_path) | diversity (maxmin on fingerprints, or kmeans on embeddings: needs the "
            "model) | stratified (keeps the pool's label distribution) | knn_shapley | ts_dshapley (data "
            "Shapley on embeddings; need the model and --split_file) | all | none (controls)."
        }
    )
    k: int | None = field(default=None, metadata={"help": "Budget: number of molecules to pick."})
    fraction: float | None = field(
        default=None,
        metadata={"help": "Budget as a share of the candidate pool, in (0, 1] (instead of --k)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the strategy, MC dropout and the MMD test."})
    mode: str | None = field(
        default=None,
        metadata={
            "help": "influence: top (most helpful, default) | bottom (least helpful, a control) | percentile "
            "(score <= --percentile-th percentile) | helpful (every score < 0). uncertainty: top (default) | "
            "percentile (variance >= --percentile-th percentile). ts_dshapley: top (default) | prune "
            "(drop low-valued molecules while validation improves). Threshold modes use the budget as a cap."
        },
    )
    percentile: float | None = field(
        default=None,
        metadata={
            "help": "Threshold of the percentile modes (default 10 for influence, 90 for uncertainty)."
        },
    )
    diversity_method: str | None = field(
        default=None, metadata={"help": "diversity: maxmin (default; Morgan/Tanimoto) | kmeans (embeddings)."}
    )
    diversity_from_train: bool | None = field(
        default=None,
        metadata={"help": "diversity maxmin: count the training split as already picked (needs the split)."},
    )
    kmeans_n_init: int | None = field(default=None, metadata={"help": "diversity kmeans: k-means restarts."})
    n_bins: int | None = field(
        default=None, metadata={"help": "stratified: label quantile bins (default 5)."}
    )
    knn_k: int | None = field(
        default=None,
        metadata={
            "help": "knn_shapley: neighbours of the KNN utility; ts_dshapley: of its knn surrogate (5)."
        },
    )
    knn_metric: str | None = field(
        default=None, metadata={"help": "knn_shapley: embedding distance (default euclidean)."}
    )
    valuation_include_train: bool | None = field(
        default=None,
        metadata={
            "help": "knn_shapley/ts_dshapley: value the pool together with the training molecules "
            "(defaults: true for knn_shapley, false for ts_dshapley)."
        },
    )
    ts_model: str | None = field(
        default=None, metadata={"help": "ts_dshapley: surrogate learner, ridge (default) | knn."}
    )
    ts_n_subsets: int | None = field(
        default=None,
        metadata={"help": "ts_dshapley: random subsets (default: each molecule valued ~5 times)."},
    )
    ts_subset_size: int | None = field(default=None, metadata={"help": "ts_dshapley: subset size (30)."})
    ts_n_permutations: int | None = field(
        default=None, metadata={"help": "ts_dshapley: permutations per subset (10)."}
    )
    ts_truncation_tol: float | None = field(
        default=None, metadata={"help": "ts_dshapley: truncated Monte Carlo tolerance (0 = no truncation)."}
    )
    ts_ridge_alpha: float | None = field(
        default=None, metadata={"help": "ts_dshapley: ridge regularisation (1.0)."}
    )
    ts_prune_chunk_size: int | None = field(
        default=None, metadata={"help": "ts_dshapley prune: molecules dropped per step (default 5%%)."}
    )


# CLI option -> parameter name of the strategy functions in molft.selection
STRATEGY_OPTIONS = {
    "mode": "mode",
    "percentile": "percentile",
    "diversity_method": "method",
    "diversity_from_train": "from_train",
    "kmeans_n_init": "n_init",
    "n_bins": "n_bins",
    "knn_k": "n_neighbors",
    "knn_metric": "metric",
    "valuation_include_train": "include_train",
    "ts_model": "model",
    "ts_n_subsets": "n_subsets",
    "ts_subset_size": "subset_size",
    "ts_n_permutations": "n_permutations",
    "ts_truncation_tol": "truncation_tol",
    "ts_ridge_alpha": "ridge_alpha",
    "ts_prune_chunk_size": "prune_chunk_size",
}


@dataclass
class PoolArguments:
    external_file: str = field(
        metadata={"help": "The external pool: csv/tsv/json/jsonl/parquet with SMILES and (usually) labels."}
    )
    external_smiles_column: str | None = field(
        default=None, metadata={"help": "SMILES column of the pool (default: found by name)."}
    )
    external_label_column: str | None = field(
        default=None,
        metadata={
            "help": "Label column of the pool (default: found by name; a pool without labels "
            "can still be ranked, but not added to training)."
        },
    )
    scores_file: str | None = field(
        default=None,
        metadata={
            "help": "influence: run_influence.py's influence_scores.csv for this very pool "
            "(negative score = helpful); checked molecule by molecule."
        },
    )
    keep_heldout_overlap: bool = field(
        default=False,
        metadata={
            "help": "Keep pool molecules that are in the validation/test split as candidates "
            "(default: report and exclude them; selecting them leaks evaluation data)."
        },
    )


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A run_regression.py output folder (full model or peft adapter). Needed for "
            "uncertainty, kmeans diversity, knn_shapley, ts_dshapley and the embedding MMD."
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of an adapter, if not where the adapter says."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the one saved with the model)."}
    )
    n_passes: int = field(default=20, metadata={"help": "uncertainty: MC-dropout passes."})
    batch_size: int = field(default=64, metadata={"help": "Molecules per forward pass."})
    max_seq_length: int = field(default=202, metadata={"help": "Longer SMILES are truncated (and reported)."})
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when available) | cpu | cuda | cuda:N."}
    )


@dataclass
class OutputArguments:
    output_dir: str = field(metadata={"help": "Where selected.csv, manifest.json and the diagnostics go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Redo a selection whose output_dir is already complete."}
    )
    write_merged_train: bool = field(
        default=False,
        metadata={
            "help": "Also write merged_train.csv: the training split plus the chosen molecules, "
            "with a source column (train/external)."
        },
    )
    shift_diagnostics: bool = field(
        default=True,
        metadata={
            "help": "Compare the candidates with the training split: nearest-neighbour Tanimoto "
            "(test split as reference), embedding MMD with a permutation test (with a model), labels."
        },
    )
    mmd_permutations: int = field(default=1000, metadata={"help": "Permutations of the MMD test."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error."})


ARGUMENT_TYPES = (SelectionArguments, PoolArguments, RunDataArguments, ModelArguments, OutputArguments)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run one selection and return its manifest (also written to manifest.json)."""
    selection_args, pool_args, data_args, model_args, output_args = parse_args(ARGUMENT_TYPES, args)
    setup_logging(log_level(output_args.log_level))
    params = strategy_options(selection_args)
    data_args.use_model_split(model_args.model_name_or_path, required=False)
    validate_arguments(selection_args, params, pool_args, data_args, model_args, output_args)
    output_dir = prepare_output_dir(output_args.output_dir, output_args.overwrite_output_dir, "selection")
    started = time.perf_counter()

    # The pool, the run's split, and which pool molecules may be picked at all
    pool_frame = load_pool(
        pool_args.external_file,
        pool_args.external_smiles_column,
        pool_args.external_label_column,
        require_labels=False,
    )
    has_labels = "label" in pool_frame.columns
    if not has_labels and needs_pool_labels(selection_args.strategy):
        raise ValueError(
            f"Strategy {selection_args.strategy!r} needs the pool's labels; {pool_args.external_file} has no "
            "label column (name it with --external_label_column)."
        )
    frames = data_args.load_frames() if data_args.split_file else None
    overlap = heldout_overlap(pool_frame, frames)
    candidates = candidate_positions(pool_frame, overlap, keep=pool_args.keep_heldout_overlap)
    budget = pool_budget(selection_args, len(candidates), len(pool_frame), pool_args)

    # Precomputed inputs: influence scores, then what the model says (embeddings, MC dropout)
    scores = None
    if selection_args.strategy == "influence":
        scores = influence_scores(pool_args.scores_file, pool_frame)
    arrays = model_arrays(selection_args, params, model_args, output_args, pool_frame, frames)

    # Select among the candidates; indices are mapped back to positions in the whole pool file
    pool = selection_pool(pool_frame, candidates, frames, scores, arrays)
    selection = select(selection_args.strategy, pool, budget, selection_args.seed, **params)
    selection = dataclasses.replace(selection, indices=candidates[selection.indices])
    logger.info("Selected %d of %d candidates (%s).", len(selection), len(candidates), selection.strategy)

    # Outputs, each written atomically
    merged = None
    if output_args.write_merged_train:
        merged = merge_selected_into_train(frames["train"][["smiles", "label"]], pool_frame, selection)
    manifest = run_manifest(
        selection,
        pool_frame,
        candidates,
        overlap,
        (selection_args, pool_args, data_args, model_args, output_args),
    )
    paths = write_selection(output_dir, pool_frame, selection, manifest, merged)
    logger.info("Wrote %s", ", ".join(str(path) for path in paths.values()))
    if not has_labels and len(selection):
        logger.warning("The pool has no labels: selected.csv cannot be used as --extra_train_file.")

    # How far the candidates lie from the training data; then the completion marker, last
    if output_args.shift_diagnostics and frames is not None:
        shift_diagnostics(pool_frame, candidates, frames, arrays, output_args, selection_args.seed)
    elif output_args.shift_diagnostics:
        logger.warning("No --split_file (and none next to the model): skipping the shift diagnostics.")
    mark_done(
        output_dir,
        {
            "script": "run_selection.py",
            "strategy": selection.strategy,
            "seed": selection.seed,
            "n_selected": len(selection),
            "n_candidates": len(candidates),
            "external_file": str(pool_args.external_file),
            "seconds": time.perf_counter() - started,
        },
    )
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def strategy_options(selection_args: SelectionArguments) -> dict[str, Any]:
    """The strategy parameters the user set; options the chosen strategy does not take are warned about."""
    strategy = selection_args.strategy
    if strategy not in available_strategies():
        raise ValueError(f"Unknown --strategy {strategy!r}; choose one of {available_strategies()}.")
    accepted = strategy_parameters(strategy)
    params: dict[str, Any] = {}
    for option, parameter in STRATEGY_OPTIONS.items():
        value = getattr(selection_args, option)
        if value is None:
            continue
        if parameter in accepted:
            params[parameter] = value
        else:
            logger.warning("--%s is not used by strategy %r; ignoring it.", option, strategy)
    return params


def needs_pool_labels(strategy: str) -> bool:
    return strategy in ("stratified", *VALUATION_STRATEGIES)


def validate_arguments(
    selection_args: SelectionArguments,
    params: dict[str, Any],
    pool_args: PoolArguments,
    data_args: RunDataArguments,
    model_args: ModelArguments,
    output_args: OutputArguments,
) -> None:
    """Fail before anything slow runs when a strategy lacks one of its inputs."""
    strategy = selection_args.strategy
    effective = {**strategy_parameters(strategy), **params}
    if strategy == "influence" and not pool_args.scores_file:
        raise ValueError(
            "Strategy 'influence' needs --scores_file (run_influence.py's influence_scores.csv)."
        )
    if pool_args.scores_file and strategy != "influence":
        logger.warning("--scores_file is only used by strategy 'influence'; ignoring it.")
    model_uses = {
        "uncertainty": "MC-dropout predictions",
        "knn_shapley": "embeddings of the pool, training and validation molecules",
        "ts_dshapley": "embeddings of the pool, training and validation molecules",
    }
    if strategy == "diversity" and effective.get("method") == "kmeans":
        model_uses["diversity"] = "embeddings of the pool (k-means)"
    if strategy in model_uses and not model_args.model_name_or_path:
        raise ValueError(
            f"Strategy {strategy!r} needs --model_name_or_path (a run_regression.py output folder) for "
            f"{model_uses[strategy]}."
        )
    needs_split = strategy in VALUATION_STRATEGIES or bool(effective.get("from_train"))
    if needs_split and not data_args.split_file:
        raise ValueError(
            f"Strategy {strategy!r} with these options needs the run's training/validation molecules: "
            "give --split_file (and the run's dataset options)."
        )
    if output_args.write_merged_train and not data_args.split_file:
        raise ValueError("--write_merged_train needs the run's training split: give --split_file.")
    if strategy == "uncertainty" and model_args.n_passes < 2:
        raise ValueError(f"--n_passes must be >= 2 to estimate a variance, got {model_args.n_passes}.")
    if selection_args.k is not None and selection_args.fraction is not None:
        raise ValueError("Give only one of --k and --fraction.")
    if model_args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {model_args.batch_size}.")


def pool_budget(
    selection_args: SelectionArguments, n_candidates: int, n_pool: int, pool_args: PoolArguments
) -> int | None:
    """--k/--fraction turned into a number of molecules; None (no budget) when neither is given."""
    if selection_args.k is None and selection_args.fraction is None:
        return None
    try:
        return resolve_budget(n_candidates, selection_args.k, selection_args.fraction)
    except ValueError as err:
        excluded = n_pool - n_candidates
        detail = f" ({excluded} held-out molecules excluded)" if excluded else ""
        raise ValueError(
            f"{err} The pool {pool_args.external_file} has {n_candidates} candidates{detail}."
        ) from err


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def heldout_overlap(pool_frame: pd.DataFrame, frames: dict[str, pd.DataFrame] | None) -> dict[str, list[int]]:
    """Pool positions whose molecule (canonical SMILES) is in each split of the run."""
    if frames is None:
        return {}
    overlap = {}
    for name in SPLIT_NAMES:
        inside = pool_frame["canonical_smiles"].isin(set(frames[name]["canonical_smiles"]))
        overlap[name] = np.flatnonzero(inside.to_numpy()).tolist()
    return overlap


def candidate_positions(pool_frame: pd.DataFrame, overlap: dict[str, list[int]], keep: bool) -> np.ndarray:
    """Pool positions a strategy may pick: all, minus validation/test molecules unless `keep`."""
    heldout = sorted(set(overlap.get("validation", [])) | set(overlap.get("test", [])))
    if overlap.get("train"):
        logger.info(
            "%d pool molecules are already in the training split (pool indices %s).",
            len(overlap["train"]),
            overlap["train"][:10],
        )
    if heldout:
        counts = f"validation {len(overlap['validation'])}, test {len(overlap['test'])}"
        logger.warning(
            "%d pool molecules are in the run's held-out splits (%s; pool indices %s) and are %s.",
            len(heldout),
            counts,
            heldout[:10],
            "KEPT as candidates (--keep_heldout_overlap)" if keep else "excluded from the candidates",
        )
    if keep:
        return np.arange(len(pool_frame))
    candidates = np.setdiff1d(np.arange(len(pool_frame)), heldout)
    if len(candidates) == 0:
        raise ValueError(
            "Every pool molecule is in the run's validation/test split; nothing can be selected."
        )
    return candidates


def influence_scores(scores_file: str, pool_frame: pd.DataFrame) -> np.ndarray:
    """Scores in pool order, after checking the file was written for this very pool."""
    try:
        return check_scores_match_pool(read_table(scores_file), pool_frame)
    except ValueError as err:
        raise ValueError(f"--scores_file {scores_file}: {err}") from err


# ----------------------------------------------------------------------------------------------------------
# Model: embeddings and MC dropout
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelArrays:
    """What the model says about each molecule set (None where nothing needs it)."""

    pool_embeddings: np.ndarray | None = None
    train_embeddings: np.ndarray | None = None
    validation_embeddings: np.ndarray | None = None
    mc_predictions: np.ndarray | None = None  # [passes, pool]


def model_arrays(
    selection_args: SelectionArguments,
    params: dict[str, Any],
    model_args: ModelArguments,
    output_args: OutputArguments,
    pool_frame: pd.DataFrame,
    frames: dict[str, pd.DataFrame] | None,
) -> ModelArrays:
    """Run the model only for the arrays the strategy and the diagnostics use; all for the whole pool."""
    arrays = ModelArrays()
    if not model_args.model_name_or_path:
        return arrays
    strategy = selection_args.strategy
    effective = {**strategy_parameters(strategy), **params}
    mmd = output_args.shift_diagnostics and frames is not None
    valuation = strategy in VALUATION_STRATEGIES
    want_pool = valuation or mmd or (strategy == "diversity" and effective.get("method") == "kmeans")
    want_train = (valuation or mmd) and frames is not None
    want_mc = strategy == "uncertainty"
    if not (want_pool or want_train or want_mc):
        logger.info("Strategy %r does not use the model; not loading it.", strategy)
        return arrays

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if model_args.device == "auto" else model_args.device
    )
    model = load_regression_checkpoint(model_args.model_name_or_path, model_args.base_model).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    quiet = output_args.disable_tqdm

    def batches_of(frame: pd.DataFrame) -> list[dict[str, torch.Tensor]]:
        return smiles_batches(
            frame["canonical_smiles"].tolist(), tokenizer, model_args.batch_size, model_args.max_seq_length
        )

    pool_batches = batches_of(pool_frame)
    if want_pool:
        arrays.pool_embeddings = embed_batches(
            model, tqdm(pool_batches, desc="Embedding pool", disable=quiet)
        )
    if want_train:
        train_batches = batches_of(frames["train"])
        arrays.train_embeddings = embed_batches(
            model, tqdm(train_batches, desc="Embedding train", disable=quiet)
        )
    if valuation:
        validation_batches = batches_of(frames["validation"])
        arrays.validation_embeddings = embed_batches(
            model, tqdm(validation_batches, desc="Embedding validation", disable=quiet)
        )
    if want_mc:
        arrays.mc_predictions = mc_predictions(
            model, pool_batches, model_args.n_passes, selection_args.seed, quiet
        )
    return arrays


def mc_predictions(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], n_passes: int, seed: int, quiet: bool
) -> np.ndarray:
    """MC-dropout predictions [n_passes, N] with a progress bar over all passes."""
    with tqdm(total=n_passes * len(batches), desc="MC dropout", unit="batch", disable=quiet) as bar:

        def forward(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            bar.update(1)
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        return mc_dropout_predictions(model, batches, n_passes, seed, forward_fn=forward)


# ----------------------------------------------------------------------------------------------------------
# Selection, diagnostics and outputs
# ----------------------------------------------------------------------------------------------------------


def selection_pool(
    pool_frame: pd.DataFrame,
    candidates: np.ndarray,
    frames: dict[str, pd.DataFrame] | None,
    scores: np.ndarray | None,
    arrays: ModelArrays,
) -> SelectionPool:
    """The candidates' arrays (positions 0..len(candidates)-1) plus the run's train/validation data."""

    def take(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else values[candidates]

    train = frames["train"] if frames is not None else None
    validation = frames["validation"] if frames is not None else None
    has_validation_embeddings = arrays.validation_embeddings is not None
    return SelectionPool(
        smiles=pool_frame["canonical_smiles"].to_numpy()[candidates].tolist(),
        labels=take(pool_frame["label"].to_numpy()) if "label" in pool_frame else None,
        influence_scores=take(scores),
        embeddings=take(arrays.pool_embeddings),
        mc_predictions=None if arrays.mc_predictions is None else arrays.mc_predictions[:, candidates],
        train_smiles=train["canonical_smiles"].tolist() if train is not None else None,
        train_embeddings=arrays.train_embeddings,
        train_labels=train["label"].to_numpy() if train is not None else None,
        val_embeddings=arrays.validation_embeddings,
        val_labels=validation["label"].to_numpy() if has_validation_embeddings else None,
    )


def shift_diagnostics(
    pool_frame: pd.DataFrame,
    candidates: np.ndarray,
    frames: dict[str, pd.DataFrame],
    arrays: ModelArrays,
    output_args: OutputArguments,
    seed: int,
) -> dict[str, Any]:
    """Shift of the candidates relative to the training split (test split as the in-distribution reference).

    Logged, saved to shift_report.json and drawn in shift_diagnostics.png (when the pool has labels).
    """
    candidate_frame = pool_frame.iloc[candidates]
    external_labels = candidate_frame["label"].to_numpy() if "label" in candidate_frame else None
    train_labels = frames["train"]["label"].to_numpy()
    report = shift_report(
        candidate_frame["canonical_smiles"].tolist(),
        frames["train"]["canonical_smiles"].tolist(),
        reference_smiles=frames["test"]["canonical_smiles"].tolist(),
        external_embeddings=None if arrays.pool_embeddings is None else arrays.pool_embeddings[candidates],
        train_embeddings=arrays.train_embeddings,
        external_labels=external_labels,
        train_labels=train_labels,
        n_permutations=output_args.mmd_permutations,
        seed=seed,
    )
    report["reference"] = "test split"
    report["pool_indices"] = candidates.tolist()
    logger.info("%s", format_shift_report(report))
    output_dir = Path(output_args.output_dir)
    write_json(output_dir / SHIFT_REPORT_FILE, report)
    if external_labels is None:
        logger.info("The pool has no labels: %s is not drawn.", SHIFT_PLOT_FILE)
    else:
        tanimoto = report["tanimoto"]
        plots.shift_diagnostics_plot(
            tanimoto["external"]["nn_similarity"],
            tanimoto["reference"]["nn_similarity"],
            external_labels,
            train_labels,
            output_dir / SHIFT_PLOT_FILE,
        )
    return report


def run_manifest(
    selection: Selection,
    pool_frame: pd.DataFrame,
    candidates: np.ndarray,
    overlap: dict[str, list[int]],
    arguments: tuple[Any, ...],
) -> dict[str, Any]:
    """The library's selection manifest plus what this run was given and what it left out."""
    selection_args, pool_args, data_args, model_args, output_args = arguments
    manifest = selection_manifest(
        selection, pool_args.external_file, dataset_fingerprint(pool_frame["canonical_smiles"].tolist())
    )
    manifest.update(
        {
            "n_pool": len(pool_frame),
            "n_candidates": len(candidates),
            "heldout_overlap": {
                **overlap,
                "excluded": not pool_args.keep_heldout_overlap and bool(overlap),
            },
            "split_file": data_args.split_file,
            "model_name_or_path": model_args.model_name_or_path,
            "scores_file": pool_args.scores_file if selection.strategy == "influence" else None,
            "arguments": {type(group).__name__: dataclasses.asdict(group) for group in arguments},
        }
    )
    return manifest


if __name__ == "__main__":
    main()
