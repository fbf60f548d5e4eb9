"""Tests of numpyside.layers and numpyside.kernels: handwritten gradients against finite
differences, the staged against the compact batch-norm backward, the NumPy against the numba
backend, numerical stability, dtype preservation, and the refusal of bad input.

Errors are the project's normwise ``max|a - b| / max|b|`` (``compare.metrics.max_rel_err``).
"""

from __future__ import annotations

import inspect
import sys
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compare.contract import BN_EPS, InputError
from compare.metrics import max_abs_err, max_rel_err
from compare.tolerances import NUMBA_VS_NUMPY as TOLERANCE
from numpyside import layers as L
from numpyside import model as N
from numpyside.backend import DEFAULT_BACKEND
from numpyside.fast import FastTrainer
from numpyside.train import Trainer as NumpyTrainer
from tests.helpers import random_params, random_state

BACKENDS = ("numpy", "numba")
DTYPES = (np.float32, np.float64)

# Central differences: the truncation error is O(h^2 f''') ~ 1e-12 and the rounding error is
# O(u |f| / h) ~ 1e-16 * 10 / 1e-6 = 1e-9 for the O(1..10) objectives below, both far under the
# 1e-7 bound for O(0.1..1) gradients (the optimal step, ~u^(1/3) ~ 5e-6, would balance the two;
# 1e-6 is the customary round value near it). A wrong gradient is off by O(1) (see
# test_fd_check_catches_a_gradient_without_the_batch_coupling).
H = 1e-6
FD_TOL = 1e-7


def numerical_grad(objective, array: np.ndarray, h: float = H) -> np.ndarray:
    """Central differences of the scalar ``objective()`` w.r.t. EVERY entry of ``array`` (perturbed in place)."""
    grad = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
        old = array[idx]
        array[idx] = old + h
        plus = float(objective())
        array[idx] = old - h
        minus = float(objective())
        array[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


def rng_for(*key) -> np.random.Generator:
    """A generator seeded by ``key`` (crc32 of its repr: stable across runs, unlike ``hash``)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def bn_inputs(rng, batch, n, dtype=np.float64, scale=2.0, offset=3.0):
    """x with per-feature spread ``scale`` around offsets in [-offset, offset]; gamma, beta."""
    x = (rng.standard_normal((batch, n)) * scale + rng.uniform(-offset, offset, n)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, n).astype(dtype) * rng.choice([-1, 1], n).astype(dtype)
    beta = rng.standard_normal(n).astype(dtype)
    return x, gamma, beta


# --------------------------------------------------------------------------------------------
# finite differences (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gradients_match_finite_differences(with_bias):
    rng = np.random.default_rng(1)
    x, weight = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
    bias = rng.standard_normal(4) if with_bias else None
    r = rng.standard_normal((6, 4))

    def objective():
        return np.sum(L.linear_forward(x, weight, bias)[0] * r)

    _, cache = L.linear_forward(x, weight, bias)
    dx, dweight, dbias = L.linear_backward(r, cache)
    assert max_rel_err(dx, numerical_grad(objective, x)) <= FD_TOL
    assert max_rel_err(dweight, numerical_grad(objective, weight)) <= FD_TOL
    if with_bias:
        assert max_rel_err(dbias, numerical_grad(objective, bias)) <= FD_TOL
    else:
        assert dbias is None
    no_dx, same_dweight, same_dbias = L.linear_backward(r, cache, need_dx=False)  # first layer: skip dx
    assert no_dx is None and np.array_equal(same_dweight, dweight)
    assert (same_dbias is None) if not with_bias else np.array_equal(same_dbias, dbias)


BN_BACKWARDS = {
    "compact-numpy": lambda d, c: L.batchnorm_backward(d, c, backend="numpy"),
    "compact-numba": lambda d, c: L.batchnorm_backward(d, c, backend="numba"),
    "staged": L.batchnorm_backward_staged,
}


@pytest.mark.parametrize("forward_backend", BACKENDS)
@pytest.mark.parametrize("backward", list(BN_BACKWARDS))
@pytest.mark.parametrize("shape", [(6, 4), (3, 5)])
def test_batchnorm_gradients_match_finite_differences(shape, backward, forward_backend):
    rng = rng_for("bn-fd", shape)
    x, gamma, beta = bn_inputs(rng, *shape)
    r = rng.standard_normal(shape)

    def objective():
        return np.sum(L.batchnorm_forward(x, gamma, beta, backend=forward_backend)[0] * r)

    _, cache = L.batchnorm_forward(x, gamma, beta, backend=forward_backend)
    dx, dgamma, dbeta = BN_BACKWARDS[backward](r, cache)
    assert max_rel_err(dx, numerical_grad(objective, x)) <= FD_TOL
    assert max_rel_err(dgamma, numerical_grad(objective, gamma)) <= FD_TOL
    assert max_rel_err(dbeta, numerical_grad(objective, beta)) <= FD_TOL


def test_fd_check_catches_a_gradient_without_the_batch_coupling():
    """The check is sharp: treating mean and var as constants (dx = gamma * inv_std * dout) fails it."""
    rng = np.random.default_rng(3)
    x, gamma, beta = bn_inputs(rng, 6, 4)
    r = rng.standard_normal((6, 4))
    _, cache = L.batchnorm_forward(x, gamma, beta)
    numeric = numerical_grad(lambda: np.sum(L.batchnorm_forward(x, gamma, beta)[0] * r), x)
    uncoupled = gamma * cache.inv_std * r
    assert max_rel_err(uncoupled, numeric) > 1e-2
    assert max_rel_err(L.batchnorm_backward(r, cache)[0], numeric) <= FD_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_gradient_matches_finite_differences(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 5)) * 3
    r = rng.standard_normal((6, 5))

    def objective():
        return np.sum(L.sigmoid_forward(x, backend=backend)[0] * r)

    _, cache = L.sigmoid_forward(x, backend=backend)
    assert max_rel_err(L.sigmoid_backward(r, cache, backend=backend), numerical_grad(objective, x)) <= FD_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_cross_entropy_gradient_matches_finite_differences(backend):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((7, 10)) * 3
    labels = rng.integers(0, 10, 7)
    _, dlogits = L.softmax_cross_entropy(logits, labels, backend=backend)
    numeric = numerical_grad(lambda: L.softmax_cross_entropy(logits, labels, backend=backend)[0], logits)
    assert max_rel_err(dlogits, numeric) <= FD_TOL


# --------------------------------------------------------------------------------------------
# forward values against independent formulas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_forward_statistics_and_output(backend):
    rng = np.random.default_rng(6)
    x, gamma, beta = bn_inputs(rng, 9, 6)
    out, cache = L.batchnorm_forward(x, gamma, beta, backend=backend)
    assert isinstance(cache, L.BatchNormCache)
    assert max_rel_err(cache.mean, np.mean(x, axis=0)) <= 1e-15
    assert max_rel_err(cache.var, np.var(x, axis=0, ddof=0)) <= 1e-14  # biased
    expected = gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + BN_EPS) + beta
    assert max_rel_err(out, expected) <= 1e-14
    assert max_rel_err(cache.x_hat, (x - x.mean(0)) / np.sqrt(x.var(0) + BN_EPS)) <= 1e-14
    assert max_rel_err(cache.centered, x - x.mean(0)) <= 1e-15
    assert max_rel_err(cache.inv_std, 1 / np.sqrt(x.var(0) + BN_EPS)) <= 1e-14
    assert cache.gamma is gamma and cache.x is x and cache.eps == BN_EPS


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_eval_uses_running_statistics(backend):
    rng = np.random.default_rng(7)
    x, gamma, beta = bn_inputs(rng, 1, 6)  # eval mode takes any batch, also 1
    mean, var = rng.standard_normal(6), rng.uniform(0.1, 3, 6)
    out = L.batchnorm_eval(x, gamma, beta, mean, var, backend=backend)
    assert max_rel_err(out, gamma * (x - mean) / np.sqrt(var + BN_EPS) + beta) <= 1e-14


def test_numpyside_matches_the_per_example_jax_layers():
    """The batched forwards give the per-example jaxside forwards' numbers (float64)."""
    jax = pytest.importorskip("jax")
    from jaxside import layers as J  # switches on JAX's float64

    rng = np.random.default_rng(8)
    x, gamma, beta = bn_inputs(rng, 16, 7)
    mean, var = rng.standard_normal(7), rng.uniform(0.1, 3, 7)
    jax_out, (jax_mean, jax_var) = jax.vmap(
        lambda row: J.batchnorm_train(row, gamma, beta), axis_name=J.BATCH_AXIS, out_axes=(0, None)
    )(x)
    out, cache = L.batchnorm_forward(x, gamma, beta)
    assert max_rel_err(out, np.asarray(jax_out)) <= 1e-13
    assert max_rel_err(cache.mean, np.asarray(jax_mean)) <= 1e-13
    assert max_rel_err(cache.var, np.asarray(jax_var)) <= 1e-13
    jax_eval = jax.vmap(lambda row: J.batchnorm_eval(row, gamma, beta, mean, var))(x)
    assert max_rel_err(L.batchnorm_eval(x, gamma, beta, mean, var), np.asarray(jax_eval)) <= 1e-14
    z = rng.standard_normal((16, 7)) * 5
    assert max_rel_err(L.sigmoid_forward(z)[0], np.asarray(jax.vmap(J.sigmoid)(z))) <= 1e-14


# --------------------------------------------------------------------------------------------
# staged == compact
# --------------------------------------------------------------------------------------------


def staged_vs_compact_bound(cache: L.BatchNormCache) -> float:
    """``1e-12`` times the conditioning of the comparison, which is 1..3 for the well-scaled inputs
    of the fixed tests below:

    * the compact form assumes ``sum_b centered_b = 0``; in floating point the sum is of the order
      of ``u |mean|`` and it enters relative to ``std``, hence the centering condition
      ``1 + |mean| / std``;
    * at B = 2, ``dx`` itself is an O(eps / var) remainder of cancelling O(1) terms (see
      ``batchnorm_backward``'s docstring), hence ``max(1, var / eps)``.

    Measured over 20000 random cases (B in {2, 3, 4, 8, 16, 64}, n in 1..5, spread 1e-3..1e2,
    offset up to 3): ``max|staged - compact| / max|compact| <= 197 u * condition`` (worst at B = 3,
    where near-coincident points make dx partly cancel; <= 2 u * condition from B = 8 on): the bound
    below, ``1e-12 * condition`` (4500 u), leaves a margin of more than 20x.
    """
    per_feature = 1 + np.abs(cache.mean) / np.sqrt(cache.var)
    if cache.x.shape[0] == 2:
        per_feature = per_feature * np.maximum(1.0, cache.var / BN_EPS)
    return 1e-12 * float(np.max(per_feature))


@pytest.mark.parametrize("batch", [2, 3, 8, 64])
def test_staged_equals_compact(batch):
    rng = rng_for("staged", batch)
    # at B = 2 a spread of ~sqrt(eps), where dx is O(1) (see staged_vs_compact_bound)
    x, gamma, beta = bn_inputs(rng, batch, 5, scale=3e-3, offset=3e-3) if batch == 2 else bn_inputs(rng, batch, 5)
    dout = rng.standard_normal((batch, 5))
    _, cache = L.batchnorm_forward(x, gamma, beta)
    staged = L.batchnorm_backward_staged(dout, cache)
    compact = L.batchnorm_backward(dout, cache)
    assert staged_vs_compact_bound(cache) <= 1e-11  # well conditioned: the fixed 1e-12 applies
    for a, b in zip(staged, compact):
        assert max_rel_err(a, b) <= 1e-12
    assert np.max(np.abs(compact[0])) > 1e-2 * np.max(np.abs(dout))  # dx is O(1), not a cancelled remainder


def test_batch_of_two_unit_scale_is_conditioned_by_var_over_eps():
    """At B = 2, x_hat = +-sqrt(var / (var + eps)) and dx_1 = -dx_2 = gamma r (d_1 - d_2) eps / (var + eps) / 2
    in closed form (r = 1 / sqrt(var + eps)): with var >> eps an O(eps / var) remainder of
    cancelling O(1) terms. Both forms reach it to ~u * var / eps (the B = 2 bound), not to 1e-12."""
    rng = np.random.default_rng(9)
    x, gamma, beta = bn_inputs(rng, 2, 5, scale=1.0)
    dout = rng.standard_normal((2, 5))
    _, cache = L.batchnorm_forward(x, gamma, beta)
    half_gap = (x[0] - x[1]) / 2
    var = half_gap**2
    dx_1 = gamma / np.sqrt(var + BN_EPS) * (dout[0] - dout[1]) * (BN_EPS / (var + BN_EPS)) / 2
    exact = np.stack([dx_1, -dx_1])
    assert np.max(np.abs(exact)) < 1e-2 * np.max(np.abs(dout))  # a small remainder indeed
    bound = staged_vs_compact_bound(cache)
    assert bound > 1e-10  # var >> eps: far looser than the 1e-12 of well-conditioned batches
    dx_staged, dx_compact = L.batchnorm_backward_staged(dout, cache)[0], L.batchnorm_backward(dout, cache)[0]
    assert max_rel_err(dx_compact, exact) <= bound
    assert max_rel_err(dx_staged, exact) <= bound
    assert max_rel_err(dx_staged, dx_compact) <= bound


# --------------------------------------------------------------------------------------------
# numpy == numba
# --------------------------------------------------------------------------------------------


def sum_scales(fn, *args) -> dict[int, np.ndarray]:
    """For the batch sums that may cancel (``mean``, ``dgamma``, ``dbeta``), the scale that their
    rounding error is bounded by: ``sum_b |term_b|`` (see numpyside.kernels' docstring); keyed by
    the position of the output in ``flatten(fn(...))``."""
    if fn is L.batchnorm_forward:  # flatten((out, cache)) = [out, x, mean, ...]
        x = args[0]
        return {2: np.abs(x).sum(axis=0) / x.shape[0]}
    if fn is L.batchnorm_backward:  # [dx, dgamma, dbeta]
        dout, cache = args
        return {1: np.abs(dout * cache.x_hat).sum(axis=0), 2: np.abs(dout).sum(axis=0)}
    return {}


def centering_condition(cache: L.BatchNormCache) -> float:
    """``max_j (1 + |mean_j| / std_j)``: how much a rounding-level change of the batch mean moves
    ``centered = x - mean`` relative to its own size."""
    mean, var = np.asarray(cache.mean, np.float64), np.asarray(cache.var, np.float64)
    return float(np.max(1 + np.abs(mean) / np.sqrt(var + 1e-300)))


def backend_errors(fn, *args) -> tuple[list[float], list[float], tuple]:
    """Errors numba vs numpy of every output of ``fn`` and the factor each one's tolerance is
    scaled by (1 except in the single-feature case, see numpyside.kernels' docstring)."""
    ref, got = fn(*args, backend="numpy"), fn(*args, backend="numba")
    ref_leaves, got_leaves = flatten(ref), flatten(got)
    assert len(ref_leaves) == len(got_leaves)
    scales = sum_scales(fn, *args)
    single_feature_forward = fn is L.batchnorm_forward and np.shape(args[0])[1] == 1
    factor = centering_condition(ref[1]) if single_feature_forward else 1.0
    errors, factors = [], []
    for k, (a, b) in enumerate(zip(got_leaves, ref_leaves)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        errors.append(max_abs_err(a, b) / float(np.max(scales[k])) if k in scales else max_rel_err(a, b))
        factors.append(1.0 if k in scales else factor)
    return errors, factors, (ref, got)


def assert_backends_agree(fn, *args, dtype):
    """Run ``fn`` on both backends and compare every array output with the stated tolerance."""
    tol = TOLERANCE[np.dtype(dtype)]
    errors, factors, (ref, got) = backend_errors(fn, *args)
    for k, leaf in enumerate(flatten(got)):
        assert np.asarray(leaf).dtype == np.dtype(dtype)
        assert errors[k] <= tol * factors[k], (k, errors[k], tol * factors[k])
    return ref, got


def flatten(value):
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in flatten(item)]
    if isinstance(value, (np.ndarray, np.floating)):
        return [value]
    return []  # None (no bias), LinearCache.has_bias


def kernel_cases(rng, batch, n, dtype):
    x, gamma, beta = bn_inputs(rng, batch, n, dtype)
    dout = rng.standard_normal((batch, n)).astype(dtype)
    mean, var = rng.standard_normal(n).astype(dtype), rng.uniform(0.1, 3, n).astype(dtype)
    labels = rng.integers(0, n, batch)
    _, cache = L.batchnorm_forward(x, gamma, beta)
    s, _ = L.sigmoid_forward(x)
    return {
        "batchnorm_forward": (L.batchnorm_forward, x, gamma, beta),
        "batchnorm_backward": (L.batchnorm_backward, dout, cache),
        "batchnorm_eval": (L.batchnorm_eval, x, gamma, beta, mean, var),
        "sigmoid_forward": (L.sigmoid_forward, x * 4),
        "sigmoid_backward": (L.sigmoid_backward, dout, s),
        "softmax_cross_entropy": (L.softmax_cross_entropy, x * 3, labels),
    }


KERNELS = [
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_eval",
    "sigmoid_forward",
    "sigmoid_backward",
    "softmax_cross_entropy",
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 100), (128, 10), (2, 3), (33, 1)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_numpy_and_numba_backends_agree(kernel, shape, dtype):
    fn, *args = kernel_cases(rng_for("backends", shape), *shape, dtype)[kernel]
    assert_backends_agree(fn, *args, dtype=dtype)


def test_backends_agree_on_non_contiguous_input():
    rng = np.random.default_rng(10)
    x, gamma, beta = bn_inputs(rng, 12, 8)
    view = x[::2, ::2]  # strided: the numba path copies it to C order
    g, b = gamma[::2], beta[::2]
    assert_backends_agree(L.batchnorm_forward, view, g, b, dtype=np.float64)
    assert_backends_agree(L.sigmoid_forward, view.T, dtype=np.float64)
    assert_backends_agree(L.softmax_cross_entropy, view, np.arange(6) % 4, dtype=np.float64)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(2, 64),
    n=st.integers(1, 12),
    log_scale=st.floats(-3, 2),
    use_float32=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_staged_compact_and_backends_agree(batch, n, log_scale, use_float32, seed):
    """Over random batch sizes, widths and scales: staged == compact (float64, to the conditioned
    bound) and numpy == numba (float32 or float64, to the stated tolerance)."""
    rng = np.random.default_rng(seed)
    x, gamma, beta = bn_inputs(rng, batch, n, scale=10.0**log_scale)
    dout = rng.standard_normal((batch, n))
    _, cache = L.batchnorm_forward(x, gamma, beta)
    for a, b in zip(L.batchnorm_backward_staged(dout, cache), L.batchnorm_backward(dout, cache)):
        assert max_rel_err(a, b) <= staged_vs_compact_bound(cache)
    dtype = np.float32 if use_float32 else np.float64
    x, gamma, beta, dout = (a.astype(dtype) for a in (x, gamma, beta, dout))
    (_, cache), _ = assert_backends_agree(L.batchnorm_forward, x, gamma, beta, dtype=dtype)
    assert_backends_agree(L.batchnorm_backward, dout, cache, dtype=dtype)
    labels = rng.integers(0, n, batch)
    assert_backends_agree(L.softmax_cross_entropy, x, labels, dtype=dtype)


# --------------------------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_is_stable_for_large_inputs(backend, dtype):
    x = np.array([[-1000.0, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1000.0]], dtype)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        s, cache = L.sigmoid_forward(x, backend=backend)
        dx = L.sigmoid_backward(np.ones_like(x), cache, backend=backend)
    assert s[0, 0] == 0.0 and s[0, -1] == 1.0 and s[0, 4] == 0.5
    assert dx[0, 0] == 0.0 and dx[0, -1] == 0.0 and dx[0, 4] == 0.25
    middle = x[0, 1:-1].astype(np.float64)
    assert max_rel_err(s[0, 1:-1], 1 / (1 + np.exp(-middle))) <= 4 * np.finfo(dtype).eps
    assert np.all(np.diff(s[0]) >= 0)  # monotone


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_is_stable_for_huge_logits(backend, dtype):
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((16, 10)) * 1e4).astype(dtype)
    labels = rng.integers(0, 10, 16)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        loss, dlogits = L.softmax_cross_entropy(logits, labels, backend=backend)
    z = logits.astype(np.float64)
    expected = np.mean(np.logaddexp.reduce(z, axis=1) - z[np.arange(16), labels])  # independent LSE
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    assert abs(float(loss) - expected) <= 8 * np.finfo(dtype).eps * abs(expected)
    assert expected > 1e3  # the test is not vacuous: the logits are far apart
    assert np.all(np.abs(dlogits.sum(axis=1)) <= 4 * np.finfo(dtype).eps)
    assert np.all(dlogits >= -1 / 16) and np.all(dlogits <= 1 / 16)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_keeps_the_input_dtype(backend, dtype):
    rng = np.random.default_rng(12)
    x, gamma, beta = bn_inputs(rng, 5, 4, dtype)
    dout = rng.standard_normal((5, 4)).astype(dtype)
    weight, bias = rng.standard_normal((4, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    outputs = {}
    outputs["linear_forward"], cache = L.linear_forward(x, weight, bias)
    outputs["linear_backward"] = L.linear_backward(rng.standard_normal((5, 3)).astype(dtype), cache)
    outputs["batchnorm_forward"], cache = L.batchnorm_forward(x, gamma, beta, backend=backend)
    outputs["batchnorm_cache"] = [getattr(cache, f) for f in ("mean", "centered", "var", "inv_std", "x_hat", "eps")]
    outputs["batchnorm_backward"] = L.batchnorm_backward(dout, cache, backend=backend)
    outputs["batchnorm_backward_staged"] = L.batchnorm_backward_staged(dout, cache)
    outputs["batchnorm_eval"] = L.batchnorm_eval(x, gamma, beta, gamma, np.abs(beta), backend=backend)
    outputs["sigmoid_forward"], cache = L.sigmoid_forward(x, backend=backend)
    outputs["sigmoid_backward"] = L.sigmoid_backward(dout, cache, backend=backend)
    loss, dlogits = L.softmax_cross_entropy(x, np.arange(5) % 4, backend=backend)
    assert type(loss) is dtype and loss.shape == ()  # a NumPy scalar of the logits' dtype
    outputs["softmax_cross_entropy"] = dlogits
    for name, value in outputs.items():
        for leaf in flatten(value):
            assert leaf.dtype == np.dtype(dtype), (name, leaf.dtype)


# --------------------------------------------------------------------------------------------
# called by hand: bad calls refused, the NumPy lines by default, no checks in the training loop
# --------------------------------------------------------------------------------------------


def bad_calls():
    """``name -> (call(backend), words the error must contain)``: the calls a learner makes by mistake
    (issue 21's list first), each on a (4, 3) batch."""
    rng = np.random.default_rng(20)
    x, gamma, beta = bn_inputs(rng, 4, 3)
    _, cache = L.batchnorm_forward(x, gamma, beta)
    s, _ = L.sigmoid_forward(x)
    _, linear_cache = L.linear_forward(x, rng.standard_normal((3, 2)))
    _, ce_cache = L.softmax_cross_entropy_forward(x, np.array([0, 1, 2, 0]))
    return {
        "gamma of 2 for 3 features": (
            lambda b: L.batchnorm_forward(x, gamma[:2], beta, backend=b),
            ["gamma has shape (2,)", "3 features", "shape (3,)"],
        ),
        "dout (2, 3) against a cache of (4, 3)": (
            lambda b: L.batchnorm_backward(np.ones((2, 3)), cache, backend=b),
            ["dout has shape (2, 3)", "(4, 3)", "pass the gradient of that output"],
        ),
        "integer x": (
            lambda b: L.batchnorm_forward(np.arange(12).reshape(4, 3), gamma, beta, backend=b),
            ["int64", "x.astype(np.float64)"],
        ),
        "a batch of one in training mode": (
            lambda b: L.batchnorm_forward(x[:1], gamma, beta, backend=b),
            ["at least 2 examples, got 1", "batchnorm_eval"],
        ),
        "unknown backend": (lambda b: L.batchnorm_forward(x, gamma, beta, backend="numpi"), ["'numpi'", "'numba'"]),
        "float32 gamma with float64 x": (
            lambda b: L.batchnorm_forward(x, gamma.astype(np.float32), beta, backend=b),
            ["gamma has dtype float32", "gamma.astype(x.dtype)"],
        ),
        "a list for x": (lambda b: L.sigmoid_forward([[1.0, 2.0]], backend=b), ["NumPy array, got list", "np.asarray"]),
        "integer x to the sigmoid": (lambda b: L.sigmoid_forward(np.arange(3), backend=b), ["int64", "astype"]),
        "sigmoid dout of another shape": (
            lambda b: L.sigmoid_backward(np.ones((4, 2)), s, backend=b),
            ["dout has shape (4, 2)", "(4, 3)"],
        ),
        "a transposed weight": (
            lambda b: L.linear_forward(x, np.ones((2, 3))),
            ["weight has shape (2, 3)", "(3, ...)"],
        ),
        "linear dout of another shape": (lambda b: L.linear_backward(np.ones((4, 3)), linear_cache), ["(4, 2)"]),
        "a label past the classes": (
            lambda b: L.softmax_cross_entropy(x, np.array([0, 1, 3, 0]), backend=b),
            ["labels must lie in 0..2", "labels[2] = 3"],
        ),
        "float labels": (lambda b: L.softmax_cross_entropy(x, np.zeros(4), backend=b), ["integer class indices"]),
        "a negative running variance": (
            lambda b: L.batchnorm_eval(x, gamma, beta, beta, -np.abs(gamma), backend=b),
            ["var must hold variances", "var[0]"],
        ),
        "a negative eps": (lambda b: L.batchnorm_forward(x, gamma, beta, -1e-5, backend=b), ["eps must be", ">= 0"]),
        "a cache that is not one": (
            lambda b: L.batchnorm_backward(np.ones((4, 3)), tuple(cache), backend=b),
            ["BatchNormCache that batchnorm_forward returned", "got tuple"],
        ),
        "a vector dloss": (lambda b: L.softmax_cross_entropy_backward(np.ones(4), ce_cache), ["dloss must be"]),
        "running statistics of another width": (
            lambda b: L.update_running_stats({"mean": beta[:2], "var": gamma[:2]}, beta, gamma, 4),
            ["running['mean'] has shape (2,)", "shape (3,)"],
        ),
        "a batch size of one for the unbiased variance": (
            lambda b: L.update_running_stats({"mean": beta, "var": gamma}, beta, gamma, 1),
            ["n must be the batch size", "n - 1"],
        ),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(bad_calls()))
def test_a_bad_call_by_hand_is_refused_with_its_fix(case, backend):
    call, words = bad_calls()[case]
    with pytest.raises(InputError) as error:
        call(backend)
    assert all(word in str(error.value) for word in words), (str(error.value), words)


def test_every_public_layer_is_checked_and_the_model_calls_the_unchecked_forms():
    public = [
        name for name, value in vars(L).items() if callable(value) and getattr(value, "__module__", "") == L.__name__
    ]
    functions = [name for name in public if not isinstance(getattr(L, name), type) and not name.startswith("_")]
    assert len(functions) == 12, functions  # the 11 layer functions and update_running_stats
    assert all(hasattr(getattr(L, name), "unchecked") for name in functions)
    for name in ("linear_forward", "batchnorm_forward", "batchnorm_backward", "sigmoid_backward"):
        assert getattr(N, name) is getattr(L, name).unchecked  # past numpyside.model's own check


def test_layers_and_model_default_to_numpy_and_the_trainers_to_numba():
    def default(fn):
        return inspect.signature(fn).parameters["backend"].default

    assert default(L.batchnorm_backward) == default(N.loss_and_grads) == default(N.backward) == "numpy"
    assert default(NumpyTrainer) == default(FastTrainer) == DEFAULT_BACKEND == "numba"


def test_a_debugger_stepping_in_from_the_model_walks_the_numpy_lines():
    """Every statement that ``numpyside.model.loss_and_grads`` runs in numpyside/layers.py's batch-norm
    backward, traced line by line: the compact NumPy lines the derivation describes, no kernel."""
    params, state = random_params(4), random_state(4)
    rng = np.random.default_rng(4)
    images, labels = rng.random((8, 784)), rng.integers(0, 10, 8)
    code = L.batchnorm_backward.unchecked.__code__
    lines = set()

    def tracer(frame, event, arg):
        if frame.f_code is code and event == "line":
            lines.add(inspect.getsourcelines(code)[0][frame.f_lineno - code.co_firstlineno].strip())
        return tracer

    sys.settrace(tracer)
    try:
        N.loss_and_grads(params, state, images, labels)
    finally:
        sys.settrace(None)
    assert "dbeta = dout.sum(axis=0)" in lines
    assert "dx = (cache.gamma * cache.inv_std / n_rows) * (n_rows * dout - dbeta - x_hat * dgamma)" in lines
    assert not any("kernels." in line for line in lines)
