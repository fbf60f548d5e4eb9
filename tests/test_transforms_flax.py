"""``jaxside.transforms`` on a Flax ``linen`` model, and Flax #3319 reproduced and answered.

The model: 6 -> 10 -> 9 -> 4, ``nn.Dense`` + ``nn.BatchNorm(axis_name=...)`` + ReLU, float64
parameters. The reference is Flax's OWN batched model: the same module with ``axis_name=None``
applied to the ``(B, features)`` batch, where ``nn.BatchNorm`` reduces over the array's batch axis.

Tolerance, float64, every leaf, normwise ``max|a - b| / max|b|``: ``1e-12`` (``pmean`` over a vmap
axis against ``mean`` over an array axis: the same formulas summed in another order, amplified by
batch norm's backward; measured at most ~1e-15). Skipped, with the install command, without Flax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxside import transforms as T

nn = pytest.importorskip("flax.linen", reason="Flax is optional: pip install -e '.[flax]' (or pip install flax)")

TOL = 1e-12
FEATURES, CLASSES, M, B = 6, 4, 3, 10


class Net(nn.Module):
    axis_name: str | tuple | None = "batch"

    @nn.compact
    def __call__(self, x, train: bool):
        for width in (10, 9):
            x = nn.Dense(width, use_bias=False, param_dtype=jnp.float64)(x)
            x = nn.BatchNorm(
                use_running_average=not train, axis_name=self.axis_name, momentum=0.8, param_dtype=jnp.float64
            )(x)
            x = nn.relu(x)
        return nn.Dense(CLASSES, param_dtype=jnp.float64)(x)


def example_loss(params, stats, x, y, *, model):
    logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return -jax.nn.log_softmax(logits)[y], updates["batch_stats"]


def explicit(params, stats, x, y):
    """Flax's batched model on ``x (n, features)``: per-example losses ``(n,)`` and the new statistics."""
    logits, updates = Net(axis_name=None).apply(
        {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0], updates["batch_stats"]


def rel_err(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in pairs)


def member(tree, k):
    return jax.tree_util.tree_map(lambda leaf: leaf[k], tree)


@pytest.fixture(scope="module")
def data():
    assert jax.config.jax_enable_x64, "tests/conftest.py switches JAX's 64-bit mode on"
    keys = jax.random.split(jax.random.key(0), M)
    variables = jax.vmap(lambda key: Net().init(key, jnp.zeros(FEATURES), train=False))(keys)
    rng = np.random.default_rng(1)
    stats = jax.tree_util.tree_map(  # running statistics that are not the initial zeros and ones
        lambda leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape)), variables["batch_stats"]
    )
    x = jnp.asarray(rng.normal(size=(M, B, FEATURES)))
    y = jnp.asarray(rng.integers(0, CLASSES, (M, B)), jnp.int32)
    return variables["params"], stats, x, y


def test_batch_loss_equals_flax_on_the_batch(data):
    params, stats, x, y = data
    p, s = member(params, 0), member(stats, 0)
    found = jax.jit(T.with_grads(T.batch_loss(functools.partial(example_loss, model=Net()))))(p, s, x[0], y[0])

    def reference(p):
        losses, new_stats = explicit(p, s, x[0], y[0])
        return losses.mean(), new_stats

    (loss, new_stats), grads = jax.value_and_grad(reference, has_aux=True)(p)
    assert rel_err(found, (loss, grads, new_stats)) <= TOL


def test_ensemble_with_per_member_statistics_is_each_member_alone(data):
    params, stats, x, y = data
    step = T.ensemble(T.with_grads(T.batch_loss(functools.partial(example_loss, model=Net()))), shared_batch=False)
    losses, grads, new_stats = jax.jit(step)(params, stats, x, y)
    for k in range(M):

        def reference(p, k=k):
            member_losses, new_stats = explicit(p, member(stats, k), x[k], y[k])
            return member_losses.mean(), new_stats

        (loss, stats_k), grads_k = jax.value_and_grad(reference, has_aux=True)(member(params, k))
        assert rel_err((losses[k], member(grads, k), member(new_stats, k)), (loss, grads_k, stats_k)) <= TOL


def test_pooled_statistics_are_those_of_all_members_batches(data):
    """``axis_name=("member", "batch")`` with every member given member 0's weights and statistics:
    the model on the members' batches concatenated. Member ``k``'s loss is the mean over its own
    ``B`` examples; its gradient is that of the SUM of the members' losses with respect to its own
    copy, so the members' gradients add up to the gradient of the summed loss of the shared weights."""
    params, stats, x, y = data
    params, stats = jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf[:1], leaf.shape), (params, stats))
    pooled = functools.partial(example_loss, model=Net(axis_name=("member", "batch")))
    losses, grads, new_stats = jax.jit(T.ensemble(T.with_grads(T.batch_loss(pooled)), shared_batch=False))(
        params, stats, x, y
    )

    def reference(p):
        all_losses, new_stats = explicit(p, member(stats, 0), x.reshape(M * B, -1), y.reshape(-1))
        return all_losses.sum() / B, (all_losses.reshape(M, B).mean(axis=1), new_stats)

    summed, (expected_losses, expected_stats) = jax.grad(reference, has_aux=True)(member(params, 0))
    assert rel_err(losses, expected_losses) <= TOL
    assert rel_err(jax.tree_util.tree_map(lambda g: g.sum(axis=0), grads), summed) <= TOL
    for k in range(M):
        assert rel_err(member(new_stats, k), expected_stats) <= TOL


def test_per_example_gradients_sum_to_the_batch_gradient(data):
    params, stats, x, y = data
    p, s = member(params, 0), member(stats, 0)
    loss_fn = functools.partial(example_loss, model=Net())
    losses, grads, _ = jax.jit(T.per_example_grads(loss_fn))(p, s, x[0], y[0])
    batch_grads = jax.grad(lambda q: explicit(q, s, x[0], y[0])[0].sum())(p)
    assert losses.shape == (B,) and grads["Dense_0"]["kernel"].shape == (B, FEATURES, 10)
    assert rel_err(jax.tree_util.tree_map(lambda g: g.sum(axis=0), grads), batch_grads) <= TOL
    assert rel_err(losses, explicit(p, s, x[0], y[0])[0]) <= TOL


# ------------------------------------------------------------------------------------------------
# Flax #3319: nested nn.vmap of a module with nn.BatchNorm, inputs [samples, batch, features]
# ------------------------------------------------------------------------------------------------


class Inner(nn.Module):
    axis_name: str | tuple = "batch"

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5, param_dtype=jnp.float64)(x)
        return nn.relu(nn.BatchNorm(use_running_average=False, axis_name=self.axis_name, param_dtype=jnp.float64)(x))


def nested(axis_name, sample_stats_axis=None):
    shared = {"params": None, "batch_stats": None}
    over_batch = nn.vmap(Inner, variable_axes=shared, split_rngs={"params": False}, axis_name="batch")
    over_samples = nn.vmap(
        over_batch,
        variable_axes={"params": None, "batch_stats": sample_stats_axis},
        split_rngs={"params": False},
        axis_name="samples",
    )
    return over_samples(axis_name=axis_name)


@pytest.fixture(scope="module")
def samples():
    return jnp.asarray(np.random.default_rng(2).normal(size=(3, 8, FEATURES)))  # [samples, batch, features]


def flat_reference(variables, samples):
    """``Inner`` on all samples' examples as one batch (``axis_name=None``: the array's batch axis)."""
    return Inner(axis_name=None).apply(variables, samples.reshape(-1, FEATURES), mutable=["batch_stats"])


def test_issue_3319_reproduced(samples):
    """``batch_stats`` declared shared over samples (``None``) while batch norm reduces over
    ``"batch"`` only: each sample's statistics differ, so the outer vmap cannot return them unmapped."""
    model = nested("batch")
    variables = model.init(jax.random.key(0), samples)  # init does not update batch_stats
    with pytest.raises(ValueError, match=r"vmap has mapped output \(axis_name=samples\) but out_axes is None"):
        model.apply(variables, samples, mutable=["batch_stats"])


def test_issue_3319_answer_statistics_over_samples_and_batch(samples):
    """``axis_name=("samples", "batch")``: the statistics of every example of every sample, the same
    across samples, so ``"batch_stats": None`` holds; equal to the model on the flattened batch."""
    model = nested(("samples", "batch"))
    variables = model.init(jax.random.key(0), samples)
    out, updates = jax.jit(lambda v, s: model.apply(v, s, mutable=["batch_stats"]))(variables, samples)
    flat_out, flat_updates = flat_reference(variables, samples)
    assert rel_err((out.reshape(-1, 5), updates), (flat_out, flat_updates)) <= TOL


def test_issue_3319_answer_statistics_per_sample(samples):
    """``axis_name="batch"`` and ``"batch_stats": 0``: one set of statistics per sample, each that of
    the model run on that sample alone."""
    model = nested("batch", sample_stats_axis=0)
    variables = model.init(jax.random.key(0), samples)
    out, updates = model.apply(variables, samples, mutable=["batch_stats"])
    for s in range(samples.shape[0]):
        alone = {"params": variables["params"], "batch_stats": member(variables["batch_stats"], s)}
        alone_out, alone_updates = flat_reference(alone, samples[s : s + 1])
        assert rel_err((out[s], member(updates, s)), (alone_out, alone_updates)) <= TOL


def test_issue_3319_with_the_transforms(samples):
    """The same two answers with ``jaxside.transforms``: ``batch_apply`` twice (statistics over both
    axes); and, forgetting the outer name, a message that says the state differs across samples."""
    variables = Inner().init(jax.random.key(0), samples[0, 0])

    def train_out(params, stats, x, *, model):
        out, updates = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return out, updates["batch_stats"]

    both = functools.partial(train_out, model=Inner(axis_name=("samples", "batch")))
    out, stats = jax.jit(T.batch_apply(T.batch_apply(both), "samples"))(
        variables["params"], variables["batch_stats"], samples
    )
    flat_out, flat_updates = flat_reference(variables, samples)
    assert rel_err((out.reshape(-1, 5), stats), (flat_out, flat_updates["batch_stats"])) <= TOL
    forgetful = T.batch_apply(T.batch_apply(functools.partial(train_out, model=Inner())), "samples")
    with pytest.raises(T.StateNotSharedError, match="differs between the examples of axis 'samples'"):
        forgetful(variables["params"], variables["batch_stats"], samples)
