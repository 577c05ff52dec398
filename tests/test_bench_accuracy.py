"""benchmarks/bench_accuracy.py: MoLFormer, the forest and chemprop on one split file, tables written, runs resumed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from molft.benchmark_data import check_lineup, load_data, read_split
from molft.files import ALL_RESULTS_FILE, DONE_MARKER, PREDICTIONS_FILE
from molft.io import read_json

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_accuracy.py"
N_ROWS = 60
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def load_bench():
    """benchmarks/ is no package: the script is loaded from its file (and registered, as dataclasses need)."""
    if "bench_accuracy" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_accuracy"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_accuracy"]


def bench(
    *args: str | Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(BENCH), *map(str, args)],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir) -> Path:
    """The first 60 Lipophilicity rows and a split file of their row numbers (the ../shared/splits layout)."""
    tmp = tmp_path_factory.mktemp("bench_data")
    pd.read_csv(data_dir / "lipophilicity.csv", nrows=N_ROWS).to_csv(tmp / "tiny.csv", index=False)
    order = np.random.RandomState(0).permutation(N_ROWS).tolist()
    (tmp / "tiny_s0.json").write_text(
        json.dumps({"train": order[:40], "valid": order[40:50], "test": order[50:]})
    )
    return tmp


def tiny_args(tiny: Path, out: Path, *extra: str) -> list[str | Path]:
    return [
        "--config", "configs/regression_tiny.yaml", "--train_file", tiny / "tiny.csv", "--splits",
        tiny / "tiny_s0.json", "--rf_trees", "5", "--output_dir", out, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tiny, tmp_path_factory) -> tuple[Path, list[str | Path]]:
    """MoLFormer (3 training steps) and the forest (5 trees) on one split and one seed."""
    out = tmp_path_factory.mktemp("bench_out")
    args = tiny_args(tiny, out, "--methods", "molformer,rf", "--max_steps", "3")
    bench(*args)
    return out, args


def test_smoke_run_writes_the_tables_with_one_row_per_method(smoke, tiny):
    out, _ = smoke
    results = pd.read_csv(out / "bench_accuracy.csv")
    assert results[["method", "split", "family", "seed"]].values.tolist() == [
        ["molformer", "tiny_s0", "tiny", 0],
        ["rf", "tiny_s0", "tiny", 0],
    ]
    assert results["n_train"].tolist() == [40, 40] and results["n_test"].tolist() == [10, 10]
    molformer = read_json(out / "molformer" / "tiny_s0" / "0" / ALL_RESULTS_FILE)
    assert results.loc[0, "rmse"] == pytest.approx(molformer["test_rmse"])
    forest = read_json(out / "rf" / "tiny_s0" / "0" / ALL_RESULTS_FILE)
    assert results.loc[1, "rmse"] == pytest.approx(forest["test_rmse"])
    # both methods tested on the split file's test rows
    split = json.loads((tiny / "tiny_s0.json").read_text())
    forest_rows = pd.read_csv(out / "rf" / "tiny_s0" / "0" / PREDICTIONS_FILE)["row"]
    molformer_predictions = pd.read_csv(out / "molformer" / "tiny_s0" / "0" / PREDICTIONS_FILE)
    molformer_rows = molformer_predictions.loc[molformer_predictions["split"] == "test", "row"]
    assert sorted(forest_rows) == sorted(molformer_rows) == sorted(split["test"])

    markdown = (out / "bench_accuracy.md").read_text()
    assert "| split family | method | runs | RMSE | MAE | R² | MoLFormer/peer RMSE | wall s/run |" in markdown
    ratio = results.loc[0, "rmse"] / results.loc[1, "rmse"]
    assert f"| tiny | rf | 1 | {results.loc[1, 'rmse']:.3f} |" in markdown
    assert f"| {ratio:.3f} |" in markdown
    assert "--max_steps 3" in markdown  # the command that made it


def test_resume_reads_finished_runs_back(smoke, monkeypatch):
    out, args = smoke
    bench_module = load_bench()
    marker = out / "molformer" / "tiny_s0" / "0" / DONE_MARKER
    before = marker.stat().st_mtime_ns
    first = pd.read_csv(out / "bench_accuracy.csv")

    def no_run(*args, **kwargs):
        raise AssertionError(f"a finished run was started again: {args}")

    monkeypatch.setattr(bench_module.subprocess, "run", no_run)
    again = bench_module.main([str(a) for a in args])
    assert marker.stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(again, first, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "bench_accuracy.csv"), first)
    # a run made with other options is not mixed in
    with pytest.raises(ValueError, match=r"holds a run made otherwise \(trees: was 5, now 6\)"):
        bench_module.main([("6" if a == "5" else str(a)) for a in args])


def test_molformer_runs_on_other_rows_are_refused(smoke, tiny, tmp_path):
    """The row check: a run whose test rows are not the split file's (e.g. capped by --max_predict_samples)."""
    out, _ = smoke
    data = load_data({"train_file": tiny / "tiny.csv"})
    split = read_split(tiny / "tiny_s0.json", data)
    path = tmp_path / PREDICTIONS_FILE
    predictions = pd.read_csv(out / "molformer" / "tiny_s0" / "0" / PREDICTIONS_FILE)
    check_lineup(out / "molformer" / "tiny_s0" / "0" / PREDICTIONS_FILE, split, data)  # the real run lines up
    predictions[~((predictions["split"] == "test") & (predictions.index % 2 == 0))].to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"test rows are not those of .*only in the split file"):
        check_lineup(path, split, data)
    swapped = predictions.copy()
    swapped.loc[0, "canonical_smiles"] = "CCO"
    swapped.to_csv(path, index=False)
    with pytest.raises(ValueError, match="other molecules in the run"):
        check_lineup(path, split, data)


FAKE_CHEMPROP = """\
#!{python}
# stands in for `chemprop train`: predicts each test label + 0.5, as chemprop v2 writes test_predictions.csv
import json, pathlib, sys
import pandas as pd
args = sys.argv[2:]
value = lambda flag: args[args.index(flag) + 1]
targets = args[args.index("--target-columns") + 1 : args.index("--splits-file")]
data = pd.read_csv(value("-i"))
test = json.loads(pathlib.Path(value("--splits-file")).read_text())[0]["test"]
out = pathlib.Path(value("-o")) / "model_0"
out.mkdir(parents=True)
frame = data.iloc[test][["smiles", *targets]]
frame[targets] = frame[targets] + 0.5
frame.to_csv(out / "test_predictions.csv", index=False)
"""


def test_chemprop_is_run_on_the_split_positions_and_scored_here(tiny, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "chemprop"
    fake.write_text(textwrap.dedent(FAKE_CHEMPROP).format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    results = load_bench().main([str(a) for a in tiny_args(tiny, tmp_path / "out", "--methods", "chemprop")])
    assert results["method"].tolist() == ["chemprop"]
    assert results.loc[0, "rmse"] == pytest.approx(0.5) and results.loc[0, "mae"] == pytest.approx(0.5)
    assert results.loc[0, "n_test"] == 10


def test_without_chemprop_the_skip_is_noted(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chemprop command there
    out = tmp_path / "out"
    results = load_bench().main([str(a) for a in tiny_args(tiny, out, "--methods", "rf,chemprop")])
    assert results["method"].tolist() == ["rf"]
    assert "chemprop skipped: not installed" in (out / "bench_accuracy.md").read_text()


def test_two_targets_with_gaps_and_classification_in_one_command(tmp_path, data_dir):
    """--label_column a,b and --problem_type reach the forest (run in-process; molformer is not asked for)."""
    bench_module = load_bench()
    frame = pd.read_csv(data_dir / "lipophilicity.csv", nrows=N_ROWS)[["smiles", "exp"]]
    frame["a"] = frame["exp"].where(frame.index % 2 == 0)
    frame["b"] = (-frame["exp"]).where(frame.index % 2 == 1)
    frame["logd_above_2"] = np.where(frame["exp"] > 2, "high", "low")
    table = tmp_path / "two.csv"
    frame.to_csv(table, index=False)
    common = ["--train_file", str(table), "--methods", "rf", "--rf_trees", "5"]

    results = bench_module.main(
        [*common, "--label_column", "a,b", "--split_method", "scaffold", "--split_seeds", "1,2",
         "--output_dir", str(tmp_path / "reg")]
    )  # fmt: skip
    assert results["target"].tolist() == ["mean", "a", "b"] * 2
    # splits made here are one family, whatever the shared scaffold_s1/s2 files are called
    assert results["split"].unique().tolist() == ["scaffold_s1", "scaffold_s2"]
    assert results["family"].unique().tolist() == ["scaffold"]
    first = results.iloc[:3]
    assert first["rmse"].iloc[0] == pytest.approx(first["rmse"].iloc[1:].mean())
    assert first["n_test"].iloc[1] + first["n_test"].iloc[2] == first["n_test"].iloc[0] == 6
    split = read_json(tmp_path / "reg" / "splits" / "scaffold_s1.json")
    assert sorted(split["train"] + split["valid"] + split["test"]) == list(range(N_ROWS))

    results = bench_module.main(
        [*common, "--label_column", "logd_above_2", "--problem_type", "single_label_classification",
         "--split_method", "random", "--split_seeds", "0,1", "--output_dir", str(tmp_path / "cls")]
    )  # fmt: skip
    assert results["roc_auc"].between(0, 1).all() and results["pr_auc"].notna().all()
    markdown = (tmp_path / "cls" / "bench_accuracy.md").read_text()
    assert "| split family | method | runs | ROC-AUC | PR-AUC | MoLFormer/peer ROC-AUC |" in markdown
    predictions = pd.read_csv(tmp_path / "cls" / "rf" / "random_s0" / "0" / PREDICTIONS_FILE)
    assert {"probability_high", "probability_low"} <= set(predictions.columns)
    assert set(predictions["label"]) <= {"high", "low"}


def test_bad_split_files_and_flags_are_refused(tiny, tmp_path):
    data = load_data({"train_file": tiny / "tiny.csv"})
    far = tmp_path / "far.json"
    far.write_text(json.dumps({"train": [0, 1], "valid": [2], "test": [999]}))
    with pytest.raises(ValueError, match=r"test rows \[999\] lie outside"):
        read_split(far, data)
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"train": [0, 1], "valid": [1], "test": [3]}))
    with pytest.raises(ValueError, match=r"rows \[1\] sit in two parts"):
        read_split(twice, data)
    with pytest.raises(SystemExit):
        load_bench().parse_args(["--seed", "3"])  # the benchmark sets the seed of each run


def test_labels_with_gaps_classes_and_bad_values(tmp_path):
    table = tmp_path / "t.csv"
    pd.DataFrame(
        {"smiles": ["CCO", "CCN", "CCC", "CCCl"], "a": [1.5, None, 2.0, " "], "b": [None, None, 3, 4],
         "cls": ["1", 0, 1.0, None], "bad": [0, 1, 2, 1]}
    ).to_csv(table, index=False)  # fmt: skip
    data = load_data({"train_file": table, "label_column": "a,b"})
    assert data.targets == ["a", "b"] and data.molecules["row"].tolist() == [0, 2, 3]  # row 1 has no label
    assert data.molecules["a"].isna().tolist() == [False, False, True]  # a blank cell is a missing label
    data = load_data(
        {"train_file": table, "label_column": "cls", "problem_type": "single_label_classification"}
    )
    assert data.classes == {"cls": ["0", "1"]} and data.molecules["cls"].tolist() == [1.0, 0.0, 1.0]
    data = load_data(
        {
            "train_file": table,
            "label_column": "cls",
            "problem_type": "single_label_classification",
            "class_names": "1,0",
        }
    )
    assert data.molecules["cls"].tolist() == [0.0, 1.0, 0.0]  # --class_names sets the order (last: positive)
    with pytest.raises(ValueError, match=r"1 labels in 'bad' are not 0 or 1 .*\(row 2: 2\)"):
        load_data({"train_file": table, "label_column": "bad", "problem_type": "multi_label_classification"})
    with pytest.raises(ValueError, match=r"listed twice"):
        load_data({"train_file": table, "label_column": "a,a"})
