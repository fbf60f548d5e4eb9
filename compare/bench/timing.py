"""The bench's one timing loop, shared by every row (single models, ensembles, the limit), and the load.

:func:`measure_interleaved` times several callables round-robin and compares each with the limit of
the same round (the fastest of the limit's engines in that round); :class:`CpuLoad` says how much
other processes used the cores meanwhile; :func:`competing_load` makes such a load on purpose
(``--under-load``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

MIN_REPEATS = 3
#: Seconds the rounds at one batch size should take at most (fewer rounds, not fewer steps).
ROUNDS_BUDGET = 60.0
#: A row is flagged when other processes used more than this many cores while it was timed.
BUSY_THRESHOLD = 0.1
#: The competing processes of ``--under-load`` end themselves after this long at the latest.
LOAD_SECONDS_BOUND = 600


class CpuLoad:
    """CPU time used by OTHER processes during a block, in cores (Linux ``/proc/stat``; 0 elsewhere).

    The machine's busy time minus this process's CPU time, divided by the wall time. A BLAS whose
    threads compete with another process for the cores slows down many times over, so a timing
    taken while ``other > 0`` is not this machine's speed.
    """

    @staticmethod
    def _machine_busy() -> float | None:
        try:
            with open("/proc/stat") as fh:
                values = [int(v) for v in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = values[3] + values[4]
        return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._busy, self._own, self._wall = self._machine_busy(), sum(os.times()[:2]), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall
        busy = self._machine_busy()
        own = sum(os.times()[:2]) - self._own
        self.other = (
            0.0 if busy is None or self._busy is None else max(0.0, (busy - self._busy) - own) / max(wall, 1e-9)
        )
        return False


@dataclass
class Timing:
    seconds_per_step: float  # median over the rounds
    spread: float  # (max - min) / median of the per-step times
    repeats: int
    steps: int  # per repeat
    other_cpu: float  # max over the rounds
    fraction_of_limit: float = float("nan")  # median over the rounds of t(limit) / t(this), same round
    cpu_per_wall: float = float("nan")  # this process's CPU time / wall time while timed: cores used
    best_seconds_per_step: float = float("nan")  # the fastest round
    limit_wins: dict = field(default_factory=dict)  # of the limit: each limit key -> rounds it was the fastest in


def measure_interleaved(
    runs: dict,
    steps: int,
    repeats: int,
    limit_keys=(),
    limit_name="limit",
    warmup: int = 1,
    settle: int = 1,
    budget: float | None = None,
) -> dict[str, Timing]:
    r"""Median per-step times of several ``run()`` callables (each performs ``steps`` steps),
    timed round-robin: ``repeats`` rounds, each timing every callable once, right after
    ``settle`` untimed calls of the same callable.

    Interleaving matters on a shared or virtual machine: its speed drifts (here the step/limit
    ratio of the same code moved between 55 % and 90 % from one minute to the next as the host
    moved the two vCPUs), and callables timed one after the other would see different machines.
    The settling calls matter too: the first run after switching from one library to another is
    slower (measured: a JAX epoch right after NumPy's OpenBLAS ran 10-25 % slower than the next
    one).

    With ``limit_keys`` (some of the keys of ``runs``: different ways of doing the same work), the
    limit of round :math:`r` is the fastest of them in that round, :math:`t_r^* = \min_{k}
    t_{k,r}`; it is returned as one more timing under ``limit_name`` (its ``limit_wins``: the rounds
    each limit key was the fastest in), and every callable's ``fraction_of_limit`` is the median
    over the rounds of :math:`t_r^* / t_r`. With a ``budget`` (seconds), fewer rounds (at least
    :data:`MIN_REPEATS`) where the warm-up says ``repeats`` would take longer: a machine whose other
    processes make some rows ten times slower still ends the bench.
    """
    limit_keys = list(limit_keys)
    if limit_keys and limit_name in runs:
        raise ValueError(f"limit_name {limit_name!r} is one of the timed callables' keys: pick another")
    if any(key not in runs for key in limit_keys):
        raise ValueError(f"every limit key must be a timed callable's key, got {limit_keys}")
    start = time.perf_counter()
    for run in runs.values():
        for _ in range(warmup):
            run()
    if budget is not None and warmup:
        per_round = (time.perf_counter() - start) / warmup * (1 + settle)
        repeats = max(min(repeats, MIN_REPEATS), min(repeats, int(budget / per_round)))
    times = {key: [] for key in runs}
    others = {key: [] for key in runs}
    cores = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            for _ in range(settle):
                run()
            with CpuLoad() as load:
                cpu, start = sum(os.times()[:2]), time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
                cpu = sum(os.times()[:2]) - cpu
            times[key].append(elapsed / steps)
            others[key].append(load.other)
            cores[key].append(cpu / elapsed)
    wins = {}
    if limit_keys:  # per round, the fastest of the limit keys
        fastest = [min(limit_keys, key=lambda k: times[k][r]) for r in range(repeats)]
        times[limit_name] = [times[k][r] for r, k in enumerate(fastest)]
        others[limit_name] = [others[k][r] for r, k in enumerate(fastest)]
        cores[limit_name] = [cores[k][r] for r, k in enumerate(fastest)]
        wins = {key: fastest.count(key) for key in limit_keys}
    out = {}
    for key, values in times.items():
        median = float(np.median(values))
        ratio = (
            float(np.median([t_limit / t for t_limit, t in zip(times[limit_name], values)]))
            if limit_keys
            else float("nan")
        )
        spread = (max(values) - min(values)) / median
        out[key] = Timing(
            median,
            spread,
            repeats,
            steps,
            max(others[key]),
            ratio,
            float(np.median(cores[key])),
            float(min(values)),
            wins if key == limit_name else {},
        )
    return out


@contextlib.contextmanager
def competing_load(processes: int, seconds: float = LOAD_SECONDS_BOUND):
    """Inside: ``processes`` Python processes spin (``while True``), competing for the cores as a
    user's other work does. Each ends itself after ``seconds``; on leaving the block (normally, by
    an exception or Ctrl-C) they are killed by PID and reaped. Yields their PIDs."""
    spin = (
        "import os, time\n"
        "if hasattr(os, 'sched_setaffinity'):\n"
        "    os.sched_setaffinity(0, range(os.cpu_count()))  # every core, whatever the bench's own affinity\n"
        f"end = time.monotonic() + {float(seconds)}\n"
        "while time.monotonic() < end:\n"
        "    pass\n"
    )
    spinners = []
    try:
        for _ in range(processes):
            spinners.append(
                subprocess.Popen(
                    [sys.executable, "-c", spin],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.3)  # running before the timing starts
        yield [spinner.pid for spinner in spinners]
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
