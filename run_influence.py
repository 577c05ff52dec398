#!/usr/bin/env python
r"""Score external molecules by their influence on a fine-tuned MoLFormer regression run's held-out loss.

A thin command line over `molft.influence`: it rebuilds the run's data from its split.json, loads the saved
model (full or PEFT adapter), and asks which external molecules, if added to the training data, would
lower the loss on the validation molecules (the query set):

    python run_influence.py configs/influence_example.yaml
    python run_influence.py configs/influence_example.yaml --estimator lissa --lissa_depth 2000
    python run_influence.py --model_name_or_path outputs/run --external_file pool.csv \
        --estimator datainf --scope lora --output_dir outputs/influence_lora
    python run_influence.py configs/influence_example.yaml --validate ridge   # trust check of every estimator
    python run_influence.py configs/influence_example.yaml --validate lds --lds_retrain warm   # vs retraining

Sign convention (the library's): a score is the predicted change of the query loss when the molecule is
added, so NEGATIVE = HELPFUL; rank 1 is the most helpful molecule.

The run's data options come from its split.json (flags override them). Scores name molecules by pool id
(row in the pool file; invalid rows are skipped with a count). Pool molecules in the run's validation/test
split are left out (--keep_heldout_overlap: scored, marked in `in_run_split`, unranked).

Writes `influence_scores.csv` (what `run_selection.py --strategy influence --scores_file` reads),
`influence_summary.json` (settings, timings, solver convergence, score statistics and the threshold each
selection rule implies), `influence_histogram.png`, with --per_query `influence_matrix.npy` (+
`influence_queries.csv`), with --validate ridge `validation.csv`/`validation.md`, with --validate lds
`lds_subsets.csv`/`lds_groups.csv`/`lds_summary.json` (molft.influence.lds: every --validate_estimators
estimator against retraining the network with random pool subsets added), then `run_complete.json` last.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

import modeling_molformer_reg  # noqa: F401  registers MoLFormer with the Auto classes
import tokenization_molformer  # noqa: F401  registers the tokenizer with AutoTokenizer
from molft import plots
from molft.arguments import OutputArguments, PoolArguments, RunModelArguments
from molft.cli import log_level, parse_args, parse_list, setup_logging
from molft.files import (
    INFLUENCE_HISTOGRAM_FILE,
    INFLUENCE_SCORES_FILE,
    INFLUENCE_SUMMARY_FILE,
    VALIDATION_CSV,
    VALIDATION_MD,
)
from molft.influence import ESTIMATORS, SCOPES, lds
from molft.influence.molformer import (
    CURVATURES,
    ProblemSetup,
    build_problem,
    check_regression_checkpoint,
    embed_all,
    frame_batches,
    influence_loss,
    load_candidate_pool,
    resolve_dtype,
    tracin_checkpoints,
    training_subset,
    warn_about_extra_training_data,
)
from molft.influence.report import leave_out_heldout, log_result, run_summary, score_table, write_matrix
from molft.influence.runner import lissa_scale, run_estimator
from molft.influence.validation import (
    EstimatorScores,
    format_table,
    json_records,
    score_estimators,
    validate_estimators,
    validation_markdown,
    validation_mode,
)
from molft.io import mark_done, prepare_output_dir, write_csv, write_json, write_text
from molft.model_utils import fixed_feature_maps, resolve_device, unwrap_peft
from molft.peft_setup import load_regression_checkpoint
from molft.run_data import RunDataArguments
from molft.tasks import require_single_target_regression

logger = logging.getLogger(__name__)

QUERY_SPLITS = ("validation", "test")
VALIDATE_DEFAULT = "exact,cg,lissa,datainf,ekfac,gradient_dot,tracin"


@dataclass
class InfluenceArguments:
    estimator: str = field(
        default="cg",
        metadata={
            "help": "How (H + damping I)^-1 is applied: exact (explicit Hessian; small scopes) | cg (conjugate "
            "gradient on Hessian-vector products) | lissa (stochastic Neumann series) | datainf (closed form "
            "on the empirical Fisher; LoRA-sized scopes) | ekfac (kronfluence EK-FAC on Linear layers) | "
            "gradient_dot | tracin (first order, no Hessian)."
        },
    )
    scope: str = field(
        default="head",
        metadata={
            "help": "Parameters the influence is computed over: head (the regression head) | last_k_layers "
            "(last --last_k encoder layers + head) | bias (every bias + head) | lora (PEFT adapters) | all."
        },
    )
    last_k: int = field(default=1, metadata={"help": "Encoder layers in --scope last_k_layers."})
    damping: float = field(
        default=0.01,
        metadata={
            "help": "lambda in (H + lambda I), like an L2 penalty on the scope. The loss is 0.5 x squared error "
            "on the model's normalised targets, so the curvature is O(1) per unit feature. With --curvature "
            "hessian it must exceed the magnitude of the most negative eigenvalue."
        },
    )
    query_split: str = field(
        default="validation",
        metadata={
            "help": "Split whose loss the scores predict: validation | test. Selecting on test makes the run's "
            "test metrics optimistic (a loud warning is logged)."
        },
    )
    per_query: bool = field(
        default=False,
        metadata={"help": "Also write the [queries x candidates] matrix (influence_matrix.npy)."},
    )
    batch_size: int = field(
        default=32,
        metadata={
            "help": "Molecules per vectorised gradient / Hessian-vector product through the model. Pooled "
            "embeddings (--scope head, --validate) go in larger batches of up to 5e7 gradient entries."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use a seeded random subset of the training split for the Hessian/Fisher (speed for "
            "large scopes). Default: the whole training split."
        },
    )
    curvature: str = field(
        default="gauss_newton",
        metadata={
            "help": "Curvature that exact/cg/lissa invert: gauss_newton (J^T J of the model linearised at the "
            "trained parameters: positive semi-definite, so the solve is well-posed even when the model is not "
            "at a minimum) | hessian (the true Hessian of Koh & Liang: indefinite away from a minimum, needs "
            "--damping above its most negative eigenvalue). Gradients are the same for both."
        },
    )
    head_on_features: bool = field(
        default=True,
        metadata={
            "help": "--scope head: embed every molecule once and differentiate the head alone on the pooled "
            "embeddings (exact, since the encoder is outside the scope; much faster). false: run the whole "
            "model for every gradient."
        },
    )
    grad_method: str = field(
        default="auto",
        metadata={
            "help": "Per-sample gradients: layerwise (one ordinary backward per batch, each layer's gradients "
            "rebuilt from its inputs and output gradients; the fastest, benchmarks/bench_influence.py) | vmap "
            "(one vectorised backward per batch) | loop (one backward per molecule) | auto (layerwise where the "
            "model and scope allow it, else vmap, else loop)."
        },
    )
    vmap_chunk_size: int | None = field(
        default=None, metadata={"help": "Molecules per vmap chunk (caps memory for large scopes)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of --max_train_samples and the solvers."})
    dtype: str = field(
        default="float64",
        metadata={
            "help": "Precision of the influence computation: float64 (default: solves and rankings are limited "
            "by the method, not by rounding, and the forward-mode derivatives used for scoring do not overflow "
            "at padded positions, which they do in float32 for whole-model scopes) | float32 (half the "
            "memory; fine for --scope head)."
        },
    )


@dataclass
class EstimatorArguments:
    exact_max_params: int = field(
        default=5000, metadata={"help": "exact: refuse scopes with more parameters (P x P Hessian)."}
    )
    cg_tol: float = field(default=1e-6, metadata={"help": "cg: stop at relative residual <= tol."})
    cg_max_iter: int = field(default=100, metadata={"help": "cg: maximum iterations (HVP passes)."})
    lissa_scale: str = field(
        default="auto",
        metadata={
            "help": "lissa: must exceed the top eigenvalue of the damped Hessian, else the recursion "
            "diverges; auto = 1.5 x a power-iteration estimate."
        },
    )
    lissa_depth: int = field(default=1000, metadata={"help": "lissa: recursion steps."})
    lissa_repeats: int = field(default=1, metadata={"help": "lissa: independent recursions averaged."})
    lissa_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "lissa: molecules per stochastic HVP (default: full training data, deterministic)."
        },
    )
    lissa_log_every: int = field(default=50, metadata={"help": "lissa: record the iHVP norm every N steps."})
    lissa_divergence_factor: float = field(
        default=10.0, metadata={"help": "lissa: declare divergence when the norm exceeds this x its bound."}
    )
    datainf_layer_damping: str = field(
        default="heuristic",
        metadata={
            "help": "datainf: fixed (--damping for every layer) | heuristic (0.1 x mean squared gradient norm "
            "per parameter, per layer; DataInf needs damping well above the squared gradient norms)."
        },
    )
    ekfac_strategy: str = field(
        default="ekfac", metadata={"help": "ekfac: kronfluence strategy ekfac | kfac | diagonal | identity."}
    )
    tracin_checkpoints: str | None = field(
        default=None,
        metadata={
            "help": "tracin: comma-separated checkpoint folders, or 'auto' (the run's checkpoint-* folders). "
            "Only the scope's parameters are swapped in. Default: the final model alone (= gradient_dot)."
        },
    )
    tracin_learning_rates: str | None = field(
        default=None,
        metadata={
            "help": "tracin: comma-separated learning rate per checkpoint (default: the last learning rate "
            "logged in each checkpoint's trainer_state.json)."
        },
    )


@dataclass
class ValidationArguments:
    validate: str = field(
        default="none",
        metadata={
            "help": "none | ridge: check the estimators where the truth is computable, a ridge head on the "
            "model's frozen pooled embeddings (l2 = --damping), against the exact influence and the measured "
            "query-loss change of refitting with each molecule added (validation.csv/.md) | lds: against "
            "retraining the network with random pool subsets added (--lds_* options; lds_summary.json). "
            "The bare flag (or the old 'true') means ridge.",
            "nargs": "?",
            "const": "ridge",
        },
    )
    validate_estimators: str = field(
        default=VALIDATE_DEFAULT, metadata={"help": "Comma-separated estimators compared by --validate."}
    )


ARGUMENT_TYPES = (
    InfluenceArguments,
    EstimatorArguments,
    PoolArguments,
    RunDataArguments,
    RunModelArguments,
    ValidationArguments,
    lds.LdsArguments,
    OutputArguments,
)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Score the external pool and return the summary (also written to influence_summary.json)."""
    arguments = parse_args(ARGUMENT_TYPES, args, description=__doc__)
    influence_args, estimator_args, pool_args, data_args = arguments[:4]
    model_args, validation_args, lds_args, output_args = arguments[4:]
    level = log_level(output_args.log_level)
    setup_logging(level)
    # no config dumps (transformers) or argument dumps (kronfluence) at info level
    transformers_logging.set_verbosity(max(level, logging.WARNING))
    logging.getLogger("kronfluence").setLevel(max(level, logging.WARNING))
    validate_arguments(influence_args, estimator_args, validation_args, model_args)
    require_single_target_regression("run_influence.py", model_args.model_name_or_path)
    if validation_args.validate == "lds":
        lds.check_arguments(lds_args, model_args.model_name_or_path)
    device, dtype = resolve_device(model_args.device), resolve_dtype(influence_args.dtype)
    started = time.perf_counter()
    quiet = output_args.disable_tqdm

    # Inputs, each checked before anything slow runs
    checkpoint_kind = check_regression_checkpoint(model_args.model_name_or_path)
    data_args.use_model_split(model_args.model_name_or_path, required=True)
    frames = data_args.load_frames()
    pool = load_candidate_pool(pool_args, data_args.standardize)  # invalid rows skipped, ids kept
    pool, pool_report = leave_out_heldout(pool, frames, keep=pool_args.keep_heldout_overlap)
    if validation_args.validate == "lds" and lds_args.lds_shard:  # retrainings only: no scores, no summary
        return lds.shard_of_run(
            lds_args, model_args.model_name_or_path, pool, frames, influence_args.query_split,
            output_args.output_dir, pool_args.external_file,
        )  # fmt: skip
    if influence_args.query_split == "test":
        logger.warning(
            "!!! --query_split test: the scores predict the TEST loss. Selecting molecules with them tunes the "
            "training data to the test set, so the run's test metrics are no longer an unbiased estimate. Use "
            "this only for analysis, never for a selection you report test metrics for. !!!"
        )
    warn_about_extra_training_data(model_args.model_name_or_path)
    output_dir = prepare_output_dir(
        output_args.output_dir, output_args.overwrite_output_dir, "influence scores"
    )

    model = load_regression_checkpoint(model_args.model_name_or_path, model_args.base_model)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    config = unwrap_peft(model).config
    loss_fn, loss_description = influence_loss(config)

    train_frame = training_subset(frames["train"], influence_args.max_train_samples, influence_args.seed)
    query_frame = frames[influence_args.query_split]
    roles = {"train": train_frame, "query": query_frame, "candidates": pool}
    batch_size, max_length = influence_args.batch_size, model_args.max_seq_length
    token_batches = {
        role: frame_batches(frame, tokenizer, batch_size, max_length) for role, frame in roles.items()
    }
    logger.info(
        "Influence of %d external molecules on the %s loss (%d molecules); Hessian over %d training molecules.",
        len(pool),
        influence_args.query_split,
        len(query_frame),
        len(train_frame),
    )

    with fixed_feature_maps(model):
        setup = build_problem(
            model, loss_fn, token_batches, scope=influence_args.scope, last_k=influence_args.last_k,
            head_on_features=influence_args.head_on_features, curvature=influence_args.curvature,
            estimator=influence_args.estimator, grad_method=influence_args.grad_method,
            vmap_chunk_size=influence_args.vmap_chunk_size, batch_size=batch_size, quiet=quiet,
        )  # fmt: skip
        options = estimator_options(influence_args, estimator_args, setup, model_args)
        scores, diagnostics = run_estimator(
            setup.problem, setup.batches, influence_args.estimator, options,
            per_query=influence_args.per_query, damping=influence_args.damping, quiet=quiet,
        )  # fmt: skip
        lds_scores = None
        if validation_args.validate == "lds":  # every estimator on this scope, the main one reused
            lds_scores = score_estimators(
                setup, parse_list(validation_args.validate_estimators),
                lambda name: estimator_options(influence_args, estimator_args, setup, model_args, name),
                influence_args.estimator, EstimatorScores(mean_of(scores), diagnostics["timings"]["total_s"]),
                scope=influence_args.scope, pool=pool, damping=influence_args.damping,
                curvature=influence_args.curvature, quiet=quiet,
            )  # fmt: skip
        validation = None
        if validation_args.validate == "ridge":
            validation = validate_estimators(
                setup.features or embed_all(model, token_batches, quiet),
                {role: frame["label"].to_numpy() for role, frame in roles.items()},
                [
                    (name, estimator_options(influence_args, estimator_args, estimator=name))
                    for name in parse_list(validation_args.validate_estimators)
                ],
                target_mean=config.target_mean, target_std=config.target_std, damping=influence_args.damping,
                batch_size=batch_size, exact_max_params=estimator_args.exact_max_params, quiet=quiet,
            )  # fmt: skip

    mean_scores = mean_of(scores)
    scores_frame = score_table(pool, mean_scores, frames)
    write_csv(output_dir / INFLUENCE_SCORES_FILE, scores_frame)
    if influence_args.per_query:
        write_matrix(output_dir, scores, query_frame)
    ranked = scores_frame.loc[scores_frame["rank"].notna(), "score"].to_numpy()  # held-out: unranked
    summary = run_summary(
        arguments, checkpoint_kind, setup, diagnostics, ranked, loss_description, len(train_frame),
        len(query_frame), dtype, device, pool_report,
    )  # fmt: skip
    if validation is not None:
        write_csv(output_dir / VALIDATION_CSV, validation)
        markdown = validation_markdown(validation, influence_args.damping, influence_args.query_split)
        write_text(output_dir / VALIDATION_MD, markdown)
        summary["validation"] = json_records(validation)
        logger.info("Estimator validation (ridge head on frozen embeddings):\n%s", format_table(validation))
    if lds_scores is not None:
        summary["lds"] = lds.evaluate_run(
            lds_args, lds_scores, model_args.model_name_or_path, pool, frames, influence_args.query_split,
            output_dir, f"{influence_args.estimator}@{influence_args.scope}", pool_args.external_file,
        )  # fmt: skip
    write_json(output_dir / INFLUENCE_SUMMARY_FILE, summary)
    plots.score_histogram(
        ranked,
        output_dir / INFLUENCE_HISTOGRAM_FILE,
        xlabel="influence score (negative = helpful)",
        title=f"{influence_args.estimator} influence on the {influence_args.query_split} loss "
        f"({influence_args.scope} scope)",
    )
    log_result(scores_frame, summary)
    mark_done(
        output_dir,
        {
            "script": "run_influence.py",
            "estimator": influence_args.estimator,
            "scope": influence_args.scope,
            "n_candidates": len(pool),
            "external_file": pool_args.external_file,
            "seconds": time.perf_counter() - started,
        },
    )
    return summary


def mean_of(scores: Any) -> Any:
    """Scores for the mean query loss: [N], from the [Q, N] matrix of --per_query."""
    return scores.mean(axis=0) if scores.ndim > 1 else scores


def validate_arguments(
    influence_args: InfluenceArguments,
    estimator_args: EstimatorArguments,
    validation_args: ValidationArguments,
    model_args: RunModelArguments,
) -> None:
    """Fail before any data or model is read when options cannot work; normalises --validate."""
    validation_args.validate = validation_mode(validation_args.validate)
    if not model_args.model_name_or_path:
        raise ValueError(
            "--model_name_or_path is required: the run_regression.py output folder (full model or PEFT "
            "adapter) whose influence is computed."
        )
    if influence_args.estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown --estimator {influence_args.estimator!r}; choose one of {sorted(ESTIMATORS)}."
        )
    if influence_args.scope not in SCOPES:
        raise ValueError(f"Unknown --scope {influence_args.scope!r}; choose one of {SCOPES}.")
    if influence_args.query_split not in QUERY_SPLITS:
        raise ValueError(f"--query_split must be one of {QUERY_SPLITS}, got {influence_args.query_split!r}.")
    if influence_args.curvature not in CURVATURES:
        raise ValueError(f"--curvature must be one of {CURVATURES}, got {influence_args.curvature!r}.")
    if not (math.isfinite(influence_args.damping) and influence_args.damping >= 0):
        raise ValueError(f"--damping must be a finite number >= 0, got {influence_args.damping}.")
    if influence_args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {influence_args.batch_size}.")
    if influence_args.max_train_samples is not None and influence_args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be >= 1, got {influence_args.max_train_samples}.")
    lissa_scale(estimator_args.lissa_scale)  # raises on a bad value
    if validation_args.validate == "ridge" and influence_args.damping <= 0:
        raise ValueError("--validate ridge needs --damping > 0 (the ridge penalty of the surrogate head).")
    unknown = sorted(set(parse_list(validation_args.validate_estimators)) - set(ESTIMATORS))
    if validation_args.validate != "none" and unknown:
        raise ValueError(
            f"--validate_estimators: unknown estimator(s) {unknown}; choose from {sorted(ESTIMATORS)}."
        )


def estimator_options(
    influence_args: InfluenceArguments,
    estimator_args: EstimatorArguments,
    setup: ProblemSetup | None = None,
    model_args: RunModelArguments | None = None,
    estimator: str | None = None,
) -> dict[str, Any]:
    """The constructor options of one estimator, from the flags (`setup`/`model_args`: TracIn checkpoints)."""
    name = estimator or influence_args.estimator
    damping = influence_args.damping
    if name == "exact":
        return {"damping": damping, "max_params": estimator_args.exact_max_params}
    if name == "cg":
        return {"damping": damping, "tol": estimator_args.cg_tol, "max_iter": estimator_args.cg_max_iter}
    if name == "lissa":
        return {
            "damping": damping,
            "scale": lissa_scale(estimator_args.lissa_scale),
            "depth": estimator_args.lissa_depth,
            "repeats": estimator_args.lissa_repeats,
            "batch_size": estimator_args.lissa_batch_size,
            "seed": influence_args.seed,
            "log_every": estimator_args.lissa_log_every,
            "divergence_factor": estimator_args.lissa_divergence_factor,
        }
    if name == "datainf":
        return {"damping": damping, "layer_damping": estimator_args.datainf_layer_damping}
    if name == "ekfac":
        return {
            "damping": damping,
            "strategy": estimator_args.ekfac_strategy,
            "seed": influence_args.seed,
            "output_dir": None,  # kronfluence's factors go to a temporary folder, removed afterwards
        }
    if name == "tracin":
        if setup is None or model_args is None or not estimator_args.tracin_checkpoints:
            return {}  # the final parameters alone (--validate: the surrogate has no checkpoints)
        return {
            "checkpoints": tracin_checkpoints(
                setup,
                estimator_args.tracin_checkpoints,
                estimator_args.tracin_learning_rates,
                model_args.model_name_or_path,
                model_args.base_model,
            )
        }
    return {}  # gradient_dot: no curvature, damping has no effect


if __name__ == "__main__":
    main()
