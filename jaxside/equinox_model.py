"""The same per-example MLP written with Equinox: ``eqx.nn.Linear`` + ``eqx.nn.BatchNorm(axis_name="batch")``.

The model (:class:`MLP`) sees ONE example, as :func:`jaxside.model.forward_pass` does, and carries its
running statistics in an ``eqx.nn.State`` (built with ``eqx.nn.make_with_state``). It is batched with
``jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")``; Equinox's ``BatchNorm``
reaches across the batch with ``lax.pmean`` over that axis name, exactly as ``jaxside.layers`` does.

Public API, the same as :mod:`jaxside.model` (NumPy in, NumPy out, same input checks):
``loss_and_grads``, ``predict_logits``, ``train_logits``, :class:`Trainer`; plus :func:`from_params`
/ :func:`to_params` (our layout <-> Equinox model and state) and :func:`running_stats_difference`.

What Equinox 0.13.8's ``BatchNorm`` computes (read from ``equinox/nn/_batch_norm.py``)
=====================================================================================

Per feature, over the ``B`` examples of the named axis (``m_e`` is Equinox's ``momentum``)::

    mode="batch", training:   mu = pmean(x),  var = max(0, pmean((x - mu)^2))          (biased)
                              y  = (x - mu) / sqrt(var + eps) * gamma + beta
                              h_mu  <- m_e * h_mu  + (1 - m_e) * mu
                              h_var <- m_e * h_var + (1 - m_e) * var                     (biased!)
                              c     <- c + 1
    mode="batch", inference:  s = 1 if c == 0 else 1 - m_e**c                           (zero-debiasing)
                              y = (x - h_mu / s) / sqrt(h_var / s + eps) * gamma + beta
    fresh state:              h_mu = 0, h_var = 1, c = 0

Ours (``compare.contract``, PyTorch's convention, ``m = 0.1``)::

    training:  the same y;   r_mu  <- (1 - m) * r_mu  + m * mu
                             r_var <- (1 - m) * r_var + m * var * B / (B - 1)            (unbiased)
    eval:      y = (x - r_mu) / sqrt(r_var + eps) * gamma + beta
    fresh state: r_mu = 0, r_var = 1

What we configure, and what is left
-----------------------------------

* ``mode="batch"``: its training output is batch norm's (batch statistics, and gradients through
  them). ``mode="ema"`` (also what an unspecified ``mode`` means, with a warning) normalises, from the
  second call on, with ``(1 - m_e) * batch_stat + m_e * running_stat``, so its training output and
  gradients are not batch norm's at all (``tests/test_equinox.py`` shows this numerically).
* ``eps=1e-5`` (ours; Equinox's default is also ``1e-5``), ``momentum=0.9 = 1 - 0.1``: Equinox's
  momentum weighs the *old* statistic, PyTorch's (ours) the *new* batch statistic (Equinox's default
  0.99 would correspond to our 0.01). ``1 - 0.9`` in float64 is ``0.09999999999999998``, not
  ``0.1``, so the running mean agrees with ours to rounding (~1e-16), not bit for bit.
* Training-mode output and gradients therefore equal ours up to rounding: Equinox divides by
  ``sqrt(var + eps)`` where we multiply by its reciprocal, and ``eqx.nn.Linear`` computes ``W x``
  with ``W`` stored ``(out, in)`` (our ``weight`` transposed). ``max(0, var)`` changes nothing for a
  variance that is already >= 0.
* Zero-debiasing: our state has no counter and means "the statistics eval mode uses". So
  :func:`from_params` stores it as ``h`` with the counter at :data:`DEBIAS_OFF_COUNTER` (``2**20``;
  ``0.9**2**20`` underflows to ``0.0``, so ``s = 1`` exactly): eval mode then uses our statistics as
  they are, and each training step updates them by the EMA above. :func:`to_params` returns
  ``h / s`` (what Equinox's eval mode uses), which is ``h`` itself at that counter: the round trip is
  exact. With ``counter=0`` instead (Equinox's fresh-state behaviour) the debiasing divides the
  whole EMA, including the starting state, by ``1 - 0.9**c``: that is right for a mean that starts at
  0, but Equinox starts the variance at 1, so after ``c`` steps its eval variance is the debiased
  average of the batch variances **plus** ``0.9**c / (1 - 0.9**c)`` (``+9`` after one step,
  ``+4.3`` after two, ``<1e-3`` after 66 steps); and a non-fresh state ``S`` passed in with ``c=0``
  would weigh ``S`` by ``0.9**c / (1 - 0.9**c)``, i.e. ``9 S`` after one step.
* What no setting changes: Equinox feeds the **biased** batch variance into the running variance,
  ours the unbiased one (Bessel's ``B / (B - 1)``). After one step from ``(r_mu0, r_var0)``::

      eqx_var - 0.9 r_var0 = 0.1 var,    ours_var - 0.9 r_var0 = 0.1 var * B / (B - 1)

  so ``(ours_var - 0.9 r_var0) / (eqx_var - 0.9 r_var0) = B / (B - 1)`` (``128/127`` at the default
  batch size): :func:`loss_and_grads` returns Equinox's own new state (in our layout), which differs
  from ``jaxside``'s by exactly this, and eval-mode predictions after training differ a little.
  :func:`running_stats_difference` measures all of it on a real batch, and
  :func:`with_bessel_correction` turns Equinox's one-step state into ours.

Refusals, each in one sentence: training mode outside ``jax.vmap(..., axis_name="batch")`` raises
:class:`jaxside.layers.UnboundBatchAxisError` (Equinox's own ``NameError`` points at
``jax.shard_map``, not at ``vmap``); a batch where an image vector is expected raises
:class:`compare.contract.InputError`; two nested ``vmap``s both named ``"batch"`` raise
:class:`jaxside.layers.NestedBatchAxisError` (JAX itself accepts them silently: the inner axis
shadows the outer, and the statistics would cover the inner axis only).
"""

from __future__ import annotations

import functools
import operator
import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int

from compare import contract
from compare.contract import BN_EPS, BN_MOMENTUM, LAYER_SIZES, InputError
from jaxside.layers import (
    BATCH_AXIS,
    NestedBatchAxisError,
    UnboundBatchAxisError,
    check_batch_axis_not_shadowed,
)
from jaxside.model import check_float64_enabled

#: Equinox's ``momentum`` (weight of the OLD running statistic) that means our ``BN_MOMENTUM = 0.1``.
EQX_MOMENTUM = 1.0 - BN_MOMENTUM
#: The batch counter stored by :func:`from_params`: ``EQX_MOMENTUM ** DEBIAS_OFF_COUNTER`` is 0.0 in
#: float64 (and float32), so Equinox's eval-mode debiasing ``1 - momentum**counter`` is exactly 1.
DEBIAS_OFF_COUNTER = 2**20


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


def _require_batch_axis(axis_name: str) -> None:
    try:
        jax.lax.axis_size(axis_name)
    except NameError as error:
        raise UnboundBatchAxisError(
            f"the Equinox MLP in training mode averages batch norm's statistics over the named axis "
            f"{axis_name!r}: call it under jax.vmap(model, in_axes=(0, None), out_axes=(0, None), "
            f"axis_name={axis_name!r}) (or use eqx.nn.inference_mode(model), which needs no batch)"
        ) from error


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
        self.norms = (
            tuple(
                eqx.nn.BatchNorm(n, axis_name=axis_name, eps=BN_EPS, momentum=EQX_MOMENTUM, mode="batch", dtype=dtype)
                for n in sizes[1:-1]
            )
            if batch_norm
            else ()
        )
        self.axis_name = axis_name

    @property
    def batch_norm(self) -> bool:
        return bool(self.norms)

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
            _require_batch_axis(self.axis_name)
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
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jax.vmap(operator.getitem)(log_probs, labels)
    return -picked.mean(), state


# ----------------------------------------------------------------------------------------------
# our layout <-> Equinox
# ----------------------------------------------------------------------------------------------


@functools.cache
def _skeleton(batch_norm: bool, dtype_name: str) -> tuple[MLP, eqx.nn.State]:
    """A model and fresh state of the right structure (their values get replaced). Never ``.set`` the
    cached state itself (``State.set`` invalidates it): :func:`_clone` it first."""
    return eqx.nn.make_with_state(MLP)(batch_norm=batch_norm, dtype=np.dtype(dtype_name), key=jax.random.PRNGKey(0))


def _clone(state: eqx.nn.State) -> eqx.nn.State:
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def _assemble(params, state, *, batch_norm: bool, dtype, counter: int):
    """Our layout (NumPy or JAX arrays, or tracers) -> ``(MLP, eqx.nn.State)`` in training mode."""
    model, eqx_state = _skeleton(batch_norm, np.dtype(dtype).name)
    eqx_state = _clone(eqx_state)
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
    ours does); ``counter=0`` gives Equinox's fresh-state zero-debiasing (see the module docstring).
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


# ----------------------------------------------------------------------------------------------
# the public API shared with jaxside.model / numpyside.model
# ----------------------------------------------------------------------------------------------


@eqx.filter_jit
def _loss_and_grads(model, eqx_state, images, labels):
    (loss, new_state), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model, eqx_state, images, labels)
    return loss, _layout_params(grads), _layout_state(model, new_state)


@eqx.filter_jit
def _logits(model, eqx_state, images):
    return batched_forward(model, eqx_state, images)[0]


def _checked_inputs(params, state, images) -> tuple[bool, np.dtype, np.ndarray]:
    batch_norm, dtype = contract.check_params(params)
    check_float64_enabled(dtype)
    contract.check_state(state, batch_norm, dtype)
    return batch_norm, dtype, contract.check_images(images, dtype)


def loss_and_grads(params, state, images, labels) -> tuple[np.floating, list[dict[str, np.ndarray]], list]:
    """Training-mode loss, gradients (``eqx.filter_value_and_grad`` on the Equinox model, converted to
    the layout of ``params``), and Equinox's new running statistics in our layout (they differ from
    ``jaxside``'s by Bessel's correction, see the module docstring)."""
    batch_norm, _dtype, images = _checked_inputs(params, state, images)
    labels = contract.check_labels(labels, images.shape[0])
    if batch_norm:
        contract.check_training_batch_size(images.shape[0])
    model, eqx_state = from_params(params, state)
    loss, grads, new_state = _loss_and_grads(model, eqx_state, jnp.asarray(images), jnp.asarray(labels))
    return np.asarray(loss)[()], to_numpy(grads), to_numpy(new_state)


def predict_logits(params, state, images) -> np.ndarray:
    """Eval-mode logits ``(B, 10)`` (``eqx.nn.inference_mode``: the running statistics in ``state``)."""
    _, _, images = _checked_inputs(params, state, images)
    model, eqx_state = from_params(params, state)
    return np.asarray(_logits(eqx.nn.inference_mode(model), eqx_state, jnp.asarray(images)))


def train_logits(params, state, images) -> np.ndarray:
    """Training-mode logits ``(B, 10)`` of the batch ``images`` (batch statistics)."""
    batch_norm, _, images = _checked_inputs(params, state, images)
    if batch_norm:
        contract.check_training_batch_size(images.shape[0])
    model, eqx_state = from_params(params, state)
    return np.asarray(_logits(model, eqx_state, jnp.asarray(images)))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def _make_train_epoch(static):
    """A jitted epoch for models whose non-array part is ``static`` (see ``eqx.partition``)."""

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_epoch(params, velocity, eqx_state, images, labels, batch_indices, learning_rates, momentum):
        def step(carry, step_inputs):
            params, velocity, eqx_state = carry
            indices, lr = step_inputs
            model = eqx.combine(params, static)
            (loss, eqx_state), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(
                model, eqx_state, images[indices], labels[indices]
            )
            # SGD with momentum exactly as compare.training: v <- momentum v + g; p <- p - lr v
            velocity = jtu.tree_map(lambda v, g: momentum * v + g, velocity, grads)
            params = jtu.tree_map(lambda p, v: p - lr * v, params, velocity)
            return (params, velocity, eqx_state), loss

        (params, velocity, eqx_state), losses = jax.lax.scan(
            step, (params, velocity, eqx_state), (batch_indices, learning_rates)
        )
        return params, velocity, eqx_state, losses

    return train_epoch


@eqx.filter_jit
def _predict_classes(model, eqx_state, images) -> Int[Array, " n"]:
    return jnp.argmax(batched_forward(eqx.nn.inference_mode(model), eqx_state, images)[0], axis=-1)


class Trainer:
    """The Equinox model's trainer, with :class:`jaxside.train.Trainer`'s interface: one jitted
    ``lax.scan`` per epoch, the training set on the device, buffers donated."""

    def __init__(self, params, state, train_images, train_labels, *, momentum: float):
        _, dtype, train_images, train_labels = contract.check_training_set(params, state, train_images, train_labels)
        self.dtype = dtype
        model, self.eqx_state = from_params(params, state)
        self.params, self.static = eqx.partition(model, eqx.is_inexact_array)
        self.velocity = jtu.tree_map(jnp.zeros_like, self.params)
        self.images = jax.device_put(train_images)
        self.labels = jax.device_put(train_labels)
        self.momentum = jnp.asarray(momentum, dtype)
        self._train_epoch = _make_train_epoch(self.static)
        self._compiled = {}

    @property
    def model(self) -> MLP:
        return eqx.combine(self.params, self.static)

    def _epoch_args(self, batch_indices, learning_rates):
        return (
            self.params,
            self.velocity,
            self.eqx_state,
            self.images,
            self.labels,
            jnp.asarray(batch_indices, jnp.int32),
            jnp.asarray(learning_rates, self.dtype),
            self.momentum,
        )

    def compile(self, steps: int, batch_size: int) -> float:
        """Compile the epoch for ``steps`` batches of ``batch_size`` ahead of time; return the seconds."""
        start = time.perf_counter()
        if (steps, batch_size) not in self._compiled:
            args = self._epoch_args(np.zeros((steps, batch_size), np.int32), np.zeros(steps))
            self._compiled[steps, batch_size] = self._train_epoch.lower(*args).compile()
        return time.perf_counter() - start

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train on the given batches (``(steps, batch)`` indices), one learning rate per step; return
        the per-step losses."""
        batch_indices = np.asarray(batch_indices)
        if batch_indices.ndim != 2 or len(learning_rates) != batch_indices.shape[0]:
            raise InputError(
                f"batch_indices must be (steps, batch) with one learning rate per step, got "
                f"{batch_indices.shape} and {len(learning_rates)} rates"
            )
        if self.static.norms:
            contract.check_training_batch_size(batch_indices.shape[1])
        self.compile(*batch_indices.shape)
        self.params, self.velocity, self.eqx_state, losses = self._compiled[batch_indices.shape](
            *self._epoch_args(batch_indices, learning_rates)
        )
        return np.asarray(losses)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode class predictions (NumPy in, NumPy out)."""
        images = contract.check_images(images, self.dtype)
        return np.asarray(_predict_classes(self.model, self.eqx_state, jnp.asarray(images)))

    def params_numpy(self):
        return to_numpy(_layout_params(self.model))

    def state_numpy(self):
        return to_numpy(_layout_state(self.model, self.eqx_state))


# ----------------------------------------------------------------------------------------------
# Equinox's running statistics versus ours, measured
# ----------------------------------------------------------------------------------------------


def with_bessel_correction(eqx_new_state, old_state, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Equinox's new running statistics after ONE step from ``old_state`` on a batch of
    ``batch_size``, turned into ours: the mean as it is, the variance's batch part times ``B/(B-1)``::

        ours_var = 0.9 var0 + (eqx_var - 0.9 var0) * B / (B - 1)

    For comparing :func:`loss_and_grads`'s new state with ``jaxside``'s / ``numpyside``'s."""
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


@dataclass(frozen=True)
class RunningStatsDifference:
    """One training step on one batch, from the same ``(params, state)``, per hidden layer.

    ``ours_*``: ``jaxside`` (PyTorch rule); ``eqx_*``: Equinox as configured here (debiasing off);
    ``native_*``: Equinox's eval statistics when started with ``counter=0`` (its fresh-state
    behaviour); ``batch_mean``/``batch_var``: the batch's statistics (``var`` biased), from ``jaxside``.
    """

    batch_size: int
    var0: list[np.ndarray]
    batch_mean: list[np.ndarray]
    batch_var: list[np.ndarray]
    ours_mean: list[np.ndarray]
    ours_var: list[np.ndarray]
    eqx_mean: list[np.ndarray]
    eqx_var: list[np.ndarray]
    native_mean: list[np.ndarray]
    native_var: list[np.ndarray]

    @property
    def var_ratio(self) -> list[np.ndarray]:
        """``(ours_var - 0.9 var0) / (eqx_var - 0.9 var0)``, i.e. ``(0.1 var B/(B-1)) / (0.1 var)``, measured."""
        carried = [(1 - BN_MOMENTUM) * v0 for v0 in self.var0]
        return [(o - c) / (e - c) for o, e, c in zip(self.ours_var, self.eqx_var, carried)]


def running_stats_difference(params, state, images) -> RunningStatsDifference:
    """Run one training step of ``jaxside`` and of the Equinox model (configured as here, and with
    Equinox's fresh-state counter 0) on ``images``; return the running statistics side by side.

    Expected (module docstring): ``eqx_mean == ours_mean`` (to rounding); ``var_ratio == B/(B-1)``;
    ``native_mean == 0.9/0.1 * mean0 + batch_mean`` and ``native_var == 9 * var0 + batch_var``.
    """
    import jaxside.model as ours

    batch_norm, _dtype, images = _checked_inputs(params, state, images)
    if not batch_norm:
        raise InputError("running statistics exist only with batch norm on")
    contract.check_training_batch_size(images.shape[0])
    labels = np.zeros(images.shape[0], np.int32)  # the statistics do not depend on the labels
    _, _, ours_state = ours.loss_and_grads(params, state, images, labels)
    _, _, eqx_state = loss_and_grads(params, state, images, labels)
    model, native = from_params(params, state, counter=0)
    _, native_state = _loss_and_grads(model, native, jnp.asarray(images), jnp.asarray(labels))[1:]
    native_state = to_numpy(native_state)

    # the batch statistics themselves, from jaxside's per-example layers under vmap
    from jaxside.layers import batchnorm_train, linear, sigmoid

    def stats(x):
        out = []
        for layer in params[:-1]:
            x = linear(x, jnp.asarray(layer["weight"]))
            x, (mean, var) = batchnorm_train(x, jnp.asarray(layer["gamma"]), jnp.asarray(layer["beta"]))
            out.append((mean, var))
            x = sigmoid(x)
        return out

    batch_stats = jax.vmap(stats, axis_name=BATCH_AXIS, out_axes=None)(jnp.asarray(images))
    return RunningStatsDifference(
        batch_size=images.shape[0],
        var0=[np.asarray(s["var"]) for s in state],
        batch_mean=[np.asarray(m) for m, _ in batch_stats],
        batch_var=[np.asarray(v) for _, v in batch_stats],
        ours_mean=[s["mean"] for s in ours_state],
        ours_var=[s["var"] for s in ours_state],
        eqx_mean=[s["mean"] for s in eqx_state],
        eqx_var=[s["var"] for s in eqx_state],
        native_mean=[s["mean"] for s in native_state],
        native_var=[s["var"] for s in native_state],
    )
