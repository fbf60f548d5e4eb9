"""End to end: ``python compare/run.py --quick`` as a user runs it, and what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    png = (out / "output.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


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
