"""molft.selection.output: manifests, selected.csv and the merged training set."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from molft.files import MANIFEST_FILE, MERGED_TRAIN_FILE, SELECTED_FILE
from molft.overlap import dataset_fingerprint
from molft.selection import (
    Selection,
    merge_selected_into_train,
    run_manifest,
    selection_manifest,
    write_selection,
)


def _pool_frame():
    return pd.DataFrame({"smiles": ["CCO", "c1ccccc1", "CCN"], "label": [1.0, 2.0, 3.0]})


def test_manifest_and_outputs_round_trip(tmp_path):
    frame = _pool_frame()
    selection = Selection(
        np.array([2, 0]), np.array([-0.5, 0.25]), "influence", {"mode": "top"}, seed=1, budget=2
    )
    fingerprint = dataset_fingerprint(frame["smiles"])
    manifest = selection_manifest(selection, "pool.csv", fingerprint)
    train = pd.DataFrame({"CMPD_CHEMBLID": ["a"], "exp": [0.5], "smiles": ["CC"]})
    merged = merge_selected_into_train(train, frame, selection, label_column="exp")
    paths = write_selection(tmp_path, frame, selection, manifest, merged)

    assert paths == {
        "selected": tmp_path / SELECTED_FILE,
        "manifest": tmp_path / MANIFEST_FILE,
        "merged_train": tmp_path / MERGED_TRAIN_FILE,
    }
    written = json.loads(paths["manifest"].read_text())
    assert written["indices"] == [2, 0] and written["scores"] == [-0.5, 0.25]
    assert (
        written["strategy"] == "influence" and written["seed"] == 1 and written["params"] == {"mode": "top"}
    )
    assert written["pool_sha256"] == fingerprint and written["pool_file"] == "pool.csv"
    chosen = pd.read_csv(paths["selected"])
    assert chosen.columns.tolist() == ["rank", "index", "smiles", "label", "score"]
    assert chosen["rank"].tolist() == [1, 2] and chosen["smiles"].tolist() == ["CCN", "CCO"]
    assert chosen["label"].tolist() == [3.0, 1.0]
    merged_back = pd.read_csv(paths["merged_train"])
    assert merged_back["smiles"].tolist() == ["CC", "CCN", "CCO"]
    assert merged_back["exp"].tolist() == [0.5, 3.0, 1.0]
    assert merged_back["source"].tolist() == ["train", "external", "external"]


def test_merge_handles_molecules_already_in_train():
    selection = Selection(np.array([0, 2]), None, "random", {}, seed=0)
    train = pd.DataFrame({"smiles": ["OCC"], "label": [9.0]})  # same molecule as pool index 0
    assert len(merge_selected_into_train(train, _pool_frame(), selection)) == 3
    dropped = merge_selected_into_train(train, _pool_frame(), selection, duplicates="drop")
    assert dropped["smiles"].tolist() == ["OCC", "CCN"]
    with pytest.raises(
        ValueError, match=r"1 chosen molecules are already in the training set \(pool indices \[0\]\)"
    ):
        merge_selected_into_train(train, _pool_frame(), selection, duplicates="error")


@dataclass
class _Group:
    option: int = 1


def test_run_manifest_records_what_the_run_was_given():
    frame = pd.DataFrame({"canonical_smiles": ["CCO", "CCN", "CCC"], "label": [1.0, 2.0, 3.0]})
    selection = Selection(np.array([1]), None, "random", {}, seed=0, budget=1)
    overlap = {"train": [], "validation": [2], "test": []}
    common = dict(pool_file="pool.csv", split_file="split.json", model_name_or_path=None, scores_file="s.csv")
    manifest = run_manifest(
        selection,
        frame,
        np.array([0, 1]),
        overlap,
        keep_heldout_overlap=False,
        arguments=[_Group()],
        **common,
    )
    assert manifest["indices"] == [1] and manifest["pool_file"] == "pool.csv"
    assert manifest["pool_sha256"] == dataset_fingerprint(frame["canonical_smiles"].tolist())
    assert manifest["n_pool"] == 3 and manifest["n_candidates"] == 2
    assert manifest["heldout_overlap"] == {**overlap, "excluded": True}
    assert manifest["split_file"] == "split.json" and manifest["model_name_or_path"] is None
    assert manifest["scores_file"] is None  # recorded for the influence strategy only
    assert manifest["arguments"] == {"_Group": {"option": 1}}
    kept = run_manifest(
        selection, frame, np.array([0, 1, 2]), {}, keep_heldout_overlap=True, arguments=[], **common
    )
    assert kept["heldout_overlap"] == {"excluded": False}
    assert json.loads(json.dumps(kept)) == kept
