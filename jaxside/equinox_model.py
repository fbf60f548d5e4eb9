"""The same per-example MLP written with Equinox: ``eqx.nn.Linear`` + ``eqx.nn.BatchNorm(axis_name="batch")``.

The model (:class:`MLP`) sees ONE example, as :func:`jaxside.model.forward_pass` does, and carries its
running statistics in an ``eqx.nn.State``. It is batched with ``jax.vmap(model, in_axes=(0, None),
out_axes=(0, None), axis_name="batch")``; Equinox's ``BatchNorm`` reaches across the batch with
``lax.pmean`` over that axis name, exactly as ``jaxside.layers`` does.

Public API, the same as :mod:`jaxside.model` (NumPy in, NumPy out, the same input checks):
``loss_and_grads``, ``predict_logits``, ``train_logits``, :class:`Trainer` (``jaxside.train``'s, with
this model); plus :func:`from_params` / :func:`to_params` (our layout <-> Equinox model and state) and
:func:`with_bessel_correction`. Configured ``mode="batch"``, ``momentum=0.9``: training output and
gradients equal ours to rounding; the running variance differs by Bessel's ``B/(B-1)`` and Equinox
de-biases its running averages. What Equinox computes and why: ``docs/equinox.md``.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from compare import contract
from compare.contract import BN_EPS, BN_MOMENTUM, LAYER_SIZES, InputError
from jaxside import train
from jaxside.layers import (
    BATCH_AXIS,
    NestedBatchAxisError,
    UnboundBatchAxisError,
    check_batch_axis_not_shadowed,
    cross_entropy,
)
from jaxside.model import check_inputs

#: Equinox's ``momentum`` (weight of the OLD running statistic) that means our ``BN_MOMENTUM = 0.1``.
EQX_MOMENTUM = 1.0 - BN_MOMENTUM
#: The batch counter stored by :func:`from_params`: ``EQX_MOMENTUM ** DEBIAS_OFF_COUNTER`` is 0.0 in
#: float64 (and float32), so Equinox's eval-mode debiasing ``1 - momentum**counter`` is exactly 1.
DEBIAS_OFF_COUNTER = 2**20


# the model


class MLP(eqx.Module):
    """784 -> 100 -> 100 -> 100 -> 10 for ONE example: ``sigmoid(BatchNorm(W x))`` per hidden layer
    (``sigmoid(W x + b)`` with batch norm off), then ``W x + b``."""

    linears: tuple[eqx.nn.Linear, ...]
    norms: tuple[eqx.nn.BatchNorm, ...]
    axis_name: str = eqx.field(static=True)

    def __init__(self, *, batch_norm: bool = True, dtype=jnp.float32, key, axis_name: str = BATCH_AXIS):
        sizes = LAYER_SIZES
        keys = jax.random.split(key, len(sizes) - 1)
        last = len(sizes) - 2
        self.linears = tuple(
            eqx.nn.Linear(sizes[i], sizes[i + 1], use_bias=(i == last or not batch_norm), dtype=dtype, key=keys[i])
            for i in range(len(sizes) - 1)
        )
        self.norms = tuple(
            eqx.nn.BatchNorm(n, axis_name=axis_name, eps=BN_EPS, momentum=EQX_MOMENTUM, mode="batch", dtype=dtype)
            for n in (sizes[1:-1] if batch_norm else ())
        )
        self.axis_name = axis_name

    @property
    def training(self) -> bool:
        """Whether batch norm uses the batch's statistics (and so needs the ``vmap`` axis): True unless
        ``eqx.nn.inference_mode`` switched it off, False with batch norm off."""
        return any(not norm.inference for norm in self.norms)

    def __call__(
        self, x: Float[Array, " 784"], state: eqx.nn.State, *, key=None
    ) -> tuple[Float[Array, " 10"], eqx.nn.State]:
        if x.ndim != 1:
            raise InputError(
                f"the Equinox MLP takes ONE image vector of shape (784,), got shape {x.shape}; for a batch use "
                f"jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name={self.axis_name!r})"
            )
        if self.training:
            try:
                jax.lax.axis_size(self.axis_name)
            except NameError as error:
                raise UnboundBatchAxisError(
                    f"the Equinox MLP in training mode averages batch norm's statistics over the named axis "
                    f"{self.axis_name!r}: call it under jax.vmap(model, in_axes=(0, None), out_axes=(0, None), "
                    f"axis_name={self.axis_name!r}) (or use eqx.nn.inference_mode(model), which needs no batch)"
                ) from error
            check_batch_axis_not_shadowed(x, self.axis_name)
        for i, linear in enumerate(self.linears[:-1]):
            x = linear(x)
            if self.norms:
                x, state = self.norms[i](x, state)
            x = jax.nn.sigmoid(x)
        return self.linears[-1](x), state


def batched_forward(model: MLP, state: eqx.nn.State, images: Float[Array, "batch 784"]):
    """``model`` vmapped over the batch; the state leaves the ``vmap`` unbatched (it comes out of
    ``pmean``). Refuses to run inside an enclosing ``vmap`` that already binds the axis name."""
    try:
        jax.lax.axis_size(model.axis_name)
    except NameError:
        pass  # the normal case: we are about to bind it
    else:
        raise NestedBatchAxisError(
            f"batched_forward binds the vmap axis name {model.axis_name!r}, which an enclosing jax.vmap already "
            f"binds and which JAX would silently let the inner one shadow: give the outer vmap a different "
            f"axis_name (e.g. 'batches')"
        )
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name=model.axis_name)(images, state)


def batch_loss(model: MLP, state: eqx.nn.State, images, labels):
    """Mean cross-entropy of the batch (``model``'s mode), as :func:`jaxside.model.batch_loss`."""
    logits, state = batched_forward(model, state, images)
    return jax.vmap(cross_entropy)(logits, labels).mean(), state


# our layout <-> Equinox


@functools.cache
def _skeleton(batch_norm: bool, dtype_name: str) -> tuple[MLP, eqx.nn.State]:
    """A model and fresh state of the right structure (their values get replaced). ``State.set``
    invalidates the state it is called on, so :func:`_assemble` sets a copy of the cached one."""
    return eqx.nn.make_with_state(MLP)(batch_norm=batch_norm, dtype=np.dtype(dtype_name), key=jax.random.PRNGKey(0))


def _assemble(params, state, *, batch_norm: bool, dtype, counter: int):
    """Our layout (NumPy or JAX arrays, or tracers) -> ``(MLP, eqx.nn.State)`` in training mode."""
    model, cached_state = _skeleton(batch_norm, np.dtype(dtype).name)
    eqx_state = jtu.tree_unflatten(*reversed(jtu.tree_flatten(cached_state)))
    as_jax = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
    linears = []
    for linear, layer in zip(model.linears, params):
        linear = eqx.tree_at(lambda lin: lin.weight, linear, as_jax(layer["weight"]).T)  # ours (in, out)
        if linear.bias is not None:
            linear = eqx.tree_at(lambda lin: lin.bias, linear, as_jax(layer["bias"]))
        linears.append(linear)
    norms = []
    for norm, layer, stats in zip(model.norms, params, state or []):
        norms.append(
            eqx.tree_at(lambda bn: (bn.weight, bn.bias), norm, (as_jax(layer["gamma"]), as_jax(layer["beta"])))
        )
        eqx_state = eqx_state.set(norm.batch_state_index, (as_jax(stats["mean"]), as_jax(stats["var"])))
        eqx_state = eqx_state.set(norm.batch_counter, jnp.full_like(eqx_state.get(norm.batch_counter), counter))
    model = eqx.tree_at(lambda m: (m.linears, m.norms), model, (tuple(linears), tuple(norms)))
    return model, eqx_state


def _layout_params(model: MLP) -> list[dict]:
    """The arrays of ``model`` (or of a gradient pytree shaped like it) in our params layout."""
    params = []
    for i, linear in enumerate(model.linears):
        layer = {"weight": linear.weight.T}
        if i < len(model.norms):
            layer.update(gamma=model.norms[i].weight, beta=model.norms[i].bias)
        else:
            layer["bias"] = linear.bias
        params.append(layer)
    return params


def _layout_state(model: MLP, eqx_state: eqx.nn.State) -> list[dict]:
    """The running statistics Equinox's eval mode uses, ``h / s`` with ``s = 1 if c == 0 else
    1 - momentum**c`` (its own expression), in our state layout."""
    state = []
    for norm in model.norms:
        counter = eqx_state.get(norm.batch_counter)
        mean, var = eqx_state.get(norm.batch_state_index)
        scale = jnp.where(counter == 0, 1, 1 - norm.momentum**counter)
        state.append({"mean": (mean / scale).astype(mean.dtype), "var": (var / scale).astype(var.dtype)})
    return state


def to_numpy(tree):
    """Device arrays to (writable, C-contiguous) NumPy arrays, keeping the list-of-dicts layout."""
    return jtu.tree_map(lambda a: np.ascontiguousarray(np.asarray(a)), jax.device_get(tree))


def from_params(params, state, *, dtype=None, counter: int | None = None) -> tuple[MLP, eqx.nn.State]:
    """Our ``params``/``state`` layout -> ``(model, eqx_state)`` (model in training mode).

    ``dtype`` defaults to the parameters' dtype. ``counter`` is Equinox's batch counter to store:
    by default :data:`DEBIAS_OFF_COUNTER`, so that Equinox's eval mode uses ``state`` as it is (as
    ours does); ``counter=0`` gives Equinox's fresh-state zero-debiasing (see ``docs/equinox.md``).
    """
    batch_norm, params_dtype = contract.check_params(params)
    contract.check_state(state, batch_norm, params_dtype)
    dtype = params_dtype if dtype is None else np.dtype(dtype)
    if dtype not in contract.SUPPORTED_DTYPES:
        raise InputError(f"dtype must be float32 or float64, got {dtype}")
    counter = DEBIAS_OFF_COUNTER if counter is None else int(counter)
    if counter < 0:
        raise InputError(f"counter must be >= 0, got {counter}")
    return _assemble(params, list(state or []), batch_norm=batch_norm, dtype=dtype, counter=counter)


def to_params(model: MLP, eqx_state: eqx.nn.State) -> tuple[list[dict], list[dict]]:
    """``(model, eqx_state)`` -> ``(params, state)`` in our layout, as NumPy arrays. ``state`` holds
    the statistics Equinox's eval mode uses (``h / (1 - momentum**c)``, or ``h`` at ``c = 0``)."""
    return to_numpy(_layout_params(model)), to_numpy(_layout_state(model, eqx_state))


@eqx.filter_jit
def _loss_and_grads(model, eqx_state, images, labels):
    (loss, new_state), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model, eqx_state, images, labels)
    return loss, _layout_params(grads), _layout_state(model, new_state)


@eqx.filter_jit
def _logits(model, eqx_state, images):
    return batched_forward(model, eqx_state, images)[0]


def loss_and_grads(params, state, images, labels) -> tuple[np.floating, list[dict[str, np.ndarray]], list]:
    """Training-mode loss, gradients (``eqx.filter_value_and_grad`` on the Equinox model, converted to
    the layout of ``params``), and Equinox's new running statistics in our layout (they differ from
    ``jaxside``'s by Bessel's correction, see ``docs/equinox.md``)."""
    _, _, images, labels = check_inputs(params, state, images, labels, train=True)
    model, eqx_state = from_params(params, state)
    loss, grads, new_state = _loss_and_grads(model, eqx_state, jnp.asarray(images), jnp.asarray(labels))
    return np.asarray(loss)[()], to_numpy(grads), to_numpy(new_state)


def predict_logits(params, state, images) -> np.ndarray:
    """Eval-mode logits ``(B, 10)`` (``eqx.nn.inference_mode``: the running statistics in ``state``)."""
    _, _, images, _ = check_inputs(params, state, images)
    model, eqx_state = from_params(params, state)
    return np.asarray(_logits(eqx.nn.inference_mode(model), eqx_state, jnp.asarray(images)))


def train_logits(params, state, images) -> np.ndarray:
    """Training-mode logits ``(B, 10)`` of the batch ``images`` (batch statistics)."""
    _, _, images, _ = check_inputs(params, state, images, train=True)
    model, eqx_state = from_params(params, state)
    return np.asarray(_logits(model, eqx_state, jnp.asarray(images)))


# training: jaxside.train's machinery, with the Equinox model's trainable arrays as the parameters


def _partitioned_loss_and_grads(static, trainable, eqx_state, images, labels):
    """``(loss, grads, new_state)`` with ``grads`` shaped like ``trainable`` (``eqx.partition``'s)."""
    model = eqx.combine(trainable, static)
    (loss, eqx_state), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model, eqx_state, images, labels)
    return loss, grads, eqx_state


def _partitioned_eval_logits(static, trainable, eqx_state, images):
    return batched_forward(eqx.nn.inference_mode(eqx.combine(trainable, static)), eqx_state, images)[0]


class Trainer(train.Trainer):
    """:class:`jaxside.train.Trainer` (one jitted ``lax.scan`` per epoch, the same SGD) training the
    Equinox model: the parameters are its trainable arrays (``eqx.partition``), the state an ``eqx.nn.State``."""

    def to_device(self, params, state):
        model, eqx_state = from_params(params, state)
        trainable, self.static = eqx.partition(model, eqx.is_inexact_array)
        self.loss_and_grads = functools.partial(_partitioned_loss_and_grads, self.static)
        self.eval_logits = functools.partial(_partitioned_eval_logits, self.static)
        return trainable, eqx_state

    @property
    def model(self) -> MLP:
        return eqx.combine(self.params, self.static)

    def params_numpy(self):
        return to_numpy(_layout_params(self.model))

    def state_numpy(self):
        return to_numpy(_layout_state(self.model, self.state))


def with_bessel_correction(eqx_new_state, old_state, batch_size: int) -> list[dict[str, np.ndarray]]:
    r"""Equinox's new running statistics after ONE step from ``old_state`` on a batch of
    ``batch_size``, turned into ours (for comparing :func:`loss_and_grads`'s new state with ``jaxside``'s):
    the mean as it is, the variance's batch part times ``B/(B-1)``.

    .. math:: v_{ours} = 0.9\, v_0 + (v_{eqx} - 0.9\, v_0) \cdot B / (B - 1)
    """
    n = int(batch_size)
    if n < 2:
        raise InputError(f"batch_size must be at least 2, got {n}")
    out = []
    for new, old in zip(eqx_new_state, old_state):
        var = np.asarray(new["var"])
        carried = (1 - BN_MOMENTUM) * np.asarray(old["var"], var.dtype)
        bessel = np.asarray(n / (n - 1), var.dtype)
        out.append({"mean": np.asarray(new["mean"]), "var": (carried + (var - carried) * bessel).astype(var.dtype)})
    return out
