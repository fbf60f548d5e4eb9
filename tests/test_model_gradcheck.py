"""Finite-difference check of the WHOLE handwritten model: ``numpyside.model.loss_and_grads``.

The layers are checked one by one in ``tests/test_layers.py``; here the complete network (three
hidden layers with or without batch norm, the output layer and the softmax cross-entropy, chained
by ``numpyside.model.backward``) is differentiated numerically and compared with the handwritten
gradients, in float64, on a real MNIST batch, for both kernel backends.
Tolerance and step: the comment at ``TOL``.
"""

from __future__ import annotations

import numpy as np
import pytest

from compare import contract
from compare.metrics import max_rel_err
from numpyside import layers as L
from numpyside import model as M
from tests.helpers import random_params, random_state

BACKENDS = ("numpy", "numba")
BATCH = 32
# Error measure (the project's, ``compare.metrics.max_rel_err``), per parameter tensor::
#
#     rel = max_k |analytic_k - numeric_k| / max_k |numeric_k|
#
# over the checked entries ``k`` of that tensor: ALL entries of the small tensors (gamma, beta and
# biases, <= 100 entries), and for the weight matrices the entry of largest |gradient| plus a random
# sample from the top decile by |gradient| (so that the normwise denominator is the tensor's largest
# gradient and no near-zero entry decides the figure).
#
# Required: ``rel <= 1e-7`` for every tensor.
#
# Why the step and the stencil. The rounding error of a difference quotient is about
# ``k u |L| / h`` (u = 1.1e-16, |L| ~ ln 10 ~ 2.3, k a few ulps) and the smallest gradients here
# are ~1e-3 (layer 0 without batch norm sits behind three sigmoids; ``dbeta`` of the two lower
# batch-norm layers is a sum that nearly cancels, because the batch-norm backward above them makes
# the incoming gradient sum to zero over the batch). With the classic two-point central difference
# and h = 1e-6 that floor is ~2.5e-10 / 1e-3 ~ 3e-7 relative, ABOVE the required 1e-7 (measured on
# this batch: up to 1.0e-6). The step cannot simply grow, because the two-point stencil's truncation
# error ``h^2 |L'''| / 6`` takes over (best two-point step ~3e-5, worst measured 2.2e-8: a margin of
# only 4.5). So the check uses the fourth-order central difference
#
#     L'(p) ~ [-L(p + 2h) + 8 L(p + h) - 8 L(p - h) + L(p - 2h)] / (12 h),     h = 1e-3,
#
# whose truncation error ``h^4 |L^(5)| / 30`` is ~1e-12 x |L^(5)| and whose rounding error is
# ~1.5 k u |L| / h ~ 1e-12 absolute, ~1e-9 relative to the smallest gradients. Measured worst over
# all tensors, both backends, with and without batch norm: 9e-10, two orders of magnitude below the
# 1e-7 bound, while a wrong gradient is off by O(1) (dropped batch-norm coupling, see
# ``test_gradcheck_catches_*``) and even a 1e-6 relative slip of one entry is caught.
H = 1e-3  # the fourth-order central difference's step (above)
TOL = 1e-7
SMALL_TENSOR = 100  # tensors with at most this many entries are checked entry by entry
N_SAMPLED = 15  # plus the argmax, for the weight matrices


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def entries_to_check(grad: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat indices: all of a small tensor; else the argmax of |grad| plus a sample of the top decile."""
    magnitude = np.abs(grad).ravel()
    if magnitude.size <= SMALL_TENSOR:
        return np.arange(magnitude.size)
    order = np.argsort(-magnitude, kind="stable")
    top = order[1 : magnitude.size // 10]
    top = top[magnitude[top] > 0]
    return np.concatenate([order[:1], rng.choice(top, size=min(N_SAMPLED, top.size), replace=False)])


def numeric_grad(loss_of, array: np.ndarray, flat_indices: np.ndarray, h: float = H) -> np.ndarray:
    """Fourth-order central differences of ``loss_of()`` w.r.t. ``array.flat[flat_indices]``
    (``array`` is perturbed in place and restored)."""
    out = np.empty(len(flat_indices))
    for j, flat in enumerate(flat_indices):
        idx = np.unravel_index(flat, array.shape)
        old = array[idx]
        values = []
        for step in (2 * h, h, -h, -2 * h):
            array[idx] = old + step
            values.append(float(loss_of()))
        array[idx] = old
        out[j] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * h)
    return out


def gradcheck_errors(params, state, images, labels, backend, grads=None, seed=0) -> dict[str, float]:
    """``max_rel_err(analytic, numeric)`` for every parameter tensor, keyed ``"<layer>.<name>"``.

    ``grads`` defaults to the handwritten gradients of ``numpyside.model.loss_and_grads``; the loss
    that is differenced is that function's loss too.
    """
    if grads is None:
        _, grads, _ = M.loss_and_grads(params, state, images, labels, backend=backend)
    rng = np.random.default_rng(seed)

    def loss_of():
        return M.loss_and_grads(params, state, images, labels, backend=backend)[0]

    errors = {}
    for i, layer in enumerate(params):
        for key, value in layer.items():
            flat = entries_to_check(grads[i][key], rng)
            numeric = numeric_grad(loss_of, value, flat)
            errors[f"{i}.{key}"] = max_rel_err(grads[i][key].ravel()[flat], numeric)
    return errors


@pytest.fixture(scope="module")
def batch(mnist):
    train_x, train_y, _, _ = mnist
    return train_x[:BATCH].astype(np.float64), train_y[:BATCH]


def setup(batch_norm, seed=0):
    params = random_params(seed, np.float64, batch_norm=batch_norm)
    state = random_state(seed) if batch_norm else []
    return params, state


# ----------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
def test_whole_model_gradients_match_finite_differences(batch, batch_norm, backend):
    images, labels = batch
    params, state = setup(batch_norm)
    before = [{k: v.copy() for k, v in layer.items()} for layer in params]

    errors = gradcheck_errors(params, state, images, labels, backend)

    expected_keys = {f"{i}.{k}" for i, shapes in enumerate(contract.param_shapes(batch_norm)) for k in shapes}
    assert set(errors) == expected_keys  # every tensor was checked
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"worst {worst}: {errors[worst]:.2e}; all: " + ", ".join(
        f"{k} {v:.1e}" for k, v in errors.items()
    )
    # the perturbations were undone exactly
    for b_layer, p_layer in zip(before, params):
        for key in b_layer:
            np.testing.assert_array_equal(b_layer[key], p_layer[key])


def test_gradcheck_catches_a_small_slip():
    """The check resolves errors far below O(1): a 1e-6 relative change of one entry of the smallest-
    gradient tensor (layer 0's bias without batch norm) is reported, 10x over the bound."""
    rng = np.random.default_rng(7)
    images, labels = rng.random((BATCH, contract.N_INPUTS)), rng.integers(0, 10, BATCH)
    params, state = setup(False, seed=1)
    _, grads, _ = M.loss_and_grads(params, state, images, labels, backend="numpy")
    k = np.argmax(np.abs(grads[0]["bias"]))
    grads[0]["bias"][k] *= 1 + 1e-6
    errors = gradcheck_errors(params, state, images, labels, "numpy", grads=grads)
    assert errors["0.bias"] > TOL
    assert errors["0.bias"] == pytest.approx(1e-6, rel=0.1)
    assert all(v <= TOL for key, v in errors.items() if key != "0.bias"), errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_catches_a_batchnorm_backward_without_the_batch_coupling(batch, backend, monkeypatch):
    """A plausible bug: batch norm's backward treated as per-example (``dx = gamma r dout``, the
    mean and variance terms dropped). The forward is untouched, so only the gradients are wrong."""
    images, labels = batch
    params, state = setup(True)

    def uncoupled(dout, cache, *, backend="numpy"):
        _, dgamma, dbeta = L.batchnorm_backward(dout, cache, backend=backend)
        return cache.gamma * cache.inv_std * dout, dgamma, dbeta

    monkeypatch.setattr(M, "batchnorm_backward", uncoupled)
    errors = gradcheck_errors(params, state, images, labels, backend)
    # the layer-2 gamma/beta gradients come before any batch-norm dx: still right
    assert errors["2.gamma"] <= TOL and errors["2.beta"] <= TOL and errors["3.weight"] <= TOL
    # everything below the top batch norm is wrong by O(1e-2 .. 1)
    for key in ("2.weight", "1.gamma", "1.beta", "1.weight", "0.gamma", "0.beta", "0.weight"):
        assert errors[key] > 1e-3, (key, errors[key])
