"""The MoLFormer regression model as an influence task (molft.influence.molformer)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import single_thread, tiny_config  # noqa: F401  (single_thread: autouse fixture)
from torch import nn

from configuration_molformer import MolformerConfig
from modeling_molformer_reg import MolformerForRegression
from molft.influence import InfluenceProblem, squared_error_loss
from molft.influence.molformer import (
    LinearisedForward,
    build_problem,
    influence_loss,
    layerwise_layout,
    problem_for_estimator,
    scope_parameters,
)
from molft.influence.per_sample import LayerwiseProblem, LayerwiseUnsupported
from molft.model_utils import fixed_feature_maps

ROOT = Path(__file__).resolve().parents[1]


def test_linearised_forward_gives_the_gauss_newton_matrix():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    params = dict(head.named_parameters())
    batches = [{"x": torch.randn(6, 4, dtype=torch.float64), "labels": torch.randn(6, dtype=torch.float64)}]

    def forward(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    true = InfluenceProblem(head, params, forward_fn=forward)
    gauss_newton = InfluenceProblem(head, params, forward_fn=LinearisedForward(forward, params))
    features = batches[0]["x"]
    jacobian = torch.func.jacrev(lambda p: torch.func.functional_call(head, p, (features,)).reshape(-1))(
        {name: param.detach() for name, param in params.items()}
    )
    jacobian = torch.cat([jacobian[name].reshape(6, -1) for name in params], dim=1)
    expected = jacobian.T @ jacobian / 6
    np.testing.assert_allclose(gauss_newton.hessian(batches), expected, atol=1e-12)
    assert torch.linalg.eigvalsh(true.hessian(batches))[0] < -1e-3  # the true Hessian is indefinite here
    np.testing.assert_allclose(gauss_newton.per_sample_grads(batches[0]), true.per_sample_grads(batches[0]))


def test_influence_loss_is_half_the_normalised_training_loss():
    config = MolformerConfig(target_mean=3.0, target_std=2.0)
    loss_fn, description = influence_loss(config)
    predictions = torch.tensor([[1.0], [5.0]], dtype=torch.float64)
    batch = {"labels": torch.tensor([2.0, 2.0], dtype=torch.float64)}
    # 0.5 * ((1 - 2) / 2)^2 and 0.5 * ((5 - 2) / 2)^2
    np.testing.assert_allclose(loss_fn(predictions, batch), [0.125, 1.125])
    assert "0.5" in description
    np.testing.assert_allclose(
        squared_error_loss(predictions / 2, {"labels": batch["labels"] / 2}), loss_fn(predictions, batch)
    )


# ----------------------------------------------------------------------------------------------------------
# Layerwise per-sample gradients (molft.influence.per_sample) on MoLFormer
# ----------------------------------------------------------------------------------------------------------


def padded_batch(vocab: int = 20) -> dict[str, torch.Tensor]:
    """Five molecules of 1 to 9 tokens, padded to 9, one of them with the padding id among its real tokens."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (5, 9), generator=generator)
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[1, 6:], mask[3, 1:], mask[4, 4:] = 0, 0, 0
    ids[mask == 0] = 0
    ids[2, 4] = 0  # its embedding row must get no gradient (nn.Embedding's padding_idx)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randn(5, generator=generator).double()}


def tiny_regressor(**overrides) -> MolformerForRegression:
    torch.manual_seed(0)
    model = MolformerForRegression(tiny_config(vocab_size=20, pad_token_id=0, **overrides)).double().eval()
    with torch.no_grad():  # a non-zero padding row: the test sees whether its gradient stays zero
        model.molformer.embeddings.word_embeddings.weight[0].normal_()
    return model


def assert_layerwise_equals_loop(problem: LayerwiseProblem, batch: dict[str, torch.Tensor]) -> None:
    """Per-sample gradients, one-direction products and three-direction products all equal the loop."""
    with fixed_feature_maps(problem.model):
        loop = problem.per_sample_grads_looped(batch)
        layerwise = problem.per_sample_grads(batch)
        directions = torch.randn(3, problem.num_params, generator=torch.Generator().manual_seed(1)).double()
        products = [problem.grad_dot(batch, directions[:count]) for count in (1, 3)]
    assert problem.layerwise is not None and problem.layerwise_error is None  # no fallback happened
    for name, piece in problem.block_slices():
        scale = loop[:, piece].abs().max()
        assert scale > 0, name
        np.testing.assert_allclose(
            layerwise[:, piece], loop[:, piece], rtol=0, atol=1e-12 * scale, err_msg=name
        )
    expected = directions @ loop.T
    for product in products:
        count = product.shape[0]
        np.testing.assert_allclose(product, expected[:count], rtol=1e-11, atol=1e-13 * expected.abs().max())


@pytest.mark.parametrize("fast_paths", [False, True], ids=["padded", "padding_free+fused_qkv"])
def test_layerwise_gradients_equal_the_loop_for_every_parameter_type(fast_paths):
    model = tiny_regressor(padding_free=fast_paths, fused_qkv=fast_paths)
    setup = build_problem(
        model, squared_error_loss, {"candidates": [padded_batch()]}, scope="all", last_k=1,
        head_on_features=False, curvature="gauss_newton", estimator="gradient_dot", grad_method="auto",
        vmap_chunk_size=None, batch_size=5, quiet=True,
    )  # fmt: skip
    problem = setup.problem
    assert isinstance(problem, LayerwiseProblem)
    kinds = {type(site.module).__name__ for site in problem.layerwise.sites}
    assert kinds == {"Embedding", "Linear", "LayerNorm"}  # embeddings, layernorms, linears, the head
    assert_layerwise_equals_loop(problem, padded_batch())
    pad_row = problem.block_slices()[0][1].start + torch.arange(model.config.hidden_size)
    assert problem.names[0].endswith("word_embeddings.weight")
    with fixed_feature_maps(model):
        assert problem.per_sample_grads(padded_batch())[:, pad_row].abs().max() == 0
    assert (model.config.padding_free, model.config.fused_qkv) == (fast_paths, fast_paths)  # restored


def test_layerwise_gradients_under_the_gauss_newton_forward_and_the_lora_scope():
    model = tiny_regressor()
    gauss_newton = build_problem(
        model, squared_error_loss, {"candidates": [padded_batch()]}, scope="last_k_layers", last_k=1,
        head_on_features=False, curvature="gauss_newton", estimator="cg", grad_method="auto",
        vmap_chunk_size=None, batch_size=5, quiet=True,
    ).problem  # fmt: skip
    assert isinstance(gauss_newton.forward_fn, LinearisedForward) and gauss_newton.plain_forward is not None
    assert_layerwise_equals_loop(gauss_newton, padded_batch())

    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    lora_config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False
    )
    lora_model = peft.get_peft_model(tiny_regressor(), lora_config).double().eval()
    params = scope_parameters(lora_model, "lora", 1)
    lora = LayerwiseProblem(lora_model, params, layout=layerwise_layout(lora_model))
    assert len(params) == 8 and all("lora_" in name for name in params)
    assert_layerwise_equals_loop(lora, padded_batch())


def test_layerwise_falls_back_when_a_parameter_is_used_outside_its_module(caplog):
    class Tied(nn.Module):
        """A linear layer whose weight is used once more, directly: hooks on the module see only one use."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.inner(x)) @ self.inner.weight)

    torch.manual_seed(0)
    model = Tied().double()
    batch = {"x": torch.randn(6, 4, dtype=torch.float64), "labels": torch.randn(6, dtype=torch.float64)}
    forward = lambda module, batch: module(batch["x"])  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="molft.influence.per_sample"):
        auto = LayerwiseProblem(model, dict(model.named_parameters()), forward_fn=forward)
        grads = auto.per_sample_grads(batch)
    assert auto.layerwise is None and "differs from a backward pass of the sample alone" in caplog.text
    np.testing.assert_allclose(grads, auto.per_sample_grads_looped(batch), atol=1e-12)
    strict = LayerwiseProblem(
        model, dict(model.named_parameters()), forward_fn=forward, grad_method="layerwise"
    )
    with pytest.raises(LayerwiseUnsupported, match="inner.weight"):
        strict.per_sample_grads(batch)
    # the earlier paths stay selectable: vmap never builds the layerwise engine
    assert LayerwiseProblem(model, dict(model.named_parameters()), grad_method="vmap").layerwise is None
    with pytest.raises(ValueError, match="expected one of .*'layerwise'"):
        LayerwiseProblem(model, dict(model.named_parameters()), grad_method="hooks")


def test_bench_influence_times_the_loop_the_old_best_and_layerwise_side_by_side(data_dir):
    command = [
        sys.executable, "benchmarks/bench_influence.py", "--config", "configs/molformer-tiny.json",
        "--num_molecules", "6", "--batch_size", "3", "--repeats", "2", "--dtype", "float64", "--threads", "1",
        "--methods", "loop,loop_alone,jvp,layerwise_dot",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    assert "2 rounds of one timed pass per method in turn" in result.stdout
    for method in ("loop", "loop_alone", "jvp", "layerwise_dot"):
        assert float(rows[method][-1]) < 1e-10, rows[method]  # max |diff| from the loop's scores
    # speed-ups over the loop, the unpadded loop and the old best
    assert rows["loop"][-4] == "1.00x" and rows["loop_alone"][-3] == "1.00x" and rows["jvp"][-2] == "1.00x"
    assert "vs jvp" in result.stdout
    assert "use cpu seconds" in result.stdout  # one thread on CPU: the work, not a busy machine's waits


@pytest.mark.parametrize("head_on_features", [True, False])
def test_ekfac_scores_a_problem_built_for_cg_as_its_own(head_on_features, tmp_path):
    """--validate lds scores every estimator on the primary's problem; for cg that forward is a Gauss-Newton
    linearisation, which kronfluence's wrapped modules cannot run (this crashed a whole LDS run)."""
    pytest.importorskip("kronfluence")
    from molft.influence.runner import run_estimator

    model = tiny_regressor()
    batches = {role: [padded_batch()] for role in ("train", "query", "candidates")}

    def scores_on_problem_of(estimator: str) -> np.ndarray:
        setup = build_problem(
            model, squared_error_loss, batches, scope="head", last_k=1, head_on_features=head_on_features,
            curvature="gauss_newton", estimator=estimator, grad_method="auto", vmap_chunk_size=None,
            batch_size=5, quiet=True,
        )  # fmt: skip
        options = {"damping": 0.01, "strategy": "ekfac", "output_dir": str(tmp_path / estimator)}
        problem = problem_for_estimator(setup.problem, "ekfac", "gauss_newton")  # as --validate lds does
        scores, _ = run_estimator(
            problem, setup.batches, "ekfac", options, per_query=False, damping=0.01, quiet=True
        )
        return scores

    own, on_cg_problem = scores_on_problem_of("ekfac"), scores_on_problem_of("cg")
    assert np.isfinite(own).all() and np.abs(own).max() > 0
    np.testing.assert_allclose(on_cg_problem, own, rtol=1e-6, atol=1e-12)


def test_each_estimator_gets_its_own_forward_on_a_shared_problem():
    """TracIn on a problem built for cg took gradients of the linearisation at its checkpoints: the trained
    model's Jacobian, not the checkpoint's. Each estimator now gets the forward its own problem would have."""
    model, batch = tiny_regressor(), padded_batch()

    def built(estimator: str) -> LayerwiseProblem:
        return build_problem(
            model, squared_error_loss, {"candidates": [batch]}, scope="last_k_layers", last_k=1,
            head_on_features=False, curvature="gauss_newton", estimator=estimator, grad_method="auto",
            vmap_chunk_size=None, batch_size=5, quiet=True,
        ).problem  # fmt: skip

    for_cg, for_tracin = built("cg"), built("tracin")
    checkpoint = for_cg.theta + 0.05 * torch.randn(
        for_cg.num_params, generator=torch.Generator().manual_seed(0)
    )
    truth = for_tracin.per_sample_grads(batch, checkpoint)
    assert not torch.allclose(for_cg.per_sample_grads(batch, checkpoint), truth)  # what TracIn used to get
    plain = problem_for_estimator(for_cg, "tracin", "gauss_newton")
    assert not isinstance(plain.forward_fn, LinearisedForward)
    torch.testing.assert_close(plain.per_sample_grads(batch, checkpoint), truth)
    linearised = problem_for_estimator(for_tracin, "cg", "gauss_newton")
    assert isinstance(linearised.forward_fn, LinearisedForward)
    torch.testing.assert_close(
        linearised.per_sample_grads(batch, checkpoint), for_cg.per_sample_grads(batch, checkpoint)
    )
    assert problem_for_estimator(for_cg, "lissa", "gauss_newton") is for_cg
    assert not isinstance(problem_for_estimator(for_cg, "cg", "hessian").forward_fn, LinearisedForward)
