#!/usr/bin/env python
r"""Choose external molecules to add to a MoLFormer regression run's training set, and say how far they lie.

A thin command line over `molft.selection` (strategies), `molft.valuation` (data Shapley) and `molft.shift`
(shift diagnostics). The external pool is checked like every other data file; molecules that sit in the
run's validation or test split are reported and left out (adding them would leak evaluation data):

    python run_selection.py configs/selection_example.yaml
    python run_selection.py configs/selection_example.yaml --strategy random --seed 3 --output_dir sel/random
    python run_selection.py --external_file pool.csv --strategy influence --k 50 \
        --scores_file outputs/influence/influence_scores.csv --split_file outputs/run/split.json \
        --output_dir sel/influence_top

Pool molecules are named by their row in the pool file (the pool id), the same id run_influence.py
writes, so scores and selections line up even when invalid SMILES were skipped. A run's data options
(files, columns, standardisation) are read from its split.json; flags override them.

Writes `selected.csv` (columns rank, index = pool id, smiles, label, score; what `run_regression.py
--extra_train_file` reads), `manifest.json` (strategy, parameters, seed, chosen pool ids, pool
fingerprint, held-out overlap), optionally `merged_train.csv`, the shift diagnostics `shift_report.json`
and `shift_diagnostics.png`, then `run_complete.json` last (the names of `molft.files`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from molft.arguments import OutputArguments, PoolArguments, RunModelArguments
from molft.cli import log_level, parse_args, setup_logging
from molft.files import INFLUENCE_SCORES_FILE, MERGED_TRAIN_FILE, SELECTED_FILE
from molft.io import mark_done, prepare_output_dir
from molft.run_data import RunDataArguments
from molft.selection import (
    VALUATION_STRATEGIES,
    available_strategies,
    candidate_positions,
    check_candidate_scores,
    heldout_overlap,
    load_pool,
    merge_selected_into_train,
    model_arrays,
    pool_budget,
    read_influence_scores,
    run_manifest,
    select,
    selection_pool,
    strategy_parameters,
    write_selection,
)
from molft.shift import shift_diagnostics
from molft.tasks import require_single_target_regression

logger = logging.getLogger(__name__)


@dataclass
class SelectionArguments:
    """The strategy, its budget and options, and the inputs it is computed from."""

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
    scores_file: str | None = field(
        default=None,
        metadata={
            "help": f"influence: run_influence.py's {INFLUENCE_SCORES_FILE} for this very pool "
            "(negative score = helpful); checked molecule by molecule."
        },
    )
    n_passes: int = field(default=20, metadata={"help": "uncertainty: MC-dropout passes."})
    batch_size: int = field(default=64, metadata={"help": "Molecules per forward pass."})


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
class ResultArguments:
    """What is written besides the selection itself."""

    write_merged_train: bool = field(
        default=False,
        metadata={
            "help": f"Also write {MERGED_TRAIN_FILE}: the training split plus the chosen molecules, "
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


ARGUMENT_TYPES = (
    SelectionArguments,
    PoolArguments,
    RunDataArguments,
    RunModelArguments,
    OutputArguments,
    ResultArguments,
)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run one selection and return its manifest (also written to the output folder)."""
    arguments = parse_args(ARGUMENT_TYPES, args, description=__doc__)
    selection_args, pool_args, data_args, model_args, output_args, result_args = arguments
    setup_logging(log_level(output_args.log_level))
    params = strategy_options(selection_args)
    data_args.use_model_split(model_args.model_name_or_path, required=False)
    require_single_target_regression("run_selection.py", model_args.model_name_or_path, data_args.split_file)
    validate_arguments(selection_args, params, data_args, model_args, result_args)
    output_dir = prepare_output_dir(output_args.output_dir, output_args.overwrite_output_dir, "selection")
    started = time.perf_counter()

    # The run's split (its data options filled from its record), the pool, and which molecules may be picked
    frames = data_args.load_frames() if data_args.split_file else None
    pool_frame = load_pool(
        pool_args.external_file,
        pool_args.external_smiles_column,
        pool_args.external_label_column,
        require_labels=False,
        strict=pool_args.external_strict_smiles,
        standardize=data_args.standardize,  # the run's, so pool molecules compare with its splits
    )
    has_labels = "label" in pool_frame.columns
    if not has_labels and needs_pool_labels(selection_args.strategy):
        raise ValueError(
            f"Strategy {selection_args.strategy!r} needs the pool's labels; {pool_args.external_file} has no "
            "label column (name it with --external_label_column)."
        )
    overlap = heldout_overlap(pool_frame, frames)
    candidates = candidate_positions(pool_frame, overlap, keep=pool_args.keep_heldout_overlap)
    budget = pool_budget(
        selection_args.k, selection_args.fraction, len(candidates), len(pool_frame), pool_args.external_file
    )

    # Precomputed inputs: influence scores, then what the model says (embeddings, MC dropout)
    scores = None
    if selection_args.strategy == "influence":
        scores = read_influence_scores(selection_args.scores_file, pool_frame)
        check_candidate_scores(scores, pool_frame, candidates, selection_args.scores_file)
    arrays = model_arrays(
        model_args,
        pool_frame,
        frames,
        strategy=selection_args.strategy,
        params=params,
        shift_diagnostics=result_args.shift_diagnostics,
        n_passes=selection_args.n_passes,
        batch_size=selection_args.batch_size,
        seed=selection_args.seed,
        quiet=output_args.disable_tqdm,
    )

    # Select among the candidates; indices are mapped back to positions in the whole pool file
    pool = selection_pool(pool_frame, candidates, frames, scores, arrays)
    selection = select(selection_args.strategy, pool, budget, selection_args.seed, **params)
    selection = dataclasses.replace(selection, indices=candidates[selection.indices])
    logger.info("Selected %d of %d candidates (%s).", len(selection), len(candidates), selection.strategy)

    # Outputs, each written atomically
    merged = None
    if result_args.write_merged_train:
        merged = merge_selected_into_train(frames["train"][["smiles", "label"]], pool_frame, selection)
    manifest = run_manifest(
        selection,
        pool_frame,
        candidates,
        overlap,
        pool_file=pool_args.external_file,
        keep_heldout_overlap=pool_args.keep_heldout_overlap,
        split_file=data_args.split_file,
        model_name_or_path=model_args.model_name_or_path,
        scores_file=selection_args.scores_file,
        arguments=arguments,
    )
    paths = write_selection(output_dir, pool_frame, selection, manifest, merged)
    logger.info("Wrote %s", ", ".join(str(path) for path in paths.values()))
    if not has_labels and len(selection):
        logger.warning("The pool has no labels: %s cannot be used as --extra_train_file.", SELECTED_FILE)

    # How far the candidates lie from the training data; then the completion marker, last
    if result_args.shift_diagnostics and frames is not None:
        shift_diagnostics(
            output_dir,
            pool_frame,
            candidates,
            frames,
            pool_embeddings=arrays.pool_embeddings,
            train_embeddings=arrays.train_embeddings,
            n_permutations=result_args.mmd_permutations,
            seed=selection_args.seed,
        )
    elif result_args.shift_diagnostics:
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
    data_args: RunDataArguments,
    model_args: RunModelArguments,
    result_args: ResultArguments,
) -> None:
    """Fail before anything slow runs when a strategy lacks one of its inputs."""
    strategy = selection_args.strategy
    effective = {**strategy_parameters(strategy), **params}
    if strategy == "influence" and not selection_args.scores_file:
        raise ValueError(
            f"Strategy 'influence' needs --scores_file (run_influence.py's {INFLUENCE_SCORES_FILE})."
        )
    if selection_args.scores_file and strategy != "influence":
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
            "give --model_name_or_path (the run folder, with its split.json) or --split_file."
        )
    if result_args.write_merged_train and not data_args.split_file:
        raise ValueError(
            "--write_merged_train needs the run's training split: give --model_name_or_path or --split_file."
        )
    if strategy == "uncertainty" and selection_args.n_passes < 2:
        raise ValueError(f"--n_passes must be >= 2 to estimate a variance, got {selection_args.n_passes}.")
    if selection_args.k is not None and selection_args.fraction is not None:
        raise ValueError("Give only one of --k and --fraction.")
    if selection_args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {selection_args.batch_size}.")


if __name__ == "__main__":
    main()
