"""molft.preflight: what a run needs from outside is checked first, and missing needs fail fast in one message."""

from __future__ import annotations

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
