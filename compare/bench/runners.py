"""What the bench times: each implementation's training steps, made ready (compiled, warm) by a runner.

A runner ``make(setup, batches, threads)`` returns a callable that runs ``len(batches)`` training
steps of one implementation on the data of a :class:`Setup`: the NumPy side's trainers, the JAX
side's epoch scan and its jitted step, and PyTorch (an outside reference, when installed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from compare import contract
from compare.contract import training
from jaxside.model import batch_loss
from jaxside.train import Trainer as JaxTrainer
from jaxside.train import sgd_momentum
from numpyside.fast import FastTrainer
from numpyside.train import Trainer as NumpyTrainer

#: Learning rate of the timed steps: small and constant, the values stay sane over many repeats.
BENCH_LR = 0.01


@dataclass
class Setup:
    dtype: str
    images: np.ndarray  # training images in the dtype
    labels: np.ndarray
    params: list
    state: list
    momentum: float = training.DEFAULT_MOMENTUM


def numpy_runner(
    setup: Setup,
    batches: np.ndarray,
    threads: int,
    *,
    backend: str,
    reference: bool = False,
    shared_pool=False,
    gemm: str = "auto",
):
    """The NumPy side's trainer on ``batches`` with ``threads`` threads (the reference ``Trainer``
    gets them through OpenBLAS's thread count, the process's own); ``shared_pool=True``: the numba
    FastTrainer with OpenBLAS's jobs and the kernels' parts on numba's threads
    (:mod:`numpyside.kernels.threads`); ``gemm``: the FastTrainer's products' engine (its ``gemm``)."""
    cls = NumpyTrainer if reference else FastTrainer
    trainer = cls(setup.params, setup.state, setup.images, setup.labels, momentum=setup.momentum, backend=backend)
    if not reference:
        trainer.threads, trainer.shared_pool, trainer.gemm = threads, shared_pool, gemm
    trainer.compile(*batches.shape)
    rates = np.full(len(batches), BENCH_LR)
    return lambda: trainer.epoch(batches, rates)


def jax_scan_runner(setup: Setup, batches: np.ndarray, threads: int):
    trainer = JaxTrainer(setup.params, setup.state, setup.images, setup.labels, momentum=setup.momentum)
    trainer.compile(*batches.shape)
    rates = np.full(len(batches), BENCH_LR)
    return lambda: trainer.epoch(batches, rates)


@functools.cache
def _jax_step():
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


def torch_missing() -> str:
    """ "" when PyTorch can be imported, else the note that says its rows are skipped."""
    ok, note = torch_available()
    return "" if ok else note
