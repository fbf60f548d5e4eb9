"""``report.json``: everything the run printed, plus versions, dtype, seed and machine."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path


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


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_outputs(report: dict, out: Path, wall_start: float) -> None:
    """``output.png`` and ``report.json`` in ``out``; the report's ``wall_s`` counts from ``wall_start``
    (a ``time.perf_counter()`` value) to after the plot."""
    import time

    from compare.plot import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(report, out / "output.png")
    report["timings"]["wall_s"] = time.perf_counter() - wall_start
    write_report(report, out / "report.json")
