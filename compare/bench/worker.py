"""The bench's worker: one process per thread count, held to that many cores, every library held to
that many threads; it measures the machine's peak per dtype, times the rows and hands them back as JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numba
import numpy as np
import threadpoolctl

from compare.bench.ensemble import ENSEMBLE_DTYPE, bench_ensemble
from compare.bench.limit import ENGINES, best_peak, measure_peak
from compare.bench.registry import default_registry
from compare.bench.rows import bench_batch_size, bench_epoch, with_peak
from compare.bench.runners import Setup
from compare.contract import training
from compare.contract.init import init_params, init_state
from compare.mnist import load_mnist
from numpyside.kernels.threads import THREADS_VARIABLE

ROOT = Path(__file__).resolve().parents[2]
#: Boolean options passed on to the workers.
FLAGS = ("quick", "no_epoch", "under_load")


def worker_environment(threads: int) -> dict:
    """The environment of the worker for ``threads``: every library's thread count set to it (XLA
    through ``XLA_FLAGS``). ``OPENBLAS_CORETYPE`` and the rest are left as they are."""
    env = dict(os.environ)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = str(threads)
    env[THREADS_VARIABLE] = str(threads)
    eigen = "false" if threads == 1 else "true"
    xla = f"--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={threads}"
    if threads > 1:  # one host device per core, for the ensemble rows that split members over devices;
        # first: XLA stops reading its flags at the bare word ``intra_op_parallelism_threads=``
        xla = f"--xla_force_host_platform_device_count={threads} {xla}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def hold_to_cores(threads: int) -> list[int]:
    """Let this process (and the threads it starts from now on) run on ``threads`` cores only:
    XLA's CPU client starts a pool of threads whatever ``XLA_FLAGS`` say (measured with jax 0.10:
    two busy threads with ``intra_op_parallelism_threads=1``), so its thread setting alone does
    not hold JAX to one core. Returns the cores (all of them where affinity is not supported)."""
    if not hasattr(os, "sched_setaffinity"):
        return list(range(os.cpu_count() or 1))
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        cores = cores[-threads:]  # the last ones: the first core takes more of the system's interrupts
        os.sched_setaffinity(0, cores)
    return cores


def numpy_blas_info() -> dict:
    """NumPy's BLAS as ``threadpoolctl`` describes it (library, version, threads, kernel)."""
    infos = [info for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    numpy_dir = str(Path(np.__file__).resolve().parents[1])
    ours = [info for info in infos if str(info.get("filepath", "")).startswith(numpy_dir + os.sep + "numpy")]
    return (ours or infos or [{}])[0]


def thread_settings(threads: int) -> dict:
    """What this worker runs on: the keys every bench.json row carries."""
    info = numpy_blas_info()
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    return {
        "threads": threads,
        "blas_kernel": info.get("architecture"),
        "blas_library": f"{info.get('internal_api')} {info.get('version')}",
        "blas_threads": info.get("num_threads"),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "xla_threads": threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "openblas_coretype_set": coretype is not None,
        "openblas_coretype": coretype,
    }


def worker(args) -> int:
    """The rows of one thread count, written to ``args.worker_out``."""

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwinds: the load is ended
    threads, size = args.worker_threads, "quick" if args.quick else "full"
    hold_to_cores(threads)
    impls, notes, registry = list(args.impls), [], default_registry()
    for implementation in registry.selected(impls, quick=args.quick, threads=threads):
        why = implementation.missing()
        if why:
            notes.append(why)
            impls = [impl for impl in impls if impl != implementation.impl]
    notes += [f"limit engine {engine.name} skipped: {engine.missing()}" for engine in ENGINES if engine.missing()]
    jax.config.update("jax_enable_x64", True)  # float64 XLA (a row, the limit) needs it; float32 stays float32
    settings = thread_settings(threads)

    def log(text):
        print(text, flush=True)

    log(
        f"{threads} thread(s): {settings['blas_library']} ({settings['blas_kernel']} kernels, "
        f"{settings['blas_threads']} threads), numba {settings['numba_threads']}, XLA_FLAGS={settings['xla_flags']!r}"
    )
    train_x, train_y, _, _ = load_mnist()
    rows, peaks = [], []
    for dtype in args.dtypes:
        before = measure_peak(dtype)
        params, state = init_params(args.seed, dtype), init_state(dtype)
        setup = Setup(dtype, train_x.astype(dtype), train_y, params, state)
        rng = training.batch_rng(args.seed)
        dtype_rows = []
        for batch_size in args.batch_sizes:
            dtype_rows += bench_batch_size(
                registry, setup, batch_size, size, impls, rng, log, settings, under_load=args.under_load
            )
        if not args.no_epoch:
            dtype_rows += bench_epoch(registry, setup, impls, rng, 1 if args.quick else 3, log, settings)
        if args.ensemble and dtype == ENSEMBLE_DTYPE:
            dtype_rows += bench_ensemble(setup, args.ensemble, size, log, settings)
        peak = {**best_peak(before, measure_peak(dtype)), "threads": threads}
        log(
            f"{dtype} {threads} thread(s): peak {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s ({peak['engine']}, "
            f"one {peak['n']} x {peak['n']} product, before and after the rows)"
        )
        rows += with_peak(dtype_rows, peak)
        peaks.append(peak)
    Path(args.worker_out).write_text(json.dumps({"rows": rows, "notes": notes, "peaks": peaks}))
    return 0


def run_worker(args, threads: int, console) -> dict:
    """Run :func:`worker` for ``threads`` in a process of its own; its ``rows``, ``notes`` and
    ``peaks`` (:func:`compare.bench.limit.measure_peak` per dtype)."""
    forwarded = ["--batch-sizes", *map(str, args.batch_sizes), "--dtypes", *args.dtypes, "--impls", *args.impls]
    forwarded += ["--ensemble", str(args.ensemble)] if args.ensemble else []
    forwarded += ["--seed", str(args.seed)] + [f"--{flag.replace('_', '-')}" for flag in FLAGS if getattr(args, flag)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", "compare.bench", *forwarded, "--worker-threads", str(threads)]
        process = subprocess.Popen([*command, "--worker-out", str(out)], env=worker_environment(threads), cwd=ROOT)
        try:
            code = process.wait()
        finally:
            if process.poll() is None:  # interrupted: the worker ends its competing load on SIGTERM
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if code != 0:
            raise RuntimeError(f"the {threads}-thread bench worker failed (exit status {code})")
        return json.loads(out.read_text())
