r"""Batch norm synchronised by hand over ``D`` shards in one process. Mirror: :mod:`jaxside.parallel`.

The batch is split into ``D`` blocks of consecutive examples ("shards", the devices of the JAX
side). Each shard runs the layers of :mod:`numpyside.layers` on its own rows; the shards meet only
in :class:`AllReduce`, a sum over shards that counts its calls (the ``psum`` over ``"device"`` of
the JAX side). Per batch-norm layer, with ``N`` the whole batch:

* forward, 2 all-reduces: ``mu = sum_d sum(x_d) / N``, then ``var = sum_d sum((x_d - mu)^2) / N``
  (two passes: the variance is summed from centred values, never as ``E[x^2] - E[x]^2``);
* backward, 2 all-reduces: the coupling sums ``dbeta = sum_d sum(dout_d)`` and
  ``dgamma = sum_d sum(dout_d * x_hat_d)``; then each shard's
  ``dx_d = gamma r / N (N dout_d - dbeta - x_hat_d dgamma)`` on its own rows.

The weight gradients and the loss are summed over shards at the end, as JAX sums them over ``"device"``.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np

from compare import contract
from compare.contract import BN_EPS, InputError
from numpyside import layers

# the inputs are checked once, at this module's public door: the layers' unchecked forms from here on
linear_backward = layers.linear_backward.unchecked
linear_forward = layers.linear_forward.unchecked
sigmoid_backward = layers.sigmoid_backward.unchecked
sigmoid_forward = layers.sigmoid_forward.unchecked
update_running_stats = layers.update_running_stats.unchecked
softmax_cross_entropy = layers.softmax_cross_entropy.unchecked

#: When an all-reduce happens: in the forward, in the backward, or at the end of the step.
FORWARD, BACKWARD, END = "forward", "backward", "end of step"
#: What it is for: batch norm's statistics and coupling sums, or the shards' shares of the loss and
#: of the gradients.
BATCH_NORM, LOSS_AND_GRADIENTS = "batch norm", "loss and gradients"


class AllReduce:
    """Sum over shards, the only communication between them; remembers every call."""

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []  # (phase, purpose, what)

    def __call__(self, partials: list[np.ndarray], *, phase: str, purpose: str, what: str) -> np.ndarray:
        self.calls.append((phase, purpose, what))
        total = np.array(partials[0], copy=True)
        for partial in partials[1:]:
            total += partial
        return total

    def counts(self) -> Counter:
        """``Counter((phase, purpose) -> number of all-reduces)``."""
        return Counter((phase, purpose) for phase, purpose, _ in self.calls)


class SyncBatchNormCache(NamedTuple):
    mean: np.ndarray  # (n,) mean over all shards' rows
    var: np.ndarray  # (n,) BIASED variance over all rows
    inv_std: np.ndarray  # (n,) 1 / sqrt(var + eps)
    x_hat: list[np.ndarray]  # per shard (B_d, n)
    gamma: np.ndarray  # (n,)
    n_total: int  # N, the rows of all shards


def sync_batchnorm_forward(xs: list[np.ndarray], gamma, beta, all_reduce: AllReduce, eps: float = BN_EPS):
    r"""Batch norm in training mode over the rows of all shards ``xs`` (each (B_d, n)).

    .. math::
        \mu = \tfrac1N \textstyle\sum_d \sum_{b} x_{d,b}, \quad
        \sigma^2 = \tfrac1N \sum_d \sum_b (x_{d,b} - \mu)^2, \quad
        \hat x_d = (x_d - \mu) / \sqrt{\sigma^2 + \epsilon}, \quad \text{out}_d = \gamma \hat x_d + \beta

    Two all-reduces; the rest is each shard's own rows. Returns the outputs per shard and the cache.
    """
    n_total = sum(len(x) for x in xs)
    eps = xs[0].dtype.type(eps)
    mean = all_reduce([x.sum(axis=0) for x in xs], phase=FORWARD, purpose=BATCH_NORM, what="sum x") / n_total
    centered = [x - mean for x in xs]
    var = (
        all_reduce([(c * c).sum(axis=0) for c in centered], phase=FORWARD, purpose=BATCH_NORM, what="sum (x - mu)^2")
        / n_total
    )
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = [c * inv_std for c in centered]
    return [gamma * xh + beta for xh in x_hat], SyncBatchNormCache(mean, var, inv_std, x_hat, gamma, n_total)


def sync_batchnorm_backward(douts: list[np.ndarray], cache: SyncBatchNormCache, all_reduce: AllReduce):
    r"""Backward of :func:`sync_batchnorm_forward`; ``douts`` per shard (B_d, n).

    .. math::
        d\beta = \textstyle\sum_d \sum_b dout_{d,b}, \qquad
        d\gamma = \sum_d \sum_b dout_{d,b}\, \hat x_{d,b}, \qquad
        dx_d = \frac{\gamma r}{N} \big(N\, dout_d - d\beta - \hat x_d\, d\gamma\big)

    The two coupling sums are all-reduced (they are also the gradients of ``beta`` and ``gamma``);
    each shard then computes its rows of ``dx``. Returns ``(dxs, dgamma, dbeta)``.
    """
    n = cache.n_total
    dbeta = all_reduce([d.sum(axis=0) for d in douts], phase=BACKWARD, purpose=BATCH_NORM, what="sum dout")
    dgamma = all_reduce(
        [(d * xh).sum(axis=0) for d, xh in zip(douts, cache.x_hat)],
        phase=BACKWARD,
        purpose=BATCH_NORM,
        what="sum dout * x_hat",
    )
    scale = cache.gamma * cache.inv_std / n
    return [scale * (n * d - dbeta - xh * dgamma) for d, xh in zip(douts, cache.x_hat)], dgamma, dbeta


def split_batch(images: np.ndarray, shards: int) -> list[np.ndarray]:
    """``D`` blocks of consecutive rows, as ``jaxside.parallel`` gives them to the devices."""
    if len(images) % shards:
        raise InputError(f"a batch of {len(images)} examples cannot be split evenly over {shards} shards")
    return np.split(images, shards)


def forward(params, state, shards: list[np.ndarray], all_reduce: AllReduce, *, backend: str = "numpy"):
    """Training-mode logits per shard, the new running statistics and the caches for :func:`backward`."""
    xs, new_state, caches = shards, [], []
    for i, layer in enumerate(params[:-1]):
        linear = [linear_forward(x, layer["weight"], layer.get("bias")) for x in xs]
        xs = [out for out, _ in linear]
        bn_cache = None
        if "gamma" in layer:
            xs, bn_cache = sync_batchnorm_forward(xs, layer["gamma"], layer["beta"], all_reduce)
            new_state.append(update_running_stats(state[i], bn_cache.mean, bn_cache.var, bn_cache.n_total))
        sigmoid = [sigmoid_forward(x, backend=backend) for x in xs]
        xs = [out for out, _ in sigmoid]
        caches.append(([c for _, c in linear], bn_cache, [c for _, c in sigmoid]))
    output = [linear_forward(x, params[-1]["weight"], params[-1]["bias"]) for x in xs]
    caches.append([c for _, c in output])
    return [logits for logits, _ in output], new_state, caches


def backward(dlogits: list[np.ndarray], caches, all_reduce: AllReduce, *, backend: str = "numpy"):
    """Gradients (layout of ``params``): each shard's backward on its rows, batch norm's coupling
    sums all-reduced on the way, every weight and bias gradient all-reduced at the end."""

    def summed(parts, what):
        return all_reduce(parts, phase=END, purpose=LOSS_AND_GRADIENTS, what=what)

    grads = [{} for _ in caches]
    output = [linear_backward(d, c) for d, c in zip(dlogits, caches[-1])]
    dxs = [dx for dx, _, _ in output]
    partial_grads = [{"weight": [dw for _, dw, _ in output], "bias": [db for _, _, db in output]}]
    for i in reversed(range(len(caches) - 1)):
        linear_caches, bn_cache, sigmoid_caches = caches[i]
        ds = [sigmoid_backward(dx, c, backend=backend) for dx, c in zip(dxs, sigmoid_caches)]
        if bn_cache is not None:
            ds, grads[i]["gamma"], grads[i]["beta"] = sync_batchnorm_backward(ds, bn_cache, all_reduce)
        linear = [linear_backward(d, c, need_dx=i > 0) for d, c in zip(ds, linear_caches)]
        dxs = [dx for dx, _, _ in linear]
        partial_grads.insert(0, {"weight": [dw for _, dw, _ in linear]})
        if linear[0][2] is not None:
            partial_grads[0]["bias"] = [db for _, _, db in linear]
    for i, parts in enumerate(partial_grads):
        for key, values in parts.items():
            grads[i][key] = summed(values, f"grad layer {i} {key}")
    return grads


def loss_and_grads(params, state, images, labels, *, shards: int, all_reduce: AllReduce | None = None):
    """The synchronised training step of ``jaxside.parallel.loss_and_grads`` over ``shards`` blocks
    of the batch, by hand: ``(loss, grads, new_state)``, equal to ``numpyside.model.loss_and_grads``
    on the whole batch to rounding. Pass an :class:`AllReduce` to see the all-reduces it made."""
    _, dtype, images, labels = contract.check_inputs(params, state, images, labels, train=True)
    all_reduce = AllReduce() if all_reduce is None else all_reduce
    params = [{k: np.ascontiguousarray(v, dtype) for k, v in layer.items()} for layer in params]
    state = [{k: np.asarray(v, dtype) for k, v in layer.items()} for layer in state or []]
    image_shards, label_shards = split_batch(images, shards), split_batch(labels, shards)
    logits, new_state, caches = forward(params, state, image_shards, all_reduce)
    losses, dlogits = [], []
    share = dtype.type(1 / shards)  # each shard's loss is a mean over its B/D rows: weight it by (B/D)/B
    for z, y in zip(logits, label_shards):
        loss, dz = softmax_cross_entropy(z, y, backend="numpy")
        losses.append(np.asarray(loss * share))
        dlogits.append(dz * share)
    loss = all_reduce(losses, phase=END, purpose=LOSS_AND_GRADIENTS, what="loss")
    return loss[()], backward(dlogits, caches, all_reduce), new_state
