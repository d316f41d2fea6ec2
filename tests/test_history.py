"""History: rows, CSV and dict round trips, and the Figure 3 plot."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moller_scg import History, fit
from moller_scg.history import COLUMNS


def trained_history(max_iter: int = 8, with_validation: bool = True) -> History:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = torch.tanh(x.sum(dim=1, keepdim=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    validation = (x[:10] * 1.1, y[:10]) if with_validation else None
    return fit(model, nn.MSELoss(), (x, y), val_data=validation, batch_size=16, max_iter=max_iter, progress=False)


def test_rows_hold_the_optimizer_trace():
    history = trained_history()
    assert len(history) == 8
    assert list(history.last) == list(COLUMNS)
    assert history["closure_calls"] == sorted(history["closure_calls"])
    assert all(isinstance(value, bool) for value in history["success"])
    assert all(math.isfinite(value) for value in history["val_loss"])
    assert history["time"] == sorted(history["time"])


def test_csv_round_trip_is_exact(tmp_path):
    history = trained_history()
    path = tmp_path / "history.csv"
    history.to_csv(path)
    again = History.from_csv(path)
    for name in COLUMNS:
        for a, b in zip(history[name], again[name]):
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), name
            assert type(a) is type(b), name


def test_csv_round_trip_keeps_how_the_run_ended(tmp_path):
    history = trained_history()
    assert history.stop_reason == "max_iter" and history.best_iteration is not None
    history.detail = 'a detail, with a comma, "quotes" and\na newline'
    history.restarts = [
        {
            "iteration": 3,
            "kind": "restart",
            "reason": "stalled",
            "temperature": 0.1,
            "scale": 1e-3,
            "moves": 5,
            "accepted": 2,
            "loss_before": 0.25,
            "loss_after": 0.125,
        },
    ]
    path = tmp_path / "history.csv"
    history.to_csv(path)
    again = History.from_csv(path)
    assert again.stop_reason == "max_iter"
    assert again.best_iteration == history.best_iteration
    assert again.detail == history.detail
    assert again.restarts == history.restarts
    assert len(again) == len(history)


def test_csv_round_trip_of_an_lbfgs_run_whose_call_counts_are_nan(tmp_path):
    # fit records no closure or HVP counts for an optimizer that does not report them (NaN in integer columns).
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=3)
    history = fit(model, nn.MSELoss(), (x, y), optimizer=optimizer, max_iter=3, progress=False)
    assert all(math.isnan(value) for value in history["closure_calls"])
    path = tmp_path / "history.csv"
    history.to_csv(path)
    again = History.from_csv(path)
    assert all(math.isnan(value) for value in again["closure_calls"]) and again["loss"] == history["loss"]


def test_csv_round_trip_of_a_history_without_rows(tmp_path):
    history = History(stop_reason="max_time")
    path = tmp_path / "history.csv"
    history.to_csv(path)
    again = History.from_csv(path)
    assert len(again) == 0
    assert again.stop_reason == "max_time" and again.best_iteration is None and again.restarts == []


def test_csv_without_run_columns_still_reads(tmp_path):
    row = {name: "0.5" for name in COLUMNS} | {"k": "1", "success": "True", "closure_calls": "2", "hvp_calls": "1"}
    path = tmp_path / "old.csv"
    path.write_text(",".join(COLUMNS) + "\n" + ",".join(row[name] for name in COLUMNS) + "\n", encoding="utf-8")
    again = History.from_csv(path)
    assert again["k"] == [1] and again["success"] == [True] and again["loss"] == [0.5]
    assert again.stop_reason is None and again.best_iteration is None and again.restarts == []


def test_csv_with_foreign_header_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not the History columns"):
        History.from_csv(path)


def test_dict_round_trip_and_weights_only_safety(tmp_path):
    history = trained_history()
    history.stop_reason = "max_iter"
    path = tmp_path / "history.pt"
    torch.save(history.to_dict(), path)
    again = History.from_dict(torch.load(path, weights_only=True))
    assert again.to_dict() == history.to_dict() or all(
        a == b or (math.isnan(a) and math.isnan(b))
        for name in COLUMNS
        for a, b in zip(history[name], again[name])
        if isinstance(a, float)
    )
    assert again.stop_reason == "max_iter"


def test_from_dict_rejects_wrong_columns():
    with pytest.raises(ValueError, match="columns"):
        History.from_dict({"columns": {"k": [1]}})
    with pytest.raises(ValueError, match="different lengths"):
        History.from_dict({"columns": {name: [1] * (2 if name == "loss" else 1) for name in COLUMNS}})


def test_append_rejects_unknown_columns():
    with pytest.raises(ValueError, match="unknown History columns"):
        History().append(k=1, learning_rate=0.1)


def test_plot_writes_a_non_empty_png(tmp_path):
    history = trained_history()
    path = tmp_path / "figure3.png"
    history.plot(path, title="test")
    content = path.read_bytes()
    assert content.startswith(b"\x89PNG") and len(content) > 10_000


def test_plot_to_a_file_leaves_the_backend_and_pyplot_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    history = trained_history(max_iter=3)
    previous = matplotlib.get_backend()
    matplotlib.use("template")  # a non-interactive backend other than Agg, as a notebook's would be
    try:
        figures_before = plt.get_fignums()
        figure = history.plot(tmp_path / "figure3.png")
        assert matplotlib.get_backend() == "template"
        assert plt.get_fignums() == figures_before  # not registered with pyplot, so nothing to close or leak
        assert len(figure.axes) == 3
    finally:
        matplotlib.use(previous)
    assert (tmp_path / "figure3.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("value", [0.0, math.nan])
def test_plot_of_a_run_whose_values_are_all_zero_or_nan_draws_what_it_can(tmp_path, value):
    pytest.importorskip("matplotlib")
    history = History()
    for k in (1, 2, 3):
        history.append(
            k=k,
            loss=value,
            success=True,
            lambd=value,
            delta=value,
            residual_norm=value,
            direction_norm=value,
            closure_calls=k,
            hvp_calls=k,
            time=0.1 * k,
        )
    figure = history.plot(tmp_path / "figure3.png")
    assert [axes.get_yscale() for axes in figure.axes] == ["linear"] * 3
    assert (tmp_path / "figure3.png").read_bytes().startswith(b"\x89PNG")


def test_plot_keeps_log_scales_for_a_normal_run(tmp_path):
    pytest.importorskip("matplotlib")
    figure = trained_history(max_iter=3).plot(tmp_path / "figure3.png")
    assert [axes.get_yscale() for axes in figure.axes] == ["log"] * 3


def test_a_loss_that_goes_negative_keeps_a_linear_axis_that_shows_it(tmp_path):
    """A Gaussian negative log-likelihood goes below 0: a log axis would drop those iterations without a word."""
    pytest.importorskip("matplotlib")
    history = History()
    for k, loss in enumerate([1.0, 0.3, -0.5, -1.2, -1.5], start=1):
        history.append(k=k, loss=loss, success=True, lambd=1.0, delta=1.0, residual_norm=1.0, direction_norm=1.0)
    figure = history.plot(tmp_path / "figure3.png")
    loss_axes = figure.axes[0]
    assert loss_axes.get_yscale() == "linear" and loss_axes.get_ylim()[0] < -1.5
    success_marks = [line for line in loss_axes.get_lines() if line.get_label() == "successful step"]
    assert list(success_marks[0].get_ydata()) == [-1.5] * 5


def test_numpy_floats_are_written_as_numbers_the_csv_reads_back(tmp_path):
    numpy = pytest.importorskip("numpy")
    history = History()
    history.append(k=1, loss=numpy.float64(0.25), success=True, val_loss=numpy.float64(0.5))
    history.to_csv(tmp_path / "history.csv")
    again = History.from_csv(tmp_path / "history.csv")
    assert again["loss"] == [0.25] and again["val_loss"] == [0.5] and type(again["loss"][0]) is float


@pytest.mark.parametrize("success", [True, "numpy"])
def test_success_marks_are_drawn_for_numpy_bools_and_not_for_nan(tmp_path, success):
    pytest.importorskip("matplotlib")
    numpy = pytest.importorskip("numpy")
    mark = numpy.bool_(True) if success == "numpy" else True
    history = History()
    for k, verdict in enumerate([mark, math.nan, mark, numpy.bool_(False)], start=1):
        history.append(k=k, loss=1.0 / k, success=verdict, lambd=1.0, delta=1.0, residual_norm=1.0, direction_norm=1.0)
    loss_axes = history.plot(tmp_path / "figure3.png").axes[0]
    success_marks = [line for line in loss_axes.get_lines() if line.get_label() == "successful step"]
    assert list(success_marks[0].get_xdata()) == [1, 3]
