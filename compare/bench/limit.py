"""The limit every row is measured against: one training step's 11 matrix products done by NumPy's
BLAS alone on the same shapes (and, for comparison, by XLA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from compare import contract

LIMIT_KEY = ("blas", "limit")
LIMIT_LABEL = "limit: NumPy BLAS, 11 products"
LIMIT_STYLE = dict(color="black", linestyle="--", marker="")


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
