r"""Classic wrong batch-norm backwards, and three other plausible bugs, defined in one place.

Each :class:`Mistake` is a piece of :mod:`numpyside.model` replaced by a wrong version. The
equivalence tests (``tests/test_equivalence.py``) put every one in place and check that the
comparison with JAX catches it; ``python -m compare.mistakes`` shows what each batch-norm mistake
does to the gradient and to training. Both read this module, so they cannot drift apart.

The batch-norm mistakes, against the correct compact form (``docs/batchnorm_backward.md`` §3)

.. math:: dx = \frac{\gamma r}{N}\Big(N\, dy - \textstyle\sum_b dy_b - \hat x \sum_b dy_b\, \hat x_b\Big)

are written as that form with the mistake made, each next to the term it loses. A backward here
takes ``(dout, cache)`` like :func:`numpyside.layers.batchnorm_backward` and is plain NumPy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from compare.contract import BN_EPS
from numpyside import model
from numpyside.layers import BatchNormCache

# The correct pieces, taken before anything is replaced (a replacement must not call itself).
_correct_forward = model.forward
_correct_batchnorm_forward = model.batchnorm_forward
_correct_batchnorm_backward = model.batchnorm_backward
_correct_update_running_stats = model.update_running_stats


def _compact(dout, gamma, inv_std, x_hat, coupling_mean, coupling_var):
    """The compact form with the two coupling sums given: ``(gamma r / N)(N dout - s1 - x_hat s2)``."""
    n_rows = dout.shape[0]
    return (gamma * inv_std / n_rows) * (n_rows * dout - coupling_mean - x_hat * coupling_var)


def mean_held_constant(dout, cache: BatchNormCache, *, backend: str = "numpy"):
    """The mean's dependence on ``x`` dropped: ``mu`` treated as a constant, so steps 10-11 of the
    staged backward (and the ``- sum dy`` term) are missing."""
    dbeta, dgamma = dout.sum(axis=0), (dout * cache.x_hat).sum(axis=0)
    return _compact(dout, cache.gamma, cache.inv_std, cache.x_hat, 0.0, dgamma), dgamma, dbeta


def variance_held_constant(dout, cache: BatchNormCache, *, backend: str = "numpy"):
    """The variance's dependence on ``x`` dropped: ``sigma^2`` treated as a constant, so steps 5-8
    (and the ``- x_hat sum dy x_hat`` term) are missing."""
    dbeta, dgamma = dout.sum(axis=0), (dout * cache.x_hat).sum(axis=0)
    return _compact(dout, cache.gamma, cache.inv_std, cache.x_hat, dbeta, 0.0), dgamma, dbeta


def variance_over_n_minus_1(dout, cache: BatchNormCache, *, backend: str = "numpy"):
    """``1/(N-1)`` against ``1/N``: step 7 hands each row ``dvar / (N - 1)``, the unbiased variance's
    count, while the forward divided by ``N``; the variance term comes out ``N / (N - 1)`` too big."""
    n_rows = dout.shape[0]
    dbeta, dgamma = dout.sum(axis=0), (dout * cache.x_hat).sum(axis=0)
    dx = _compact(dout, cache.gamma, cache.inv_std, cache.x_hat, dbeta, dgamma * (n_rows / (n_rows - 1)))
    return dx, dgamma, dbeta


def eps_left_out(dout, cache: BatchNormCache, *, backend: str = "numpy"):
    """``eps`` left out of the backward: it recomputes ``r = 1 / sqrt(var)`` and ``x_hat = c r``,
    where the forward used ``1 / sqrt(var + eps)``. Off by about ``eps / (2 var)``."""
    inv_std = 1.0 / np.sqrt(cache.var)
    x_hat = cache.centered * inv_std
    dbeta, dgamma = dout.sum(axis=0), (dout * x_hat).sum(axis=0)
    return _compact(dout, cache.gamma, inv_std, x_hat, dbeta, dgamma), dgamma, dbeta


def sums_over_every_axis(dout, cache: BatchNormCache, *, backend: str = "numpy"):
    """``dgamma``, ``dbeta`` summed over the wrong axes: ``dout.sum()`` without ``axis=0``, one
    number for every feature, which NumPy broadcasts without a word (and the compact ``dx`` reuses
    both sums as its coupling sums). ``axis=1`` instead fails on the shapes, unless ``B == n``."""
    total_dbeta, total_dgamma = dout.sum(), (dout * cache.x_hat).sum()
    dx = _compact(dout, cache.gamma, cache.inv_std, cache.x_hat, total_dbeta, total_dgamma)
    return dx, np.full_like(cache.gamma, total_dgamma), np.full_like(cache.gamma, total_dbeta)


def both_held_constant(dout, cache: BatchNormCache, *, backend: str = "numpy"):
    """Both couplings dropped: ``dx = gamma r dout``, the eval-mode backward in training mode."""
    _, dgamma, dbeta = _correct_batchnorm_backward(dout, cache, backend=backend)
    return cache.gamma * cache.inv_std * dout, dgamma, dbeta


def with_running_statistics(cache: BatchNormCache, running_mean, running_var) -> BatchNormCache:
    """The cache of the training-mode forward with the running statistics in place of the batch's."""
    inv_std = 1.0 / np.sqrt(running_var + cache.eps)
    centered = cache.x - running_mean
    return cache._replace(
        mean=running_mean, centered=centered, var=running_var, inv_std=inv_std, x_hat=centered * inv_std
    )


def running_statistics_in_backward(dout, cache: BatchNormCache, running_mean, running_var):
    """The running statistics used in the train-mode backward: the right formula, fed ``mu_run``,
    ``sigma^2_run`` where the forward normalised with the batch's."""
    return _correct_batchnorm_backward(dout, with_running_statistics(cache, running_mean, running_var))


def _forward_with_running_statistics_in_caches(params, state, images, *, train, backend="numpy"):
    """``numpyside.model.forward``, whose batch-norm caches carry the running statistics (as they were
    before this step): the backward, unchanged, then runs on them. The logits stay right."""
    logits, new_state, caches = _correct_forward(params, state, images, train=train, backend=backend)
    if train:
        caches = [
            (linear, None if bn is None else with_running_statistics(bn, state[i]["mean"], state[i]["var"]), sigmoid)
            for i, (linear, bn, sigmoid) in enumerate(caches[:-1])
        ] + caches[-1:]
    return logits, new_state, caches


def _biased_running_variance(running, mean, var, n):
    return _correct_update_running_stats(running, mean, var * np.asarray((n - 1) / n, var.dtype), n)


def _forward_without_eps(x, gamma, beta, eps=BN_EPS, *, backend="numpy"):
    return _correct_batchnorm_forward(x, gamma, beta, 0.0, backend=backend)


def _sigmoid_derivative_as_s(dout, cache, *, backend="numpy"):
    return dout * cache


class Mistake(NamedTuple):
    """A wrong piece of :mod:`numpyside.model` and what the equivalence tests must see of it."""

    title: str  # one line, for tables and figures
    patches: dict[str, Callable]  # attribute of numpyside.model -> the wrong version
    dtype: type  # the dtype in which the comparison must catch it (float32 unless it is too small)
    breaks: tuple[str, ...]  # compared quantities it must break there (tests/test_equivalence.py's names)
    # (dout, cache, running_mean, running_var) -> (dx, dgamma, dbeta): the wrong batch-norm backward
    # of one layer, for the gallery's dx column; None for the mistakes that are not one
    layer_backward: Callable | None = None


def _backward_only(wrong: Callable) -> Callable:
    return lambda dout, cache, running_mean, running_var: wrong(dout, cache)


#: Every mistake, by name. The first six are the classic wrong batch-norm backwards
#: (:data:`BATCHNORM_BACKWARD`); the gallery shows those.
MISTAKES: dict[str, Mistake] = {
    "mean held constant": Mistake(
        "the mean's dependence on x dropped",
        {"batchnorm_backward": mean_held_constant},
        np.float32,
        ("grad 0.weight", "grad 1.weight"),
        _backward_only(mean_held_constant),
    ),
    "variance held constant": Mistake(
        "the variance's dependence on x dropped",
        {"batchnorm_backward": variance_held_constant},
        np.float32,
        ("grad 0.weight", "grad 1.weight"),
        _backward_only(variance_held_constant),
    ),
    "1/(N-1) in the backward": Mistake(
        "1/(N-1) in the backward, 1/N in the forward",
        {"batchnorm_backward": variance_over_n_minus_1},
        np.float64,
        ("grad 0.weight", "grad 1.weight"),
        _backward_only(variance_over_n_minus_1),
    ),
    "eps left out of the backward": Mistake(
        "eps left out of the backward",
        {"batchnorm_backward": eps_left_out},
        np.float64,
        ("grad 0.weight", "grad 0.gamma"),
        _backward_only(eps_left_out),
    ),
    "running statistics in the backward": Mistake(
        "the running statistics used in the train-mode backward",
        {"forward": _forward_with_running_statistics_in_caches},
        np.float32,
        ("grad 0.weight", "grad 0.gamma"),
        running_statistics_in_backward,
    ),
    "sums over every axis": Mistake(
        "dgamma, dbeta summed over every axis, not axis 0",
        {"batchnorm_backward": sums_over_every_axis},
        np.float32,
        ("grad 0.gamma", "grad 0.beta", "grad 0.weight"),
        _backward_only(sums_over_every_axis),
    ),
    # (after one step with momentum 0.1 a biased variance moves the running variance by only
    # 0.1 * var / (n - 1) ~ 8e-5 relative on MNIST at n = 128: below float32's 1e-4, so float64)
    "running var biased": Mistake(
        "the running variance updated with the biased batch variance",
        {"update_running_stats": _biased_running_variance},
        np.float64,
        ("state 0.var", "state 2.var"),
    ),
    "eps left out of the forward": Mistake(
        "eps left out of the forward",
        {"batchnorm_forward": _forward_without_eps},
        np.float64,
        ("train_logits", "loss", "grad 0.gamma"),
    ),
    "bn backward uncoupled": Mistake(
        "both couplings dropped (the eval-mode backward in training mode)",
        {"batchnorm_backward": both_held_constant},
        np.float32,
        ("grad 0.weight", "grad 1.beta"),
        _backward_only(both_held_constant),
    ),
    "sigmoid' = s": Mistake(
        "the sigmoid's derivative taken as s instead of s (1 - s)",
        {"sigmoid_backward": _sigmoid_derivative_as_s},
        np.float32,
        ("grad 0.weight", "grad 2.gamma"),
    ),
}

#: The classic wrong batch-norm backwards, the ones ``python -m compare.mistakes`` shows.
BATCHNORM_BACKWARD = (
    "mean held constant",
    "variance held constant",
    "1/(N-1) in the backward",
    "eps left out of the backward",
    "running statistics in the backward",
    "sums over every axis",
)


@contextlib.contextmanager
def installed(mistake: Mistake) -> Iterator[None]:
    """:mod:`numpyside.model` with ``mistake`` in place of the correct code inside the ``with`` block
    (its trainers and ``loss_and_grads`` included), restored on the way out."""
    saved = {name: getattr(model, name) for name in mistake.patches}
    try:
        for name, wrong in mistake.patches.items():
            setattr(model, name, wrong)
        yield
    finally:
        for name, correct in saved.items():
            setattr(model, name, correct)
