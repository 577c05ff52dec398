"""molft.selection.model_outputs: the model is loaded only for the arrays a run uses (the arrays themselves are
checked end to end in test_run_selection.py)."""

from __future__ import annotations

import pandas as pd

from molft.arguments import RunModelArguments
from molft.selection import ModelArrays, model_arrays

POOL = pd.DataFrame({"canonical_smiles": ["CCO", "CCN"], "label": [1.0, 2.0]})
OPTIONS = {"n_passes": 2, "batch_size": 4, "seed": 0, "quiet": True}


def test_no_model_no_arrays():
    arrays = model_arrays(
        RunModelArguments(), POOL, None, strategy="uncertainty", params={}, shift_diagnostics=True, **OPTIONS
    )
    assert arrays == ModelArrays()


def test_a_strategy_without_model_inputs_does_not_load_the_model(tmp_path):
    missing = RunModelArguments(model_name_or_path=str(tmp_path / "no_model"))  # loading it would fail
    for strategy, params, frames in [
        ("random", {}, None),  # shift diagnostics need a split: no embeddings without one
        ("diversity", {"method": "maxmin"}, None),
        ("influence", {}, None),
    ]:
        arrays = model_arrays(
            missing, POOL, frames, strategy=strategy, params=params, shift_diagnostics=True, **OPTIONS
        )
        assert arrays == ModelArrays()
    arrays = model_arrays(
        missing, POOL, {"train": POOL}, strategy="random", params={}, shift_diagnostics=False, **OPTIONS
    )
    assert arrays == ModelArrays()
