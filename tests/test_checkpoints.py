"""molft.checkpoints: where a run resumes, incomplete checkpoints skipped, unreadable weights named; and
run_regression.main() over a checkpoint cut short, a finished run, and runs refused before any output."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from helpers import TINY_CONFIG, head_copy, train_tiny_regression
from safetensors.torch import save_file

from molft import cli
from molft.checkpoints import (
    check_weights,
    checkpoint_problem,
    detect_last_checkpoint,
    weight_file_problem,
    weights_problem,
)
from molft.files import DONE_MARKER, TRAINER_STATE_FILE
from molft.io import read_json


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file short, as a kill during its write leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def make_checkpoint(folder: Path, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE_FILE).write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    if weights:
        save_file({"w": torch.arange(64, dtype=torch.float32)}, folder / "model.safetensors")
        torch.save({"state": torch.zeros(64)}, folder / "optimizer.pt")
    return folder


# ----------------------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------------------


def test_weight_file_problems_name_the_file(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-1")
    weights, optimizer = checkpoint / "model.safetensors", checkpoint / "optimizer.pt"
    assert weight_file_problem(weights) is None and weight_file_problem(optimizer) is None
    assert weights_problem(checkpoint) is None and checkpoint_problem(checkpoint) is None
    truncate(optimizer)
    assert weight_file_problem(optimizer).startswith(
        f"{optimizer} cannot be read, it is truncated or corrupt"
    )
    truncate(weights)
    problem = weight_file_problem(weights)
    assert problem.startswith(f"{weights} cannot be read") and "SafetensorError" in problem
    assert weights_problem(checkpoint) == problem  # the first bad file, in name order
    weights.write_bytes(b"")
    assert weight_file_problem(weights) == f"{weights} is empty"


def test_legacy_torch_file_is_left_to_the_loader(tmp_path):
    legacy = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    assert weight_file_problem(legacy) is None


def test_missing_shard_is_named(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weights_problem(tmp_path) == (
        f"{tmp_path / 'model.safetensors.index.json'} lists weight files that are missing: "
        "model-00002-of-00002.safetensors"
    )


def test_check_weights_raises_naming_the_file_and_leaves_hub_ids_alone(tmp_path):
    check_weights(None)
    check_weights("ibm/MoLFormer-XL-both-10pct")  # not a folder: the loader's business
    checkpoint = make_checkpoint(tmp_path / "checkpoint-1")
    check_weights(checkpoint)
    truncate(checkpoint / "model.safetensors")
    with pytest.raises(
        ValueError, match=rf"Cannot load the model in {checkpoint}: {checkpoint}/model.safetensors"
    ):
        check_weights(checkpoint)


# ----------------------------------------------------------------------------------------------------------
# detect_last_checkpoint: the one behaviour of run_regression.py and run_mlm.py
# ----------------------------------------------------------------------------------------------------------


def test_detect_last_checkpoint(tmp_path):
    run = tmp_path / "run"

    def detect(**kwargs):
        return detect_last_checkpoint(run, **{"do_train": True, "overwrite": False, **kwargs})

    assert detect() is None  # no folder yet
    run.mkdir()
    assert detect() is None  # an empty folder is a fresh start
    # what a run interrupted before its first checkpoint leaves: a fresh start loses nothing
    (run / "split.json").write_text("{}")
    (run / "base_model").mkdir()
    (run / "log.txt").write_text("")
    (run / ".all_results.json.x1.tmp").write_text("")
    assert detect() is None
    (run / "notes.txt").write_text("someone else's")
    with pytest.raises(
        ValueError, match=r"not empty and holds no checkpoint to resume \(it holds notes.txt\)"
    ):
        detect()
    for step in (2, 4):
        make_checkpoint(run / f"checkpoint-{step}")
    assert detect() == str(run / "checkpoint-4")
    assert detect(do_train=False) is None  # evaluation only never resumes

    marker = run / DONE_MARKER
    marker.write_text("{}")
    for do_train in (True, False):  # a finished run is never written into, by training or prediction
        with pytest.raises(ValueError, match="already holds a finished run .* --model_name_or_path"):
            detect(do_train=do_train)
    assert detect(overwrite=True, process_index=1) is None and marker.is_file()  # only rank 0 removes it
    assert detect(overwrite=True) is None and not marker.exists()


@pytest.mark.parametrize("damage", ["no_trainer_state", "truncated_trainer_state", "truncated_weights"])
def test_incomplete_checkpoint_is_skipped_with_a_warning(damage, tmp_path, caplog):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint-4")
    newest = make_checkpoint(run / "checkpoint-8")
    {
        "no_trainer_state": lambda: (newest / TRAINER_STATE_FILE).unlink(),
        "truncated_trainer_state": lambda: truncate(newest / TRAINER_STATE_FILE),
        "truncated_weights": lambda: truncate(newest / "model.safetensors"),
    }[damage]()
    with caplog.at_level(logging.WARNING, logger="molft.checkpoints"):
        assert detect_last_checkpoint(run, do_train=True, overwrite=False) == str(run / "checkpoint-4")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = {
        "no_trainer_state": "it has no trainer_state.json (its save was interrupted)",
        "truncated_trainer_state": "its trainer_state.json is truncated or corrupt",
        "truncated_weights": f"{newest / 'model.safetensors'} cannot be read, it is truncated or corrupt",
    }[damage]
    assert warning.startswith(f"Skipping incomplete checkpoint {newest}: {expected}")


def test_only_incomplete_checkpoints_start_afresh(tmp_path, caplog):
    run = tmp_path / "run"
    (make_checkpoint(run / "checkpoint-4") / TRAINER_STATE_FILE).unlink()
    with caplog.at_level(logging.INFO, logger="molft.checkpoints"):
        assert detect_last_checkpoint(run, do_train=True, overwrite=False) is None
    assert f"Skipping incomplete checkpoint {run / 'checkpoint-4'}" in caplog.text
    assert f"{run} holds no complete checkpoint: starting afresh." in caplog.text


def test_a_broken_resume_from_checkpoint_is_named(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-3")
    truncate(checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match=rf"Cannot resume from {checkpoint}: {checkpoint}/model.safetensors"):
        detect_last_checkpoint(
            tmp_path / "run", do_train=True, overwrite=False, resume_from_checkpoint=str(checkpoint)
        )
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .*nowhere does not exist"):
        detect_last_checkpoint(
            tmp_path / "run", do_train=True, overwrite=False, resume_from_checkpoint=str(tmp_path / "nowhere")
        )


# ----------------------------------------------------------------------------------------------------------
# run_regression.main(): a kill during a checkpoint save, a finished run, refused runs
# ----------------------------------------------------------------------------------------------------------


def run_main(*argv: str | Path) -> None:
    """run_regression.main() with `argv`, keeping pytest's log capture (the script's set-up would remove it)."""
    from run_regression import main

    with (
        patch.object(sys, "argv", ["run_regression.py", *map(str, argv)]),
        patch.object(cli, "setup_logging"),
    ):
        main()


@pytest.fixture(scope="module")
def data_csv(data_dir, tmp_path_factory) -> Path:
    return head_copy(
        data_dir / "lipophilicity.csv", tmp_path_factory.mktemp("data") / "lipophilicity.csv", 160
    )


@pytest.fixture(scope="module")
def finished_run(data_csv, tmp_path_factory) -> tuple[Path, list[str]]:
    """2 epochs, a checkpoint per epoch (4 steps each), through run_regression.main()."""
    extra = ["--num_train_epochs", "2", "--save_strategy", "epoch", "--eval_strategy", "epoch"]
    with patch.object(cli, "setup_logging"):
        run = train_tiny_regression(data_csv, tmp_path_factory.mktemp("finished") / "run", *extra)
    return run, extra


def rerun_args(data_csv: Path, output_dir: Path, *extra: str) -> list[str]:
    """The arguments of helpers.train_tiny_regression, for a rerun into `output_dir`."""
    return [
        "--train_file", data_csv, "--config_name", TINY_CONFIG, "--output_dir", output_dir, "--do_train",
        "--do_eval", "--num_train_epochs", "1", "--per_device_train_batch_size", "32", "--report_to", "none",
        "--disable_tqdm", "true", "--use_cpu", "true", "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated_weights", "no_trainer_state"])
def test_rerun_after_a_kill_during_checkpoint_save_completes(
    damage, finished_run, data_csv, tmp_path, caplog
):
    run, extra = finished_run
    state = read_json(run / "trainer_state.json")
    assert state["global_step"] == 8 and (run / "checkpoint-4").is_dir() and (run / "checkpoint-8").is_dir()
    killed = shutil.copytree(run, tmp_path / "killed")
    (killed / DONE_MARKER).unlink()
    newest = killed / "checkpoint-8"
    if damage == "truncated_weights":
        truncate(newest / "model.safetensors")
    else:
        (newest / TRAINER_STATE_FILE).unlink()
    caplog.set_level(logging.INFO)
    run_main(*rerun_args(data_csv, killed, *extra))
    assert f"Skipping incomplete checkpoint {newest}: " in caplog.text
    assert f"Resuming from {killed / 'checkpoint-4'}" in caplog.text
    assert (killed / DONE_MARKER).is_file() and checkpoint_problem(newest) is None  # saved again, whole
    assert read_json(killed / "trainer_state.json")["global_step"] == 8
    original, resumed = read_json(run / "all_results.json"), read_json(killed / "all_results.json")
    for name in ("eval_rmse", "test_rmse"):  # the second epoch, redone from the first one's checkpoint
        assert resumed[name] == pytest.approx(original[name], abs=1e-6)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    "what", [["--do_predict", "--do_eval", "false"], ["--do_eval"]], ids=["predict", "evaluate"]
)
def test_finished_run_is_never_overwritten_by_prediction_or_evaluation(
    what, finished_run, data_csv, tmp_path
):
    run, _ = finished_run
    before = snapshot(run)
    with pytest.raises(
        ValueError, match=rf"already holds a finished run .* --model_name_or_path {run} to evaluate"
    ):
        run_main(*rerun_args(data_csv, run), "--do_train", "false", *what)
    assert snapshot(run) == before  # byte for byte


def test_the_suggested_output_dir_evaluates_the_finished_model(finished_run, data_csv, tmp_path):
    run, _ = finished_run
    elsewhere = tmp_path / "evaluated"
    run_main(*rerun_args(data_csv, elsewhere), "--do_train", "false", "--model_name_or_path", run)
    for name in ("eval_rmse", "test_rmse"):
        assert read_json(elsewhere / "all_results.json")[name] == pytest.approx(
            read_json(run / "all_results.json")[name], abs=1e-6
        )


def test_corrupt_model_is_named_and_nothing_is_written(finished_run, data_csv, tmp_path):
    run, _ = finished_run
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt, ignore=shutil.ignore_patterns("checkpoint-*"))
    truncate(corrupt / "model.safetensors")
    output_dir = tmp_path / "never_written"
    with pytest.raises(
        ValueError, match=rf"Cannot load the model in {corrupt}: {corrupt}/model.safetensors cannot"
    ):
        run_main(*rerun_args(data_csv, output_dir), "--do_train", "false", "--model_name_or_path", corrupt)
    assert not output_dir.exists()


def test_run_refused_after_data_preparation_leaves_no_folder(data_csv, tmp_path):
    """The model's config is checked after the data is read; split.json only comes after every such check."""
    output_dir = tmp_path / "never_written"
    with pytest.raises(ValueError, match="no_such_key"):
        run_main(*rerun_args(data_csv, output_dir), "--config_overrides", "no_such_key=3")
    assert not output_dir.exists()
