"""The MLP 784 -> 100 -> 100 -> 100 -> 10, written for ONE example; ``vmap`` adds the batch.

``forward_pass`` never sees a batch axis. ``jax.vmap(forward_pass, axis_name="batch")`` maps it
over a batch, and batch norm reaches across that batch only through ``pmean`` on the axis name.
``jax.grad`` of the vmapped loss gives the gradients. Mirror: :mod:`numpyside.model`.

Public API (shared with ``numpyside.model``, same names, argument order and meaning; NumPy in,
NumPy out), validated by :func:`compare.contract.check_inputs`:

* ``loss_and_grads(params, state, images, labels) -> (loss, grads, new_state)`` (training mode)
* ``predict_logits(params, state, images) -> logits (B, 10)`` (eval mode, running statistics)
* ``train_logits(params, state, images) -> logits (B, 10)`` (training mode, batch statistics)
* ``hidden_pre_activations(params, state, images) -> [(B, 100)] * 3`` (eval mode, each sigmoid's input)
* ``per_example_grads(params, state, images, labels, *, train=True) -> (losses, grads, new_state)`` (leaves (B, ...))
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from compare import contract
from compare.contract import BN_MOMENTUM, InputError
from jaxside import transforms
from jaxside.layers import BATCH_AXIS, batch_size, batchnorm_eval, batchnorm_train, cross_entropy, linear, sigmoid

Params = list[dict[str, Float[Array, "..."]]]
State = list[dict[str, Float[Array, " n"]]]


def update_running_stats(
    running: dict[str, Float[Array, " n"]],
    mean: Float[Array, " n"],
    var: Float[Array, " n"],
    n: Int[Array, ""],
    momentum: float | Float[Array, ""] = BN_MOMENTUM,
) -> dict[str, Float[Array, " n"]]:
    """PyTorch's rule: ``running <- (1 - m) running + m batch_stat`` with ``m = momentum`` (0.1).

    The running variance takes the *unbiased* batch variance ``var * n / (n - 1)`` (``var`` itself,
    used for normalising, is the biased one).
    """
    unbiased = var * jnp.asarray(n / (n - 1), dtype=var.dtype)
    return {
        "mean": (1 - momentum) * running["mean"] + momentum * mean,
        "var": (1 - momentum) * running["var"] + momentum * unbiased,
    }


def forward_pass(
    params: Params,
    state: State,
    image_vector: Float[Array, " x"],
    *,
    train: bool,
    axis_name: str | tuple[str, ...] = BATCH_AXIS,
    bn_momentum: float | Float[Array, ""] = BN_MOMENTUM,
) -> tuple[Float[Array, " classes"], State]:
    """Logits of ONE image and the new running statistics.

    Hidden layer: ``sigmoid(batchnorm(x @ W))`` (or ``sigmoid(x @ W + b)`` with batch norm off);
    output layer: ``x @ W + b``. With ``train=True`` batch norm uses the batch statistics (via
    ``pmean``, so this must run under ``jax.vmap(..., axis_name="batch")``) and returns the updated
    running statistics; with ``train=False`` it uses ``state`` and returns it unchanged.

    ``axis_name`` is the vmapped axis (or tuple of axes) the statistics cover and ``bn_momentum``
    the running statistics' momentum (may be traced); :mod:`jaxside.ensemble` sets them, and
    :mod:`jaxside.parallel` uses ``("device", "batch")`` for batch norm synchronised across devices.
    """
    if image_vector.ndim != 1:
        raise InputError(
            f"forward_pass takes ONE image vector of shape (784,), got shape {image_vector.shape}; "
            "for a batch use jax.vmap(forward_pass, in_axes=(None, None, 0), axis_name='batch')"
        )
    x, new_state, _ = hidden_layers(
        params, state, image_vector, train=train, axis_name=axis_name, bn_momentum=bn_momentum
    )
    logits = linear(x, params[-1]["weight"], params[-1]["bias"])
    assert logits.ndim == 1, logits.shape
    return logits, new_state


def hidden_layers(
    params: Params,
    state: State,
    image_vector: Float[Array, " x"],
    *,
    train: bool,
    axis_name: str | tuple[str, ...] = BATCH_AXIS,
    bn_momentum: float | Float[Array, ""] = BN_MOMENTUM,
) -> tuple[Float[Array, " n"], State, list[Float[Array, " n"]]]:
    """The hidden layers of :func:`forward_pass` for ONE image: ``(output, new_state, pre_activations)``.

    ``pre_activations[i]`` is the input of layer ``i``'s sigmoid: ``x @ W + b``, or with batch norm
    ``gamma * x_hat + beta`` (batch statistics with ``train=True``, running ones without).
    """
    x = image_vector
    new_state, pre_activations = [], []
    for i, layer in enumerate(params[:-1]):
        x = linear(x, layer["weight"], layer.get("bias"))
        if "gamma" in layer:
            if train:
                x, (mean, var) = batchnorm_train(x, layer["gamma"], layer["beta"], axis_name=axis_name)
                new_state.append(update_running_stats(state[i], mean, var, batch_size(axis_name), bn_momentum))
            else:
                x = batchnorm_eval(x, layer["gamma"], layer["beta"], state[i]["mean"], state[i]["var"])
                new_state.append(state[i])
        pre_activations.append(x)
        x = sigmoid(x)
    return x, new_state, pre_activations


def example_loss(
    params: Params,
    state: State,
    image_vector: Float[Array, " x"],
    label: Int[Array, ""],
    *,
    train: bool,
    axis_name: str | tuple[str, ...] = BATCH_AXIS,
    bn_momentum: float | Float[Array, ""] = BN_MOMENTUM,
) -> tuple[Float[Array, ""], State]:
    """Cross-entropy of ONE example and the new running statistics: ``forward_pass``, then ``cross_entropy``."""
    logits, new_state = forward_pass(
        params, state, image_vector, train=train, axis_name=axis_name, bn_momentum=bn_momentum
    )
    return cross_entropy(logits, label), new_state


def batched_forward(
    params: Params, state: State, images: Float[Array, "batch x"], *, train: bool
) -> tuple[Float[Array, "batch classes"], State]:
    """``forward_pass`` vmapped over the batch (:func:`jaxside.transforms.batch_apply`). The running
    statistics are batch-invariant (they come out of ``pmean``), so they leave the ``vmap`` unbatched."""
    return transforms.batch_apply(functools.partial(forward_pass, train=train))(params, state, images)


def batch_loss(
    params: Params, state: State, images: Float[Array, "batch x"], labels: Int[Array, " batch"]
) -> tuple[Float[Array, ""], State]:
    r"""Mean cross-entropy over the batch (training mode) and the new running statistics:
    :func:`jaxside.transforms.batch_loss` of :func:`example_loss`.

    .. math:: L = -\tfrac1B \textstyle\sum_b \log \mathrm{softmax}(z_b)_{y_b}

    Returns ``(loss, new_state)``.
    """
    return transforms.batch_loss(functools.partial(example_loss, train=True))(params, state, images, labels)


@jax.jit
def batch_loss_and_grads(params: Params, state: State, images, labels) -> tuple[Float[Array, ""], Params, State]:
    """:func:`batch_loss` and its ``jax.grad`` gradients, unchecked (jitted).

    Returns ``(loss, grads, new_state)``; ``grads`` has the layout of ``params``.
    """
    return transforms.with_grads(batch_loss)(params, state, images, labels)


@jax.jit
def eval_logits(params: Params, state: State, images: Float[Array, "batch x"]) -> Float[Array, "batch classes"]:
    """Eval-mode logits ``(B, 10)`` (batch norm with the running statistics), unchecked (jitted)."""
    return batched_forward(params, state, images, train=False)[0]


@jax.jit
def eval_logits_and_pre_activations(
    params: Params, state: State, images: Float[Array, "batch x"]
) -> tuple[Float[Array, "batch classes"], list[Float[Array, "batch n"]]]:
    """Eval-mode logits ``(B, 10)`` and every hidden layer's sigmoid input ``(B, 100)``, from one
    forward pass, unchecked (jitted)."""

    def one_example(image_vector):
        x, _, pre_activations = hidden_layers(params, state, image_vector, train=False)
        return linear(x, params[-1]["weight"], params[-1]["bias"]), pre_activations

    return jax.vmap(one_example)(images)


def check_float64_enabled(dtype: np.dtype) -> None:
    """Refuse float64 when JAX's 64-bit mode is off: JAX would silently compute in float32."""
    if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
        raise InputError(
            "float64 parameters need JAX's 64-bit mode, which is off: call "
            "jax.config.update('jax_enable_x64', True) before the first JAX computation "
            "(without it JAX would silently compute in float32)"
        )


def check_inputs(params, state, images, labels=None, *, train: bool = False):
    """:func:`compare.contract.check_inputs`, plus: float64 needs JAX's 64-bit mode."""
    checked = contract.check_inputs(params, state, images, labels, train=train)
    check_float64_enabled(checked[1])
    return checked


def to_numpy(tree: Any) -> Any:
    """Device arrays to NumPy arrays, keeping the list-of-dicts layout."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def loss_and_grads(params, state, images, labels) -> tuple[np.floating, list[dict[str, np.ndarray]], list]:
    """Training-mode loss, ``jax.grad`` gradients (same layout as ``params``), new running stats.

    Inputs may be NumPy or JAX arrays; outputs are NumPy. ``images`` are cast to the parameters'
    dtype. With batch norm off, ``state`` is ``[]`` and so is the returned state.
    """
    _, _, images, labels = check_inputs(params, state, images, labels, train=True)
    loss, grads, new_state = batch_loss_and_grads(params, list(state or []), images, labels)
    return np.asarray(loss)[()], to_numpy(grads), to_numpy(new_state)


def predict_logits(params, state, images) -> np.ndarray:
    """Eval-mode logits ``(B, 10)``: batch norm uses the running statistics in ``state``."""
    _, _, images, _ = check_inputs(params, state, images)
    return np.asarray(eval_logits(params, list(state or []), images))


def hidden_pre_activations(params, state, images) -> list[np.ndarray]:
    """Eval-mode input of each hidden layer's sigmoid, ``(B, 100)`` per layer (with batch norm:
    ``gamma * x_hat + beta`` with the running statistics; without: ``x @ W + b``)."""
    _, _, images, _ = check_inputs(params, state, images)
    return to_numpy(eval_logits_and_pre_activations(params, list(state or []), images)[1])


_jitted_batched_forward = jax.jit(batched_forward, static_argnames="train")


def train_logits(params, state, images) -> np.ndarray:
    """Training-mode logits ``(B, 10)``: batch norm uses this batch's statistics."""
    _, _, images, _ = check_inputs(params, state, images, train=True)
    return np.asarray(_jitted_batched_forward(params, list(state or []), images, train=True)[0])


@functools.partial(jax.jit, static_argnames="train")
def per_example_losses_and_grads(params: Params, state: State, images, labels, *, train: bool):
    """:func:`jaxside.transforms.per_example_grads` of :func:`example_loss`, unchecked (jitted).

    Returns ``(losses (B,), grads, new_state)``; every leaf of ``grads`` is ``(B, *shape)``.
    """
    return transforms.per_example_grads(functools.partial(example_loss, train=train))(params, state, images, labels)


def per_example_grads(params, state, images, labels, *, train: bool = True):
    """Per-example losses ``(B,)``, gradients (leaves ``(B, *shape)``) and new running statistics.

    ``jax.vmap(jax.grad(example_loss), axis_name="batch")`` (:func:`jaxside.transforms.per_example_grads`).
    With batch norm in training mode ``g_b`` is the per-row term of the batch backward of ``sum_b loss_b`` (every
    example's backward receives the coupling sums of all examples' cotangents), so
    ``sum_b g_b = B * loss_and_grads(...)[1]``; see ``docs/per_example_gradients.md``.
    ``train=False``: running statistics, no coupling, ``state`` returned as given.
    """
    _, _, images, labels = check_inputs(params, state, images, labels, train=train)
    losses, grads, new_state = per_example_losses_and_grads(params, list(state or []), images, labels, train=train)
    return np.asarray(losses), to_numpy(grads), (to_numpy(new_state) if train else state)
