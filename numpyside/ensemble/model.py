"""An ensemble of ``M`` batch-normed MLPs, batched over ``(M, B, ...)`` and differentiated by hand.
Mirror: :mod:`jaxside.ensemble` (there: ``forward_pass`` under nested ``vmap``s and ``jax.grad``).

Where ``jaxside`` adds the member axis with a ``vmap`` named ``"member"``, this module carries it
explicitly through the stacked layers of :mod:`numpyside.ensemble.layers`: stacked matrix
products, batch norm per (member, ghost batch) block or pooled over the members, and their
handwritten backward passes, in reverse order. No autodiff, no loop over members in Python.

Public API (same names, signatures and meaning as ``jaxside.ensemble``; NumPy in, NumPy out):
``loss_and_grads(params, state, images, labels, *, pool_members, ghost_batches, bn_momentum)``,
``predict_logits(params, state, images) -> (M, B, 10)`` (the trainer is :mod:`numpyside.ensemble.train`);
each takes a keyword-only ``backend="numpy" | "numba"`` for the elementwise and reduction kernels.
"""

from __future__ import annotations

import numpy as np

from compare.contract import ensemble as ensemble_contract
from numpyside import layers as single_model_layers
from numpyside.backend import DEFAULT_BACKEND, check_backend
from numpyside.ensemble.layers import (
    batchnorm_backward,
    batchnorm_eval,
    batchnorm_forward,
    linear_backward,
    linear_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)

# the inputs are checked once, at this module's public door: the single model's sigmoid, unchecked
sigmoid_forward = single_model_layers.sigmoid_forward.unchecked
sigmoid_backward = single_model_layers.sigmoid_backward.unchecked


def update_running_stats(running: dict, mean: np.ndarray, var: np.ndarray, n: int, momentum: np.ndarray) -> dict:
    """PyTorch's rule per member and ghost batch, ``r <- (1 - m) r + m stat`` (``m`` (M,), unbiased
    variance ``var * n / (n - 1)``), then the mean over the ghost batches; ``mean, var`` (S, G, n)."""
    m = momentum[:, None, None]
    unbiased = var * np.asarray(n / (n - 1), dtype=var.dtype)
    return {
        "mean": ((1 - m) * running["mean"][:, None, :] + m * mean).mean(axis=1),
        "var": ((1 - m) * running["var"][:, None, :] + m * unbiased).mean(axis=1),
    }


def forward(
    params,
    state,
    images,
    *,
    train: bool,
    pool_members=False,
    ghost_batches=1,
    bn_momentum=None,
    backend=DEFAULT_BACKEND,
):
    """Logits ``(M, B, 10)`` of every member, the new running statistics, and the caches for ``backward``.

    ``images`` (B, 784) shared or (M, B, 784) per member. Hidden layer:
    ``sigmoid(batchnorm(x @ W))`` (or ``sigmoid(x @ W + b)``); output layer ``x @ W + b``.
    """
    x = images
    new_state, caches = [], []
    for i, layer in enumerate(params[:-1]):
        x, linear_cache = linear_forward(x, layer["weight"], layer.get("bias"))
        bn_cache = None
        if "gamma" in layer:
            if train:
                x, bn_cache = batchnorm_forward(
                    x, layer["gamma"], layer["beta"], ghost_batches=ghost_batches, pooled=pool_members, backend=backend
                )
                new_state.append(
                    update_running_stats(state[i], bn_cache.mean, bn_cache.var, bn_cache.count, bn_momentum)
                )
            else:
                x = batchnorm_eval(x, layer["gamma"], layer["beta"], state[i]["mean"], state[i]["var"], backend=backend)
                new_state.append(state[i])
        x, sigmoid_cache = sigmoid_forward(x, backend=backend)
        caches.append((linear_cache, bn_cache, sigmoid_cache))
    logits, output_cache = linear_forward(x, params[-1]["weight"], params[-1]["bias"])
    caches.append(output_cache)
    return logits, new_state, caches


def backward(dlogits: np.ndarray, caches: list, *, backend: str = DEFAULT_BACKEND) -> list[dict[str, np.ndarray]]:
    """Every member's gradients (stacked like ``params``): the forward's layers in reverse.

    ``dlogits`` is ``dL_m / dz_m`` for each member's own loss; pooled batch norm's backward then
    carries the coupling across members, so the result is the gradient of ``sum_m L_m``.
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


def batch_loss(params, state, images, labels, *, pool_members, ghost_batches, bn_momentum, backend=DEFAULT_BACKEND):
    r"""Each member's mean cross-entropy (training mode) and the new running statistics, unchecked.

    .. math:: L_m = -\tfrac1B \textstyle\sum_b \log \mathrm{softmax}(z_{mb})_{y_{mb}}

    ``labels`` (B,) shared or (M, B). Returns ``(losses (M,), new_state)``.
    """
    losses, new_state, _, _ = _forward_and_loss(
        params, state, images, labels, pool_members, ghost_batches, bn_momentum, backend
    )
    return losses, new_state


def batch_loss_and_grads(
    params, state, images, labels, *, pool_members, ghost_batches, bn_momentum, backend=DEFAULT_BACKEND
):
    """:func:`batch_loss` and its handwritten gradients, unchecked: ``(losses, grads, new_state)``.
    Pooled, each member's gradient is that of the SUM of the losses (see :func:`backward`)."""
    losses, new_state, caches, loss_cache = _forward_and_loss(
        params, state, images, labels, pool_members, ghost_batches, bn_momentum, backend
    )
    dlogits = softmax_cross_entropy_backward(loss_cache)
    return losses, backward(dlogits, caches, backend=backend), new_state


def _forward_and_loss(params, state, images, labels, pool_members, ghost_batches, bn_momentum, backend):
    logits, new_state, caches = forward(
        params,
        state,
        images,
        train=True,
        pool_members=pool_members,
        ghost_batches=ghost_batches,
        bn_momentum=bn_momentum,
        backend=backend,
    )
    losses, loss_cache = softmax_cross_entropy_forward(
        logits, np.broadcast_to(labels, logits.shape[:2]), backend=backend
    )
    return losses, new_state, caches, loss_cache


def _as_numpy(tree):
    return [{key: np.ascontiguousarray(value) for key, value in layer.items()} for layer in tree]


def loss_and_grads(
    params, state, images, labels, *, pool_members=False, ghost_batches=1, bn_momentum=None, backend=DEFAULT_BACKEND
):
    """Per-member training-mode losses ``(M,)``, handwritten gradients and new running statistics
    (stacked). Bad input raises :class:`compare.contract.InputError`."""
    check_backend(backend)
    checked = ensemble_contract.check_ensemble_inputs(
        params, state, images, labels, ghost_batches=ghost_batches, pool_members=pool_members, bn_momentum=bn_momentum
    )
    return batch_loss_and_grads(
        _as_numpy(params),
        _as_numpy(state or []),
        checked.images,
        checked.labels,
        pool_members=bool(pool_members),
        ghost_batches=checked.ghost_batches,
        bn_momentum=checked.bn_momentum,
        backend=backend,
    )


def predict_logits(params, state, images, *, backend: str = DEFAULT_BACKEND) -> np.ndarray:
    """Eval-mode logits ``(M, B, 10)`` (running statistics; independent of any ghost batching)."""
    check_backend(backend)
    images = ensemble_contract.check_ensemble_inputs(params, state, images).images
    return forward(_as_numpy(params), _as_numpy(state or []), images, train=False, backend=backend)[0]
