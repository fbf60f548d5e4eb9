"""``compare/bench.py --quick``: it runs, and writes bench.json and bench.png of the promised form.
No timing assertions (the numbers depend on the machine and on what else it is doing)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from compare import bench

REQUIRED_KEYS = {"impl", "dtype", "batch_size", "samples_per_s", "limit_samples_per_s"}


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return out


def test_quick_bench_writes_rows_for_every_implementation(quick_bench):
    rows = json.loads((quick_bench / "bench.json").read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) >= REQUIRED_KEYS
        assert row["impl"] in bench.IMPLS
        assert row["dtype"] in bench.DTYPES
        assert isinstance(row["batch_size"], int) and row["batch_size"] >= 2
        assert math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0
        assert math.isfinite(row["limit_samples_per_s"]) and row["limit_samples_per_s"] > 0
    impls = {row["impl"] for row in rows}
    assert {"jax", "numpy", "numba"} <= impls
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "torch" not in impls  # skipped with a note, not faked
    modes = {(row["impl"], row["mode"]) for row in rows}
    assert {("jax", "scan"), ("jax", "jit-step"), ("jax", "xla-dot"), ("numpy", "fast"), ("numba", "fast")} <= modes
    epoch_rows = [row for row in rows if row["mode"] == "epoch"]
    assert {row["impl"] for row in epoch_rows} >= {"jax", "numpy", "numba"}
    assert all(row["batch_size"] == bench.EPOCH_BATCH_SIZE and row["epoch_seconds"] > 0 for row in epoch_rows)


def test_quick_bench_writes_a_plot(quick_bench):
    png = (quick_bench / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_limit_counts_the_steps_matrix_products():
    # forward x @ W (4), backward x.T @ d (4) and d @ W.T for layers 1..3 (3)
    shapes = bench.product_shapes(128)
    assert len(shapes) == 11
    forward = 2 * 128 * (784 * 100 + 100 * 100 + 100 * 100 + 100 * 10)
    backward_dx = 2 * 128 * (100 * 100 + 100 * 100 + 100 * 10)
    assert bench.step_flops(128) == 2 * forward + backward_dx
    run = bench.blas_products(4, "float64")
    run()  # the products' shapes fit together


def test_interleaved_measurement_pairs_each_round_with_the_limit():
    calls = []
    runs = {"limit": lambda: calls.append("limit"), "a": lambda: calls.append("a")}
    timings = bench.measure_interleaved(runs, steps=1, repeats=3, limit_key="limit", warmup=1, settle=1)
    assert calls == ["limit", "a"] + ["limit", "limit", "a", "a"] * 3  # warm-up, then (settle, timed) per round
    assert set(timings) == {"limit", "a"}
    assert timings["limit"].fraction_of_limit == pytest.approx(1.0)
    assert np.isfinite(timings["a"].fraction_of_limit) and timings["a"].seconds_per_step > 0


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--batch-sizes", "1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["--impls", "tensorflow"])
