"""Linear datamodeling score (LDS): do influence scores predict what retraining the network does?

The standard test of data attribution (Park et al. 2023, TRAK): draw M random subsets of the external pool
(a fraction alpha each, seeded), retrain the run with each subset added to its training split, and measure
the query loss. An estimator's prediction for a subset is the sum of its molecules' scores; its LDS is the
Spearman correlation between predictions and measured changes over the M subsets, with a percentile
bootstrap 95% interval over subsets.

Sign convention: a score is the predicted change of the query loss when its molecule is added (negative =
helpful), so the sum over a subset predicts loss(subset) - loss(reference), the measured change, with the
SAME sign. A good estimator has LDS near +1; near 0 it predicts nothing; negative, it ranks backwards.

Controls: the noise ceiling is the Spearman correlation between the measured changes of two retraining
seeds (with noise independent between seeds, a single-seed LDS cannot exceed about its square root); with
more seeds the mean change is more reliable (Spearman-Brown: k r / (1 + (k - 1) r) from the mean pairwise
agreement r), and the LDS against it is capped less; the
shuffled control permutes scores across molecules (its LDS sits near 0). The group check retrains with
the top-k, bottom-k and random-k selections run_selection.py makes (molft.selection) and sets the predicted
change (sum of scores / n_train, the first-order estimate) next to the measured one.

Every retraining is a job with its own folder under the LDS directory; a finished one holds a completion
marker with its loss and is skipped on rerun, so an interrupted evaluation resumes, and shards (i/n, like
scripts/sweep.sh) split the subset retrainings between processes. The retraining itself is a function
(`RetrainFn`): molft.influence.retrain runs run_regression.py; tests pass an in-process one.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from molft.files import (
    DONE_MARKER,
    LDS_GROUPS_FILE,
    LDS_RETRAIN_DIR,
    LDS_SCORES_FILE,
    LDS_SUBSETS_FILE,
    LDS_SUMMARY_FILE,
)
from molft.influence.lds_stats import correlation_record, json_number, seed_agreement, shuffled_control
from molft.influence.retrain import (
    RetrainFn,
    RetrainJob,
    SubprocessRetrainer,
    addable_pool,
    check_plan,
    missing_jobs,
    parse_shard,
    plan_jobs,
    run_jobs,
    run_retrainer,
)
from molft.influence.validation import EstimatorScores, extra_scores, safe_spearman
from molft.io import read_json, write_csv, write_json
from molft.run_record import file_sha256
from molft.selection import SelectionPool, pool_ids, select

logger = logging.getLogger(__name__)

SIGN_CONVENTION = (
    "prediction = sum of the subset's scores (predicted query-loss change, negative = helpful); measured "
    "change = query loss after retraining with the subset minus the reference retraining's, same seed and "
    "procedure; same sign, so LDS near +1 is good"
)
GROUP_MODES = {"top": ("influence", {"mode": "top"}), "bottom": ("influence", {"mode": "bottom"}),
               "random": ("random", {})}  # fmt: skip


@dataclass
class LdsArguments:
    """run_influence.py --validate lds: subsets, retraining procedure, seeds, controls and sharding."""

    lds_subsets: int = field(
        default=32, metadata={"help": "--validate lds: number of random pool subsets M."}
    )
    lds_fraction: float = field(default=0.5, metadata={"help": "Share of the pool in each subset (alpha)."})
    lds_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the subsets, the bootstrap, the shuffled control and the random-k group "
            "(= run_selection.py --strategy random --seed)."
        },
    )
    lds_retrain: str = field(
        default="warm",
        metadata={
            "help": "warm (train the fine-tuned model --lds_warm_steps more steps on train + subset) | scratch "
            "(the run's whole recipe from its starting checkpoint)."
        },
    )
    lds_warm_steps: int = field(default=100, metadata={"help": "Optimiser steps of a warm retraining."})
    lds_noise: bool = field(default=True, metadata={"help": "Retrain every subset with a second seed too."})
    lds_noise_seed: int | None = field(
        default=None, metadata={"help": "Second retraining seed (default: the run's seed + 1)."}
    )
    lds_more_seeds: int = field(
        default=0,
        metadata={
            "help": "Retrain every subset with this many more seeds after the second (the second + 1, + 2, ...): "
            "each adds M + 1 retrainings. The summary then gives every pair of seeds' agreement, the "
            "reliability of the mean over all seeds, and each estimator's LDS against that mean, which one "
            "seed's noise caps less."
        },
    )
    lds_group_k: int = field(
        default=60, metadata={"help": "k of the top-k/bottom-k/random-k group check (0: no group check)."}
    )
    lds_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of the LDS interval."})
    lds_shuffles: int = field(default=20, metadata={"help": "Permutations of the shuffled-scores control."})
    lds_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the retrainings (default: <output_dir>/lds_retrains). Runs with other "
            "estimators or scopes on the same run, pool and settings can share it."
        },
    )
    lds_shard: str | None = field(
        default=None,
        metadata={
            "help": "i/n (0-based): only run every n-th reference/subset retraining starting at i, then exit "
            "(no scores, no summary); shards share --lds_dir. Once EVERY shard has finished (it redoes "
            "unfinished retrainings), a run without --lds_shard scores, runs the group check and writes "
            "the summary."
        },
    )
    lds_only_assemble: bool = field(
        default=False,
        metadata={
            "help": "Do not retrain subsets (an error names any missing, e.g. of a failed shard); the "
            "group check, which needs the scores, still retrains here."
        },
    )
    lds_extra_scores: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated run_influence.py output folders (other estimators/scopes, same run and "
            "pool) whose scores join the comparison, named estimator@scope. A folder of an earlier "
            "--validate lds run brings every estimator it scored (its lds_scores.csv): the scores of a warm "
            "run can be judged against scratch retraining without computing them again."
        },
    )
    lds_retrain_args: str | None = field(
        default=None, metadata={"help": "Extra run_regression.py flags for every retraining."}
    )
    lds_launcher: str | None = field(
        default=None,
        metadata={"help": "Command that starts run_regression.py (default: this Python interpreter)."},
    )
    lds_keep_models: bool = field(
        default=False, metadata={"help": "Keep each retraining's weights (default: removed once measured)."}
    )


def check_arguments(args: LdsArguments, run_dir: str | None = None) -> None:
    """Fail before anything slow runs when the LDS options, or the run's recorded recipe, cannot work."""
    from molft.influence.retrain import RETRAIN_MODES, RunRecipe

    if args.lds_subsets < 3:
        raise ValueError(
            f"--lds_subsets must be >= 3 (a rank correlation over subsets), got {args.lds_subsets}."
        )
    if not 0 < args.lds_fraction < 1:
        raise ValueError(f"--lds_fraction must be in (0, 1), got {args.lds_fraction}.")
    if args.lds_retrain not in RETRAIN_MODES:
        raise ValueError(f"--lds_retrain must be one of {RETRAIN_MODES}, got {args.lds_retrain!r}.")
    if args.lds_more_seeds < 0 or (args.lds_more_seeds and not args.lds_noise):
        raise ValueError(
            f"--lds_more_seeds takes a count >= 0 of seeds after the second (--lds_noise), got "
            f"{args.lds_more_seeds} with --lds_noise {args.lds_noise}."
        )
    for flag, value, low in (("--lds_warm_steps", args.lds_warm_steps, 1), ("--lds_group_k", args.lds_group_k, 0),
                             ("--lds_bootstrap", args.lds_bootstrap, 1), ("--lds_shuffles", args.lds_shuffles, 1)):  # fmt: skip
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}.")
    parse_shard(args.lds_shard)
    if run_dir is not None:
        RunRecipe.from_run(run_dir)  # its run_options.yaml must exist and allow adding molecules


def draw_subsets(n_pool: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """[M, N] membership of M random subsets of round(fraction x N) molecules; subset i depends on (seed, i)
    only, so a larger M keeps the first subsets (and their retrainings)."""
    size = math.floor(fraction * n_pool + 0.5)
    if not 0 < size < n_pool:
        raise ValueError(
            f"--lds_fraction {fraction} of a pool of {n_pool} gives subsets of {size} molecules."
        )
    membership = np.zeros((m, n_pool), dtype=bool)
    for i in range(m):
        membership[i, np.random.default_rng([seed, i]).choice(n_pool, size=size, replace=False)] = True
    return membership


def selection_groups(pool: pd.DataFrame, scores: np.ndarray, k: int, seed: int) -> dict[str, np.ndarray]:
    """The top-k, bottom-k and random-k pool positions, chosen as run_selection.py chooses them."""
    if k > len(pool):
        raise ValueError(f"--lds_group_k {k} exceeds the {len(pool)} pool molecules subsets are drawn from.")
    candidates = SelectionPool(smiles=pool["canonical_smiles"].tolist(), influence_scores=scores)
    return {
        name: select(strategy, candidates, k, seed, **params).indices
        for name, (strategy, params) in GROUP_MODES.items()
    }


def assemble(
    args: LdsArguments,
    scores: dict[str, EstimatorScores],
    pool: pd.DataFrame,
    membership: np.ndarray,
    jobs: Sequence[RetrainJob],
    lds_dir: Path,
    output_dir: Path | None,
    *,
    primary: str | None = None,
    n_train: int | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The LDS of every estimator from the finished retrainings; writes the CSVs and lds_summary.json."""
    results = {job.key: read_json(Path(lds_dir) / job.key / DONE_MARKER) for job in jobs}
    seeds = list(dict.fromkeys(job.seed for job in jobs))
    ids = pool_ids(pool)
    reference = {seed: results[f"seed{seed}/reference"]["loss"] for seed in seeds}
    subset_jobs = {seed: [job for job in jobs if job.seed == seed and job.kind == "subset"] for seed in seeds}
    table = pd.DataFrame({
        "subset": [job.name for job in subset_jobs[seeds[0]]],
        "size": membership.sum(axis=1),
        "members": [" ".join(map(str, ids[row])) for row in membership],
    })  # fmt: skip
    changes = {}
    for seed in seeds:
        losses = np.array([results[job.key]["loss"] for job in subset_jobs[seed]])
        table[f"loss_seed{seed}"] = losses
        table[f"change_seed{seed}"] = changes[seed] = losses - reference[seed]
    measured, b, s = changes[seeds[0]], args.lds_bootstrap, args.lds_seed
    estimators: dict[str, Any] = {}
    for name, entry in scores.items():
        if entry.scores is None:
            estimators[name] = {"lds": None, "ci_low": None, "ci_high": None, "seconds": entry.seconds,
                                "error": entry.error}  # fmt: skip
            continue
        prediction = membership @ entry.scores
        table[f"pred_{name}"] = prediction
        estimators[name] = {**correlation_record(prediction, measured, b, s), "seconds": entry.seconds}
        if len(seeds) > 1:
            estimators[name]["lds_noise_seed"] = json_number(safe_spearman(prediction, changes[seeds[1]]))
            against_mean = correlation_record(prediction, np.mean(list(changes.values()), 0), b, s)
            estimators[name]["lds_seed_mean"] = against_mean["lds"]
            estimators[name]["lds_seed_mean_ci"] = [against_mean["ci_low"], against_mean["ci_high"]]
    noise = correlation_record(changes[seeds[0]], changes[seeds[1]], b, s) if len(seeds) > 1 else None
    usable = [name for name, entry in scores.items() if entry.scores is not None]
    control_of = primary if primary in usable else (usable[0] if usable else None)
    summary: dict[str, Any] = {
        "estimators": estimators,
        "noise_ceiling": noise and noise["lds"],
        "noise_ceiling_ci": noise and [noise["ci_low"], noise["ci_high"]],
        "seed_agreement": seed_agreement(changes),
        "retrain": args.lds_retrain,
        "warm_steps": args.lds_warm_steps if args.lds_retrain == "warm" else None,
        "subsets": len(membership),
        "fraction": args.lds_fraction,
        "subset_size": int(membership[0].sum()),
        "pool_size": len(pool),
        "seed": args.lds_seed,
        "retrain_seeds": seeds,
        "reference_loss": {str(seed): loss for seed, loss in reference.items()},
        "sign_convention": SIGN_CONVENTION,
        "bootstrap": b,
        "shuffled_control": control_of
        and {
            "estimator": control_of,
            **shuffled_control(scores[control_of].scores, membership, measured, args.lds_shuffles, s),
        },
        "cost": {
            "retrainings": len(jobs),
            "mean_s": float(np.mean([r["seconds"] for r in results.values()])),
            "total_s": float(np.sum([r["seconds"] for r in results.values()])),
        },
        **(record or {}),
    }
    groups = group_table(scores, pool, jobs, results, reference, n_train)
    summary["groups"] = groups.to_dict(orient="records") if groups is not None else None
    if output_dir is not None:
        write_csv(Path(output_dir) / LDS_SUBSETS_FILE, table)
        per_molecule = {name: scores[name].scores for name in usable}
        write_csv(Path(output_dir) / LDS_SCORES_FILE, pd.DataFrame({"id": ids, **per_molecule}))
        if groups is not None:
            write_csv(Path(output_dir) / LDS_GROUPS_FILE, groups)
        write_json(Path(output_dir) / LDS_SUMMARY_FILE, summary)
    log_summary(summary)
    return summary


def group_table(
    scores: dict[str, EstimatorScores],
    pool: pd.DataFrame,
    jobs: Sequence[RetrainJob],
    results: dict[str, dict[str, Any]],
    reference: dict[int, float],
    n_train: int | None,
) -> pd.DataFrame | None:
    """Predicted (sum of scores, and / n_train) and measured change of the top/bottom/random-k groups."""
    group_jobs = [job for job in jobs if job.kind == "group"]
    if not group_jobs:
        return None
    ids, rows = pool_ids(pool), {}
    for job in group_jobs:
        members = np.array(job.members, dtype=np.int64)
        row = rows.setdefault(job.name, {"group": job.name, "k": len(members),
                                         "members": " ".join(map(str, ids[members]))})  # fmt: skip
        row[f"change_seed{job.seed}"] = results[job.key]["loss"] - reference[job.seed]
        for name, entry in scores.items():
            if entry.scores is not None:
                row[f"sum_{name}"] = float(entry.scores[members].sum())
                if n_train:
                    row[f"pred_change_{name}"] = row[f"sum_{name}"] / n_train
    return pd.DataFrame(list(rows.values()))


def log_summary(summary: dict[str, Any]) -> None:
    lines = [
        f"LDS ({summary['retrain']} retraining, {summary['subsets']} subsets of {summary['subset_size']}):"
    ]
    for name, entry in summary["estimators"].items():
        if entry["lds"] is None:
            lines.append(f"  {name}: no LDS ({entry.get('error') or 'constant predictions'})")
        else:
            lines.append(f"  {name}: {entry['lds']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]")
    if summary["noise_ceiling"] is not None:
        lines.append(f"  noise ceiling (seed vs seed): {summary['noise_ceiling']:+.3f}")
    agreement = summary.get("seed_agreement") or {}
    if agreement.get("seeds", 0) > 2 and agreement["mean_pair"] is not None:
        reliability = agreement["seed_mean_reliability"]
        lines.append(
            f"  {agreement['seeds']} seeds: mean pairwise {agreement['mean_pair']:+.3f}, reliability of their "
            f"mean {'n/a' if reliability is None else f'{reliability:+.3f}'}"
        )
    control = summary["shuffled_control"]
    if control and control["mean"] is not None:
        lines.append(
            f"  shuffled {control['estimator']}: mean {control['mean']:+.3f} (sd {control['sd']:.3f})"
        )
    logger.info("\n".join(lines))


def evaluate(
    args: LdsArguments,
    scores: dict[str, EstimatorScores],
    pool: pd.DataFrame,
    retrain: RetrainFn,
    seeds: Sequence[int],
    lds_dir: Path,
    output_dir: Path | None,
    *,
    primary: str | None = None,
    n_train: int | None = None,
    plan: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plan, run what is missing (resuming), and assemble the LDS of every estimator in `scores`."""
    membership = draw_subsets(len(pool), args.lds_subsets, args.lds_fraction, args.lds_seed)
    groups = {}
    if args.lds_group_k > 0 and primary is not None and scores[primary].scores is not None:
        groups = selection_groups(pool, scores[primary].scores, args.lds_group_k, args.lds_seed)
    jobs = plan_jobs(membership, seeds, groups)
    check_plan(lds_dir, plan_record(args, pool, plan))
    if args.lds_only_assemble:
        missing = missing_jobs([job for job in jobs if job.kind != "group"], lds_dir)
        if missing:
            raise ValueError(
                f"--lds_only_assemble: {len(missing)} subset retrainings are not finished in {lds_dir}, e.g. "
                f"{missing[:5]}; rerun their shard (or drop --lds_only_assemble to retrain them here)."
            )
    run_jobs(jobs, retrain, lds_dir)
    return assemble(args, scores, pool, membership, jobs, lds_dir, output_dir, primary=primary,
                    n_train=n_train, record=record)  # fmt: skip


def retrain_shard(
    args: LdsArguments,
    pool: pd.DataFrame,
    retrain: RetrainFn,
    seeds: Sequence[int],
    lds_dir: Path,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One shard's share of the reference and subset retrainings (the groups need scores: not here)."""
    membership = draw_subsets(len(pool), args.lds_subsets, args.lds_fraction, args.lds_seed)
    jobs = plan_jobs(membership, seeds)
    check_plan(lds_dir, plan_record(args, pool, plan))
    ran = run_jobs(jobs, retrain, lds_dir, parse_shard(args.lds_shard))
    missing = missing_jobs(jobs, lds_dir)
    logger.info(
        "Shard %s: %d retrainings run; %d of %d subset/reference retrainings missing in %s. Once every shard "
        "has finished, run without --lds_shard: it scores, runs the group check and writes the summary.",
        args.lds_shard, ran, len(missing), len(jobs), lds_dir,
    )  # fmt: skip
    return {"shard": args.lds_shard, "retrained": ran, "missing": len(missing), "lds_dir": str(lds_dir)}


def plan_record(args: LdsArguments, pool: pd.DataFrame, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What the retrainings in an LDS directory depend on (not M: subset i only depends on seed and i)."""
    ids = np.asarray(pool_ids(pool), dtype=np.int64)
    return {
        "retrain": args.lds_retrain,
        "warm_steps": args.lds_warm_steps if args.lds_retrain == "warm" else None,
        "fraction": args.lds_fraction,
        "seed": args.lds_seed,
        "pool_ids_sha1": hashlib.sha1(ids.tobytes()).hexdigest(),
        "retrain_args": args.lds_retrain_args,
        **(extra or {}),
    }


# ------------------------------------------------------------------------------- from run_influence.py


def run_setting(
    args: LdsArguments, run_dir: str, pool: pd.DataFrame, query_frame: pd.DataFrame, query_split: str,
    output_dir: str | Path, external_file: str,
) -> tuple[SubprocessRetrainer, list[int], Path, dict[str, Any]]:  # fmt: skip
    """The run's retrainer and retraining seeds, the LDS directory, and what the plan records of the run."""
    retrainer, seeds = run_retrainer(
        run_dir, args.lds_retrain, pool, query_frame, query_split, warm_steps=args.lds_warm_steps,
        noise=args.lds_noise, noise_seed=args.lds_noise_seed, more_seeds=args.lds_more_seeds,
        launcher=args.lds_launcher, extra_args=args.lds_retrain_args, keep_models=args.lds_keep_models,
    )  # fmt: skip
    lds_dir = Path(args.lds_dir) if args.lds_dir else Path(output_dir) / LDS_RETRAIN_DIR
    plan = {"run": str(retrainer.recipe.run_dir), "external_file_sha256": file_sha256(external_file),
            "query_split": query_split}  # fmt: skip
    return retrainer, seeds, lds_dir, plan


def evaluate_run(
    args: LdsArguments, scores: dict[str, EstimatorScores], run_dir: str, pool: pd.DataFrame,
    frames: dict[str, pd.DataFrame], query_split: str, output_dir: Path, primary: str, external_file: str,
) -> dict[str, Any]:  # fmt: skip
    """run_influence.py --validate lds: retrain the run (resuming) and write the LDS of every estimator."""
    candidates = addable_pool(pool)
    scores = {**scores, **extra_scores(args.lds_extra_scores, candidates)}
    retrainer, seeds, lds_dir, plan = run_setting(
        args, run_dir, pool, frames[query_split], query_split, output_dir, external_file
    )
    record = {
        "run": plan["run"],
        "query": {"split": query_split, "size": len(frames[query_split]), "loss": retrainer.loss_description},
        "original_loss": retrainer.original_loss(),
        "lds_dir": str(lds_dir),
    }
    return evaluate(args, scores, candidates, retrainer, seeds, lds_dir, output_dir, primary=primary,
                    n_train=len(frames["train"]), plan=plan, record=record)  # fmt: skip


def shard_of_run(
    args: LdsArguments, run_dir: str, pool: pd.DataFrame, frames: dict[str, pd.DataFrame], query_split: str,
    output_dir: str, external_file: str,
) -> dict[str, Any]:  # fmt: skip
    """run_influence.py --validate lds --lds_shard i/n: this shard's subset retrainings, nothing else."""
    retrainer, seeds, lds_dir, plan = run_setting(
        args, run_dir, pool, frames[query_split], query_split, output_dir, external_file
    )
    return retrain_shard(args, addable_pool(pool), retrainer, seeds, lds_dir, plan)
