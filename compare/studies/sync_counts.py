"""The all-reduces of one synchronised training step, counted on both sides.

JAX: the ``psum`` over ``"device"`` in the jaxprs of one device's step, traced with
``axis_env=[("device", D)]`` and counted with :mod:`compare.studies.jaxpr` (``count``, ``by_direction``):
batch norm's forward ones are those of ``jaxside.parallel.local_loss``, its backward ones what
``local_loss_and_grads`` (the VJP) adds, and the reduction of the loss and the gradients what
``device_step`` adds to that. NumPy: the calls to ``numpyside.parallel.AllReduce``.
Expected: 2 forward + 2 backward per batch-norm layer on both sides; then the end of the step
(JAX: one fused ``psum``; the mirror: one all-reduce per weight and bias gradient and the loss).
"""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np

from compare.contract.init import init_params, init_state
from compare.studies.jaxpr import by_direction, count, is_named_collective
from jaxside import parallel as jax_parallel
from numpyside import parallel as numpy_parallel
from numpyside.parallel import BACKWARD, BATCH_NORM, END, FORWARD, LOSS_AND_GRADIENTS, AllReduce


def jax_counts(n_devices: int = 2, local_batch: int = 4, batch_norm: bool = True) -> Counter:
    """``Counter((phase, purpose) -> number of psum over "device")`` in one device's training step."""
    params, state = init_params(0, np.float32, batch_norm), init_state(np.float32, batch_norm)
    images = np.zeros((local_batch, params[0]["weight"].shape[0]), np.float32)
    labels = np.zeros(local_batch, np.int32)
    kw = dict(sync_batch_norm=True)

    def trace(function):
        return jax.make_jaxpr(function, axis_env=[(jax_parallel.DEVICE_AXIS, n_devices)])(params, state, images, labels)

    forward = trace(lambda p, s, x, y: jax_parallel.local_loss(p, s, x, y, **kw))
    vjp = trace(lambda p, s, x, y: jax_parallel.local_loss_and_grads(p, s, x, y, **kw))
    step = trace(lambda p, s, x, y: jax_parallel.device_step(p, s, x, y, **kw))

    def over_devices(eqn):
        return is_named_collective(eqn, jax_parallel.DEVICE_AXIS)

    in_batch_norm = {phase: sum(c.values()) for phase, c in by_direction(forward, vjp, over_devices).items()}
    in_step = {name: sum(count(jaxpr, over_devices).values()) for name, jaxpr in (("vjp", vjp), ("step", step))}
    counts = Counter(
        {
            (FORWARD, BATCH_NORM): in_batch_norm[FORWARD],
            (BACKWARD, BATCH_NORM): in_batch_norm[BACKWARD],
            (END, LOSS_AND_GRADIENTS): in_step["step"] - in_step["vjp"],
        }
    )
    return +counts


def numpy_counts(shards: int = 2, local_batch: int = 4, batch_norm: bool = True) -> Counter:
    """The same counts for ``numpyside.parallel.loss_and_grads`` (its :class:`AllReduce` calls)."""
    params, state = init_params(0, np.float64, batch_norm), init_state(np.float64, batch_norm)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(shards * local_batch, params[0]["weight"].shape[0]))
    labels = rng.integers(0, 10, shards * local_batch)
    all_reduce = AllReduce()
    numpy_parallel.loss_and_grads(params, state, images, labels, shards=shards, all_reduce=all_reduce)
    return all_reduce.counts()


def table_rows(n_devices: int = 2) -> list[tuple[str, str, int, int]]:
    """``(phase, purpose, JAX psum count, NumPy all-reduce count)`` for every kind found on either side."""
    jax_side, numpy_side = jax_counts(n_devices), numpy_counts(n_devices)
    order = {FORWARD: 0, BACKWARD: 1, END: 2}
    keys = sorted(set(jax_side) | set(numpy_side), key=lambda key: order[key[0]])
    return [(phase, purpose, jax_side[phase, purpose], numpy_side[phase, purpose]) for phase, purpose in keys]
