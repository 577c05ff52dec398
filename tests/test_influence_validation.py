"""Sign convention and retraining ground truth (molft.influence.validation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from molft.influence import (
    HELPFUL_SIGN,
    InfluenceProblem,
    compute_influence,
    leave_one_in_retrain_effect,
    ridge_weights,
    select_parameters,
    spearman_vs,
)

L2 = 0.2


def features_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["features"])


def ridge_setup(n: int = 200, d: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scales = np.array([0.5, 1.0, 1.5, 2.0])[:d]
    x = rng.normal(size=(n, d)) * scales
    y = x @ rng.normal(size=d) + 0.7 + 0.4 * rng.normal(size=n)
    xq, yq = rng.normal(size=(5, d)) * scales, rng.normal(size=5)
    xc = rng.normal(size=(25, d)) * scales
    yc = xc @ rng.normal(size=d) + rng.normal(size=25)  # some candidates agree with the queries, some not
    weights = ridge_weights(x, y, L2)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weights[:-1])[None])
        model.bias.fill_(float(weights[-1]))
    return {"x": x, "y": y, "xq": xq, "yq": yq, "xc": xc, "yc": yc, "weights": weights, "model": model}


def batches(x: np.ndarray, y: np.ndarray, size: int = 64) -> list[dict[str, torch.Tensor]]:
    return [
        {"features": torch.from_numpy(x[i : i + size]), "labels": torch.from_numpy(y[i : i + size])}
        for i in range(0, len(x), size)
    ]


def exact_scores(setup: dict, per_query: bool = False) -> np.ndarray:
    model = setup["model"]
    problem = InfluenceProblem(model, select_parameters(model, "all"), forward_fn=features_forward)
    scores, _ = compute_influence(
        problem,
        batches(setup["x"], setup["y"]),
        batches(setup["xq"], setup["yq"]),
        batches(setup["xc"], setup["yc"]),
        "exact",
        per_query=per_query,
        damping=L2,
    )
    return scores


def query_loss(setup: dict, weights: np.ndarray) -> float:
    augmented = np.hstack([setup["xq"], np.ones((len(setup["xq"]), 1))])
    return float(np.mean(0.5 * (augmented @ weights - setup["yq"]) ** 2))


def test_ridge_weights_solve_the_damped_objective() -> None:
    setup = ridge_setup()
    augmented = np.hstack([setup["x"], np.ones((200, 1))])
    gradient = augmented.T @ (augmented @ setup["weights"] - setup["y"]) / 200 + L2 * setup["weights"]
    assert np.abs(gradient).max() < 1e-10


def test_score_is_derivative_of_query_loss_under_upweighting() -> None:
    """Up-weight each candidate by eps in the training objective, re-solve in closed form: the query loss
    changes by eps * score (same sign: negative = helpful)."""
    setup = ridge_setup()
    scores = exact_scores(setup)
    augmented = np.hstack([setup["x"], np.ones((200, 1))])
    base_system = augmented.T @ augmented / 200 + L2 * np.eye(5)
    base_loss = query_loss(setup, setup["weights"])
    eps = 1e-6
    for index in range(len(setup["xc"])):
        candidate = np.append(setup["xc"][index], 1.0)
        system = base_system + eps * np.outer(candidate, candidate)
        weights = np.linalg.solve(
            system, augmented.T @ setup["y"] / 200 + eps * candidate * setup["yc"][index]
        )
        measured = (query_loss(setup, weights) - base_loss) / eps
        assert measured == pytest.approx(scores[index], rel=1e-4, abs=1e-8)
    helpful = scores * HELPFUL_SIGN > 0
    assert 0 < helpful.sum() < len(scores)  # the test covers both signs


def test_leave_one_in_retrain_matches_brute_force_and_score_over_n() -> None:
    setup = ridge_setup()
    effects = leave_one_in_retrain_effect(
        setup["x"], setup["y"], setup["xq"], setup["yq"], setup["xc"], setup["yc"], l2=L2
    )
    augmented = np.hstack([setup["x"], np.ones((200, 1))])
    for index in (0, 7, 24):
        candidate = np.append(setup["xc"][index], 1.0)
        system = augmented.T @ augmented + np.outer(candidate, candidate) + 200 * L2 * np.eye(5)
        weights = np.linalg.solve(system, augmented.T @ setup["y"] + candidate * setup["yc"][index])
        assert effects[index] == pytest.approx(
            query_loss(setup, weights) - query_loss(setup, setup["weights"])
        )

    scores = exact_scores(setup)
    assert np.all(np.sign(effects) == np.sign(scores))
    # First order: effect = score / n up to the candidate's leverage (second-order) terms.
    ratios = effects * 200 / scores
    assert np.median(ratios) == pytest.approx(1.0, abs=0.05)
    assert np.all((ratios > 0.75) & (ratios < 1.25))
    assert spearman_vs(effects, scores) >= 0.99


def test_leave_one_in_per_query_and_tensor_inputs() -> None:
    setup = ridge_setup()
    per_query = leave_one_in_retrain_effect(
        torch.from_numpy(setup["x"]),
        torch.from_numpy(setup["y"]),
        setup["xq"],
        setup["yq"],
        setup["xc"],
        setup["yc"],
        l2=L2,
        per_query=True,
    )
    assert per_query.shape == (5, 25)
    mean = leave_one_in_retrain_effect(
        setup["x"], setup["y"], setup["xq"], setup["yq"], setup["xc"], setup["yc"], L2
    )
    assert np.allclose(per_query.mean(axis=0), mean)
    assert spearman_vs(per_query[2], exact_scores(setup, per_query=True)[2]) >= 0.99


def test_validation_inputs_are_checked() -> None:
    setup = ridge_setup()
    bad = setup["x"].copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"train_features contains NaN/inf at rows \[3\]"):
        leave_one_in_retrain_effect(bad, setup["y"], setup["xq"], setup["yq"], setup["xc"], setup["yc"], L2)
    with pytest.raises(ValueError, match="candidate_labels has 24 entries"):
        leave_one_in_retrain_effect(
            setup["x"], setup["y"], setup["xq"], setup["yq"], setup["xc"], setup["yc"][:24], L2
        )
    with pytest.raises(ValueError, match="feature widths differ"):
        leave_one_in_retrain_effect(
            setup["x"], setup["y"], setup["xq"][:, :3], setup["yq"], setup["xc"], setup["yc"], L2
        )
    assert spearman_vs([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="constant"):
        spearman_vs([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="scores has 2 entries"):
        spearman_vs([1.0, 2.0, 3.0], [1.0, 2.0])
