"""Fused numba kernels for :class:`numpyside.fast.FastTrainer`: one pass where the reference path
(:mod:`numpyside.layers` with ``backend="numba"``) makes several, writing into buffers the caller
preallocated, so that a training step allocates nothing.

Every kernel performs, element by element, the SAME floating-point operations in the SAME order as
the reference kernels of :mod:`numpyside.kernels` and the NumPy code around them in
:mod:`numpyside.model`, :mod:`numpyside.layers` and :mod:`numpyside.train` (same conventions:
``fastmath=False``, so no reassociation and no FMA contraction; constants in the arrays' dtype).
What is fused is only the loop structure and the memory traffic, not the arithmetic: on this
machine ``FastTrainer`` and the reference ``Trainer`` produce bit-identical parameters
(``tests/test_fast.py``).

The sigmoid's ``exp`` is :func:`numpyside.fastexp.exp_nonpositive`, plain arithmetic that
vectorises inside the loop that produces the sigmoid's input, as in the reference
``kernels.sigmoid``: batch norm, the running statistics and the whole sigmoid are one kernel.

Shapes: ``B`` = batch, ``n`` = features; all arrays C-contiguous, one float dtype per call.
"""

from __future__ import annotations

import numba
import numpy as np

from numpyside import blas, kernels
from numpyside.fastexp import exp_nonpositive

_jit = numba.njit(cache=True, fastmath=False, error_model="numpy", nogil=True, boundscheck=False)


@_jit
def gather_rows(source, indices, out):
    """``out[k] = source[indices[k]]`` for the rows of a 2-D array (a batch of images)."""
    n = source.shape[1]
    for k in range(indices.shape[0]):
        row = indices[k]
        for j in range(n):
            out[k, j] = source[row, j]


@_jit
def gather_labels(labels, indices, out):
    """``out[k] = labels[indices[k]]``."""
    for k in range(indices.shape[0]):
        out[k] = labels[indices[k]]


@_jit
def bn_sigmoid_forward(z, gamma, beta, eps, running_mean, running_var, keep, new, unbias,
                       mean, var, inv_std, x_hat, s):
    """Training-mode batch norm of ``z`` (B, n), the running-statistics update, and the sigmoid,
    in three passes over the batch:

    1. ``mean = sum_b z / B``;
    2. ``var = sum_b (z - mean)**2 / B``, ``inv_std = 1 / sqrt(var + eps)``; running statistics
       ``rm <- keep * rm + new * mean``, ``rv <- keep * rv + new * (var * unbias)`` (in place;
       ``keep = 1 - momentum``, ``new = momentum``, ``unbias = B / (B - 1)``);
    3. ``x_hat = (z - mean) * inv_std``, ``out = gamma * x_hat + beta``, ``s = sigmoid(out)``.

    Same operations as ``kernels.batchnorm_forward`` + ``model.update_running_stats`` +
    ``kernels.sigmoid`` (``centered`` is recomputed instead of stored: the same rounding). The sums
    of passes 1 and 2 take four rows per sweep over the features, adding them in row order: the
    same sums, with a quarter of the loads and stores of the accumulators.
    """
    n_rows, n = z.shape
    dt = z.dtype.type
    count = dt(n_rows)
    one = dt(1)
    for j in range(n):
        mean[j] = 0
        var[j] = 0
    i = 0
    while i + 4 <= n_rows:
        for j in range(n):
            mean[j] = (((mean[j] + z[i, j]) + z[i + 1, j]) + z[i + 2, j]) + z[i + 3, j]
        i += 4
    for i in range(i, n_rows):
        for j in range(n):
            mean[j] += z[i, j]
    for j in range(n):
        mean[j] = mean[j] / count
    i = 0
    while i + 4 <= n_rows:
        for j in range(n):
            m = mean[j]
            c0 = z[i, j] - m
            c1 = z[i + 1, j] - m
            c2 = z[i + 2, j] - m
            c3 = z[i + 3, j] - m
            var[j] = (((var[j] + c0 * c0) + c1 * c1) + c2 * c2) + c3 * c3
        i += 4
    for i in range(i, n_rows):
        for j in range(n):
            c = z[i, j] - mean[j]
            var[j] += c * c
    for j in range(n):
        var[j] = var[j] / count
        inv_std[j] = one / np.sqrt(var[j] + eps)
        running_mean[j] = keep * running_mean[j] + new * mean[j]
        running_var[j] = keep * running_var[j] + new * (var[j] * unbias)
    for i in range(n_rows):
        for j in range(n):
            h = (z[i, j] - mean[j]) * inv_std[j]
            x_hat[i, j] = h
            out = gamma[j] * h + beta[j]
            e = exp_nonpositive(-abs(out))
            numerator = one if out >= 0 else e
            s[i, j] = numerator / (one + e)


@_jit
def bias_sigmoid_forward(z, bias, s):
    """Batch norm off: ``s = sigmoid(z + bias)`` (``kernels.sigmoid``'s operations), one pass."""
    n_rows, n = z.shape
    one = z.dtype.type(1)
    for i in range(n_rows):
        for j in range(n):
            out = z[i, j] + bias[j]
            e = exp_nonpositive(-abs(out))
            numerator = one if out >= 0 else e
            s[i, j] = numerator / (one + e)


@_jit
def sigmoid_bn_backward(ds, s, x_hat, gamma, inv_std, d, dgamma, dbeta):
    """Backward of sigmoid then batch norm; ``ds = dL/ds`` (B, n). Two passes:

    1. ``dout = ds * s * (1 - s)`` (stored in ``d``), ``dbeta = sum_b dout``,
       ``dgamma = sum_b dout * x_hat``;
    2. ``d = (gamma * inv_std / B) * (B * dout - dbeta - x_hat * dgamma)``, in place.

    Same operations as ``kernels.sigmoid_backward`` + ``kernels.batchnorm_backward``.
    """
    n_rows, n = ds.shape
    dt = ds.dtype.type
    count = dt(n_rows)
    one = dt(1)
    for j in range(n):
        dbeta[j] = 0
        dgamma[j] = 0
    for i in range(n_rows):
        for j in range(n):
            sk = s[i, j]
            dout = ds[i, j] * sk * (one - sk)
            d[i, j] = dout
            dbeta[j] += dout
            dgamma[j] += dout * x_hat[i, j]
    for i in range(n_rows):
        for j in range(n):
            scale = gamma[j] * inv_std[j] / count
            d[i, j] = scale * (count * d[i, j] - dbeta[j] - x_hat[i, j] * dgamma[j])


@_jit
def sigmoid_bias_backward(ds, s, d, dbias):
    """Batch norm off: ``d = ds * s * (1 - s)`` and ``dbias = sum_b d`` (one pass)."""
    n_rows, n = ds.shape
    one = ds.dtype.type(1)
    for j in range(n):
        dbias[j] = 0
    for i in range(n_rows):
        for j in range(n):
            sk = s[i, j]
            dout = ds[i, j] * sk * (one - sk)
            d[i, j] = dout
            dbias[j] += dout


@_jit
def bias_softmax_cross_entropy(logits, bias, labels, dlogits, dbias):
    """Output bias, loss, and the loss's gradients w.r.t. the logits and the bias.

    ``logits += bias`` in place, then per row ``kernels.softmax_cross_entropy``'s operations
    (``m = max z``, ``e = exp(z - m)``, ``s = sum e``, ``log p_y = (z_y - m) - log s``,
    ``dlogits = (e / s - onehot(y)) / B``), and ``dbias = sum_b dlogits`` (rows in order, as
    NumPy's axis-0 sum). Returns ``loss = -(sum_b log p_{y_b}) / B`` in the logits' dtype.
    """
    n_rows, n_classes = logits.shape
    for i in range(n_rows):
        for j in range(n_classes):
            logits[i, j] = logits[i, j] + bias[j]
    loss = kernels.softmax_cross_entropy_into(logits, labels, dlogits)
    for j in range(n_classes):
        dbias[j] = 0
    for i in range(n_rows):
        for j in range(n_classes):
            dbias[j] += dlogits[i, j]
    return loss


@_jit
def sgd_momentum(params, velocity, grads, lr, momentum):
    """``v <- v * momentum + g``; ``p <- p - lr * v`` over flat (1-D) buffers holding every parameter
    (the reference's ``np.multiply``, ``np.add``, ``p -= lr * v``: two roundings each, no FMA)."""
    for k in range(params.shape[0]):
        v = velocity[k] * momentum + grads[k]
        velocity[k] = v
        params[k] = params[k] - lr * v


# ------------------------------------------------------------------------------------------------
# Whole stages of a training step, and a whole epoch of steps, in one call, with the products done
# by NumPy's own BLAS (numpyside.blas). Only used when numpyside.blas.available(); the same
# operations on the same operands as the call-by-call path, so the results are the same bits.
# ------------------------------------------------------------------------------------------------


@_jit
def _gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, itemsize):
    """``C = op(A) @ op(B)`` (row-major, ``alpha = 1``, ``beta = 0``) on raw pointers, exactly the
    call that ``np.matmul`` makes for these operands."""
    if itemsize == 4:
        blas.cblas_sgemm(blas.ROW_MAJOR, trans_a, trans_b, m, n, k, np.float32(1), a, lda, b, ldb, np.float32(0), c, ldc)
    else:
        blas.cblas_dgemm(blas.ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc)


@_jit
def matmul(x, w, out):
    """``out = x @ w`` for C-contiguous 2-D arrays."""
    _gemm(blas.NO_TRANS, blas.NO_TRANS, x.shape[0], w.shape[1], x.shape[1], x.ctypes.data, x.shape[1],
          w.ctypes.data, w.shape[1], out.ctypes.data, out.shape[1], x.itemsize)


@_jit
def matmul_tn(x, d, out):
    """``out = x.T @ d`` (a weight gradient) for C-contiguous 2-D arrays."""
    _gemm(blas.TRANS, blas.NO_TRANS, x.shape[1], d.shape[1], x.shape[0], x.ctypes.data, x.shape[1],
          d.ctypes.data, d.shape[1], out.ctypes.data, out.shape[1], x.itemsize)


@_jit
def matmul_nt(d, w, out):
    """``out = d @ w.T`` (an input gradient) for C-contiguous 2-D arrays."""
    _gemm(blas.NO_TRANS, blas.TRANS, d.shape[0], w.shape[0], d.shape[1], d.ctypes.data, d.shape[1],
          w.ctypes.data, w.shape[1], out.ctypes.data, out.shape[1], d.itemsize)


@_jit
def stage_hidden_layer(x, w, z, a, b, eps, running_mean, running_var, keep, new, unbias,
                       mean, var, inv_std, x_hat, s, batch_norm):
    """A hidden layer's forward: ``z = x @ W``, then batch norm (or the bias) and the sigmoid into
    ``s``."""
    matmul(x, w, z)
    if batch_norm:
        bn_sigmoid_forward(z, a, b, eps, running_mean, running_var, keep, new, unbias, mean, var, inv_std, x_hat, s)
    else:
        bias_sigmoid_forward(z, a, s)


@_jit
def stage_output_backward_sgd(x, s, x_hat, inv_std, ds, d, labels, logits, dlogits,
                              w_hidden, w_out, a, b_out, g_w0, g_hidden, g_out, g_a, g_b, g_b_out,
                              params, velocity, grads, lr, momentum, batch_norm):
    """The output layer and the loss, the whole backward pass, and the SGD update of all
    parameters (flat ``params``, ``velocity``, ``grads``). Returns the loss.

    ``s, x_hat, ds, d`` are the (3, B, n) stacks of the hidden layers' buffers, ``inv_std``
    (3, n); ``w_hidden`` (2, n, n) the hidden-to-hidden weights, ``a`` (3, n) the hidden layers'
    gamma (or bias), ``g_*`` the gradients in the same layout.
    """
    last = s.shape[0] - 1
    matmul(s[last], w_out, logits)
    loss = bias_softmax_cross_entropy(logits, b_out, labels, dlogits, g_b_out)
    matmul_tn(s[last], dlogits, g_out)
    matmul_nt(dlogits, w_out, ds[last])
    for i in range(last, -1, -1):
        if batch_norm:
            sigmoid_bn_backward(ds[i], s[i], x_hat[i], a[i], inv_std[i], d[i], g_a[i], g_b[i])
        else:
            sigmoid_bias_backward(ds[i], s[i], d[i], g_a[i])
        if i == 0:
            matmul_tn(x, d[0], g_w0)
        else:
            matmul_tn(s[i - 1], d[i], g_hidden[i - 1])
            matmul_nt(d[i], w_hidden[i - 1], ds[i - 1])
    sgd_momentum(params, velocity, grads, lr, momentum)
    return loss


@_jit
def train_steps(images, labels, batch_indices, rates, losses, x, y, z, s, x_hat, mean, var, inv_std, ds, d,
                logits, dlogits, w0, w_hidden, w_out, a, b, b_out, g_w0, g_hidden, g_out, g_a, g_b, g_b_out,
                params, velocity, grads, running_mean, running_var, eps, keep, new, unbias, momentum, batch_norm):
    """Steps ``k = 0 .. steps-1``: train on the batch ``batch_indices[k]`` with the learning rate
    ``rates[k]``, write the loss to ``losses[k]``. The numba counterpart of ``jaxside.train``'s
    ``lax.scan`` over an epoch: one compiled call, no Python between the steps.

    Each step gathers the batch, runs :func:`stage_hidden_layer` for each hidden layer, then
    :func:`stage_output_backward_sgd`. Buffers as in those functions; ``running_mean`` and
    ``running_var`` are (3, n), updated in place.
    """
    for k in range(batch_indices.shape[0]):
        gather_rows(images, batch_indices[k], x)
        gather_labels(labels, batch_indices[k], y)
        for i in range(z.shape[0]):
            stage_hidden_layer(x if i == 0 else s[i - 1], w0 if i == 0 else w_hidden[i - 1], z[i], a[i], b[i], eps,
                               running_mean[i], running_var[i], keep, new, unbias, mean[i], var[i], inv_std[i],
                               x_hat[i], s[i], batch_norm)
        losses[k] = stage_output_backward_sgd(x, s, x_hat, inv_std, ds, d, y, logits, dlogits, w_hidden, w_out,
                                              a, b_out, g_w0, g_hidden, g_out, g_a, g_b, g_b_out, params, velocity,
                                              grads, rates[k], momentum, batch_norm)
