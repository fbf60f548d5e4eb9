"""numba kernels of :mod:`numpyside.ensemble`: the kernels of :mod:`numpyside.kernels.numba_layers` with a leading
member axis (and a ghost axis), for the ``backend="numba"`` path.

Batch norm's activations come as ``(M, G, b, n)``: member, ghost batch, example, feature. Without
pooling each ``(m, g)`` block is normalised on its own, with the same loops and the same order of
operations as :func:`numpyside.kernels.numba_layers.batchnorm_forward` / ``batchnorm_backward`` (so member ``k``
with ``G = 1`` is that kernel's result bit for bit). Pooled (``G = 1``), one set of statistics covers
all ``M x b`` rows, summed member by member in row order (the order of the concatenated batch), while
``gamma``/``beta`` stay per member. The conventions (``fastmath=False``, own-dtype accumulation,
``error_model="numpy"``) are those of :mod:`numpyside.kernels.numba_layers`.
"""

from __future__ import annotations

import numpy as np

from numpyside.kernels import jit
from numpyside.kernels.numba_layers import batchnorm_eval as _batchnorm_eval_2d
from numpyside.kernels.numba_layers import softmax_cross_entropy_into

_jit = jit.njit(fastmath=False, error_model="numpy", nogil=True)


@_jit
def _accumulate_stats(x, mean, var, centered):
    """For one ``(b, n)`` block, given its final ``mean``: the centred rows, and
    ``var += sum_rows centered**2`` (divided by the count by the caller)."""
    n_rows, n = x.shape
    for i in range(n_rows):
        for j in range(n):
            c = x[i, j] - mean[j]
            centered[i, j] = c
            var[j] += c * c


@_jit
def _normalise(centered, inv_std, gamma, beta, x_hat, out):
    n_rows, n = centered.shape
    for i in range(n_rows):
        for j in range(n):
            h = centered[i, j] * inv_std[j]
            x_hat[i, j] = h
            out[i, j] = gamma[j] * h + beta[j]


@_jit
def batchnorm_forward(x, gamma, beta, eps, pooled):
    """Training-mode batch norm of ``x`` (M, G, b, n); ``gamma, beta`` (M, n); ``eps`` in x's dtype.

    Statistics per ``(m, g)`` block (``pooled=False``) or over all members' rows (``pooled=True``,
    ``G = 1``): ``mean``, biased ``var``, ``inv_std = 1 / sqrt(var + eps)``, each of shape
    (S, G, n) with ``S = M`` or ``1``. Returns ``(out, mean, centered, var, inv_std, x_hat)``.
    """
    n_members, n_ghosts, n_rows, n = x.shape
    n_sets = 1 if pooled else n_members
    dt = x.dtype.type
    count = dt(n_rows * n_members) if pooled else dt(n_rows)
    one = dt(1)
    mean = np.zeros((n_sets, n_ghosts, n), x.dtype)
    var = np.zeros((n_sets, n_ghosts, n), x.dtype)
    inv_std = np.empty((n_sets, n_ghosts, n), x.dtype)
    centered = np.empty_like(x)
    x_hat = np.empty_like(x)
    out = np.empty_like(x)
    for m in range(n_members):
        s = 0 if pooled else m
        for g in range(n_ghosts):
            for i in range(n_rows):
                for j in range(n):
                    mean[s, g, j] += x[m, g, i, j]
    for s in range(n_sets):
        for g in range(n_ghosts):
            for j in range(n):
                mean[s, g, j] = mean[s, g, j] / count
    for m in range(n_members):
        s = 0 if pooled else m
        for g in range(n_ghosts):
            _accumulate_stats(x[m, g], mean[s, g], var[s, g], centered[m, g])
    for s in range(n_sets):
        for g in range(n_ghosts):
            for j in range(n):
                var[s, g, j] = var[s, g, j] / count
                inv_std[s, g, j] = one / np.sqrt(var[s, g, j] + eps)
    for m in range(n_members):
        s = 0 if pooled else m
        for g in range(n_ghosts):
            _normalise(centered[m, g], inv_std[s, g], gamma[m], beta[m], x_hat[m, g], out[m, g])
    return out, mean, centered, var, inv_std, x_hat


@_jit
def batchnorm_backward(dout, x_hat, gamma, inv_std, pooled):
    """Backward of :func:`batchnorm_forward`; ``dout, x_hat`` (M, G, b, n), ``gamma`` (M, n),
    ``inv_std`` (S, G, n).

    Per block: ``s1 = sum_b dout``, ``s2 = sum_b dout * x_hat``; ``dbeta = sum_g s1``,
    ``dgamma = sum_g s2`` (M, n). Unpooled, per block:
    ``dx = (gamma r / N) (N dout - s1 - x_hat s2)`` (the single model's kernel). Pooled, gamma no
    longer factors out of the coupling sums: ``c1 = sum_m gamma_m dbeta_m``,
    ``c2 = sum_m gamma_m dgamma_m``, ``dx = (r / N) (N gamma_m dout - c1 - x_hat c2)``.
    Returns ``(dx, dgamma, dbeta)``.
    """
    n_members, n_ghosts, n_rows, n = dout.shape
    dt = dout.dtype.type
    count = dt(n_rows * n_members) if pooled else dt(n_rows)
    s1 = np.zeros((n_members, n_ghosts, n), dout.dtype)
    s2 = np.zeros((n_members, n_ghosts, n), dout.dtype)
    for m in range(n_members):
        for g in range(n_ghosts):
            for i in range(n_rows):
                for j in range(n):
                    d = dout[m, g, i, j]
                    s1[m, g, j] += d
                    s2[m, g, j] += d * x_hat[m, g, i, j]
    dbeta = np.zeros((n_members, n), dout.dtype)
    dgamma = np.zeros((n_members, n), dout.dtype)
    for m in range(n_members):
        for g in range(n_ghosts):
            for j in range(n):
                dbeta[m, j] += s1[m, g, j]
                dgamma[m, j] += s2[m, g, j]
    dx = np.empty_like(dout)
    if pooled:
        c1 = np.zeros(n, dout.dtype)
        c2 = np.zeros(n, dout.dtype)
        for m in range(n_members):
            for j in range(n):
                c1[j] += gamma[m, j] * dbeta[m, j]
                c2[j] += gamma[m, j] * dgamma[m, j]
        scale = np.empty(n, dout.dtype)
        for j in range(n):
            scale[j] = inv_std[0, 0, j] / count
        for m in range(n_members):
            for i in range(n_rows):
                for j in range(n):
                    dx[m, 0, i, j] = scale[j] * (
                        count * (gamma[m, j] * dout[m, 0, i, j]) - c1[j] - x_hat[m, 0, i, j] * c2[j]
                    )
        return dx, dgamma, dbeta
    scale = np.empty(n, dout.dtype)
    for m in range(n_members):
        for g in range(n_ghosts):
            for j in range(n):
                scale[j] = gamma[m, j] * inv_std[m, g, j] / count
            for i in range(n_rows):
                for j in range(n):
                    dx[m, g, i, j] = scale[j] * (
                        count * dout[m, g, i, j] - s1[m, g, j] - x_hat[m, g, i, j] * s2[m, g, j]
                    )
    return dx, dgamma, dbeta


@_jit
def batchnorm_eval(x, gamma, beta, mean, var, eps):
    """Eval-mode batch norm per member: ``x`` (M, B, n), the rest (M, n); returns (M, B, n)."""
    out = np.empty_like(x)
    for m in range(x.shape[0]):
        out[m] = _batchnorm_eval_2d(x[m], gamma[m], beta[m], mean[m], var[m], eps)
    return out


@_jit
def softmax_cross_entropy(logits, labels):
    """Each member's mean cross-entropy: ``logits`` (M, B, C), ``labels`` (M, B) as ``np.intp``.

    Returns ``(losses (M,), dlogits (M, B, C))``, ``dlogits[m] = (softmax - onehot) / B``: the
    single model's kernel, member by member.
    """
    n_members = logits.shape[0]
    losses = np.empty(n_members, logits.dtype)
    dlogits = np.empty_like(logits)
    for m in range(n_members):
        losses[m] = softmax_cross_entropy_into(logits[m], labels[m], dlogits[m])
    return losses, dlogits
