"""Training the per-example JAX model: SGD with momentum, a whole epoch as one jitted ``lax.scan``.

Mirror: :mod:`numpyside.train`. The epoch runs on device without host round-trips: the training
set is placed on the device once, each step gathers its batch by index inside the scan, and the
parameter, velocity and running-statistics buffers are donated so XLA updates them in place.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from compare import contract
from jaxside.model import batch_loss_and_grads, check_inputs, eval_logits, to_numpy


def sgd_momentum(params, velocity, grads, lr, momentum):
    """``v <- momentum * v + g``; ``p <- p - lr * v`` (see :mod:`compare.contract.training`)."""
    velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
    return params, velocity


@functools.partial(jax.jit, static_argnames=("loss_and_grads",), donate_argnums=(0, 1, 2))
def train_epoch(
    params,
    velocity,
    state,
    images: Float[Array, "n x"],
    labels: Int[Array, " n"],
    batch_indices: Int[Array, "steps batch"],
    learning_rates: Float[Array, " steps"],
    momentum: Float[Array, ""],
    *,
    loss_and_grads=batch_loss_and_grads,
):
    """One epoch: ``lax.scan`` of (gather batch, ``loss_and_grads``, SGD step) over ``batch_indices``,
    step ``k`` with learning rate ``learning_rates[k]``.

    ``loss_and_grads(params, state, images, labels) -> (loss, grads, new_state)`` is the model's
    (``jaxside.model.batch_loss_and_grads`` by default). Returns the new ``(params, velocity, state)``
    and the per-step training losses.
    """

    def step(carry, step_inputs):
        params, velocity, state = carry
        indices, lr = step_inputs
        loss, grads, state = loss_and_grads(params, state, images[indices], labels[indices])
        params, velocity = sgd_momentum(params, velocity, grads, lr, momentum)
        return (params, velocity, state), loss

    (params, velocity, state), losses = jax.lax.scan(step, (params, velocity, state), (batch_indices, learning_rates))
    return params, velocity, state, losses


@functools.partial(jax.jit, static_argnames=("logits",))
def predict_classes(params, state, images, *, logits=eval_logits) -> Int[Array, " n"]:
    """Eval-mode predicted class of every image; ``logits(params, state, images)`` is the model's."""
    return jnp.argmax(logits(params, state, images), axis=-1)


class Trainer:
    """Holds the device copies of the data and the training buffers; one ``epoch()`` per call.

    ``params``/``state`` go in as NumPy (shared layout) and come out as NumPy via ``params_numpy()``.
    A different JAX model (``jaxside.equinox_model.Trainer``) overrides :meth:`to_device`, the two
    model functions and the two ``*_numpy`` methods; the epoch machinery stays this one.
    """

    #: the model's unchecked ``(params, state, images, labels) -> (loss, grads, new_state)``
    loss_and_grads = staticmethod(batch_loss_and_grads)
    #: the model's unchecked eval-mode ``(params, state, images) -> logits``
    eval_logits = staticmethod(eval_logits)

    def __init__(self, params, state, train_images, train_labels, *, momentum: float):
        self.batch_norm, dtype, train_images, train_labels = check_inputs(params, state, train_images, train_labels)
        self.dtype = dtype
        self.params, self.state = self.to_device(params, list(state or []))
        self.velocity = jax.tree_util.tree_map(jnp.zeros_like, self.params)
        self.images = jax.device_put(train_images)
        self.labels = jax.device_put(train_labels)
        self.momentum = jnp.asarray(momentum, dtype)
        self._compiled = {}

    def to_device(self, params, state):
        """The training buffers: our layout as JAX arrays of the parameters' dtype."""
        as_jax = lambda a: jnp.array(a, dtype=self.dtype)  # noqa: E731
        return jax.tree_util.tree_map(as_jax, params), jax.tree_util.tree_map(as_jax, state)

    def _epoch_args(self, batch_indices, learning_rates):
        return (
            self.params,
            self.velocity,
            self.state,
            self.images,
            self.labels,
            jnp.asarray(batch_indices, jnp.int32),
            jnp.asarray(learning_rates, self.dtype),
            self.momentum,
        )

    def compile(self, steps: int, batch_size: int) -> float:
        """Compile the epoch for ``steps`` batches of ``batch_size`` ahead of time (so that epoch
        timings measure training, not XLA's compiler); return the seconds it took."""
        start = time.perf_counter()
        if (steps, batch_size) not in self._compiled:
            args = self._epoch_args(np.zeros((steps, batch_size), np.int32), np.zeros(steps))
            lowered = train_epoch.lower(*args, loss_and_grads=self.loss_and_grads)
            self._compiled[steps, batch_size] = lowered.compile()
        return time.perf_counter() - start

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train on the given batches (``(steps, batch)`` indices) with one learning rate per step;
        return the per-step losses."""
        batch_indices, learning_rates = contract.check_epoch_plan(
            batch_indices, learning_rates, len(self.images), self.batch_norm, self.dtype
        )
        self.compile(*batch_indices.shape)
        self.params, self.velocity, self.state, losses = self._compiled[batch_indices.shape](
            *self._epoch_args(batch_indices, learning_rates)
        )
        return np.asarray(losses)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode class predictions for ``images`` (NumPy in, NumPy out)."""
        images = contract.check_images(images, self.dtype)
        return np.asarray(predict_classes(self.params, self.state, jnp.asarray(images), logits=self.eval_logits))

    def params_numpy(self):
        return to_numpy(self.params)

    def state_numpy(self):
        return to_numpy(self.state)
