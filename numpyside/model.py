"""The MLP 784 -> 100 -> 100 -> 100 -> 10, batched and differentiated by hand. Mirror: :mod:`jaxside.model`.

Where ``jaxside`` writes the network for one example and lets ``vmap`` add the batch and ``jax.grad``
the backward, this module takes the whole batch ``(B, 784)`` and runs the layers' handwritten
backward passes (:mod:`numpyside.layers`) in reverse order.

Public API (same names, argument order and meaning as ``jaxside.model``; NumPy in, NumPy out),
validated by :func:`compare.contract.check_inputs`:

* ``loss_and_grads(params, state, images, labels) -> (loss, grads, new_state)`` (training mode)
* ``predict_logits(params, state, images) -> logits (B, 10)`` (eval mode, running statistics)
* ``train_logits(params, state, images) -> logits (B, 10)`` (training mode, batch statistics)
* ``hidden_pre_activations(params, state, images) -> [(B, 100)] * 3`` (eval mode, each sigmoid's input)
* ``per_example_grads(params, state, images, labels, *, train=True) -> (losses, grads, new_state)`` (leaves (B, ...))

All take a keyword-only ``backend="numpy" | "numba"`` that selects the elementwise/reduction kernels:
by default the NumPy lines of :mod:`numpyside.layers` (a debugger steps from here into the lines
that ``docs/batchnorm_backward.md`` derives); the trainers and the comparison pass ``"numba"``.
"""

from __future__ import annotations

import numpy as np

from compare import contract
from numpyside import layers
from numpyside.backend import DEFAULT_LAYER_BACKEND, check_backend
from numpyside.per_example import per_example_losses_and_grads

# The model checks its whole input once (check_inputs below); past that door it calls the layers'
# unchecked forms, so that no check runs per layer and step in a training loop.
linear_forward = layers.linear_forward.unchecked
linear_backward = layers.linear_backward.unchecked
batchnorm_forward = layers.batchnorm_forward.unchecked
batchnorm_backward = layers.batchnorm_backward.unchecked
batchnorm_eval = layers.batchnorm_eval.unchecked
sigmoid_forward = layers.sigmoid_forward.unchecked
sigmoid_backward = layers.sigmoid_backward.unchecked
softmax_cross_entropy_forward = layers.softmax_cross_entropy_forward.unchecked
softmax_cross_entropy_backward = layers.softmax_cross_entropy_backward.unchecked
update_running_stats = layers.update_running_stats.unchecked


def forward(params, state, images: np.ndarray, *, train: bool, backend: str = DEFAULT_LAYER_BACKEND):
    """Logits ``(B, 10)`` of a batch, the new running statistics, and the caches for ``backward``.

    Hidden layer: ``sigmoid(batchnorm(x @ W))`` (or ``sigmoid(x @ W + b)`` with batch norm off);
    output layer: ``x @ W + b``. With ``train=True`` batch norm uses the statistics of this batch
    (over axis 0: the batched counterpart of ``jaxside``'s ``pmean`` over the named axis) and the
    running statistics are updated; with ``train=False`` it uses ``state``, returned unchanged.
    """
    x, new_state, caches, _ = hidden_layers(params, state, images, train=train, backend=backend)
    logits, output_cache = linear_forward(x, params[-1]["weight"], params[-1]["bias"])
    caches.append(output_cache)
    return logits, new_state, caches


def hidden_layers(params, state, images: np.ndarray, *, train: bool, backend: str = DEFAULT_LAYER_BACKEND):
    """The hidden layers of :func:`forward`: ``(output, new_state, caches, pre_activations)``.

    ``pre_activations[i]`` (B, n) is the input of layer ``i``'s sigmoid: ``x @ W + b``, or with
    batch norm ``gamma * x_hat + beta`` (batch statistics with ``train=True``, running ones without).
    """
    x = images
    new_state, caches, pre_activations = [], [], []
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
        pre_activations.append(x)
        x, sigmoid_cache = sigmoid_forward(x, backend=backend)
        caches.append((linear_cache, bn_cache, sigmoid_cache))
    return x, new_state, caches, pre_activations


def backward(dlogits: np.ndarray, caches: list, *, backend: str = DEFAULT_LAYER_BACKEND) -> list[dict[str, np.ndarray]]:
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


def batch_loss(params, state, images, labels, *, backend: str = DEFAULT_LAYER_BACKEND):
    r"""Mean cross-entropy over the batch (training mode) and the new running statistics.

    .. math:: L = -\tfrac1B \textstyle\sum_b \log \mathrm{softmax}(z_b)_{y_b}

    Returns ``(loss, new_state)``.
    """
    logits, new_state, _ = forward(params, state, images, train=True, backend=backend)
    loss, _ = softmax_cross_entropy_forward(logits, labels, backend=backend)
    return loss, new_state


def batch_loss_and_grads(params, state, images, labels, *, backend: str = DEFAULT_LAYER_BACKEND):
    """:func:`batch_loss` and its gradients (the forward's layers in reverse), unchecked.

    Returns ``(loss, grads, new_state)``; ``grads`` has the layout of ``params``.
    """
    logits, new_state, caches = forward(params, state, images, train=True, backend=backend)
    loss, loss_cache = softmax_cross_entropy_forward(logits, labels, backend=backend)
    dlogits = softmax_cross_entropy_backward(1, loss_cache)
    return loss, backward(dlogits, caches, backend=backend), new_state


def eval_logits(params, state, images, *, backend: str = DEFAULT_LAYER_BACKEND) -> np.ndarray:
    """Eval-mode logits ``(B, 10)`` (batch norm with the running statistics), unchecked."""
    return forward(params, state, images, train=False, backend=backend)[0]


def eval_logits_and_pre_activations(params, state, images, *, backend: str = DEFAULT_LAYER_BACKEND):
    """Eval-mode logits ``(B, 10)`` and every hidden layer's sigmoid input ``(B, 100)``, from one
    forward pass, unchecked."""
    x, _, _, pre_activations = hidden_layers(params, state, images, train=False, backend=backend)
    return linear_forward(x, params[-1]["weight"], params[-1]["bias"])[0], pre_activations


def check_inputs(params, state, images, labels=None, *, train: bool = False, backend: str = DEFAULT_LAYER_BACKEND):
    """:func:`compare.contract.check_inputs`, plus: ``backend`` must be one of ``BACKENDS``."""
    check_backend(backend)
    return contract.check_inputs(params, state, images, labels, train=train)


def _as_numpy(tree):
    """Parameters may arrive as any array type; the kernels want contiguous NumPy arrays."""
    return [{key: np.ascontiguousarray(value) for key, value in layer.items()} for layer in tree]


def loss_and_grads(params, state, images, labels, *, backend: str = DEFAULT_LAYER_BACKEND):
    """Training-mode loss, handwritten gradients (same layout as ``params``), new running stats.

    ``images`` are cast to the parameters' dtype. With batch norm off, ``state`` is ``[]`` and so
    is the returned state.
    """
    _, _, images, labels = check_inputs(params, state, images, labels, train=True, backend=backend)
    return batch_loss_and_grads(_as_numpy(params), _as_numpy(state or []), images, labels, backend=backend)


def predict_logits(params, state, images, *, backend: str = DEFAULT_LAYER_BACKEND) -> np.ndarray:
    """Eval-mode logits ``(B, 10)``: batch norm uses the running statistics in ``state``."""
    _, _, images, _ = check_inputs(params, state, images, backend=backend)
    return eval_logits(_as_numpy(params), _as_numpy(state or []), images, backend=backend)


def train_logits(params, state, images, *, backend: str = DEFAULT_LAYER_BACKEND) -> np.ndarray:
    """Training-mode logits ``(B, 10)``: batch norm uses this batch's statistics."""
    _, _, images, _ = check_inputs(params, state, images, train=True, backend=backend)
    return forward(_as_numpy(params), _as_numpy(state or []), images, train=True, backend=backend)[0]


def hidden_pre_activations(params, state, images, *, backend: str = DEFAULT_LAYER_BACKEND) -> list[np.ndarray]:
    """Eval-mode input of each hidden layer's sigmoid, ``(B, 100)`` per layer (with batch norm:
    ``gamma * x_hat + beta`` with the running statistics; without: ``x @ W + b``)."""
    _, _, images, _ = check_inputs(params, state, images, backend=backend)
    params, state = _as_numpy(params), _as_numpy(state or [])
    return eval_logits_and_pre_activations(params, state, images, backend=backend)[1]


def per_example_grads(params, state, images, labels, *, train: bool = True, backend: str = DEFAULT_LAYER_BACKEND):
    """Per-example losses ``(B,)``, gradients (leaves ``(B, *shape)``) and new running statistics.

    ``g_b`` is row ``b``'s term of the handwritten backward of ``sum_b loss_b`` (cross-entropy, not
    divided by ``B``): the mirror of ``jaxside.model.per_example_grads`` (``vmap`` of ``grad`` of one
    example's loss), see :mod:`numpyside.per_example`. ``sum_b g_b = B * loss_and_grads(...)[1]``.
    ``train=False``: running statistics, no coupling, ``state`` returned as given.
    """
    _, _, images, labels = check_inputs(params, state, images, labels, train=train, backend=backend)
    losses, grads, new_state = per_example_losses_and_grads(
        _as_numpy(params), _as_numpy(state or []), images, labels, train=train, backend=backend
    )
    return losses, grads, (new_state if train else state)
