"""The Equinox model (``jaxside.equinox_model``) against ``jaxside`` (our pmean model) and ``numpyside``
(batched, hand-differentiated), on the same parameters and batches; the state conversion; how
Equinox's running statistics differ from ours, measured; and the refusals (unbound / shadowed axis).

Tolerances, as ``compare.metrics.max_rel_err`` (``max|a - b| / max|b|``):

* float64: ``1e-10``. The three sides evaluate the same formulas in different orders (Equinox divides
  by ``sqrt(var + eps)`` where we multiply by its reciprocal, ``eqx.nn.Linear`` computes ``W x`` with
  the transposed weight, NumPy's backward is written by hand), so they agree to rounding: measured
  ~1e-15. Any difference in the formulas themselves (eps placement, biased vs unbiased variance in
  the normalisation, a missing coupling term in the gradient) is >= 1e-6, far above the bound.
* float32: ``1e-4``. Rounding is 6e-8 per operation; sums over the 784 inputs and the 128 examples
  of a batch, through four layers and batch norm's division by a small standard deviation, amplify
  it: measured ~1e-6 for gradients, ~1e-7 for logits. 1e-4 keeps a margin of ~100 and is still far
  below the size of a formula difference in float32 (eps placement alone is ~1e-5 / var).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxside
import jaxside.model as pmean_model
from compare import training
from compare.contract import BN_EPS, BN_MOMENTUM, InputError
from compare.init import init_params, init_state
from compare.metrics import max_rel_err
from jaxside import equinox_model as em
from jaxside import layers as jax_layers
from jaxside.layers import NestedBatchAxisError, UnboundBatchAxisError, batchnorm_train
from jaxside.model import forward_pass
from tests.helpers import random_params, random_state

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}
BATCH = 128


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def random_batch(seed, size=BATCH):
    rng = np.random.default_rng(3000 + seed)
    return rng.uniform(0.0, 1.0, (size, 784)), rng.integers(0, 10, size).astype(np.int32)


def mnist_batch(mnist, size=BATCH):
    train_x, train_y, _, _ = mnist
    return train_x[:size], train_y[:size]


def rel_errs(a_tree, b_tree):
    """``max_rel_err`` per leaf of two params/state layouts, keyed ``"layer.key"``."""
    return {f"{i}.{k}": max_rel_err(a[k], b[k]) for i, (a, b) in enumerate(zip(a_tree, b_tree)) for k in b}


_pmean_train_logits = jax.jit(lambda p, s, x: pmean_model.batched_forward(p, s, x, train=True)[0])


@dataclass(frozen=True)
class RunningStatsDifference:
    """One training step on one batch, from the same ``(params, state)``, per hidden layer.

    ``ours_*``: ``jaxside`` (PyTorch rule); ``eqx_*``: Equinox as configured in ``em`` (debiasing off);
    ``native_*``: Equinox's eval statistics when started with ``counter=0`` (its fresh-state
    behaviour); ``batch_mean``/``batch_var``: the batch's statistics (``var`` biased), from ``jaxside``.
    """

    batch_size: int
    var0: list[np.ndarray]
    batch_mean: list[np.ndarray]
    batch_var: list[np.ndarray]
    ours_mean: list[np.ndarray]
    ours_var: list[np.ndarray]
    eqx_mean: list[np.ndarray]
    eqx_var: list[np.ndarray]
    native_mean: list[np.ndarray]
    native_var: list[np.ndarray]

    @property
    def var_ratio(self) -> list[np.ndarray]:
        """``(ours_var - 0.9 var0) / (eqx_var - 0.9 var0)``, i.e. ``(0.1 var B/(B-1)) / (0.1 var)``, measured."""
        carried = [(1 - BN_MOMENTUM) * v0 for v0 in self.var0]
        return [(o - c) / (e - c) for o, e, c in zip(self.ours_var, self.eqx_var, carried)]


def running_stats_difference(params, state, images) -> RunningStatsDifference:
    """One training step of ``jaxside`` and of the Equinox model (configured as in ``em``, and with
    Equinox's fresh-state counter 0) on ``images``: the running statistics side by side.

    Expected (docs/equinox.md): ``eqx_mean == ours_mean`` (to rounding); ``var_ratio == B/(B-1)``;
    ``native_mean == 0.9/0.1 * mean0 + batch_mean`` and ``native_var == 9 * var0 + batch_var``.
    """
    images = np.asarray(images, params[0]["weight"].dtype)
    labels = np.zeros(images.shape[0], np.int32)  # the statistics do not depend on the labels
    _, _, ours_state = pmean_model.loss_and_grads(params, state, images, labels)
    _, _, eqx_state = em.loss_and_grads(params, state, images, labels)
    model, native = em.from_params(params, state, counter=0)
    native_state = em.to_params(model, em.batch_loss(model, native, jnp.asarray(images), jnp.asarray(labels))[1])[1]

    def stats(x):  # the batch statistics themselves, from jaxside's per-example layers under vmap
        out = []
        for layer in params[:-1]:
            x = jax_layers.linear(x, jnp.asarray(layer["weight"]))
            x, (mean, var) = batchnorm_train(x, jnp.asarray(layer["gamma"]), jnp.asarray(layer["beta"]))
            out.append((mean, var))
            x = jax_layers.sigmoid(x)
        return out

    batch_stats = jax.vmap(stats, axis_name="batch", out_axes=None)(jnp.asarray(images))
    return RunningStatsDifference(
        batch_size=images.shape[0],
        var0=[np.asarray(s["var"]) for s in state],
        batch_mean=[np.asarray(m) for m, _ in batch_stats],
        batch_var=[np.asarray(v) for _, v in batch_stats],
        ours_mean=[s["mean"] for s in ours_state],
        ours_var=[s["var"] for s in ours_state],
        eqx_mean=[s["mean"] for s in eqx_state],
        eqx_var=[s["var"] for s in eqx_state],
        native_mean=[s["mean"] for s in native_state],
        native_var=[s["var"] for s in native_state],
    )


def numpyside_model():
    from numpyside import model

    return model


# ----------------------------------------------------------------------------------------------
# 1. the Equinox model and the conversion of our layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_from_params_builds_the_equinox_model_and_round_trips_exactly(dtype, batch_norm):
    params = random_params(0, dtype, batch_norm)
    state = random_state(0, dtype) if batch_norm else []
    model, eqx_state = em.from_params(params, state)

    assert isinstance(model, em.MLP) and isinstance(eqx_state, eqx.nn.State)
    assert model.training == batch_norm  # training mode = batch statistics, which need the vmap axis
    assert [type(lin) for lin in model.linears] == [eqx.nn.Linear] * 4
    for i, (linear, layer) in enumerate(zip(model.linears, params)):
        assert linear.weight.shape == layer["weight"].shape[::-1]  # Equinox stores (out, in)
        np.testing.assert_array_equal(np.asarray(linear.weight), layer["weight"].T)
        assert linear.weight.dtype == np.dtype(dtype)
        assert (linear.bias is None) == (batch_norm and i < 3)  # no hidden bias with batch norm
    assert len(model.norms) == (3 if batch_norm else 0)
    for norm in model.norms:
        assert (norm.axis_name, norm.mode, norm.eps, norm.momentum) == ("batch", "batch", BN_EPS, 1 - BN_MOMENTUM)
        assert not norm.inference and norm.weight.dtype == np.dtype(dtype)
        assert int(eqx_state.get(norm.batch_counter)) == em.DEBIAS_OFF_COUNTER

    back_params, back_state = em.to_params(model, eqx_state)
    assert len(back_params) == 4 and len(back_state) == len(state)
    for got, want in zip(back_params + back_state, params + state):
        assert set(got) == set(want)
        for key in want:
            assert type(got[key]) is np.ndarray and got[key].dtype == want[key].dtype
            assert got[key].flags.c_contiguous
            np.testing.assert_array_equal(got[key], want[key])  # exact, bit for bit


def test_round_trip_after_training_steps_and_inference_mode(mnist):
    """``to_params`` of Equinox's state after a step, fed back through ``from_params``, is the same
    state; the inference flag is not part of our layout and does not change the conversion."""
    params, state = random_params(1, np.float64), random_state(1, np.float64)
    images, labels = mnist_batch(mnist)
    _, _, new_state = em.loss_and_grads(params, state, images, labels)
    model, eqx_state = em.from_params(params, new_state)
    again_params, again_state = em.to_params(eqx.nn.inference_mode(model), eqx_state)
    for got, want in zip(again_params + again_state, params + new_state):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_from_params_refuses_bad_input():
    params, state = random_params(0, np.float64), random_state(0, np.float64)
    with pytest.raises(InputError, match=r"params\[1\]\['weight'\] has shape \(100, 99\)"):
        em.from_params([params[0], {**params[1], "weight": params[1]["weight"][:, :99]}, *params[2:]], state)
    with pytest.raises(InputError, match="state must be a list of 3 dicts"):
        em.from_params(params, state[:2])
    with pytest.raises(InputError, match="counter must be >= 0"):
        em.from_params(params, state, counter=-1)


def test_public_functions_validate_like_jaxside():
    params, state = random_params(0, np.float32), random_state(0, np.float32)
    images, labels = random_batch(0, size=4)
    with pytest.raises(InputError, match="images must have shape"):
        em.predict_logits(params, state, images[:, :700])
    with pytest.raises(InputError, match=r"labels must lie in 0\.\.9"):
        em.loss_and_grads(params, state, images, labels + 10)
    with pytest.raises(InputError, match="at least 2 examples"):
        em.train_logits(params, state, images[:1])


# ----------------------------------------------------------------------------------------------
# 2. Equinox vs jaxside vs numpyside: logits, loss, gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", ["mnist", "random"])
def test_equinox_matches_jaxside_and_numpyside(mnist, dtype, source):
    tol = TOL[np.dtype(dtype)]
    numpyside = numpyside_model()
    params, state = random_params(2, dtype), random_state(2, dtype)
    images, labels = mnist_batch(mnist) if source == "mnist" else random_batch(2)
    images = np.asarray(images, dtype)

    eqx_loss, eqx_grads, eqx_state = em.loss_and_grads(params, state, images, labels)
    pm_loss, pm_grads, pm_state = pmean_model.loss_and_grads(params, state, images, labels)
    np_loss, np_grads, np_state = numpyside.loss_and_grads(params, state, images, labels, backend="numpy")

    assert isinstance(eqx_loss, np.floating) and eqx_loss.dtype == np.dtype(dtype)
    for ref_loss in (pm_loss, np_loss):
        assert max_rel_err(eqx_loss, ref_loss) <= tol
    for ref_grads in (pm_grads, np_grads):
        errs = rel_errs(eqx_grads, ref_grads)
        assert max(errs.values()) <= tol, errs
    for g in eqx_grads:
        assert all(type(v) is np.ndarray and v.dtype == np.dtype(dtype) for v in g.values())

    # logits in training mode (batch statistics) and eval mode (the running statistics in `state`)
    eqx_train = em.train_logits(params, state, images)
    assert eqx_train.dtype == np.dtype(dtype) and eqx_train.shape == (BATCH, 10)
    assert max_rel_err(eqx_train, np.asarray(_pmean_train_logits(params, state, images))) <= tol
    assert max_rel_err(eqx_train, numpyside.forward(params, state, images, train=True, backend="numpy")[0]) <= tol
    eqx_eval = em.predict_logits(params, state, images)
    assert eqx_eval.dtype == np.dtype(dtype)
    assert max_rel_err(eqx_eval, pmean_model.predict_logits(params, state, images)) <= tol
    assert max_rel_err(eqx_eval, numpyside.predict_logits(params, state, images, backend="numpy")) <= tol
    assert max_rel_err(eqx_eval, eqx_train) > 1e-2  # the two modes really differ here

    # the new running means agree; the variances only after Bessel's correction (section 3)
    corrected = em.with_bessel_correction(eqx_state, state, BATCH)
    for ref in (pm_state, np_state):
        assert max(max_rel_err(a["mean"], b["mean"]) for a, b in zip(eqx_state, ref)) <= tol
        assert max(max_rel_err(a["var"], b["var"]) for a, b in zip(eqx_state, ref)) > 1e-5
        assert max(rel_errs(corrected, ref).values()) <= tol
        assert all(v.dtype == np.dtype(dtype) for layer in corrected for v in layer.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_equinox_matches_with_batch_norm_off(mnist, dtype):
    tol = TOL[np.dtype(dtype)]
    params = random_params(3, dtype, batch_norm=False)
    images, labels = mnist_batch(mnist, 32)
    loss, grads, new_state = em.loss_and_grads(params, [], images, labels)
    ref_loss, ref_grads, _ = pmean_model.loss_and_grads(params, [], images, labels)
    assert new_state == [] and max_rel_err(loss, ref_loss) <= tol
    assert max(rel_errs(grads, ref_grads).values()) <= tol
    # without batch norm, training and eval mode coincide
    np.testing.assert_array_equal(em.train_logits(params, [], images), em.predict_logits(params, [], images))


def test_sides_module_exposes_the_equinox_model(mnist):
    from compare.sides import jax_side

    side = jax_side("equinox")
    params, state = random_params(4, np.float64), random_state(4, np.float64)
    images, labels = mnist_batch(mnist, 16)
    assert side.make_trainer is em.Trainer
    # The side's loss_and_grads is Equinox's, with the running variance Bessel-corrected for the
    # step-0 table: loss and gradients are Equinox's own, the state equals jaxside's.
    side_loss, side_grads, side_state = side.loss_and_grads(params, state, images, labels)
    eqx_loss, eqx_grads, eqx_state = em.loss_and_grads(params, state, images, labels)
    _pm_loss, _pm_grads, pm_state = jaxside.loss_and_grads(params, state, images, labels)
    assert side_loss == eqx_loss
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(side_grads, eqx_grads) for k in a)
    for ours, corrected, raw in zip(pm_state, side_state, eqx_state):
        assert max_rel_err(corrected["var"], ours["var"]) <= 1e-12
        assert max_rel_err(raw["var"], ours["var"]) > 1e-5  # uncorrected: Bessel's 128/127 shows
    assert (
        max_rel_err(
            side.train_logits(params, state, images),
            np.asarray(_pmean_train_logits(params, state, np.asarray(images, np.float64))),
        )
        <= 1e-10
    )


# ----------------------------------------------------------------------------------------------
# 3. where Equinox's batch norm differs: running statistics, eval mode, "ema" mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_variance_differs_by_bessels_correction(mnist, dtype):
    """Equinox feeds the biased batch variance into its running variance, we the unbiased one:
    ``(ours - 0.9 var0) / (eqx - 0.9 var0) == B / (B - 1)``, measured on a real batch."""
    tol = TOL[np.dtype(dtype)]
    params, state = random_params(5, dtype), random_state(5, dtype)
    images, _ = mnist_batch(mnist)
    diff = running_stats_difference(params, state, images)
    n = diff.batch_size
    assert n == BATCH
    for i in range(3):
        # the means agree (to rounding: Equinox's 1 - 0.9 is not exactly our 0.1)
        assert max_rel_err(diff.eqx_mean[i], diff.ours_mean[i]) <= tol
        # the variances do not: by a measurable amount, and exactly by Bessel's correction
        assert max_rel_err(diff.eqx_var[i], diff.ours_var[i]) > 1e-5
        # (the ratio divides two differences, 0.1 var and 0.1 var B/(B-1), each left after cancelling
        # 0.9 var0: float32 rounding of var0 is amplified by up to 0.9 var0 / (0.1 var), hence 10 tol)
        np.testing.assert_allclose(diff.var_ratio[i], n / (n - 1), rtol=10 * tol if dtype == np.float32 else tol)
        predicted_ours = (1 - BN_MOMENTUM) * state[i]["var"] + BN_MOMENTUM * diff.batch_var[i] * (n / (n - 1))
        assert max_rel_err(diff.ours_var[i], predicted_ours) <= tol
        predicted_eqx = (1 - BN_MOMENTUM) * state[i]["var"] + BN_MOMENTUM * diff.batch_var[i]
        assert max_rel_err(diff.eqx_var[i], predicted_eqx) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_equinox_fresh_state_debiasing(mnist, dtype):
    """With Equinox's own fresh-state counter (0), eval mode divides the EMA by ``1 - 0.9**c``: the
    mean comes out as the batch mean, but the variance, which Equinox starts at 1, as the batch
    variance + ``0.9 / (1 - 0.9) = 9`` after one step (``+ 9 var0`` for a non-fresh ``var0``)."""
    tol = TOL[np.dtype(dtype)]
    params, images = random_params(6, dtype), mnist_batch(mnist)[0]
    fresh = running_stats_difference(params, init_state(dtype), images)  # var0 = 1, mean0 = 0
    state = random_state(6, dtype)
    other = running_stats_difference(params, state, images)
    factor = 0.9 / (1 - 0.9)
    for i in range(3):
        assert max_rel_err(fresh.native_mean[i], fresh.batch_mean[i]) <= tol
        assert max_rel_err(fresh.native_var[i], fresh.batch_var[i] + factor) <= tol
        assert max_rel_err(other.native_mean[i], factor * state[i]["mean"] + other.batch_mean[i]) <= tol
        assert max_rel_err(other.native_var[i], factor * state[i]["var"] + other.batch_var[i]) <= tol
    # ... which eval mode then uses: the logits are far from ours after that step
    _, _, ours = pmean_model.loss_and_grads(params, init_state(dtype), images, np.zeros(BATCH, np.int32))
    native = [{"mean": m, "var": v} for m, v in zip(fresh.native_mean, fresh.native_var)]
    assert (
        max_rel_err(
            pmean_model.predict_logits(params, native, images), pmean_model.predict_logits(params, ours, images)
        )
        > 0.05
    )


def test_equinox_debiasing_over_several_steps():
    """A lone ``eqx.nn.BatchNorm(mode="batch")`` from its fresh state, ``k`` steps: its eval statistics
    are the zero-debiased EMA of the batch statistics, plus ``0.9**k / (1 - 0.9**k)`` on the variance."""
    m, k, n = 0.9, 4, 100
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(n, "batch", momentum=m, mode="batch", dtype=jnp.float64)
    train = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
    rng = np.random.default_rng(7)
    ema_mean, ema_var = np.zeros(n), np.zeros(n)
    for _ in range(k):
        x = rng.normal(1.0, 2.0, (32, n))
        _, state = train(jnp.asarray(x), state)
        ema_mean, ema_var = m * ema_mean + (1 - m) * x.mean(0), m * ema_var + (1 - m) * x.var(0)
    # eval mode on zeros returns -mean/sqrt(var + eps): solve for what eval mode used
    out_zero, _ = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
        jnp.zeros((1, n)), state
    )
    out_one, _ = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
        jnp.ones((1, n)), state
    )
    inv_std = np.asarray(out_one - out_zero)[0]
    used_var = 1 / inv_std**2 - 1e-5
    used_mean = -np.asarray(out_zero)[0] / inv_std
    debias = 1 - m**k
    np.testing.assert_allclose(used_mean, ema_mean / debias, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(used_var, ema_var / debias + m**k / debias, rtol=1e-9)
    assert m**k / debias > 1.8  # 0.6561 / 0.3439: still a large excess after 4 steps


def test_ema_mode_is_not_batch_norm_in_training():
    """Why ``mode="batch"``: ``mode="ema"`` normalises, from its second call on, with
    ``0.1 * batch_stat + 0.9 * running_stat`` instead of the batch statistics."""
    n = 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode="ema" is fine; only the unspecified default warns
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(n, "batch", momentum=0.9, mode="ema", dtype=jnp.float64)
    train = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
    ours = jax.vmap(lambda v: batchnorm_train(v, jnp.ones(n), jnp.zeros(n))[0], axis_name="batch")
    rng = np.random.default_rng(8)
    x1, x2 = rng.normal(0.0, 1.0, (32, n)), rng.normal(3.0, 2.0, (32, n))
    y1, state = train(jnp.asarray(x1), state)
    assert max_rel_err(y1, ours(jnp.asarray(x1))) <= 1e-12  # first call: the batch statistics
    y2, state = train(jnp.asarray(x2), state)
    assert max_rel_err(y2, ours(jnp.asarray(x2))) > 0.1  # second call: not batch norm's output
    mix_mean = 0.1 * x2.mean(0) + 0.9 * x1.mean(0)
    mix_var = 0.1 * x2.var(0) + 0.9 * x1.var(0)
    assert max_rel_err(y2, (x2 - mix_mean) / np.sqrt(mix_var + BN_EPS)) <= 1e-12


# ----------------------------------------------------------------------------------------------
# 4. refusals: unbound axis, a batch for one example, nested vmaps with the same axis name
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_state():
    return em.from_params(random_params(9, np.float64), random_state(9, np.float64))


def test_training_mode_outside_vmap_says_to_wrap_it(model_and_state):
    model, state = model_and_state
    x = jnp.asarray(random_batch(9, 8)[0])
    message = r"call it under jax\.vmap\(model, in_axes=\(0, None\), out_axes=\(0, None\), axis_name='batch'\)"
    with pytest.raises(UnboundBatchAxisError, match=message) as info:
        model(x[0], state)
    assert isinstance(info.value, NameError) and "\n" not in str(info.value)
    with pytest.raises(UnboundBatchAxisError, match=message):
        eqx.filter_jit(lambda m, v: m(v, state))(model, x[0])
    # Equinox's own layer raises a bare NameError (in 0.13.8 it suggests jax.shard_map): we wrap it
    with pytest.raises(NameError) as raw:
        model.norms[0](jnp.zeros(100), state)
    assert not isinstance(raw.value, UnboundBatchAxisError)
    # eval mode is per example and needs no batch; under vmap, training mode works
    logits, _ = eqx.nn.inference_mode(model)(x[0], state)
    assert logits.shape == (10,)
    logits, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)
    assert logits.shape == (8, 10)


def test_model_refuses_a_batch(model_and_state):
    model, state = model_and_state
    with pytest.raises(InputError, match=r"takes ONE image vector of shape \(784,\), got shape \(8, 784\)"):
        model(jnp.zeros((8, 784)), state)


def test_jax_silently_shadows_nested_vmaps_with_the_same_axis_name():
    """What JAX itself does (jax 0.10.2): no error; the inner ``vmap`` binds ``"batch"`` again and
    ``pmean`` averages over the inner axis only (its axis environment maps a name to ONE size)."""
    x = jnp.arange(12.0).reshape(3, 4)
    inner = jax.vmap(lambda v: jax.lax.pmean(v, "batch"), axis_name="batch")
    nested = jax.vmap(inner, axis_name="batch")(x)
    np.testing.assert_array_equal(nested, np.broadcast_to(x.mean(axis=1, keepdims=True), (3, 4)))
    assert not np.allclose(nested, x.mean())  # not the mean over all 12 values
    sizes = jax.vmap(jax.vmap(lambda v: jax.lax.psum(1, "batch"), axis_name="batch"), axis_name="batch")(x)
    np.testing.assert_array_equal(sizes, 4)  # "the batch" has the inner size


@pytest.mark.parametrize("model_kind", ["equinox", "jaxside"])
@pytest.mark.parametrize("under_jit_grad", [False, True])
def test_nested_vmaps_with_the_same_axis_name_are_refused(model_and_state, model_kind, under_jit_grad):
    """Our check catches it inside the per-example code, also under ``jax.jit(jax.grad(...))``."""
    eqx_model, eqx_state = model_and_state
    pm_params, pm_state = random_params(9, np.float64), random_state(9, np.float64)
    batches = jnp.asarray(random_batch(9, 32)[0]).reshape(4, 8, 784)
    if model_kind == "equinox":
        trainable, rest = eqx.partition(eqx_model, eqx.is_array)
        per_example = lambda p, v: eqx.combine(p, rest)(v, eqx_state)[0]  # noqa: E731
    else:
        trainable = pm_params
        per_example = lambda p, v: forward_pass(p, pm_state, v, train=True)[0]  # noqa: E731

    def nested(p):
        one_batch = jax.vmap(lambda v: per_example(p, v), axis_name="batch")
        return jax.vmap(one_batch, axis_name="batch")(batches)  # the user's mistake: "batch" twice

    message = r"two nested jax\.vmap calls both bind the axis name 'batch'.*give the outer vmap a different axis_name"
    with pytest.raises(NestedBatchAxisError, match=message) as info:
        if under_jit_grad:
            jax.jit(jax.grad(lambda p: nested(p).sum()))(trainable)
        else:
            nested(trainable)
    assert "\n" not in str(info.value)


def test_batched_forward_inside_a_same_name_vmap_is_refused(model_and_state):
    model, state = model_and_state
    batches = jnp.asarray(random_batch(9, 32)[0]).reshape(4, 8, 784)
    with pytest.raises(NestedBatchAxisError, match="give the outer vmap a different axis_name"):
        jax.vmap(lambda xs: em.batched_forward(model, state, xs)[0], axis_name="batch")(batches)


def test_what_to_do_instead_a_differently_named_outer_vmap(model_and_state):
    """The fix the messages suggest: name the outer axis differently; each inner batch then gets
    its own statistics, exactly as if the batches were run one by one."""
    model, state = model_and_state
    batches = jnp.asarray(random_batch(10, 32)[0]).reshape(4, 8, 784)
    one_batch = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
    logits, _ = jax.vmap(one_batch, in_axes=(0, None), out_axes=(0, 0), axis_name="batches")(batches, state)
    for b in range(4):
        separately, _ = one_batch(batches[b], state)
        assert max_rel_err(logits[b], separately) <= 1e-12


# ----------------------------------------------------------------------------------------------
# 5. the trainer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_trainer_follows_the_jaxside_trainer(mnist, dtype):
    """Same batches, same SGD: the parameter trajectories agree (running statistics do not enter
    training mode); the running variances differ only through Bessel's correction."""
    from jaxside.train import Trainer as PmeanTrainer

    train_x, train_y, test_x, test_y = mnist
    subset_x, subset_y = train_x[:2048], train_y[:2048]
    params, state = init_params(0, dtype), init_state(dtype)
    trainers = [cls(params, state, subset_x, subset_y, momentum=0.8) for cls in (em.Trainer, PmeanTrainer)]
    rng = training.batch_rng(0)
    schedule = training.LearningRateSchedule(0.3, 2 * (len(subset_x) // 64))
    history, compile_seconds = [], []
    for epoch in range(2):
        batches = training.epoch_batches(len(subset_x), 64, rng)
        compile_seconds.append(trainers[0].compile(*batches.shape))
        losses = [t.epoch(batches, schedule.for_epoch(epoch, len(batches))) for t in trainers]
        assert type(losses[0]) is np.ndarray and losses[0].shape == (len(batches),)
        assert losses[0].dtype == np.dtype(dtype)
        assert max_rel_err(losses[0], losses[1]) <= TOL[np.dtype(dtype)]
        history.extend(losses[0])
    assert np.mean(history[-8:]) < np.mean(history[:8]) / 2  # it learns
    # the first call compiles (XLA takes well over 10 ms for a scan); the second finds it compiled
    assert compile_seconds[0] > 0.01 and compile_seconds[1] < compile_seconds[0] / 10, compile_seconds

    eqx_params, pm_params = trainers[0].params_numpy(), trainers[1].params_numpy()
    # 64 SGD steps: measured 2e-15 (float64) and 7e-7 (float32) for params, running means alike
    errs = rel_errs(eqx_params, pm_params)
    assert max(errs.values()) <= TOL[np.dtype(dtype)], errs
    assert all(type(v) is np.ndarray and v.dtype == np.dtype(dtype) for layer in eqx_params for v in layer.values())

    eqx_state, pm_state = trainers[0].state_numpy(), trainers[1].state_numpy()
    for a, b in zip(eqx_state, pm_state):
        assert max_rel_err(a["mean"], b["mean"]) <= TOL[np.dtype(dtype)]
        # biased vs unbiased: Equinox's running variance is smaller, by about (B-1)/B of the batch part
        assert np.all(a["var"] < b["var"]) and max_rel_err(a["var"], b["var"]) < 2 / 64
    predictions = trainers[0].predict(test_x[:2000])
    assert predictions.dtype.kind == "i" and predictions.shape == (2000,)
    assert (predictions == trainers[1].predict(test_x[:2000])).mean() > 0.98
    assert (predictions == test_y[:2000]).mean() > 0.8
