"""run_selection.py end to end on a tiny trained regression model and 40 external molecules (CPU, no network)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
from helpers import pool_rows_in_split, run_and_pool_files, single_thread, train_tiny_regression  # noqa: F401  (autouse fixture)
from rdkit import DataStructs
from transformers import AutoTokenizer

import run_selection
from molft.chem import canonical_smiles, morgan_fingerprints
from molft.cli import load_config_file
from molft.data import LABEL_CANDIDATES, SMILES_CANDIDATES, find_column
from molft.files import (
    DONE_MARKER,
    INFLUENCE_SCORES_FILE,
    MANIFEST_FILE,
    MERGED_TRAIN_FILE,
    SELECTED_FILE,
    SHIFT_PLOT_FILE,
    SHIFT_REPORT_FILE,
    SPLIT_FILE,
)
from molft.io import read_json
from molft.model_utils import smiles_batches
from molft.peft_setup import load_regression_checkpoint
from molft.selection import available_strategies, load_pool, mc_dropout_predictions

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "configs" / "selection_example.yaml"
N_DATASET, N_POOL, K = 150, 40, 5
QUIET = ["--disable_tqdm", "true", "--log_level", "warning", "--device", "cpu"]


class TrainedRun(NamedTuple):
    run_dir: Path
    train_file: Path  # the run's dataset (150 Lipophilicity rows, split 120/15/15 by run_regression.py)
    pool_file: Path  # 40 external molecules; some of them are in the run's test split
    split: dict  # the run's split.json
    heldout: list[int]  # pool positions of molecules in the validation/test split
    candidates: np.ndarray  # the other pool positions


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> TrainedRun:
    tmp = tmp_path_factory.mktemp("selection")
    train_file, pool_file = run_and_pool_files(data_dir, tmp, N_DATASET, N_POOL)
    run_dir = train_tiny_model(train_file, tmp / "run")
    heldout = pool_rows_in_split(pool_file, run_dir)
    candidates = np.setdiff1d(np.arange(N_POOL), heldout)
    return TrainedRun(run_dir, train_file, pool_file, read_json(run_dir / SPLIT_FILE), heldout, candidates)


def train_tiny_model(train_file: Path, run_dir: Path, *extra: str) -> Path:
    return train_tiny_regression(train_file, run_dir, "--save_strategy", "no", *extra)


def run_main(base: list[str | Path], options: str = "", *extra: str | Path) -> dict:
    """run_selection.main() with `base` arguments, then space-separated `options`, then `extra` (e.g. paths)."""
    argv = ["run_selection.py", *map(str, base), *options.split(), *map(str, extra)]
    with patch.object(sys, "argv", argv):
        return run_selection.main()


def base_args(trained: TrainedRun, output_dir: Path, *, model: bool = True) -> list[str | Path]:
    args = ["--external_file", trained.pool_file, "--train_file", trained.train_file]
    args += ["--output_dir", output_dir]
    if model:
        args += ["--model_name_or_path", trained.run_dir]  # its split.json is found next to it
    else:
        args += ["--split_file", trained.run_dir / SPLIT_FILE]
    return [*args, *QUIET]


@pytest.fixture(scope="module")
def scores_file(trained, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Hand-made influence scores; the held-out molecules get the most helpful ones, so they must be skipped."""
    scores = np.linspace(0.5, -1.0, N_POOL)  # later rows more helpful
    scores[trained.heldout] = -10.0 - np.arange(len(trained.heldout))
    pool = load_pool(trained.pool_file)
    path = tmp_path_factory.mktemp("scores") / INFLUENCE_SCORES_FILE
    frame = pd.DataFrame(
        {
            "index": np.arange(N_POOL),
            "smiles": pool["smiles"],
            "canonical_smiles": pool["canonical_smiles"],
            "label": pool["label"],
            "score": scores,
        }
    )
    frame["rank"] = frame["score"].rank(method="first").astype(int)
    frame["helpful"] = frame["score"] < 0
    frame.sort_values("rank").to_csv(path, index=False)  # rows in rank order: matched by the index column
    return path, scores


def test_fixture_pool_overlaps_the_test_split(trained):
    # the real external set shares molecules with Lipophilicity: the exclusion below is exercised for real
    assert len(trained.heldout) >= 1 and len(trained.candidates) == N_POOL - len(trained.heldout)


STRATEGY_OPTIONS = {
    "random": "--strategy random",
    "maxmin": "--strategy diversity --diversity_method maxmin",
    "kmeans": "--strategy diversity --diversity_method kmeans --kmeans_n_init 2",
    "stratified": "--strategy stratified --n_bins 3",
    "uncertainty": "--strategy uncertainty --n_passes 3",
    "knn_shapley": "--strategy knn_shapley --knn_k 3",
    "ts_dshapley": "--strategy ts_dshapley --ts_subset_size 10 --ts_n_permutations 2",
    "influence": "--strategy influence --scores_file",  # the file follows
    "all": "--strategy all",
    "none": "--strategy none",
}


@pytest.mark.parametrize("name", list(STRATEGY_OPTIONS))
def test_each_strategy_writes_a_deterministic_selection_of_the_right_size(
    name, trained, scores_file, tmp_path
):
    options = f"--k {K} --seed 7 --no_shift_diagnostics {STRATEGY_OPTIONS[name]}"
    extra = [scores_file[0]] if name == "influence" else []
    runs = []
    for attempt in ("a", "b"):
        output_dir = tmp_path / attempt
        manifest = run_main(base_args(trained, output_dir), options, *extra)
        selected = pd.read_csv(output_dir / SELECTED_FILE)
        runs.append((manifest, selected))
        assert (output_dir / DONE_MARKER).is_file()
        assert read_json(output_dir / MANIFEST_FILE) == manifest

    expected_size = {"all": len(trained.candidates), "none": 0}.get(name, K)
    (manifest, selected), (manifest_again, _) = runs
    assert len(selected) == manifest["n_selected"] == expected_size
    assert selected["index"].tolist() == manifest["indices"] == manifest_again["indices"]
    assert set(selected["index"]) <= set(trained.candidates)  # never a validation/test molecule
    assert manifest["n_candidates"] == len(trained.candidates) and manifest["seed"] == 7
    pool = load_pool(trained.pool_file)
    assert selected["smiles"].tolist() == pool["canonical_smiles"].iloc[selected["index"]].tolist()
    np.testing.assert_allclose(selected["label"].astype(float), pool["label"].iloc[selected["index"]])
    # what run_regression.py --extra_train_file looks for
    assert find_column(selected, None, SMILES_CANDIDATES, "SMILES", SELECTED_FILE) == "smiles"
    assert find_column(selected, None, LABEL_CANDIDATES, "label", SELECTED_FILE) == "label"


def test_random_picks_change_with_the_seed(trained, tmp_path):
    picks = [
        run_main(
            base_args(trained, tmp_path / str(seed), model=False),
            f"--strategy random --k {K} --seed {seed} --no_shift_diagnostics",
        )["indices"]
        for seed in (1, 2)
    ]
    assert picks[0] != picks[1]


@pytest.mark.parametrize("mode", ["top", "bottom", "helpful"])
def test_influence_picks_the_most_negative_scores(mode, trained, scores_file, tmp_path):
    path, scores = scores_file
    budget = f"--k {K}" if mode != "helpful" else ""
    manifest = run_main(
        base_args(trained, tmp_path, model=False),
        f"--strategy influence --mode {mode} {budget} --no_shift_diagnostics --scores_file",
        path,
    )
    most_helpful_first = trained.candidates[np.argsort(scores[trained.candidates], kind="stable")]
    chosen = {
        "top": most_helpful_first[:K],
        "bottom": most_helpful_first[::-1][:K],
        "helpful": most_helpful_first[scores[most_helpful_first] < 0],
    }[mode]
    assert manifest["indices"] == chosen.tolist()
    np.testing.assert_allclose(manifest["scores"], scores[chosen])
    if mode == "top":  # the last rows of the pool carry the most negative non-held-out scores
        assert manifest["indices"][0] == max(set(range(N_POOL)) - set(trained.heldout))
    if mode == "helpful":
        assert len(chosen) == int((scores[trained.candidates] < 0).sum()) > K


def test_uncertainty_picks_the_highest_mc_dropout_variance(trained, tmp_path):
    n_passes, seed = 4, 11
    manifest = run_main(
        base_args(trained, tmp_path),
        f"--strategy uncertainty --k {K} --seed {seed} --n_passes {n_passes} --batch_size 16 --no_shift_diagnostics",
    )

    model = load_regression_checkpoint(trained.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained.run_dir)
    smiles = load_pool(trained.pool_file)["canonical_smiles"].tolist()
    batches = smiles_batches(smiles, tokenizer, batch_size=16, max_length=202)
    variance = mc_dropout_predictions(model, batches, n_passes, seed).var(axis=0, ddof=1)
    candidates = trained.candidates
    expected = candidates[np.argsort(-variance[candidates], kind="stable")][:K]
    assert variance[candidates].max() > 0
    assert manifest["indices"] == expected.tolist()
    np.testing.assert_allclose(manifest["scores"], variance[expected], rtol=1e-6)


def test_shift_report_and_merged_train(trained, tmp_path):
    manifest = run_main(
        base_args(trained, tmp_path),
        f"--strategy random --k {K} --mmd_permutations 50 --write_merged_train true",
    )

    report = read_json(tmp_path / SHIFT_REPORT_FILE)
    assert {"tanimoto", "mmd", "labels", "reference", "pool_indices"} <= set(report)
    n_candidates, sizes = len(trained.candidates), trained.split["sizes"]
    assert report["pool_indices"] == trained.candidates.tolist()
    assert report["tanimoto"]["external"]["summary"]["n"] == n_candidates
    assert report["tanimoto"]["reference"]["summary"]["n"] == sizes["test"]
    similarity = np.array(report["tanimoto"]["external"]["nn_similarity"])
    train_fps = morgan_fingerprints(trained.split["smiles"]["train"])
    pool_smiles = load_pool(trained.pool_file)["canonical_smiles"]
    for position in (0, n_candidates - 1):
        fp = morgan_fingerprints([pool_smiles[trained.candidates[position]]])[0]
        assert similarity[position] == pytest.approx(max(DataStructs.BulkTanimotoSimilarity(fp, train_fps)))
    assert (report["mmd"]["n_x"], report["mmd"]["n_y"]) == (n_candidates, sizes["train"])
    assert 0 < report["mmd"]["p_value"] <= 1 and report["mmd"]["n_permutations"] == 50
    dataset = pd.read_csv(trained.train_file)  # every SMILES is valid, so split positions are rows
    train_labels = dataset["exp"].iloc[trained.split["indices"]["train"]].to_numpy()
    pool_labels = pd.read_csv(trained.pool_file)["Label"].to_numpy()[trained.candidates]
    assert report["labels"]["mean_difference"] == pytest.approx(pool_labels.mean() - train_labels.mean())
    assert (tmp_path / SHIFT_PLOT_FILE).stat().st_size > 0

    merged = pd.read_csv(tmp_path / MERGED_TRAIN_FILE)
    selected = pd.read_csv(tmp_path / SELECTED_FILE)
    assert len(merged) == sizes["train"] + K
    assert merged["source"].value_counts().to_dict() == {"train": sizes["train"], "external": K}
    np.testing.assert_allclose(merged["label"].iloc[: sizes["train"]], train_labels)
    assert merged["smiles"].iloc[sizes["train"] :].tolist() == selected["smiles"].tolist()
    assert manifest["heldout_overlap"]["test"] + manifest["heldout_overlap"]["validation"] != []


def test_heldout_molecules_can_be_kept_on_request(trained, tmp_path):
    kept = run_main(
        base_args(trained, tmp_path, model=False),
        "--strategy all --keep_heldout_overlap true --no_shift_diagnostics",
    )
    assert kept["indices"] == list(range(N_POOL))
    assert kept["heldout_overlap"]["excluded"] is False
    assert sorted(kept["heldout_overlap"]["validation"] + kept["heldout_overlap"]["test"]) == trained.heldout


def test_finished_output_dir_needs_overwrite(trained, tmp_path):
    base = base_args(trained, tmp_path, model=False)
    run_main(base, "--strategy none --no_shift_diagnostics")
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        run_main(base, "--strategy none --no_shift_diagnostics")
    assert (
        run_main(base, "--strategy none --no_shift_diagnostics --overwrite_output_dir true")["n_selected"]
        == 0
    )


def test_scores_for_another_pool_are_rejected(trained, data_dir, scores_file, tmp_path):
    other = pd.read_csv(scores_file[0])
    other_pool = load_pool(data_dir / "external_300.csv").iloc[N_POOL : 2 * N_POOL]
    other["smiles"] = other_pool["smiles"].to_numpy()[other["index"]]
    other.to_csv(tmp_path / "other_scores.csv", index=False)
    with pytest.raises(ValueError, match="another pool"):
        run_main(
            base_args(trained, tmp_path / "out", model=False),
            f"--strategy influence --k {K} --scores_file",
            tmp_path / "other_scores.csv",
        )


def test_budget_larger_than_the_candidates_is_rejected(trained, tmp_path):
    # fits the 40-molecule file, but not the candidates left after removing held-out molecules
    too_many = len(trained.candidates) + 1
    with pytest.raises(ValueError, match=f"k={too_many} exceeds the pool size {len(trained.candidates)}"):
        run_main(base_args(trained, tmp_path, model=False), f"--strategy random --k {too_many}")
    assert not (tmp_path / DONE_MARKER).exists()


@pytest.mark.parametrize(
    "strategy_args, message",
    [
        ("--strategy uncertainty", "uncertainty.*needs --model_name_or_path"),
        ("--strategy diversity --diversity_method kmeans", "needs --model_name_or_path"),
        ("--strategy influence", "needs --scores_file"),
        ("--strategy magic", "Unknown --strategy 'magic'"),
    ],
)
def test_strategy_without_its_input_fails_early(strategy_args, message, trained, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_main(base_args(trained, tmp_path, model=False), f"{strategy_args} --k {K}")
    assert not (tmp_path / SELECTED_FILE).exists()


def test_split_of_another_dataset_is_rejected(trained, data_dir, tmp_path):
    other = tmp_path / "other.csv"
    pd.read_csv(data_dir / "lipophilicity.csv").iloc[N_DATASET : 2 * N_DATASET].to_csv(other, index=False)
    args = base_args(trained, tmp_path / "out", model=False)
    args[args.index("--train_file") + 1] = other
    with pytest.raises(ValueError, match="different dataset"):
        run_main(args, f"--strategy random --k {K}")


def test_example_config_parses_and_runs(trained, scores_file, tmp_path):
    config = load_config_file(EXAMPLE_CONFIG)
    assert config["external_file"] and config["output_dir"]
    # the example file with this test's pool, scores and run in place of the outputs/ it names
    manifest = run_main(
        [EXAMPLE_CONFIG, *QUIET],
        "--mmd_permutations 20",
        *("--external_file", trained.pool_file, "--scores_file", scores_file[0]),
        *(
            "--model_name_or_path",
            trained.run_dir,
            "--train_file",
            trained.train_file,
            "--output_dir",
            tmp_path,
        ),
    )
    assert manifest["strategy"] == config["strategy"] and manifest["strategy"] in available_strategies()
    assert json.dumps(manifest["params"])  # only options its strategy takes
    assert (tmp_path / DONE_MARKER).is_file()


def test_fraction_budget_is_a_share_of_the_candidates(trained, tmp_path):
    manifest = run_main(
        base_args(trained, tmp_path, model=False), "--strategy random --fraction 0.1 --no_shift_diagnostics"
    )
    assert manifest["budget"] == manifest["n_selected"] == round(0.1 * len(trained.candidates))


def test_pool_without_labels_can_be_ranked_but_not_stratified(trained, tmp_path):
    unlabelled = tmp_path / "unlabelled.csv"
    pd.read_csv(trained.pool_file)[["SMILES"]].to_csv(unlabelled, index=False)
    base = base_args(trained, tmp_path / "out", model=False)
    base[base.index("--external_file") + 1] = unlabelled
    manifest = run_main(base, f"--strategy random --k {K}")
    selected = pd.read_csv(tmp_path / "out" / SELECTED_FILE)
    assert "label" not in selected.columns and len(selected) == K == manifest["n_selected"]
    assert (tmp_path / "out" / SHIFT_REPORT_FILE).is_file()  # structure only: no label comparison
    assert read_json(tmp_path / "out" / SHIFT_REPORT_FILE)["labels"] is None
    with pytest.raises(ValueError, match="needs the pool's labels"):
        run_main(base, f"--strategy stratified --k {K} --overwrite_output_dir true")


def test_peft_adapter_checkpoint_is_loaded_with_its_base(trained, tmp_path):
    lora_dir = train_tiny_model(trained.train_file, tmp_path / "lora", "--peft", "lora", "--do_eval", "false")
    assert (lora_dir / "adapter_config.json").is_file()
    base = ["--external_file", trained.pool_file, "--train_file", trained.train_file, *QUIET]
    manifest = run_main(
        [*base, "--model_name_or_path", lora_dir, "--output_dir", tmp_path / "out"],
        f"--strategy uncertainty --n_passes 3 --k {K} --mmd_permutations 20",
    )
    assert manifest["n_selected"] == K and manifest["split_file"] == str(lora_dir / SPLIT_FILE)
    assert read_json(tmp_path / "out" / SHIFT_REPORT_FILE)["mmd"]["n_x"] == len(trained.candidates)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main([], "--help")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--strategy",
        "--scores_file",
        "--keep_heldout_overlap",
        "--write_merged_train",
        "--n_passes",
    ):
        assert option in help_text


def test_a_run_on_its_own_standardised_file_needs_only_its_folder(trained, data_dir, tmp_path):
    """The run's file, columns and --standardize come from its split.json; the pool is standardised like
    the run's splits, so the salt form of a test molecule is recognised as held out."""
    own = tmp_path / "own.csv"
    pd.read_csv(trained.train_file).rename(columns={"smiles": "structure", "exp": "logd_74"}).to_csv(
        own, index=False
    )
    run_dir = train_tiny_model(
        own, tmp_path / "run", "--smiles_column", "structure", "--label_column", "logd_74",
        "--standardize", "fragment_neutral", "--do_eval", "false",
    )  # fmt: skip
    split = read_json(run_dir / SPLIT_FILE)
    assert split["standardize"] == "fragment_neutral"
    assert split["columns"] == {"smiles_column": "structure", "label_column": "logd_74"}
    test_molecule = split["smiles"]["test"][0]
    others = [
        smi
        for smi in pd.read_csv(trained.pool_file)["SMILES"]
        if canonical_smiles(smi) not in trained.split["smiles"]["test"]
    ]
    pool = tmp_path / "pool.csv"
    pd.DataFrame({"SMILES": [f"{test_molecule}.Cl", *others[:5]], "Label": np.arange(6.0)}).to_csv(
        pool, index=False
    )
    base = ["--model_name_or_path", run_dir, "--external_file", pool, *QUIET]
    manifest = run_main([*base, "--output_dir", tmp_path / "out"], "--strategy all --no_shift_diagnostics")
    assert manifest["heldout_overlap"]["test"] == [0] and manifest["indices"] == [1, 2, 3, 4, 5]
    recorded = manifest["arguments"]["RunDataArguments"]
    assert recorded["train_file"] == str(own.resolve()) and recorded["smiles_column"] == "structure"
    assert recorded["standardize"] == "fragment_neutral" and recorded["dataset_name"] is None
    with pytest.raises(ValueError, match="was made with standardize='fragment_neutral', this data with None"):
        run_main([*base, "--output_dir", tmp_path / "plain"], "--strategy all --standardize none")


def test_every_flag_a_missing_input_error_names_exists():
    """The strategies' 'missing input' errors advise flags; each must be one that run_selection.py takes."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from molft.selection import FIELD_SOURCES

    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run(
        [sys.executable, "run_selection.py", "--help"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    named = {flag for source in FIELD_SOURCES.values() for flag in re.findall(r"--[a-z_]+", source)}
    assert named and all(re.search(rf"{flag}\b", shown) for flag in named), sorted(named)
