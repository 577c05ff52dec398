"""run_influence.py end to end on tiny trained regression models (full and LoRA) and 30 external molecules."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml
from helpers import TINY_CONFIG, pool_rows_in_split, run_and_pool_files, single_thread, train_tiny_regression  # noqa: F401  (autouse fixture)

import run_influence
from configuration_molformer import MolformerConfig
from modeling_molformer import MolformerForMaskedLM
from molft.files import (
    DONE_MARKER,
    INFLUENCE_HISTOGRAM_FILE,
    INFLUENCE_MATRIX_FILE,
    INFLUENCE_QUERIES_FILE,
    INFLUENCE_SCORES_FILE,
    INFLUENCE_SUMMARY_FILE,
    LDS_RETRAIN_DIR,
    LDS_SUBSETS_FILE,
    LDS_SUMMARY_FILE,
    SPLIT_FILE,
    VALIDATION_CSV,
    VALIDATION_MD,
)
from molft.influence import LiSSADivergenceError
from molft.influence.report import DIRECTION
from molft.io import read_json
from molft.selection import check_scores_match_pool, load_pool

ROOT = Path(__file__).resolve().parents[1]
N_DATASET, N_POOL = 150, 30
N_TRAIN, N_QUERY = 120, 15  # run_regression.py's 80/10/10 split of 150 molecules
HEAD_PARAMS = 2 * 32 * 32 + 2 * 32 + 33  # classifier.dense, .dense2 (32x32 + bias) and .out_proj (32 + 1)
LORA_PARAMS = 2 * 6 * (8 * 32 + 32 * 8)  # 2 layers x 6 target modules x (A + B) at r = 8
QUIET = ["--disable_tqdm", "true", "--log_level", "warning"]
FAST = ["--damping", "0.01", "--lissa_depth", "100"]
ESTIMATORS = ("exact", "cg", "lissa", "datainf", "ekfac", "gradient_dot", "tracin")
COLUMNS = [
    "index",
    "smiles",
    "canonical_smiles",
    "label",
    "score",
    "rank",
    "helpful",
    "direction",
    "in_run_split",
]


class Runs(NamedTuple):
    full: Path  # full fine-tuning (keeps its checkpoint-* folder)
    lora: Path  # a LoRA adapter with its base_model folder
    train_file: Path
    pool_file: Path
    tmp: Path
    heldout: list[int]  # pool rows whose molecule is in the run's validation/test split
    scored: list[int]  # the other pool rows: the ones scored by default


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> Runs:
    tmp = tmp_path_factory.mktemp("influence")
    train_file, pool_file = run_and_pool_files(data_dir, tmp, N_DATASET, N_POOL)
    full = train_tiny_regression(train_file, tmp / "full")
    lora = train_tiny_regression(train_file, tmp / "lora", "--peft", "lora", "--save_strategy", "no")
    heldout = pool_rows_in_split(pool_file, full)
    scored = [i for i in range(N_POOL) if i not in heldout]
    return Runs(full, lora, train_file, pool_file, tmp, heldout, scored)


def influence(runs: Runs, output_dir: Path, *options: str | Path, model: Path | None = None) -> dict:
    """run_influence.main() on the full model (or `model`) and the 30-molecule pool."""
    args = [
        "--model_name_or_path", model or runs.full,
        "--train_file", runs.train_file,
        "--external_file", runs.pool_file,
        "--output_dir", output_dir,
        *QUIET, *FAST, *options,
    ]  # fmt: skip
    return run_influence.main([str(arg) for arg in args])


def read_scores(output_dir: Path) -> pd.DataFrame:
    return pd.read_csv(output_dir / INFLUENCE_SCORES_FILE)


@pytest.fixture(scope="module")
def head_runs(runs) -> dict[str, tuple[pd.DataFrame, dict, Path]]:
    """Every estimator once through the CLI on the head scope: (scores, summary, output folder)."""
    results = {}
    for estimator in ESTIMATORS:
        output_dir = runs.tmp / f"head_{estimator}"
        summary = influence(runs, output_dir, "--estimator", estimator)
        results[estimator] = (read_scores(output_dir), summary, output_dir)
    return results


# ------------------------------------------------------------------------------------------- every estimator


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_writes_finite_ranked_scores(head_runs, runs, estimator):
    scores, summary, output_dir = head_runs[estimator]
    assert list(scores.columns) == COLUMNS
    # pool molecules in the run's validation/test split are left out (issue #13): the others, by pool id
    assert scores["index"].tolist() == runs.scored and len(runs.heldout) >= 1
    assert np.isfinite(scores["score"]).all() and scores["score"].std() > 0
    # rank 1 = most negative = most helpful; helpful <=> negative
    assert sorted(scores["rank"]) == list(range(1, len(runs.scored) + 1))
    assert scores.loc[scores["rank"] == 1, "score"].item() == scores["score"].min()
    assert (scores["helpful"] == (scores["score"] < 0)).all()
    assert set(scores["direction"]) == {DIRECTION}
    # the file is what run_selection.py --strategy influence accepts for this pool (matched by pool id)
    matched = check_scores_match_pool(scores, load_pool(runs.pool_file))
    np.testing.assert_array_equal(matched[runs.scored], scores["score"])
    assert np.isnan(matched[runs.heldout]).all()
    assert summary["estimator"] == estimator
    assert summary["scope"]["name"] == "head" and summary["scope"]["num_params"] == HEAD_PARAMS
    assert summary["query"] == {"split": "validation", "size": N_QUERY, "per_query": False}
    assert summary["train_size_for_hessian"] == N_TRAIN
    assert (output_dir / INFLUENCE_HISTOGRAM_FILE).stat().st_size > 0
    assert read_json(output_dir / DONE_MARKER)["estimator"] == estimator
    assert read_json(output_dir / INFLUENCE_SUMMARY_FILE)["estimator"] == estimator


def test_exact_and_cg_agree(head_runs):
    exact, cg = head_runs["exact"][0]["score"], head_runs["cg"][0]["score"]
    assert scipy.stats.spearmanr(exact, cg).statistic > 0.99
    np.testing.assert_allclose(cg, exact, rtol=1e-3, atol=1e-6 * np.abs(exact).max())
    assert all(head_runs["cg"][1]["convergence"]["converged"])
    assert head_runs["exact"][1]["fit"]["positive_definite"]  # Gauss-Newton curvature + damping


def test_lissa_records_the_ihvp_norm_by_step(head_runs):
    convergence = head_runs["lissa"][1]["convergence"]
    (trace,) = convergence["norm_trace"]
    assert [entry["step"] for entry in trace] == [0, 50, 100]
    norms = [entry["ihvp_norm"][0] for entry in trace]
    assert np.isfinite(norms).all() and norms[-1] > norms[0]  # the Neumann series accumulates
    assert convergence["scale"] > 0 and head_runs["lissa"][1]["ihvp_norm"][0] == pytest.approx(norms[-1])


def test_summary_statistics_and_provenance(head_runs, runs):
    scores, summary, _ = head_runs["cg"]
    values = scores["score"].to_numpy()
    stats = summary["score_statistics"]
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["skew"] == pytest.approx(scipy.stats.skew(values))
    assert stats["quantiles"]["0.5"] == pytest.approx(np.median(values))
    assert stats["anderson_darling_normal"]["statistic"] == pytest.approx(
        scipy.stats.anderson(values, method="interpolate").statistic
    )
    thresholds = stats["selection_thresholds"]
    assert thresholds["top_10"]["threshold"] == pytest.approx(np.sort(values)[9])
    assert len(values) == len(runs.scored) < 30
    assert "top_30" not in thresholds and "top_50" not in thresholds  # more than the scored pool
    assert thresholds["helpful"]["n_selected"] == int((values < 0).sum())
    assert thresholds["percentile_10"]["threshold"] == pytest.approx(np.percentile(values, 10))
    assert summary["external_file"]["sha256"] == hashlib.sha256(runs.pool_file.read_bytes()).hexdigest()
    assert summary["checkpoint"]["kind"] == "full"
    assert summary["split_file"] == str(runs.full / SPLIT_FILE)
    assert summary["curvature"] == "gauss_newton"
    assert summary["convergence"]["iterations"] >= 1 and summary["ihvp_norm"][0] > 0


# ------------------------------------------------------------------------------------ options and variants


def test_head_on_features_equals_the_whole_model(head_runs, runs):
    influence(runs, runs.tmp / "whole", "--estimator", "gradient_dot", "--head_on_features", "false")
    whole = read_scores(runs.tmp / "whole")["score"]
    np.testing.assert_allclose(whole, head_runs["gradient_dot"][0]["score"], rtol=1e-5, atol=1e-9)


def test_per_query_matrix_averages_to_the_scores(head_runs, runs):
    output_dir = runs.tmp / "per_query"
    influence(runs, output_dir, "--estimator", "exact", "--per_query")
    matrix = np.load(output_dir / INFLUENCE_MATRIX_FILE)
    assert matrix.shape == (N_QUERY, len(runs.scored))
    np.testing.assert_allclose(matrix.mean(axis=0), read_scores(output_dir)["score"], rtol=1e-10)
    np.testing.assert_allclose(matrix.mean(axis=0), head_runs["exact"][0]["score"], rtol=1e-6)
    queries = pd.read_csv(output_dir / INFLUENCE_QUERIES_FILE)
    assert queries["query_row"].tolist() == list(range(N_QUERY))


def test_tracin_over_the_saved_checkpoint(head_runs, runs):
    """One checkpoint at the final weights with learning rate 0.5 is half the gradient dot product."""
    checkpoints = list(runs.full.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    output_dir = runs.tmp / "tracin_auto"
    summary = influence(
        runs,
        output_dir,
        "--estimator",
        "tracin",
        "--tracin_checkpoints",
        "auto",
        "--tracin_learning_rates",
        "0.5",
    )
    assert summary["estimator_options"] == {"num_checkpoints": 1}
    expected = 0.5 * head_runs["gradient_dot"][0]["score"]
    np.testing.assert_allclose(read_scores(output_dir)["score"], expected, rtol=1e-6)


def test_query_split_test_warns_loudly(runs, capsys):
    summary = influence(runs, runs.tmp / "on_test", "--estimator", "gradient_dot", "--query_split", "test")
    assert "TEST loss" in capsys.readouterr().out
    assert summary["query"]["split"] == "test" and summary["query"]["size"] == N_QUERY


def test_peft_adapter_lora_scope(runs):
    datainf = influence(
        runs, runs.tmp / "lora_datainf", "--scope", "lora", "--estimator", "datainf", model=runs.lora
    )
    cg = influence(
        runs, runs.tmp / "lora_cg", "--scope", "lora", "--estimator", "cg", "--max_train_samples", "32",
        "--cg_max_iter", "20", model=runs.lora,
    )  # fmt: skip
    for summary, name in ((datainf, "lora_datainf"), (cg, "lora_cg")):
        assert summary["checkpoint"]["kind"] == "adapter"
        assert summary["scope"]["num_params"] == LORA_PARAMS
        assert all("lora_" in parameter for parameter in summary["scope"]["parameters"])
        assert np.isfinite(read_scores(runs.tmp / name)["score"]).all()
    assert cg["train_size_for_hessian"] == 32


def test_peft_adapter_head_scope_uses_the_trained_head_copy(runs):
    exact = influence(runs, runs.tmp / "lora_exact", "--estimator", "exact", model=runs.lora)
    cg = influence(runs, runs.tmp / "lora_head_cg", "--estimator", "cg", model=runs.lora)
    assert exact["scope"]["num_params"] == HEAD_PARAMS
    assert (
        exact["scope"]["parameters"][0] == "base_model.model.classifier.modules_to_save.default.dense.weight"
    )
    first, second = (
        read_scores(runs.tmp / "lora_exact")["score"],
        read_scores(runs.tmp / "lora_head_cg")["score"],
    )
    assert scipy.stats.spearmanr(first, second).statistic > 0.99
    assert cg["scope"]["parameters"] == exact["scope"]["parameters"]


def test_validate_compares_estimators_with_exact_and_retraining(runs):
    output_dir = runs.tmp / "validate"
    summary = influence(
        runs, output_dir, "--estimator", "gradient_dot", "--validate",
        "--validate_estimators", "exact,cg,lissa,datainf,gradient_dot",
    )  # fmt: skip
    table = pd.read_csv(output_dir / VALIDATION_CSV).set_index("estimator")
    assert list(table.index) == ["retrain (truth)", "exact", "cg", "lissa", "datainf", "gradient_dot"]
    assert list(table.columns) == ["spearman_vs_exact", "spearman_vs_retrain", "seconds", "note"]
    assert table.loc["exact", "spearman_vs_exact"] == pytest.approx(1.0)
    assert table.loc["cg", "spearman_vs_exact"] > 0.999
    assert table.loc["retrain (truth)", "spearman_vs_retrain"] == 1.0
    # first-order influence on a ridge head ranks like the real retraining effect
    assert table.loc["exact", "spearman_vs_retrain"] > 0.9
    assert table.loc["retrain (truth)", "spearman_vs_exact"] == pytest.approx(
        table.loc["exact", "spearman_vs_retrain"]
    )
    assert (table["seconds"] >= 0).all()
    markdown = (output_dir / VALIDATION_MD).read_text()
    assert "| estimator | spearman_vs_exact | spearman_vs_retrain | seconds | note |" in markdown
    assert [row["estimator"] for row in summary["validation"]] == list(table.index)


def test_validate_lds_retrains_the_run_by_subprocess(runs):
    """`python run_influence.py ... --validate lds`: 3 subsets, each a 1-step warm run_regression.py subprocess."""
    output_dir = runs.tmp / "lds"
    command = [
        sys.executable, "run_influence.py", "--model_name_or_path", str(runs.full),
        "--external_file", str(runs.pool_file), "--output_dir", str(output_dir), "--estimator", "gradient_dot",
        "--validate", "lds", "--validate_estimators", "exact,gradient_dot", "--lds_subsets", "3",
        "--lds_warm_steps", "1", "--lds_noise", "false", "--lds_group_k", "0", *QUIET, *FAST,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table, summary = pd.read_csv(output_dir / LDS_SUBSETS_FILE), read_json(output_dir / LDS_SUMMARY_FILE)
    members = [[int(i) for i in row.split()] for row in table["members"]]  # pool ids
    size = round(len(runs.scored) / 2)
    assert len(table) == 3 and all(len(ids) == size and set(ids) <= set(runs.scored) for ids in members)
    assert (summary["retrain"], summary["warm_steps"], summary["subsets"], summary["retrain_seeds"]) == (
        "warm", 1, 3, [42],
    )  # fmt: skip
    reference = summary["reference_loss"]["42"]
    np.testing.assert_allclose(table["change_seed42"], table["loss_seed42"] - reference)
    assert np.isfinite(table["loss_seed42"]).all() and summary["noise_ceiling"] is None
    assert set(summary["estimators"]) == {"gradient_dot@head", "exact@head"}
    scores = read_scores(output_dir).set_index("index")["score"]
    np.testing.assert_allclose(table["pred_gradient_dot@head"], [scores.loc[ids].sum() for ids in members])
    assert summary["query"]["split"] == "validation" and summary["query"]["size"] == N_QUERY
    assert reference == pytest.approx(summary["original_loss"], rel=0.05)  # one step on from the run itself
    retrains = output_dir / LDS_RETRAIN_DIR / "seed42"
    assert sorted(p.name for p in retrains.iterdir()) == ["reference", "subset000", "subset001", "subset002"]
    assert all((folder / DONE_MARKER).is_file() for folder in retrains.iterdir())
    options = yaml.safe_load((retrains / "subset000" / "retrain_options.yaml").read_text())
    assert options["continue_training"] is True and options["max_steps"] == 1
    assert options["model_name_or_path"] == str(runs.full.resolve())
    assert not list(retrains.glob("*/run/*.safetensors"))  # weights removed once measured
    assert read_json(output_dir / INFLUENCE_SUMMARY_FILE)["lds"]["estimators"] == summary["estimators"]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        run_influence.main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--estimator", "--scope", "--damping", "--lissa_scale", "--lissa_depth", "--cg_tol",
                   "--query_split", "--per_query", "--validate", "--curvature", "--lds_subsets",
                   "--lds_retrain", "--lds_shard"):  # fmt: skip
        assert option in help_text


def test_example_config_feeds_the_selection_example(runs):
    """The example config parses (dtype, keep_heldout_overlap included) and names what selection reads."""
    example = ROOT / "configs" / "influence_example.yaml"
    summary = run_influence.main(
        [
            str(example),
            "--model_name_or_path", str(runs.full), "--train_file", str(runs.train_file),
            "--external_file", str(runs.pool_file), "--output_dir", str(runs.tmp / "example"), *QUIET,
        ]
    )  # fmt: skip
    influence_args = summary["arguments"]["InfluenceArguments"]
    assert (influence_args["estimator"], influence_args["scope"], influence_args["query_split"]) == (
        "cg",
        "head",
        "validation",
    )
    assert influence_args["dtype"] == "float64" and summary["dtype"] == "float64"
    assert summary["arguments"]["PoolArguments"]["keep_heldout_overlap"] is False
    config = yaml.safe_load(example.read_text())
    selection = yaml.safe_load((ROOT / "configs" / "selection_example.yaml").read_text())
    assert selection["scores_file"] == f"{config['output_dir']}/{INFLUENCE_SCORES_FILE}"
    assert selection["external_file"] == config["external_file"]
    assert selection["model_name_or_path"] == config["model_name_or_path"]


def test_command_line_run_completes(runs):
    """`python run_influence.py ...` itself, as a user runs it (a crash at import went unnoticed once)."""
    output_dir = runs.tmp / "command_line"
    command = [
        sys.executable, "run_influence.py",
        "--model_name_or_path", str(runs.full), "--train_file", str(runs.train_file),
        "--external_file", str(runs.pool_file), "--output_dir", str(output_dir),
        "--estimator", "gradient_dot", *QUIET,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / INFLUENCE_SCORES_FILE).is_file()
    assert (output_dir / DONE_MARKER).is_file()


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_model_is_an_error(runs):
    with pytest.raises(ValueError, match="--model_name_or_path is required"):
        run_influence.main(
            ["--external_file", str(runs.pool_file), "--output_dir", str(runs.tmp / "no_model"), *QUIET]
        )


def test_adapter_without_its_base_is_an_error(runs):
    moved = runs.tmp / "moved" / "adapter"
    shutil.copytree(runs.lora, moved, ignore=shutil.ignore_patterns("base_model", "checkpoint-*"))
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(runs.tmp / "gone" / "base_model")
    (moved / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(FileNotFoundError, match="Base model .* was not found"):
        influence(runs, runs.tmp / "no_base", model=moved)


def test_split_of_another_dataset_is_an_error(runs):
    other = runs.tmp / "other_data.csv"
    pd.read_csv(runs.train_file).iloc[::-1].to_csv(other, index=False)  # same molecules, other order
    with pytest.raises(ValueError, match="different dataset"):
        run_influence.main(
            [
                "--model_name_or_path", str(runs.full), "--train_file", str(other),
                "--external_file", str(runs.pool_file), "--output_dir", str(runs.tmp / "other"), *QUIET,
            ]
        )  # fmt: skip


def test_masked_lm_checkpoint_is_an_error(runs):
    config = MolformerConfig.from_json_file(TINY_CONFIG)
    mlm_dir = runs.tmp / "mlm"
    MolformerForMaskedLM(config).save_pretrained(mlm_dir)
    shutil.copy(runs.full / SPLIT_FILE, mlm_dir / SPLIT_FILE)
    with pytest.raises(ValueError, match="not a fine-tuned regression checkpoint.*MolformerForMaskedLM"):
        influence(runs, runs.tmp / "from_mlm", model=mlm_dir)


def test_external_file_without_labels_is_an_error(runs):
    no_labels = runs.tmp / "no_labels.csv"
    pd.read_csv(runs.pool_file)[["SMILES"]].to_csv(no_labels, index=False)
    with pytest.raises(ValueError, match="No label column found in .*no_labels.csv"):
        run_influence.main(
            [
                "--model_name_or_path", str(runs.full), "--train_file", str(runs.train_file),
                "--external_file", str(no_labels), "--output_dir", str(runs.tmp / "unlabelled"), *QUIET,
            ]
        )  # fmt: skip


def test_lissa_divergence_is_a_clear_error(runs):
    output_dir = runs.tmp / "diverged"
    with pytest.raises(LiSSADivergenceError, match="--lissa_scale auto"):
        influence(runs, output_dir, "--estimator", "lissa", "--lissa_scale", "1e-4")
    assert not (output_dir / INFLUENCE_SCORES_FILE).exists()


def test_missing_split_and_finished_output_are_errors(runs, head_runs):
    bare = runs.tmp / "bare"
    shutil.copytree(runs.full, bare, ignore=shutil.ignore_patterns(SPLIT_FILE, "checkpoint-*"))
    with pytest.raises(FileNotFoundError, match="split.json"):
        influence(runs, runs.tmp / "no_split", model=bare)
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        influence(runs, head_runs["cg"][2])


# ------------------------------------------------------------------- held-out, invalid and recorded data


def test_heldout_molecules_are_left_out_by_default_and_kept_unranked_on_request(head_runs, runs):
    default = head_runs["gradient_dot"][1]["external_file"]
    assert default["heldout_overlap"] == {
        "train": 0, "validation": 0, "test": len(runs.heldout), "left_out": len(runs.heldout), "kept_unranked": 0,
    }  # fmt: skip
    assert (default["n_rows"], default["n_invalid_skipped"], default["n_scored"]) == (
        N_POOL,
        0,
        len(runs.scored),
    )
    output_dir = runs.tmp / "kept"
    summary = influence(runs, output_dir, "--estimator", "gradient_dot", "--keep_heldout_overlap", "true")
    scores = read_scores(output_dir)
    assert scores["index"].tolist() == list(range(N_POOL))
    heldout = scores[scores["index"].isin(runs.heldout)]
    assert set(heldout["in_run_split"]) == {"test"}
    assert heldout["rank"].isna().all() and heldout["helpful"].isna().all()  # marked, unranked
    ranked = scores[scores["rank"].notna()]
    assert ranked["index"].tolist() == runs.scored
    assert sorted(ranked["rank"].astype(int)) == list(range(1, len(runs.scored) + 1))
    assert set(scores.nsmallest(len(runs.scored), "rank")["index"]) == set(
        runs.scored
    )  # a top-k never picks them
    # scoring more molecules changes none of the others' scores (gradient_dot scores each on its own)
    default_scores = head_runs["gradient_dot"][0]
    np.testing.assert_allclose(ranked["score"], default_scores["score"], rtol=1e-10)
    assert summary["external_file"]["heldout_overlap"]["kept_unranked"] == len(runs.heldout)
    assert summary["score_statistics"]["n"] == len(runs.scored)


def test_pool_with_invalid_smiles_is_scored_and_selected_by_pool_id(head_runs, runs):
    """One invalid SMILES no longer stops a pool; scores and selection still name the same molecules."""
    import run_selection

    pool = pd.read_csv(runs.pool_file)
    pool.loc[3, "SMILES"] = "C1CC(not a molecule"
    bad_pool = runs.tmp / "pool_with_invalid.csv"
    pool.to_csv(bad_pool, index=False)
    output_dir = runs.tmp / "invalid_pool"
    common = ["--model_name_or_path", runs.full, "--external_file", bad_pool, *QUIET]
    summary = run_influence.main(
        [str(a) for a in [*common, "--output_dir", output_dir, "--estimator", "gradient_dot"]]
    )
    scores = read_scores(output_dir)
    expected_ids = [i for i in runs.scored if i != 3]
    assert scores["index"].tolist() == expected_ids
    assert summary["external_file"]["n_invalid_skipped"] == 1 and summary["external_file"]["n_rows"] == N_POOL
    clean = head_runs["gradient_dot"][0].set_index("index")["score"]  # the same pool without the bad row
    np.testing.assert_allclose(scores.set_index("index")["score"], clean.loc[expected_ids], rtol=1e-10)

    selection_dir = runs.tmp / "invalid_pool_selection"
    manifest = run_selection.main(
        [
            str(a)
            for a in [*common, "--output_dir", selection_dir, "--strategy", "influence", "--k", "5",
                      "--scores_file", output_dir / INFLUENCE_SCORES_FILE, "--no_shift_diagnostics"]
        ]
    )  # fmt: skip
    selected = pd.read_csv(selection_dir / "selected.csv")
    top5 = scores.nsmallest(5, "score")
    assert selected["index"].tolist() == manifest["indices"] == top5["index"].tolist()
    assert selected["smiles"].tolist() == top5["canonical_smiles"].tolist()
    np.testing.assert_allclose(selected["label"], pool["Label"].iloc[selected["index"]])
    with pytest.raises(ValueError, match=r"row 3: 'C1CC\(not a molecule'"):
        run_influence.main(
            [
                str(a)
                for a in [*common, "--output_dir", runs.tmp / "strict", "--external_strict_smiles", "true"]
            ]
        )


def test_the_run_records_its_data_and_a_finished_run_is_enough(head_runs, runs):
    """No --train_file: the data options come from the run's split.json; a changed file is an error."""
    split = read_json(runs.full / SPLIT_FILE)
    assert split["columns"] == {"smiles_column": "smiles", "label_column": "exp"}  # found, not given
    assert split["data"]["train_file"] == str(runs.train_file.resolve()) and split["standardize"] is None
    digest = hashlib.sha256(runs.train_file.read_bytes()).hexdigest()
    assert split["data"]["file_sha256"] == {"train_file": digest}
    run_config = read_json(runs.full / "run_config.json")["data"]
    assert (run_config["smiles_column"], run_config["label_column"], run_config["standardize"]) == (
        "smiles",
        "exp",
        None,
    )

    output_dir = runs.tmp / "from_the_record"
    args = ["--model_name_or_path", runs.full, "--external_file", runs.pool_file, "--output_dir", output_dir]
    summary = run_influence.main([str(a) for a in [*args, "--estimator", "gradient_dot", *QUIET]])
    recorded = summary["arguments"]["RunDataArguments"]
    assert recorded["train_file"] == str(runs.train_file.resolve()) and recorded["label_column"] == "exp"
    np.testing.assert_array_equal(read_scores(output_dir)["score"], head_runs["gradient_dot"][0]["score"])

    moved = runs.tmp / "moved_run"
    shutil.copytree(runs.full, moved, ignore=shutil.ignore_patterns("checkpoint-*"))
    data_copy = runs.tmp / "data_copy.csv"
    shutil.copy(runs.train_file, data_copy)
    split["data"]["train_file"] = str(data_copy)
    (moved / SPLIT_FILE).write_text(json.dumps(split))
    data_copy.write_text(data_copy.read_text().replace("3.54", "3.55", 1))  # one label edited since
    with pytest.raises(
        ValueError, match=f"The run's train_file {data_copy} has changed since the run read it"
    ):
        run_influence.main(
            [str(a) for a in ["--model_name_or_path", moved, "--external_file", runs.pool_file,
                              "--output_dir", runs.tmp / "changed", *QUIET]]
        )  # fmt: skip
