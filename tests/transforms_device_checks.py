"""Measurements for ``tests/test_transforms.py`` that need two devices, so a fresh JAX process:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. python tests/transforms_device_checks.py OUT.json

``jaxside.transforms.data_parallel`` over a mesh axis named ``"shards"`` (not ``"device"``), on the
model of ``tests/test_transforms.py``, against the same transforms on one device; and
``jaxside.parallel`` with that axis name. Writes the differences (and error messages) to OUT.json.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

AXIS = "shards"


def error_message(call) -> str | None:
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def main(out: str) -> None:
    from compare.contract import InputError  # noqa: F401  (the errors below are InputErrors)
    from jaxside import model, parallel
    from jaxside import transforms as T
    from tests.helpers import random_params, random_state
    from tests.test_transforms import SIZES, example_loss, init, rel_err

    mesh = jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))
    params, state = init(3)
    rng = np.random.default_rng(11)
    x, y = jnp.asarray(rng.normal(size=(16, SIZES[0]))), jnp.asarray(rng.integers(0, SIZES[-1], 16), jnp.int32)
    synced = functools.partial(example_loss, axis_name=(AXIS, "batch"))
    found = {"device_count": jax.device_count()}

    step = T.with_grads(T.batch_loss(example_loss))
    one_device = jax.jit(step)(params, state, x, y)
    two_devices = jax.jit(T.data_parallel(T.with_grads(T.batch_loss(synced)), mesh, AXIS))(params, state, x, y)
    found["synchronised_vs_one_device"] = rel_err(two_devices, one_device)

    per_device = jax.jit(T.data_parallel(step, mesh, AXIS))(params, state, x, y)
    ghosts = jax.jit(T.with_grads(T.batch_loss(example_loss, ghost_batches=2)))(params, state, x, y)
    found["per_device_vs_two_ghost_batches"] = rel_err(per_device, ghosts)
    found["per_device_vs_synchronised"] = rel_err(per_device, one_device)

    rows = T.data_parallel(T.per_example_grads(synced), mesh, AXIS, split_outputs=(True, True, False))
    found["per_example_vs_one_device"] = rel_err(
        jax.jit(rows)(params, state, x, y), jax.jit(T.per_example_grads(example_loss))(params, state, x, y)
    )
    found["indivisible_error"] = error_message(lambda: T.data_parallel(step, mesh, AXIS)(params, state, x[:7], y[:7]))
    found["unknown_axis_error"] = error_message(lambda: T.data_parallel(step, mesh, "device"))

    ours = random_params(0), random_state(0)
    images = rng.uniform(size=(16, 784))
    labels = rng.integers(0, 10, 16)
    shards = parallel.make_mesh(axis_name=AXIS)
    found["ours_synchronised_vs_one_device"] = rel_err(
        parallel.loss_and_grads(*ours, images, labels, mesh=shards, axis_name=AXIS),
        model.loss_and_grads(*ours, images, labels),
    )
    found["ours_axis_mismatch_error"] = error_message(
        lambda: parallel.loss_and_grads(*ours, images, labels, mesh=shards)
    )
    Path(out).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
