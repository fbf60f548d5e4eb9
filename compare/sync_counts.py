"""The all-reduces of one synchronised training step, counted on both sides.

JAX: the ``psum`` over ``"device"`` in the jaxpr of one device's step (``jaxside.parallel.device_step``
traced with ``axis_env=[("device", D)]`` and a traced cotangent, so that :mod:`compare.jaxpr` can
tell forward from backward). Those already in the step before the reduction over ``"device"``
(``jaxside.parallel.local_loss_and_grads``) are batch norm's; the rest sum the gradients and the
loss. NumPy: the calls to ``numpyside.parallel.AllReduce``, by phase and purpose.
Expected per batch-norm layer: 2 forward + 2 backward; plus one per gradient and one for the loss.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from compare.init import init_params, init_state
from numpyside.parallel import BATCH_NORM, GRADIENTS, AllReduce


def _jax_found(function, params, state, images, labels, n_devices: int) -> Counter:
    import jax

    from compare.jaxpr import count_by_phase, find_collectives
    from jaxside.parallel import DEVICE_AXIS

    dloss = np.ones((), params[0]["weight"].dtype)
    jaxpr = jax.make_jaxpr(function, axis_env=[(DEVICE_AXIS, n_devices)])(params, state, images, labels, dloss)
    counts = count_by_phase(find_collectives(jaxpr, DEVICE_AXIS, cotangent_inputs=(-1,)))
    return Counter({phase: sum(counter.values()) for phase, counter in counts.items()})


def jax_counts(n_devices: int = 2, local_batch: int = 4, batch_norm: bool = True) -> Counter:
    """``Counter((phase, purpose) -> number of psum over "device")`` in one device's training step."""
    from jaxside import parallel

    params, state = init_params(0, np.float32, batch_norm), init_state(np.float32, batch_norm)
    images = np.zeros((local_batch, params[0]["weight"].shape[0]), np.float32)
    labels = np.zeros(local_batch, np.int32)
    n_total = local_batch * n_devices

    def local(p, s, x, y, dloss):
        return parallel.local_loss_and_grads(p, s, x, y, n_total, sync_batch_norm=True, dloss=dloss)

    def step(p, s, x, y, dloss):
        return parallel.device_step(p, s, x, y, n_total, sync_batch_norm=True, dloss=dloss)

    in_batch_norm = _jax_found(local, params, state, images, labels, n_devices)
    in_step = _jax_found(step, params, state, images, labels, n_devices)
    counts = Counter()
    for phase in in_step:
        counts[phase, BATCH_NORM] = in_batch_norm[phase]
        counts[phase, GRADIENTS] = in_step[phase] - in_batch_norm[phase]
    return +counts


def numpy_counts(shards: int = 2, local_batch: int = 4, batch_norm: bool = True) -> Counter:
    """The same counts for ``numpyside.parallel.loss_and_grads`` (its :class:`AllReduce` calls)."""
    from numpyside import parallel

    params, state = init_params(0, np.float64, batch_norm), init_state(np.float64, batch_norm)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(shards * local_batch, params[0]["weight"].shape[0]))
    labels = rng.integers(0, 10, shards * local_batch)
    all_reduce = AllReduce()
    parallel.loss_and_grads(params, state, images, labels, shards=shards, all_reduce=all_reduce)
    return all_reduce.counts()


def table_rows(n_devices: int = 2) -> list[tuple[str, str, int, int]]:
    """``(phase, purpose, JAX psum count, NumPy all-reduce count)`` for every kind found on either side."""
    jax_side, numpy_side = jax_counts(n_devices), numpy_counts(n_devices)
    keys = sorted(set(jax_side) | set(numpy_side))
    return [(phase, purpose, jax_side[phase, purpose], numpy_side[phase, purpose]) for phase, purpose in keys]
