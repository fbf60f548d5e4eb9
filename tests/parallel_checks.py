"""Measurements for tests/test_parallel.py that need several devices, so a fresh JAX process:

    PYTHONPATH=. python tests/parallel_checks.py OUT.json

starts JAX with 4 CPU devices, runs every check on meshes of 2 and 4 of them and writes the max
differences (and error messages) to OUT.json; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from jaxside.devices import request_devices

N_DEVICES = 4


def max_diff(a, b) -> float:
    import jax

    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in leaves)


def ghost_reference(params, state, images, labels, ghosts):
    """Ghost batch norm with G = ``ghosts`` from jaxside.model's pieces: each block of consecutive
    examples is a batch of its own; the loss and gradients are the mean over blocks (equal sizes),
    and so are the new running statistics."""
    import jax

    from jaxside import model

    results = [
        model.loss_and_grads(params, state, x, y)
        for x, y in zip(np.split(images, ghosts), np.split(labels, ghosts), strict=True)
    ]
    loss = np.mean([r[0] for r in results])
    grads, new_state = (jax.tree_util.tree_map(lambda *a: np.mean(a, axis=0), *[r[i] for r in results]) for i in (1, 2))
    return loss, grads, new_state


def ensemble_ghost(params, state, images, labels, ghosts):
    """The same from ``jaxside.ensemble.loss_and_grads(..., ghost_batches=G)``: an ensemble of one
    member, its leaves stacked on a leading member axis."""
    import jax

    from jaxside import ensemble

    def stack(tree):
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[None], tree)

    losses, grads, new_state = ensemble.loss_and_grads(
        stack(params), stack(state), images, labels, ghost_batches=ghosts
    )
    return losses[0], *jax.tree_util.tree_map(lambda a: np.asarray(a)[0], (grads, new_state))


def spread(per_device) -> float:
    """max over outputs of max_d |copy_d - copy_0|: 0 when every device holds the same values."""
    import jax

    return max(float(np.max(np.abs(a - a[:1]))) for a in jax.tree_util.tree_leaves(per_device))


def main(out: str) -> None:
    request_devices(N_DEVICES)  # before JAX starts
    import jax

    jax.config.update("jax_enable_x64", True)
    from compare import training
    from compare.contract import InputError
    from compare.init import init_params, init_state
    from compare.mnist import load_mnist
    from jaxside import model, parallel
    from jaxside import train as single_train
    from numpyside import parallel as numpy_parallel
    from tests.helpers import random_params, random_state

    train_x, train_y, test_x, _ = load_mnist()
    results = {"device_count": jax.device_count()}
    params, state = random_params(0), random_state(0)
    x, y = train_x[:64].astype(np.float64), train_y[:64]
    single = model.loss_and_grads(params, state, x, y)
    steps20 = training.epoch_batches(4096, 64, training.batch_rng(0))[:20]
    rates20 = training.LearningRateSchedule(0.3, 20).rates
    data64 = train_x[:4096].astype(np.float64), train_y[:4096]
    p0, s0 = init_params(0, np.float64), init_state(np.float64)
    one_device = single_train.Trainer(p0, s0, *data64, momentum=0.8)
    one_device.epoch(steps20, rates20)
    quick32 = train_x[:4096].astype(np.float32), train_y[:4096]
    quick_batches = training.epoch_batches(4096, 128, training.batch_rng(0))
    quick_rates = training.LearningRateSchedule(0.3, len(quick_batches)).rates
    p32, s32 = init_params(0, np.float32), init_state(np.float32)
    one_device32 = single_train.Trainer(p32, s32, *quick32, momentum=0.8)
    one_device32.epoch(quick_batches, quick_rates)
    predictions32 = one_device32.predict(test_x[:1000].astype(np.float32))

    for d in (2, 4):
        mesh = parallel.make_mesh(jax.devices()[:d])
        r = results[f"D{d}"] = {}
        synced = parallel.loss_and_grads(params, state, x, y, mesh=mesh)
        r["step_vs_single"] = max_diff(synced, single)
        r["loss_vs_single"] = abs(float(synced[0]) - float(single[0]))
        r["state_vs_single"] = max_diff(synced[2], single[2])
        r["spread"] = spread(parallel.per_device_results(params, state, x, y, mesh=mesh))
        r["spread_unreduced"] = spread(parallel.per_device_results(params, state, x, y, mesh=mesh, reduce=False))
        unsynced = parallel.loss_and_grads(params, state, x, y, mesh=mesh, sync_batch_norm=False)
        r["unsynced_vs_synced"] = max_diff(unsynced, synced)
        r["unsynced_vs_ghost"] = max_diff(unsynced, ghost_reference(params, state, x, y, d))
        r["unsynced_vs_ensemble_ghost"] = max_diff(unsynced, ensemble_ghost(params, state, x, y, d))
        r["unsynced_spread"] = spread(
            parallel.per_device_results(params, state, x, y, mesh=mesh, sync_batch_norm=False)
        )
        r["numpy_mirror_vs_sharded"] = max_diff(numpy_parallel.loss_and_grads(params, state, x, y, shards=d), synced)
        trainer = parallel.Trainer(p0, s0, *data64, momentum=0.8, mesh=mesh)
        trainer.epoch(steps20, rates20)
        r["params_after_20_steps"] = max_diff(trainer.params_numpy(), one_device.params_numpy())
        r["state_after_20_steps"] = max_diff(trainer.state_numpy(), one_device.state_numpy())
        trainer32 = parallel.Trainer(p32, s32, *quick32, momentum=0.8, mesh=mesh)
        trainer32.epoch(quick_batches, quick_rates)
        r["float32_predictions_differ"] = int(np.sum(trainer32.predict(test_x[:1000]) != predictions32))
        try:
            parallel.loss_and_grads(params, state, x[:63], y[:63], mesh=mesh)
            r["indivisible_error"] = None
        except InputError as error:
            r["indivisible_error"] = str(error)
    results["ensemble"] = ensemble_over_devices(train_x, train_y)
    Path(out).write_text(json.dumps(results, indent=1))


def ensemble_over_devices(train_x, train_y) -> dict:
    """``jaxside.ensemble.Trainer(devices=D)`` against ``devices=1``: 4 float64 members, 6 steps, each
    kind of batch and pooled statistics; and the two refusals."""
    from compare import training
    from compare.contract import InputError
    from compare.init import init_ensemble
    from jaxside import ensemble

    images, labels = train_x[:1024].astype(np.float64), train_y[:1024]
    params, state = init_ensemble(range(4), np.float64)
    rng = training.batch_rng(5)
    orders = [training.epoch_batches(1024, 64, rng)[:6] for _ in range(4)]
    kinds = {
        "shared": (orders[0], {}),
        "per_member": (np.stack(orders, 1), {}),
        "pooled": (orders[0], {"pool_members": True}),
    }
    rates = np.linspace(0.05, 0.2, 4) * np.ones((6, 1))
    found = {}
    for kind, (batches, options) in kinds.items():
        trained = {}
        for d in (1, 2, 4):
            trainer = ensemble.Trainer(
                params, state, images, labels, momentum=[0.9, 0.8, 0.7, 0.0], devices=d, **options
            )
            losses = trainer.epoch(batches, rates)
            trained[d] = (losses, trainer.params_numpy(), trainer.state_numpy())
            if d > 1:
                found[f"{kind}_D{d}_shards"] = len(trainer.params[0]["weight"].sharding.device_set)
        for d in (2, 4):
            found[f"{kind}_D{d}_vs_D1"] = max_diff(trained[d], trained[1])
    eight = init_ensemble(range(8), np.float64)
    for name, members, devices in (("not_dividing", (params, state), 3), ("too_many", eight, 8)):
        try:
            ensemble.Trainer(*members, images, labels, momentum=0.9, devices=devices)
            found[f"{name}_error"] = None
        except InputError as error:
            found[f"{name}_error"] = str(error)
    return found


if __name__ == "__main__":
    main(sys.argv[1])
