"""``vmap-bn-bench --quick --under-load`` (``compare/bench/``): it runs, and writes bench.json and bench.png of the
promised form. No timing assertions (the numbers depend on the machine and on what else it is
doing); the structure, the keys and the behaviour (thread settings, the competing load) are checked."""

from __future__ import annotations

import json
import math
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import pytest

from compare import bench
from compare.bench import limit, registry, timing, worker
from compare.bench import rows as bench_rows

REQUIRED_KEYS = {"impl", "dtype", "batch_size", "samples_per_s", "limit_samples_per_s"}
NEW_KEYS = {"threads", "blas_kernel", "under_load", "blas_library", "blas_threads", "numba_threads", "xla_threads"}


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--under-load", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_bench_writes_rows_for_every_implementation(quick_bench):
    _, rows = quick_bench
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) >= REQUIRED_KEYS | NEW_KEYS | {"openblas_coretype_set"}
        assert row["impl"] in registry.IMPLS
        assert row["dtype"] in bench_rows.DTYPES
        assert isinstance(row["batch_size"], int) and row["batch_size"] >= 2
        assert math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0
        assert math.isfinite(row["limit_samples_per_s"]) and row["limit_samples_per_s"] > 0
        assert row["threads"] == 1 and row["blas_threads"] == 1 and row["numba_threads"] == 1  # --quick: one
        assert row["cores"] is None or len(row["cores"]) == 1  # the worker runs on one core
        assert isinstance(row["blas_kernel"], str) and row["blas_kernel"]
        assert row["openblas_coretype_set"] == ("OPENBLAS_CORETYPE" in os.environ)
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
    assert all(row["batch_size"] == bench_rows.EPOCH_BATCH_SIZE and row["epoch_seconds"] > 0 for row in epoch_rows)


def test_under_load_rows_pair_with_the_idle_rows_of_the_same_run(quick_bench):
    _, rows = quick_bench
    loaded = [row for row in rows if row["under_load"]]
    idle = {(r["impl"], r["mode"], r["dtype"], r["threads"]): r for r in rows if not r["under_load"]}
    assert {(r["impl"], r["mode"]) for r in loaded} >= {("jax", "scan"), ("numba", "fast")}
    for row in loaded:
        assert row["batch_size"] == bench_rows.LOADED_BATCH_SIZE
        twin = idle[row["impl"], row["mode"], row["dtype"], row["threads"]]
        assert row["slowdown"] == pytest.approx(twin["samples_per_s"] / row["samples_per_s"])
        assert row["other_cpu"] > 0.5  # the competing processes did run while it was timed


def test_quick_bench_writes_a_plot(quick_bench):
    out, rows = quick_bench
    image = plt.imread(out / "bench.png")
    grid = (len({r["threads"] for r in rows}), len({r["dtype"] for r in rows}))
    assert image.shape[:2] == (round(4.6 * 110 * grid[0]), round(6.5 * 110 * grid[1]))
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20  # lines, not a blank canvas


def test_competing_load_spins_and_is_ended_by_pid():
    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    with timing.competing_load(2, seconds=60) as pids:
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        with timing.CpuLoad() as load:
            time.sleep(0.3)
        assert load.other > 1.0  # two spinning processes use more than one core between them
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(KeyboardInterrupt), timing.competing_load(1, seconds=60) as pids:
        raise KeyboardInterrupt
    assert not alive(pids[0])


def test_workers_hold_every_library_to_the_thread_count(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    env = worker.worker_environment(1)
    assert env["OPENBLAS_NUM_THREADS"] == env["NUMBA_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1"
    assert env["VMAP_BN_THREADS"] == "1"
    assert "--xla_dump_to=/nowhere" in env["XLA_FLAGS"] and "intra_op_parallelism_threads=1" in env["XLA_FLAGS"]
    assert env["OPENBLAS_CORETYPE"] == "Haswell"  # the environment's own settings are left alone
    assert "intra_op_parallelism_threads=2" in worker.worker_environment(2)["XLA_FLAGS"]


def test_registry_of_rows():
    rows_of = registry.default_registry()  # built when asked for, not at import
    keys = [implementation.key for implementation in rows_of]
    assert len(keys) == len(set(keys))
    with pytest.raises(ValueError, match="registered already"):
        rows_of.register(rows_of.implementations[0])
    with pytest.raises(ValueError, match="impl must be one of"):
        rows_of.register(registry.Implementation("tensorflow", "eager", "TF", lambda s, b, t: None))
    quick = {i.key for i in rows_of.selected(registry.IMPLS, quick=True, threads=1)}
    full_two = {i.key for i in rows_of.selected(registry.IMPLS, quick=False, threads=2)}
    assert ("numba", "reference") not in quick and ("numba", "reference") in full_two
    assert ("numba", "fast-shared-pool") in full_two - {
        i.key for i in rows_of.selected(registry.IMPLS, quick=False, threads=1)
    }
    assert {i.impl for i in rows_of.selected(registry.IMPLS, quick=True, threads=1, epoch=True)} == set(registry.IMPLS)


def test_limit_counts_the_steps_matrix_products():
    # forward x @ W (4), backward x.T @ d (4) and d @ W.T for layers 1..3 (3)
    shapes = limit.product_shapes(128)
    assert len(shapes) == 11
    forward = 2 * 128 * (784 * 100 + 100 * 100 + 100 * 100 + 100 * 10)
    backward_dx = 2 * 128 * (100 * 100 + 100 * 100 + 100 * 10)
    assert limit.step_flops(128) == 2 * forward + backward_dx
    run = limit.blas_products(4, "float64")
    run()  # the products' shapes fit together


def test_interleaved_measurement_pairs_each_round_with_the_limit():
    calls = []
    runs = {"limit": lambda: calls.append("limit"), "a": lambda: calls.append("a")}
    timings = timing.measure_interleaved(runs, steps=1, repeats=3, limit_key="limit", warmup=1, settle=1)
    assert calls == ["limit", "a"] + ["limit", "limit", "a", "a"] * 3  # warm-up, then (settle, timed) per round
    assert set(timings) == {"limit", "a"}
    assert timings["limit"].fraction_of_limit == pytest.approx(1.0)
    assert np.isfinite(timings["a"].fraction_of_limit) and timings["a"].seconds_per_step > 0


def test_bad_arguments_exit_2(capsys):
    for argv in (
        ["--batch-sizes", "1"],
        ["--impls", "tensorflow"],
        ["--threads", "0"],
        ["--under-load", "--batch-sizes", "64"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2


def test_a_budget_cuts_rounds_not_below_the_minimum():
    def slow():
        time.sleep(0.02)

    timings = timing.measure_interleaved({"limit": slow, "a": slow}, steps=1, repeats=9, limit_key="limit", budget=0.1)
    assert timings["a"].repeats == timing.MIN_REPEATS  # 9 rounds of 2 x 2 x 20 ms would take 0.72 s
    timings = timing.measure_interleaved({"limit": slow}, steps=1, repeats=4, limit_key="limit", budget=100)
    assert timings["limit"].repeats == 4
