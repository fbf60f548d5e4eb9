"""The rows of the bench: which implementations it times, in table order, with their labels and styles.

:func:`default_registry` builds them when a bench runs (nothing is built at import); to add a row,
``registry.register(Implementation(...))`` with a runner of :mod:`compare.bench.runners`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from compare.bench.limit import ENGINES, LIMIT_KEY, LIMIT_LABEL, LIMIT_STYLE
from compare.bench.runners import Setup, jax_scan_runner, jax_step_runner, numpy_runner, torch_missing, torch_runner

#: bench.json's ``impl`` values: the two sides (the NumPy side's two backends apart) and PyTorch.
IMPLS = ("jax", "numpy", "numba", "torch")


def _available() -> str:
    return ""


@dataclass(frozen=True)
class Implementation:
    """One row of the bench. ``make(setup, batches, threads)`` returns a callable that runs the
    ``len(batches)`` training steps (compiled and warm); ``impl`` is bench.json's ``impl`` (one of
    :data:`IMPLS`), ``mode`` tells rows of one ``impl`` apart."""

    impl: str
    mode: str
    label: str
    make: Callable[[Setup, np.ndarray, int], Callable[[], object]]
    style: dict = field(default_factory=dict)
    quick: bool = True  # timed in --quick runs too
    epoch: bool = False  # also timed on a whole MNIST epoch (mode "epoch")
    min_threads: int = 1  # rows that differ from another only with more threads
    max_threads: int | None = None  # rows that differ from another only with fewer threads
    missing: Callable[[], str] = _available  # "" or why the row cannot run here

    @property
    def key(self) -> tuple[str, str]:
        return self.impl, self.mode


class Registry:
    """The bench's rows in table order; ``register`` refuses an unknown ``impl`` or a repeated key."""

    def __init__(self, implementations=()):
        self.implementations: list[Implementation] = []
        for implementation in implementations:
            self.register(implementation)

    def __iter__(self) -> Iterator[Implementation]:
        return iter(self.implementations)

    def register(self, implementation: Implementation) -> Implementation:
        if implementation.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {implementation.impl!r}")
        if any(other.key == implementation.key for other in self.implementations):
            raise ValueError(f"{implementation.key} is registered already")
        self.implementations.append(implementation)
        return implementation

    def selected(self, impls, *, quick: bool, threads: int, epoch: bool = False) -> list[Implementation]:
        """The registered rows for this run."""
        return [
            i
            for i in self.implementations
            if i.impl in impls
            and (i.quick or not quick)
            and i.min_threads <= threads <= (i.max_threads or threads)
            and (i.epoch or not epoch)
        ]

    def find(self, key: tuple[str, str]) -> Implementation:
        return next(i for i in self.implementations if i.key == key)

    def labels(self) -> dict:
        """``(impl, mode) -> label`` of every row, of the limit and of its engines."""
        engines = {engine.key: f"  engine: {engine.label}, 11 products" for engine in ENGINES}
        return {LIMIT_KEY: LIMIT_LABEL, **engines, **{i.key: i.label for i in self.implementations}}

    def styles(self) -> dict:
        """``(impl, mode) -> matplotlib style`` of every row, of the limit and of its engines."""
        engines = {engine.key: engine.style for engine in ENGINES}
        return {LIMIT_KEY: LIMIT_STYLE, **engines, **{i.key: i.style for i in self.implementations}}


def default_registry() -> Registry:
    """The bench's rows: the JAX side's scan and jitted step, the NumPy side's fast and
    reference trainers on both backends (and the shared thread pool), PyTorch."""
    return Registry(
        [
            Implementation(
                "jax", "scan", "JAX, epoch in lax.scan", jax_scan_runner, dict(color="#1f77b4", marker="o"), epoch=True
            ),
            Implementation(
                "jax", "jit-step", "JAX, jitted step per call", jax_step_runner, dict(color="#aec7e8", marker="s")
            ),
            Implementation(
                "numpy",
                "fast",
                "NumPy FastTrainer",
                functools.partial(numpy_runner, backend="numpy"),
                dict(color="#2ca02c", marker="^"),
                epoch=True,
            ),
            Implementation(
                "numba",
                "fast",
                "numba FastTrainer",
                functools.partial(numpy_runner, backend="numba"),
                dict(color="#ff7f0e", marker="D"),
                epoch=True,
            ),
            Implementation(
                "numba",
                "fast-numba-gemm",
                "numba FastTrainer, every product on its own numba GEMM",
                functools.partial(numpy_runner, backend="numba", gemm="numba"),
                dict(color="#d62728", marker="D", linestyle="--", alpha=0.7),
                quick=False,
                max_threads=1,  # with two threads the FastTrainer's default already puts them there
            ),
            Implementation(
                "numpy",
                "reference",
                "NumPy reference Trainer",
                functools.partial(numpy_runner, backend="numpy", reference=True),
                dict(color="#98df8a", marker="v", linestyle="-."),
                quick=False,
            ),
            Implementation(
                "numba",
                "reference",
                "numba reference Trainer",
                functools.partial(numpy_runner, backend="numba", reference=True),
                dict(color="#ffbb78", marker="d", linestyle="-."),
                quick=False,
            ),
            Implementation(
                "numba",
                "fast-shared-pool",
                "numba FastTrainer, OpenBLAS's jobs on numba's threads",
                functools.partial(numpy_runner, backend="numba", shared_pool=True),
                dict(color="#ff7f0e", marker="D", linestyle=":", alpha=0.6),
                quick=False,
                min_threads=2,
            ),
            Implementation(
                "torch",
                "eager",
                "PyTorch eager",
                torch_runner,
                dict(color="#d62728", marker="x"),
                epoch=True,
                missing=torch_missing,
            ),
        ]
    )
