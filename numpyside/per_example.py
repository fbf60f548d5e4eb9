r"""Per-example gradients by hand: the batch backward of ``sum_b loss_b``, its parameter terms kept per row.

Every parameter gradient of the network is a sum over rows of a per-row term: ``dW = sum_b
outer(x_b, dz_b)``, ``dgamma = sum_b dy_b * x_hat_b``, ``dbeta = sum_b dy_b``. Here those terms are
kept, not summed: ``g_b`` is row ``b``'s term of the backward of ``sum_b loss_b``, where the
cotangents ``dz`` flowing down are the *batch* ones (batch norm's ``dx`` couples the rows). This is
what ``jax.vmap(jax.grad(loss of one example), axis_name="batch")`` returns
(``docs/per_example_gradients.md``). Mirror: ``jaxside.model.per_example_grads``.

The forward and the coupled ``dx`` come from :mod:`numpyside.layers`; the per-row parameter terms
(``*_rows``) and eval-mode batch norm with a cache are added here. No autodiff.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from compare.contract import BN_EPS
from numpyside import layers
from numpyside.layers import BatchNormCache, LinearCache

# numpyside.model.per_example_grads has checked the input: the layers' unchecked forms from here on
batchnorm_backward = layers.batchnorm_backward.unchecked
batchnorm_forward = layers.batchnorm_forward.unchecked
linear_forward = layers.linear_forward.unchecked
sigmoid_backward = layers.sigmoid_backward.unchecked
sigmoid_forward = layers.sigmoid_forward.unchecked
update_running_stats = layers.update_running_stats.unchecked


class CrossEntropyRowsCache(NamedTuple):
    probs: np.ndarray  # (B, C) softmax(z_b) per row
    labels: np.ndarray  # (B,)


def cross_entropy_rows_forward(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, CrossEntropyRowsCache]:
    r"""Softmax cross-entropy of every row of ``logits`` (B, C): the batched ``jaxside.layers.cross_entropy``.

    .. math:: \ell_b = -\log \mathrm{softmax}(z_b)_{y_b} = \log \textstyle\sum_j e^{z_{bj} - m_b} - (z_{b y_b} - m_b)

    with ``m_b = max_j z_bj`` (every ``exp`` in (0, 1]). Returns ``losses`` (B,) and the cache.
    """
    rows = np.arange(logits.shape[0])
    with np.errstate(under="ignore"):
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        sums = e.sum(axis=1, keepdims=True)
        losses = np.log(sums[:, 0]) - shifted[rows, labels]
        probs = e / sums
    return losses, CrossEntropyRowsCache(probs, labels)


def cross_entropy_rows_backward(dlosses: np.ndarray, cache: CrossEntropyRowsCache) -> np.ndarray:
    r"""Backward of :func:`cross_entropy_rows_forward`; ``dlosses`` (B,) are the losses' cotangents.

    .. math:: \frac{\partial \ell_b}{\partial z_b} = \mathrm{softmax}(z_b) - \mathrm{onehot}(y_b)

    With ``dlosses = 1`` (the cotangent of ``sum_b loss_b``, not divided by ``B``) this is exact.
    Returns ``dlogits`` (B, C).
    """
    dlogits = cache.probs.copy()
    dlogits[np.arange(len(cache.labels)), cache.labels] -= 1
    return dlogits * dlosses[:, None]


def linear_backward_rows(dout: np.ndarray, cache: LinearCache, *, need_dx: bool = True):
    r"""Backward of ``linear_forward`` with the parameter terms per row; ``dout`` (B, n_out).

    .. math:: dx = dout\, W^T, \qquad dW_b = x_b \otimes dout_b \ (B, n_{in}, n_{out}), \qquad db_b = dout_b

    (``linear_backward``'s ``dW = x^T dout`` is ``sum_b dW_b``.) Returns ``(dx, dweight_rows,
    dbias_rows)``; ``dbias_rows`` is None without a bias, ``dx`` None with ``need_dx=False``.
    """
    dx = dout @ cache.weight.T if need_dx else None
    dweight_rows = cache.x[:, :, None] * dout[:, None, :]
    return dx, dweight_rows, (dout.copy() if cache.has_bias else None)


def batchnorm_backward_rows(dout: np.ndarray, cache: BatchNormCache, *, train: bool, backend: str):
    r"""Backward of batch norm with ``dgamma``, ``dbeta`` per row; ``dout`` (B, n).

    .. math:: d\gamma_b = dout_b\, \hat x_b, \qquad d\beta_b = dout_b

    ``dx`` is the batch's: in training mode ``numpyside.layers.batchnorm_backward`` (with its two
    coupling sums over ALL rows), in eval mode the affine map transposed, ``dx_b = gamma r dout_b``.
    Returns ``(dx, dgamma_rows, dbeta_rows)``, each (B, n).
    """
    if train:
        dx, _, _ = batchnorm_backward(dout, cache, backend=backend)
    else:
        dx = dout * (cache.gamma * cache.inv_std)
    return dx, dout * cache.x_hat, dout.copy()


def batchnorm_eval_forward(x, gamma, beta, mean, var, eps: float = BN_EPS) -> tuple[np.ndarray, BatchNormCache]:
    r"""Eval-mode batch norm (running ``mean``, ``var``) that keeps a cache for the backward.

    .. math::
        r = (\sigma^2_{run} + \epsilon)^{-1/2}, \quad \hat x = (x - \mu_{run})\, r, \quad
        \text{out} = \gamma \hat x + \beta

    The same operations as ``numpyside.layers.batchnorm_eval`` (numpy backend).
    """
    eps = x.dtype.type(eps)
    centered = x - mean
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = centered * inv_std
    return gamma * x_hat + beta, BatchNormCache(x, mean, centered, var, inv_std, x_hat, gamma, eps)


def forward(params, state, images: np.ndarray, *, train: bool, backend: str):
    """``numpyside.model.forward`` with a batch-norm cache in eval mode too (for the backward).

    Returns ``(logits, new_state, caches)``; in eval mode ``new_state`` is ``state``.
    """
    x = images
    new_state, caches = [], []
    for i, layer in enumerate(params[:-1]):
        x, linear_cache = linear_forward(x, layer["weight"], layer.get("bias"))
        bn_cache = None
        if "gamma" in layer:
            if train:
                x, bn_cache = batchnorm_forward(x, layer["gamma"], layer["beta"], backend=backend)
                new_state.append(update_running_stats(state[i], bn_cache.mean, bn_cache.var, x.shape[0]))
            else:
                x, bn_cache = batchnorm_eval_forward(
                    x, layer["gamma"], layer["beta"], state[i]["mean"], state[i]["var"]
                )
        x, sigmoid_cache = sigmoid_forward(x, backend=backend)
        caches.append((linear_cache, bn_cache, sigmoid_cache))
    logits, output_cache = linear_forward(x, params[-1]["weight"], params[-1]["bias"])
    caches.append(output_cache)
    return logits, (new_state if train else state), caches


def backward_rows(dlogits: np.ndarray, caches: list, *, train: bool, backend: str) -> list[dict[str, np.ndarray]]:
    """``numpyside.model.backward`` with every parameter gradient kept per row: leaves ``(B, *shape)``.

    ``dlogits`` is the cotangent of ``sum_b loss_b`` (not divided by ``B``); the cotangents that
    flow down are the batch's, so ``sum_b`` of each leaf is ``numpyside.model.backward``'s gradient.
    """
    grads: list[dict[str, np.ndarray]] = [{} for _ in caches]
    dx, dweight, dbias = linear_backward_rows(dlogits, caches[-1])
    grads[-1] = {"weight": dweight, "bias": dbias}
    for i in reversed(range(len(caches) - 1)):
        linear_cache, bn_cache, sigmoid_cache = caches[i]
        d = sigmoid_backward(dx, sigmoid_cache, backend=backend)
        if bn_cache is not None:
            d, grads[i]["gamma"], grads[i]["beta"] = batchnorm_backward_rows(d, bn_cache, train=train, backend=backend)
        dx, grads[i]["weight"], dbias = linear_backward_rows(d, linear_cache, need_dx=i > 0)
        if dbias is not None:
            grads[i]["bias"] = dbias
    return grads


def per_example_losses_and_grads(params, state, images, labels, *, train: bool, backend: str):
    """Per-row losses ``(B,)``, per-row gradients (leaves ``(B, *shape)``) and the new state, unchecked.

    The mirror of ``jaxside.model.per_example_losses_and_grads``; ``numpyside.model.per_example_grads``
    checks the inputs and calls this.
    """
    logits, new_state, caches = forward(params, state, images, train=train, backend=backend)
    losses, loss_cache = cross_entropy_rows_forward(logits, labels)
    dlogits = cross_entropy_rows_backward(np.ones_like(losses), loss_cache)
    return losses, backward_rows(dlogits, caches, train=train, backend=backend), new_state
