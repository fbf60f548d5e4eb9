r"""Stacked layers of an ensemble, with handwritten backward passes: :mod:`numpyside.layers` with a
leading member axis ``M`` (CS231n style, every ``*_backward`` right under its ``*_forward``).

Activations are ``(M, B, n)``; the first layer's input may be shared, ``(B, 784)``. Batch norm sees
``(M, G, b, n)`` (``G`` ghost batches of ``b = B / G`` consecutive examples) and reduces over the
example axis of each block, or over members and examples when the statistics are pooled
(``docs/batchnorm_backward.md``, "Ensembles": what pooling and ghosting change in the coupling sums).
``backend="numba"`` runs :mod:`numpyside.kernels.numba_ensemble_layers`; the matrix products are ``np.matmul`` on
stacks (BLAS per member). The public boundary (:mod:`numpyside.ensemble.model`) has checked the inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from compare.contract import BN_EPS
from numpyside.kernels import numba_ensemble_layers as ensemble_kernels


def _c(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------


class LinearCache(NamedTuple):
    x: np.ndarray  # (M, B, n_in), or (B, n_in) shared by every member
    weight: np.ndarray  # (M, n_in, n_out)
    has_bias: bool


def linear_forward(x, weight, bias=None) -> tuple[np.ndarray, LinearCache]:
    r"""``out[m] = x[m] W[m] (+ b[m])``: ``x`` (M, B, n_in) or shared (B, n_in), ``W`` (M, n_in, n_out),
    ``b`` (M, n_out). Returns ``out`` (M, B, n_out) and the cache.

    A shared input multiplies the members' weights side by side, one product
    ``x [W_1 \cdots W_M]`` of shape (B, M n_out): what ``vmap``'s batching rule makes of ``x @ W``
    when only ``W`` has the member axis (it folds that axis into W's free dimension). Member ``m``'s
    columns are the single model's dot products ``x W_m``; the BLAS picks its kernel by the
    product's shape and may sum some columns in another order (a few units of roundoff).
    """
    if x.ndim == 2:
        n_members, n_in, n_out = weight.shape
        side_by_side = weight.transpose(1, 0, 2).reshape(n_in, n_members * n_out)
        out = _c((x @ side_by_side).reshape(x.shape[0], n_members, n_out).transpose(1, 0, 2))
    else:
        out = np.matmul(x, weight)
    if bias is not None:
        out += bias[:, None, :]
    return out, LinearCache(x, weight, bias is not None)


def linear_backward(dout, cache: LinearCache, *, need_dx: bool = True):
    r"""Backward of :func:`linear_forward`; ``dout`` (M, B, n_out).

    .. math:: dx_m = dout_m W_m^T, \qquad dW_m = x_m^T dout_m, \qquad db_m = \textstyle\sum_b dout_{mb}

    A shared input gives every member's ``dW_m = x^T dout_m``, all in one product
    ``x^T [dout_1 \cdots dout_M]`` (the forward's side-by-side layout). Returns ``(dx, dweight,
    dbias)`` (``dx`` None with ``need_dx=False``, ``dbias`` None without a bias).
    """
    x, weight, has_bias = cache
    dx = np.matmul(dout, weight.transpose(0, 2, 1)) if need_dx else None
    if x.ndim == 2:
        n_members, batch, n_out = dout.shape
        side_by_side = dout.transpose(1, 0, 2).reshape(batch, n_members * n_out)
        dweight = _c((x.T @ side_by_side).reshape(x.shape[1], n_members, n_out).transpose(1, 0, 2))
    else:
        dweight = np.matmul(x.transpose(0, 2, 1), dout)
    dbias = dout.sum(axis=1) if has_bias else None
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------
# batch norm (training mode): per (member, ghost batch) block, or pooled over the members
# --------------------------------------------------------------------------------------------


class BatchNormCache(NamedTuple):
    x_hat: np.ndarray  # (M, G, b, n)
    mean: np.ndarray  # (S, G, n), S = M (per member) or 1 (pooled)
    var: np.ndarray  # (S, G, n) BIASED variance of each block
    inv_std: np.ndarray  # (S, G, n)
    gamma: np.ndarray  # (M, n)
    pooled: bool

    @property
    def count(self) -> int:
        """``N``, the number of examples one set of statistics covers: ``b``, or ``M b`` pooled."""
        n_members, _, n_rows, _ = self.x_hat.shape
        return n_rows * n_members if self.pooled else n_rows


def batchnorm_forward(
    x, gamma, beta, eps: float = BN_EPS, *, ghost_batches: int = 1, pooled: bool = False, backend: str = "numpy"
) -> tuple[np.ndarray, BatchNormCache]:
    r"""Training-mode batch norm of ``x`` (M, B, n), ``gamma, beta`` (M, n).

    Each member's batch is viewed as ``G`` blocks of ``b = B / G`` consecutive rows; per block
    (or, pooled, over the ``M b`` rows of all members: ``G = 1``)

    .. math::
        \mu = \tfrac1N \textstyle\sum x, \quad c = x - \mu, \quad \sigma^2 = \tfrac1N \sum c^2, \quad
        r = 1 / \sqrt{\sigma^2 + \epsilon}, \quad \hat x = c\, r, \quad
        \text{out}_m = \gamma_m \hat x_m + \beta_m

    Returns ``out`` (M, B, n) and the cache (statistics of shape (S, G, n)).
    """
    n_members, batch, n = x.shape
    blocks = x.reshape(n_members, ghost_batches, batch // ghost_batches, n)
    eps = x.dtype.type(eps)
    if backend == "numba":
        out, mean, _centered, var, inv_std, x_hat = ensemble_kernels.batchnorm_forward(
            _c(blocks), _c(gamma), _c(beta), eps, pooled
        )
    else:
        axes = (0, 2) if pooled else (2,)
        mean = blocks.mean(axis=axes, keepdims=True)
        centered = blocks - mean
        var = (centered**2).mean(axis=axes, keepdims=True)
        inv_std = 1.0 / np.sqrt(var + eps)
        x_hat = centered * inv_std
        out = gamma[:, None, None, :] * x_hat + beta[:, None, None, :]
        mean, var, inv_std = mean[:, :, 0], var[:, :, 0], inv_std[:, :, 0]
    return out.reshape(x.shape), BatchNormCache(x_hat, mean, var, inv_std, gamma, pooled)


def batchnorm_backward(dout, cache: BatchNormCache, *, backend: str = "numpy"):
    r"""Backward of :func:`batchnorm_forward`; ``dout`` (M, B, n). Sums run over a block's rows.

    .. math::
        d\beta_m = \textstyle\sum_{g,b} dout, \qquad d\gamma_m = \sum_{g,b} dout\, \hat x

    Per block (unpooled), the single model's form with the block's sums
    ``s_1 = \sum_b dout``, ``s_2 = \sum_b dout\, \hat x``:
    ``dx = (\gamma r / N)(N\, dout - s_1 - \hat x\, s_2)``. Pooled, the block holds all members and
    ``\gamma`` no longer factors out of the coupling sums:
    ``dx_m = (r / N)(N \gamma_m dout_m - \sum_k \gamma_k d\beta_k - \hat x_m \sum_k \gamma_k d\gamma_k)``.
    Returns ``(dx (M, B, n), dgamma (M, n), dbeta (M, n))``.
    """
    x_hat, gamma = cache.x_hat, cache.gamma
    blocks = dout.reshape(x_hat.shape)
    if backend == "numba":
        dx, dgamma, dbeta = ensemble_kernels.batchnorm_backward(
            _c(blocks), _c(x_hat), _c(gamma), _c(cache.inv_std), cache.pooled
        )
        return dx.reshape(dout.shape), dgamma, dbeta
    count = cache.count
    inv_std = cache.inv_std[:, :, None, :]
    block_dbeta = blocks.sum(axis=2, keepdims=True)  # s_1 per block
    block_dgamma = (blocks * x_hat).sum(axis=2, keepdims=True)  # s_2 per block
    dbeta, dgamma = block_dbeta.sum(axis=(1, 2)), block_dgamma.sum(axis=(1, 2))
    if cache.pooled:
        coupling_beta = (gamma * dbeta).sum(axis=0)
        coupling_gamma = (gamma * dgamma).sum(axis=0)
        dx = (inv_std / count) * (count * (gamma[:, None, None, :] * blocks) - coupling_beta - x_hat * coupling_gamma)
    else:
        dx = (gamma[:, None, None, :] * inv_std / count) * (count * blocks - block_dbeta - x_hat * block_dgamma)
    return dx.reshape(dout.shape), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# batch norm (eval mode), softmax cross-entropy
# --------------------------------------------------------------------------------------------


def batchnorm_eval(x, gamma, beta, mean, var, eps: float = BN_EPS, *, backend: str = "numpy") -> np.ndarray:
    r"""Eval mode per member, running ``mean, var`` (M, n): ``out_m = \gamma_m ((x_m - mean_m) r_m) + \beta_m``."""
    eps = x.dtype.type(eps)
    if backend == "numba":
        return ensemble_kernels.batchnorm_eval(_c(x), _c(gamma), _c(beta), _c(mean), _c(var), eps)
    inv_std = 1.0 / np.sqrt(var + eps)
    return gamma[:, None, :] * ((x - mean[:, None, :]) * inv_std[:, None, :]) + beta[:, None, :]


class SoftmaxCrossEntropyCache(NamedTuple):
    probs: np.ndarray  # (M, B, C) softmax(z), or with backend="numba" already dL_m/dz (see the forward)
    labels: np.ndarray  # (M, B)
    is_gradient: bool


def softmax_cross_entropy_forward(
    logits, labels, *, backend: str = "numpy"
) -> tuple[np.ndarray, SoftmaxCrossEntropyCache]:
    r"""Each member's mean cross-entropy: ``logits`` (M, B, C), ``labels`` (M, B).

    .. math:: L_m = -\frac1B \sum_b \log \mathrm{softmax}(z_{mb})_{y_{mb}}

    Returns ``losses (M,)`` and the cache (the numba kernel computes the gradient in the same pass).
    """
    if backend == "numba":
        losses, dlogits = ensemble_kernels.softmax_cross_entropy(_c(logits), labels.astype(np.intp, copy=False))
        return losses, SoftmaxCrossEntropyCache(dlogits, labels, True)
    with np.errstate(under="ignore"):
        shifted = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        sums = e.sum(axis=-1, keepdims=True)
        picked = np.take_along_axis(shifted, labels[..., None], axis=-1)[..., 0]
        losses = -(picked - np.log(sums[..., 0])).mean(axis=1)
        probs = e / sums
    return losses, SoftmaxCrossEntropyCache(probs, labels, False)


def softmax_cross_entropy_backward(cache: SoftmaxCrossEntropyCache) -> np.ndarray:
    r"""Backward of :func:`softmax_cross_entropy_forward` for ``dL_m / dL_m = 1`` (each member's own loss).

    .. math:: \frac{\partial L_m}{\partial z_{mb}} = \frac{\mathrm{softmax}(z_{mb}) - \mathrm{onehot}(y_{mb})}{B}

    Returns ``dlogits`` (M, B, C).
    """
    probs, labels, is_gradient = cache
    if is_gradient:
        return probs
    with np.errstate(under="ignore"):
        dlogits = probs.copy()
        picked = np.take_along_axis(dlogits, labels[..., None], axis=-1)
        np.put_along_axis(dlogits, labels[..., None], picked - 1, axis=-1)
        dlogits /= probs.shape[1]
    return dlogits
