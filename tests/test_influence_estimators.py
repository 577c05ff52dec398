"""Every inverse-HVP estimator against the exact influence on small convex problems."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from molft.influence import (
    ESTIMATORS,
    HELPFUL_SIGN,
    GradientDotEstimator,
    InfluenceProblem,
    LiSSADivergenceError,
    compute_influence,
    make_estimator,
    select_parameters,
    spearman_vs,
)

DTYPE = torch.float64
DAMPING = 0.3


def features_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["features"])


def as_batches(features: torch.Tensor, labels: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"features": features[start : start + size], "labels": labels[start : start + size]}
        for start in range(0, len(features), size)
    ]


def linear_model(weights: torch.Tensor, bias: float | None) -> nn.Linear:
    model = nn.Linear(weights.numel(), 1, bias=bias is not None).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(weights.reshape(1, -1))
        if bias is not None:
            model.bias.fill_(bias)
    return model


def anisotropic_problem(damping: float = 0.3, seed: int = 0, train_batch_size: int = 48) -> dict:
    """Ridge regression with correlated, unevenly scaled features, trained to its optimum.

    Hessian eigenvalues span 0.06 .. 5.6; one training batch by default keeps LiSSA's many HVPs cheap.
    """
    generator = torch.Generator().manual_seed(seed)
    n, d = 48, 5
    mixing = torch.randn(d, d, generator=generator, dtype=DTYPE) * 0.3 + torch.diag(
        torch.linspace(0.5, 2.0, d)
    )
    features = torch.randn(n, d, generator=generator, dtype=DTYPE) @ mixing
    labels = features @ torch.randn(d, generator=generator, dtype=DTYPE) + 0.5 * torch.randn(
        n, generator=generator
    )
    augmented = torch.cat([features, torch.ones(n, 1, dtype=DTYPE)], dim=1)
    optimum = torch.linalg.solve(
        augmented.T @ augmented / n + damping * torch.eye(d + 1), augmented.T @ labels / n
    )
    model = linear_model(optimum[:-1], float(optimum[-1]))
    query = torch.randn(6, d, generator=generator, dtype=DTYPE) @ mixing
    candidates = torch.randn(20, d, generator=generator, dtype=DTYPE) @ mixing
    return {
        "model": model,
        "train": as_batches(features, labels, train_batch_size),
        "query": as_batches(query, torch.randn(6, generator=generator, dtype=DTYPE), 4),
        "candidates": as_batches(candidates, torch.randn(20, generator=generator, dtype=DTYPE), 8),
        "hessian": augmented.T @ augmented / n,
    }


def factorial_problem(seed: int = 0) -> dict:
    """A design where H = I exactly and every per-sample gradient has the same norm.

    A bias-free linear model (one parameter tensor, so DataInf has a single block) on the 2^4 sign patterns
    (twice): X^T X / n = I and ||x||^2 = 4 for every sample; labels sit exactly 1 away from the predictions.
    Then the Hessian, the empirical Fisher and the EK-FAC approximation all equal I, and DataInf's and the
    first-order estimators' implied inverses are positive multiples of the exact one: all seven estimators
    must rank candidates alike.
    """
    generator = torch.Generator().manual_seed(seed)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=DTYPE).repeat(2, 1)
    model = linear_model(torch.tensor([0.4, -0.3, 0.2, 0.1], dtype=DTYPE), None)
    with torch.no_grad():
        predictions = model(signs).squeeze(-1)
    residual_signs = torch.where(torch.rand(len(signs), generator=generator) < 0.5, -1.0, 1.0).to(DTYPE)
    labels = predictions + residual_signs
    query = torch.randn(5, 4, generator=generator, dtype=DTYPE)
    candidates = torch.randn(24, 4, generator=generator, dtype=DTYPE)
    return {
        "model": model,
        "train": as_batches(signs, labels, 16),
        "query": as_batches(query, torch.randn(5, generator=generator, dtype=DTYPE), 5),
        "candidates": as_batches(candidates, torch.randn(24, generator=generator, dtype=DTYPE), 12),
    }


def influence(data: dict, estimator: str, per_query: bool = False, **options) -> tuple[np.ndarray, dict]:
    problem = InfluenceProblem(
        data["model"], select_parameters(data["model"], "all"), forward_fn=features_forward
    )
    return compute_influence(
        problem, data["train"], data["query"], data["candidates"], estimator, per_query=per_query, **options
    )


def closed_form_scores(data: dict, damping: float) -> np.ndarray:
    """-g_query^T (H + damping I)^-1 g_candidate with hand-written gradients of 0.5 * squared error."""
    model = data["model"]

    def grads(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        features = torch.cat([batch["features"] for batch in batches])
        labels = torch.cat([batch["labels"] for batch in batches])
        with torch.no_grad():
            residuals = model(features).squeeze(-1) - labels
        return torch.cat([residuals[:, None] * features, residuals[:, None]], dim=1)

    damped = data["hessian"] + damping * torch.eye(data["hessian"].shape[0], dtype=DTYPE)
    query_grad = grads(data["query"]).mean(dim=0)
    return (-(grads(data["candidates"]) @ torch.linalg.solve(damped, query_grad))).numpy()


def test_registry_names_match_the_documented_estimators() -> None:
    assert set(ESTIMATORS) == {"exact", "cg", "lissa", "datainf", "ekfac", "gradient_dot", "tracin"}
    assert HELPFUL_SIGN == -1


def test_exact_matches_closed_form_ridge_influence() -> None:
    data = anisotropic_problem(train_batch_size=16)
    scores, diagnostics = influence(data, "exact", damping=DAMPING)
    assert np.allclose(scores, closed_form_scores(data, DAMPING), rtol=1e-10, atol=1e-12)
    assert diagnostics["num_params"] == 6 and diagnostics["candidates"]["num_samples"] == 20
    assert diagnostics["train"] == {"num_batches": 3, "num_samples": 48}
    assert diagnostics["fit"]["positive_definite"] is True


@pytest.mark.parametrize("estimator, options", [("cg", {"tol": 1e-10}), ("lissa", {"depth": 250})])
def test_iterative_solvers_match_exact_ihvp(estimator: str, options: dict) -> None:
    data = anisotropic_problem()
    problem = InfluenceProblem(
        data["model"], select_parameters(data["model"], "all"), forward_fn=features_forward
    )
    vectors = problem.stack_grads(data["query"])
    exact = make_estimator("exact", damping=DAMPING).fit(problem, data["train"])
    solver = make_estimator(estimator, damping=DAMPING, **options).fit(problem, data["train"])
    expected, _ = exact.solve_many(vectors)
    solved, info = solver.solve_many(vectors)
    relative = (solved - expected).norm(dim=1) / expected.norm(dim=1)
    assert relative.max() < 0.01
    assert all(info["converged"]) if estimator == "cg" else info["converged"]
    scores, _ = influence(data, estimator, damping=DAMPING, **options)
    assert spearman_vs(closed_form_scores(data, DAMPING), scores) >= 0.99


def test_cg_records_residual_trace_and_warns_when_not_converged(caplog: pytest.LogCaptureFixture) -> None:
    data = anisotropic_problem()
    _, diagnostics = influence(data, "cg", damping=DAMPING, tol=1e-12, max_iter=2)
    trace = diagnostics["solver"]["relative_residual_trace"]
    assert len(trace) == 3 and trace[0] == [1.0] and trace[-1][0] < trace[0][0]
    assert diagnostics["solver"]["converged"] == [False]
    assert "CG did not reach" in caplog.text


def test_lissa_with_too_small_scale_raises_divergence() -> None:
    data = anisotropic_problem()
    top_eigenvalue = float(torch.linalg.eigvalsh(data["hessian"]).max())
    with pytest.raises(LiSSADivergenceError, match="Increase `scale`"):
        influence(data, "lissa", damping=DAMPING, scale=top_eigenvalue / 4, depth=150)
    # Just above half the top eigenvalue still converges (the recursion's contraction bound).
    scores, diagnostics = influence(
        data, "lissa", damping=DAMPING, scale=0.6 * (top_eigenvalue + DAMPING), depth=150
    )
    assert diagnostics["solver"]["converged"]
    assert np.allclose(scores, closed_form_scores(data, DAMPING), rtol=1e-3, atol=1e-9)


def test_lissa_auto_scale_and_norm_trace() -> None:
    data = anisotropic_problem()
    _, diagnostics = influence(data, "lissa", damping=DAMPING, depth=200, log_every=50)
    top_eigenvalue = float(torch.linalg.eigvalsh(data["hessian"]).max())
    assert diagnostics["fit"]["top_eigenvalue_estimate"] == pytest.approx(top_eigenvalue, rel=1e-3)
    steps = [entry["step"] for entry in diagnostics["solver"]["norm_trace"][0]]
    assert steps == [0, 50, 100, 150, 200]
    final_norm = diagnostics["solver"]["norm_trace"][0][-1]["ihvp_norm"][0]
    assert final_norm == pytest.approx(diagnostics["ihvp_norm"][0], rel=1e-12)


def test_lissa_mini_batches_stay_close_to_exact() -> None:
    data = anisotropic_problem()
    expected = closed_form_scores(data, DAMPING)
    scores, _ = influence(data, "lissa", damping=DAMPING, depth=200, batch_size=8, repeats=2, seed=3)
    assert spearman_vs(expected, scores) >= 0.95


def test_every_estimator_ranks_like_exact_when_the_hessian_is_isotropic() -> None:
    data = factorial_problem()
    exact, _ = influence(data, "exact", damping=DAMPING)
    options = {
        "cg": {"damping": DAMPING},
        "lissa": {"damping": DAMPING, "depth": 100},
        "datainf": {"damping": DAMPING},
        "ekfac": {"damping": DAMPING},  # true Fisher: labels sampled from N(prediction, 1), seeded
        "gradient_dot": {},
        "tracin": {},
    }
    for name, opts in options.items():
        scores, _ = influence(data, name, **opts)
        assert spearman_vs(exact, scores) >= 0.99, name
        assert np.all(np.sign(scores) == np.sign(exact)), name  # same sign convention, positive scale
    # With H = I: first-order scores are the exact ones times (1 + damping).
    gradient_dot, _ = influence(data, "gradient_dot")
    assert np.allclose(gradient_dot, (1 + DAMPING) * exact)


def test_ekfac_is_exact_for_one_linear_layer_with_unit_residuals() -> None:
    """For one Linear layer with a scalar output, K-FAC's activation factor is the exact Hessian and the
    empirical Fisher equals the Hessian when every residual is +-1, so EK-FAC must reproduce `exact`."""
    data = anisotropic_problem()
    model = data["model"]
    for batch in data["train"]:
        with torch.no_grad():
            predictions = model(batch["features"]).squeeze(-1)
        batch["labels"] = predictions + torch.where(torch.arange(len(predictions)) % 3 == 0, -1.0, 1.0).to(
            DTYPE
        )
    exact, _ = influence(data, "exact", damping=DAMPING, per_query=True)
    ekfac, diagnostics = influence(data, "ekfac", damping=DAMPING, per_query=True, use_empirical_fisher=True)
    assert ekfac.shape == exact.shape == (6, 20)
    assert np.allclose(ekfac, exact, rtol=1e-6, atol=1e-10)
    assert diagnostics["fit"]["tracked_modules"] == [""]


def test_datainf_approximates_the_damped_fisher_inverse() -> None:
    data = anisotropic_problem()
    problem = InfluenceProblem(
        data["model"], select_parameters(data["model"], "all"), forward_fn=features_forward
    )
    train_grads = problem.stack_grads(data["train"])
    fisher = train_grads.T @ train_grads / len(train_grads)
    vectors = problem.stack_grads(data["query"])
    errors = []
    for damping in (1.0, 10.0, 100.0):
        # One parameter tensor at a time: DataInf is block-diagonal, so compare block by block.
        solved, _ = make_estimator("datainf", damping=damping).fit(problem, data["train"]).solve_many(vectors)
        for _, columns in problem.block_slices():
            block = fisher[columns, columns] + damping * torch.eye(columns.stop - columns.start, dtype=DTYPE)
            expected = torch.linalg.solve(block, vectors[:, columns].T).T
            errors.append(float((solved[:, columns] - expected).norm() / expected.norm()))
    # The inverse/average swap is tight once the damping dominates ||g||^2 (here ~1-10): errors shrink.
    weight_errors, bias_errors = errors[0::2], errors[1::2]
    assert weight_errors[0] > weight_errors[1] > weight_errors[2] and weight_errors[1] < 0.2
    assert bias_errors[0] > bias_errors[1] > bias_errors[2] and bias_errors[0] < 0.2
    assert max(weight_errors[2], bias_errors[2]) < 0.01


def test_tracin_sums_learning_rate_weighted_checkpoints() -> None:
    data = anisotropic_problem()
    model = data["model"]
    current = {name: value.detach().clone() for name, value in model.state_dict().items()}
    shifted = {name: value + 0.5 for name, value in current.items()}
    gradient_dot, _ = influence(data, "gradient_dot")
    single, _ = influence(data, "tracin", checkpoints=[(current, 0.1)])
    assert np.allclose(single, 0.1 * gradient_dot)
    at_shifted, _ = influence(data, "tracin", checkpoints=[(shifted, 1.0)])
    both, diagnostics = influence(data, "tracin", checkpoints=[(None, 0.1), (shifted, 0.01)])
    assert np.allclose(both, 0.1 * gradient_dot + 0.01 * at_shifted)
    assert not np.allclose(at_shifted, gradient_dot)
    assert diagnostics["learning_rates"] == [0.1, 0.01]
    with pytest.raises(ValueError, match="checkpoint 0: .*missing"):
        influence(data, "tracin", checkpoints=[({"weight": current["weight"]}, 1.0)])


def test_lora_scope_gives_finite_scores_for_exact_and_datainf() -> None:
    peft = pytest.importorskip("peft")

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(5, 8)
            self.regressor = nn.Linear(8, 1)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.regressor(torch.tanh(self.fc1(features)))

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], init_lora_weights=False)
    model = peft.get_peft_model(MLP().to(DTYPE), config)
    params = select_parameters(model, "lora")
    problem = InfluenceProblem(model, params, forward_fn=lambda m, batch: m(features=batch["features"]))
    assert problem.num_params == 2 * 5 + 8 * 2
    generator = torch.Generator().manual_seed(1)
    features, labels = (
        torch.randn(30, 5, generator=generator, dtype=DTYPE),
        torch.randn(30, generator=generator),
    )
    train = as_batches(features, labels.to(DTYPE), 10)
    for name in ("exact", "datainf"):
        scores, diagnostics = compute_influence(problem, train, train[:1], train, name, damping=1.0)
        assert scores.shape == (30,) and np.isfinite(scores).all() and np.abs(scores).max() > 0, name
        assert diagnostics["scope"] == list(params)


def test_bad_estimator_requests_raise_clearly() -> None:
    data = anisotropic_problem()
    with pytest.raises(ValueError, match="unknown influence estimator 'newton'"):
        influence(data, "newton")
    with pytest.raises(ValueError, match="does not accept options \\['depth'\\]"):
        influence(data, "cg", depth=3)
    with pytest.raises(ValueError, match="max_params=3"):
        influence(data, "exact", max_params=3)
    with pytest.raises(ValueError, match="damping"):
        make_estimator("cg", damping=-1.0)
    with pytest.raises(ValueError, match="at least one nn.Linear"):
        embedding = nn.Embedding(4, 1).to(DTYPE)
        problem = InfluenceProblem(embedding, dict(embedding.named_parameters()), forward_fn=features_forward)
        make_estimator("ekfac").fit(problem, data["train"])


def test_silent_zero_or_nan_inverse_hvps_are_refused() -> None:
    data = anisotropic_problem()
    problem = InfluenceProblem(
        data["model"], select_parameters(data["model"], "all"), forward_fn=features_forward
    )

    class Collapsing(GradientDotEstimator):
        def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict]:
            return torch.zeros_like(vectors), {}

    class Exploding(GradientDotEstimator):
        def solve_many(self, vectors: torch.Tensor) -> tuple[torch.Tensor, dict]:
            return vectors * float("nan"), {}

    with pytest.raises(FloatingPointError, match="exactly zero"):
        compute_influence(problem, data["train"], data["query"], data["candidates"], Collapsing())
    with pytest.raises(FloatingPointError, match="NaN"):
        compute_influence(problem, data["train"], data["query"], data["candidates"], Exploding())
    with pytest.raises(ValueError, match="estimator instance"):
        compute_influence(
            problem, data["train"], data["query"], data["candidates"], Collapsing(), damping=1.0
        )
