"""Throughput of one training step (gather, forward, backward, SGD) of every implementation, next to
"the limit": the step's 11 matrix products done by NumPy's BLAS alone on the same shapes.

    vmap-bn-bench [--quick] [--threads 1 2] [--under-load] [--out DIR] [--batch-sizes ...] [--dtypes ...]
                  [--ensemble M] [--scaling]

Each thread count runs in a process of its own, on that many cores (CPU affinity), with OpenBLAS,
numba, XLA's intra-op pool and PyTorch held to that many threads. There, per dtype and
batch size, the rows of :data:`REGISTRY` and the limit are timed round-robin
(:func:`measure_interleaved`): a row's ``fraction_of_limit`` is the median over the rounds of
``t(limit) / t(row)`` in the same round. ``--under-load`` times batch 128 again while processes of
the bench's own keep every core busy (:func:`competing_load`) and gives each row's slowdown. Output:
tables, ``bench.json`` (a list of rows, keys in :func:`row`) and ``bench.png`` in ``--out``. To add
a row, :func:`register` an :class:`Implementation`. Method and results: ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python compare/bench.py`: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from compare import contract
from compare.contract import training

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("jax", "numpy", "numba", "torch")
BATCH_SIZES = (32, 128, 512, 2048)
DTYPES = ("float32", "float64")
THREADS = (1, 2)
EPOCH_BATCH_SIZE = 128
#: The batch size timed again under load.
LOADED_BATCH_SIZE = 128
#: Learning rate of the timed steps: small and constant, the values stay sane over many repeats.
BENCH_LR = 0.01
#: Every timed repeat covers about this many samples (``--quick``: fewer), at least 3 steps.
SAMPLES_PER_REPEAT = {"full": 20_000, "quick": 4_000, "loaded": 10_000}
REPEATS = {"full": 5, "quick": 3, "loaded": 3}
MIN_REPEATS = 3
#: Seconds the rounds at one batch size should take at most (fewer rounds, not fewer steps).
ROUNDS_BUDGET = 60.0
#: A row is flagged when other processes used more than this many cores while it was timed.
BUSY_THRESHOLD = 0.1
#: The competing processes of ``--under-load`` end themselves after this long at the latest.
LOAD_SECONDS_BOUND = 600
#: The command that runs the bench on this CPU's own OpenBLAS kernels where the environment pins them.
NATIVE_KERNEL_COMMAND = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE vmap-bn-bench"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


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


def measure_interleaved(
    runs: dict, steps: int, repeats: int, limit_key=None, warmup: int = 1, settle: int = 1, budget: float | None = None
) -> dict[str, Timing]:
    """Median per-step times of several ``run()`` callables (each performs ``steps`` steps),
    timed round-robin: ``repeats`` rounds, each timing every callable once, right after
    ``settle`` untimed calls of the same callable.

    Interleaving matters on a shared or virtual machine: its speed drifts (here the step/limit
    ratio of the same code moved between 55 % and 90 % from one minute to the next as the host
    moved the two vCPUs), and callables timed one after the other would see different machines.
    The settling calls matter too: the first run after switching from one library to another is
    slower (measured: a JAX epoch right after NumPy's OpenBLAS ran 10-25 % slower than the next
    one). With ``limit_key``, every callable's ``fraction_of_limit`` is the median over the rounds
    of ``t(limit) / t(callable)`` measured in the same round. With a ``budget`` (seconds), fewer
    rounds (at least :data:`MIN_REPEATS`) where the warm-up says ``repeats`` would take longer: a
    machine whose other processes make some rows ten times slower still ends the bench.
    """
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
    out = {}
    for key, values in times.items():
        median = float(np.median(values))
        ratio = (
            float(np.median([t_limit / t for t_limit, t in zip(times[limit_key], values)]))
            if limit_key is not None
            else float("nan")
        )
        spread = (max(values) - min(values)) / median
        out[key] = Timing(median, spread, repeats, steps, max(others[key]), ratio, float(np.median(cores[key])))
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


# ------------------------------------------------------------------------------------------------
# the limit: the step's matrix products with NumPy's BLAS (and with XLA)
# ------------------------------------------------------------------------------------------------


def product_shapes(batch_size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The (m, k) x (k, n) shapes of one training step's 11 matrix products."""
    sizes, b = contract.LAYER_SIZES, batch_size
    layers = range(len(sizes) - 1)
    forward = [((b, sizes[i]), (sizes[i], sizes[i + 1])) for i in layers]  # x @ W
    weight_grads = [((sizes[i], b), (b, sizes[i + 1])) for i in layers]  # x.T @ d
    input_grads = [((b, sizes[i + 1]), (sizes[i + 1], sizes[i])) for i in layers if i > 0]  # d @ W.T
    return forward + weight_grads + input_grads


def step_flops(batch_size: int) -> int:
    return sum(2 * m * k * n for (m, k), (_, n) in product_shapes(batch_size))


def blas_products(batch_size: int, dtype: str, seed: int = 0):
    """A callable doing the step's 11 products with ``np.matmul(..., out=)`` on random data, in
    the layouts the NumPy side uses (``x.T @ d`` and ``d @ W.T`` from transposed views)."""
    rng = np.random.default_rng(seed)
    sizes, b = contract.LAYER_SIZES, batch_size
    layers = range(len(sizes) - 1)
    xs = [rng.standard_normal((b, sizes[i])).astype(dtype) for i in layers]
    ws = [rng.standard_normal((sizes[i], sizes[i + 1])).astype(dtype) for i in layers]
    ds = [rng.standard_normal((b, sizes[i + 1])).astype(dtype) for i in layers]
    outs = [np.empty((b, sizes[i + 1]), dtype) for i in layers]
    dws = [np.empty_like(w) for w in ws]
    dxs = [np.empty((b, sizes[i]), dtype) for i in layers]
    matmul = np.matmul

    def products():
        for i in layers:
            matmul(xs[i], ws[i], out=outs[i])
            matmul(xs[i].T, ds[i], out=dws[i])
            if i:
                matmul(ds[i], ws[i].T, out=dxs[i])

    return products


def blas_runner(batch_size: int, dtype: str, steps: int):
    products = blas_products(batch_size, dtype)

    def run():
        for _ in range(steps):
            products()

    return run


def xla_products(batch_size: int, dtype: str, steps: int, images: np.ndarray, seed: int = 0):
    """The same 11 products in XLA: a jitted ``lax.scan`` over ``steps`` steps whose body gathers
    a batch and runs the products with the network's data dependencies (each product's output is
    the next one's input, no elementwise work in between). The weight gradients are summed into
    the carry, so that XLA can neither drop nor hoist them (4 fused adds per step: a few us)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    sizes = contract.LAYER_SIZES
    weights = [
        jnp.asarray((rng.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(dtype))
        for i in range(len(sizes) - 1)
    ]
    data = jnp.asarray(images)
    indices = jnp.asarray(rng.integers(0, len(images), (steps, batch_size)), jnp.int32)

    # The products as jax.grad writes them: dot_general contracting the named dimensions (no
    # explicit transposes for XLA to materialise).
    def weight_grad(x, d):  # x.T @ d
        return jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())))

    def input_grad(d, w):  # d @ w.T
        return jax.lax.dot_general(d, w, (((1,), (1,)), ((), ())))

    def body(sums, idx):
        x = data[idx]
        inputs, h = [x], x
        for w in weights:  # forward: x @ W, the output feeds the next layer
            h = h @ w
            inputs.append(h)
        d, grads = inputs[-1], []
        for i in reversed(range(len(weights))):  # backward: x.T @ d, and d @ W.T for layers 3..1
            grads.append(weight_grad(inputs[i], d))
            if i:
                d = input_grad(d, weights[i])
        return [s + g for s, g in zip(sums, reversed(grads))], None

    @jax.jit
    def run(sums):
        return jax.lax.scan(body, sums, indices)[0]

    zeros = [jnp.zeros_like(w) for w in weights]
    run(zeros)[0].block_until_ready()
    return lambda: run(zeros)[0].block_until_ready()


# ------------------------------------------------------------------------------------------------
# the implementations
# ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    dtype: str
    images: np.ndarray  # training images in the dtype
    labels: np.ndarray
    params: list
    state: list
    momentum: float = training.DEFAULT_MOMENTUM


def numpy_runner(
    setup: Setup, batches: np.ndarray, threads: int, *, backend: str, reference: bool = False, shared_pool=False
):
    """The NumPy side's trainer on ``batches`` with ``threads`` threads (the reference ``Trainer``
    gets them through OpenBLAS's thread count, the process's own); ``shared_pool=True``: the numba
    FastTrainer with OpenBLAS's jobs and the kernels' parts on numba's threads (:mod:`numpyside.kernels.threads`)."""
    from numpyside.fast import FastTrainer
    from numpyside.train import Trainer

    cls = Trainer if reference else FastTrainer
    trainer = cls(setup.params, setup.state, setup.images, setup.labels, momentum=setup.momentum, backend=backend)
    if not reference:
        trainer.threads, trainer.shared_pool = threads, shared_pool
    trainer.compile(*batches.shape)
    rates = np.full(len(batches), BENCH_LR)
    return lambda: trainer.epoch(batches, rates)


def jax_scan_runner(setup: Setup, batches: np.ndarray, threads: int):
    from jaxside.train import Trainer

    trainer = Trainer(setup.params, setup.state, setup.images, setup.labels, momentum=setup.momentum)
    trainer.compile(*batches.shape)
    rates = np.full(len(batches), BENCH_LR)
    return lambda: trainer.epoch(batches, rates)


@functools.cache
def _jax_step():
    import jax

    from jaxside.model import batch_loss
    from jaxside.train import sgd_momentum

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, velocity, state, images, labels, indices, lr, momentum):
        (loss, state), grads = jax.value_and_grad(batch_loss, has_aux=True)(
            params, state, images[indices], labels[indices]
        )
        params, velocity = sgd_momentum(params, velocity, grads, lr, momentum)
        return params, velocity, state, loss

    return step


def jax_step_runner(setup: Setup, batches: np.ndarray, threads: int):
    """The training step jitted alone, one Python call (one dispatch) per step; the batch is
    gathered on the device from its indices, as in the scan."""
    import jax
    import jax.numpy as jnp

    step = _jax_step()
    dtype = np.dtype(setup.dtype)
    carry = [jax.tree_util.tree_map(lambda a: jnp.array(a, dtype), setup.params)]
    carry.append(jax.tree_util.tree_map(jnp.zeros_like, carry[0]))
    carry.append(jax.tree_util.tree_map(lambda a: jnp.array(a, dtype), list(setup.state)))
    images, labels = jax.device_put(setup.images), jax.device_put(setup.labels)
    indices = [jax.device_put(row) for row in batches.astype(np.int32)]
    lr, momentum = jnp.asarray(BENCH_LR, dtype), jnp.asarray(setup.momentum, dtype)

    def run():
        params, velocity, state = carry
        for idx in indices:
            params, velocity, state, loss = step(params, velocity, state, images, labels, idx, lr, momentum)
        loss.block_until_ready()
        carry[:] = [params, velocity, state]

    return run


def torch_runner(setup: Setup, batches: np.ndarray, threads: int):
    """The same network in PyTorch eager mode (CPU): ``sigmoid(BatchNorm1d(x @ W))`` x 3, a linear
    output layer, ``cross_entropy``, ``torch.optim.SGD(momentum=0.8)`` (no dampening: the same
    update ``v <- m v + g; p <- p - lr v``). Raises ImportError without PyTorch."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[setup.dtype]
    hidden = setup.params[:-1]
    weights = [torch.tensor(np.asarray(layer["weight"]), dtype=dtype, requires_grad=True) for layer in setup.params]
    out_bias = torch.tensor(np.asarray(setup.params[-1]["bias"]), dtype=dtype, requires_grad=True)
    norms = []
    for layer, running in zip(hidden, setup.state):
        bn = torch.nn.BatchNorm1d(len(layer["gamma"]), eps=contract.BN_EPS, momentum=contract.BN_MOMENTUM, dtype=dtype)
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(np.asarray(layer["gamma"])))
            bn.bias.copy_(torch.from_numpy(np.asarray(layer["beta"])))
            bn.running_mean.copy_(torch.from_numpy(np.asarray(running["mean"])))
            bn.running_var.copy_(torch.from_numpy(np.asarray(running["var"])))
        bn.train()
        norms.append(bn)
    parameters = weights + [out_bias] + [p for bn in norms for p in bn.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=BENCH_LR, momentum=setup.momentum)
    images = torch.from_numpy(np.ascontiguousarray(setup.images))
    labels = torch.from_numpy(setup.labels.astype(np.int64))
    indices = [torch.from_numpy(row.astype(np.int64)) for row in batches]

    def run():
        for idx in indices:
            h = images.index_select(0, idx)
            for w, bn in zip(weights[:-1], norms):
                h = torch.sigmoid(bn(h @ w))
            loss = F.cross_entropy(h @ weights[-1] + out_bias, labels.index_select(0, idx))
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()

    return run


def torch_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed: the torch rows are skipped (pip install torch to add them)"
    return True, f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads"


def _available() -> str:
    return ""


def torch_missing() -> str:
    """ "" when PyTorch can be imported, else the note that says its rows are skipped."""
    ok, note = torch_available()
    return "" if ok else note


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
    missing: Callable[[], str] = _available  # "" or why the row cannot run here

    @property
    def key(self) -> tuple[str, str]:
        return self.impl, self.mode


#: The rows of the bench, in table order; :func:`register` adds one.
REGISTRY: list[Implementation] = []


def register(implementation: Implementation) -> Implementation:
    if implementation.impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {implementation.impl!r}")
    if any(other.key == implementation.key for other in REGISTRY):
        raise ValueError(f"{implementation.key} is registered already")
    REGISTRY.append(implementation)
    return implementation


LIMIT_KEY = ("blas", "limit")
LIMIT_LABEL = "limit: NumPy BLAS, 11 products"
LIMIT_STYLE = dict(color="black", linestyle="--", marker="")

for _implementation in (
    Implementation(
        "jax",
        "xla-dot",
        "XLA dot, 11 products",
        lambda s, b, t: xla_products(b.shape[1], s.dtype, len(b), s.images),
        dict(color="#1f77b4", linestyle=":", marker=""),
    ),
    Implementation(
        "jax", "scan", "JAX, epoch in lax.scan", jax_scan_runner, dict(color="#1f77b4", marker="o"), epoch=True
    ),
    Implementation("jax", "jit-step", "JAX, jitted step per call", jax_step_runner, dict(color="#aec7e8", marker="s")),
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
):
    register(_implementation)


def selected(impls, *, quick: bool, threads: int, epoch: bool = False) -> list[Implementation]:
    """The registered rows for this run."""
    return [
        i
        for i in REGISTRY
        if i.impl in impls and (i.quick or not quick) and threads >= i.min_threads and (i.epoch or not epoch)
    ]


# ------------------------------------------------------------------------------------------------
# the benchmark (runs in a worker process per thread count)
# ------------------------------------------------------------------------------------------------


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


def bench_batch_size(setup: Setup, batch_size: int, size: str, impls, rng, log, settings, *, under_load: bool):
    """Every selected row at one batch size, and the limit, timed round-robin; with ``under_load``
    (at :data:`LOADED_BATCH_SIZE`) the same runs timed again under :func:`competing_load`."""
    dtype, threads = setup.dtype, settings["threads"]
    steps = max(3, round(SAMPLES_PER_REPEAT[size] / batch_size))
    batches = training.epoch_batches(len(setup.images), batch_size, rng)[:steps]
    runs = {LIMIT_KEY: blas_runner(batch_size, dtype, steps)}
    for implementation in selected(impls, quick=size == "quick", threads=threads):
        runs[implementation.key] = implementation.make(setup, batches, threads)
    timings = measure_interleaved(runs, steps, REPEATS[size], limit_key=LIMIT_KEY, budget=ROUNDS_BUDGET)
    rows = _rows(timings, setup, batch_size, settings)
    if under_load and batch_size == LOADED_BATCH_SIZE:
        loaded_steps = min(steps, max(3, round(SAMPLES_PER_REPEAT["loaded"] / batch_size)))
        if loaded_steps < steps:  # a shorter timing: every row made again for fewer steps
            runs = {key: _runner(key, setup, batches[:loaded_steps], threads) for key in runs}
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


def _runner(key, setup, batches, threads):
    """A fresh run of the row ``key`` (or the limit) on ``batches``."""
    if key == LIMIT_KEY:
        return blas_runner(batches.shape[1], setup.dtype, len(batches))
    implementation = next(i for i in REGISTRY if i.key == key)
    return implementation.make(setup, batches, threads)


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


def bench_epoch(setup: Setup, impls, rng, repeats: int, log, settings) -> list[dict]:
    """A whole MNIST epoch (60,000 images, batch 128) per implementation, timed round-robin
    together with the limit's products for as many steps."""
    batch_size, threads = EPOCH_BATCH_SIZE, settings["threads"]
    batches = training.epoch_batches(len(setup.images), batch_size, rng)
    steps = len(batches)
    runs = {"limit": blas_runner(batch_size, setup.dtype, steps)}
    for implementation in selected(impls, quick=True, threads=threads, epoch=True):
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


# ------------------------------------------------------------------------------------------------
# opt-in rows: an ensemble against its members one after another (--ensemble), scaling (--scaling)
# ------------------------------------------------------------------------------------------------

#: The ensemble rows' batch size and dtype (issue 11: batch 128, float32).
ENSEMBLE_BATCH_SIZE = 128
ENSEMBLE_DTYPE = "float32"


def _ensemble_key(name: str) -> tuple[str, str]:
    """``(impl, mode)`` of a row of :func:`compare.ensemble_bench.runners`: its NumPy side runs the
    numba kernels, so its rows are ``impl`` "numba"."""
    side, mode = name.split(" ", 1)
    return ("numba" if side == "numpy" else side), mode


def bench_ensemble(setup: Setup, members: int, size: str, log, settings) -> list[dict]:
    r"""The rows of :func:`compare.ensemble_bench.runners` at batch :data:`ENSEMBLE_BATCH_SIZE`,
    timed round-robin with the limit's products for ``members`` times as many steps. A row's
    ``samples_per_s`` is member-samples/s (``members x steps x batch`` over an epoch's seconds);
    ``speedup_vs_single`` is that over the same side's ``single x members`` row."""
    from compare import ensemble_bench

    batch_size, threads = ENSEMBLE_BATCH_SIZE, settings["threads"]
    steps = max(3, round(SAMPLES_PER_REPEAT[size] / batch_size))
    made = ensemble_bench.runners(
        setup.images, setup.labels, members=members, batch_size=batch_size, steps=steps, dtype=setup.dtype
    )
    runs = {LIMIT_KEY: blas_runner(batch_size, setup.dtype, members * steps)}
    for name, run in made.items():
        if "2 threads" in name and threads < 2:
            continue  # a split over two threads held to one core is not that row
        runs[_ensemble_key(name)] = run
    # per "step" = one member's step: the rows' samples/s are member-samples/s
    timings = measure_interleaved(runs, members * steps, REPEATS[size], limit_key=LIMIT_KEY, budget=ROUNDS_BUDGET)
    limit = batch_size / timings.pop(LIMIT_KEY).seconds_per_step
    rows = [
        row(impl, mode, setup.dtype, batch_size, timing, limit, settings, members=members)
        for (impl, mode), timing in timings.items()
    ]
    single = {r["impl"]: r["samples_per_s"] for r in rows if r["mode"].startswith("single")}
    for r in rows:
        r["speedup_vs_single"] = r["samples_per_s"] / single[r["impl"]]
        log(
            f"{setup.dtype} {threads} thread{'s' if threads > 1 else ' '} ensemble of {members} {r['impl']:>6} "
            f"{r['mode']:<50}{r['samples_per_s']:>10,.0f} member-samples/s x{r['speedup_vs_single']:.2f}"
        )
    return rows


def is_ensemble_row(r: dict) -> bool:
    return "members" in r


def scaling_bench_rows(rows: list[dict], dtype: str) -> list[dict]:
    """The rows of :func:`compare.scaling.scaling_rows` as bench.json rows (``impl`` "jax", ``mode``
    "sharded"): ``samples_per_s`` of the sharded trainer, the raw row under ``scaling``. Their
    processes are not held to cores (``threads`` None); no limit was timed with them."""
    info = numpy_blas_info()
    return [
        {
            "impl": "jax",
            "mode": "sharded",
            "dtype": dtype,
            "batch_size": int(r["batch_size"]),
            "samples_per_s": float(r["sharded_samples_per_s"]),
            "limit_samples_per_s": None,
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
    """:func:`compare.scaling.scaling_rows` (every configuration in fresh processes), one epoch each
    at batch :data:`ENSEMBLE_BATCH_SIZE`; ``quick``: on the ``--quick`` data."""
    from compare import scaling

    extra = ["--dtype", dtype, "--batch-size", str(ENSEMBLE_BATCH_SIZE), "--epochs", "1"]
    return scaling.scaling_rows(extra=extra + (["--quick"] if quick else []))


def worker_environment(threads: int) -> dict:
    """The environment of the worker for ``threads``: every library's thread count set to it (XLA
    through ``XLA_FLAGS``). ``OPENBLAS_CORETYPE`` and the rest are left as they are."""
    env = dict(os.environ)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = str(threads)
    from numpyside.kernels.threads import THREADS_VARIABLE

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
    import threadpoolctl

    infos = [info for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    numpy_dir = str(Path(np.__file__).resolve().parents[1])
    ours = [info for info in infos if str(info.get("filepath", "")).startswith(numpy_dir + os.sep + "numpy")]
    return (ours or infos or [{}])[0]


def thread_settings(threads: int) -> dict:
    """What this worker runs on: the keys every bench.json row carries."""
    import numba

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
    from compare.contract.init import init_params, init_state
    from compare.mnist import load_mnist

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwinds: the load is ended
    threads, size = args.worker_threads, "quick" if args.quick else "full"
    hold_to_cores(threads)
    impls = list(args.impls)
    notes = []
    for implementation in selected(impls, quick=args.quick, threads=threads):
        why = implementation.missing()
        if why:
            notes.append(why)
            impls = [impl for impl in impls if impl != implementation.impl]
    if "jax" in impls or args.ensemble:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    settings = thread_settings(threads)

    def log(text):
        print(text, flush=True)

    log(
        f"{threads} thread(s): {settings['blas_library']} ({settings['blas_kernel']} kernels, "
        f"{settings['blas_threads']} threads), numba {settings['numba_threads']}, XLA_FLAGS={settings['xla_flags']!r}"
    )
    train_x, train_y, _, _ = load_mnist()
    rows = []
    for dtype in args.dtypes:
        params, state = init_params(args.seed, dtype), init_state(dtype)
        setup = Setup(dtype, train_x.astype(dtype), train_y, params, state)
        rng = training.batch_rng(args.seed)
        for batch_size in args.batch_sizes:
            rows += bench_batch_size(setup, batch_size, size, impls, rng, log, settings, under_load=args.under_load)
        if not args.no_epoch:
            rows += bench_epoch(setup, impls, rng, 1 if args.quick else 3, log, settings)
        if args.ensemble and dtype == ENSEMBLE_DTYPE:
            rows += bench_ensemble(setup, args.ensemble, size, log, settings)
    Path(args.worker_out).write_text(json.dumps({"rows": rows, "notes": notes}))
    return 0


def run_worker(args, threads: int, console) -> tuple[list[dict], list[str]]:
    """Run :func:`worker` for ``threads`` in a process of its own; its rows and notes."""
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
        result = json.loads(out.read_text())
    return result["rows"], result["notes"]


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def labels() -> dict:
    return {LIMIT_KEY: LIMIT_LABEL, **{i.key: i.label for i in REGISTRY}}


def _label(key) -> str:
    return labels().get(key, f"{key[0]} {key[1]}")


def tables(rows: list[dict]):
    from rich.table import Table

    out = []
    ensemble = [r for r in rows if is_ensemble_row(r)]
    rows = [r for r in rows if not is_ensemble_row(r)]
    idle = [r for r in rows if not r["under_load"]]
    for dtype in dict.fromkeys(r["dtype"] for r in idle):
        for threads in sorted({r["threads"] for r in idle}):
            step_rows = [r for r in idle if r["dtype"] == dtype and r["threads"] == threads and r["mode"] != "epoch"]
            if not step_rows:
                continue
            sizes = sorted({r["batch_size"] for r in step_rows})
            table = Table(
                title=f"{dtype}, {threads} thread{'s' if threads > 1 else ''}: samples/s of a training step "
                "(share of the BLAS limit; * = other processes busy)"
            )
            table.add_column("implementation", no_wrap=True)
            for b in sizes:
                table.add_column(f"B={b}", justify="right")
            for key in dict.fromkeys((r["impl"], r["mode"]) for r in step_rows):
                cells = []
                for b in sizes:
                    match = [r for r in step_rows if (r["impl"], r["mode"]) == key and r["batch_size"] == b]
                    if not match:
                        cells.append("")
                        continue
                    r = match[0]
                    busy = "[red]*[/]" if r["other_cpu"] > BUSY_THRESHOLD else ""
                    extra = f" {r['limit_gflops']:.0f} GF/s" if key == LIMIT_KEY else f" ({r['fraction_of_limit']:.0%})"
                    cells.append(f"{r['samples_per_s'] / 1e3:,.0f}k{extra}{busy}")
                table.add_row(_label(key), *cells)
            out.append(table)
    loaded = [r for r in rows if r["under_load"]]
    if loaded:
        table = Table(title=f"Under load: B={LOADED_BATCH_SIZE} while {os.cpu_count()} spinning processes compete")
        for name in ("implementation", "dtype", "threads", "idle samples/s", "loaded samples/s", "slowdown"):
            table.add_column(name, justify="left" if name == "implementation" else "right")
        for r in loaded:
            idle_rate = r["samples_per_s"] * r["slowdown"]
            table.add_row(
                _label((r["impl"], r["mode"])),
                r["dtype"],
                str(r["threads"]),
                f"{idle_rate:,.0f}",
                f"{r['samples_per_s']:,.0f}",
                f"{r['slowdown']:.2f}x",
            )
        out.append(table)
    epoch_rows = [r for r in idle if r["mode"] == "epoch"]
    if epoch_rows:
        table = Table(
            title=f"A whole MNIST epoch ({epoch_rows[0]['epoch_samples']:,} images, batch {EPOCH_BATCH_SIZE})"
        )
        for name in ("implementation", "dtype", "threads", "seconds", "samples/s", "share of limit"):
            table.add_column(name, justify="left" if name == "implementation" else "right")
        for r in epoch_rows:
            busy = "[red]*[/]" if r["other_cpu"] > BUSY_THRESHOLD else ""
            table.add_row(
                r["impl"],
                r["dtype"],
                str(r["threads"]),
                f"{r['epoch_seconds']:.3f}",
                f"{r['samples_per_s']:,.0f}{busy}",
                f"{r['fraction_of_limit']:.0%}",
            )
        out.append(table)
    if ensemble:
        table = Table(
            title=f"Ensemble of {ensemble[0]['members']}, B={ensemble[0]['batch_size']}: member-samples/s "
            "(speed-up over the same side's single models one after another; * = other processes busy)"
        )
        for name in ("implementation", "row", "dtype", "threads", "member-samples/s", "speed-up"):
            table.add_column(name, justify="left" if name in ("implementation", "row") else "right")
        for r in ensemble:
            busy = "[red]*[/]" if r["other_cpu"] > BUSY_THRESHOLD else ""
            table.add_row(
                r["impl"],
                r["mode"],
                r["dtype"],
                str(r["threads"]),
                f"{r['samples_per_s']:,.0f}{busy}",
                f"x{r['speedup_vs_single']:.2f}",
            )
        out.append(table)
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """At batch 128: the numba FastTrainer against JAX's fastest training row, and each side's
    slowdown under load, per dtype and thread count (all from the same worker's rounds)."""
    lines = []
    rows = [r for r in rows if not is_ensemble_row(r)]
    training_modes = {"scan", "jit-step", "epoch"}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for threads in sorted({r["threads"] for r in rows}):
            here = [
                r
                for r in rows
                if r["dtype"] == dtype and r["threads"] == threads and r["batch_size"] == EPOCH_BATCH_SIZE
            ]
            idle = [r for r in here if not r["under_load"]]
            numba_rows = [r for r in idle if r["impl"] == "numba" and r["mode"] in ("fast", "epoch")]
            jax_rows = [r for r in idle if r["impl"] == "jax" and r["mode"] in training_modes]
            if numba_rows and jax_rows:
                ours = max(numba_rows, key=lambda r: r["fraction_of_limit"])
                best = max(jax_rows, key=lambda r: r["fraction_of_limit"])
                ratio = ours["fraction_of_limit"] / best["fraction_of_limit"]
                lines.append(
                    f"{dtype}, {threads} thread(s), B={EPOCH_BATCH_SIZE}: numba {ours['mode']} "
                    f"{ours['fraction_of_limit']:.0%} of the limit, JAX {best['mode']} "
                    f"{best['fraction_of_limit']:.0%}: ratio {ratio:.2f}"
                )
            slow = {r["impl"]: r["slowdown"] for r in here if r["under_load"] and r["mode"] in ("fast", "scan")}
            if "numba" in slow and "jax" in slow:
                lines.append(
                    f"{dtype}, {threads} thread(s), under load: numba fast {slow['numba']:.2f}x slower, "
                    f"JAX scan {slow['jax']:.2f}x: ratio {slow['numba'] / slow['jax']:.2f}"
                )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_rows = [r for r in rows if r["mode"] != "epoch" and not r["under_load"] and not is_ensemble_row(r)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in step_rows))
    thread_counts = sorted({r["threads"] for r in step_rows})
    styles = {LIMIT_KEY: LIMIT_STYLE, **{i.key: i.style for i in REGISTRY}}
    fig, axes = plt.subplots(
        len(thread_counts), len(dtypes), figsize=(6.5 * len(dtypes), 4.6 * len(thread_counts)), squeeze=False
    )
    for ax_row, threads in zip(axes, thread_counts):
        for ax, dtype in zip(ax_row, dtypes):
            here = [r for r in step_rows if r["dtype"] == dtype and r["threads"] == threads]
            for key in dict.fromkeys((r["impl"], r["mode"]) for r in here):
                series = sorted((r["batch_size"], r["samples_per_s"]) for r in here if (r["impl"], r["mode"]) == key)
                ax.plot(*zip(*series), label=_label(key), linewidth=1.8, markersize=6, **styles.get(key, {}))
            title = f"training step, {dtype}, {threads} thread{'s' if threads > 1 else ''}"
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples / s", title=title)
            sizes = sorted({r["batch_size"] for r in here})
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: Boolean options passed on to the workers.
FLAGS = ("quick", "no_epoch", "under_load")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmap-bn-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: float32, batch size 128, one thread, 3 short repeats, no reference trainers",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where bench.json and bench.png go")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help=f"default {list(BATCH_SIZES)}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help=f"default {list(DTYPES)}")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help=f"thread counts to run (default {list(THREADS)})"
    )
    parser.add_argument(
        "--under-load",
        action="store_true",
        help=f"time B={LOADED_BATCH_SIZE} again while processes of the bench keep every core busy",
    )
    parser.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch rows")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=0,
        metavar="M",
        help=f"also an ensemble of M at B={ENSEMBLE_BATCH_SIZE}, {ENSEMBLE_DTYPE}, against M single models one "
        "after another (member-samples/s)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also the data-parallel scaling table: samples/s against processes and devices (bench.json mode "
        '"sharded")',
    )
    parser.add_argument("--seed", type=int, default=training.DEFAULT_SEED)
    parser.add_argument("--worker-threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([LOADED_BATCH_SIZE] if args.quick else list(BATCH_SIZES))
    args.dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))
    args.impls = list(dict.fromkeys(args.impls))
    threads = list(dict.fromkeys(args.threads or ([1] if args.quick else THREADS)))
    if any(b < 2 for b in args.batch_sizes):
        parser.error("batch sizes must be at least 2 (batch norm)")
    if any(t < 1 for t in threads):
        parser.error("thread counts must be at least 1")
    if args.under_load and LOADED_BATCH_SIZE not in args.batch_sizes:
        parser.error(f"--under-load times batch size {LOADED_BATCH_SIZE}: include it in --batch-sizes")
    if args.ensemble and (args.ensemble < 2 or ENSEMBLE_DTYPE not in args.dtypes):
        parser.error(f"--ensemble needs at least 2 members and {ENSEMBLE_DTYPE} in --dtypes")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    if args.worker_threads is not None:
        return worker(args)

    from rich.console import Console

    from compare.report import machine

    console = Console(width=None if Console().is_terminal else 120)
    console.rule("[bold]vmap-batchnorm benchmark: one training step, samples/s")
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "XLA_", "NUMBA_"))}
    console.print(f"  {machine()['cpu']}, {os.cpu_count()} cores; " + ", ".join(f"{k}={v}" for k, v in env.items()))
    coretype_note = ""
    if "OPENBLAS_CORETYPE" in os.environ:
        coretype_note = (
            f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set: OpenBLAS runs those kernels, not this "
            f"CPU's own. For the native kernel: {NATIVE_KERNEL_COMMAND}"
        )
        console.print(f"  [yellow]note[/]: {coretype_note}")
    rows, notes = [], []
    for count in threads:
        worker_rows, worker_notes = run_worker(args, count, console)
        rows += worker_rows
        notes += [note for note in worker_notes if note not in notes]
    if args.scaling:
        from compare.scaling import scaling_table

        scaling = bench_scaling(args.quick, ENSEMBLE_DTYPE)
        rows += scaling_bench_rows(scaling, ENSEMBLE_DTYPE)
    timed = [r for r in rows if r["mode"] != "sharded"]  # held to cores and timed with the limit
    for table in tables(timed):
        console.print(table)
    if args.scaling:
        console.print(scaling_table(scaling, ENSEMBLE_BATCH_SIZE))
        console.print(
            f"  [yellow]note[/]: {os.cpu_count()} cores: more devices or processes cannot run faster here, they "
            "share the same cores (see docs/sync_batchnorm.md)"
        )
    for line in verdicts(timed):
        console.print(f"  {line}")
    for note in notes:
        console.print(f"  {note}")
    busy = [r for r in timed if r["other_cpu"] > BUSY_THRESHOLD and not r["under_load"]]
    if busy:
        console.print(
            f"[yellow]note[/]: {len(busy)} rows were timed while other processes used more than "
            f"{BUSY_THRESHOLD} cores (marked *): re-run on a quiet machine for this machine's speed"
        )
    if coretype_note:
        console.print(f"[yellow]note[/]: {coretype_note}")
    args.out.mkdir(parents=True, exist_ok=True)
    # bench.json: the implementations' rows (the limit is in every row's limit_samples_per_s)
    (args.out / "bench.json").write_text(json.dumps([r for r in rows if r["impl"] in IMPLS], indent=1) + "\n")
    plot(timed, args.out / "bench.png")
    console.print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
