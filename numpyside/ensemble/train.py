"""Training an ensemble by hand: SGD with momentum, per-member learning rates and momenta, in place.

Mirror: :class:`jaxside.ensemble.Trainer` (same interface); the single model's counterpart is
:mod:`numpyside.train`. Each step is :func:`numpyside.ensemble.model.batch_loss_and_grads`.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from compare.contract import ensemble as ensemble_contract
from numpyside.backend import DEFAULT_BACKEND, check_backend
from numpyside.ensemble.model import batch_loss_and_grads, forward


def sgd_momentum(params, velocity, grads, lr, momentum) -> None:
    """Per member ``k``: ``v <- momentum_k v + g``; ``p <- p - lr_k v`` (``lr``, ``momentum`` (M,)), in place."""
    for p_layer, v_layer, g_layer in zip(params, velocity, grads):
        for key, p in p_layer.items():
            v = v_layer[key]
            shape = (-1,) + (1,) * (p.ndim - 1)
            np.multiply(v, momentum.reshape(shape), out=v)
            np.add(v, g_layer[key], out=v)
            p -= lr.reshape(shape) * v


def train_epoch(
    params, velocity, state, images, labels, batch_indices, learning_rates, momentum, bn_momentum, **options
):
    """One epoch for all members: (gather batch, forward, handwritten backward, SGD step) per row of
    ``batch_indices`` (``(steps, B)`` shared or ``(steps, M, B)``), learning rates ``(steps, M)``.

    Updates ``params`` and ``velocity`` in place; returns the new ``state`` and the losses ``(steps, M)``.
    """
    losses = np.empty(learning_rates.shape, dtype=images.dtype)
    for k, (indices, lr) in enumerate(zip(batch_indices, learning_rates)):
        losses[k], grads, state = batch_loss_and_grads(
            params, state, images[indices], labels[indices], bn_momentum=bn_momentum, **options
        )
        sgd_momentum(params, velocity, grads, lr, momentum)
    return state, losses


def _members(tree, members: slice):
    """Views of ``members`` in a stacked tree (in-place updates reach the whole stack)."""
    return [{key: value[members] for key, value in layer.items()} for layer in tree]


class Trainer:
    """All members' buffers and the training set; one ``epoch()`` per call. Same interface as
    ``jaxside.ensemble.Trainer`` (per-member ``momentum``, ``bn_momentum`` and learning rates).

    ``threads > 1`` (members not pooled): the members are split into that many contiguous groups,
    each group trains the whole epoch in its own thread with single-threaded BLAS: the parallelism
    moves from inside each small product to across members. The members are independent, so they
    train as with ``threads=1`` under single-threaded BLAS: bit for bit with per-member batches;
    with a shared batch the first layer multiplies a group's weights side by side, and OpenBLAS may
    round a column differently in a narrower product (tested against a stated tolerance).
    """

    def __init__(
        self,
        params,
        state,
        train_images,
        train_labels,
        *,
        momentum,
        bn_momentum=None,
        pool_members: bool = False,
        ghost_batches: int = 1,
        backend: str = DEFAULT_BACKEND,
        threads: int = 1,
    ):
        check_backend(backend)
        threads = ensemble_contract.check_positive_int(threads, "threads")
        setup = ensemble_contract.check_training_setup(
            params,
            state,
            train_images,
            train_labels,
            momentum=momentum,
            bn_momentum=bn_momentum,
            pool_members=pool_members,
            ghost_batches=ghost_batches,
        )
        dtype = setup.dtype
        self.n_members, self.dtype, self.backend = setup.n_members, dtype, backend
        self.images, self.labels = setup.images, setup.labels
        self.pool_members, self.ghost_batches = setup.pool_members, setup.ghost_batches
        self.momentum, self.bn_momentum = setup.momentum, setup.bn_momentum
        self.threads = 1 if setup.pool_members else min(int(threads), setup.n_members)
        self.params = [{k: np.array(v, dtype=dtype) for k, v in layer.items()} for layer in params]
        self.velocity = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in self.params]
        self.state = [{k: np.array(v, dtype=dtype) for k, v in layer.items()} for layer in (state or [])]

    def compile(self, steps: int, batch_size: int, *, per_member_batches: bool = False) -> float:
        """One throw-away forward and backward so numba compiles its kernels; return the seconds."""
        start = time.perf_counter()
        indices = np.arange(batch_size) % len(self.images)
        images = self.images[indices]
        if per_member_batches:
            images = np.broadcast_to(images, (self.n_members, *images.shape))
        batch_loss_and_grads(self.params, self.state, images, self.labels[indices], **self._options(batch_size))
        self.predict(self.images[:2])
        return time.perf_counter() - start

    def _options(self, batch_size: int) -> dict:
        ghost_batches = ensemble_contract.check_ghost_batches(
            self.ghost_batches, batch_size, self.pool_members, bool(self.state)
        )
        return dict(
            pool_members=self.pool_members,
            ghost_batches=ghost_batches,
            bn_momentum=self.bn_momentum,
            backend=self.backend,
        )

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train every member on its batches; return the per-step losses ``(steps, M)``."""
        batch_indices, rates = ensemble_contract.check_epoch(
            batch_indices, learning_rates, self.n_members, len(self.images)
        )
        options = self._options(batch_indices.shape[-1])
        bn_momentum = options.pop("bn_momentum")
        rates = rates.astype(self.dtype)

        def train_members(members: slice):
            indices = batch_indices[:, members] if batch_indices.ndim == 3 else batch_indices
            return train_epoch(
                _members(self.params, members),
                _members(self.velocity, members),
                _members(self.state, members),
                self.images,
                self.labels,
                indices,
                rates[:, members],
                self.momentum[members],
                bn_momentum[members],
                **options,
            )

        if self.threads == 1:
            self.state, losses = train_members(slice(None))
            return losses
        bounds = np.linspace(0, self.n_members, self.threads + 1).round().astype(int)
        groups = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(groups)) as pool:
            results = list(pool.map(train_members, groups))
        self.state = [
            {key: np.concatenate([state[i][key] for state, _ in results]) for key in layer}
            for i, layer in enumerate(self.state)
        ]
        return np.concatenate([losses for _, losses in results], axis=1)

    def predict_logits(self, images) -> np.ndarray:
        """Eval-mode logits ``(M, n, 10)`` of shared images ``(n, 784)``."""
        images, _, _ = ensemble_contract.check_ensemble_batch(images, None, self.n_members, self.dtype)
        return forward(self.params, self.state, images, train=False, backend=self.backend)[0]

    def predict(self, images) -> np.ndarray:
        """Eval-mode class predictions ``(M, n)``."""
        return np.argmax(self.predict_logits(images), axis=-1)

    def params_numpy(self):
        return [{k: v.copy() for k, v in layer.items()} for layer in self.params]

    def state_numpy(self):
        return [{k: v.copy() for k, v in layer.items()} for layer in self.state]
