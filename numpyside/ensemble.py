"""An ensemble of ``M`` batch-normed MLPs, batched over ``(M, B, ...)`` and differentiated by hand.
Mirror: :mod:`jaxside.ensemble` (there: ``forward_pass`` under nested ``vmap``s and ``jax.grad``).

Where ``jaxside`` adds the member axis with a ``vmap`` named ``"member"``, this module carries it
explicitly through the stacked layers of :mod:`numpyside.ensemble_layers`: stacked matrix
products, batch norm per (member, ghost batch) block or pooled over the members, and their
handwritten backward passes, in reverse order. No autodiff, no loop over members in Python.

Public API (same names, signatures and meaning as ``jaxside.ensemble``; NumPy in, NumPy out):
``loss_and_grads(params, state, images, labels, *, pool_members, ghost_batches, bn_momentum)``,
``predict_logits(params, state, images) -> (M, B, 10)``, :class:`Trainer`; each takes a keyword-only
``backend="numpy" | "numba"`` for the elementwise and reduction kernels.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from compare import ensemble_contract
from compare.contract import DEFAULT_BACKEND, check_backend
from numpyside import layers as single_model_layers
from numpyside.ensemble_layers import (
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


# ------------------------------------------------------------------------------------------------
# training: SGD with momentum, per-member learning rates and momenta, in place
# ------------------------------------------------------------------------------------------------


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
