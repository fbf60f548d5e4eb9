"""Throughput of one training step (gather, forward, backward, SGD update) on this machine.

    vmap-bn-bench [--quick] [--out DIR] [--batch-sizes 32 128 512 2048] [--dtypes float32 float64]

For every dtype and batch size, in samples per second (median of repeated runs after a warm-up;
the implementations and the limit are timed round-robin, one run of each per round, because this
kind of machine drifts: see :func:`measure_interleaved`):

* ``jax``: the per-example JAX model as :class:`jaxside.train.Trainer` runs it (an epoch as one
  jitted ``lax.scan``; mode ``"scan"``), and the same step jitted on its own and called once per
  step from Python (mode ``"jit-step"``);
* ``numpy`` / ``numba``: :class:`numpyside.fast.FastTrainer` with the NumPy-ufunc and the fused
  numba kernels (mode ``"fast"``), and the readable reference :class:`numpyside.train.Trainer`
  (mode ``"reference"``); in full runs also the numba FastTrainer with OpenBLAS on its own
  threads instead of numba's (mode ``"fast-own-threads"``, see :mod:`numpyside.threads`);
* ``torch``: the same network in PyTorch eager mode on the CPU, if PyTorch is installed (an
  optional outside reference; skipped with a note otherwise);

and the machine's limit, measured in the same run: the step's matrix products (forward ``x @ W``
of all 4 layers, backward ``x.T @ d`` of all 4 and ``d @ W.T`` of layers 1..3: 11 products) done
by NumPy's BLAS on the same shapes, back to back. ``limit_samples_per_s = B / t(products)``; every
row's ``fraction_of_limit`` (the median over the rounds of ``t(products) / t(step)``, same round) is
the fraction of the machine's matrix throughput the implementation reaches.
XLA's own dot is timed on the same 11 products too (a jitted scan over the steps, ``"xla-dot"``
rows), to show where XLA's CPU matrix products, not the rest of the step, bound the JAX side.

"The limit" is NumPy's BLAS as this environment configures it: on the development machine
``OPENBLAS_CORETYPE=Haswell`` pins OpenBLAS to its AVX2 kernels on an AVX-512 CPU, while XLA uses
AVX-512, so XLA's products (and a JAX step) can come out above 100 % of it at large batches.

A whole MNIST epoch (60,000 images, batch 128, both dtypes) is timed as well (mode ``"epoch"``).

Output: a table per dtype, ``bench.json`` (a list of rows with at least ``impl, dtype, batch_size,
samples_per_s, limit_samples_per_s``; also ``mode``, ``ms_per_step`` and ``other_cpu``: the cores
other processes used while the row was timed) and ``bench.png`` (samples/s against batch size, one
line per implementation) in ``--out``. On a shared machine, rows timed while other processes were
busy are flagged: re-run when ``other_cpu`` is 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python compare/bench.py`: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from compare import contract, training

IMPLS = ("jax", "numpy", "numba", "torch")
BATCH_SIZES = (32, 128, 512, 2048)
DTYPES = ("float32", "float64")
EPOCH_BATCH_SIZE = 128
#: Learning rate of the timed steps: small and constant, the values stay sane over many repeats.
BENCH_LR = 0.01
#: Every timed repeat covers about this many samples (``--quick``: fewer), at least 3 steps.
SAMPLES_PER_REPEAT = {"full": 40_000, "quick": 4_000}
REPEATS = {"full": 5, "quick": 3}
#: A row is flagged when other processes used more than this many cores while it was timed.
BUSY_THRESHOLD = 0.1


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


def measure_interleaved(
    runs: dict, steps: int, repeats: int, limit_key=None, warmup: int = 1, settle: int = 1
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
    of ``t(limit) / t(callable)`` measured in the same round.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {key: [] for key in runs}
    others = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            for _ in range(settle):
                run()
            with CpuLoad() as load:
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
            times[key].append(elapsed / steps)
            others[key].append(load.other)
    out = {}
    for key, values in times.items():
        median = float(np.median(values))
        ratio = (
            float(np.median([t_limit / t for t_limit, t in zip(times[limit_key], values)]))
            if limit_key is not None
            else float("nan")
        )
        out[key] = Timing(median, (max(values) - min(values)) / median, repeats, steps, max(others[key]), ratio)
    return out


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
    setup: Setup, batches: np.ndarray, *, backend: str, reference: bool = False, own_blas_threads: bool = False
):
    """The NumPy side's trainer on ``batches``; ``own_blas_threads``: the numba FastTrainer with
    OpenBLAS on its own threads and the kernels on one (not on numba's threads, see
    :mod:`numpyside.threads`), to show what sharing one pool of threads gains."""
    from numpyside.fast import FastTrainer
    from numpyside.train import Trainer

    cls = Trainer if reference else FastTrainer
    trainer = cls(setup.params, setup.state, setup.images, setup.labels, momentum=setup.momentum, backend=backend)
    if own_blas_threads:
        trainer.threaded = False
    trainer.compile(*batches.shape)
    rates = np.full(len(batches), BENCH_LR)
    return lambda: trainer.epoch(batches, rates)


def jax_scan_runner(setup: Setup, batches: np.ndarray):
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


def jax_step_runner(setup: Setup, batches: np.ndarray):
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


def torch_runner(setup: Setup, batches: np.ndarray):
    """The same network in PyTorch eager mode (CPU): ``sigmoid(BatchNorm1d(x @ W))`` x 3, a linear
    output layer, ``cross_entropy``, ``torch.optim.SGD(momentum=0.8)`` (no dampening: the same
    update ``v <- m v + g; p <- p - lr v``). Raises ImportError without PyTorch."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
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


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------


def row(impl, mode, dtype, batch_size, timing: Timing, limit: float, **extra) -> dict:
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
        **extra,
    }


def step_runners(setup: Setup, batches: np.ndarray, impls, *, reference: bool) -> dict:
    """``(impl, mode) -> run`` for every implementation at this batch size (compiled, warm)."""
    from numpyside import threads

    batch_size, steps = batches.shape[1], len(batches)
    runs = {("blas", "limit"): blas_runner(batch_size, setup.dtype, steps)}
    if "jax" in impls:
        runs["jax", "xla-dot"] = xla_products(batch_size, setup.dtype, steps, setup.images)
        runs["jax", "scan"] = jax_scan_runner(setup, batches)
        runs["jax", "jit-step"] = jax_step_runner(setup, batches)
    for backend in ("numpy", "numba"):
        if backend in impls:
            runs[backend, "fast"] = numpy_runner(setup, batches, backend=backend)
            if reference:
                runs[backend, "reference"] = numpy_runner(setup, batches, backend=backend, reference=True)
    if reference and "numba" in impls and threads.available():  # else "fast" already is that
        runs["numba", "fast-own-threads"] = numpy_runner(setup, batches, backend="numba", own_blas_threads=True)
    if "torch" in impls:
        runs["torch", "eager"] = torch_runner(setup, batches)
    return runs


def bench_steps(setup: Setup, batch_size: int, size: str, impls, rng, log, *, reference: bool) -> list[dict]:
    """Every implementation's steps at one batch size, and the limit, timed round-robin."""
    dtype = setup.dtype
    steps = max(3, round(SAMPLES_PER_REPEAT[size] / batch_size))
    batches = training.epoch_batches(len(setup.images), batch_size, rng)[:steps]
    runs = step_runners(setup, batches, impls, reference=reference)
    timings = measure_interleaved(runs, steps, REPEATS[size], limit_key=("blas", "limit"))
    limit = batch_size / timings["blas", "limit"].seconds_per_step
    gflops = step_flops(batch_size) / timings["blas", "limit"].seconds_per_step / 1e9
    rows = []
    for (impl, mode), timing in timings.items():
        rows.append(row(impl, mode, dtype, batch_size, timing, limit, limit_gflops=gflops))
        log(
            f"{dtype} B={batch_size:<5} {impl:>6} {mode:<10} {rows[-1]['samples_per_s']:>12,.0f} samples/s  "
            f"{rows[-1]['fraction_of_limit']:6.1%} of the limit"
        )
    return rows


def bench_epoch(setup: Setup, impls, rng, repeats: int, log) -> list[dict]:
    """A whole MNIST epoch (60,000 images, batch 128) per implementation, timed round-robin
    together with the limit's products for as many steps."""
    batch_size = EPOCH_BATCH_SIZE
    batches = training.epoch_batches(len(setup.images), batch_size, rng)
    steps = len(batches)
    makers = {
        "jax": lambda: jax_scan_runner(setup, batches),
        "numpy": lambda: numpy_runner(setup, batches, backend="numpy"),
        "numba": lambda: numpy_runner(setup, batches, backend="numba"),
        "torch": lambda: torch_runner(setup, batches),
    }
    runs = {"limit": blas_runner(batch_size, setup.dtype, steps)}
    runs.update({impl: makers[impl]() for impl in IMPLS if impl in impls})
    timings = measure_interleaved(runs, steps, repeats, limit_key="limit", warmup=0, settle=1)
    limit = batch_size / timings.pop("limit").seconds_per_step
    rows = []
    for impl, timing in timings.items():
        rows.append(
            row(
                impl,
                "epoch",
                setup.dtype,
                batch_size,
                timing,
                limit,
                epoch_seconds=timing.seconds_per_step * steps,
                epoch_samples=steps * batch_size,
            )
        )
        log(
            f"{setup.dtype} epoch {impl:>6}: {rows[-1]['epoch_seconds']:.3f} s, "
            f"{rows[-1]['samples_per_s']:,.0f} samples/s, {rows[-1]['fraction_of_limit']:.1%} of the limit"
        )
    return rows


def environment() -> dict:
    from compare.report import machine, versions

    env = {
        "machine": machine(),
        "versions": versions(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "XLA_", "NUMBA_"))},
    }
    try:
        import threadpoolctl

        env["blas"] = [
            {k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for info in threadpoolctl.threadpool_info()
            if info.get("user_api") == "blas"
        ]
    except ImportError:
        pass
    return env


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------

LABELS = {
    ("blas", "limit"): "limit: NumPy BLAS, 11 products",
    ("jax", "xla-dot"): "XLA dot, 11 products",
    ("jax", "scan"): "JAX, epoch in lax.scan",
    ("jax", "jit-step"): "JAX, jitted step per call",
    ("numpy", "fast"): "NumPy FastTrainer",
    ("numba", "fast"): "numba FastTrainer",
    ("numpy", "reference"): "NumPy reference Trainer",
    ("numba", "reference"): "numba reference Trainer",
    ("numba", "fast-own-threads"): "numba FastTrainer, OpenBLAS's own threads",
    ("torch", "eager"): "PyTorch eager",
}


def tables(rows: list[dict]):
    from rich.table import Table

    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        step_rows = [r for r in rows if r["dtype"] == dtype and r["mode"] != "epoch"]
        sizes = sorted({r["batch_size"] for r in step_rows})
        table = Table(
            title=f"{dtype}: samples/s of a training step (share of the BLAS limit; * = other processes busy)"
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
                extra = (
                    f" {r['limit_gflops']:.0f} GF/s" if key == ("blas", "limit") else f" ({r['fraction_of_limit']:.0%})"
                )
                cells.append(f"{r['samples_per_s'] / 1e3:,.0f}k{extra}{busy}")
            table.add_row(LABELS.get(key, f"{key[0]} {key[1]}"), *cells)
        out.append(table)
    epoch_rows = [r for r in rows if r["mode"] == "epoch"]
    if epoch_rows:
        table = Table(
            title=f"A whole MNIST epoch ({epoch_rows[0]['epoch_samples']:,} images, batch {EPOCH_BATCH_SIZE})"
        )
        for name in ("implementation", "dtype", "seconds", "samples/s", "share of limit"):
            table.add_column(name, justify="left" if name == "implementation" else "right")
        for r in epoch_rows:
            busy = "[red]*[/]" if r["other_cpu"] > BUSY_THRESHOLD else ""
            table.add_row(
                r["impl"],
                r["dtype"],
                f"{r['epoch_seconds']:.3f}",
                f"{r['samples_per_s']:,.0f}{busy}",
                f"{r['fraction_of_limit']:.0%}",
            )
        out.append(table)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows if r["mode"] != "epoch"))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.6), squeeze=False)
    styles = {
        ("blas", "limit"): dict(color="black", linestyle="--", marker=""),
        ("jax", "xla-dot"): dict(color="#1f77b4", linestyle=":", marker=""),
        ("jax", "scan"): dict(color="#1f77b4", marker="o"),
        ("jax", "jit-step"): dict(color="#aec7e8", marker="s"),
        ("numpy", "fast"): dict(color="#2ca02c", marker="^"),
        ("numba", "fast"): dict(color="#ff7f0e", marker="D"),
        ("numpy", "reference"): dict(color="#98df8a", marker="v", linestyle="-."),
        ("numba", "reference"): dict(color="#ffbb78", marker="d", linestyle="-."),
        ("numba", "fast-own-threads"): dict(color="#ff7f0e", marker="D", linestyle=":", alpha=0.6),
        ("torch", "eager"): dict(color="#d62728", marker="x"),
    }
    for ax, dtype in zip(axes[0], dtypes):
        step_rows = [r for r in rows if r["dtype"] == dtype and r["mode"] != "epoch"]
        for key in dict.fromkeys((r["impl"], r["mode"]) for r in step_rows):
            series = sorted((r["batch_size"], r["samples_per_s"]) for r in step_rows if (r["impl"], r["mode"]) == key)
            ax.plot(
                *zip(*series),
                label=LABELS.get(key, f"{key[0]} {key[1]}"),
                linewidth=1.8,
                markersize=6,
                **styles.get(key, {}),
            )
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples / s", title=f"training step, {dtype}")
        sizes = sorted({r["batch_size"] for r in step_rows})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmap-bn-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: float32, batch sizes 128 and 512, 3 short repeats, no reference trainers",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where bench.json and bench.png go")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help=f"default {list(BATCH_SIZES)}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help=f"default {list(DTYPES)}")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch rows")
    parser.add_argument("--seed", type=int, default=training.DEFAULT_SEED)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    size = "quick" if args.quick else "full"
    batch_sizes = args.batch_sizes or ([128, 512] if args.quick else list(BATCH_SIZES))
    dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))
    if any(b < 2 for b in batch_sizes):
        build_parser().error("batch sizes must be at least 2 (batch norm)")
    if args.out.exists() and not args.out.is_dir():
        build_parser().error(f"--out {args.out} exists and is not a directory")

    from rich.console import Console

    from compare.init import init_params, init_state
    from compare.mnist import load_mnist

    console = Console(width=None if Console().is_terminal else 120)
    impls = list(dict.fromkeys(args.impls))
    notes = []
    if "torch" in impls:
        ok, note = torch_available()
        notes.append(note)
        if not ok:
            impls.remove("torch")
    if "jax" in impls:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    env = environment()
    console.rule("[bold]vmap-batchnorm benchmark: one training step, samples/s")
    console.print(
        f"  {env['machine']['cpu']}, {env['machine']['cores']} cores; "
        + ", ".join(f"{k}={v}" for k, v in env["env"].items())
    )
    for info in env.get("blas", []):
        console.print(
            f"  BLAS: {info['internal_api']} {info['version']}, {info['num_threads']} threads, "
            f"{info['architecture']} kernels"
        )
    for note in notes:
        console.print(f"  {note}")

    train_x, train_y, _, _ = load_mnist()
    rows = []
    log = console.print
    for dtype in dtypes:
        setup = Setup(
            dtype,
            train_x.astype(dtype),
            train_y,  # a writable copy, as compare/run.py uses
            init_params(args.seed, dtype),
            init_state(dtype),
        )
        rng = training.batch_rng(args.seed)
        for batch_size in batch_sizes:
            rows += bench_steps(setup, batch_size, size, impls, rng, log, reference=not args.quick)
        if not args.no_epoch:
            rows += bench_epoch(setup, impls, rng, 1 if args.quick else 3, log)

    for table in tables(rows):
        console.print(table)
    busy = [r for r in rows if r["other_cpu"] > BUSY_THRESHOLD]
    if busy:
        console.print(
            f"[yellow]note[/]: {len(busy)} rows were timed while other processes used more than "
            f"{BUSY_THRESHOLD} cores (marked *): re-run on a quiet machine for this machine's speed"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    # bench.json: the implementations' rows (the limit is in every row's limit_samples_per_s)
    (args.out / "bench.json").write_text(json.dumps([r for r in rows if r["impl"] in IMPLS], indent=1) + "\n")
    plot(rows, args.out / "bench.png")
    console.print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
