"""``report.json``: everything the run printed, plus versions, dtype, seed, machine and memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

from compare.plot import plot_comparison


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        **{name: _version(name) for name in ("jax", "jaxlib", "equinox", "numpy", "numba", "vmap-batchnorm")},
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc", "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
    }


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_outputs(report: dict, out: Path, wall_start: float) -> None:
    """``output.png`` and ``report.json`` in ``out``; the report's ``wall_s`` counts from ``wall_start``
    (a ``time.perf_counter()`` value) to after the plot."""
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(report, out / "output.png")
    report["timings"]["wall_s"] = time.perf_counter() - wall_start
    write_report(report, out / "report.json")
