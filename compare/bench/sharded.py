"""The opt-in data-parallel rows (``--scaling``): samples/s of the sharded trainer against processes and
devices (:mod:`compare.parallel.scaling`, every configuration in fresh processes), as bench.json rows."""

from __future__ import annotations

from compare.bench.ensemble import ENSEMBLE_BATCH_SIZE
from compare.bench.limit import step_flops
from compare.bench.worker import numpy_blas_info
from compare.parallel import scaling


def scaling_bench_rows(rows: list[dict], dtype: str) -> list[dict]:
    """The rows of :func:`compare.parallel.scaling.scaling_rows` as bench.json rows (``impl`` "jax", ``mode``
    "sharded"): ``samples_per_s`` of the sharded trainer (and its ``flops_per_s``: the step's 11
    products), the raw row under ``scaling``. Their processes are not held to cores (``threads``
    None); no limit was timed with them (``limit_samples_per_s``, ``limit_engine`` None)."""
    info = numpy_blas_info()
    return [
        {
            "impl": "jax",
            "mode": "sharded",
            "dtype": dtype,
            "batch_size": int(r["batch_size"]),
            "samples_per_s": float(r["sharded_samples_per_s"]),
            "limit_samples_per_s": None,
            "limit_engine": None,
            "flops_per_s": step_flops(int(r["batch_size"])) * float(r["sharded_samples_per_s"]) / int(r["batch_size"]),
            "processes": int(r["processes"]),
            "devices": int(r["devices"]),
            "devices_per_process": int(r["devices_per_process"]),
            "threads": None,
            "blas_kernel": info.get("architecture"),
            "under_load": False,
            "scaling": r,
        }
        for r in rows
    ]


def bench_scaling(quick: bool, dtype: str) -> list[dict]:
    """:func:`compare.parallel.scaling.scaling_rows` (every configuration in fresh processes), one epoch
    each at batch :data:`compare.bench.ensemble.ENSEMBLE_BATCH_SIZE`; ``quick``: on the ``--quick`` data."""
    extra = ["--dtype", dtype, "--batch-size", str(ENSEMBLE_BATCH_SIZE), "--epochs", "1"]
    return scaling.scaling_rows(extra=extra + (["--quick"] if quick else []))
