"""The fast ensemble trainer repeats the reference ensemble trainer's arithmetic exactly.

``numpyside.fast_ensemble.FastEnsembleTrainer`` (a whole epoch per numba call, the members' features
side by side) against ``numpyside.ensemble.Trainer`` (``backend="numba"``, stacked layers, one
step per Python iteration): same losses, parameters and running statistics, bit for bit, for
every dtype, with batch norm on and off, shared and per-member batches, one and two threads. Both
run with single-threaded BLAS (what each thread of a split uses).
"""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from compare import training
from compare.contract import InputError
from compare.init import init_ensemble
from numpyside import ensemble as numpy_ensemble
from numpyside.fast_ensemble import FastEnsembleTrainer

M, B, STEPS = 3, 32, 3


def bit_equal_trees(a, b) -> bool:
    return len(a) == len(b) and all(
        layer_a.keys() == layer_b.keys() and all(np.array_equal(layer_a[k], layer_b[k]) for k in layer_a)
        for layer_a, layer_b in zip(a, b)
    )


def setup(mnist, dtype, batch_norm, batches_kind):
    train_x, train_y, _, _ = mnist
    images, labels = train_x[:512].astype(dtype), train_y[:512]
    params, state = init_ensemble(range(M), dtype, batch_norm)
    rng = training.batch_rng(3)
    orders = [training.epoch_batches(len(images), B, rng)[:STEPS] for _ in range(M)]
    batches = np.stack(orders, axis=1) if batches_kind == "per_member" else orders[0]
    rates = rng.uniform(0.05, 0.2, (STEPS, M))
    options = dict(momentum=[0.9, 0.5, 0.0], bn_momentum=[0.1, 0.3, 1.0] if batch_norm else None)
    return params, state, images, labels, batches, rates, options


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batches_kind", ["shared", "per_member"])
@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_ensemble_is_the_reference_bit_for_bit(dtype, batch_norm, batches_kind, threads, mnist):
    params, state, images, labels, batches, rates, options = setup(mnist, dtype, batch_norm, batches_kind)
    reference = numpy_ensemble.Trainer(params, state, images, labels, backend="numba", threads=threads, **options)
    fast = FastEnsembleTrainer(params, state, images, labels, threads=threads, **options)
    fast.compile(STEPS, B, per_member_batches=batches_kind == "per_member")
    with threadpool_limits(1, user_api="blas"):
        expected = [reference.epoch(batches, rates) for _ in range(2)]
    got = [fast.epoch(batches, rates) for _ in range(2)]
    assert got[0].shape == (STEPS, M) and got[0].dtype == dtype
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert bit_equal_trees(fast.params_numpy(), reference.params_numpy())
    assert bit_equal_trees(fast.state_numpy(), reference.state_numpy())
    assert fast.state_numpy() == [] if not batch_norm else len(fast.state_numpy()) == 3
    with threadpool_limits(1, user_api="blas"):
        assert np.array_equal(fast.predict_logits(images[:50]), reference.predict_logits(images[:50]))


def test_compile_changes_nothing(mnist):
    params, state, images, labels, batches, rates, options = setup(mnist, np.float32, True, "shared")
    fast = FastEnsembleTrainer(params, state, images, labels, **options)
    fast.compile(STEPS, B)
    assert bit_equal_trees(fast.params_numpy(), params)
    assert bit_equal_trees(fast.state_numpy(), state)
    losses = fast.epoch(batches, rates)
    assert np.all(np.isfinite(losses)) and not bit_equal_trees(fast.params_numpy(), params)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool_members": True}, "pooled or ghost batch norm: numpyside.ensemble.Trainer"),
        ({"ghost_batches": 2}, "pooled or ghost batch norm: numpyside.ensemble.Trainer"),
        ({"backend": "numpy"}, "backend='numpy'"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"threads": True}, "threads must be a positive integer"),
        ({"bn_momentum": [0.1, 2.0, 0.1]}, "bn_momentum must lie in"),
        ({"momentum": [0.9, 0.9]}, "momentum must be a number or one per member"),
    ],
)
def test_bad_setup_is_refused_by_name(options, message, mnist):
    params, state, images, labels, _, _, defaults = setup(mnist, np.float32, True, "shared")
    with pytest.raises(InputError, match=message):
        FastEnsembleTrainer(params, state, images, labels, **(defaults | options))


def test_bad_epoch_is_refused_by_name(mnist):
    params, state, images, labels, _, _, options = setup(mnist, np.float32, True, "shared")
    fast = FastEnsembleTrainer(params, state, images, labels, **options)
    with pytest.raises(InputError, match="batch_indices must lie"):
        fast.epoch(np.full((1, B), len(images)), [0.1])
    with pytest.raises(InputError, match="batch_indices must be"):
        fast.epoch(np.zeros((1, M + 1, B), int), [0.1])
    with pytest.raises(InputError, match="at least 2 examples"):
        fast.epoch(np.zeros((1, 1), int), [0.1])
