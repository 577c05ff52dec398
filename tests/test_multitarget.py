"""Several regression targets with gaps (`--label_column a,b`): the masked loss, the labels as read, per-target
statistics and metrics, saving and reloading, and one run_regression.py run as a user starts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY_CONFIG, TINY_RUN, lora_round_trip, micro_config, run_script, single_thread  # noqa: F401  (autouse fixture)
from sklearn import metrics as skm
from transformers import AutoModelForSequenceClassification

from modeling_molformer_reg import MolformerForRegression
from molft.io import read_json
from molft.metrics import METRIC_NAMES, multitarget_regression_metrics, regression_metrics
from molft.peft_setup import load_regression_checkpoint
from molft.regression import RegressionModelArguments, build_config
from molft.run_data import RegressionDataArguments, prepare_data
from molft.tasks import Task, TaskArguments, check_split_labels, make_task, require_single_target_regression
from tokenization_molformer import MolformerTokenizer

NAN = float("nan")
SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1", "O=C(O)c1ccccc1", "CCN(CC)CC"]


def two_target_model(seed: int = 0, **overrides) -> MolformerForRegression:
    torch.manual_seed(seed)
    config = micro_config(
        target_mean=[1.0, -2.0], target_std=[2.0, 0.5], id2label={0: "a", 1: "b"}, **overrides
    )
    return MolformerForRegression(config).eval()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 24, (4, 7), generator=generator)
    input_ids[2, 5:] = 2
    return {"input_ids": input_ids, "attention_mask": (input_ids != 2).long()}


def loss_and_output_grad(model, labels, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, the head's normalised outputs, d loss / d outputs)."""
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["out"] = output

    handle = model.classifier.register_forward_hook(keep)
    try:
        loss = model(**batch(), labels=labels, **kwargs).loss
        loss.backward()
    finally:
        handle.remove()
    return loss.detach(), captured["out"].detach(), captured["out"].grad


# ---------------------------------------------------------------- the model


def test_a_masked_label_adds_nothing_to_loss_or_gradient():
    model = two_target_model()
    labels = torch.tensor([[1.5, NAN], [0.0, -1.0], [NAN, -3.0], [2.5, -2.5]])
    loss, normalised, grad = loss_and_output_grad(model, labels)
    observed = ~torch.isnan(labels)
    target = (labels - torch.tensor([1.0, -2.0])) / torch.tensor([2.0, 0.5])
    by_hand = ((normalised - target)[observed] ** 2).mean()
    torch.testing.assert_close(loss, by_hand)
    assert grad[0, 1].item() == 0.0 and grad[2, 0].item() == 0.0  # exactly nothing, not merely small
    assert (grad[observed] != 0).all()
    # the masked entries' gradient stays zero under per-molecule weights too
    model.zero_grad()
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    loss, normalised, grad = loss_and_output_grad(model, labels, sample_weight=weights)
    w = weights[:, None].expand_as(labels)[observed]
    torch.testing.assert_close(loss, (w * (normalised - target)[observed] ** 2).sum() / w.sum())
    assert grad[0, 1].item() == 0.0 and grad[2, 0].item() == 0.0


def test_parameter_gradients_ignore_what_the_model_predicts_for_a_masked_label():
    """Moving only the masked target's output changes no gradient of the shared parameters."""
    labels = torch.tensor([[1.5, NAN], [0.0, NAN], [2.0, NAN], [2.5, NAN]])
    grads = []
    for bias in (0.0, 5.0):
        model = two_target_model()
        with torch.no_grad():
            model.classifier.out_proj.bias[1] = bias
        model(**batch(), labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_outputs_are_in_each_targets_units_and_one_target_stays_as_before():
    model = two_target_model()
    with torch.no_grad():
        logits = model(**batch()).logits
        normalised = model.classifier(model.embed(**batch()))
    torch.testing.assert_close(logits, normalised * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -2.0]))
    single = MolformerForRegression(micro_config(target_mean=3.0, target_std=2.0))
    assert single.config.num_labels == 1 and single.classifier.out_proj.out_features == 1
    assert single.predict(SMILES[:2], MolformerTokenizer.from_smiles(SMILES)).shape == (2,)


def test_save_reload_auto_class_and_lora_adapter_give_identical_predictions(tmp_path):
    tokenizer = MolformerTokenizer.from_smiles(SMILES)
    model = two_target_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    expected = model.predict(SMILES, tokenizer)
    assert expected.shape == (len(SMILES), 2)
    model.save_pretrained(tmp_path / "full")
    for loaded in (
        load_regression_checkpoint(tmp_path / "full"),
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "full"),
    ):
        assert type(loaded) is MolformerForRegression and loaded.config.target_mean == [1.0, -2.0]
        torch.testing.assert_close(loaded.predict(SMILES, tokenizer), expected, atol=0, rtol=0)
    # a LoRA adapter with the run's config beside it, on a saved base
    model.save_pretrained(tmp_path / "base")
    expected, reloaded = lora_round_trip(
        tmp_path / "base", model.config, tmp_path / "adapter", SMILES, tokenizer
    )
    torch.testing.assert_close(reloaded, expected, atol=0, rtol=0)


# ---------------------------------------------------------------- labels, statistics and metrics


@pytest.fixture
def table(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    smiles = [f"C{'C' * (i % 7)}{'O' * (i % 3)}N" + "c1ccccc1" * (i % 2) for i in range(40)]
    a = rng.normal(2.0, 1.0, 40)
    b = rng.normal(-3.0, 2.0, 40)
    a[::3], b[1::3] = NAN, NAN  # each molecule misses a label now and then
    frame = pd.DataFrame({"smiles": smiles, "a": a, "b": b})
    frame.loc[5, ["a", "b"]] = NAN  # no label at all: dropped
    path = tmp_path / "two.csv"
    frame.to_csv(path, index=False)
    return path


def prepared(path: Path, label_column: str = "a,b", **options):
    task = make_task(TaskArguments(), label_column, "none", None)
    data = prepare_data(
        RegressionDataArguments(train_file=str(path), label_column=label_column, **options), task=task
    )
    return data, task


def test_targets_are_read_with_gaps_and_rows_without_labels_are_dropped(table, caplog):
    with caplog.at_level("WARNING", logger="molft.labels"):
        data, task = prepared(table)
    assert task.label_columns == ["a", "b"] and not task.is_legacy
    assert len(data.dataset) == 39 and 5 not in set(data.dataset["row"])
    assert any("dropping 1 of 40 molecules without any label (rows [5])" in m for m in caplog.messages)
    raw = pd.read_csv(table).set_index(pd.RangeIndex(40))
    for name in ("a", "b"):
        expected = raw.loc[data.dataset["row"], name].to_numpy()
        np.testing.assert_array_equal(data.dataset[f"label_{name}"].to_numpy(), expected)
    assert data.columns["label_column"] == "a,b"


def test_each_target_is_standardised_on_its_own_observed_training_labels(table):
    data, task = prepared(table)
    tokenizer = MolformerTokenizer.from_smiles(data.frames["train"]["canonical_smiles"])
    config = build_config(
        RegressionModelArguments(config_name=str(TINY_CONFIG)), "none", tokenizer, data.frames["train"], task
    )
    for j, name in enumerate(("a", "b")):
        values = data.frames["train"][f"label_{name}"].dropna().to_numpy()
        assert config.target_mean[j] == pytest.approx(values.mean())
        assert config.target_std[j] == pytest.approx(values.std())
    assert config.problem_type == "regression" and config.id2label == {0: "a", 1: "b"}


def test_extra_molecules_join_train_with_their_own_gaps(table, tmp_path, caplog):
    extra = tmp_path / "extra.csv"
    rows = {"smiles": ["CCCCCCCCO", "CCCCCCCCN", "CCCCCCCCCl"], "x": [1.0, NAN, NAN], "y": [NAN, 2.0, NAN]}
    pd.DataFrame(rows).to_csv(extra, index=False)
    with caplog.at_level("WARNING", logger="molft.labels"):
        data, _ = prepared(
            table, extra_train_file=str(extra), extra_label_column="x,y"
        )  # x, y stand for a, b
    added = data.frames["train"][data.frames["train"]["source"] == "extra:extra.csv"]
    np.testing.assert_array_equal(added[["label_a", "label_b"]].to_numpy(), [[1.0, NAN], [NAN, 2.0]])
    assert any("dropping 1 of 3 molecules without any label (rows [2])" in m for m in caplog.messages)
    with pytest.raises(ValueError, match=r"label column 'a' not found in .*extra.csv"):
        prepared(table, extra_train_file=str(extra))  # by default the extra file needs the dataset's columns


@pytest.mark.parametrize(
    ("content", "label_column", "message"),
    [
        (
            {"smiles": ["CCO", "CCN"], "a": [1.0, 2.0], "b": [0.5, 1.0]},
            "a,b,a",
            r"lists \['a'\] more than once",
        ),
        ({"smiles": ["CCO", "CCN"], "a": [1.0, "high"], "b": [0.5, 1.0]}, "a,b", r"row 1: 'high'"),
        ({"smiles": ["CCO", "CCN"], "a": [1.0, 2.0], "b": [0.5, 1.0]}, "a,c", r"label column 'c' not found"),
    ],
)
def test_bad_label_columns_are_clear_errors(tmp_path, content, label_column, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(content).to_csv(path, index=False)
    with pytest.raises(ValueError, match=message):
        prepared(path, label_column)


def test_a_target_without_labels_in_a_split_is_an_error():
    task = Task(label_columns=["a", "b"])
    frames = {
        "train": pd.DataFrame({"label_a": [1.0, NAN], "label_b": [NAN, 2.0]}),
        "validation": pd.DataFrame({"label_a": [1.0, 2.0], "label_b": [NAN, NAN]}),
    }
    with pytest.raises(ValueError, match=r"Target 'b' has no labels in the validation split \(2 molecules\)"):
        check_split_labels(frames, task, needs_validation_auc=False)


def test_metrics_per_target_and_their_mean_equal_scikit_learns():
    y_true = np.array([[1.0, NAN], [2.0, 0.5], [NAN, 1.5], [4.0, -1.0], [3.0, 0.0]])
    y_pred = np.array([[1.2, 9.0], [1.5, 0.7], [9.0, 1.0], [3.5, -0.5], [3.2, 0.4]])
    scores = multitarget_regression_metrics(y_true, y_pred, ["a", "b"])
    for j, name in enumerate(("a", "b")):
        keep = ~np.isnan(y_true[:, j])
        assert scores[f"rmse_{name}"] == pytest.approx(
            np.sqrt(skm.mean_squared_error(y_true[keep, j], y_pred[keep, j]))
        )
        assert scores[f"mae_{name}"] == pytest.approx(
            skm.mean_absolute_error(y_true[keep, j], y_pred[keep, j])
        )
        assert scores[f"r2_{name}"] == pytest.approx(skm.r2_score(y_true[keep, j], y_pred[keep, j]))
    for metric in METRIC_NAMES:
        assert scores[metric] == pytest.approx((scores[f"{metric}_a"] + scores[f"{metric}_b"]) / 2)
    # the predictions for missing labels (9.0) play no part
    assert scores["rmse_a"] == regression_metrics(y_true[[0, 1, 3, 4], 0], y_pred[[0, 1, 3, 4], 0])["rmse"]


# ---------------------------------------------------------------- the script


def write_two_target_table(data_dir: Path, path: Path) -> Path:
    """60 Lipophilicity molecules (logD) and 40 more with a second, made-up target (logS-like) only."""
    lipo = pd.read_csv(data_dir / "lipophilicity.csv", nrows=100)
    rng = np.random.default_rng(1)
    logs = np.round(-0.8 * lipo["exp"].to_numpy() - 2 + rng.normal(0, 0.3, 100), 2)
    frame = pd.DataFrame({"smiles": lipo["smiles"], "logD": lipo["exp"], "logS": logs})
    frame.loc[:59, "logS"], frame.loc[60:, "logD"] = NAN, NAN
    frame.to_csv(path, index=False)
    return path


def test_two_target_run_writes_per_target_metrics_predictions_and_plots(data_dir, tmp_path):
    train_file = write_two_target_table(data_dir, tmp_path / "two.csv")
    out = tmp_path / "run"
    new = tmp_path / "new.csv"
    pd.DataFrame({"smiles": ["CCO", "c1ccccc1C(=O)O"]}).to_csv(new, index=False)
    run_script(
        "run_regression.py", *TINY_RUN, "--train_file", train_file, "--label_column", "logD,logS",
        "--predict_file", new, "--output_dir", out,
    )  # fmt: skip
    results = read_json(out / "all_results.json")
    for split in ("eval", "test"):
        for metric in ("rmse", "mae", "r2"):
            per_target = [results[f"{split}_{metric}_{name}"] for name in ("logD", "logS")]
            assert results[f"{split}_{metric}"] == pytest.approx(np.mean(per_target))
    predictions = pd.read_csv(out / "predictions.csv")
    assert {"label_logD", "prediction_logD", "label_logS", "prediction_logS"} <= set(predictions.columns)
    test = predictions[predictions["split"] == "test"]
    keep = test["label_logS"].notna()
    assert results["test_rmse_logS"] == pytest.approx(
        np.sqrt(np.mean((test["label_logS"][keep] - test["prediction_logS"][keep]) ** 2)), rel=1e-5
    )
    config = read_json(out / "config.json")
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "logD", "1": "logS"}
    assert len(config["target_mean"]) == 2
    assert (out / "parity_test_logD.png").is_file() and (out / "parity_test_logS.png").is_file()
    assert read_json(out / "split.json")["task"]["label_columns"] == ["logD", "logS"]
    unlabelled = pd.read_csv(out / "predict_predictions.csv")
    assert list(unlabelled.columns) == [
        "row",
        "smiles",
        "canonical_smiles",
        "prediction_logD",
        "prediction_logS",
    ]
    # the run's own loss is several targets' squared error: influence and selection refuse it, naming it
    for script in ("run_influence.py", "run_selection.py"):
        with pytest.raises(
            ValueError, match=rf"{script} works on the squared error of one regression target.*2 targets"
        ):
            require_single_target_regression(script, str(out))
    with pytest.raises(ValueError, match="2 targets"):
        require_single_target_regression("run_selection.py", None, str(out / "split.json"))
    assert json.loads((out / "run_complete.json").read_text())["labels"] == ["logD", "logS"]
