"""molft.preflight: what a run needs from outside is checked first, and missing needs fail fast in one message."""

from __future__ import annotations

import json
import time

import pytest
from huggingface_hub import constants

from molft import preflight
from molft.preflight import PreflightError, check_run_needs, missing_report_backends


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_model_fails_fast_naming_model_and_offline_route(offline, tmp_path):
    started = time.perf_counter()
    with pytest.raises(PreflightError) as err:
        check_run_needs(models={"Model": "ibm/MoLFormer-XL-both-10pct"}, cache_dir=str(tmp_path))
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "ibm/MoLFormer-XL-both-10pct" in message
    assert "HF_HUB_OFFLINE" in message
    assert "configs/regression_small.yaml" in message and "--config_name" in message


def test_local_folder_and_embedded_data_need_nothing(offline, tmp_path):
    check_run_needs(models={"Model": str(tmp_path), "Tokenizer": None}, dataset=None, report_to=["none"])


def test_cached_hub_model_is_enough_offline(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "is_cached", lambda repo, filename, *args: repo == "ibm/cached")
    check_run_needs(models={"Model": "ibm/cached"})
    with pytest.raises(PreflightError, match="ibm/other"):
        check_run_needs(models={"Model": "ibm/other"})


def test_every_missing_need_is_listed_in_one_message(offline, monkeypatch):
    monkeypatch.setitem(preflight.REPORT_BACKENDS, "fakeboard", ("no_such_module_for_molft_tests",))
    with pytest.raises(PreflightError) as err:
        check_run_needs(
            models={"Model": "org/model"},
            dataset="org/dataset",
            push_to_hub=True,
            report_to=["fakeboard"],
        )
    message = str(err.value)
    for part in ("'org/model'", "'org/dataset'", "--push_to_hub", "--report_to fakeboard", "[tracking]"):
        assert part in message


def test_missing_report_backend_alone_has_no_hub_advice(monkeypatch):
    monkeypatch.setitem(preflight.REPORT_BACKENDS, "fakeboard", ("no_such_module_for_molft_tests",))
    assert missing_report_backends(["fakeboard", "none"]) == []  # "none" switches reporting off
    assert missing_report_backends("fakeboard") == ["fakeboard"]
    with pytest.raises(PreflightError) as err:
        check_run_needs(models={}, report_to=["fakeboard"])
    assert "Offline" not in str(err.value)


def test_a_path_that_does_not_exist_is_named_even_online(monkeypatch):
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(PreflightError, match=r"Model 'runs/missing/model' does not exist") as err:
        check_run_needs(models={"Model": "runs/missing/model"})
    assert "Offline" not in str(err.value)  # the Hub would not help
    check_run_needs(models={"Model": "org/model"}, push_to_hub=True)  # reachable: nothing to report


def test_the_script_names_its_own_offline_route(offline):
    with pytest.raises(PreflightError, match=r"run_mlm\.py configs/mlm_pretrain_small\.yaml"):
        check_run_needs(models={"Model": "org/model"}, offline_route=preflight.MLM_OFFLINE_ROUTE)


def test_only_hub_datasets_are_checked(monkeypatch, tmp_path):
    assert preflight.hub_dataset("lipophilicity", local_files=False) is None  # the embedded chemloader copy
    assert preflight.hub_dataset("org/dataset", local_files=True) is None  # --train_file wins
    assert preflight.hub_dataset("org/dataset", local_files=False) == "org/dataset"
    assert preflight.hub_dataset(None, local_files=False) is None

    def not_installed():
        raise ImportError("no chemloader")

    monkeypatch.setattr("molft.data.embedded_lipophilicity_path", not_installed)
    assert (
        preflight.hub_dataset("Lipophilicity", local_files=False)
        == "scikit-fingerprints/MoleculeNet_Lipophilicity"
    )


def test_an_adapter_needs_its_hub_base_model(tmp_path):
    def adapter(base: str | None):
        folder = tmp_path / f"adapter_{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        return str(folder)

    (tmp_path / "base_model").mkdir()
    assert (
        preflight.adapter_base_model(adapter("ibm/MoLFormer-XL-both-10pct")) == "ibm/MoLFormer-XL-both-10pct"
    )
    assert preflight.adapter_base_model(adapter("./base_model")) is None  # local: checked when it loads
    assert preflight.adapter_base_model(adapter(str(tmp_path / "base_model"))) is None
    assert preflight.adapter_base_model(adapter(None)) is None
    assert preflight.adapter_base_model(str(tmp_path / "base_model")) is None  # a full model, no adapter
    assert preflight.adapter_base_model(None) is None


def test_a_script_ends_like_a_bad_command_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["run_regression.py"])

    def main():
        raise PreflightError("Cannot start this run: Model 'org/model' ...")

    with pytest.raises(SystemExit) as ended:
        preflight.exit_on_missing_needs(main)
    assert ended.value.code == 2
    assert (
        capsys.readouterr().err == "run_regression.py: error: Cannot start this run: Model 'org/model' ...\n"
    )

    def broken():
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError, match="a bug"):
        preflight.exit_on_missing_needs(broken)


def test_a_script_closes_the_process_group_a_launcher_opened(tmp_path):
    """A DDP rank that exits with its gloo group open can abort at interpreter shutdown (SIGABRT)."""
    import torch.distributed as dist

    def main():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert dist.is_initialized()

    preflight.exit_on_missing_needs(main)
    assert not dist.is_initialized()
