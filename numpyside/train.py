"""Training the handwritten model: SGD with momentum, one Python loop over an epoch's batches.

Mirror: :mod:`jaxside.train` (same ``Trainer`` interface, same update rule, same batch order).
Inputs are validated once, by the ``Trainer`` (:mod:`compare.contract`).
The SGD update works in place on the parameter and velocity buffers.
"""

from __future__ import annotations

import time

import numpy as np

from compare import contract
from numpyside.backend import DEFAULT_BACKEND
from numpyside.model import batch_loss_and_grads, check_inputs, eval_logits


def sgd_momentum(params, velocity, grads, lr, momentum) -> None:
    """``v <- momentum * v + g``; ``p <- p - lr * v`` (see :mod:`compare.contract.training`), in place."""
    for p_layer, v_layer, g_layer in zip(params, velocity, grads):
        for key, p in p_layer.items():
            v = v_layer[key]
            np.multiply(v, momentum, out=v)
            np.add(v, g_layer[key], out=v)
            p -= lr * v


def train_epoch(params, velocity, state, images, labels, batch_indices, learning_rates, momentum, *, backend):
    """One epoch: (gather batch, forward, handwritten backward, SGD step) for every row of
    ``batch_indices``, step ``k`` with learning rate ``learning_rates[k]``.

    Updates ``params`` and ``velocity`` in place; returns the new ``state`` and the per-step losses.
    """
    losses = np.empty(len(batch_indices), dtype=images.dtype)
    for k, (indices, lr) in enumerate(zip(batch_indices, learning_rates)):
        loss, grads, state = batch_loss_and_grads(params, state, images[indices], labels[indices], backend=backend)
        sgd_momentum(params, velocity, grads, lr, momentum)
        losses[k] = loss
    return state, losses


class Trainer:
    """Holds the training set and the training buffers; one ``epoch()`` per call.

    Same interface as ``jaxside.train.Trainer``.
    """

    def __init__(self, params, state, train_images, train_labels, *, momentum: float, backend: str = DEFAULT_BACKEND):
        self.batch_norm, dtype, self.images, self.labels = check_inputs(
            params, state, train_images, train_labels, backend=backend
        )
        self.dtype = dtype
        self.backend = backend
        self.params = [{k: np.array(v, dtype=dtype) for k, v in layer.items()} for layer in params]
        self.velocity = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in self.params]
        self.state = [{k: np.array(v, dtype=dtype) for k, v in layer.items()} for layer in (state or [])]
        self.momentum = dtype.type(momentum)

    def compile(self, steps: int, batch_size: int) -> float:
        """Run one throw-away step so numba compiles its kernels for this dtype before timing
        starts (nothing is updated); return the seconds it took."""
        start = time.perf_counter()
        indices = np.arange(batch_size) % len(self.images)
        batch_loss_and_grads(self.params, self.state, self.images[indices], self.labels[indices], backend=self.backend)
        self.predict(self.images[:2])
        return time.perf_counter() - start

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train on the given batches (``(steps, batch)`` indices) with one learning rate per step;
        return the per-step losses."""
        batch_indices, learning_rates = contract.check_epoch_plan(
            batch_indices, learning_rates, len(self.images), self.batch_norm, self.dtype
        )
        self.state, losses = train_epoch(
            self.params,
            self.velocity,
            self.state,
            self.images,
            self.labels,
            batch_indices,
            learning_rates,
            self.momentum,
            backend=self.backend,
        )
        return losses

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode class predictions for ``images``."""
        images = contract.check_images(images, self.dtype)
        return np.argmax(eval_logits(self.params, self.state, images, backend=self.backend), axis=-1)

    def params_numpy(self):
        return [{k: v.copy() for k, v in layer.items()} for layer in self.params]

    def state_numpy(self):
        return [{k: v.copy() for k, v in layer.items()} for layer in self.state]
