"""End to end: ``python compare/run.py --quick`` as a user runs it, and what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compare.run import parse_args

ROOT = Path(__file__).resolve().parents[1]


def run_quick(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "compare" / "run.py"), "--quick", "--no-progress", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two separate processes with the same flags."""
    outs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    return [(run_quick(out), out) for out in outs]


def test_quick_run_passes_and_writes_outputs(quick_runs):
    proc, out = quick_runs[0]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    assert "MNIST" in proc.stdout  # says which copy it loaded
    assert_plots_drawn(out / "output.png")


def assert_plots_drawn(path: Path) -> None:
    """``output.png`` decodes to the figure's size, and each of its three panels holds its curves:
    the JAX side's blue and the NumPy side's orange in the accuracy and loss panels, the drift's
    green in the third (pixels of those colours above the legend row; background white, grid grey;
    a 2-epoch run draws ~470 blue, ~560 orange and ~1,400 green pixels per panel)."""
    from matplotlib import colors, image

    from compare.plot import JAX_STYLE, NUMPY_STYLE

    pixels = image.imread(path)[..., :3]
    assert pixels.shape == (484, 1650, 3)  # figsize (15, 4.4) at 110 dpi
    third, above_legend = pixels.shape[1] // 3, int(0.88 * pixels.shape[0])

    def n_near(panel: int, style: dict) -> int:
        alpha = style.get("alpha", 1.0)  # drawn over white
        target = alpha * np.asarray(colors.to_rgb(style["color"])) + (1 - alpha)
        region = pixels[:above_legend, panel * third : (panel + 1) * third]
        return int(np.sum(np.all(np.abs(region - target) < 0.1, axis=-1)))

    drift = {"color": "#2ca02c"}
    for panel in (0, 1):
        assert n_near(panel, JAX_STYLE) > 200 and n_near(panel, NUMPY_STYLE) > 200, panel
        assert n_near(panel, drift) == 0, panel
    assert n_near(2, drift) > 500
    assert n_near(2, JAX_STYLE) == n_near(2, NUMPY_STYLE) == 0


def test_legend_hides_no_data_point():
    """The legends are placed where they cover none of the plotted points (the accuracy panel's
    legend used to hide the first epoch's point)."""
    from compare.plot import comparison_figure

    rows = [
        {
            "epoch": e,
            "train_loss": {"jax": 0.4 / e, "numpy": 0.4 / e},
            "test_accuracy": {"jax": acc, "numpy": acc},
            "max_param_drift": 1e-6 * e,
            "disagreements": 0,
        }
        for e, acc in zip(range(1, 11), [0.933, 0.949, 0.962, 0.966, 0.973, 0.978, 0.978, 0.980, 0.980, 0.981])
    ]
    report = {
        "epochs": rows,
        "sides": {
            "jax": "JAX (per example, vmap + pmean)",
            "numpy": "NumPy (batched, hand backward, numba kernels, fast trainer)",
        },
        "tolerances": {"max_param_drift": 1e-4},
        "config": {"dtype": "float32", "machine_epsilon": 1.2e-7, "epochs": 10, "batch_size": 128},
    }
    fig = comparison_figure(report)
    fig.canvas.draw()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    boxes = [legend.get_window_extent() for legend in legends]
    points = [line.get_transform().transform(line.get_xydata()) for ax in fig.axes for line in ax.lines]
    covered = [tuple(p) for pts in points for p in pts for box in boxes if box.contains(*p)]
    assert legends and not covered, covered


def test_report_contents(quick_runs):
    _, out = quick_runs[0]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["failures"] == []
    config = report["config"]
    assert (config["dtype"], config["epochs"], config["batch_size"], config["n_train"], config["n_test"]) == (
        "float32",
        2,
        128,
        4096,
        1000,
    )

    quantities = [row["quantity"] for row in report["step0"]]
    # Every parameter's gradient and every running statistic is in the table.
    for i in range(3):
        for key in ("weight", "gamma", "beta"):
            assert f"grad layer {i} {key}" in quantities
        assert f"running mean {i}" in quantities and f"running var {i}" in quantities
    assert "grad layer 3 weight" in quantities and "grad layer 3 bias" in quantities
    assert "loss" in quantities and "logits (train mode)" in quantities
    for row in report["step0"]:
        assert set(row) >= {"quantity", "max_abs_err", "max_rel_err", "tol", "ok"}
        assert row["ok"] is True and 0 <= row["max_rel_err"] <= row["tol"] == 1e-4
        # float32 vs float32: the sides are not bit-identical (different summation orders) ...
        assert row["max_abs_err"] < 1e-3

    epochs = report["epochs"]
    assert [row["epoch"] for row in epochs] == [1, 2]
    for row in epochs:
        for key in ("jax", "numpy"):
            assert 0.8 < row["test_accuracy"][key] <= 1.0  # 4096 images, 2 epochs: well above chance
            assert 0 < row["train_loss"][key] < 1.0
        assert abs(row["train_loss"]["jax"] - row["train_loss"]["numpy"]) < 1e-4
        assert 0 <= row["max_param_drift"] <= report["tolerances"]["max_param_drift"]
        assert 0 <= row["disagreements"] <= report["tolerances"]["disagreements"]
    # ... and the loss falls from epoch 1 to epoch 2 on both sides.
    assert epochs[1]["train_loss"]["jax"] < epochs[0]["train_loss"]["jax"]
    assert report["versions"]["jax"] and report["versions"]["numpy"] and report["machine"]["cores"]


def test_timings_are_measured_and_match_what_is_printed(quick_runs):
    proc, out = quick_runs[0]
    report = json.loads((out / "report.json").read_text())
    timings, config = report["timings"], report["config"]
    stdout = " ".join(proc.stdout.split())  # the console may wrap long lines
    samples = (config["n_train"] // config["batch_size"]) * config["batch_size"] * config["epochs"]
    for key in ("jax", "numpy"):
        t = timings[key]
        assert all(np.isfinite(t[k]) and t[k] > 0 for k in ("compile_s", "train_s", "samples_per_s")), t
        assert t["train_s"] < timings["wall_s"] and t["compile_s"] < timings["wall_s"]
        assert t["samples_per_s"] == pytest.approx(samples / t["train_s"], rel=1e-12)
        printed = f"{t['train_s']:.2f} s training, {t['samples_per_s']:,.0f} samples/s"
        assert printed in stdout, (printed, stdout[-600:])
    assert timings["jax"]["train_s"] + timings["numpy"]["train_s"] < timings["wall_s"]
    assert f"wall time {timings['wall_s']:.1f} s" in stdout
    assert timings["peak_rss_mb"] > 0 and max(timings["rss_mb_per_epoch"]) <= timings["peak_rss_mb"]


def test_two_runs_are_bitwise_identical(quick_runs):
    (proc_a, out_a), (proc_b, out_b) = quick_runs
    assert proc_a.returncode == proc_b.returncode == 0
    a, b = (json.loads((out / "report.json").read_text()) for out in (out_a, out_b))
    a.pop("timings"), b.pop("timings")
    assert a == b


def test_float64_quick_run_agrees_to_rounding(tmp_path):
    proc = run_quick(tmp_path, "--dtype", "float64", "--epochs", "1", "--backend", "numpy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(row["max_rel_err"] <= 1e-10 for row in report["step0"])
    assert report["epochs"][0]["max_param_drift"] < 1e-10
    assert report["epochs"][0]["disagreements"] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-1"], "positive integer"),
        (["--epochs", "0"], "positive integer"),
        (["--batch-size", "1"], "at least 2 with batch norm"),
        (["--dtype", "float16"], "invalid choice"),
        (["--backend", "cuda"], "invalid choice"),
        (["--lr", "-0.1"], "positive"),
        (["--momentum", "1.5"], r"\[0, 1\)"),
        (["--data-dir", "/nonexistent/mnist"], "not a directory"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_before_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_batch_of_one_is_allowed_without_batch_norm():
    args = parse_args(["--batch-size", "1", "--no-batch-norm"])
    assert args.batch_size == 1 and args.no_batch_norm


def test_quick_defaults_to_two_epochs_unless_given():
    assert parse_args(["--quick"]).epochs == 2
    assert parse_args(["--quick", "--epochs", "3"]).epochs == 3
    assert parse_args([]).epochs == 10
