"""``jaxside.transforms`` on a model that is not ours, against ``jax.grad`` of the explicitly batched loss.

The model: 7 -> 11 -> 13 -> 5, ReLU, batch norm on both hidden layers (no bias: the batch mean
cancels it), running statistics with momentum as a hyper-parameter and an integer step counter in
the state; its parameters and state are dicts of lists, not our layout. It is written twice:

* per example, reaching across the batch only through ``pmean``/``psum`` on a named axis (the form
  the transforms take);
* explicitly batched (the reference): each (member, example) row gets its OWN copy of the parameters
  (leading axes ``(M, B)``) and batch norm reduces over explicit array axes. Broadcasting one copy to
  every row gives the usual model (``jax.grad`` sums the rows); differentiating the row copies gives
  the per-example gradients (``per_example_grads``' meaning: the per-row term of the batch backward).

Tolerance, float64, every leaf, normwise ``max|a - b| / max|b|``: ``1e-12``. The two programs
compute the same formulas with sums in another order (``psum`` over a vmap axis vs ``mean`` over an
array axis), amplified by batch norm's cancelling backward; measured at most ~1e-15.
JAX's 64-bit mode is on for the whole session (``tests/conftest.py``); the fixtures check it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compare.contract import InputError
from jaxside import transforms as T

TOL = 1e-12
SIZES = (7, 11, 13, 5)
EPS = 1e-5
M, B = 3, 12
ROOT = Path(__file__).resolve().parents[1]


def rel_err(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(y))), 1e-300))
        for x, y in pairs
    )


def init(seed: int):
    rng = np.random.default_rng(seed)
    hidden = SIZES[1:-1]
    params = {
        "weights": [rng.normal(0, 1 / np.sqrt(n), (n, k)) for n, k in zip(SIZES[:-2], hidden)],
        "norms": [{"scale": rng.uniform(0.5, 1.5, k), "shift": rng.normal(0, 0.1, k)} for k in hidden],
        "out": {"w": rng.normal(0, 1 / np.sqrt(SIZES[-2]), SIZES[-2:]), "b": rng.normal(0, 0.1, SIZES[-1])},
    }
    state = {
        "mean": [rng.normal(0, 0.1, k) for k in hidden],
        "var": [rng.uniform(0.5, 2, k) for k in hidden],
        "steps": np.int32(seed),
    }
    return jax.tree_util.tree_map(jnp.asarray, (params, state))


def stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


# ------------------------------------------------------------------------------------------------
# the model, per example (what the transforms take)
# ------------------------------------------------------------------------------------------------


def example_loss(params, state, x, y, *, momentum=0.1, axis_name="batch"):
    """ONE example's cross-entropy and the new state; batch norm via collectives on ``axis_name``."""
    n = jax.lax.psum(1, axis_name)
    new_state = {"mean": [], "var": [], "steps": state["steps"] + 1}
    h = x
    for w, norm, mean, var in zip(params["weights"], params["norms"], state["mean"], state["var"]):
        z = h @ w
        mu = jax.lax.pmean(z, axis_name)
        sigma2 = jax.lax.pmean((z - mu) ** 2, axis_name)
        h = jax.nn.relu(norm["scale"] * (z - mu) / jnp.sqrt(sigma2 + EPS) + norm["shift"])
        new_state["mean"].append((1 - momentum) * mean + momentum * mu)
        new_state["var"].append((1 - momentum) * var + momentum * sigma2 * n / (n - 1))
    logits = h @ params["out"]["w"] + params["out"]["b"]
    return -jax.nn.log_softmax(logits)[y], new_state


# ------------------------------------------------------------------------------------------------
# the same model, explicitly batched: rows (M, B), one parameter copy per row
# ------------------------------------------------------------------------------------------------


def explicit_losses(row_params, state, x, y, momentum, pooled: bool):
    """Losses ``(M, B)`` and the members' new states; ``row_params`` leaves ``(M, B, ...)``, ``state``
    leaves ``(M, ...)``, ``x (M, B, 7)``, ``momentum (M,)``. Statistics per member, or pooled."""
    axes = (0, 1) if pooled else (1,)
    n = x.shape[0] * x.shape[1] if pooled else x.shape[1]
    m = momentum[:, None]
    new_state = {"mean": [], "var": [], "steps": state["steps"] + 1}
    h = x
    for w, norm, mean, var in zip(row_params["weights"], row_params["norms"], state["mean"], state["var"]):
        z = jnp.einsum("mbi,mbio->mbo", h, w)
        mu = z.mean(axis=axes, keepdims=True)
        sigma2 = ((z - mu) ** 2).mean(axis=axes, keepdims=True)
        h = jax.nn.relu(norm["scale"] * (z - mu) / jnp.sqrt(sigma2 + EPS) + norm["shift"])
        mu, sigma2 = jnp.broadcast_to(mu, z.shape)[:, 0], jnp.broadcast_to(sigma2, z.shape)[:, 0]
        new_state["mean"].append((1 - m) * mean + m * mu)
        new_state["var"].append((1 - m) * var + m * sigma2 * n / (n - 1))
    logits = jnp.einsum("mbi,mbio->mbo", h, row_params["out"]["w"]) + row_params["out"]["b"]
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]
    return -picked, new_state


def to_rows(stacked_params, batch: int):
    """One copy of each member's parameters per example: ``(M, ...)`` -> ``(M, B, ...)``."""
    return jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], batch, *a.shape[1:])), stacked_params
    )


@functools.partial(jax.jit, static_argnames="pooled")
def reference(params, state, x, y, momentum, pooled=False):
    """Member losses ``(M,)`` (mean over B), ``jax.grad`` of their sum, new states: stacked members."""

    def total(p):
        losses, new_state = explicit_losses(to_rows(p, x.shape[1]), state, x, y, momentum, pooled)
        return losses.mean(axis=1).sum(), (losses.mean(axis=1), new_state)

    grads, (losses, new_state) = jax.grad(total, has_aux=True)(params)
    return losses, grads, new_state


def single(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def unsingle(tree):
    return jax.tree_util.tree_map(lambda a: a[0], tree)


@pytest.fixture(scope="module")
def data():
    assert jax.config.jax_enable_x64, "tests/conftest.py switches JAX's 64-bit mode on"
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(M, B, SIZES[0])))
    y = jnp.asarray(rng.integers(0, SIZES[-1], (M, B)), jnp.int32)
    members = [init(seed) for seed in range(M)]
    params, state = stack([p for p, _ in members]), stack([s for _, s in members])
    assert params["out"]["w"].dtype == np.float64
    return params, state, x, y


# ------------------------------------------------------------------------------------------------
# each transform against the explicit batch
# ------------------------------------------------------------------------------------------------


def test_batch_loss_and_its_gradient(data):
    params, state, x, y = data
    p, s = jax.tree_util.tree_map(lambda a: a[0], (params, state))
    step = jax.jit(T.with_grads(T.batch_loss(example_loss)))
    loss, grads, new_state = step(p, s, x[0], y[0])
    expected = reference(single(p), single(s), x[:1], y[:1], jnp.full(1, 0.1))
    assert rel_err((loss, grads, new_state), unsingle(expected)) <= TOL
    assert int(new_state["steps"]) == int(s["steps"]) + 1  # an integer leaf leaves the vmap unbatched too


@pytest.mark.parametrize("ghosts", [3])  # G = 2 is the per-device case of the device checks
def test_ghost_batches_are_batches_of_their_own(data, ghosts):
    """``ghost_batches=G``: the loss and gradients are the mean over the G blocks of consecutive
    examples, each normalised alone; the new state is the blocks' mean (the counter: +1)."""
    params, state, x, y = data
    p, s = jax.tree_util.tree_map(lambda a: a[0], (params, state))
    loss, grads, new_state = jax.jit(T.with_grads(T.batch_loss(example_loss, ghost_batches=ghosts)))(p, s, x[0], y[0])
    blocks = [
        unsingle(reference(single(p), single(s), xb[None], yb[None], jnp.full(1, 0.1)))
        for xb, yb in zip(jnp.split(x[0], ghosts), jnp.split(y[0], ghosts))
    ]
    mean = lambda *leaves: sum(leaves) / len(leaves)  # noqa: E731
    expected = jax.tree_util.tree_map(mean, *[(b[0], b[1], {"mean": b[2]["mean"], "var": b[2]["var"]}) for b in blocks])
    assert rel_err((loss, grads, {"mean": new_state["mean"], "var": new_state["var"]}), expected) <= TOL
    assert new_state["steps"].dtype == np.int32 and int(new_state["steps"]) == int(s["steps"]) + 1


@pytest.mark.parametrize("shared_batch", [True, False], ids=["shared batch", "batch per member"])
def test_ensemble_with_per_member_momenta(data, shared_batch):
    """Per-member statistics, and the running statistics' momentum a traced ``(M,)`` hyper-parameter."""
    params, state, x, y = data
    momenta = jnp.array([0.1, 0.5, 0.9])
    batch = (x, y) if not shared_batch else (x[0], y[0])
    losses_fn = T.ensemble_loss(T.batch_loss(example_loss), shared_batch=shared_batch)

    @jax.jit
    def step(params, state, images, labels, momentum):
        def total(p):  # members are independent: the gradient of the sum is every member's own
            losses, new_state = losses_fn(p, state, images, labels, momentum=momentum)
            return losses.sum(), (losses, new_state)

        grads, (losses, new_state) = jax.grad(total, has_aux=True)(params)
        return losses, grads, new_state

    found = step(params, state, *batch, momenta)
    rows = (x, y) if not shared_batch else (jnp.broadcast_to(x[0], x.shape), jnp.broadcast_to(y[0], y.shape))
    expected = reference(params, state, *rows, momenta)
    assert found[0].shape == (M,)
    assert rel_err(found, expected) <= TOL


def test_pooled_statistics_name_both_axes(data):
    """``axis_name=("member", "batch")`` in the user's function: statistics over all M x B examples,
    every member's new state the same, and ``jax.grad`` of the summed losses through the coupling."""
    params, state, x, y = data
    pooled_example = functools.partial(example_loss, axis_name=("member", "batch"))
    pooled = T.ensemble(T.with_grads(T.batch_loss(pooled_example)), shared_batch=False)
    losses, grads, new_state = jax.jit(pooled)(params, state, x, y)
    expected = reference(params, state, x, y, jnp.full(M, 0.1), pooled=True)
    assert rel_err((losses, grads, new_state), expected) <= TOL
    unpooled = reference(params, state, x, y, jnp.full(M, 0.1))
    assert rel_err(grads, unpooled[1]) > 1e-3  # a different model: the members are coupled


def test_per_example_gradients_are_the_rows_of_the_batch_backward(data):
    """``per_example_grads``: ``g_b = dS/d(theta_b)`` for ``S = sum_b l_b`` with one parameter copy per
    example, so that ``sum_b g_b`` is ``B`` times the batch gradient."""
    params, state, x, y = data
    p, s = jax.tree_util.tree_map(lambda a: a[0], (params, state))
    losses, grads, new_state = jax.jit(T.per_example_grads(example_loss))(p, s, x[0], y[0])

    def summed_loss(rows):  # S = sum_b l_b, example b computed with its own copy rows[b]
        row_losses, new_state = explicit_losses(rows, single(s), x[:1], y[:1], jnp.full(1, 0.1), False)
        return row_losses.sum(), (row_losses, new_state)

    expected, (rows_losses, expected_state) = jax.jit(jax.grad(summed_loss, has_aux=True))(to_rows(single(p), B))
    assert losses.shape == (B,) and grads["out"]["w"].shape == (B, *SIZES[-2:])
    assert rel_err((losses, grads, new_state), (rows_losses[0], unsingle(expected), unsingle(expected_state))) <= TOL
    batch_grads = jax.jit(T.with_grads(T.batch_loss(example_loss)))(p, s, x[0], y[0])[1]
    summed = jax.tree_util.tree_map(lambda g: g.sum(axis=0) / B, grads)
    assert rel_err(summed, batch_grads) <= TOL


def sgd(params, grads, rates):
    """Each member's SGD step with its own learning rate (``vmap`` over the member axis)."""
    return jax.vmap(lambda p, g, lr: jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g))(params, grads, rates)


def test_the_core_is_traceable_inside_a_users_jit(data):
    """A whole SGD step of the ensemble, per-member learning rates and momenta as traced arrays, in
    the user's own ``jax.jit``: no NumPy conversion anywhere; two steps against the reference."""
    params, state, x, y = data
    losses_and_grads = T.ensemble(T.with_grads(T.batch_loss(example_loss)))
    rates, momenta = jnp.array([0.1, 0.2, 0.3]), jnp.array([0.1, 0.2, 0.3])

    @jax.jit
    def sgd_step(params, state, images, labels, rates, momenta):
        losses, grads, state = losses_and_grads(params, state, images, labels, momentum=momenta)
        return sgd(params, grads, rates), state, losses

    shared = (jnp.broadcast_to(x[0], x.shape), jnp.broadcast_to(y[0], y.shape))
    found = expected = (params, state)
    for _ in range(2):
        found = sgd_step(*found[:2], x[0], y[0], rates, momenta)
        losses, grads, new_state = reference(*expected[:2], *shared, momenta)
        expected = sgd(expected[0], grads, rates), new_state, losses
    assert rel_err(found, expected) <= TOL
    logits = jax.jit(T.ensemble(T.batch_apply(lambda p, s, xi: (xi @ p["weights"][0], s))))(params, state, x[0])[0]
    assert logits.shape == (M, B, SIZES[1])


def test_ensemble_probabilities_and_accuracy():
    logits = jnp.array([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 1.0]]])  # 2 members, 2 examples
    softmax = jax.nn.softmax(logits, axis=-1)
    probabilities = T.ensemble_probabilities(logits)
    np.testing.assert_allclose(probabilities, (softmax[0] + softmax[1]) / 2, rtol=1e-15)
    # example 0: member 0 says class 0 (p 0.88), member 1 class 1 (p 0.95): the mean says class 1
    assert float(T.ensemble_accuracy(logits, jnp.array([1, 1]))) == 1.0
    assert float(T.ensemble_accuracy(logits, jnp.array([0, 1]))) == 0.5
    with pytest.raises(InputError, match=r"\(members, batch, classes\)"):
        T.ensemble_probabilities(logits[0])


# ------------------------------------------------------------------------------------------------
# two host devices, a mesh axis the caller names (a fresh JAX process: the device count is fixed at start)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_checks(tmp_path_factory):
    """``tests/transforms_device_checks.py`` on 2 CPU devices; ``subprocess.run`` kills it (SIGKILL)
    and waits for it if it outlives its time."""
    out = tmp_path_factory.mktemp("transforms") / "checks.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    script = ROOT / "tests" / "transforms_device_checks.py"
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(out)], cwd=ROOT, env=env, capture_output=True, timeout=300
        )
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"{script.name} did not finish within {timeout.timeout} s")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(out.read_text())


def test_data_parallel_over_a_mesh_axis_the_caller_names(device_checks):
    """Collectives naming ``("shards", "batch")``: the whole batch's statistics, the one-device result;
    naming ``"batch"`` only: each device's own (two ghost batches). Per-example gradients split over
    the devices (``split_outputs``) are the one-device rows. ``jaxside.parallel`` with ``axis_name``."""
    found = device_checks
    assert found["device_count"] == 2
    assert found["synchronised_vs_one_device"] <= TOL
    assert found["per_device_vs_two_ghost_batches"] <= TOL
    assert found["per_device_vs_synchronised"] > 1e-3  # a different model
    assert found["per_example_vs_one_device"] <= TOL
    assert found["ours_synchronised_vs_one_device"] <= TOL


def test_data_parallel_errors_name_the_fix(device_checks):
    assert (
        "a batch of 7 examples cannot be split evenly over the 2 devices of mesh axis 'shards'"
        in (device_checks["indivisible_error"])
    )
    assert "an axis named 'device'" in device_checks["unknown_axis_error"]
    assert "pass axis_name='shards'" in device_checks["ours_axis_mismatch_error"]


# ------------------------------------------------------------------------------------------------
# errors that point at the fix
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one(data):
    params, state, x, y = data
    return (*jax.tree_util.tree_map(lambda a: a[0], (params, state)), x[0], y[0])


def test_a_function_whose_collectives_name_another_axis(one):
    """Any user function, not only our layers: JAX's bare ``NameError`` becomes one that names both
    axes and the fix, for the batch, per-example gradients and the ensemble alike."""
    elsewhere = functools.partial(example_loss, axis_name="examples")
    for transform in (T.batch_loss(elsewhere), T.per_example_grads(elsewhere)):
        with pytest.raises(T.UnboundAxisError, match="reaches across an axis named 'examples'") as error:
            transform(*one)
        assert "pass axis_name='examples'" in str(error.value) and "binds 'batch'" in str(error.value)
    pooled = functools.partial(example_loss, axis_name=("member", "batch"))
    with pytest.raises(T.UnboundAxisError, match=r"axis named 'member'.*ensemble"):
        T.batch_loss(pooled)(*one)


def test_a_state_that_differs_between_examples(one):
    """A per-example function whose "running statistic" forgot the collective."""

    def forgetful(params, state, x, y):
        loss, new_state = example_loss(params, state, x, y)
        return loss, {**new_state, "mean": [x.mean() + m for m in new_state["mean"]]}

    with pytest.raises(T.StateNotSharedError, match=r"differs between the examples of axis 'batch'.*forget"):
        T.batch_loss(forgetful)(*one)


def test_ghost_batches_of_one_example(one):
    with pytest.raises(
        InputError, match=r"ghost_batches=12 cannot split a batch of 12 .* choose ghost_batches among \[1, 2, 3, 4, 6\]"
    ):
        T.batch_loss(example_loss, ghost_batches=12)(*one)
    with pytest.raises(InputError, match="ghost_batches=5 cannot split"):
        T.batch_loss(example_loss, ghost_batches=5)(*one)
    with pytest.raises(InputError, match="positive integer"):
        T.batch_loss(example_loss, ghost_batches=0)


def test_ensemble_inputs(data, one):
    params, state, x, y = data
    losses = T.ensemble_loss(T.batch_loss(example_loss))
    with pytest.raises(InputError, match=r"state\['steps'\] is a scalar.*ONE model's parameters, stack M members"):
        losses(*one)  # one model's parameters and state, not stacked
    stateless = T.ensemble_loss(T.batch_loss(lambda p, s, x, y: (example_loss(p, None, x, y)[0], None)))
    with pytest.raises(
        InputError, match=r"sizes of params and state disagree: params\['norms'\]\[0\]\['scale'\] \(11,\)"
    ):
        stateless(one[0], None, *one[2:])
    with pytest.raises(InputError, match=r"batch argument 0 needs a leading member axis of 3 .* shared_batch=True"):
        T.ensemble_loss(T.batch_loss(example_loss), shared_batch=False)(params, state, x[0], y[0])
    with pytest.raises(InputError, match=r"hyper-parameter momentum has shape \(2,\), but the ensemble has 3 members"):
        losses(params, state, x[0], y[0], momentum=jnp.ones(2))
    shared = losses(params, state, x[0], y[0], momentum=0.2)[0]  # a scalar is shared
    assert rel_err(shared, losses(params, state, x[0], y[0], momentum=jnp.full(M, 0.2))[0]) <= TOL
    flagged = T.ensemble_loss(
        T.batch_loss(lambda p, s, xi, yi, *, slow: example_loss(p, s, xi, yi, momentum=0.2 if slow else 0.5))
    )
    assert rel_err(flagged(params, state, x[0], y[0], slow=True)[0], shared) <= TOL  # a Python flag stays static


def test_a_model_with_non_array_leaves(one):
    params, state, x, y = one
    with pytest.raises(InputError, match=r"params\['activation'\] is a function, not an array.*eqx.partition"):
        T.batch_loss(example_loss)({**params, "activation": lambda z: z}, state, x, y)


def test_our_ensemble_api_says_what_to_fix(mnist):
    """The three misleading messages of issue 22, replaced."""
    from compare.init import init_ensemble, init_params, init_state
    from jaxside import ensemble

    params, state = init_ensemble(range(3), np.float64)
    images, labels = mnist[0][:16].astype(np.float64), mnist[1][:16]
    with pytest.raises(
        InputError,
        match=r"got \(16, 28, 28\); these look like unflattened 28x28 images: flatten them, images.reshape\(16, 784\)",
    ):
        ensemble.loss_and_grads(params, state, images.reshape(16, 28, 28), labels)
    single = init_params(0, np.float64), init_state(np.float64)
    with pytest.raises(InputError, match=r"ONE model's layout .* compare.init.init_ensemble\(seeds\), or jax.tree.map"):
        ensemble.loss_and_grads(*single, images, labels)
    with pytest.raises(InputError, match=r"ghost_batches=16 splits the batch of 16 into ghost batches of 1 example"):
        ensemble.loss_and_grads(params, state, images, labels, ghost_batches=16)
