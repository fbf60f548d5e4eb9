"""The rows of a bench run: every implementation at one batch size, and over a whole MNIST epoch, timed
round-robin with the limit (:func:`compare.bench.timing.measure_interleaved`), as bench.json rows."""

from __future__ import annotations

import os

from compare.bench.limit import LIMIT_KEY, blas_runner, step_flops
from compare.bench.registry import Registry
from compare.bench.runners import Setup
from compare.bench.timing import ROUNDS_BUDGET, Timing, competing_load, measure_interleaved
from compare.contract import training

BATCH_SIZES = (32, 128, 512, 2048)
DTYPES = ("float32", "float64")
THREADS = (1, 2)
EPOCH_BATCH_SIZE = 128
#: The batch size timed again under load.
LOADED_BATCH_SIZE = 128
#: Every timed repeat covers about this many samples (``--quick``: fewer), at least 3 steps.
SAMPLES_PER_REPEAT = {"full": 20_000, "quick": 4_000, "loaded": 10_000}
REPEATS = {"full": 5, "quick": 3, "loaded": 3}


def row(impl, mode, dtype, batch_size, timing: Timing, limit: float, settings: dict, **extra) -> dict:
    """One bench.json row. ``settings``: :func:`thread_settings` of the worker (``threads``,
    ``blas_kernel`` ...); ``under_load``: timed while :func:`competing_load` ran."""
    samples_per_s = batch_size / timing.seconds_per_step
    return {
        "impl": impl,
        "dtype": dtype,
        "batch_size": int(batch_size),
        "samples_per_s": samples_per_s,
        "limit_samples_per_s": limit,
        "mode": mode,
        "fraction_of_limit": timing.fraction_of_limit,
        "ms_per_step": 1e3 * timing.seconds_per_step,
        "spread": timing.spread,
        "repeats": timing.repeats,
        "steps_per_repeat": timing.steps,
        "other_cpu": timing.other_cpu,
        "cpu_per_wall": timing.cpu_per_wall,
        "under_load": False,
        **settings,
        **extra,
    }


def bench_batch_size(
    registry: Registry, setup: Setup, batch_size: int, size: str, impls, rng, log, settings, *, under_load: bool
):
    """Every selected row at one batch size, and the limit, timed round-robin; with ``under_load``
    (at :data:`LOADED_BATCH_SIZE`) the same runs timed again under :func:`competing_load`."""
    dtype, threads = setup.dtype, settings["threads"]
    steps = max(3, round(SAMPLES_PER_REPEAT[size] / batch_size))
    batches = training.epoch_batches(len(setup.images), batch_size, rng)[:steps]
    runs = {LIMIT_KEY: blas_runner(batch_size, dtype, steps)}
    for implementation in registry.selected(impls, quick=size == "quick", threads=threads):
        runs[implementation.key] = implementation.make(setup, batches, threads)
    timings = measure_interleaved(runs, steps, REPEATS[size], limit_key=LIMIT_KEY, budget=ROUNDS_BUDGET)
    rows = _rows(timings, setup, batch_size, settings)
    if under_load and batch_size == LOADED_BATCH_SIZE:
        loaded_steps = min(steps, max(3, round(SAMPLES_PER_REPEAT["loaded"] / batch_size)))
        if loaded_steps < steps:  # a shorter timing: every row made again for fewer steps
            runs = {key: _runner(registry, key, setup, batches[:loaded_steps], threads) for key in runs}
        with competing_load(os.cpu_count() or 1):
            timings = measure_interleaved(runs, loaded_steps, REPEATS["loaded"], limit_key=LIMIT_KEY, warmup=0)
        idle = {(r["impl"], r["mode"]): r["samples_per_s"] for r in rows}
        loaded = _rows(timings, setup, batch_size, settings, under_load=True)
        for r in loaded:
            r["slowdown"] = idle[r["impl"], r["mode"]] / r["samples_per_s"]
        rows += loaded
    for r in rows:
        load = " under load" if r["under_load"] else ""
        log(
            f"{dtype} {threads} thread{'s' if threads > 1 else ' '} B={batch_size:<5} {r['impl']:>6} {r['mode']:<16}"
            f"{r['samples_per_s']:>10,.0f} samples/s {r['fraction_of_limit']:6.1%} of the limit{load}"
        )
    return rows


def _runner(registry: Registry, key, setup, batches, threads):
    """A fresh run of the row ``key`` (or the limit) on ``batches``."""
    if key == LIMIT_KEY:
        return blas_runner(batches.shape[1], setup.dtype, len(batches))
    return registry.find(key).make(setup, batches, threads)


def _rows(timings, setup, batch_size, settings, under_load=False):
    settings = {**settings, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    limit_timing = timings[LIMIT_KEY]
    limit = batch_size / limit_timing.seconds_per_step
    gflops = step_flops(batch_size) / limit_timing.seconds_per_step / 1e9
    return [
        row(impl, mode, setup.dtype, batch_size, timing, limit, settings, limit_gflops=gflops, under_load=under_load)
        for (impl, mode), timing in timings.items()
        if (impl, mode) != LIMIT_KEY
    ] + [
        row(
            *LIMIT_KEY,
            setup.dtype,
            batch_size,
            limit_timing,
            limit,
            settings,
            limit_gflops=gflops,
            under_load=under_load,
        )
    ]


def bench_epoch(registry: Registry, setup: Setup, impls, rng, repeats: int, log, settings) -> list[dict]:
    """A whole MNIST epoch (60,000 images, batch 128) per implementation, timed round-robin
    together with the limit's products for as many steps."""
    batch_size, threads = EPOCH_BATCH_SIZE, settings["threads"]
    batches = training.epoch_batches(len(setup.images), batch_size, rng)
    steps = len(batches)
    runs = {"limit": blas_runner(batch_size, setup.dtype, steps)}
    for implementation in registry.selected(impls, quick=True, threads=threads, epoch=True):
        runs[implementation.impl] = implementation.make(setup, batches, threads)
    timings = measure_interleaved(runs, steps, repeats, limit_key="limit", warmup=0, settle=1)
    limit = batch_size / timings.pop("limit").seconds_per_step
    rows = []
    for impl, timing in timings.items():
        epoch_seconds = timing.seconds_per_step * steps
        r = row(impl, "epoch", setup.dtype, batch_size, timing, limit, settings, epoch_seconds=epoch_seconds)
        r["epoch_samples"] = steps * batch_size
        rows.append(r)
        log(
            f"{setup.dtype} {threads} thread{'s' if threads > 1 else ' '} epoch {impl:>6}: {epoch_seconds:.3f} s, "
            f"{r['samples_per_s']:,.0f} samples/s, {r['fraction_of_limit']:.1%} of the limit"
        )
    return rows
