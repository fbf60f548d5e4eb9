r"""Batched layers with handwritten backward passes, CS231n style: every ``*_forward`` returns
``(out, cache)`` and the ``*_backward`` right below it turns ``dout = dL/dout`` and the cache into
the gradients of the forward's inputs. No autodiff anywhere. ``B`` = batch, ``n`` = features.

Mirror of the per-example :mod:`jaxside.layers`: ``linear`` ↔ ``linear_forward``/``linear_backward``,
``batchnorm_train`` ↔ ``batchnorm_forward``/``batchnorm_backward`` (and ``batchnorm_backward_staged``,
node by node), ``batchnorm_eval`` ↔ ``batchnorm_eval``, ``sigmoid`` ↔ ``sigmoid_forward``/``sigmoid_backward``,
``cross_entropy`` ↔ ``softmax_cross_entropy_forward``/``softmax_cross_entropy_backward``.

Outputs keep the input's dtype. By default (:data:`DEFAULT_LAYER_BACKEND`, ``"numpy"``) the
elementwise and reduction work is the NumPy lines below, the ones ``docs/batchnorm_backward.md``
derives: a debugger that steps into a layer walks them. ``backend="numba"`` runs the same work in
the kernels of :mod:`numpyside.kernels.numba_layers` (they agree to ``compare.tolerances.NUMBA_VS_NUMPY``); the
trainers and the comparison pass it. Matrix products are BLAS either way.

Every public function checks its arguments (:mod:`numpyside.layer_checks`: dtypes, matching
shapes, a batch of two or more in training mode, the backend's name) and refuses bad ones with a
:class:`compare.contract.InputError` that names the fix. Callers that have validated their whole
input once (:mod:`numpyside.model`, the trainers) call ``layer.unchecked`` instead: no check runs
inside a training loop.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from compare.contract import BN_EPS, BN_MOMENTUM
from numpyside import layer_checks as checks
from numpyside.backend import DEFAULT_LAYER_BACKEND
from numpyside.kernels import numba_layers as kernels
from numpyside.layer_checks import checked_by


def _c(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------


class LinearCache(NamedTuple):
    x: np.ndarray  # (B, n_in)
    weight: np.ndarray  # (n_in, n_out)
    has_bias: bool


@checked_by(checks.linear_forward)
def linear_forward(x, weight, bias=None) -> tuple[np.ndarray, LinearCache]:
    r"""Affine map of a batch.

    .. math:: \text{out} = x W + b, \qquad x: (B, n_{in}),\ W: (n_{in}, n_{out}),\ b: (n_{out},)

    ``bias=None`` leaves out ``+ b``. Returns ``out`` (B, n_out) and the cache for
    :func:`linear_backward`.
    """
    out = x @ weight
    if bias is not None:
        out += bias
    return out, LinearCache(x, weight, bias is not None)


@checked_by(checks.linear_backward, cache_type=LinearCache)
def linear_backward(
    dout, cache: LinearCache, *, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    r"""Backward of :func:`linear_forward`; ``dout`` (B, n_out).

    .. math::
        dx = dout\, W^T \ (B, n_{in}), \qquad dW = x^T dout \ (n_{in}, n_{out}), \qquad
        db = \textstyle\sum_b dout_b \ (n_{out},)

    Returns ``(dx, dweight, dbias)``; ``dbias`` is None when the forward had no bias. With
    ``need_dx=False`` (the first layer, whose input is the images) ``dx`` is not computed and is None.
    """
    x, weight, has_bias = cache
    dx = dout @ weight.T if need_dx else None
    dweight = x.T @ dout
    dbias = dout.sum(axis=0) if has_bias else None
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------
# batch norm (training mode)
# --------------------------------------------------------------------------------------------


class BatchNormCache(NamedTuple):
    """The nodes of batch norm's computation graph that the backward passes need."""

    x: np.ndarray  # (B, n) input
    mean: np.ndarray  # (n,) batch mean
    centered: np.ndarray  # (B, n) x - mean
    var: np.ndarray  # (n,) BIASED batch variance, mean(centered**2)
    inv_std: np.ndarray  # (n,) 1 / sqrt(var + eps)
    x_hat: np.ndarray  # (B, n) centered * inv_std
    gamma: np.ndarray  # (n,)
    eps: np.floating  # in x's dtype


@checked_by(checks.batchnorm_forward)
def batchnorm_forward(
    x, gamma, beta, eps: float = BN_EPS, *, backend: str = DEFAULT_LAYER_BACKEND
) -> tuple[np.ndarray, BatchNormCache]:
    r"""Batch norm in training mode: per-feature statistics over the batch (axis 0).

    .. math::
        \mu = \tfrac1N \sum_b x_b, \quad c = x - \mu, \quad
        \sigma^2 = \tfrac1N \sum_b c_b^2 \ (\text{biased}), \quad
        r = 1 / \sqrt{\sigma^2 + \epsilon}, \quad \hat x = c\, r, \quad
        \text{out} = \gamma \hat x + \beta

    ``x`` (B, n) with B >= 2, ``gamma, beta`` (n,). The same sequence of operations as
    ``jaxside.layers.batchnorm_train`` (two-pass variance, ``1.0 / sqrt(var + eps)``). Returns
    ``out`` (B, n) and a :class:`BatchNormCache`, whose ``mean`` and ``var`` feed the running
    statistics.
    """
    eps = x.dtype.type(eps)
    if backend == "numba":
        out, mean, centered, var, inv_std, x_hat = kernels.batchnorm_forward(_c(x), _c(gamma), _c(beta), eps)
    else:
        mean = x.mean(axis=0)
        centered = x - mean
        var = (centered**2).mean(axis=0)
        inv_std = 1.0 / np.sqrt(var + eps)
        x_hat = centered * inv_std
        out = gamma * x_hat + beta
    return out, BatchNormCache(x, mean, centered, var, inv_std, x_hat, gamma, eps)


@checked_by(checks.batchnorm_backward, cache_type=BatchNormCache)
def batchnorm_backward(
    dout, cache: BatchNormCache, *, backend: str = DEFAULT_LAYER_BACKEND
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Backward of :func:`batchnorm_forward`, compact closed form; ``dout`` (B, n).

    .. math::
        d\beta = \textstyle\sum_b dout_b, \qquad d\gamma = \sum_b dout_b\, \hat x_b, \qquad
        dx = \frac{\gamma r}{N} \big(N\, dout - d\beta - \hat x\, d\gamma\big)

    The two column sums are the batch coupling: the gradient of one example depends on the whole
    batch through the mean and the variance (the staged form below derives it node by node).

    Conditioning at B = 2: ``x_hat = +-sqrt(var / (var + eps))`` hardly depends on ``x``, the exact
    ``dx`` is of order ``eps / var`` times ``dout``, and both forms reach it by cancelling O(1)
    terms, so its relative accuracy is about ``u * var / eps * (1 + |mean| / std)`` (``u`` the
    unit roundoff; the last factor is the rounding of ``centered = x - mean``). Measured against a
    50-digit reference over 400 random pairs: <= 1.3 (compact) and 3.4 (staged) times that. From
    B = 3 on ``dx`` is generically O(1).

    Returns ``(dx, dgamma, dbeta)``: (B, n), (n,), (n,).
    """
    n_rows = dout.shape[0]
    if backend == "numba":
        return kernels.batchnorm_backward(_c(dout), _c(cache.x_hat), _c(cache.gamma), _c(cache.inv_std))
    x_hat = cache.x_hat
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx = (cache.gamma * cache.inv_std / n_rows) * (n_rows * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


@checked_by(checks.batchnorm_backward_staged, cache_type=BatchNormCache)
def batchnorm_backward_staged(dout, cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`batchnorm_forward`, staged: one step per node of the graph, in reverse.

    Forward graph (``N`` = batch size, sums over the batch axis)::

        mean     = sum(x) / N              (n,)
        centered = x - mean                (B, n)
        sq       = centered ** 2           (B, n)
        var      = sum(sq) / N             (n,)
        inv_std  = (var + eps) ** -1/2     (n,)
        x_hat    = centered * inv_std      (B, n)
        out      = gamma * x_hat + beta    (B, n)

    ``centered`` feeds two nodes (``sq`` and ``x_hat``) and ``x`` two (``mean`` and ``centered``):
    their gradients are the sums over both paths. Algebraically equal to the compact form of
    :func:`batchnorm_backward` (which uses ``sum_b centered_b = 0``); pure NumPy, for reading.
    Returns ``(dx, dgamma, dbeta)``: (B, n), (n,), (n,).
    """
    n_rows = dout.shape[0]
    centered, inv_std, x_hat, gamma = cache.centered, cache.inv_std, cache.x_hat, cache.gamma
    # out = gamma * x_hat + beta
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    # x_hat = centered * inv_std            (first path into centered; inv_std is broadcast over rows)
    dcentered = dx_hat * inv_std
    dinv_std = (dx_hat * centered).sum(axis=0)
    # inv_std = (var + eps) ** -1/2         d/dvar = -1/2 (var + eps) ** -3/2 = -1/2 inv_std ** 3
    dvar = -0.5 * inv_std**3 * dinv_std
    # var = sum(sq) / N                     every row receives dvar / N
    dsq = np.broadcast_to(dvar / n_rows, dout.shape)
    # sq = centered ** 2                    (second path into centered)
    dcentered = dcentered + 2 * centered * dsq
    # centered = x - mean                   (first path into x; mean is broadcast over rows)
    dx = dcentered
    dmean = -dcentered.sum(axis=0)
    # mean = sum(x) / N                     (second path into x: every row receives dmean / N)
    dx = dx + dmean / n_rows
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# batch norm (eval mode)
# --------------------------------------------------------------------------------------------


@checked_by(checks.batchnorm_eval)
def batchnorm_eval(
    x, gamma, beta, mean, var, eps: float = BN_EPS, *, backend: str = DEFAULT_LAYER_BACKEND
) -> np.ndarray:
    r"""Batch norm in eval mode with the running statistics ``mean, var`` (n,); ``x`` (B, n).

    .. math::
        r = 1 / \sqrt{\text{var} + \epsilon}, \qquad \text{out} = \gamma\, ((x - \text{mean})\, r) + \beta

    Mirrors ``jaxside.layers.batchnorm_eval``. No batch coupling (any B, also 1). Returns (B, n).
    """
    eps = x.dtype.type(eps)
    if backend == "numba":
        return kernels.batchnorm_eval(_c(x), _c(gamma), _c(beta), _c(mean), _c(var), eps)
    inv_std = 1.0 / np.sqrt(var + eps)
    return gamma * ((x - mean) * inv_std) + beta


@checked_by(checks.update_running_stats)
def update_running_stats(running: dict, mean: np.ndarray, var: np.ndarray, n: int) -> dict:
    """PyTorch's rule: ``running <- (1 - m) running + m batch_stat`` with ``m = 0.1``.

    The running variance takes the *unbiased* batch variance ``var * n / (n - 1)`` (``var`` itself,
    used for normalising, is the biased one). Mirrors ``jaxside.model.update_running_stats``.
    """
    unbiased = var * np.asarray(n / (n - 1), dtype=var.dtype)
    return {
        "mean": (1 - BN_MOMENTUM) * running["mean"] + BN_MOMENTUM * mean,
        "var": (1 - BN_MOMENTUM) * running["var"] + BN_MOMENTUM * unbiased,
    }


# --------------------------------------------------------------------------------------------
# sigmoid
# --------------------------------------------------------------------------------------------


@checked_by(checks.sigmoid_forward)
def sigmoid_forward(x, *, backend: str = DEFAULT_LAYER_BACKEND) -> tuple[np.ndarray, np.ndarray]:
    r"""Logistic function, elementwise, any shape (here (B, n)).

    .. math::
        s = \frac{1}{1 + e^{-x}} =
        \begin{cases} 1 / (1 + e) & x \ge 0 \\ e / (1 + e) & x < 0 \end{cases},
        \qquad e = e^{-|x|} \in (0, 1]

    Written with ``e = exp(-|x|)`` so that nothing overflows for large ``|x|``; far out ``e``
    underflows to 0 (the intended result, not reported) and ``s`` is exactly 1 or 0. Returns
    ``s`` and the cache (``s`` itself).
    """
    if backend == "numba":
        out = kernels.sigmoid(_c(x).reshape(-1)).reshape(x.shape)
    else:
        with np.errstate(under="ignore"):
            e = np.exp(-np.abs(x))
            out = np.where(x >= 0, 1, e) / (1 + e)
    return out, out


@checked_by(checks.sigmoid_backward)
def sigmoid_backward(dout, cache: np.ndarray, *, backend: str = DEFAULT_LAYER_BACKEND) -> np.ndarray:
    r"""Backward of :func:`sigmoid_forward`: ``ds/dx = s (1 - s)``.

    .. math:: dx = dout\ s\ (1 - s)

    ``dout`` has the forward's shape; returns ``dx`` of that shape.
    """
    s = cache
    if backend == "numba":
        return kernels.sigmoid_backward(_c(dout).reshape(-1), _c(s).reshape(-1)).reshape(s.shape)
    with np.errstate(under="ignore"):  # s ~ 1e-300 far out on the left: dout * s may underflow to 0
        return dout * s * (1 - s)


# --------------------------------------------------------------------------------------------
# softmax cross-entropy (the loss)
# --------------------------------------------------------------------------------------------


class SoftmaxCrossEntropyCache(NamedTuple):
    probs: np.ndarray  # (B, C) softmax(z), or with backend="numba" already dL/dz (see the forward)
    labels: np.ndarray  # (B,)
    is_gradient: bool  # True when ``probs`` already holds dL/dz (the numba kernel computes both)


@checked_by(checks.softmax_cross_entropy_forward)
def softmax_cross_entropy_forward(
    logits, labels, *, backend: str = DEFAULT_LAYER_BACKEND
) -> tuple[np.floating, SoftmaxCrossEntropyCache]:
    r"""Mean softmax cross-entropy of ``logits`` (B, C) against integer ``labels`` (B,) in 0..C-1.

    .. math::
        L = -\frac1B \sum_b \log \mathrm{softmax}(z_b)_{y_b}, \qquad
        \log \mathrm{softmax}(z)_y = (z_y - m) - \log \textstyle\sum_j e^{z_j - m}, \quad m = \max_j z_j

    Subtracting the row maximum keeps every ``exp`` in (0, 1] (stable for logits of any size).
    Returns ``loss`` (a NumPy scalar of the logits' dtype) and the cache for the backward.
    """
    n_rows = logits.shape[0]
    if backend == "numba":  # one kernel pass gives the loss and dL/dz together
        loss, dlogits = kernels.softmax_cross_entropy(_c(logits), labels.astype(np.intp, copy=False))
        return logits.dtype.type(loss), SoftmaxCrossEntropyCache(dlogits, labels, True)
    with np.errstate(under="ignore"):
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        sums = e.sum(axis=1, keepdims=True)
        loss = -(shifted[np.arange(n_rows), labels] - np.log(sums[:, 0])).mean()
        probs = e / sums
    return loss, SoftmaxCrossEntropyCache(probs, labels, False)


@checked_by(checks.softmax_cross_entropy_backward, cache_type=SoftmaxCrossEntropyCache)
def softmax_cross_entropy_backward(dloss, cache: SoftmaxCrossEntropyCache) -> np.ndarray:
    r"""Backward of :func:`softmax_cross_entropy_forward`; ``dloss`` is the scalar ``dL_total/dL``.

    .. math:: \frac{\partial L}{\partial z_b} = \frac{\mathrm{softmax}(z_b) - \mathrm{onehot}(y_b)}{B}

    Returns ``dlogits`` (B, C) of the logits' dtype (for ``dloss = 1`` the multiplication is exact).
    """
    probs, labels, is_gradient = cache
    if is_gradient:
        return probs * probs.dtype.type(dloss)
    n_rows = probs.shape[0]
    with np.errstate(under="ignore"):
        dlogits = probs.copy()
        dlogits[np.arange(n_rows), labels] -= 1
        dlogits /= n_rows
        return dlogits * dlogits.dtype.type(dloss)


@checked_by(checks.softmax_cross_entropy)
def softmax_cross_entropy(logits, labels, *, backend: str = DEFAULT_LAYER_BACKEND) -> tuple[np.floating, np.ndarray]:
    """Forward and backward together (CS231n's ``softmax_loss``): ``(loss, dL/dlogits)``."""
    loss, cache = softmax_cross_entropy_forward.unchecked(logits, labels, backend=backend)
    return loss, softmax_cross_entropy_backward.unchecked(1, cache)
