"""Strategies that choose external molecules to add to the training set, behind one interface.

Every strategy works on precomputed arrays held by a `SelectionPool` (influence scores, embeddings,
MC-dropout predictions, labels, SMILES), so the choice can be tested and re-run without the model, and
each is deterministic for a given seed. `select(name, pool, budget, seed, **params)` runs one and returns
a `Selection`; `selection_manifest` and `write_selection` record it next to the chosen molecules.

Modules: `registry` (the interface and the budget), `strategies` (the strategies), `pool` (the pool file,
score files and candidates), `model_outputs` (embeddings and MC dropout from the run's model),
`uncertainty` (MC dropout), `output` (manifest and files).
"""

from __future__ import annotations

from molft.selection.model_outputs import ModelArrays, model_arrays
from molft.selection.output import (
    merge_selected_into_train,
    run_manifest,
    selected_frame,
    selection_manifest,
    write_selection,
)
from molft.selection.pool import (
    FIELD_SOURCES,
    SelectionPool,
    candidate_positions,
    check_candidate_scores,
    check_scores_match_pool,
    heldout_overlap,
    load_pool,
    pool_ids,
    read_influence_scores,
    selection_pool,
)
from molft.selection.registry import (
    STRATEGIES,
    Picked,
    Selection,
    available_strategies,
    pool_budget,
    register_strategy,
    resolve_budget,
    select,
    strategy_parameters,
)
from molft.selection.strategies import (
    DIVERSITY_METHODS,
    INFLUENCE_MODES,
    TS_DSHAPLEY_MODES,
    UNCERTAINTY_MODES,
    VALUATION_STRATEGIES,
)
from molft.selection.uncertainty import mc_dropout_predictions, mc_predictions

__all__ = [
    "DIVERSITY_METHODS",
    "FIELD_SOURCES",
    "INFLUENCE_MODES",
    "STRATEGIES",
    "TS_DSHAPLEY_MODES",
    "UNCERTAINTY_MODES",
    "VALUATION_STRATEGIES",
    "ModelArrays",
    "Picked",
    "Selection",
    "SelectionPool",
    "available_strategies",
    "candidate_positions",
    "check_candidate_scores",
    "check_scores_match_pool",
    "heldout_overlap",
    "load_pool",
    "mc_dropout_predictions",
    "mc_predictions",
    "merge_selected_into_train",
    "model_arrays",
    "pool_budget",
    "pool_ids",
    "read_influence_scores",
    "register_strategy",
    "resolve_budget",
    "run_manifest",
    "select",
    "selected_frame",
    "selection_manifest",
    "selection_pool",
    "strategy_parameters",
    "write_selection",
]
