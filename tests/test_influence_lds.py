"""The linear datamodeling score (molft.influence.lds) where the answer is known: a ridge head retrained in
process, exact curvature; and the pieces of the subprocess retraining that need no training run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from modeling_molformer_reg import MolformerForRegression
from molft.files import DONE_MARKER, LDS_GROUPS_FILE, LDS_SUBSETS_FILE, LDS_SUMMARY_FILE, RUN_OPTIONS_FILE
from molft.influence import InfluenceProblem, compute_influence, ridge_weights
from molft.influence.features import feature_batches, linear_forward
from molft.influence.lds import LdsArguments, check_arguments, draw_subsets, evaluate, retrain_shard
from molft.influence.retrain import RetrainJob, RunRecipe, query_loss, retraining_seeds
from molft.influence.validation import EstimatorScores, extra_scores, spearman_interval, validation_mode
from molft.io import read_json
from molft.peft_setup import PeftOptions, apply_peft
from molft.regression import ModelFactory

L2, N_POOL, M = 0.05, 40, 32


class Ridge:
    """A ridge head (mean 0.5 squared error + L2/2 ||w||^2, intercept included) and its external pool."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        truth, scales = rng.normal(size=4), np.array([0.3, 1.0, 2.0, 3.0])  # curvature far from identity
        self.x = rng.normal(size=(600, 4)) * scales
        self.y = self.x @ truth + 0.3 * rng.normal(size=600)
        self.xq = rng.normal(size=(60, 4)) * scales
        self.yq = self.xq @ truth + 0.3 * rng.normal(size=60)
        self.xc = rng.normal(size=(N_POOL, 4)) * scales
        self.yc = self.xc @ truth + rng.normal(size=N_POOL) * rng.choice(
            [0.2, 3.0], size=N_POOL
        )  # some mislabelled
        self.weights = ridge_weights(self.x, self.y, L2)
        self.pool = pd.DataFrame(
            {"row": np.arange(N_POOL) + 100, "canonical_smiles": [f"C{i}" for i in range(N_POOL)]}
        )

    def scores(self, estimator: str) -> np.ndarray:
        head = nn.Linear(4, 1).double()
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(self.weights[:-1]).reshape(1, -1))
            head.bias.copy_(torch.as_tensor(self.weights[-1:]))
        problem = InfluenceProblem(head, dict(head.named_parameters()), forward_fn=linear_forward)
        batch = {name: feature_batches(x, y, 64, torch.float64) for name, (x, y) in
                 {"train": (self.x, self.y), "query": (self.xq, self.yq), "pool": (self.xc, self.yc)}.items()}  # fmt: skip
        scores, _ = compute_influence(
            problem, batch["train"], batch["query"], batch["pool"], estimator, damping=L2
        )
        return scores

    def query_loss(self, weights: np.ndarray) -> float:
        return float(np.mean(0.5 * (self.xq @ weights[:-1] + weights[-1] - self.yq) ** 2))

    def data(self, job: RetrainJob) -> tuple[np.ndarray, np.ndarray]:
        members = list(job.members)
        return np.vstack([self.x, self.xc[members]]), np.concatenate([self.y, self.yc[members]])

    def scratch(self, job: RetrainJob, job_dir: Path) -> float:
        """Refit from scratch: the exact optimum with the subset added."""
        return self.query_loss(ridge_weights(*self.data(job), L2))

    def warm(self, job: RetrainJob, job_dir: Path, steps: int = 500) -> float:
        """Full-batch gradient descent from the fitted weights on train + subset."""
        x, y = self.data(job)
        x1 = np.hstack([x, np.ones((len(x), 1))])
        step = 1.0 / (np.linalg.eigvalsh(x1.T @ x1 / len(x1)).max() + L2)
        weights = self.weights.copy()
        for _ in range(steps):
            weights -= step * (x1.T @ (x1 @ weights - y) / len(x1) + L2 * weights)
        return self.query_loss(weights)


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


@pytest.fixture(scope="module")
def scores(ridge) -> dict[str, EstimatorScores]:
    return {name: EstimatorScores(ridge.scores(name), 0.1) for name in ("exact", "gradient_dot")}


def lds_args(**overrides) -> LdsArguments:
    return LdsArguments(
        **{"lds_subsets": M, "lds_group_k": 5, "lds_shuffles": 50, "lds_bootstrap": 500, **overrides}
    )


class Counting:
    """A retrain function that counts its calls and, with `fail_after`, dies on the next one (a kill)."""

    def __init__(self, retrain, fail_after: int | None = None) -> None:
        self.retrain, self.fail_after, self.calls = retrain, fail_after, 0

    def __call__(self, job: RetrainJob, job_dir: Path) -> float:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.retrain(job, job_dir)


# ---------------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("mode", ["warm", "scratch"])
def test_exact_influence_predicts_retraining_a_linear_model(ridge, scores, tmp_path, mode):
    retrain = ridge.warm if mode == "warm" else ridge.scratch
    summary = evaluate(lds_args(lds_retrain=mode), scores, ridge.pool, retrain, [1, 2], tmp_path / "lds",
                       tmp_path, primary="exact")  # fmt: skip
    exact = summary["estimators"]["exact"]
    assert exact["lds"] > 0.9 and exact["ci_low"] <= exact["lds"] <= exact["ci_high"]
    assert exact["lds"] > summary["estimators"]["gradient_dot"]["lds"] + 0.1  # the curvature matters here
    assert summary["noise_ceiling"] == pytest.approx(1.0)  # a deterministic retraining: both seeds agree
    assert summary["retrain"] == mode and summary["subsets"] == M and summary["subset_size"] == N_POOL // 2
    table = pd.read_csv(tmp_path / LDS_SUBSETS_FILE)
    assert len(table) == M and list(table["size"]) == [N_POOL // 2] * M
    members = [[int(i) - 100 for i in row.split()] for row in table["members"]]  # pool ids, not positions
    np.testing.assert_allclose(table["pred_exact"], [scores["exact"].scores[m].sum() for m in members])
    reference = retrain(RetrainJob("r", 1, "reference", "reference"), tmp_path)
    np.testing.assert_allclose(table["loss_seed1"] - reference, table["change_seed1"])  # same sign as scores
    assert read_json(tmp_path / LDS_SUMMARY_FILE)["estimators"]["exact"]["lds"] == exact["lds"]


def test_more_seeds_give_their_agreement_and_a_mean_that_noise_caps_less(ridge, scores, tmp_path):
    """Seed-dependent noise on the exact refit: the mean over 4 seeds is more reliable than any one seed."""

    def noisy(job: RetrainJob, job_dir: Path) -> float:
        digest = int(hashlib.sha1(f"{job.name}/{job.seed}".encode()).hexdigest()[:8], 16)
        return ridge.scratch(job, job_dir) + 0.004 * np.random.default_rng(digest).standard_normal()

    args = lds_args(lds_retrain="scratch", lds_group_k=0, lds_more_seeds=2)
    summary = evaluate(args, scores, ridge.pool, noisy, [1, 2, 3, 4], tmp_path / "lds", tmp_path)
    table = pd.read_csv(tmp_path / LDS_SUBSETS_FILE)
    agreement = summary["seed_agreement"]
    assert set(agreement["pairs"]) == {"1-2", "1-3", "1-4", "2-3", "2-4", "3-4"} and agreement["seeds"] == 4
    assert agreement["pairs"]["2-4"] == pytest.approx(
        spearmanr(table["change_seed2"], table["change_seed4"])[0]
    )
    r = np.mean(list(agreement["pairs"].values()))
    assert 0 < r < 0.95 and agreement["seed_mean_reliability"] == pytest.approx(4 * r / (1 + 3 * r))
    assert summary["noise_ceiling"] == agreement["pairs"]["1-2"]  # the two-seed ceiling is kept as it was
    exact = summary["estimators"]["exact"]
    mean_change = table[[f"change_seed{seed}" for seed in (1, 2, 3, 4)]].mean(axis=1)
    assert exact["lds_seed_mean"] == pytest.approx(spearmanr(table["pred_exact"], mean_change)[0])
    assert exact["lds_seed_mean_ci"][0] <= exact["lds_seed_mean"] <= exact["lds_seed_mean_ci"][1]
    per_seed = [spearmanr(table["pred_exact"], table[f"change_seed{seed}"])[0] for seed in (1, 2, 3, 4)]
    assert exact["lds_seed_mean"] > np.mean(per_seed)  # averaging the seeds cuts the noise


def test_retraining_seeds_count_on_from_the_second_and_skip_the_runs_own():
    assert retraining_seeds(1, noise=False, noise_seed=None, more_seeds=0) == [1]
    assert retraining_seeds(1, noise=True, noise_seed=None) == [1, 2]
    assert retraining_seeds(1, noise=True, noise_seed=None, more_seeds=2) == [1, 2, 3, 4]
    assert retraining_seeds(3, noise=True, noise_seed=2, more_seeds=2) == [3, 2, 4, 5]
    with pytest.raises(ValueError, match="the run's own seed"):
        retraining_seeds(3, noise=True, noise_seed=3)
    with pytest.raises(ValueError, match="--lds_more_seeds"):
        check_arguments(lds_args(lds_more_seeds=1, lds_noise=False))


def test_saved_scores_are_judged_against_another_retraining_without_rescoring(ridge, scores, tmp_path):
    """lds_scores.csv keeps every estimator's scores; --lds_extra_scores on that folder reads them all back."""
    warm_out, scratch_out = tmp_path / "warm", tmp_path / "scratch"
    warm_out.mkdir(), scratch_out.mkdir()
    warm = evaluate(lds_args(lds_retrain="warm"), scores, ridge.pool, ridge.warm, [1], tmp_path / "w",
                    warm_out, primary="exact")  # fmt: skip
    reread = extra_scores(str(warm_out), ridge.pool)
    assert set(reread) == {"exact", "gradient_dot"}
    for name in reread:
        np.testing.assert_array_equal(reread[name].scores, scores[name].scores)
        assert reread[name].seconds == pytest.approx(0.1)
    shuffled = ridge.pool.sample(frac=1.0, random_state=0)  # matched by id, not by position
    order = np.argsort(shuffled["row"].to_numpy())
    np.testing.assert_array_equal(extra_scores(str(warm_out), shuffled)["exact"].scores[order],
                                  scores["exact"].scores)  # fmt: skip
    scratch = evaluate(lds_args(lds_retrain="scratch", lds_group_k=0), reread, ridge.pool, ridge.scratch, [1],
                       tmp_path / "s", scratch_out)  # fmt: skip
    assert scratch["estimators"]["exact"]["lds"] > 0.9 and warm["estimators"]["exact"]["lds"] > 0.9
    with pytest.raises(ValueError, match="no score for pool ids"):
        extra_scores(str(warm_out), pd.DataFrame({"row": [100, 999], "smiles": ["C", "CC"]}))


def test_shuffled_scores_sit_near_zero(ridge, scores, tmp_path):
    summary = evaluate(lds_args(lds_group_k=0), scores, ridge.pool, ridge.scratch, [1], tmp_path, None,
                       primary="exact")  # fmt: skip
    control = summary["shuffled_control"]
    assert control["estimator"] == "exact" and control["repeats"] == 50
    assert (
        abs(control["mean"]) < 0.1
        and summary["estimators"]["exact"]["lds"] > control["mean"] + 4 * control["sd"]
    )
    assert summary["noise_ceiling"] is None  # one seed


def test_group_check_retrains_the_selections_run_selection_makes(ridge, scores, tmp_path):
    summary = evaluate(lds_args(lds_subsets=3), scores, ridge.pool, ridge.scratch, [1], tmp_path / "lds",
                       tmp_path, primary="exact", n_train=600)  # fmt: skip
    groups = pd.read_csv(tmp_path / LDS_GROUPS_FILE).set_index("group")
    exact = scores["exact"].scores
    positions = {name: [int(i) - 100 for i in groups.loc[name, "members"].split()] for name in groups.index}
    assert positions["top"] == list(np.argsort(exact, kind="stable")[:5])  # most helpful = most negative
    assert positions["bottom"] == list(np.argsort(-exact, kind="stable")[:5])
    assert positions["random"] == list(np.random.default_rng(0).choice(N_POOL, size=5, replace=False))
    np.testing.assert_allclose(groups["pred_change_exact"], groups["sum_exact"] / 600)
    change = groups["change_seed1"]
    assert change["top"] < change["random"] < change["bottom"] and change["top"] < 0 < change["bottom"]
    assert [row["group"] for row in summary["groups"]] == ["top", "bottom", "random"]


# ------------------------------------------------------------------------------------ resume and shards


def test_resume_after_a_kill_skips_finished_retrainings(ridge, scores, tmp_path):
    args, lds_dir = lds_args(lds_subsets=6, lds_group_k=2), tmp_path / "lds"
    n_jobs = 2 * (6 + 1 + 3)  # two seeds x (reference, subsets, groups)
    killed = Counting(ridge.scratch, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(args, scores, ridge.pool, killed, [1, 2], lds_dir, tmp_path, primary="exact")
    assert len(list(lds_dir.glob(f"seed*/*/{DONE_MARKER}"))) == 4
    assert len(list(lds_dir.glob("seed*/*"))) == 5  # the fifth was killed: no marker, redone
    resumed = Counting(ridge.scratch)
    summary = evaluate(args, scores, ridge.pool, resumed, [1, 2], lds_dir, tmp_path, primary="exact")
    assert resumed.calls == n_jobs - 4
    again = Counting(ridge.scratch)
    assert evaluate(args, scores, ridge.pool, again, [1, 2], lds_dir, None, primary="exact") == summary
    assert again.calls == 0
    fresh = evaluate(
        args, scores, ridge.pool, ridge.scratch, [1, 2], tmp_path / "fresh", None, primary="exact"
    )
    assert fresh["estimators"] == summary["estimators"]


def test_shards_share_the_subset_retrainings(ridge, scores, tmp_path):
    lds_dir = tmp_path / "lds"
    shards = [Counting(ridge.scratch) for _ in range(3)]
    for index, counting in enumerate(shards[:2]):
        retrain_shard(lds_args(lds_subsets=5, lds_group_k=2, lds_shard=f"{index}/3"), ridge.pool, counting,
                      [1, 2], lds_dir)  # fmt: skip
    only = lds_args(lds_subsets=5, lds_group_k=2, lds_only_assemble=True)
    with pytest.raises(ValueError, match="subset retrainings are not finished"):  # shard 2/3 has not run
        evaluate(only, scores, ridge.pool, Counting(ridge.scratch), [1, 2], lds_dir, None, primary="exact")
    retrain_shard(lds_args(lds_subsets=5, lds_shard="2/3"), ridge.pool, shards[2], [1, 2], lds_dir)
    assert [counting.calls for counting in shards] == [4, 4, 4]  # 2 x (reference + 5 subsets), round robin
    assembling = Counting(ridge.scratch)
    summary = evaluate(only, scores, ridge.pool, assembling, [1, 2], lds_dir, None, primary="exact")
    assert assembling.calls == 2 * 3  # the group check only: it needs the scores
    assert summary["estimators"]["exact"]["lds"] is not None
    with pytest.raises(ValueError, match=r"other LDS settings \(they differ in \['fraction'\]\)"):
        evaluate(lds_args(lds_fraction=0.3), scores, ridge.pool, ridge.scratch, [1], lds_dir, None)


# ------------------------------------------------------------------------------------- the statistics


def test_subsets_are_seeded_and_stable_when_m_grows():
    first = draw_subsets(30, 4, 0.5, seed=3)
    assert first.shape == (4, 30) and (first.sum(axis=1) == 15).all()
    np.testing.assert_array_equal(draw_subsets(30, 8, 0.5, seed=3)[:4], first)
    assert not np.array_equal(draw_subsets(30, 4, 0.5, seed=4), first)
    with pytest.raises(ValueError, match="gives subsets of 0 molecules"):
        draw_subsets(3, 4, 0.1, seed=0)


def test_bootstrap_interval_is_seeded_and_holds_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=32)
    y = x + rng.normal(size=32)
    low, high = spearman_interval(x, y, 1000, seed=1)
    assert low < 0.6 < high < 1 and (low, high) == spearman_interval(x, y, 1000, seed=1)
    assert spearman_interval(x, 2 * x, 200, seed=1) == (1.0, 1.0)


def test_validate_keeps_the_old_boolean_form():
    assert [validation_mode(v) for v in (None, "none", "false", "true", True, "ridge", "lds", "LDS")] == [
        "none", "none", "none", "ridge", "ridge", "ridge", "lds", "lds",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--validate must be one of"):
        validation_mode("retrain")


# ------------------------------------------------------------------------ the subprocess retraining's parts


def test_retrain_options_replay_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_OPTIONS_FILE).write_text(
        "config_name: configs/molformer-tiny.json\ntrain_file: data.csv\nseed: 7\noutput_dir: old\n"
        "num_train_epochs: 3\npush_to_hub: true\nlearning_rate: 0.001\n"
    )
    recipe = RunRecipe.from_run(run)
    assert recipe.seed == 7
    warm = recipe.retrain_options("warm", 8, tmp_path / "out", tmp_path / "extra.csv", warm_steps=5)
    assert warm["model_name_or_path"] == str(run.resolve()) and warm["continue_training"] is True
    assert (warm["max_steps"], warm["seed"], warm["learning_rate"]) == (5, 8, 0.001)
    assert warm["load_best_model_at_end"] is False and warm["early_stopping_patience"] == 0
    assert "config_name" not in warm and "num_train_epochs" not in warm and "push_to_hub" not in warm
    assert warm["split_file"] == str(run.resolve() / "split.json") and warm["extra_label_column"] == "label"
    scratch = recipe.retrain_options("scratch", 7, tmp_path / "out", None, warm_steps=5)
    assert scratch["config_name"] == "configs/molformer-tiny.json" and scratch["num_train_epochs"] == 3
    assert scratch["tokenizer_name"] == str(
        run.resolve()
    )  # the run's vocabulary, not one grown from the subset
    assert "extra_train_file" not in scratch and scratch["output_dir"] == str(tmp_path / "out")
    assert warm["predict_train_split"] is False and scratch["predict_train_split"] is False
    (run / RUN_OPTIONS_FILE).write_text("extra_train_file: sel.csv\n")
    with pytest.raises(ValueError, match="already trained with --extra_train_file"):
        RunRecipe.from_run(run)
    with pytest.raises(FileNotFoundError, match="run_options.yaml not found"):
        RunRecipe.from_run(tmp_path)


def test_query_loss_is_the_influence_loss_in_the_runs_units(tmp_path):
    from types import SimpleNamespace

    from molft.influence.molformer import influence_loss

    query = pd.DataFrame({"row": [5, 9], "canonical_smiles": ["CC", "CO"], "label": [1.0, 3.0]})
    predictions = pd.DataFrame({"row": [9, 5, 1], "canonical_smiles": ["CO", "CC", "CN"],
                                "prediction": [2.0, 2.0, 0.0], "split": ["validation"] * 2 + ["train"]})  # fmt: skip
    predictions.to_csv(tmp_path / "predictions.csv", index=False)
    loss_fn, _ = influence_loss(SimpleNamespace(target_std=2.0, regression_loss="mse"))
    assert query_loss(tmp_path / "predictions.csv", query, "validation", loss_fn) == pytest.approx(0.125)
    with pytest.raises(ValueError, match=r"no test prediction for dataset rows \[5, 9\]"):
        query_loss(tmp_path / "predictions.csv", query, "test", loss_fn)


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_continue_training_keeps_the_runs_method_trainable(tmp_path, method):
    from helpers import tiny_config

    config = tiny_config(vocab_size=40)
    config.architectures = ["MolformerForRegression"]
    saved = tmp_path / method
    if method == "lora":
        MolformerForRegression(config).save_pretrained(tmp_path / "base")
        model = apply_peft(
            MolformerForRegression.from_pretrained(tmp_path / "base"), PeftOptions(peft="lora")
        )
        model.save_pretrained(saved)
        config.save_pretrained(saved)
    else:
        MolformerForRegression(config).save_pretrained(saved)
    factory = ModelFactory(config, PeftOptions(peft=method), str(saved), None, True, continue_training=True)
    trainable = [name for name, p in factory.build().named_parameters() if p.requires_grad]
    if method == "lora":
        assert any("lora_A" in name for name in trainable) and any("classifier" in name for name in trainable)
        assert all("lora_" in name or "classifier" in name for name in trainable)
    else:
        assert all(name.endswith(".bias") or name.startswith("classifier.") for name in trainable)
        assert any(name.startswith("encoder") or ".encoder." in name for name in trainable)  # encoder biases
    plain = dict(
        ModelFactory(config, PeftOptions(peft=method), str(saved), None, True).build().named_parameters()
    )
    if method == "lora":  # without the flag a saved adapter loads frozen, and BitFit's --peft is ignored
        assert not any(p.requires_grad for n, p in plain.items() if "lora_A" in n)
    else:
        assert all(p.requires_grad for p in plain.values())
