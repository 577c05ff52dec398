from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer

from molft import plots


@pytest.fixture
def cells() -> pd.DataFrame:
    rows = []
    for method, params, share, base in (("full", 4.7e7, 1.0, 0.70), ("lora", 2.9e5, 0.006, 0.75)):
        for k, strategy in enumerate(("none", "random", "influence_top")):
            mean = base + 0.02 * k
            rows.append(
                {
                    "method": method,
                    "strategy": strategy,
                    "test_rmse_mean": mean,
                    "test_rmse_ci_low": mean - 0.03,
                    "test_rmse_ci_high": mean + 0.04,
                    "trainable_params": params,
                    "trainable_share": share,
                    "train_wall_time_s": 100.0 * (k + 1) * (2 if method == "full" else 1),
                }
            )
    return pd.DataFrame(rows)


def _assert_written(path):
    assert path.is_file() and path.stat().st_size > 0
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary behind


def test_parity_plot(tmp_path):
    path = tmp_path / "parity.png"
    fig = plots.parity_plot([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.5, 5.0], path=path, title="test set")
    _assert_written(path)
    (ax,) = fig.axes
    assert len(ax.collections) == 2  # ± median-error band and the scatter
    assert ax.collections[1].get_offsets().shape == (4, 2)
    assert len(ax.lines) == 1  # y = x
    (annotation,) = ax.texts
    assert "RMSE = 0.612" in annotation.get_text() and "R² = 0.700" in annotation.get_text()
    # band half-width is the median absolute error (0.5)
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() - band[:, 0].max() == pytest.approx(0.5)
    assert ax.get_title() == "test set"


def test_loss_curves_with_and_without_eval(tmp_path):
    history = [
        {"loss": 1.0, "step": 10, "epoch": 0.5},
        {"loss": 0.8, "step": 20, "epoch": 1.0},
        {"eval_loss": 0.9, "eval_rmse": 0.95, "step": 20, "epoch": 1.0},
        {"loss": 0.6, "step": 30, "epoch": 1.5},
        {"train_loss": 0.8, "train_runtime": 12.0, "step": 30},
    ]
    path = tmp_path / "loss.pdf"
    fig = plots.loss_curves(history, path=path)
    _assert_written(path)
    loss_ax, rmse_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train loss", "eval loss"]
    assert list(loss_ax.lines[0].get_xdata()) == [10, 20, 30]
    assert list(rmse_ax.lines[0].get_ydata()) == [0.95]

    fig = plots.loss_curves(history[:2])
    loss_ax, rmse_ax = fig.axes
    assert len(loss_ax.lines) == 1 and not rmse_ax.lines
    assert rmse_ax.texts[0].get_text() == "no evaluation logged"
    with pytest.raises(ValueError, match="no entries"):
        plots.loss_curves([{"train_runtime": 1.0}])


def test_loss_curves_of_another_metric():
    history = [{"loss": 3.0, "step": 5}, {"eval_loss": 2.5, "eval_masked_accuracy": 0.3, "step": 10}]
    fig = plots.loss_curves(
        history, metric="eval_masked_accuracy", metric_name="accuracy", loss_name="cross-entropy", title="MLM"
    )
    loss_ax, metric_ax = fig.axes
    assert (loss_ax.get_title(), loss_ax.get_ylabel()) == ("MLM", "cross-entropy")
    assert (metric_ax.get_title(), metric_ax.get_ylabel()) == ("evaluation accuracy", "accuracy")
    assert list(metric_ax.lines[0].get_ydata()) == [0.3]
    with pytest.raises(ValueError, match="'eval_masked_accuracy'"):
        plots.loss_curves([{"train_runtime": 1.0}], metric="eval_masked_accuracy")


def test_score_histogram(tmp_path):
    path = tmp_path / "scores.png"
    fig = plots.score_histogram(np.linspace(-1, 1, 101), path=path, bins=20, title="influence")
    _assert_written(path)
    (ax,) = fig.axes
    assert len(ax.patches) == 20
    assert sum(p.get_height() for p in ax.patches) == 101
    with pytest.raises(ValueError, match="non-finite"):
        plots.score_histogram([0.1, np.nan])


def test_bars_with_ci(tmp_path, cells):
    path = tmp_path / "bars.png"
    fig = plots.bars_with_ci(cells, path=path)
    _assert_written(path)
    (ax,) = fig.axes
    bar_groups = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bar_groups) == 2  # one bar group per method
    assert len(ax.patches) == 6
    full_bars = bar_groups[0]
    assert [bar.get_height() for bar in full_bars] == pytest.approx([0.70, 0.72, 0.74])
    error_segments = full_bars.errorbar.lines[2][0].get_segments()
    assert error_segments[0][:, 1] == pytest.approx([0.67, 0.74])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "random", "influence_top"]
    with pytest.raises(ValueError, match="lacks column"):
        plots.bars_with_ci(cells, value="test_mae")


def test_metric_vs_params(tmp_path, cells):
    path = tmp_path / "params.png"
    fig = plots.metric_vs_params(cells, path=path)
    _assert_written(path)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert len(ax.containers) == len(cells)
    with pytest.raises(ValueError, match="trainable_params"):
        plots.metric_vs_params(cells.assign(trainable_params=0.0))


def test_tradeoff_figure(tmp_path, cells):
    path = tmp_path / "tradeoff.png"
    fig = plots.tradeoff_figure(cells, path=path)
    _assert_written(path)
    share_ax, time_ax = fig.axes
    assert share_ax.get_xscale() == "log" and time_ax.get_xscale() == "linear"
    assert len(share_ax.containers) == len(time_ax.containers) == len(cells)
    # wall-time panel puts each cell at its own time
    x_positions = sorted(c.lines[0].get_xdata()[0] for c in time_ax.containers)
    assert x_positions == sorted(cells["train_wall_time_s"])


def test_shift_diagnostics_plot(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "shift.png"
    fig = plots.shift_diagnostics_plot(
        rng.uniform(0.2, 0.6, 30),
        rng.uniform(0.4, 1.0, 40),
        rng.normal(2, 1, 30),
        rng.normal(1, 1, 80),
        path=path,
    )
    _assert_written(path)
    sim_ax, label_ax = fig.axes
    assert len(sim_ax.patches) == 2 * 40 and len(label_ax.patches) == 2 * 30
    assert len(sim_ax.get_legend().get_texts()) == 2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.shift_diagnostics_plot([1.2], [0.5], [1.0], [1.0])


def test_parity_plot_names_the_unit_and_counts_the_molecules():
    fig = plots.parity_plot([1.0, 2.0, 3.0], [1.1, 2.2, 2.7], title="Test set", unit="logD")
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("measured logD", "predicted logD")
    assert ax.texts[0].get_text().startswith("n = 3 molecules\nRMSE = ")
    plain = plots.parity_plot([1.0, 2.0], [1.0, 2.5]).axes[0]
    assert (plain.get_xlabel(), plain.get_ylabel()) == ("measured", "predicted")


def test_regression_loss_curves_by_epoch_with_the_best_epoch_marked(tmp_path):
    history = [
        {"loss": 1.0, "step": 5, "epoch": 0.5},
        {"loss": 0.8, "step": 10, "epoch": 1.0},
        {"eval_loss": 0.9, "eval_rmse": 0.95, "step": 10, "epoch": 1.0},
        {"loss": 0.6, "step": 15, "epoch": 1.5},
        {"loss": 0.5, "step": 20, "epoch": 2.0},
        {"eval_loss": 0.7, "eval_rmse": 0.85, "step": 20, "epoch": 2.0},
        {"eval_loss": 0.75, "eval_rmse": 0.9, "step": 30, "epoch": 3.0},
        {"train_loss": 0.7, "train_runtime": 3.0, "step": 30, "epoch": 3.0},
    ]
    path = tmp_path / "loss_curves.png"
    fig = plots.regression_loss_curves(
        history, path, loss="mse", label_name="logD", n_train=96, n_validation=12, best_step=20
    )
    _assert_written(path)
    loss_ax, rmse_ax = fig.axes
    assert loss_ax.get_xlabel() == rmse_ax.get_xlabel() == "epoch"
    assert loss_ax.get_ylabel() == "mse loss on standardised targets"
    assert loss_ax.get_title() == "loss (mse on standardised targets, 96 training molecules)"
    assert (rmse_ax.get_ylabel(), rmse_ax.get_title()) == ("RMSE (logD)", "validation RMSE (12 molecules)")
    train, evaluation, best = loss_ax.lines
    assert list(train.get_xdata()) == [0.5, 1.0, 1.5, 2.0] and list(evaluation.get_xdata()) == [1.0, 2.0, 3.0]
    assert list(best.get_xdata()) == [2.0, 2.0] and best.get_label() == "best epoch 2"
    assert list(rmse_ax.lines[-1].get_xdata()) == [2.0, 2.0]
    assert [t.get_text() for t in rmse_ax.get_legend().get_texts()] == ["best epoch 2"]
    # without a kept checkpoint: the lowest validation RMSE is marked; other scalings say what they are
    fig = plots.regression_loss_curves(history, target_scaling="minmax")
    assert fig.axes[0].lines[-1].get_label() == "best epoch 2"
    assert fig.axes[0].get_ylabel() == "mse loss on min-max scaled targets"
    with pytest.raises(ValueError, match="x_axis must be 'step' or 'epoch'"):
        plots.loss_curves(history, x_axis="time")


def test_regression_loss_curves_skip_a_run_that_logged_nothing(tmp_path):
    """A short run with no evaluation and fewer steps than --logging_steps must still finish."""
    history = [{"train_runtime": 1.0, "epoch": 1.0, "step": 53}]
    assert plots.regression_loss_curves(history, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
