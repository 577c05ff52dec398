"""molft.threads: small models on the CPU train on one thread unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import pytest
import torch

from molft.threads import SMALL_MODEL_PARAMETERS, choose_cpu_threads


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_small_model_on_cpu_uses_one_thread(two_threads):
    assert choose_cpu_threads(800_000, on_cpu=True) == 1
    assert torch.get_num_threads() == 1


def test_large_model_gpu_and_explicit_setting_are_left_alone(two_threads, monkeypatch):
    assert choose_cpu_threads(SMALL_MODEL_PARAMETERS, on_cpu=True) is None
    assert choose_cpu_threads(800_000, on_cpu=False) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_cpu_threads(800_000, on_cpu=True) is None
    assert torch.get_num_threads() == 2
