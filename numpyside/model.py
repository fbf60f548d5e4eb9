"""The MLP 784 -> 100 -> 100 -> 100 -> 10, batched and differentiated by hand. Mirror: :mod:`jaxside.model`.

Where ``jaxside`` writes the network for one example and lets ``vmap`` add the batch and ``jax.grad``
the backward, this module takes the whole batch ``(B, 784)`` and runs the layers' handwritten
backward passes (:mod:`numpyside.layers`) in reverse order.

Public API (same names, signatures and meaning as ``jaxside.model``; NumPy in, NumPy out):

* ``loss_and_grads(params, state, images, labels) -> (loss, grads, new_state)`` (training mode)
* ``predict_logits(params, state, images) -> logits (B, 10)`` (eval mode, running statistics)

Both take a keyword-only ``backend="numpy" | "numba"`` that selects the elementwise/reduction kernels
(the matrix products are BLAS either way).
"""

from __future__ import annotations

import numpy as np

from compare import contract
from compare.contract import BN_MOMENTUM, InputError
from numpyside.layers import (
    BACKENDS,
    batchnorm_backward,
    batchnorm_eval,
    batchnorm_forward,
    linear_backward,
    linear_forward,
    sigmoid_backward,
    sigmoid_forward,
    softmax_cross_entropy,
)

DEFAULT_BACKEND = "numba"


def update_running_stats(running: dict, mean: np.ndarray, var: np.ndarray, n: int) -> dict:
    """PyTorch's rule: ``running <- (1 - m) running + m batch_stat`` with ``m = 0.1``.

    The running variance takes the *unbiased* batch variance ``var * n / (n - 1)`` (``var`` itself,
    used for normalising, is the biased one).
    """
    unbiased = var * np.asarray(n / (n - 1), dtype=var.dtype)
    return {
        "mean": (1 - BN_MOMENTUM) * running["mean"] + BN_MOMENTUM * mean,
        "var": (1 - BN_MOMENTUM) * running["var"] + BN_MOMENTUM * unbiased,
    }


def forward(params, state, images: np.ndarray, *, train: bool, backend: str = DEFAULT_BACKEND):
    """Logits ``(B, 10)`` of a batch, the new running statistics, and the caches for ``backward``.

    Hidden layer: ``sigmoid(batchnorm(x @ W))`` (or ``sigmoid(x @ W + b)`` with batch norm off);
    output layer: ``x @ W + b``. With ``train=True`` batch norm uses the statistics of this batch
    (over axis 0: the batched counterpart of ``jaxside``'s ``pmean`` over the named axis) and the
    running statistics are updated; with ``train=False`` it uses ``state``, returned unchanged.
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
                x = batchnorm_eval(x, layer["gamma"], layer["beta"], state[i]["mean"], state[i]["var"], backend=backend)
                new_state.append(state[i])
        x, sigmoid_cache = sigmoid_forward(x, backend=backend)
        caches.append((linear_cache, bn_cache, sigmoid_cache))
    logits, output_cache = linear_forward(x, params[-1]["weight"], params[-1]["bias"])
    caches.append(output_cache)
    return logits, new_state, caches


def backward(dlogits: np.ndarray, caches: list, *, backend: str = DEFAULT_BACKEND) -> list[dict[str, np.ndarray]]:
    """Gradients of every parameter, in the layout of ``params``: the forward's layers in reverse.

    Per hidden layer (reverse order): ``sigmoid_backward`` -> ``batchnorm_backward`` (gives
    ``dgamma``, ``dbeta``) -> ``linear_backward`` (gives ``dweight`` and the gradient that flows on
    to the previous layer). The first layer's input gradient (w.r.t. the images) is not needed.
    """
    grads: list[dict[str, np.ndarray]] = [{} for _ in caches]
    dx, dweight, dbias = linear_backward(dlogits, caches[-1])
    grads[-1] = {"weight": dweight, "bias": dbias}
    for i in reversed(range(len(caches) - 1)):
        linear_cache, bn_cache, sigmoid_cache = caches[i]
        d = sigmoid_backward(dx, sigmoid_cache, backend=backend)
        if bn_cache is not None:
            d, grads[i]["gamma"], grads[i]["beta"] = batchnorm_backward(d, bn_cache, backend=backend)
        dx, grads[i]["weight"], dbias = linear_backward(d, linear_cache, need_dx=i > 0)
        if dbias is not None:
            grads[i]["bias"] = dbias
    return grads


def batch_loss(params, state, images, labels, *, backend: str = DEFAULT_BACKEND):
    """Mean cross-entropy over the batch (training mode), its gradient w.r.t. the logits, the new
    running statistics, and the caches: ``L = -(1/B) sum_b log softmax(z_b)[y_b]``."""
    logits, new_state, caches = forward(params, state, images, train=True, backend=backend)
    loss, dlogits = softmax_cross_entropy(logits, labels, backend=backend)
    return loss, dlogits, new_state, caches


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _checked_inputs(params, state, images) -> tuple[bool, np.dtype, np.ndarray]:
    batch_norm, dtype = contract.check_params(params)
    contract.check_state(state, batch_norm, dtype)
    return batch_norm, dtype, contract.check_images(images, dtype)


def _as_numpy(tree):
    """Parameters may arrive as any array type; the kernels want contiguous NumPy arrays."""
    return [{key: np.ascontiguousarray(value) for key, value in layer.items()} for layer in tree]


def loss_and_grads(params, state, images, labels, *, backend: str = DEFAULT_BACKEND):
    """Training-mode loss, handwritten gradients (same layout as ``params``), new running stats.

    ``images`` are cast to the parameters' dtype. With batch norm off, ``state`` is ``[]`` and so
    is the returned state.
    """
    _check_backend(backend)
    batch_norm, _dtype, images = _checked_inputs(params, state, images)
    labels = contract.check_labels(labels, images.shape[0])
    if batch_norm:
        contract.check_training_batch_size(images.shape[0])
    params, state = _as_numpy(params), _as_numpy(state or [])
    loss, dlogits, new_state, caches = batch_loss(params, state, images, labels, backend=backend)
    return loss, backward(dlogits, caches, backend=backend), new_state


def predict_logits(params, state, images, *, backend: str = DEFAULT_BACKEND) -> np.ndarray:
    """Eval-mode logits ``(B, 10)``: batch norm uses the running statistics in ``state``."""
    _check_backend(backend)
    _, _, images = _checked_inputs(params, state, images)
    return forward(_as_numpy(params), _as_numpy(state or []), images, train=False, backend=backend)[0]
