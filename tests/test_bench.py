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
from numpyside.kernels import gemm

REQUIRED_KEYS = {"impl", "dtype", "batch_size", "samples_per_s", "limit_samples_per_s"}
NEW_KEYS = {"threads", "blas_kernel", "under_load", "blas_library", "blas_threads", "numba_threads", "xla_threads"}
LIMIT_KEYS = {"limit_engine", "limit_engines", "flops_per_s", "fraction_of_peak", "peak_flops_per_s"}
ENGINE_NAMES = {engine.name for engine in limit.ENGINES}


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
        check_limit_and_flops(row)
    impls = {row["impl"] for row in rows}
    assert {"jax", "numpy", "numba"} <= impls
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "torch" not in impls  # skipped with a note, not faked
    modes = {(row["impl"], row["mode"]) for row in rows}
    assert {("jax", "scan"), ("jax", "jit-step"), ("numpy", "fast"), ("numba", "fast")} <= modes
    epoch_rows = [row for row in rows if row["mode"] == "epoch"]
    assert {row["impl"] for row in epoch_rows} >= {"jax", "numpy", "numba"}
    assert all(row["batch_size"] == bench_rows.EPOCH_BATCH_SIZE and row["epoch_seconds"] > 0 for row in epoch_rows)


def check_limit_and_flops(row):
    """The limit of a row: the fastest engine of each round, so at least every engine's median; the
    engine that set it; the row's FLOP/s (the step's products) and its share of the machine's peak."""
    assert set(row) >= LIMIT_KEYS
    engines = row["limit_engines"]
    assert set(engines) <= ENGINE_NAMES and {"numpy-blas", "xla-dot"} <= set(engines)
    assert row["limit_engine"] in engines
    assert sum(e["fastest_rounds"] for e in engines.values()) == row["repeats"]
    assert engines[row["limit_engine"]]["fastest_rounds"] == max(e["fastest_rounds"] for e in engines.values())
    assert row["limit_samples_per_s"] >= max(e["samples_per_s"] for e in engines.values()) * (1 - 1e-12)
    flops = limit.step_flops(row["batch_size"]) * row["samples_per_s"] / row["batch_size"]
    assert row["flops_per_s"] == pytest.approx(flops)
    assert row["peak_flops_per_s"] > 0 and row["peak_engine"] in ENGINE_NAMES
    assert row["fraction_of_peak"] == pytest.approx(row["flops_per_s"] / row["peak_flops_per_s"])


def test_quick_bench_records_the_peak_and_the_machine(quick_bench):
    out, rows = quick_bench
    run = json.loads((out / "bench_run.json").read_text())
    assert {engine["name"] for engine in run["limit_engines"]} == ENGINE_NAMES
    assert run["machine"]["cpu"] and isinstance(run["machine"]["cpu_flags"], list)
    assert [(p["dtype"], p["threads"]) for p in run["peaks"]] == [("float32", 1)]  # --quick: float32, one thread
    peak = run["peaks"][0]
    assert peak["n"] == limit.PEAK_SIZE and peak["flops_per_s"] == max(peak["engines"].values())
    assert {"numpy-blas", "xla-dot"} <= set(peak["engines"]) and peak["engine"] in peak["engines"]
    assert all(row["peak_flops_per_s"] == peak["flops_per_s"] for row in rows)


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


def _products(shapes):
    """A multiset of products ``(k, {m, n})``: ``(m, k) @ (k, n)`` and its transpose are one product."""
    return sorted((k, tuple(sorted((m, n)))) for (m, k), (_, n) in shapes)


def test_limit_counts_the_steps_matrix_products():
    # forward x @ W (4), backward x.T @ d (4) and d @ W.T for layers 1..3 (3)
    shapes = limit.product_shapes(128)
    assert len(shapes) == 11
    forward = 2 * 128 * (784 * 100 + 100 * 100 + 100 * 100 + 100 * 10)
    backward_dx = 2 * 128 * (100 * 100 + 100 * 100 + 100 * 10)
    assert limit.step_flops(128) == 2 * forward + backward_dx
    run = limit.blas_products(4, "float64")
    run()  # the products' shapes fit together


def test_the_limits_products_are_the_numpy_sides(monkeypatch):
    """The products a FastTrainer step makes (np.matmul, NumPy backend) are the limit's 11."""
    from compare.contract.init import init_params, init_state
    from numpyside.fast import FastTrainer

    rng = np.random.default_rng(0)
    images, labels = rng.random((64, 784)).astype(np.float32), rng.integers(0, 10, 64)
    trainer = FastTrainer(
        init_params(0, "float32"), init_state("float32"), images, labels, momentum=0.9, backend="numpy"
    )
    seen, matmul = [], np.matmul

    def recording(a, b, **kwargs):
        seen.append((a.shape, b.shape))
        return matmul(a, b, **kwargs)

    monkeypatch.setattr(np, "matmul", recording)
    trainer.epoch(np.arange(16).reshape(1, 16), np.full(1, 0.01))
    assert _products(seen) == _products(limit.product_shapes(16))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_numba_gemm_engine_gives_the_same_products_split_into_parts(dtype):
    """The limit's numba GEMM on two threads splits each product as the fast trainer does (the
    first layer's by rows, the others by columns): every product has the bits of one thread's."""
    gemm.register(dtype)
    ops = limit.operands(100, dtype)  # 100 rows: parts of unequal size
    packed = np.empty(max(w.size for w in ops.w), dtype)
    limit._numba_gemm_steps(1, *ops, packed)
    whole = [np.copy(a) for a in (*ops.z, *ops.dw, *ops.dx[1:])]
    for out in (*ops.z, *ops.dw, *ops.dx):
        out.fill(np.nan)
    limit._numba_gemm_steps_split(1, 2, *ops, packed)
    for got, expected in zip((*ops.z, *ops.dw, *ops.dx[1:]), whole, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_the_limits_products_are_the_jax_sides():
    """The dot_generals of the JAX side's jitted loss and gradients are the limit's 11 (jax.grad
    computes no gradient for the images: the first layer has no dx there either)."""
    import jax
    import jax.extend.core

    from compare.contract.init import init_params, init_state
    from jaxside.model import batch_loss_and_grads

    images, labels = np.zeros((16, 784), np.float32), np.zeros(16, np.int32)
    closed = jax.make_jaxpr(batch_loss_and_grads)(init_params(0, "float32"), init_state("float32"), images, labels)

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, rhs_contract), batch = eqn.params["dimension_numbers"]
                assert batch == ((), ()) and len(lhs_contract) == len(rhs_contract) == 1
                lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                k = lhs[lhs_contract[0]]
                yield (lhs[1 - lhs_contract[0]], k), (k, rhs[1 - rhs_contract[0]])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    assert _products(dots(closed.jaxpr)) == _products(limit.product_shapes(16))


def test_each_round_takes_the_fastest_engine(monkeypatch):
    """The limit of a round is the fastest limit key of that round; its wins are counted per key."""
    clock = [0.0]
    durations = {"a": [1.0, 1.0, 3.0, 1.0], "b": [2.0, 2.0, 1.5, 2.0], "row": [4.0, 4.0, 4.0, 4.0]}
    calls = {key: iter(values) for key, values in durations.items()}

    def run(key):
        def advance():
            clock[0] += next(calls[key])

        return advance

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    runs = {key: run(key) for key in durations}
    timings = timing.measure_interleaved(runs, steps=1, repeats=4, limit_keys=["a", "b"], warmup=0, settle=0)
    best = timings["limit"]
    assert [best.seconds_per_step, best.best_seconds_per_step] == [1.0, 1.0]
    assert best.limit_wins == {"a": 3, "b": 1}
    assert timings["row"].fraction_of_limit == pytest.approx(1 / 4)  # rounds 1.0/4, 1.0/4, 1.5/4, 1.0/4
    assert timings["b"].fraction_of_limit == pytest.approx(0.5)
    with pytest.raises(ValueError, match="limit_name"):
        timing.measure_interleaved({"limit": run("a")}, steps=1, repeats=1, limit_keys=["limit"])


def test_interleaved_measurement_pairs_each_round_with_the_limit():
    calls = []
    runs = {"limit": lambda: calls.append("limit"), "a": lambda: calls.append("a")}
    timings = timing.measure_interleaved(runs, steps=1, repeats=3, limit_keys=["limit"], limit_name="best")
    assert calls == ["limit", "a"] + ["limit", "limit", "a", "a"] * 3  # warm-up, then (settle, timed) per round
    assert set(timings) == {"limit", "a", "best"}
    assert timings["limit"].fraction_of_limit == pytest.approx(1.0)
    assert timings["best"].seconds_per_step == timings["limit"].seconds_per_step
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

    runs = {"limit": slow, "a": slow}
    timings = timing.measure_interleaved(runs, steps=1, repeats=9, limit_keys=["limit"], limit_name="best", budget=0.1)
    assert timings["a"].repeats == timing.MIN_REPEATS  # 9 rounds of 2 x 2 x 20 ms would take 0.72 s
    timings = timing.measure_interleaved(
        {"limit": slow}, steps=1, repeats=4, limit_keys=["limit"], limit_name="b", budget=100
    )
    assert timings["limit"].repeats == 4
