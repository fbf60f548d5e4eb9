"""numba kernels for the hot elementwise and reduction work of :mod:`numpyside.layers`.

Called by the ``backend="numba"`` path of the layers (the matmuls stay on NumPy/BLAS). The layers
validate the input and hand the kernels C-contiguous arrays of ONE floating dtype (float32 or
float64), scalar constants already cast to that dtype, and labels as ``np.intp``, so each kernel is
compiled exactly twice (once per dtype); ``cache=True`` keeps the machine code on disk.

Conventions
-----------
* ``fastmath=False``: no reassociation, no FMA contraction, IEEE semantics; the results are
  reproducible run to run. ``error_model="numpy"``: a division by zero gives inf/nan as in NumPy
  instead of raising, which also lets LLVM vectorise the loops that divide.
* Every kernel computes in the arrays' own dtype (float32 sums accumulate in float32), exactly
  like NumPy, and uses the same sequence of operations as the NumPy path of the layers. Constants
  come from ``x.dtype.type(...)`` so that no Python float literal promotes a float32 expression to
  float64.
* Reductions over the batch (axis 0 of a C-contiguous ``(B, n)`` array) run row by row with one
  accumulator per feature: the inner loop walks a contiguous row and vectorises, and each feature's
  sum is added in the order ``x[0] + x[1] + ... + x[B-1]``, which is the order NumPy's axis-0
  reduction uses as well for n >= 2. (For n = 1 NumPy drops the unit axis and sums the column as a
  contiguous 1-D array, pairwise from B = 8 on: there the two orders differ.)

Agreement with the NumPy backend
--------------------------------
Measured as the project's normwise ``max|numba - numpy| / max|numpy|`` (``compare.metrics``),
checked by ``tests/test_layers.py`` against ``TOLERANCE`` below.

* batch norm forward (all five cache arrays too), backward, eval, and the sigmoid backward use
  only ``+ - * / sqrt`` (all correctly rounded) in NumPy's order: they agree BIT FOR BIT on this
  machine (measured error 0 in float32 and float64 over 1200 random cases with n >= 3, and on a
  grid of B from 2 to 5000 by n from 2 to 1000). With a single feature (n = 1) the batch sums ``mean``, ``dbeta``,
  ``dgamma`` are added in another order (see above) and differ by the rounding error of a sum,
  which is bounded relative to ``sum_b |term_b|``, not to ``|sum_b term_b|``: a sum that cancels
  (``dgamma = sum_b dout_b x_hat_b`` often does) can have a large relative error. For these three
  sums the tolerance below is therefore measured against ``max_j sum_b |term_bj|``. The forward's
  other outputs inherit the mean's difference through ``centered = x - mean``, amplified by the
  centering condition ``1 + |mean| / std``: at n = 1 their tolerance is scaled by it. Measured at
  n = 1 (3000 cases per dtype, B in 2..300, spread 1e-3..1e2, offsets up to 3), in ulp after that
  scaling: mean 6.4, var 6.2, out/centered/inv_std/x_hat <= 3.7, dx 2.2, dgamma 1.8, dbeta 1.5.
* the sigmoid forward does NumPy's operations around its own ``exp``
  (:func:`numpyside.fastexp.exp_nonpositive`, within 2 ulp in float32 and 1 ulp in float64 of
  NumPy's ``exp``, see :func:`sigmoid`). Measured over 1200 random (B, n) up to (256, 100), inputs
  scaled by 0.1..30: at most 4 ulp (float32) and 2 ulp (float64) apart elementwise, normwise
  1.7 and 1.3 machine epsilons.
* the cross-entropy calls the C library's ``expf/exp`` and ``logf/log`` where NumPy calls its SIMD
  versions (they may differ in the last place), sums each row of ``exp`` sequentially where NumPy
  sums pairwise (8 partial sums), and sums the batch's losses sequentially where NumPy's ``mean``
  sums pairwise. Measured worst cases, in ulp (machine epsilon: 1.19e-7 in float32, 2.2e-16 in
  float64), with random normal logits scaled by 1e-2..1e4 (the 1200-case row: by 0.1..10, shifted):

  ================================  ===================  ===================
  shape (B, C), cases per dtype     float32 loss/dlogit  float64 loss/dlogit
  ================================  ===================  ===================
  (128, 10), 200                    3.5 / 3             4 / 2
  (1024, 10), 200                   14 / 3              9 / 3
  (2..256, 3..100), 1200            6.3 / 7.5           5.2 / 9.5
  (4096, 100), 200                  21 / 8.5            26 / 9
  (64, 1000), 200                   3 / 25.5            2.6 / 22
  ================================  ===================  ===================

  The error grows with the number of summed terms (C for a row, B for the loss), as the rounding
  error of a sum does.

``TOLERANCE``: float32 ``1e-5`` (84 ulp), float64 ``2e-14`` (90 ulp): at least 3x above every
measured case for B up to 4096 and C up to 1000, and 20x above the network's training shape
(B = 128, C = 10). The bit-identical kernels are held to the same bound, not to 0: NumPy's
reduction order and its choice of SIMD code path are implementation details that may differ on
another machine.
"""

from __future__ import annotations

import numba
import numpy as np

from numpyside.fastexp import exp_nonpositive

#: Stated bound on ``max|numba - numpy| / max|numpy|`` per dtype (see the module docstring).
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 2e-14}

_jit = numba.njit(cache=True, fastmath=False, error_model="numpy", nogil=True)


@_jit
def batchnorm_forward(x, gamma, beta, eps):
    """Fused training-mode batch norm over the rows of ``x`` (B, n); ``eps`` in x's dtype.

    Three passes over the batch: (1) column sums -> ``mean``; (2) ``centered = x - mean`` and the
    column sums of ``centered**2`` -> biased ``var``, then ``inv_std = 1 / sqrt(var + eps)``;
    (3) ``x_hat = centered * inv_std`` and ``out = gamma * x_hat + beta``.

    Returns ``(out, mean, centered, var, inv_std, x_hat)``: shapes (B, n), (n,), (B, n), (n,), (n,), (B, n).
    """
    n_rows, n = x.shape
    dt = x.dtype.type
    count = dt(n_rows)
    one = dt(1)
    mean = np.zeros(n, x.dtype)
    for i in range(n_rows):
        for j in range(n):
            mean[j] += x[i, j]
    for j in range(n):
        mean[j] = mean[j] / count
    centered = np.empty_like(x)
    var = np.zeros(n, x.dtype)
    for i in range(n_rows):
        for j in range(n):
            c = x[i, j] - mean[j]
            centered[i, j] = c
            var[j] += c * c
    inv_std = np.empty(n, x.dtype)
    for j in range(n):
        var[j] = var[j] / count
        inv_std[j] = one / np.sqrt(var[j] + eps)
    x_hat = np.empty_like(x)
    out = np.empty_like(x)
    for i in range(n_rows):
        for j in range(n):
            h = centered[i, j] * inv_std[j]
            x_hat[i, j] = h
            out[i, j] = gamma[j] * h + beta[j]
    return out, mean, centered, var, inv_std, x_hat


@_jit
def batchnorm_backward(dout, x_hat, gamma, inv_std):
    """Fused compact batch-norm backward; ``dout, x_hat`` (B, n), ``gamma, inv_std`` (n,).

    Pass 1 accumulates both column sums at once: ``dbeta = sum_b dout``, ``dgamma = sum_b dout * x_hat``.
    Pass 2: ``dx = (gamma * inv_std / N) * (N * dout - dbeta - x_hat * dgamma)``.

    Returns ``(dx, dgamma, dbeta)``: shapes (B, n), (n,), (n,).
    """
    n_rows, n = dout.shape
    count = dout.dtype.type(n_rows)
    dbeta = np.zeros(n, dout.dtype)
    dgamma = np.zeros(n, dout.dtype)
    for i in range(n_rows):
        for j in range(n):
            d = dout[i, j]
            dbeta[j] += d
            dgamma[j] += d * x_hat[i, j]
    scale = np.empty(n, dout.dtype)
    for j in range(n):
        scale[j] = gamma[j] * inv_std[j] / count
    dx = np.empty_like(dout)
    for i in range(n_rows):
        for j in range(n):
            dx[i, j] = scale[j] * (count * dout[i, j] - dbeta[j] - x_hat[i, j] * dgamma[j])
    return dx, dgamma, dbeta


@_jit
def batchnorm_eval(x, gamma, beta, mean, var, eps):
    """Eval-mode batch norm with running statistics: ``gamma * ((x - mean) * inv_std) + beta``,
    ``inv_std = 1 / sqrt(var + eps)``. ``x`` (B, n), the rest (n,); returns (B, n)."""
    n_rows, n = x.shape
    one = x.dtype.type(1)
    inv_std = np.empty(n, x.dtype)
    for j in range(n):
        inv_std[j] = one / np.sqrt(var[j] + eps)
    out = np.empty_like(x)
    for i in range(n_rows):
        for j in range(n):
            out[i, j] = gamma[j] * ((x[i, j] - mean[j]) * inv_std[j]) + beta[j]
    return out


@_jit
def logistic(x, one):
    """The stable logistic of one value: ``e = exp(-|x|)``, ``1 / (1 + e)`` if ``x >= 0`` else
    ``e / (1 + e)``; ``one`` is 1 in ``x``'s dtype. Shared by :func:`sigmoid` and the fused kernels
    of :mod:`numpyside.fused`, so that every numba sigmoid rounds the same way."""
    e = exp_nonpositive(-abs(x))
    numerator = one if x >= 0 else e
    return numerator / (one + e)


@_jit
def sigmoid(x):
    """The stable logistic of a flat (1-D) array, one vectorised pass: ``e = exp(-|x|)``, then
    ``s = 1 / (1 + e)`` where ``x >= 0`` and ``s = e / (1 + e)`` where ``x < 0``.

    ``exp`` is :func:`numpyside.fastexp.exp_nonpositive`, arithmetic that vectorises with the rest
    of the loop (numba's own ``np.exp`` is a scalar C-library call per element, without Intel's
    SVML): 2.8 us for (128, 100) float32 against 4.6 us for NumPy's ``np.exp`` alone. It is within
    2 ulp (float32) and 1 ulp (float64) of NumPy's ``exp``, so this is where the two backends'
    sigmoids part: by at most a few ulp (see the module docstring).
    """
    one = x.dtype.type(1)
    out = np.empty_like(x)
    for k in range(x.shape[0]):
        out[k] = logistic(x[k], one)
    return out


@_jit
def sigmoid_backward(dout, s):
    """``dx = dout * s * (1 - s)`` on flat (1-D) arrays, ``s`` the forward's output."""
    one = s.dtype.type(1)
    dx = np.empty_like(dout)
    for k in range(dout.shape[0]):
        sk = s[k]
        dx[k] = dout[k] * sk * (one - sk)
    return dx


@_jit
def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of ``logits`` (B, C) against ``labels`` (B,) and its gradient, one pass per row.

    Per row: ``m = max z``, ``e = exp(z - m)`` (stored in ``dlogits``), ``s = sum e``,
    ``log p_y = (z_y - m) - log s``; then ``dlogits = (e / s - onehot(y)) / B``.
    Returns ``(loss, dlogits)`` with ``loss = -(sum_b log p_{y_b}) / B``.

    The ``exp`` here is the scalar C-library one (see :func:`sigmoid`): for the network's
    C = 10 the fusion wins (10 us against NumPy's 28 us at B = 128, float32), for wide rows it does
    not (47 us against 36 us at C = 100), since NumPy's ``exp`` is vectorised.
    """
    dlogits = np.empty_like(logits)
    return softmax_cross_entropy_into(logits, labels, dlogits), dlogits


@_jit
def softmax_cross_entropy_into(logits, labels, dlogits):
    """:func:`softmax_cross_entropy` writing the gradient into the preallocated ``dlogits``;
    returns the loss (shared with the fused kernels of :mod:`numpyside.fused`)."""
    n_rows, n_classes = logits.shape
    dt = logits.dtype.type
    count = dt(n_rows)
    one = dt(1)
    total = dt(0)
    for i in range(n_rows):
        m = logits[i, 0]
        for j in range(1, n_classes):
            if logits[i, j] > m:
                m = logits[i, j]
        s = dt(0)
        for j in range(n_classes):
            e = np.exp(logits[i, j] - m)
            dlogits[i, j] = e
            s += e
        y = labels[i]
        total += (logits[i, y] - m) - np.log(s)
        for j in range(n_classes):
            dlogits[i, j] = dlogits[i, j] / s
        dlogits[i, y] -= one
        for j in range(n_classes):
            dlogits[i, j] = dlogits[i, j] / count
    return -(total / count)
