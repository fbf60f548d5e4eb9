"""The rows of a bench run: every implementation at one batch size, and over a whole MNIST epoch, timed
round-robin with the limit's engines (:func:`compare.bench.timing.measure_interleaved`), as bench.json rows."""

from __future__ import annotations

import os

from compare.bench.limit import LIMIT_KEY, engine_runs, is_engine_key, limit_fields, step_flops
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


def row(impl, mode, dtype, batch_size, timing: Timing, limit: dict, settings: dict, **extra) -> dict:
    """One bench.json row. ``limit``: :func:`compare.bench.limit.limit_fields` of the same rounds
    (``limit_samples_per_s``, ``limit_engine`` ...); ``settings``: :func:`thread_settings` of the
    worker (``threads``, ``blas_kernel`` ...); ``under_load``: timed while :func:`competing_load`
    ran. ``flops_per_s`` counts the step's 11 products only (:func:`compare.bench.limit.step_flops`);
    the machine's peak is added by :func:`with_peak`."""
    samples_per_s = batch_size / timing.seconds_per_step
    flops_per_s = step_flops(batch_size) / timing.seconds_per_step
    return {
        "impl": impl,
        "dtype": dtype,
        "batch_size": int(batch_size),
        "samples_per_s": samples_per_s,
        "limit_samples_per_s": limit["limit_samples_per_s"],
        "mode": mode,
        "fraction_of_limit": timing.fraction_of_limit,
        "ms_per_step": 1e3 * timing.seconds_per_step,
        "spread": timing.spread,
        "repeats": timing.repeats,
        "steps_per_repeat": timing.steps,
        "other_cpu": timing.other_cpu,
        "cpu_per_wall": timing.cpu_per_wall,
        "under_load": False,
        **limit,
        "flops_per_s": flops_per_s,
        "peak_flops_per_s": None,
        "peak_engine": None,
        "fraction_of_peak": None,
        **settings,
        **extra,
    }


def with_peak(rows: list[dict], peak: dict) -> list[dict]:
    """``rows`` (of one dtype and thread count) with the machine's peak (:func:`compare.bench.limit.measure_peak`):
    ``peak_flops_per_s``, ``peak_engine`` and each row's ``fraction_of_peak``."""
    for r in rows:
        r.update(peak_flops_per_s=peak["flops_per_s"], peak_engine=peak["engine"])
        r["fraction_of_peak"] = r["flops_per_s"] / peak["flops_per_s"]
    return rows


def _log_name(threads: int) -> str:
    return f"{threads} thread{'s' if threads > 1 else ' '}"


def bench_batch_size(
    registry: Registry, setup: Setup, batch_size: int, size: str, impls, rng, log, settings, *, under_load: bool
):
    """Every selected row at one batch size, and the limit's engines, timed round-robin; with
    ``under_load`` (at :data:`LOADED_BATCH_SIZE`) the same runs timed again under :func:`competing_load`."""
    dtype, threads = setup.dtype, settings["threads"]
    steps = max(3, round(SAMPLES_PER_REPEAT[size] / batch_size))
    batches = training.epoch_batches(len(setup.images), batch_size, rng)[:steps]
    runs = engine_runs(batch_size, dtype, steps, setup.images)
    engines = list(runs)
    for implementation in registry.selected(impls, quick=size == "quick", threads=threads):
        runs[implementation.key] = implementation.make(setup, batches, threads)
    timings = measure_interleaved(
        runs, steps, REPEATS[size], limit_keys=engines, limit_name=LIMIT_KEY, budget=ROUNDS_BUDGET
    )
    rows = _rows(timings, setup, batch_size, settings)
    if under_load and batch_size == LOADED_BATCH_SIZE:
        loaded_steps = min(steps, max(3, round(SAMPLES_PER_REPEAT["loaded"] / batch_size)))
        if loaded_steps < steps:  # a shorter timing: every row made again for fewer steps
            runs = engine_runs(batch_size, dtype, loaded_steps, setup.images) | {
                key: registry.find(key).make(setup, batches[:loaded_steps], threads)
                for key in runs
                if key not in engines
            }
        with competing_load(os.cpu_count() or 1):
            timings = measure_interleaved(
                runs, loaded_steps, REPEATS["loaded"], limit_keys=engines, limit_name=LIMIT_KEY, warmup=0
            )
        idle = {(r["impl"], r["mode"]): r["samples_per_s"] for r in rows}
        loaded = _rows(timings, setup, batch_size, settings, under_load=True)
        for r in loaded:
            r["slowdown"] = idle[r["impl"], r["mode"]] / r["samples_per_s"]
        rows += loaded
    for r in rows:
        load = " under load" if r["under_load"] else ""
        log(
            f"{dtype} {_log_name(threads)} B={batch_size:<5} {r['impl']:>6} {r['mode']:<16}"
            f"{r['samples_per_s']:>10,.0f} samples/s {r['fraction_of_limit']:6.1%} of the limit "
            f"({r['limit_engine']}){load}"
        )
    return rows


def _rows(timings, setup, batch_size, settings, under_load=False):
    """The rows of one timing: the limit and its engines first (in the tables; bench.json keeps the
    implementations' rows, each with its limit), then the implementations."""
    settings = {**settings, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    limit = limit_fields(timings, batch_size)
    keys = sorted(timings, key=lambda key: (key != LIMIT_KEY, not is_engine_key(key)))  # limit, engines, rest
    return [row(*key, setup.dtype, batch_size, timings[key], limit, settings, under_load=under_load) for key in keys]


def bench_epoch(registry: Registry, setup: Setup, impls, rng, repeats: int, log, settings) -> list[dict]:
    """A whole MNIST epoch (60,000 images, batch 128) per implementation, timed round-robin
    together with the limit's engines for as many steps."""
    batch_size, threads = EPOCH_BATCH_SIZE, settings["threads"]
    batches = training.epoch_batches(len(setup.images), batch_size, rng)
    steps = len(batches)
    runs = engine_runs(batch_size, setup.dtype, steps, setup.images)
    engines = list(runs)
    for implementation in registry.selected(impls, quick=True, threads=threads, epoch=True):
        runs[implementation.impl] = implementation.make(setup, batches, threads)
    timings = measure_interleaved(runs, steps, repeats, limit_keys=engines, limit_name=LIMIT_KEY, warmup=0, settle=1)
    limit = limit_fields(timings, batch_size)
    rows = []
    for impl, timing in timings.items():
        if is_engine_key(impl):
            continue
        epoch_seconds = timing.seconds_per_step * steps
        r = row(impl, "epoch", setup.dtype, batch_size, timing, limit, settings, epoch_seconds=epoch_seconds)
        r["epoch_samples"] = steps * batch_size
        rows.append(r)
        log(
            f"{setup.dtype} {_log_name(threads)} epoch {impl:>6}: {epoch_seconds:.3f} s, "
            f"{r['samples_per_s']:,.0f} samples/s, {r['fraction_of_limit']:.1%} of the limit ({r['limit_engine']})"
        )
    return rows
