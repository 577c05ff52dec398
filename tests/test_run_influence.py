"""run_influence.py end to end on tiny trained regression models (full and LoRA) and 30 external molecules."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import yaml
from helpers import head_copy, single_thread, train_tiny_regression  # noqa: F401  (autouse fixture)
from torch import nn

import run_influence
from configuration_molformer import MolformerConfig
from modeling_molformer import MolformerForMaskedLM
from molft.cli import parse_args
from molft.influence import InfluenceProblem, LiSSADivergenceError, squared_error_loss
from molft.io import DONE_MARKER, read_json
from molft.selection import check_scores_match_pool, load_pool

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "molformer-tiny.json"
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> Runs:
    tmp = tmp_path_factory.mktemp("influence")
    train_file = head_copy(data_dir / "lipophilicity.csv", tmp / "lipophilicity_150.csv", N_DATASET)
    pool_file = head_copy(data_dir / "external_300.csv", tmp / "pool.csv", N_POOL)
    full = train_tiny_regression(train_file, tmp / "full")
    lora = train_tiny_regression(train_file, tmp / "lora", "--peft", "lora", "--save_strategy", "no")
    return Runs(full, lora, train_file, pool_file, tmp)


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
    return pd.read_csv(output_dir / run_influence.SCORES_FILE)


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
    assert scores["index"].tolist() == list(range(N_POOL))
    assert np.isfinite(scores["score"]).all() and scores["score"].std() > 0
    # rank 1 = most negative = most helpful; helpful <=> negative
    assert sorted(scores["rank"]) == list(range(1, N_POOL + 1))
    assert scores.loc[scores["rank"] == 1, "score"].item() == scores["score"].min()
    assert (scores["helpful"] == (scores["score"] < 0)).all()
    assert set(scores["direction"]) == {run_influence.DIRECTION}
    # the file is what run_selection.py --strategy influence accepts for this pool
    np.testing.assert_array_equal(check_scores_match_pool(scores, load_pool(runs.pool_file)), scores["score"])
    assert summary["estimator"] == estimator
    assert summary["scope"]["name"] == "head" and summary["scope"]["num_params"] == HEAD_PARAMS
    assert summary["query"] == {"split": "validation", "size": N_QUERY, "per_query": False}
    assert summary["train_size_for_hessian"] == N_TRAIN
    assert (output_dir / run_influence.HISTOGRAM_FILE).stat().st_size > 0
    assert read_json(output_dir / DONE_MARKER)["estimator"] == estimator
    assert read_json(output_dir / run_influence.SUMMARY_FILE)["estimator"] == estimator


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
    assert thresholds["top_30"]["threshold"] == pytest.approx(values.max())
    assert "top_50" not in thresholds  # more than the pool
    assert thresholds["helpful"]["n_selected"] == int((values < 0).sum())
    assert thresholds["percentile_10"]["threshold"] == pytest.approx(np.percentile(values, 10))
    assert summary["external_file"]["sha256"] == hashlib.sha256(runs.pool_file.read_bytes()).hexdigest()
    assert summary["checkpoint"]["kind"] == "full"
    assert summary["split_file"] == str(runs.full / "split.json")
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
    matrix = np.load(output_dir / run_influence.MATRIX_FILE)
    assert matrix.shape == (N_QUERY, N_POOL)
    np.testing.assert_allclose(matrix.mean(axis=0), read_scores(output_dir)["score"], rtol=1e-10)
    np.testing.assert_allclose(matrix.mean(axis=0), head_runs["exact"][0]["score"], rtol=1e-6)
    queries = pd.read_csv(output_dir / run_influence.QUERIES_FILE)
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
    table = pd.read_csv(output_dir / run_influence.VALIDATION_CSV).set_index("estimator")
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
    markdown = (output_dir / run_influence.VALIDATION_MD).read_text()
    assert "| estimator | spearman_vs_exact | spearman_vs_retrain | seconds | note |" in markdown
    assert [row["estimator"] for row in summary["validation"]] == list(table.index)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        run_influence.main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--estimator", "--scope", "--damping", "--lissa_scale", "--lissa_depth", "--cg_tol",
                   "--query_split", "--per_query", "--validate", "--curvature"):  # fmt: skip
        assert option in help_text


def test_example_config_feeds_the_selection_example():
    arguments = parse_args(run_influence.ARGUMENT_TYPES, [str(ROOT / "configs" / "influence_example.yaml")])
    influence_args, _, pool_args, _, model_args, _, output_args = arguments
    assert (influence_args.estimator, influence_args.scope, influence_args.query_split) == (
        "cg",
        "head",
        "validation",
    )
    selection = yaml.safe_load((ROOT / "configs" / "selection_example.yaml").read_text())
    assert selection["scores_file"] == f"{output_args.output_dir}/{run_influence.SCORES_FILE}"
    assert selection["external_file"] == pool_args.external_file
    assert selection["model_name_or_path"] == model_args.model_name_or_path


# ------------------------------------------------------------------------------------------------ bad input


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
    shutil.copy(runs.full / "split.json", mlm_dir / "split.json")
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
    assert not (output_dir / run_influence.SCORES_FILE).exists()


def test_missing_split_and_finished_output_are_errors(runs, head_runs):
    bare = runs.tmp / "bare"
    shutil.copytree(runs.full, bare, ignore=shutil.ignore_patterns("split.json", "checkpoint-*"))
    with pytest.raises(FileNotFoundError, match="split.json"):
        influence(runs, runs.tmp / "no_split", model=bare)
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        influence(runs, head_runs["cg"][2])


# --------------------------------------------------------------------------------------------- the pieces


def test_score_statistics_by_hand():
    scores = np.arange(-20.0, 40.0)  # 60 values, 20 negative, symmetric around 9.5
    stats = run_influence.score_statistics(scores)
    assert stats["n_helpful"] == 20 and stats["mean"] == 9.5 and stats["skew"] == pytest.approx(0.0)
    thresholds = stats["selection_thresholds"]
    assert [thresholds[f"top_{k}"]["threshold"] for k in (10, 30, 50)] == [-11.0, 9.0, 29.0]
    assert thresholds["helpful"] == {"rule": "score < 0", "threshold": 0.0, "n_selected": 20}
    # linear interpolation: position 0.1 * 59 = 5.9 -> -14.1 (6 scores at or below); 0.25 * 59 -> -5.25 (15)
    assert thresholds["percentile_10"]["threshold"] == pytest.approx(-14.1)
    assert thresholds["percentile_10"]["n_selected"] == 6
    assert thresholds["percentile_25"]["threshold"] == pytest.approx(-5.25)
    assert thresholds["percentile_25"]["n_selected"] == 15


def test_score_table_ranks_and_flags_split_members():
    pool = pd.DataFrame(
        {"smiles": ["C", "CC", "CCC"], "canonical_smiles": ["C", "CC", "CCC"], "label": [1.0, 2.0, 3.0]}
    )
    frames = {
        "train": pd.DataFrame({"canonical_smiles": ["CC"]}),
        "validation": pd.DataFrame({"canonical_smiles": ["N"]}),
        "test": pd.DataFrame({"canonical_smiles": ["CCC"]}),
    }
    table = run_influence.score_table(pool, np.array([0.5, -2.0, -0.1]), frames)
    assert table["rank"].tolist() == [3, 1, 2]
    assert table["helpful"].tolist() == [False, True, True]
    assert table["in_run_split"].tolist() == ["", "train", "test"]


def test_linearised_forward_gives_the_gauss_newton_matrix():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    params = dict(head.named_parameters())
    batches = [{"x": torch.randn(6, 4, dtype=torch.float64), "labels": torch.randn(6, dtype=torch.float64)}]

    def forward(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    true = InfluenceProblem(head, params, forward_fn=forward)
    gauss_newton = InfluenceProblem(head, params, forward_fn=run_influence.LinearisedForward(forward, params))
    features = batches[0]["x"]
    jacobian = torch.func.jacrev(lambda p: torch.func.functional_call(head, p, (features,)).reshape(-1))(
        {name: param.detach() for name, param in params.items()}
    )
    jacobian = torch.cat([jacobian[name].reshape(6, -1) for name in params], dim=1)
    expected = jacobian.T @ jacobian / 6
    np.testing.assert_allclose(gauss_newton.hessian(batches), expected, atol=1e-12)
    assert torch.linalg.eigvalsh(true.hessian(batches))[0] < -1e-3  # the true Hessian is indefinite here
    np.testing.assert_allclose(gauss_newton.per_sample_grads(batches[0]), true.per_sample_grads(batches[0]))


def test_influence_loss_is_half_the_normalised_training_loss():
    config = MolformerConfig(target_mean=3.0, target_std=2.0)
    loss_fn, description = run_influence.influence_loss(config)
    predictions = torch.tensor([[1.0], [5.0]], dtype=torch.float64)
    batch = {"labels": torch.tensor([2.0, 2.0], dtype=torch.float64)}
    # 0.5 * ((1 - 2) / 2)^2 and 0.5 * ((5 - 2) / 2)^2
    np.testing.assert_allclose(loss_fn(predictions, batch), [0.125, 1.125])
    assert "0.5" in description
    np.testing.assert_allclose(
        squared_error_loss(predictions / 2, {"labels": batch["labels"] / 2}), loss_fn(predictions, batch)
    )


def test_lissa_truncation_is_flagged(caplog):
    # the slowest direction contracts by (1 - damping / scale) per step: 3 e-folds need 3 x 10 / 0.01 steps
    run_influence.warn_if_lissa_truncated({"scale": 10.0}, {"damping": 0.01, "depth": 1000})
    assert "short of the ~3000 steps" in caplog.text
    caplog.clear()
    run_influence.warn_if_lissa_truncated({"scale": 10.0}, {"damping": 0.1, "depth": 1000})
    assert caplog.text == ""
