"""molft.train_order: one training order for runs that differ only in their extra molecules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_RUN, head_copy, run_script
from transformers import TrainingArguments

from molft.io import read_json
from molft.train_order import fixed_training_order
from molft.trainer import configure_training


def training_frame(split: int, extra: list[str]) -> pd.DataFrame:
    """`split` molecules of the split (C, CC, CCC, ...) followed by extra ones, as prepare_data builds it."""
    smiles = ["C" * (i + 1) for i in range(split)] + extra
    sources = ["dataset"] * split + ["extra:pool.csv"] * len(extra)
    return pd.DataFrame({"canonical_smiles": smiles, "source": sources, "label": np.arange(len(smiles))})


def test_the_split_keeps_its_order_and_each_extra_molecule_its_place():
    alone = fixed_training_order(training_frame(40, []), seed=3)["canonical_smiles"].tolist()
    first = fixed_training_order(training_frame(40, ["N", "O", "F"]), seed=3)["canonical_smiles"].tolist()
    second = fixed_training_order(training_frame(40, ["F", "Cl", "N"]), seed=3)["canonical_smiles"].tolist()
    for order in (first, second):
        assert [s for s in order if s.startswith("C") and s != "Cl"] == alone
    for shared in ("N", "F"):  # the same split molecule comes just before it in both
        assert first[first.index(shared) - 1] == second[second.index(shared) - 1]
    assert sorted(alone) == sorted(training_frame(40, [])["canonical_smiles"])  # a permutation, nothing lost
    assert alone != training_frame(40, [])["canonical_smiles"].tolist()


def test_the_seed_draws_the_order():
    frame = training_frame(40, ["N", "O"])
    orders = {seed: fixed_training_order(frame, seed)["canonical_smiles"].tolist() for seed in (1, 1, 2)}
    assert len(orders) == 2 and orders[1] != orders[2]
    assert fixed_training_order(frame, 1)["canonical_smiles"].tolist() == orders[1]


@pytest.mark.parametrize(("fixed", "expected"), [(True, "sequential"), (False, "group_by_length")])
def test_a_fixed_order_trains_in_the_frames_order(tmp_path, fixed, expected):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    configure_training(args, length_grouping=True, early_stopping_patience=0, auto_mixed_precision=False,
                       fixed_order=fixed)  # fmt: skip
    assert args.train_sampling_strategy == expected


def test_the_extra_files_row_order_no_longer_changes_the_run(data_dir, tmp_path):
    """With --train_order fixed an extra molecule's place comes from its SMILES, not from its file row: the
    same molecules in reverse order train the same model, bit for bit, which the random order does not."""
    train_file = head_copy(data_dir / "lipophilicity.csv", tmp_path / "train.csv", 120)
    pool = pd.read_csv(data_dir / "external_300.csv", nrows=12)
    forward = tmp_path / "extra.csv"
    pool.to_csv(forward, index=False)
    backward = tmp_path / "extra_reversed.csv"
    pool.iloc[::-1].to_csv(backward, index=False)
    # one whole epoch (14 batches of 8 over 96 + 12 molecules), so every extra molecule is trained on
    common = ["--train_file", train_file, "--max_steps", "14", "--per_device_train_batch_size", "8",
              "--extra_smiles_column", "SMILES", "--extra_label_column", "Label", "--length_grouping", "false"]  # fmt: skip
    predictions = {}
    for order in ("fixed", "random"):
        for name, extra in (("forward", forward), ("backward", backward)):
            out = tmp_path / f"{order}_{name}"
            run_script("run_regression.py", *TINY_RUN, *common, "--extra_train_file", extra,
                       "--train_order", order, "--output_dir", out)  # fmt: skip
            frame = pd.read_csv(out / "predictions.csv")
            predictions[order, name] = frame[frame["split"] == "test"]["prediction"].to_numpy()
        record = read_json(tmp_path / f"{order}_forward" / "run_config.json")
        assert record["data"]["train_order"] == order
    np.testing.assert_array_equal(predictions["fixed", "forward"], predictions["fixed", "backward"])
    assert not np.array_equal(predictions["random", "forward"], predictions["random", "backward"])
