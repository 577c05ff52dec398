"""EK-FAC influence through kronfluence (Grosse et al. 2023), adapted to our problems and sign convention.

kronfluence tracks whole nn.Linear (and Conv2d) modules, so the EK-FAC scope is every Linear module whose
weight is in the problem's scope (its bias included when it has one); other scoped parameters are ignored
with a warning. kronfluence scores are +g_query^T (F + damping I)^-1 g_train, with F the EK-FAC
approximation of the per-sample-mean Fisher, i.e. the opposite sign of ours: we return their negation.

The Fisher is the "true" Fisher (labels sampled from the model's predictive distribution, kronfluence's
default) when the loss is the package's `squared_error_loss` (a unit-variance Gaussian: sampled labels are
prediction + N(0, 1), which makes the Fisher equal the Gauss-Newton matrix); for any other loss the
empirical Fisher (true labels) is used unless `sample_targets` is given.

The analysis works on a deep copy of the model (kronfluence wraps modules in place) and writes factors
and scores under `output_dir` (a temporary directory when None, removed with the estimator).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import data

from molft.influence.base import InfluenceEstimator
from molft.influence.problem import (
    LABELS_KEY,
    Batch,
    Batches,
    InfluenceProblem,
    ScoresAndInfo,
    squared_error_loss,
)

if TYPE_CHECKING:
    from kronfluence import Analyzer

logger = logging.getLogger(__name__)

SampleTargetsFn = Callable[[torch.Tensor], torch.Tensor]
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
ANALYSIS_NAME = "molft_influence"
FACTORS_NAME = "factors"
SCORES_NAME = "pairwise"
_HOLDER_PREFIX = "model"
# The precisions kronfluence lets a caller set when fitting factors and when scoring: all follow the problem's.
_FACTOR_DTYPES = (
    "activation_covariance_dtype",
    "gradient_covariance_dtype",
    "per_sample_gradient_dtype",
    "lambda_dtype",
)
_SCORE_DTYPES = ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype")


def gaussian_targets(predictions: torch.Tensor) -> torch.Tensor:
    """Labels drawn from N(prediction, 1): the model's predictive distribution under 0.5 * squared error."""
    return predictions + torch.randn_like(predictions)


class EKFACEstimator(InfluenceEstimator):
    """EK-FAC (or K-FAC/diagonal) preconditioning with kronfluence's Analyzer.

    strategy: kronfluence factor strategy ("ekfac", "kfac", "diagonal", "identity").
    use_empirical_fisher: None = true Fisher when labels can be sampled (see module docstring).
    sample_targets: label sampler for the true Fisher with a custom loss.
    output_dir: where kronfluence writes factors and scores; None = a temporary directory.
    seed: seeds the label sampling, so factors are reproducible.
    """

    name = "ekfac"

    def __init__(
        self,
        damping: float = 1e-3,
        strategy: str = "ekfac",
        use_empirical_fisher: bool | None = None,
        sample_targets: SampleTargetsFn | None = None,
        output_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(damping)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown kronfluence strategy {strategy!r}; expected one of {STRATEGIES}")
        self.strategy = strategy
        self.use_empirical_fisher = use_empirical_fisher
        self.sample_targets = sample_targets
        self.output_dir = output_dir
        self.seed = seed
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._analyzer: Analyzer | None = None
        self._tracked: list[str] = []
        self._dataloader_kwargs: Any = None

    def _fit(self) -> dict[str, Any]:
        # kronfluence (and accelerate) are imported only when EK-FAC is actually used: they are slow to load.
        from kronfluence import Analyzer, FactorArguments, Task, prepare_model
        from kronfluence.utils.dataset import DataLoaderKwargs

        problem = self.require_fit()
        self._dataloader_kwargs = DataLoaderKwargs(collate_fn=_single_item)
        self._tracked = tracked_linear_modules(problem)
        sampler, empirical = self._fisher_choice(problem)
        if self.output_dir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="molft_ekfac_")
        output_dir = self.output_dir or self._tmpdir.name
        # The holder gives every module a non-empty name: kronfluence cannot wrap the root module itself.
        holder = _Holder(copy.deepcopy(problem.model))
        task_class = type("ProblemTask", (_ProblemTaskMethods, Task), {})
        task = task_class(
            problem, [f"{_HOLDER_PREFIX}.{name}".rstrip(".") for name in self._tracked], sampler
        )
        model = prepare_model(holder, task)
        self._analyzer = Analyzer(
            analysis_name=ANALYSIS_NAME,
            model=model,
            task=task,
            cpu=problem.device.type == "cpu",
            disable_tqdm=True,
            output_dir=output_dir,
        )
        factor_args = FactorArguments(
            strategy=self.strategy,
            use_empirical_fisher=empirical,
            covariance_max_examples=None,
            lambda_max_examples=None,
            **_precisions(problem.dtype, _FACTOR_DTYPES),
        )
        rng_devices = [problem.device] if problem.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), _quiet_kronfluence():
            torch.manual_seed(self.seed)
            self._analyzer.fit_all_factors(
                factors_name=FACTORS_NAME,
                dataset=_BatchDataset(self.train_batches),
                per_device_batch_size=1,
                dataloader_kwargs=self._dataloader_kwargs,
                factor_args=factor_args,
                overwrite_output_dir=True,
            )
        return {
            "tracked_modules": list(self._tracked),
            "empirical_fisher": empirical,
            "output_dir": output_dir,
        }

    def _fisher_choice(self, problem: InfluenceProblem) -> tuple[SampleTargetsFn | None, bool]:
        sampler = self.sample_targets
        if sampler is None and problem.loss_fn is squared_error_loss:
            sampler = gaussian_targets
        if self.use_empirical_fisher is None:
            if sampler is None:
                logger.info("ekfac: custom loss without sample_targets; using the empirical Fisher")
            return sampler, sampler is None
        if not self.use_empirical_fisher and sampler is None:
            raise ValueError("use_empirical_fisher=False with a custom loss needs `sample_targets`")
        return sampler, self.use_empirical_fisher

    def score(
        self, query_batches: Batches, candidate_batches: Batches, per_query: bool = False
    ) -> ScoresAndInfo:
        from kronfluence import ScoreArguments

        problem = self.require_fit()
        if self._analyzer is None:
            raise RuntimeError("ekfac estimator must be fit() before use")
        start = time.perf_counter()
        score_args = ScoreArguments(damping_factor=self.damping, **_precisions(problem.dtype, _SCORE_DTYPES))
        with _quiet_kronfluence():
            self._analyzer.compute_pairwise_scores(
                scores_name=SCORES_NAME,
                factors_name=FACTORS_NAME,
                query_dataset=_BatchDataset(query_batches),
                train_dataset=_BatchDataset(candidate_batches),
                per_device_query_batch_size=1,
                per_device_train_batch_size=1,
                dataloader_kwargs=self._dataloader_kwargs,
                score_args=score_args,
                overwrite_output_dir=True,
            )
        kronfluence_scores = self._analyzer.load_pairwise_scores(scores_name=SCORES_NAME)["all_modules"]
        scores = -kronfluence_scores.to(device=problem.device, dtype=problem.dtype)
        if not torch.isfinite(scores).all():
            raise FloatingPointError("ekfac: kronfluence returned NaN/inf scores; increase damping")
        diagnostics = {
            "timings": {"pairwise_scores_s": time.perf_counter() - start},
            "solver": dict(self.fit_info),
        }
        return (scores if per_query else scores.mean(dim=0)), diagnostics

    def options(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            "strategy": self.strategy,
            "use_empirical_fisher": self.use_empirical_fisher,
            "seed": self.seed,
        }


def tracked_linear_modules(problem: InfluenceProblem) -> list[str]:
    """Names of the nn.Linear/Conv2d modules whose weight is in the scope."""
    modules = dict(problem.model.named_modules())
    tracked, ignored = [], []
    for name in problem.names:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf == "weight" and isinstance(module, nn.Linear | nn.Conv2d):
            tracked.append(module_name)
        elif not (leaf == "bias" and isinstance(module, nn.Linear | nn.Conv2d)):
            ignored.append(name)
    if not tracked:
        raise ValueError("ekfac needs at least one nn.Linear/Conv2d weight in the scope; the scope has none")
    if ignored:
        logger.warning(
            "ekfac ignores %d scoped parameters outside Linear/Conv2d modules, e.g. %s",
            len(ignored),
            ignored[:3],
        )
    return tracked


class _ProblemTaskMethods:
    """kronfluence Task methods from our forward/loss: summed per-sample losses, optional sampled labels.

    Mixed into kronfluence.Task at fit time (so kronfluence is not imported with this module).
    """

    def __init__(
        self, problem: InfluenceProblem, tracked: list[str], sampler: SampleTargetsFn | None
    ) -> None:
        self.forward_fn = problem.forward_fn
        self.loss_fn = problem.loss_fn
        self.tracked = tracked
        self.sampler = sampler

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        predictions = self.forward_fn(model.model, batch)
        if sample:
            if self.sampler is None:
                raise RuntimeError("kronfluence asked for sampled labels but no sampler is configured")
            with torch.no_grad():
                sampled = self.sampler(predictions.detach())
            batch = {**batch, LABELS_KEY: sampled}
        return self.loss_fn(predictions, batch).sum()

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.loss_fn(self.forward_fn(model.model, batch), batch).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return list(self.tracked)

    def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
        return batch.get("attention_mask")


class _Holder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class _BatchDataset(data.Dataset):
    """Our already-collated batches, one per item, so padded batches of different lengths survive."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self.batches: Sequence[Batch] = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


@contextlib.contextmanager
def _quiet_kronfluence() -> Iterator[None]:
    """kronfluence 1.0.1 uses the deprecated torch.cuda.amp.GradScaler: hide that FutureWarning only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
        yield


def _single_item(items: list[Batch]) -> Batch:
    return items[0]


def _precisions(dtype: torch.dtype, fields: tuple[str, ...]) -> dict[str, torch.dtype]:
    """Every kronfluence precision in `fields` at the problem's dtype (float64, else float32)."""
    return dict.fromkeys(fields, torch.float64 if dtype == torch.float64 else torch.float32)
