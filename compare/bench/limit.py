r"""The limit every row is measured against, and the machine's peak.

**The limit** of a row is the fastest way this machine knows to do one training step's 11 matrix
products (:func:`product_shapes`) on the same shapes, found anew in every repeat of the timing: a
few *engines* (:data:`ENGINES`), each doing the products its own way, are timed in the same rounds
as the rows, and in each round the limit is the fastest of them
(:func:`compare.bench.timing.measure_interleaved`). A step does the products and more (gathers,
batch norm, the loss, SGD), so a row that reaches the limit does its other work for free.

The 11 products, as :mod:`numpyside.layers` and :mod:`numpyside.fast` write them for the layers
:math:`784 \to 100 \to 100 \to 100 \to 10` at batch :math:`B`:

.. math::
    z_l = x_l W_l \ (4), \qquad dW_l = x_l^T\, d_l \ (4), \qquad dx_l = d_l\, W_l^T,\ l \ge 1\ (3)

(the first layer's input is the images: its :math:`dx` is never computed), so a step costs
:math:`2B\,(3 \sum_l n_l n_{l+1} - 784 \cdot 100)` floating-point operations (:func:`step_flops`).

**The peak** is the FLOP/s of one large square product (:data:`PEAK_SIZE`), the best of every
engine that can do one (:func:`measure_peak`; the bench measures it before and after a dtype's rows
and keeps the best, :func:`best_peak`): what the cores do on a product that suits them, against
which the 11 small products, and each row, are put in context.

To add an engine: one :class:`Engine` entry in :data:`ENGINES` whose ``make(batch_size, dtype,
steps, images)`` returns a callable doing ``steps`` steps' 11 products (:func:`per_step` turns a
callable for one step into that), and optionally a ``square(n, dtype)`` for the peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numba
import numpy as np

from compare import contract
from compare.bench.timing import measure_interleaved
from numpyside.kernels import blas, gemm, jit, products, threads
from numpyside.kernels.fused import part_bounds

#: The key of the limit (the fastest engine of each round) among the timed callables.
LIMIT_KEY = ("limit", "fastest")
LIMIT_LABEL = "limit: the fastest engine in each repeat"
LIMIT_STYLE = dict(color="black", linestyle="--", marker="*", markersize=9, linewidth=2.4)
#: The side of the machine's peak product: n x n times n x n (2 n^3 FLOPs; 17 GFLOP at n = 2048).
PEAK_SIZE = 2048
PEAK_REPEATS = 3


def product_shapes(batch_size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The (m, k) x (k, n) shapes of one training step's 11 matrix products."""
    sizes, b = contract.LAYER_SIZES, batch_size
    layers = range(len(sizes) - 1)
    forward = [((b, sizes[i]), (sizes[i], sizes[i + 1])) for i in layers]  # x @ W
    weight_grads = [((sizes[i], b), (b, sizes[i + 1])) for i in layers]  # x.T @ d
    input_grads = [((b, sizes[i + 1]), (sizes[i + 1], sizes[i])) for i in layers if i > 0]  # d @ W.T
    return forward + weight_grads + input_grads


def step_flops(batch_size: int) -> int:
    """Floating-point operations of one step's 11 products (``2 m k n`` each): every row's FLOP/s
    is this times its steps per second."""
    return sum(2 * m * k * n for (m, k), (_, n) in product_shapes(batch_size))


def _always() -> str:
    return ""


@dataclass(frozen=True)
class Engine:
    """One way of doing the step's products. ``make(batch_size, dtype, steps, images)`` returns a
    callable (compiled and warm) that does ``steps`` steps of the 11 products; ``images`` are the
    training images in ``dtype``, for an engine that gathers its batches. ``square(n, dtype)``, if
    given, returns a callable doing one ``n x n`` product, for :func:`measure_peak`. ``name`` is
    bench.json's ``limit_engine``."""

    name: str
    label: str
    make: Callable[[int, str, int, np.ndarray], Callable[[], object]]
    square: Callable[[int, str], Callable[[], object]] | None = None
    style: dict = field(default_factory=dict)
    missing: Callable[[], str] = _always  # "" or why the engine cannot run here

    @property
    def key(self) -> tuple[str, str]:
        return "limit", self.name


# ------------------------------------------------------------------------------------------------
# NumPy's BLAS, called from Python (np.matmul) and from numba (the fast trainer's way)
# ------------------------------------------------------------------------------------------------


class Operands(NamedTuple):
    """Random operands of the 11 products, per layer ``l``: ``x[l]`` (B, n_l), ``w[l]`` (n_l,
    n_{l+1}), ``d[l]`` (B, n_{l+1}), and the outputs ``z[l] = x @ w``, ``dw[l] = x.T @ d``,
    ``dx[l] = d @ w.T`` (``dx[0]`` is unused: the first layer has no ``dx``)."""

    x: tuple
    w: tuple
    d: tuple
    z: tuple
    dw: tuple
    dx: tuple


def operands(batch_size: int, dtype: str, seed: int = 0) -> Operands:
    rng = np.random.default_rng(seed)
    sizes, b = contract.LAYER_SIZES, batch_size
    layers = range(len(sizes) - 1)

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return Operands(
        tuple(normal(b, sizes[i]) for i in layers),
        tuple(normal(sizes[i], sizes[i + 1]) for i in layers),
        tuple(normal(b, sizes[i + 1]) for i in layers),
        tuple(np.empty((b, sizes[i + 1]), dtype) for i in layers),
        tuple(np.empty((sizes[i], sizes[i + 1]), dtype) for i in layers),
        tuple(np.empty((b, sizes[i]), dtype) for i in layers),
    )


def blas_products(batch_size: int, dtype: str, seed: int = 0) -> Callable[[], None]:
    """A callable doing the step's 11 products once with ``np.matmul(..., out=)`` on random data,
    in the layouts the NumPy side uses (``x.T @ d`` and ``d @ W.T`` from transposed views)."""
    ops, matmul = operands(batch_size, dtype, seed), np.matmul

    def products():
        for i in range(len(ops.x)):
            matmul(ops.x[i], ops.w[i], out=ops.z[i])
            matmul(ops.x[i].T, ops.d[i], out=ops.dw[i])
            if i:
                matmul(ops.d[i], ops.w[i].T, out=ops.dx[i])

    return products


def per_step(products: Callable[[int, str], Callable[[], object]]):
    """An :class:`Engine`'s ``make`` from ``products(batch_size, dtype)``, a callable for one step."""

    def make(batch_size: int, dtype: str, steps: int, images=None):
        step = products(batch_size, dtype)

        def run():
            for _ in range(steps):
                step()

        return run

    return make


@jit.njit(fastmath=False, nogil=True)
def _numba_blas_steps(steps, x, w, d, z, dw, dx):
    for _ in range(steps):
        for i in range(len(x)):
            products.matmul(x[i], w[i], z[i])
            products.matmul_tn(x[i], d[i], dw[i])
            if i:
                products.matmul_nt(d[i], w[i], dx[i])


def numba_blas_runner(batch_size: int, dtype: str, steps: int, images=None):
    """``steps`` steps of the products in one numba call, each product NumPy's own ``gemm`` called
    from compiled code (:mod:`numpyside.kernels.blas`), as the numba ``FastTrainer`` calls it: the
    same library as ``np.matmul``, without Python's overhead per product."""
    ops = operands(batch_size, dtype)
    _numba_blas_steps(1, *ops)  # compile for the dtype

    def run():
        _numba_blas_steps(steps, *ops)

    return run


def square_operands(n: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two random ``n x n`` matrices and an output, the peak product's operands for every engine."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    return a, b, np.empty((n, n), dtype)


def numpy_square(n: int, dtype: str):
    a, b, out = square_operands(n, dtype)
    return lambda: np.matmul(a, b, out=out)


# ------------------------------------------------------------------------------------------------
# The NumPy side's own GEMM (numpyside.kernels.gemm), the fast trainer's other engine
# ------------------------------------------------------------------------------------------------


@jit.njit(fastmath=False, nogil=True)
def _numba_gemm_steps(steps, x, w, d, z, dw, dx, packed):
    for _ in range(steps):
        for i in range(len(x)):
            gemm.nn(x[i], w[i], z[i], 0, z[i].shape[1])
            gemm.tn(x[i], d[i], dw[i], 0, dw[i].shape[1])
            if i:
                gemm.nt(d[i], w[i], packed, dx[i], 0, dx[i].shape[1])


@jit.njit(fastmath=False, nogil=True, parallel=True)
def _numba_gemm_steps_split(steps, parts, x, w, d, z, dw, dx, packed):
    """:func:`_numba_gemm_steps` with each product split into ``parts`` as the fast trainer splits
    it on threads: the first layer's two by rows, the others by columns."""
    for _ in range(steps):
        for i in range(len(x)):
            for part in numba.prange(parts):
                if i == 0:
                    lo, hi = part_bounds(z[0].shape[0], part, parts, gemm.MR)
                    gemm.nn_rows(x[0], w[0], z[0], lo, hi)
                else:
                    lo, hi = part_bounds(z[i].shape[1], part, parts, 16)
                    gemm.nn(x[i], w[i], z[i], lo, hi)
            for part in numba.prange(parts):
                if i == 0:
                    lo, hi = part_bounds(dw[0].shape[0], part, parts, gemm.MR)
                    gemm.tn_rows(x[0], d[0], dw[0], lo, hi)
                else:
                    lo, hi = part_bounds(dw[i].shape[1], part, parts, 16)
                    gemm.tn(x[i], d[i], dw[i], lo, hi)
            if i:
                for part in numba.prange(parts):
                    lo, hi = part_bounds(dx[i].shape[1], part, parts, 16)
                    gemm.nt(d[i], w[i], packed, dx[i], lo, hi)


def numba_gemm_runner(batch_size: int, dtype: str, steps: int, images=None):
    """``steps`` steps of the products in one numba call, each on the numba GEMM
    (:mod:`numpyside.kernels.gemm`), as the fast trainer runs them with ``gemm="numba"``: on one
    thread over all their columns; with ``$VMAP_BN_THREADS`` (the bench's thread count) above one,
    split between that many numba threads as the trainer splits them, one parallel region per
    product."""
    gemm.register(dtype)
    ops = operands(batch_size, dtype)
    packed = np.empty(max(w.size for w in ops.w), dtype)  # nt's copy of W.T
    count = threads.default_count()

    def run_steps(n_steps):
        with threads.numba_parts(count) as parts:
            if parts > 1:
                _numba_gemm_steps_split(n_steps, parts, *ops, packed)
            else:
                _numba_gemm_steps(n_steps, *ops, packed)

    run_steps(1)  # compile for the dtype
    return lambda: run_steps(steps)


def numba_gemm_square(n: int, dtype: str):
    gemm.register(dtype)
    a, b, out = square_operands(n, dtype)
    gemm.nn(a, b, out, 0, n)  # compile
    return lambda: gemm.nn(a, b, out, 0, n)


def _numba_gemm_missing() -> str:
    return "" if gemm.HAS_FMA else "the numba GEMM needs fused multiply-add, which this CPU lacks"


# ------------------------------------------------------------------------------------------------
# XLA's dot
# ------------------------------------------------------------------------------------------------


def _check_x64(dtype: str) -> None:
    if np.dtype(dtype).itemsize == 8 and not jax.config.jax_enable_x64:
        raise RuntimeError(
            f"XLA would compute the {dtype} products in float32: enable 64-bit JAX first "
            "(jax.config.update('jax_enable_x64', True))"
        )


def xla_products(batch_size: int, dtype: str, steps: int, images: np.ndarray, seed: int = 0):
    """The same 11 products in XLA: a jitted ``lax.scan`` over ``steps`` steps whose body gathers
    a batch and runs the products with the network's data dependencies (each product's output is
    the next one's input, no elementwise work in between). The weight gradients are summed into
    the carry, so that XLA can neither drop nor hoist them (4 fused adds per step: a few us)."""
    _check_x64(dtype)
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


def xla_square(n: int, dtype: str):
    _check_x64(dtype)
    a, b = (jnp.asarray(m) for m in square_operands(n, dtype)[:2])
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    return lambda: product(a, b).block_until_ready()


def _numba_blas_missing() -> str:
    return "" if blas.available() else f"NumPy's BLAS cannot be called from numba here: {blas.UNAVAILABLE_REASON}"


#: The engines, in table order. A new GEMM the NumPy side can call is one more entry here.
ENGINES = (
    Engine(
        "numpy-blas",
        "NumPy's BLAS via np.matmul",
        per_step(blas_products),
        numpy_square,
        dict(color="#555555", linestyle=":", marker=".", linewidth=1.2),
    ),
    Engine(
        "numba-blas",
        "NumPy's BLAS called from numba",
        numba_blas_runner,
        None,  # the same library as numpy-blas: the same peak
        dict(color="#8c564b", linestyle=":", marker=".", linewidth=1.2),
        _numba_blas_missing,
    ),
    Engine(
        "numba-gemm",
        "the NumPy side's own GEMM (numba)",
        numba_gemm_runner,
        numba_gemm_square,
        dict(color="#9467bd", linestyle=":", marker=".", linewidth=1.2),
        _numba_gemm_missing,
    ),
    Engine(
        "xla-dot",
        "XLA's dot in a jitted lax.scan",
        xla_products,
        xla_square,
        dict(color="#1f77b4", linestyle=":", marker=".", linewidth=1.2),
    ),
)


def available_engines() -> list[Engine]:
    """The engines that can run in this process."""
    return [engine for engine in ENGINES if not engine.missing()]


def engine_runs(batch_size: int, dtype: str, steps: int, images: np.ndarray) -> dict:
    """``engine.key -> callable`` doing ``steps`` steps' products, for every available engine."""
    return {engine.key: engine.make(batch_size, dtype, steps, images) for engine in available_engines()}


def is_engine_key(key) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] == LIMIT_KEY[0]


def limit_fields(timings: dict, batch_size: int) -> dict:
    """The bench.json fields of the limit of one :func:`measure_interleaved` call (``timings``
    holding the engines and :data:`LIMIT_KEY`): ``limit_samples_per_s`` (the median over the rounds
    of the fastest engine's time), ``limit_engine`` (the engine fastest in most rounds; of those
    tied, the faster in the median), ``limit_gflops``, and per engine its samples/s and the rounds
    it was the fastest in (``limit_engines``)."""
    limit = timings[LIMIT_KEY]
    engines = {key: timing for key, timing in timings.items() if is_engine_key(key) and key != LIMIT_KEY}
    wins = limit.limit_wins

    def rank(key):
        return wins.get(key, 0), -engines[key].seconds_per_step

    return {
        "limit_samples_per_s": batch_size / limit.seconds_per_step,
        "limit_engine": max(engines, key=rank)[1],
        "limit_gflops": step_flops(batch_size) / limit.seconds_per_step / 1e9,
        "limit_engines": {
            key[1]: {"samples_per_s": batch_size / timing.seconds_per_step, "fastest_rounds": wins.get(key, 0)}
            for key, timing in engines.items()
        },
    }


def measure_peak(dtype: str, n: int = PEAK_SIZE, repeats: int = PEAK_REPEATS) -> dict:
    """The machine's peak for ``dtype`` in this process: the FLOP/s of one ``n x n`` product, the
    fastest round of the fastest engine (engines timed round-robin by the bench's one loop)."""
    runs = {engine.key: engine.square(n, dtype) for engine in available_engines() if engine.square is not None}
    timings = measure_interleaved(runs, steps=1, repeats=repeats, settle=0)  # long calls: no settling
    flops = 2 * n**3
    engines = {key[1]: flops / timing.best_seconds_per_step for key, timing in timings.items()}
    best = max(engines, key=engines.get)
    return {"dtype": dtype, "n": n, "flops_per_s": engines[best], "engine": best, "engines": engines}


def best_peak(*measurements: dict) -> dict:
    """Several :func:`measure_peak` of one dtype as one: each engine's best, and the best engine. On a
    machine whose speed drifts, a peak taken before and after the rows is less often below them."""
    engines = {}
    for measurement in measurements:
        for name, flops in measurement["engines"].items():
            engines[name] = max(engines.get(name, 0.0), flops)
    best = max(engines, key=engines.get)
    return {**measurements[0], "flops_per_s": engines[best], "engine": best, "engines": engines}
