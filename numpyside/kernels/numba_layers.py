r"""numba kernels for the hot elementwise and reduction work of :mod:`numpyside.layers`.

Called by the ``backend="numba"`` path of the layers (the matmuls stay on BLAS) with C-contiguous
arrays of ONE float dtype, constants in that dtype and labels as ``np.intp``: each kernel compiles
once per dtype, cached on disk (:mod:`numpyside.kernels.jit`). ``fastmath=False`` (no reassociation,
no FMA contraction); ``error_model="numpy"`` (a division by zero gives inf/nan, and the dividing
loops vectorise). Every kernel computes in the arrays' dtype and in the NumPy path's order of
operations; a batch sum runs row by row, ``x[0] + x[1] + ... + x[B-1]`` per feature, which is
NumPy's axis-0 order for ``n >= 2``. So batch norm and the sigmoid backward agree with the NumPy
backend bit for bit; the sigmoid differs by its ``exp`` (:mod:`numpyside.kernels.fastexp`, a few
ulp), the cross-entropy by the C library's ``exp``/``log`` and sequential sums (growing with B and
C). The tests bound ``max|numba - numpy| / max|numpy|`` by ``compare.tolerances.NUMBA_VS_NUMPY``;
the measurements behind it are in ``docs/performance.md``.
"""

from __future__ import annotations

import numpy as np

from numpyside.kernels import jit
from numpyside.kernels.fastexp import exp_nonpositive

_jit = jit.njit(fastmath=False, error_model="numpy", nogil=True)


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
    of :mod:`numpyside.kernels.fused`, so that every numba sigmoid rounds the same way."""
    e = exp_nonpositive(-abs(x))
    numerator = one if x >= 0 else e
    return numerator / (one + e)


@_jit
def sigmoid(x):
    """The stable logistic of a flat (1-D) array, one vectorised pass: ``e = exp(-|x|)``, then
    ``s = 1 / (1 + e)`` where ``x >= 0`` and ``s = e / (1 + e)`` where ``x < 0``.

    ``exp`` is :func:`numpyside.kernels.fastexp.exp_nonpositive`, arithmetic that vectorises with the rest
    of the loop (numba's own ``np.exp`` is a scalar C-library call per element). It is within a
    few ulp of NumPy's ``exp``: this is where the two backends' sigmoids part.
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

    The ``exp`` here is the scalar C-library one (see :func:`sigmoid`).
    """
    dlogits = np.empty_like(logits)
    return softmax_cross_entropy_into(logits, labels, dlogits), dlogits


@_jit
def softmax_cross_entropy_into(logits, labels, dlogits):
    """:func:`softmax_cross_entropy` writing the gradient into the preallocated ``dlogits``;
    returns the loss (shared with the fused kernels of :mod:`numpyside.kernels.fused`)."""
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
