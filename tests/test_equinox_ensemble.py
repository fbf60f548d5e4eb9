"""Equinox's ``BatchNorm`` in a nested vmap (an ensemble): what works, what fails and with which
error, and Equinox #707 (``[samples, batch]`` inputs through two vmaps) reproduced and answered.

Tolerance against ``jaxside.ensemble``: 1e-12 relative in float64 (Equinox divides by
``sqrt(var + eps)`` where we multiply by its reciprocal and computes ``W x`` with ``W`` transposed:
rounding only, as in ``tests/test_equinox.py``).
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxside import ensemble as jax_ensemble
from jaxside import equinox_ensemble
from jaxside.equinox_model import MLP, from_params
from jaxside.layers import UnboundBatchAxisError
from tests.helpers import random_params, random_state

M, B = 3, 16
TOL = 1e-12


def stack(members):
    return [{key: np.stack([m[i][key] for m in members]) for key in members[0][i]} for i in range(len(members[0]))]


def rel_err(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in pairs)


@pytest.fixture(scope="module")
def data(mnist):
    train_x, train_y, _, _ = mnist
    params = stack([random_params(20 + k) for k in range(M)])
    state = stack([random_state(20 + k) for k in range(M)])
    images = train_x[: M * B].reshape(M, B, -1).astype(np.float64)
    return params, state, images, train_y[: M * B].reshape(M, B)


@pytest.mark.parametrize("pool_members", [False, True], ids=["per-member", "pooled (tuple axis_name)"])
def test_equinox_ensemble_equals_the_jax_ensemble(pool_members, data):
    """Stacked models under ``eqx.filter_vmap(axis_name="member")``: the same losses and gradients
    as ``jaxside.ensemble``; per-member statistics, or pooled with ``axis_name=("member", "batch")``.
    The running mean agrees too; the running variance is Equinox's biased one (``B/(B-1)`` apart)."""
    params, state, images, labels = data
    losses, grads, new_state = equinox_ensemble.loss_and_grads(params, state, images, labels, pool_members=pool_members)
    expected = jax_ensemble.loss_and_grads(params, state, images, labels, pool_members=pool_members)
    assert rel_err((losses, grads), expected[:2]) <= TOL
    n = M * B if pool_members else B
    for ours, eqx_layer, old in zip(expected[2], new_state, state):
        assert rel_err(eqx_layer["mean"], ours["mean"]) <= TOL
        bessel = (ours["var"] - 0.9 * old["var"]) / (eqx_layer["var"] - 0.9 * old["var"])
        np.testing.assert_allclose(bessel, n / (n - 1), rtol=1e-9)  # cancellation in the differences


def test_per_member_states_leave_the_member_vmap_batched(data):
    params, state, images, _ = data
    models, eqx_state = equinox_ensemble.from_ensemble_params(params, state)
    logits, new_state = equinox_ensemble.ensemble_forward(models, eqx_state, jnp.asarray(images), per_member=True)
    assert logits.shape == (M, B, 10)
    mean, var = new_state.get(models.norms[0].batch_state_index)
    assert mean.shape == var.shape == (M, 100)
    assert not np.allclose(mean[0], mean[1])  # each member its own statistics
    with pytest.raises(ValueError, match="out_axes"):  # and so they cannot leave it unbatched
        eqx.filter_vmap(
            lambda m, s, x: jax.vmap(m, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, s),
            in_axes=(eqx.if_array(0), eqx.if_array(0), 0),
            out_axes=(0, None),
            axis_name="member",
        )(models, eqx_state, jnp.asarray(images))


# ------------------------------------------------------------------------------------------------
# Equinox #707: one model, inputs [samples, batch, features], two vmaps
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(data):
    params, state, images, _ = data
    member = lambda tree: [{key: value[0] for key, value in layer.items()} for layer in tree]  # noqa: E731
    return from_params(member(params), member(state)), jnp.asarray(images)


def inner(model):
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")


def test_issue_707_reproduced(single):
    """#707: the outer vmap (over samples) returns the state with ``out_axes=None``, but batch norm
    over ``"batch"`` alone gives every sample its own statistics, so the state IS batched over samples."""
    (model, eqx_state), images = single
    with pytest.raises(ValueError, match="got axis spec None but output was batched on axis 0"):
        jax.vmap(inner(model), in_axes=(0, None), out_axes=(0, None))(images, eqx_state)


def test_issue_707_answer_pool_over_both_axes(single, data):
    """Answer 1, statistics over ``[samples, batch]``: ``BatchNorm(axis_name=("samples", "batch"))``
    and the outer vmap named ``"samples"``. The state is then invariant over both axes and leaves
    with ``out_axes=None``; the result is the model on the concatenated batch."""
    (model, eqx_state), images = single
    params, state, _, _ = data
    member = lambda tree: [{key: value[0] for key, value in layer.items()} for layer in tree]  # noqa: E731
    pooled_model, _ = equinox_ensemble.member_from_params(
        member(params), member(state), ("samples", "batch"), np.float64
    )
    both = jax.vmap(inner(pooled_model), in_axes=(0, None), out_axes=(0, None), axis_name="samples")
    logits, new_state = jax.jit(both)(images, eqx_state)
    flat_logits, flat_state = jax.jit(inner(model))(images.reshape(M * B, -1), eqx_state)
    assert rel_err(logits.reshape(M * B, -1), flat_logits) <= TOL
    assert (
        rel_err(new_state.get(model.norms[0].batch_state_index), flat_state.get(model.norms[0].batch_state_index))
        <= TOL
    )


def test_issue_707_answer_one_state_per_sample(single):
    """Answer 2, statistics per sample: keep ``axis_name="batch"`` and let the state out batched
    (``out_axes=(0, 0)``): sample ``s``'s state is that of the model run on sample ``s`` alone."""
    (model, eqx_state), images = single
    logits, new_state = jax.jit(jax.vmap(inner(model), in_axes=(0, None), out_axes=(0, 0)))(images, eqx_state)
    alone = jax.jit(inner(model))
    for s in range(M):
        alone_logits, alone_state = alone(images[s], eqx_state)
        assert rel_err(logits[s], alone_logits) <= TOL
        mean = new_state.get(model.norms[1].batch_state_index)[0][s]
        assert rel_err(mean, alone_state.get(model.norms[1].batch_state_index)[0]) <= TOL


# ------------------------------------------------------------------------------------------------
# what fails, and with which error
# ------------------------------------------------------------------------------------------------


def test_tuple_axis_name_needs_every_name_bound(single):
    """A tuple axis name whose outer name no vmap binds: Equinox's own BatchNorm raises JAX's
    ``NameError`` (which suggests ``shard_map``); our MLP says which vmap is missing."""
    _, images = single
    bn = eqx.nn.BatchNorm(784, axis_name=("member", "batch"), mode="batch", dtype=jnp.float64)
    bn_state = eqx.nn.State(bn)
    with pytest.raises(NameError, match="unbound axis name: member"):
        jax.vmap(inner(bn), in_axes=(0, None), out_axes=(0, None))(images, bn_state)
    pooled = eqx.nn.make_with_state(MLP)(dtype=jnp.float64, key=jax.random.PRNGKey(0), axis_name=("member", "batch"))
    with pytest.raises(UnboundBatchAxisError, match="member"):
        jax.vmap(inner(pooled[0]), in_axes=(0, None), out_axes=(0, None))(images, pooled[1])


def test_the_same_axis_name_twice_is_refused(single):
    """Naming both vmaps ``"batch"``: JAX lets the inner shadow the outer, and the state (batched
    over the outer axis) cannot leave with ``out_axes=None``."""
    bn = eqx.nn.BatchNorm(5, axis_name="batch", mode="batch")
    x = jnp.ones((3, 4, 5))
    with pytest.raises(ValueError, match="out_axes is None"):
        jax.vmap(inner(bn), in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, eqx.nn.State(bn))


def test_equinox_momentum_is_static_and_cannot_be_per_member():
    """``momentum`` is a static field: vmapping it warns and leaks a tracer into the module, and
    members with different momenta do not stack (different pytree metadata). ``jaxside.ensemble``
    takes ``bn_momentum`` as a traced ``(M,)`` array instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        leaked = eqx.filter_vmap(lambda m: eqx.nn.BatchNorm(5, axis_name="batch", mode="batch", momentum=m))(
            jnp.array([0.9, 0.5])
        )
    assert any("set as static" in str(w.message) for w in caught)
    assert isinstance(leaked.momentum, jax.core.Tracer)
    one = eqx.nn.BatchNorm(5, axis_name="batch", mode="batch", momentum=0.9)
    other = eqx.nn.BatchNorm(5, axis_name="batch", mode="batch", momentum=0.5)
    with pytest.raises(ValueError, match="metadata"):
        jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), one, other)
