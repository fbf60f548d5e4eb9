"""The opt-in ensemble rows (``--ensemble M``): an ensemble against the same members trained one after another.

Rows in member-samples/s (``members x steps x batch`` over an epoch's seconds), timed by the bench's
one loop with the limit: :class:`jaxside.ensemble.Trainer` (nested vmaps, an epoch as one
``lax.scan``; split over two devices where the worker has them), :class:`numpyside.ensemble.Trainer`
(stacked layers, numba kernels; also over two threads) and :class:`numpyside.ensemble.FastEnsembleTrainer`,
each with every member on the same batches and with one batch order per member; and ``M`` single
trainers one after another, :class:`jaxside.train.Trainer` and :class:`numpyside.fast.FastTrainer`.
"""

from __future__ import annotations

import jax
import numpy as np

from compare.bench.limit import LIMIT_KEY, engine_runs, is_engine_key, limit_fields
from compare.bench.rows import REPEATS, SAMPLES_PER_REPEAT, row
from compare.bench.runners import BENCH_LR, Setup
from compare.bench.timing import ROUNDS_BUDGET, measure_interleaved
from compare.contract import training
from compare.contract.init import init_ensemble, init_params, init_state
from jaxside import ensemble as jax_ensemble
from jaxside.train import Trainer as JaxTrainer
from numpyside import ensemble as numpy_ensemble
from numpyside.fast import FastTrainer

#: The ensemble rows' batch size and dtype (issue 11: batch 128, float32).
ENSEMBLE_BATCH_SIZE = 128
ENSEMBLE_DTYPE = "float32"


class _Epochs:
    """One epoch of ``steps`` steps for ``members`` members: the shared and the per-member batch orders."""

    def __init__(self, setup: Setup, members: int, batch_size: int, steps: int, seed: int = 0):
        self.setup, self.members, self.batch_size, self.steps, self.seed = setup, members, batch_size, steps, seed
        self.params, self.state = init_ensemble(range(seed, seed + members), setup.dtype)
        rng = np.random.default_rng(seed)
        n = len(setup.images)
        self.shared = training.epoch_batches(n, batch_size, rng)[:steps]
        self.independent = np.stack([training.epoch_batches(n, batch_size, rng)[:steps] for _ in range(members)], 1)
        self.rates = np.full(steps, BENCH_LR)

    def of(self, trainer, batches):
        """A callable that trains ``trainer`` one epoch on ``batches`` (compiled first)."""
        trainer.compile(self.steps, self.batch_size, per_member_batches=batches.ndim == 3)
        return lambda: trainer.epoch(batches, self.rates)

    def one_after_another(self, make):
        """A callable that trains ``members`` single models one after another, each one epoch."""
        trainers = [
            make(init_params(self.seed + k, self.setup.dtype), init_state(self.setup.dtype))
            for k in range(self.members)
        ]
        for trainer in trainers:
            trainer.compile(self.steps, self.batch_size)

        def run():
            for trainer in trainers:
                trainer.epoch(self.shared, self.rates)

        return run

    def ensemble(self, cls, **options):
        s = self.setup
        return cls(self.params, self.state, s.images, s.labels, momentum=s.momentum, **options)

    def single(self, cls, **options):
        s = self.setup
        return lambda p, st: cls(p, st, s.images, s.labels, momentum=s.momentum, **options)


def jax_rows(epochs: _Epochs) -> dict:
    """The JAX side's rows: the ensemble on one device (and over two, where there are two), the singles."""
    batch_orders = (("same", epochs.shared), ("independent", epochs.independent))
    rows = {
        f"jax ensemble, {kind} batches": epochs.of(epochs.ensemble(jax_ensemble.Trainer), b) for kind, b in batch_orders
    }
    devices = min(jax.device_count(), 2)
    if devices > 1 and epochs.members % devices == 0:
        for kind, batches in batch_orders:
            trainer = epochs.ensemble(jax_ensemble.Trainer, devices=devices)
            rows[f"jax ensemble, {kind} batches, {devices} devices over members"] = epochs.of(trainer, batches)
    rows[f"jax single x {epochs.members}"] = epochs.one_after_another(epochs.single(JaxTrainer))
    return rows


def numpy_rows(epochs: _Epochs) -> dict:
    """The NumPy side's rows: the readable and the fast ensemble trainer on one and two threads, the singles."""
    rows = {}
    for name, cls, options in (
        ("numpy ensemble", numpy_ensemble.Trainer, {"backend": "numba"}),
        ("numpy fast ensemble", numpy_ensemble.FastEnsembleTrainer, {}),
    ):
        for threads in (1, 2):
            for kind, batches in (("same", epochs.shared), ("independent", epochs.independent)):
                over = ", 2 threads over members" if threads == 2 else ""
                trainer = epochs.ensemble(cls, threads=threads, **options)
                rows[f"{name}, {kind} batches{over}"] = epochs.of(trainer, batches)
    rows[f"numpy single x {epochs.members} (FastTrainer)"] = epochs.one_after_another(
        epochs.single(FastTrainer, backend="numba")
    )
    return rows


def ensemble_key(name: str) -> tuple[str, str]:
    """``(impl, mode)`` of an ensemble row: its NumPy side runs the numba kernels, so its rows are ``impl`` "numba"."""
    side, mode = name.split(" ", 1)
    return ("numba" if side == "numpy" else side), mode


def is_ensemble_row(r: dict) -> bool:
    return "members" in r


def bench_ensemble(setup: Setup, members: int, size: str, log, settings) -> list[dict]:
    r"""The ensemble rows at batch :data:`ENSEMBLE_BATCH_SIZE`, timed round-robin with the limit's
    engines for ``members`` times as many steps. A row's ``samples_per_s`` is member-samples/s
    (``members x steps x batch`` over an epoch's seconds); ``speedup_vs_single`` is that over the same
    side's ``single x members`` row."""
    batch_size, threads = ENSEMBLE_BATCH_SIZE, settings["threads"]
    steps = max(3, round(SAMPLES_PER_REPEAT[size] / batch_size))
    epochs = _Epochs(setup, members, batch_size, steps)
    runs = engine_runs(batch_size, setup.dtype, members * steps, setup.images)
    engines = list(runs)
    for name, run in {**jax_rows(epochs), **numpy_rows(epochs)}.items():
        if "2 threads" in name and threads < 2:
            continue  # a split over two threads held to one core is not that row
        runs[ensemble_key(name)] = run
    # per "step" = one member's step: the rows' samples/s are member-samples/s
    timings = measure_interleaved(
        runs, members * steps, REPEATS[size], limit_keys=engines, limit_name=LIMIT_KEY, budget=ROUNDS_BUDGET
    )
    limit = limit_fields(timings, batch_size)
    rows = [
        row(impl, mode, setup.dtype, batch_size, timing, limit, settings, members=members)
        for (impl, mode), timing in timings.items()
        if not is_engine_key((impl, mode))
    ]
    single = {r["impl"]: r["samples_per_s"] for r in rows if r["mode"].startswith("single")}
    for r in rows:
        r["speedup_vs_single"] = r["samples_per_s"] / single[r["impl"]]
        log(
            f"{setup.dtype} {threads} thread{'s' if threads > 1 else ' '} ensemble of {members} {r['impl']:>6} "
            f"{r['mode']:<50}{r['samples_per_s']:>10,.0f} member-samples/s x{r['speedup_vs_single']:.2f}"
        )
    return rows
