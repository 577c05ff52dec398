"""Classification (`--problem_type single_label_classification | multi_label_classification`): losses and their
masks, class labels as read, metrics against scikit-learn, saving and reloading, and one run_regression.py run
per problem type as a user starts it."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY_RUN, lora_round_trip, micro_config, run_script, single_thread  # noqa: F401  (autouse fixture)
from sklearn import metrics as skm
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification

from modeling_molformer_reg import MolformerForRegression
from molft.io import read_json
from molft.metrics import binary_metrics, multi_label_metrics, single_label_metrics
from molft.peft_setup import PeftOptions, apply_peft, load_regression_checkpoint
from molft.run_data import RegressionDataArguments, prepare_data
from molft.splits import make_split
from molft.tasks import Task, TaskArguments, check_split_labels, make_task, require_single_target_regression
from tokenization_molformer import MolformerTokenizer

NAN = float("nan")
SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1", "O=C(O)c1ccccc1", "CCN(CC)CC"]
SINGLE, MULTI = "single_label_classification", "multi_label_classification"


def classifier(problem_type: str, num_labels: int, seed: int = 0, **overrides) -> MolformerForRegression:
    torch.manual_seed(seed)
    config = micro_config(problem_type=problem_type, num_labels=num_labels, **overrides)
    return MolformerForRegression(config).eval()


def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(4, 24, (4, 7), generator=torch.Generator().manual_seed(1))
    input_ids[2, 5:] = 2
    return {"input_ids": input_ids, "attention_mask": (input_ids != 2).long()}


# ---------------------------------------------------------------- losses


def test_single_label_loss_is_torchs_weighted_cross_entropy_and_ignores_negative_labels():
    model = classifier(SINGLE, 3, class_weights=[1.0, 2.0, 0.5])
    labels = torch.tensor([0, 2, 1, 1])
    out = model(**batch(), labels=labels)
    expected = F.cross_entropy(out.logits, labels, weight=torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(out.loss, expected)
    logits = out.logits.detach().requires_grad_()
    ignored = torch.tensor([0, 2, -100, 1])
    loss = model.classification_loss(logits, ignored, None)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits, ignored, weight=torch.tensor([1.0, 2.0, 0.5])))
    assert (logits.grad[2] == 0).all() and (logits.grad[[0, 1, 3]] != 0).all()


def test_a_masked_multi_label_adds_nothing_to_loss_or_gradient():
    model = classifier(MULTI, 2, class_weights=[3.0, 0.5])
    labels = torch.tensor([[1.0, NAN], [0.0, 1.0], [NAN, 0.0], [1.0, 1.0]])
    logits = model(**batch()).logits.detach().requires_grad_()
    loss = model.classification_loss(logits, labels, None)
    loss.backward()
    observed = ~torch.isnan(labels)
    per_entry = F.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(labels), pos_weight=torch.tensor([3.0, 0.5]), reduction="none"
    )
    torch.testing.assert_close(loss, per_entry[observed].mean())
    assert logits.grad[0, 1].item() == 0.0 and logits.grad[2, 0].item() == 0.0
    assert (logits.grad[observed] != 0).all()


# ---------------------------------------------------------------- metrics


def test_binary_and_multiclass_metrics_equal_scikit_learns():
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    p1 = np.array([0.2, 0.7, 0.4, 0.1, 0.9, 0.6, 0.55, 0.8])
    scores = single_label_metrics(y, np.stack([1 - p1, p1], axis=1), ["inactive", "active"])
    predicted = (p1 > 0.5).astype(int)
    assert scores == pytest.approx(
        {
            "roc_auc": skm.roc_auc_score(y, p1),
            "pr_auc": skm.average_precision_score(y, p1),
            "accuracy": skm.accuracy_score(y, predicted),
            "f1": skm.f1_score(y, predicted),
            "mcc": skm.matthews_corrcoef(y, predicted),
        }
    )
    rng = np.random.default_rng(0)
    y3 = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 2])
    probs = rng.dirichlet(np.ones(3), size=10)
    scores = single_label_metrics(y3, probs, ["a", "b", "c"])
    assert scores["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y3, probs, multi_class="ovr", average="macro")
    )
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(y3, probs.argmax(1)))
    assert scores["f1"] == pytest.approx(skm.f1_score(y3, probs.argmax(1), average="macro"))
    assert scores["mcc"] == pytest.approx(skm.matthews_corrcoef(y3, probs.argmax(1)))
    assert scores["pr_auc_b"] == pytest.approx(skm.average_precision_score(y3 == 1, probs[:, 1]))


def test_multi_label_metrics_per_label_on_observed_molecules_and_macro():
    y = np.array([[1, NAN], [0, 1], [1, 0], [0, NAN], [1, 1], [NAN, 0]])
    p = np.array([[0.8, 0.99], [0.3, 0.6], [0.6, 0.2], [0.45, 0.01], [0.4, 0.7], [0.9, 0.4]])
    scores = multi_label_metrics(y, p, ["x", "y"])
    for j, name in enumerate(("x", "y")):
        keep = ~np.isnan(y[:, j])
        expected = binary_metrics(y[keep, j], p[keep, j], p[keep, j] >= 0.5)
        assert expected["roc_auc"] == pytest.approx(skm.roc_auc_score(y[keep, j], p[keep, j]))
        assert expected["f1"] == pytest.approx(skm.f1_score(y[keep, j], p[keep, j] >= 0.5))
        for metric, value in expected.items():
            assert scores[f"{metric}_{name}"] == pytest.approx(value)
    assert scores["mcc"] == pytest.approx((scores["mcc_x"] + scores["mcc_y"]) / 2)
    assert np.isnan(binary_metrics([1, 1], [0.2, 0.9], [0, 1])["roc_auc"])  # one class: undefined


# ---------------------------------------------------------------- labels as read


def read(
    tmp_path: Path, labels, problem_type: str = SINGLE, label_column: str = "y", data=None, **task_options
):
    smiles = [f"C{'C' * (i % 5)}{'N' * (i % 2)}O" + "c1ccccc1" * (i % 3) for i in range(len(labels))]
    path = tmp_path / "labels.csv"
    pd.DataFrame({"smiles": smiles, label_column: labels}).to_csv(path, index=False)
    task = make_task(TaskArguments(problem_type=problem_type, **task_options), label_column, "none", None)
    options = RegressionDataArguments(train_file=str(path), label_column=label_column, **(data or {}))
    return prepare_data(options, task=task), task


def test_integer_and_string_classes_keep_their_names_in_output_order(tmp_path):
    data, task = read(tmp_path, [2, 10, 1, 2] * 5)
    assert task.classes == ["1", "2", "10"]  # integers sort as numbers
    assert data.dataset["label"].tolist()[:4] == [1, 2, 0, 1]
    data, task = read(tmp_path, ["inactive", "active", ""] * 5, class_names="inactive,active")
    assert task.classes == ["inactive", "active"] and len(data.dataset) == 10  # the blank rows are dropped


@pytest.mark.parametrize(
    ("labels", "options", "message"),
    [
        ([0, 1, 2] * 4, {"num_labels": 2}, r"--num_labels 2 asks for binary, but column 'y' holds 3 classes"),
        ([0, 1, 0.5] * 4, {}, r"not class labels \(row 2: 0.5; row 5: 0.5"),
        ([1] * 12, {}, r"needs two classes or more"),
        (["a", "b", "c"] * 4, {"class_names": "a,b"}, r"holds classes \['c'\] that --class_names"),
    ],
)
def test_labels_that_do_not_fit_the_problem_type_are_clear_errors(tmp_path, labels, options, message):
    with pytest.raises(ValueError, match=message):
        read(tmp_path, labels, **options)


def test_extra_molecules_need_the_datasets_classes(tmp_path):
    extra = tmp_path / "extra.csv"
    pd.DataFrame({"smiles": ["CCCCCCCCO", "CCCCCCCCN"], "y": ["inactive", "unknown"]}).to_csv(
        extra, index=False
    )
    with pytest.raises(
        ValueError, match=r"not among the classes \['active', 'inactive'\] \(row 1: 'unknown'\)"
    ):
        read(tmp_path, ["inactive", "active"] * 6, data={"extra_train_file": str(extra)})
    extra.write_text("smiles,y\nCCCCCCCCO,active\n")
    data, _ = read(tmp_path, ["inactive", "active"] * 6, data={"extra_train_file": str(extra)})
    assert data.frames["train"]["label"].iloc[-1] == 0 and len(data.extra) == 1


def test_multi_label_values_must_be_zero_or_one(tmp_path):
    with pytest.raises(ValueError, match=r"are not 0 or 1.*row 3: 2"):
        read(tmp_path, [0, 1, 1, 2] * 3, MULTI)


@pytest.mark.parametrize(
    ("options", "label_column", "message"),
    [
        ({"problem_type": SINGLE}, "a,b", "reads one label column, got 2"),
        ({"problem_type": SINGLE, "num_labels": 1}, "y", "at least 2"),
        ({"num_labels": 3}, "y", "are for single_label_classification, not regression"),
        ({"class_weights": "balanced"}, "y", "weights a classification loss"),
        ({"problem_type": MULTI}, "a,b,a", r"lists \['a'\] more than once"),
    ],
)
def test_task_options_that_cannot_work_fail_before_any_data(options, label_column, message):
    with pytest.raises(ValueError, match=message):
        make_task(TaskArguments(**options), label_column, "none", None)
    with pytest.raises(ValueError, match="--hp_search minimises validation RMSE"):
        make_task(TaskArguments(problem_type=MULTI), "a,b", "optuna", None)


def test_the_stratified_split_keeps_each_class_share():
    labels = np.array([0] * 70 + [1] * 30)
    frame = pd.DataFrame({"canonical_smiles": [f"C{i}" for i in range(100)], "label": labels})
    split = make_split(frame, "stratified", fractions=(0.8, 0.1, 0.1), seed=0, by_class=True)
    for part in (split.validation, split.test):
        assert labels[part].sum() == 3 and len(part) == 10


def test_validation_with_one_class_cannot_pick_the_best_epoch(caplog):
    task = Task(problem_type=SINGLE, label_columns=["y"], classes=["0", "1"])
    frames = {
        name: pd.DataFrame({"label": labels}) for name, labels in (("train", [0, 1]), ("validation", [1, 1]))
    }
    with caplog.at_level("WARNING", logger="molft.tasks"):
        check_split_labels(frames, task, needs_validation_auc=False)
    assert "The validation split has no molecule of class(es) ['0']." in caplog.messages
    with pytest.raises(ValueError, match="validation ROC-AUC, which picks the best epoch, is undefined"):
        check_split_labels(frames, task, needs_validation_auc=True)


# ---------------------------------------------------------------- saving and loading


@pytest.mark.parametrize(("problem_type", "num_labels"), [(SINGLE, 3), (MULTI, 2)])
def test_auto_class_save_reload_and_lora_adapter_give_identical_probabilities(
    tmp_path, problem_type, num_labels
):
    tokenizer = MolformerTokenizer.from_smiles(SMILES)
    model = classifier(
        problem_type, num_labels, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
    )
    expected = model.predict(SMILES, tokenizer)
    assert expected.shape == (len(SMILES), num_labels)
    if problem_type == SINGLE:
        torch.testing.assert_close(expected.sum(dim=1), torch.ones(len(SMILES)))
    model.save_pretrained(tmp_path / "full")
    assert read_json(tmp_path / "full" / "config.json")["problem_type"] == problem_type
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full")
    assert type(loaded) is MolformerForRegression and loaded.config.problem_type == problem_type
    torch.testing.assert_close(loaded.predict(SMILES, tokenizer), expected, atol=0, rtol=0)
    expected, reloaded = lora_round_trip(
        tmp_path / "full", model.config, tmp_path / "adapter", SMILES, tokenizer
    )
    torch.testing.assert_close(reloaded, expected)


def test_a_fine_tuned_classifier_keeps_its_problem_type_and_classes(tmp_path):
    classifier(SINGLE, 3, id2label={0: "low", 1: "mid", 2: "high"}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"is a {SINGLE} model, but this run asks for regression"):
        make_task(TaskArguments(), "y", "none", str(tmp_path))  # before any data is read
    task = make_task(TaskArguments(problem_type=SINGLE), "y", "none", str(tmp_path))
    assert task.class_names == ["low", "mid", "high"]


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_every_peft_method_trains_the_classification_head(method):
    model = apply_peft(classifier(SINGLE, 3), PeftOptions(peft=method)).train()
    model(**batch(), labels=torch.tensor([0, 2, 1, 1])).loss.backward()
    head = {n: p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad}
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.values())
    assert any("out_proj" in n and p.shape[0] == 3 for n, p in head.items())


@pytest.mark.parametrize("script", ["run_influence", "run_selection"])
def test_influence_and_selection_refuse_a_classifier_before_any_work(tmp_path, script):
    classifier(MULTI, 2).save_pretrained(tmp_path / "model")
    pool = tmp_path / "pool.csv"
    pool.write_text("smiles\nCCO\n")
    main = importlib.import_module(script).main
    message = rf"{script}.py works on the squared error of one regression target.*{MULTI}"
    args = [
        "--model_name_or_path",
        tmp_path / "model",
        "--external_file",
        pool,
        "--output_dir",
        tmp_path / "out",
    ]
    if script == "run_selection":
        args += ["--strategy", "random", "--k", "1"]
    with pytest.raises(ValueError, match=message):
        main([str(arg) for arg in args])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the script, once per problem type


def test_binary_run_from_string_labels(data_dir, tmp_path):
    lipo = pd.read_csv(data_dir / "lipophilicity.csv", nrows=100)
    table = pd.DataFrame({"smiles": lipo["smiles"], "class": np.where(lipo["exp"] > 3, "high", "low")})
    table.to_csv(tmp_path / "binary.csv", index=False)
    out = tmp_path / "run"
    run_script(
        "run_regression.py", *TINY_RUN, "--train_file", tmp_path / "binary.csv", "--label_column", "class",
        "--problem_type", SINGLE, "--class_names", "low,high", "--class_weights", "balanced", "--split", "stratified",
        "--output_dir", out,
    )  # fmt: skip
    results = read_json(out / "all_results.json")
    predictions = pd.read_csv(out / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    assert set(test["label"]) == {"low", "high"} and {"prob_low", "prob_high"} <= set(test.columns)
    assert results["test_roc_auc"] == pytest.approx(
        skm.roc_auc_score(test["label"] == "high", test["prob_high"])
    )
    config = read_json(out / "config.json")
    assert config["problem_type"] == SINGLE and config["id2label"] == {"0": "low", "1": "high"}
    assert len(config["class_weights"]) == 2
    training = read_json(out / "run_config.json")["training"]  # the best epoch is the best validation ROC-AUC
    assert (training["metric_for_best_model"], training["greater_is_better"]) == ("eval_roc_auc", True)
    assert (out / "roc_test.png").is_file() and (out / "reliability_test.png").is_file()
    assert "# MoLFormer classification model" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match=rf"belongs to a {SINGLE}"):
        require_single_target_regression("run_influence.py", str(out))


def test_multi_label_run_with_gaps_and_a_lora_adapter(data_dir, tmp_path):
    lipo = pd.read_csv(data_dir / "lipophilicity.csv", nrows=100)
    high = (lipo["exp"] > 3).astype(float)
    low = (lipo["exp"] < 1.5).astype(float)
    high[::4], low[1::4] = NAN, NAN
    pd.DataFrame({"smiles": lipo["smiles"], "high": high, "low": low}).to_csv(
        tmp_path / "multi.csv", index=False
    )
    out = tmp_path / "run"
    run_script(
        "run_regression.py", *TINY_RUN, "--train_file", tmp_path / "multi.csv", "--label_column", "high,low",
        "--problem_type", MULTI, "--peft", "lora", "--output_dir", out,
    )  # fmt: skip
    results = read_json(out / "all_results.json")
    predictions = pd.read_csv(out / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    for name in ("high", "low"):
        keep = test[f"label_{name}"].notna()
        assert results[f"test_pr_auc_{name}"] == pytest.approx(
            skm.average_precision_score(test[f"label_{name}"][keep], test[f"prob_{name}"][keep])
        )
    assert results["test_roc_auc"] == pytest.approx(
        np.nanmean([results["test_roc_auc_high"], results["test_roc_auc_low"]])
    )
    assert (out / "adapter_config.json").is_file()
    tokenizer = MolformerTokenizer.from_pretrained(out)
    reloaded = load_regression_checkpoint(out)
    probabilities = reloaded.predict(test["canonical_smiles"].tolist(), tokenizer).numpy()
    np.testing.assert_allclose(
        probabilities, test[["prob_high", "prob_low"]].to_numpy(), rtol=1e-5, atol=1e-6
    )
