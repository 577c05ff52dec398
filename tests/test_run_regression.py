"""run_regression.py end to end, as the transformers examples test their scripts.

`main()` runs with a patched `sys.argv` on a tiny MoLFormer (configs/molformer-tiny.json, a vocabulary built
from the training SMILES) and the first 160 Lipophilicity molecules; the tests then read what it wrote
(all_results.json, predictions.csv, split.json, ...). Trained runs are module-scoped and shared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
import yaml
from helpers import TINY_CONFIG, launch_two_processes, model_predictions
from safetensors.torch import load_file
from transformers import AutoTokenizer

import molft.regression
import run_regression
from modeling_molformer_reg import MolformerForRegression
from molft import cli, preflight
from molft.chem import canonical_smiles, murcko_scaffold
from molft.data import prepare_molecules
from molft.io import read_json
from molft.metrics import METRIC_NAMES, regression_metrics
from molft.peft_setup import load_regression_checkpoint
from molft.splits import make_split
from run_regression import main
from tokenization_molformer import MolformerTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ROOT / "configs" / "regression_tiny.yaml"
N_MOLECULES = 160  # split 128 / 16 / 16
INVALID_SMILES = ["C1CC", "not a smiles"]
PREDICT_SMILES = ["CCO", "c1ccccc1C(=O)O", "C1CC", "CN1CCN(CC1)c1ccccc1", "O=C(Nc1ccccc1)c1ccncc1"]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    log: str
    args: list[str]
    captured: dict = field(default_factory=dict)

    def results(self) -> dict:
        return read_json(self.path / "all_results.json")

    def predictions(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "predictions.csv")


def run_main(*args, patches: dict | None = None) -> str:
    """Call run_regression.main() with `args` as sys.argv; return what it logged.

    `patches` replace attributes of molft.regression (e.g. a spy on apply_peft) during the run.
    """
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    def quiet_logging(level: int) -> None:  # the script's own set-up would remove pytest's log handlers
        logging.getLogger().setLevel(logging.INFO)
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()

    root = logging.getLogger()
    previous = root.level, transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from more, and loses a lot on a busy machine
    handler = Collect(logging.INFO)
    root.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["run_regression.py", *map(str, args)])
            patch.setattr(cli, "setup_logging", quiet_logging)
            for name, value in (patches or {}).items():
                patch.setattr(molft.regression, name, value)
            main()
    finally:
        root.removeHandler(handler)
        torch.set_num_threads(threads)
        root.setLevel(previous[0])
        transformers.utils.logging.set_verbosity(previous[1])
        datasets.utils.logging.set_verbosity(previous[2])
    return "\n".join(records)


def tiny_args(train_file, output_dir, *extra) -> list[str]:
    return [
        TINY_RUN, "--config_name", TINY_CONFIG, "--train_file", train_file, "--output_dir", output_dir,
        *map(str, extra),
    ]  # fmt: skip


def start(train_file, output_dir, *extra, patches=None) -> Run:
    args = tiny_args(train_file, output_dir, *extra)
    return Run(Path(output_dir), run_main(*args, patches=patches), [str(a) for a in args])


def spy_on_peft(captured: dict):
    """Wrap apply_peft to keep the model being trained and a copy of its starting parameters."""
    original = molft.regression.apply_peft

    def apply_peft(model, options):
        wrapped = original(model, options)
        captured["model"] = wrapped
        captured["initial"] = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
        return wrapped

    return apply_peft


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------------------------------------
# Data and shared runs
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run_regression")


@pytest.fixture(scope="module")
def lipophilicity(data_dir) -> pd.DataFrame:
    return pd.read_csv(data_dir / "lipophilicity.csv", nrows=200)


@pytest.fixture(scope="module")
def data_csv(lipophilicity, workdir) -> Path:
    return write_csv(lipophilicity.iloc[:N_MOLECULES], workdir / "lipophilicity_160.csv")


@pytest.fixture(scope="module")
def full_run(lipophilicity, workdir) -> Run:
    """Full fine-tuning, 2 epochs, on the 160 molecules plus two invalid SMILES (rows 3 and 4), --do_predict."""
    bad = pd.DataFrame({"CMPD_CHEMBLID": ["BAD1", "BAD2"], "exp": [1.0, 2.0], "smiles": INVALID_SMILES})
    data = pd.concat([lipophilicity.iloc[:3], bad, lipophilicity.iloc[3:N_MOLECULES]], ignore_index=True)
    predict_file = write_csv(pd.DataFrame({"smiles": PREDICT_SMILES}), workdir / "to_predict.csv")
    captured: dict = {}
    run = start(
        write_csv(data, workdir / "with_invalid.csv"), workdir / "full",
        "--num_train_epochs", 2, "--do_predict", "--predict_file", predict_file,
        patches={"apply_peft": spy_on_peft(captured)},
    )  # fmt: skip
    run.captured = captured
    return run


def _peft_run(method: str, data_csv: Path, workdir: Path, *extra) -> Run:
    captured: dict = {}
    run = start(
        data_csv, workdir / method, "--peft", method, "--learning_rate", "5e-3", *extra,
        patches={"apply_peft": spy_on_peft(captured)},
    )  # fmt: skip
    run.captured = captured
    return run


@pytest.fixture(scope="module")
def lora_run(data_csv, workdir) -> Run:
    return _peft_run("lora", data_csv, workdir, "--lora_r", 4, "--merge_adapter")


@pytest.fixture(scope="module")
def ia3_run(data_csv, workdir) -> Run:
    return _peft_run("ia3", data_csv, workdir)


@pytest.fixture(scope="module")
def bitfit_run(data_csv, workdir) -> Run:
    return _peft_run(
        "bitfit", data_csv, workdir, "--regression_head", "mlp", "--pooling", "cls", "--loss", "huber"
    )


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning methods
# ----------------------------------------------------------------------------------------------------------


def test_full_fine_tuning_trains_every_parameter(full_run):
    model = full_run.captured["model"]
    assert all(p.requires_grad for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    results = full_run.results()
    assert results["trainable_params"] == results["total_params"] == total
    assert results["trainable_share"] == 1.0
    assert "Trainable parameters (none)" in full_run.log


TRAINED_BY = {
    "bitfit": lambda name: name.endswith(".bias") or name.startswith("classifier."),
    "lora": lambda name: "lora_" in name or ".classifier.modules_to_save." in name,
    "ia3": lambda name: "ia3_l" in name or ".classifier.modules_to_save." in name,
}


@pytest.mark.parametrize("method", ["bitfit", "lora", "ia3"])
def test_peft_trains_only_its_parameters_and_the_head(method, request):
    run = request.getfixturevalue(f"{method}_run")
    model, initial = run.captured["model"], run.captured["initial"]
    counted = {n: p for n, p in model.named_parameters() if ".original_module." not in n}
    trainable = {n for n, p in counted.items() if p.requires_grad}
    assert trainable == {n for n in counted if TRAINED_BY[method](n)}
    assert any("classifier" in n for n in trainable)
    for name, param in counted.items():  # frozen parameters did not move, trained ones did
        if name not in trainable:
            assert torch.equal(param, initial[name]), name
    assert any(not torch.equal(counted[n], initial[n]) for n in trainable)
    results = run.results()
    n_trainable = sum(counted[n].numel() for n in trainable)
    n_total = sum(p.numel() for p in counted.values())
    assert results["trainable_params"] == n_trainable and results["total_params"] == n_total
    assert results["trainable_share"] == pytest.approx(n_trainable / n_total) and 0 < n_trainable < n_total
    assert f"Trainable parameters ({method}): {n_trainable:,} of {n_total:,}" in run.log


def test_head_pooling_and_loss_options_reach_the_model(bitfit_run):
    config = read_json(bitfit_run.path / "config.json")
    assert (config["regression_head"], config["regression_pooling"], config["regression_loss"]) == (
        "mlp",
        "cls",
        "huber",
    )
    head = {n for n in bitfit_run.captured["initial"] if n.startswith("classifier.")}
    assert head == {
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    }


def test_lora_adapter_reloads_with_identical_predictions(lora_run):
    assert (lora_run.path / "adapter_config.json").is_file()
    assert not (lora_run.path / "model.safetensors").exists()  # an adapter run saves the adapter only
    predictions = lora_run.predictions()
    model = load_regression_checkpoint(lora_run.path)
    tokenizer = AutoTokenizer.from_pretrained(lora_run.path)
    reloaded = model_predictions(model, tokenizer, predictions["canonical_smiles"].tolist())
    np.testing.assert_allclose(reloaded, predictions["prediction"], atol=1e-5)


def test_merged_model_reproduces_adapter_predictions(lora_run):
    merged = MolformerForRegression.from_pretrained(lora_run.path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    predictions = lora_run.predictions()
    tokenizer = AutoTokenizer.from_pretrained(lora_run.path / "merged")
    merged_predictions = model_predictions(merged, tokenizer, predictions["canonical_smiles"].tolist())
    np.testing.assert_allclose(merged_predictions, predictions["prediction"], atol=1e-5)


def test_adapter_checkpoint_evaluates_and_predicts_without_training(lora_run, workdir):
    """--model_name_or_path on a LoRA run: its adapter is reloaded, no new PEFT, the same test metrics."""
    out = workdir / "lora_evaluated"
    run_main(
        *tiny_args(lora_run.args[lora_run.args.index("--train_file") + 1], out),
        "--model_name_or_path", lora_run.path, "--do_train", "false", "--split_file", lora_run.path / "split.json",
        "--do_predict", "--predict_file", write_csv(pd.DataFrame({"smiles": PREDICT_SMILES}), workdir / "new.csv"),
    )  # fmt: skip
    original, again = lora_run.results(), read_json(out / "all_results.json")
    for name in ("test_rmse", "test_r2", "eval_rmse"):
        assert again[name] == pytest.approx(original[name], abs=1e-6)
    assert (out / "predict_predictions.csv").is_file()


# ----------------------------------------------------------------------------------------------------------
# Outputs of a run
# ----------------------------------------------------------------------------------------------------------


def test_outputs_are_written(full_run):
    results = full_run.results()
    for prefix in ("eval", "test"):
        for metric in METRIC_NAMES:
            assert np.isfinite(results[f"{prefix}_{metric}"]), f"{prefix}_{metric}"
    assert results["train_wall_time_s"] > results["train_runtime"] > 0
    assert results["train_samples"] == 128 and results["epoch"] == 2
    for name in (
        "predictions.csv", "parity_test.png", "loss_curves.png", "split.json", "run_config.json",
        "run_options.yaml", "README.md", "model.safetensors", "config.json", "tokenizer.json",
    ):  # fmt: skip
        assert (full_run.path / name).stat().st_size > 0, name
    done = read_json(full_run.path / "run_complete.json")
    assert done["test_rmse"] == results["test_rmse"] and done["peft"] == "none"


def test_best_epoch_is_restored_and_batches_are_length_grouped(full_run):
    state = read_json(full_run.path / "trainer_state.json")
    evaluations = [e["eval_rmse"] for e in state["log_history"] if "eval_rmse" in e]
    assert len(evaluations) == 2 and state["best_metric"] == min(evaluations)
    assert full_run.results()["eval_rmse"] == pytest.approx(min(evaluations), abs=1e-9)
    training = read_json(full_run.path / "run_config.json")["training"]
    assert (
        training["train_sampling_strategy"] == "group_by_length"
        and training["metric_for_best_model"] == "eval_rmse"
    )
    assert training["load_best_model_at_end"] and training["optim"].startswith("adamw")


def test_predictions_match_input_labels_and_metrics(full_run):
    predictions = full_run.predictions()
    assert list(predictions.columns[:5]) == ["smiles", "canonical_smiles", "label", "prediction", "split"]
    assert predictions["split"].value_counts().to_dict() == {"train": 128, "validation": 16, "test": 16}
    data = pd.read_csv(full_run.args[full_run.args.index("--train_file") + 1])
    label_of = dict(zip(data["smiles"], data["exp"], strict=True))
    assert predictions["label"].tolist() == [label_of[s] for s in predictions["smiles"]]
    results = full_run.results()
    for split, prefix in (("validation", "eval"), ("test", "test")):
        part = predictions[predictions["split"] == split]
        recomputed = regression_metrics(part["label"], part["prediction"])
        for metric in ("rmse", "mae", "r2", "spearman"):
            assert recomputed[metric] == pytest.approx(results[f"{prefix}_{metric}"], abs=1e-5)


def test_invalid_smiles_are_dropped_and_reported(full_run):
    assert read_json(full_run.path / "split.json")["n_molecules"] == N_MOLECULES
    assert "dropping 2 of 162 rows whose SMILES are invalid or RDKit cannot parse" in full_run.log
    assert "row 3: 'C1CC'" in full_run.log and "row 4: 'not a smiles'" in full_run.log
    assert not set(INVALID_SMILES) & set(full_run.predictions()["smiles"])


def test_saved_model_and_do_predict(full_run):
    model = MolformerForRegression.from_pretrained(full_run.path)
    tokenizer = AutoTokenizer.from_pretrained(full_run.path)
    predictions = full_run.predictions()
    reloaded = model_predictions(model, tokenizer, predictions["canonical_smiles"].tolist())
    np.testing.assert_allclose(reloaded, predictions["prediction"], atol=1e-5)

    unlabelled = pd.read_csv(full_run.path / "predict_predictions.csv")
    assert unlabelled["row"].tolist() == [0, 1, 3, 4]  # row 2 is the invalid C1CC, reported and left out
    assert "row 2: 'C1CC'" in full_run.log
    expected = model_predictions(model, tokenizer, unlabelled["canonical_smiles"].tolist())
    np.testing.assert_allclose(unlabelled["prediction"], expected, atol=1e-5)


def test_model_card_is_written(full_run):
    card = (full_run.path / "README.md").read_text()
    results = full_run.results()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "# MoLFormer regression model" in card and "fine-tuning method: **none**" in card
    assert f"| rmse | {results['eval_rmse']:.4f} | {results['test_rmse']:.4f} |" in card
    assert "Split: random (train=128, validation=16, test=16)" in card


@pytest.mark.parametrize("run_name", ["full_run", "lora_run"])
def test_model_card_code_runs(run_name, request):
    """The card's "Use" snippet, run as written, predicts what predictions.csv holds."""
    run = request.getfixturevalue(run_name)
    card = (run.path / "README.md").read_text()
    expected = run.predictions().iloc[0]
    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace("PATH", repr(str(run.path))).replace("['CCO']", repr([expected["canonical_smiles"]]))
    *setup, call = code.strip().splitlines()
    namespace: dict = {}
    exec("\n".join(setup), namespace)
    assert float(eval(call, namespace)[0]) == pytest.approx(expected["prediction"], abs=1e-5)


def test_resolved_config_reruns_the_same_options(full_run, workdir):
    """run_options.yaml, given back to the script, resolves to the run's every setting (tests/test_run_record.py
    checks the same round trip option by option)."""
    out = workdir / "rerun_options"
    run_main(full_run.path / "run_options.yaml", "--output_dir", out, "--do_train", "false")
    original, rerun = read_json(full_run.path / "run_config.json"), read_json(out / "run_config.json")
    for group in ("model", "peft", "data", "run"):
        assert original[group] == rerun[group], group
    changed = {"output_dir", "do_train"}  # the two options given on top of the file
    assert {k: v for k, v in original["training"].items() if k not in changed} == {
        k: v for k, v in rerun["training"].items() if k not in changed
    }
    resolved = yaml.safe_load((full_run.path / "run_options.yaml").read_text())
    assert resolved["num_train_epochs"] == 2 and resolved["predict_file"].endswith("to_predict.csv")


def test_resume_from_checkpoint(full_run, workdir):
    """An interrupted run (last checkpoint gone) resumes from the one before and ends where it would have."""
    resumed = workdir / "resumed"
    shutil.copytree(full_run.path, resumed)
    state = read_json(full_run.path / "trainer_state.json")
    steps_per_epoch = state["global_step"] // 2
    shutil.rmtree(resumed / f"checkpoint-{state['global_step']}")
    (resumed / "run_complete.json").unlink()
    args = list(full_run.args)
    args[args.index("--output_dir") + 1] = str(resumed)
    log = run_main(*args)
    assert f"Resuming from {resumed}/checkpoint-{steps_per_epoch}" in log
    assert "Reusing the random split" in log
    again = read_json(resumed / "all_results.json")
    assert read_json(resumed / "trainer_state.json")["global_step"] == state["global_step"]
    for name in ("eval_rmse", "test_rmse", "test_pearson"):
        assert again[name] == pytest.approx(full_run.results()[name], abs=1e-6)


def test_finished_run_is_not_overwritten(full_run):
    with pytest.raises(ValueError, match="already holds a finished run"):
        run_main(*full_run.args)


def test_push_to_hub_uploads_the_regression_card(data_csv, workdir, monkeypatch):
    uploads: list[str] = []

    class FakeHub:  # stands in for huggingface_hub.HfApi: no network in tests
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=f"tester/{repo_id}")

        def upload_folder(self, *, folder_path, **kwargs):
            card = Path(folder_path) / "README.md"
            uploads.append(card.read_text() if card.is_file() else "")
            return types.SimpleNamespace(done=lambda: True)

    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHub)
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: True)  # the pre-run check asks too
    out = workdir / "pushed"
    start(data_csv, out, "--push_to_hub", "--hub_model_id", "molft-test", "--max_steps", 2,
          "--early_stopping_patience", 0)  # fmt: skip
    assert uploads and uploads[-1] == (out / "README.md").read_text()
    assert "# MoLFormer regression model" in uploads[-1]


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["random", "scaffold", "stratified"])
def test_split_method_runs_and_its_split_json_reloads(method, data_csv, workdir):
    out = workdir / f"split_{method}"
    start(data_csv, out, "--split", method, "--max_steps", 2, "--early_stopping_patience", 0)
    split = read_json(out / "split.json")
    assert split["method"] == method
    assert split["sizes"] == {"train": 128, "validation": 16, "test": 16}
    assert (out / "all_results.json").is_file()
    if method == "scaffold":  # no scaffold is shared by train and the held-out sets
        train = {murcko_scaffold(s) for s in split["smiles"]["train"]}
        assert not train & {
            murcko_scaffold(s) for s in split["smiles"]["validation"] + split["smiles"]["test"]
        }
    if method == "stratified":  # the test set covers every label decile
        labels = pd.read_csv(data_csv)["exp"].to_numpy()
        deciles = pd.qcut(labels, q=10, labels=False)
        assert len(set(deciles[split["indices"]["test"]])) == 10

    again = workdir / f"split_{method}_reused"
    log = start(data_csv, again, "--split_file", out / "split.json", "--split", "random", "--split_seed", 7,
                "--do_train", "false").log  # fmt: skip
    reused = read_json(again / "split.json")
    assert reused["method"] == method and reused["indices"] == split["indices"]
    assert f"Reusing the {method} split" in log
    test_rows = pd.read_csv(again / "predictions.csv").query("split == 'test'")
    assert sorted(test_rows["canonical_smiles"]) == sorted(split["smiles"]["test"])


def test_predefined_split_from_a_column(lipophilicity, workdir):
    frame = lipophilicity.iloc[:N_MOLECULES].copy()
    frame["fold"] = [
        "test" if i % 10 == 0 else "valid" if i % 10 == 1 else "train" for i in range(len(frame))
    ]
    out = workdir / "split_column"
    start(write_csv(frame, workdir / "folds.csv"), out, "--split_column", "fold", "--do_train", "false")
    split = read_json(out / "split.json")
    assert split["method"] == "predefined" and split["sizes"] == {"train": 128, "validation": 16, "test": 16}
    expected = [canonical_smiles(s) for s in frame.loc[frame["fold"] == "test", "smiles"]]
    assert split["smiles"]["test"] == expected


def test_predefined_split_from_an_index_file(data_csv, workdir):
    rows = {"train": list(range(20, 160)), "valid": list(range(10, 20)), "test": list(range(10))}
    index_file = workdir / "rows.json"
    index_file.write_text(json.dumps(rows))
    out = workdir / "split_index_file"
    start(data_csv, out, "--split", "predefined", "--split_file", index_file, "--do_train", "false")
    split = read_json(out / "split.json")
    assert split["indices"] == {"train": rows["train"], "validation": rows["valid"], "test": rows["test"]}


def test_presplit_files(lipophilicity, workdir):
    parts = {name: lipophilicity.iloc[a:b] for name, a, b in (("train", 0, 100), ("validation", 100, 115),
                                                               ("test", 115, 135))}  # fmt: skip
    files = {name: write_csv(part, workdir / f"presplit_{name}.csv") for name, part in parts.items()}
    out = workdir / "presplit"
    start(files["train"], out, "--validation_file", files["validation"], "--test_file", files["test"],
          "--do_train", "false")  # fmt: skip
    assert read_json(out / "split.json")["sizes"] == {"train": 100, "validation": 15, "test": 20}


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_strict_smiles_is_an_error(lipophilicity, workdir):
    frame = lipophilicity.iloc[:40].copy()
    frame.loc[3, "smiles"] = "C1CC"
    with pytest.raises(
        ValueError,
        match=r"1 SMILES could not be parsed by RDKit as written \(row 3: 'C1CC' \(RDKit cannot parse it\)\)",
    ):
        start(write_csv(frame, workdir / "strict.csv"), workdir / "strict", "--strict_smiles")


def test_missing_label_is_an_error(lipophilicity, workdir):
    frame = lipophilicity.iloc[:40].copy()
    frame.loc[7, "exp"] = np.nan
    with pytest.raises(ValueError, match=r"1 labels in column 'exp' are missing.*\(row 7: .*nan"):
        start(write_csv(frame, workdir / "nan_label.csv"), workdir / "nan_label")


def test_missing_columns_are_errors(lipophilicity, workdir):
    data = write_csv(lipophilicity.iloc[:40], workdir / "plain.csv")
    with pytest.raises(
        ValueError, match=r"label column 'pIC50' not found.*available columns: \['CMPD_CHEMBLID'"
    ):
        start(data, workdir / "no_label", "--label_column", "pIC50")
    renamed = write_csv(
        lipophilicity.iloc[:40].rename(columns={"smiles": "structure"}), workdir / "renamed.csv"
    )
    with pytest.raises(ValueError, match="No SMILES column found"):
        start(renamed, workdir / "no_smiles")


def test_empty_splits_are_errors(lipophilicity, workdir):
    frame = lipophilicity.iloc[:40].copy()
    frame["fold"] = ["valid" if i < 5 else "train" for i in range(len(frame))]
    with pytest.raises(ValueError, match="left the test set empty"):
        start(write_csv(frame, workdir / "no_test.csv"), workdir / "no_test", "--split_column", "fold")
    empty = write_csv(lipophilicity.iloc[:0], workdir / "empty_test.csv")
    with pytest.raises(ValueError, match=r"empty_test.csv\) \[test\] has no valid molecules \(0 rows read\)"):
        start(data_path := write_csv(lipophilicity.iloc[:30], workdir / "tr.csv"), workdir / "empty_file",
              "--validation_file", data_path, "--test_file", empty)  # fmt: skip


def test_bad_weights_name_their_file_rows(lipophilicity, data_csv, workdir):
    extra = pd.DataFrame(
        {"SMILES": lipophilicity["smiles"].iloc[170:174], "Label": 1.0, "w": [1.0, 0.5, np.nan, 2]}
    )
    path = write_csv(extra, workdir / "bad_weights.csv")
    with pytest.raises(ValueError, match=r"weight column 'w' is missing or not numeric at rows \[2\]"):
        start(data_csv, workdir / "bad_weights", "--extra_train_file", path, "--extra_train_weights", "w")
    write_csv(extra.assign(w=[1.0, -0.5, 1.0, 2.0]), path)
    with pytest.raises(ValueError, match=r"weight column 'w' is negative at rows \[1\]"):
        start(data_csv, workdir / "bad_weights", "--extra_train_file", path, "--extra_train_weights", "w")


def test_split_json_of_other_data_is_an_error(full_run, lipophilicity, workdir):
    other = write_csv(lipophilicity.iloc[10:170], workdir / "other_160.csv")
    with pytest.raises(ValueError, match="was made for a different dataset"):
        start(other, workdir / "wrong_split", "--split_file", full_run.path / "split.json")


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--predict_file", "missing.csv"], FileNotFoundError, "--predict_file missing.csv does not exist"),
        (
            ["--extra_train_weights", "w"],
            ValueError,
            "names a column of --extra_train_file, which is not given",
        ),
        (["--peft", "prefix"], ValueError, "--peft must be one of"),
        (["--target_scaling", "log"], ValueError, "--target_scaling must be one of"),
        (["--hp_search", "optuna", "--n_trials", "0"], ValueError, "--n_trials must be at least 1"),
        (["--hp_search", "optuna", "--do_train", "false"], ValueError, "add --do_train"),
        (["--max_eval_samples", "0"], ValueError, "--max_eval_samples must be at least 1"),
    ],
)
def test_bad_options_fail_before_any_work(extra, error, message, data_csv, workdir):
    with pytest.raises(error, match=message):
        start(data_csv, workdir / "never_written", *extra)
    assert not (workdir / "never_written").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_ray_search_without_ray_is_a_clear_error(data_csv, workdir):
    with pytest.raises(ImportError, match=r"pip install 'ray\[tune\]'"):
        start(data_csv, workdir / "ray", "--hp_search", "ray")


# ----------------------------------------------------------------------------------------------------------
# External molecules and loss weights
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extra_runs(lipophilicity, data_csv, workdir) -> dict[str, Run]:
    """Four runs that differ only in their external molecules and weights, with every source of randomness
    that depends on the batch size switched off (dropout, feature-map redraws) and one batch per epoch."""
    data = lipophilicity.iloc[:N_MOLECULES]
    prepared = prepare_molecules(data, "smiles", "exp", source="test data")
    test_smiles = prepared["smiles"].iloc[make_split(prepared, "random", seed=42).test].tolist()
    new = lipophilicity.iloc[170:176]
    extra = pd.DataFrame({
        "SMILES": [*new["smiles"], *test_smiles[:2], "C1CC"],
        "Label": [*new["exp"], 0.0, 0.0, 1.0],
        "ones": 1.0,
    })  # fmt: skip
    left_out = int(np.argmin([len(s) for s in new["smiles"]]))  # short: padding stays the same without it
    extra["zero_one"] = [0.0 if i == left_out else 1.0 for i in range(len(extra))]
    files = {
        "extra": write_csv(extra, workdir / "extra.csv"),
        "without": write_csv(extra.drop(index=left_out), workdir / "extra_without.csv"),
    }
    corpus = [c for c in map(canonical_smiles, [*data["smiles"], *extra["SMILES"]]) if c]
    MolformerTokenizer.from_smiles(corpus).save_pretrained(workdir / "extra_tokenizer")
    common = [
        "--tokenizer_name", workdir / "extra_tokenizer", "--hidden_dropout_prob", 0, "--embedding_dropout_prob", 0,
        "--classifier_dropout_prob", 0, "--feature_map_redraw", "never", "--length_grouping", "false",
        "--per_device_train_batch_size", 512, "--num_train_epochs", 3, "--learning_rate", "1e-2",
        "--early_stopping_patience", 0,
    ]  # fmt: skip
    variants = {
        "plain": ["--extra_train_file", files["extra"]],
        "ones": ["--extra_train_file", files["extra"], "--extra_train_weights", "ones"],
        "zero": ["--extra_train_file", files["extra"], "--extra_train_weights", "zero_one"],
        "without": ["--extra_train_file", files["without"]],
    }
    runs = {
        name: start(data_csv, workdir / f"extra_{name}", *common, *args) for name, args in variants.items()
    }
    runs["plain"].captured["new_smiles"] = new["smiles"].tolist()
    runs["plain"].captured["left_out"] = new["smiles"].iloc[left_out]
    return runs


def test_extra_molecules_join_train_only_with_provenance(extra_runs):
    run = extra_runs["plain"]
    predictions = run.predictions()
    extra_rows = predictions[predictions["source"] == "extra:extra.csv"]
    assert sorted(extra_rows["smiles"]) == sorted(run.captured["new_smiles"])
    assert set(extra_rows["split"]) == {"train"}
    assert set(predictions.loc[predictions["split"] != "train", "source"]) == {"dataset"}
    assert predictions["split"].value_counts().to_dict() == {"train": 128 + 6, "validation": 16, "test": 16}
    assert run.results()["n_extra_train"] == 6


def test_extra_molecules_in_test_are_dropped_and_reported(extra_runs):
    run = extra_runs["plain"]
    report = read_json(run.path / "split.json")["extra"]
    assert report["n_rows"] == 9 and report["n_valid"] == 8 and report["n_added"] == 6
    assert report["overlap_with_heldout"] == {"validation": 0, "test": 2, "dropped": 2}
    assert "2 of 8 molecules also occur in held-out splits (validation=0, test=2) and are dropped" in run.log
    assert "row 8: 'C1CC'" in run.log  # the invalid extra SMILES is reported too


def test_equal_weights_reproduce_the_unweighted_run(extra_runs):
    plain, ones = extra_runs["plain"].results(), extra_runs["ones"].results()
    for name in ("train_loss", "eval_rmse", "test_rmse", "test_mae"):
        assert ones[name] == plain[name], name
    assert (
        extra_runs["ones"].predictions()["prediction"].tolist()
        == extra_runs["plain"].predictions()["prediction"].tolist()
    )


def test_zero_weight_equals_leaving_the_molecule_out(extra_runs):
    zero, without, plain = (extra_runs[k].predictions() for k in ("zero", "without", "plain"))
    weights = zero.loc[zero["source"] != "dataset"].set_index("smiles")["sample_weight"]
    assert weights[extra_runs["plain"].captured["left_out"]] == 0.0 and weights.sum() == 5.0
    for split in ("validation", "test"):
        np.testing.assert_allclose(
            zero.loc[zero["split"] == split, "prediction"],
            without.loc[without["split"] == split, "prediction"],
            atol=1e-5,
        )
    for name in ("eval_rmse", "test_rmse"):
        assert extra_runs["zero"].results()[name] == pytest.approx(
            extra_runs["without"].results()[name], abs=1e-5
        )
    # and the molecule did matter: with weight 1 the model differs
    assert np.abs(plain.query("split == 'test'")["prediction"].to_numpy()
                  - zero.query("split == 'test'")["prediction"].to_numpy()).max() > 1e-4  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Target scaling
# ----------------------------------------------------------------------------------------------------------


def test_training_split_predictions_can_be_left_out(lipophilicity, workdir):
    """LDS retrainings read one split's predictions; predicting the training split cost them about half their time."""
    out = workdir / "no_train_predictions"
    start(write_csv(lipophilicity.iloc[:N_MOLECULES], workdir / "small.csv"), out, "--max_steps", 1,
          "--predict_train_split", "false")  # fmt: skip
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions["split"]) == {"validation", "test"} and predictions["prediction"].notna().all()


@pytest.mark.parametrize("scaling", ["standard", "minmax"])
def test_predictions_stay_in_label_units(scaling, lipophilicity, workdir):
    shifted = lipophilicity.iloc[:N_MOLECULES].assign(exp=lambda f: f["exp"] + 100.0)
    out = workdir / f"scaling_{scaling}"
    start(
        write_csv(shifted, workdir / "shifted.csv"), out, "--target_scaling", scaling, "--num_train_epochs", 2
    )
    predictions = pd.read_csv(out / "predictions.csv")
    train = predictions.query("split == 'train'")["label"]
    config = read_json(out / "config.json")
    expected = (train.mean(), train.std(ddof=0)) if scaling == "standard" else (train.min(), np.ptp(train))
    assert (config["target_mean"], config["target_std"]) == pytest.approx(expected)
    test = predictions.query("split == 'test'")
    assert test["label"].between(97, 106).all()
    assert test["prediction"].between(test["label"].min() - 2, test["label"].max() + 2).all()
    assert read_json(out / "all_results.json")["test_rmse"] < 2.5  # predicting 0 would give ~102


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_large_batch(data_csv, workdir):
    """2 x 8 molecules with accumulation is one batch of 16: the Trainer, not the model, averages the loss.

    Without the model's `accepts_loss_kwargs = False` the Trainer skips that averaging (forward takes
    **kwargs), so accumulated gradients come out twice as large; plain SGD without clipping shows it.
    """
    exact = [
        "--optim", "sgd", "--learning_rate", "0.05", "--max_grad_norm", 0, "--max_steps", 4, "--length_grouping",
        "false", "--hidden_dropout_prob", 0, "--embedding_dropout_prob", 0, "--classifier_dropout_prob", 0,
        "--feature_map_redraw", "never", "--early_stopping_patience", 0,
    ]  # fmt: skip
    one = start(data_csv, workdir / "batch16", *exact, "--per_device_train_batch_size", 16)
    two = start(data_csv, workdir / "batch8x2", *exact, "--per_device_train_batch_size", 8,
                "--gradient_accumulation_steps", 2)  # fmt: skip
    np.testing.assert_allclose(two.predictions()["prediction"], one.predictions()["prediction"], atol=1e-5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MolformerForRegression, "accepts_loss_kwargs", True)
        unscaled = start(data_csv, workdir / "batch8x2_unscaled", *exact, "--per_device_train_batch_size", 8,
                         "--gradient_accumulation_steps", 2)  # fmt: skip
    assert np.abs(unscaled.predictions()["prediction"] - one.predictions()["prediction"]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Hyperparameter search
# ----------------------------------------------------------------------------------------------------------


SEARCH_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "hidden_dropout_prob": {"type": "float", "low": 0.0, "high": 0.2},
    "per_device_train_batch_size": {"type": "categorical", "choices": [16, 32]},
    "lora_r": {"type": "categorical", "choices": [2, 4]},
    "lora_alpha": {"type": "int", "low": 4, "high": 8},
}


@pytest.fixture(scope="module")
def hp_search_run(data_csv, workdir) -> Run:
    space = workdir / "space.yaml"
    space.write_text(yaml.safe_dump(SEARCH_SPACE))
    return start(data_csv, workdir / "search", "--peft", "lora", "--hp_search", "optuna", "--n_trials", 2,
                 "--hp_space", space)  # fmt: skip


def test_hp_search_uses_validation_only(hp_search_run):
    results = read_json(hp_search_run.path / "hp_search.json")
    assert results["backend"] == "optuna" and len(results["trials"]) == 2
    assert all(t["state"] == "COMPLETE" and set(t["params"]) == set(SEARCH_SPACE) for t in results["trials"])
    assert results["best_validation_rmse"] == min(t["validation_rmse"] for t in results["trials"])
    text = (hp_search_run.path / "hp_search.json").read_text()
    assert "test_" not in text and not (hp_search_run.path / "all_results.json").exists()
    assert not (hp_search_run.path / "predictions.csv").exists()


def test_hp_search_best_config_reruns(hp_search_run, workdir):
    best = read_json(hp_search_run.path / "hp_search.json")["best_params"]
    config = yaml.safe_load((hp_search_run.path / "best_config.yaml").read_text())
    assert "hp_search" not in config and {k: config[k] for k in best} == best
    assert config["split_file"] == str(hp_search_run.path / "split.json")
    out = workdir / "search_best"
    run_main(hp_search_run.path / "best_config.yaml", "--output_dir", out)
    resolved = read_json(out / "run_config.json")
    assert resolved["training"]["learning_rate"] == best["learning_rate"]
    assert resolved["training"]["per_device_train_batch_size"] == best["per_device_train_batch_size"]
    assert (
        resolved["peft"]["lora_r"] == best["lora_r"] and resolved["peft"]["lora_alpha"] == best["lora_alpha"]
    )
    assert resolved["model"]["hidden_dropout_prob"] == best["hidden_dropout_prob"]
    assert read_json(out / "split.json")["indices"] == read_json(hp_search_run.path / "split.json")["indices"]
    # same seed, same hyperparameters, same molecules: the rerun reaches the best trial's validation RMSE
    results = read_json(out / "all_results.json")
    best_rmse = read_json(hp_search_run.path / "hp_search.json")["best_validation_rmse"]
    assert results["eval_rmse"] == pytest.approx(best_rmse, abs=1e-6)
    assert np.isfinite(results["test_rmse"])


# ----------------------------------------------------------------------------------------------------------
# What the console says, the result files users expect, failing fast
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def console_run(data_csv, workdir) -> Run:
    """A run with the script's own logging set-up (INFO on the main process), its console output kept,
    evaluation and test sets capped, and the thread choice recorded."""
    out, console, threads = workdir / "console", io.StringIO(), []

    def spy_threads(n_parameters: int, on_cpu: bool):
        threads.append({"n_parameters": n_parameters, "on_cpu": on_cpu})
        return real_choice(n_parameters, on_cpu)

    real_choice = run_regression.choose_cpu_threads
    args = tiny_args(data_csv, out, "--max_eval_samples", 8, "--max_predict_samples", 4)
    root = logging.getLogger()
    previous = root.level, list(root.handlers), transformers.utils.logging.get_verbosity()
    previous_datasets = datasets.utils.logging.get_verbosity()
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(console):
            patch.setattr(sys, "argv", ["run_regression.py", *map(str, args)])
            patch.setattr(run_regression, "choose_cpu_threads", spy_threads)
            main()
    finally:  # the script's logging set-up replaced the root handlers and raised the library levels
        root.handlers[:] = previous[1]
        root.setLevel(previous[0])
        transformers.utils.logging.set_verbosity(previous[2])
        datasets.utils.logging.set_verbosity(previous_datasets)
    return Run(out, console.getvalue(), [str(a) for a in args], {"threads": threads})


def test_console_says_what_happened_at_info_by_default(console_run):
    log = console_run.log
    results = console_run.results()
    expected = [
        f"Trainable parameters (none): {results['total_params']:,} of {results['total_params']:,} (100.0000%)",
        "SMILES column 'smiles', label column 'exp'",
        "160 valid molecules (0 invalid SMILES dropped)",
        "Using the first 8 of the 16 validation molecules.",
        "Using the first 4 of the 16 test molecules.",
        "Best model restored: checkpoint-",
        f"Outputs are in {console_run.path.resolve()}: metrics in all_results.json",
    ]
    for message in expected:
        assert message in log, message
    assert " - INFO - run_regression - " in log  # the examples' format, on stdout


def test_trainer_result_files_sit_beside_all_results(console_run):
    results = console_run.results()
    for split, key in (("train", "train_loss"), ("eval", "eval_rmse"), ("test", "test_rmse")):
        assert read_json(console_run.path / f"{split}_results.json")[key] == results[key], split


def test_eval_and_predict_caps_keep_the_first_molecules(console_run):
    predictions = console_run.predictions()
    assert predictions["split"].value_counts().to_dict() == {"train": 128, "validation": 8, "test": 4}
    split = read_json(console_run.path / "split.json")  # the split itself is the full one
    assert len(split["indices"]["validation"]) == 16 and len(split["indices"]["test"]) == 16


def test_threads_are_chosen_for_the_model_on_the_cpu(console_run):
    assert console_run.captured["threads"] == [
        {"n_parameters": console_run.results()["total_params"], "on_cpu": True}
    ]


def test_offline_run_fails_in_seconds_with_one_message_and_no_files(tmp_path, tmp_path_factory):
    """The README's first command with the default model, offline: one line that says what to do, nothing written."""
    cache = tmp_path_factory.mktemp(
        "empty_hf_cache"
    )  # the model is not in it, whatever this machine has cached
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_regression.py"), "--peft", "lora", "--output_dir", str(tmp_path / "x")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    wall = time.perf_counter() - started
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert wall < 30
    output = done.stdout + done.stderr
    assert "ibm/MoLFormer-XL-both-10pct" in output and "configs/regression_small.yaml" in output
    assert "Traceback" not in output
    assert done.stderr.startswith("run_regression.py: error: Cannot start this run:")
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no output_dir, no split.json, nothing in the working directory


def test_missing_report_backend_fails_before_any_work(data_csv, workdir, monkeypatch):
    monkeypatch.setitem(preflight.REPORT_BACKENDS, "tensorboard", ("no_such_module_for_molft_tests",))
    started = time.perf_counter()
    with pytest.raises(
        preflight.PreflightError,
        match=r"--report_to tensorboard: not installed \(pip install '\.\[tracking\]'",
    ):
        start(data_csv, workdir / "tensorboard", "--report_to", "tensorboard")
    assert time.perf_counter() - started < 10
    assert not (workdir / "tensorboard").exists()


def test_help_opens_with_a_description_and_examples():
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_regression.py"), "--help"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "usage: run_regression.py [CONFIG_FILE] [--option VALUE ...]"
    assert lines[2].startswith("Fine-tune MoLFormer for molecular property regression")
    assert "    python run_regression.py configs/regression_small.yaml" in lines[:12]  # kept as written
    assert "--max_eval_samples" in done.stdout and "--max_predict_samples" in done.stdout


# ----------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_launch_with_two_processes(data_csv, tmp_path):
    out = tmp_path / "ddp"
    done = launch_two_processes(
        "run_regression.py",
        *tiny_args(data_csv, out, "--max_steps", 4, "--eval_strategy", "steps", "--eval_steps", 2,
                   "--log_level", "info", "--log_level_replica", "info"),
    )  # fmt: skip
    results = read_json(out / "all_results.json")
    assert np.isfinite(results["test_rmse"]) and results["train_samples"] == 128
    predictions = pd.read_csv(out / "predictions.csv")  # gathered once, no padding duplicates
    assert predictions["split"].value_counts().to_dict() == {"train": 128, "validation": 16, "test": 16}
    assert predictions["canonical_smiles"].is_unique
    model, tokenizer = MolformerForRegression.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    expected = model_predictions(model, tokenizer, predictions["canonical_smiles"].tolist())
    np.testing.assert_allclose(predictions["prediction"], expected, atol=1e-5)  # gathered in dataset order
    assert read_json(out / "run_complete.json")["test_rmse"] == results["test_rmse"]
    assert not list(out.rglob("*.tmp"))  # no write was left half done
    log = done.stdout + done.stderr  # both ranks log at INFO (--log_level_replica info), only rank 0 writes
    assert log.count("Trainable parameters (none)") == 2
    assert "Total train batch size (w. parallel, distributed & accumulation) = 32" in log  # 2 x 16
    assert log.count("parity_test.png") == 1 and log.count("loss_curves.png") == 1


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_and_lora(data_csv, tmp_path):
    """DDP with a PEFT adapter: both ranks train the same adapter, only rank 0 saves it (and the base)."""
    out = tmp_path / "ddp_lora"
    done = launch_two_processes(
        "run_regression.py",
        *tiny_args(data_csv, out, "--peft", "lora", "--max_steps", 4, "--eval_strategy", "steps",
                   "--eval_steps", 2, "--log_level", "info", "--log_level_replica", "info"),
    )  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file() and (out / "base_model" / "config.json").is_file()
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["split"].value_counts().to_dict() == {"train": 128, "validation": 16, "test": 16}
    model, tokenizer = load_regression_checkpoint(out), AutoTokenizer.from_pretrained(out)
    expected = model_predictions(model, tokenizer, predictions["canonical_smiles"].tolist())
    # the adapter rank 0 saved is the one both ranks trained: it reproduces the gathered predictions
    np.testing.assert_allclose(predictions["prediction"], expected, atol=1e-5)
    log = done.stdout + done.stderr
    assert log.count("Trainable parameters (lora)") == 2  # both ranks wrapped the model
    assert "Total train batch size (w. parallel, distributed & accumulation) = 32" in log
    assert log.count("parity_test.png") == 1 and not list(out.rglob("*.tmp"))


def test_torch_compile_option_trains_and_saves_the_plain_model(data_csv, workdir):
    """--torch_compile (dynamo's eager backend here: the capture without code generation) over length-grouped
    batches of changing shape; the checkpoint holds the model's own names and reproduces the predictions."""
    run = start(
        data_csv, workdir / "compiled", "--max_steps", 4, "--torch_compile", "true",
        "--torch_compile_backend", "eager",
    )  # fmt: skip
    assert not any("_orig_mod" in name for name in load_file(run.path / "model.safetensors"))
    predictions = run.predictions()
    model = MolformerForRegression.from_pretrained(run.path)
    tokenizer = AutoTokenizer.from_pretrained(run.path)
    expected = model_predictions(model, tokenizer, predictions["canonical_smiles"].tolist())
    np.testing.assert_allclose(predictions["prediction"], expected, atol=1e-5)
    assert np.isfinite(run.results()["test_rmse"])
