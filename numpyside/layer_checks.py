"""The checks at the public door of :mod:`numpyside.layers`: each layer function, called by hand,
refuses input it would otherwise turn into plausible-looking wrong numbers.

A layer is written as a plain function and decorated with :func:`checked_by`: the public name
checks its arguments first and then runs the function; the function itself stays reachable as
``.unchecked``. :mod:`numpyside.model` and the trainers check their whole input once, at their own
door (:func:`compare.contract.check_inputs`), and then call the ``.unchecked`` forms, so no check
runs inside a training loop.

What is refused, with an :class:`~compare.contract.InputError` that names the problem and the fix:
anything but a NumPy array of float32 or float64 (integer input would be computed and returned in
integers), arrays of one call in different dtypes, parameters whose length is not the number of
features (the numba kernels would read past their end), a ``dout`` or a cache that does not
belong to the same forward, labels outside ``0..C-1``, a training-mode batch of one example (its
variance is 0, so ``x_hat`` is 0 whatever ``x`` is), a negative ``eps`` or variance, and an
unknown ``backend``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import numpy as np

from compare.contract import SUPPORTED_DTYPES, InputError
from numpyside.backend import check_backend


def checked_by(check: Callable[..., None], **fixed):
    """Decorator: the public layer runs ``check(**arguments, **fixed)`` (every argument by name,
    defaults filled in; ``fixed`` e.g. the cache type a backward expects) before the layer; the
    undecorated layer is kept as ``public.unchecked``."""

    def decorate(layer):
        signature = inspect.signature(layer)

        @functools.wraps(layer)
        def public(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(**bound.arguments, **fixed)
            return layer(*args, **kwargs)

        public.unchecked = layer
        return public

    return decorate


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def float_array(name: str, value, *, ndim: int | None = None, shape_text: str = "") -> np.ndarray:
    """``value`` must be a float32/float64 NumPy array (of ``ndim`` dimensions, if given)."""
    if not isinstance(value, np.ndarray):
        raise InputError(
            f"{name} must be a NumPy array, got {type(value).__name__}: pass np.asarray({name}, dtype=np.float64)"
        )
    if value.dtype not in SUPPORTED_DTYPES:
        kind = "integer" if np.issubdtype(value.dtype, np.integer) else str(value.dtype)
        raise InputError(
            f"{name} has dtype {value.dtype} ({kind}); the layers compute and return float32 or float64 "
            f"(an integer input would be computed in integers): pass {name}.astype(np.float64)"
        )
    if ndim is not None and value.ndim != ndim:
        raise InputError(f"{name} must be {ndim}-D{' ' + shape_text if shape_text else ''}, got shape {value.shape}")
    return value


def same_dtype(name: str, value: np.ndarray, reference: np.ndarray, reference_name: str) -> None:
    if value.dtype != reference.dtype:
        raise InputError(
            f"{name} has dtype {value.dtype} but {reference_name} has {reference.dtype}: one call works in one "
            f"dtype, cast with {name}.astype({reference_name}.dtype)"
        )


def per_feature(name: str, value, x: np.ndarray) -> None:
    """A per-feature vector of ``x`` (B, n): shape (n,), x's dtype."""
    float_array(name, value)
    n = x.shape[1]
    if value.shape != (n,):
        raise InputError(
            f"{name} has shape {value.shape} but x has {n} features (shape {x.shape}): {name} needs one entry "
            f"per feature, shape ({n},)"
        )
    same_dtype(name, value, x, "x")


def non_negative_number(name: str, value, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0 ({why}), got {value!r}")


def training_batch(x: np.ndarray) -> None:
    if x.shape[0] < 2:
        raise InputError(
            f"batch norm in training mode needs a batch of at least 2 examples, got {x.shape[0]}: the variance of "
            "one example is 0, so x_hat would be 0 whatever x is; for a single example use batchnorm_eval with "
            "running statistics"
        )


def matches_forward(dout, cache_shape: tuple[int, ...], cache_dtype: np.dtype, forward: str) -> None:
    """``dout`` is the gradient of the output that the cache's forward returned: same shape, same dtype."""
    float_array("dout", dout)
    if dout.shape != cache_shape:
        raise InputError(
            f"dout has shape {dout.shape} but this cache's {forward} returned an output of shape {cache_shape}: "
            f"pass the gradient of that output (one row per example of the same batch)"
        )
    if dout.dtype != cache_dtype:
        raise InputError(
            f"dout has dtype {dout.dtype} but the cache's forward ran in {cache_dtype}: cast with "
            f"dout.astype({np.dtype(cache_dtype).name})"
        )


def cache_of(cache, cache_type: type, forward: str) -> None:
    if not isinstance(cache, cache_type):
        raise InputError(
            f"cache must be the {cache_type.__name__} that {forward} returned (its second output), "
            f"got {type(cache).__name__}"
        )


# --------------------------------------------------------------------------------------------
# one check per layer function, named after it, taking its arguments by name
# --------------------------------------------------------------------------------------------


def linear_forward(x, weight, bias) -> None:
    float_array("x", x, ndim=2, shape_text="(batch, n_in)")
    float_array("weight", weight, ndim=2, shape_text="(n_in, n_out)")
    same_dtype("weight", weight, x, "x")
    if weight.shape[0] != x.shape[1]:
        raise InputError(
            f"x has {x.shape[1]} features per example but weight has shape {weight.shape}: weight must be "
            f"(n_in, n_out) = ({x.shape[1]}, ...) (out = x @ weight; a transposed weight has the wrong first axis)"
        )
    if bias is not None:
        float_array("bias", bias)
        if bias.shape != (weight.shape[1],):
            raise InputError(f"bias has shape {bias.shape}, expected ({weight.shape[1]},): one entry per output")
        same_dtype("bias", bias, x, "x")


def linear_backward(dout, cache, need_dx, *, cache_type: type) -> None:
    cache_of(cache, cache_type, "linear_forward")
    matches_forward(dout, (cache.x.shape[0], cache.weight.shape[1]), cache.x.dtype, "linear_forward")


def batchnorm_forward(x, gamma, beta, eps, backend) -> None:
    check_backend(backend)
    float_array("x", x, ndim=2, shape_text="(batch, features)")
    per_feature("gamma", gamma, x)
    per_feature("beta", beta, x)
    non_negative_number("eps", eps, "it keeps 1 / sqrt(var + eps) finite")
    training_batch(x)


def batchnorm_backward(dout, cache, backend, *, cache_type: type) -> None:
    check_backend(backend)
    batchnorm_backward_staged(dout, cache, cache_type=cache_type)


def batchnorm_backward_staged(dout, cache, *, cache_type: type) -> None:
    cache_of(cache, cache_type, "batchnorm_forward")
    x_hat = float_array("cache.x_hat", cache.x_hat, ndim=2, shape_text="(batch, features)")
    for name in ("centered", "x"):
        if float_array(f"cache.{name}", getattr(cache, name)).shape != x_hat.shape:
            raise InputError(f"cache.{name} and cache.x_hat differ in shape: build the cache with batchnorm_forward")
    for name in ("gamma", "inv_std", "mean", "var"):
        per_feature(f"cache.{name}", getattr(cache, name), x_hat)
    matches_forward(dout, cache.x_hat.shape, cache.x_hat.dtype, "batchnorm_forward")


def batchnorm_eval(x, gamma, beta, mean, var, eps, backend) -> None:
    check_backend(backend)
    float_array("x", x, ndim=2, shape_text="(batch, features)")
    for name, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        per_feature(name, value, x)
    non_negative_number("eps", eps, "it keeps 1 / sqrt(var + eps) finite")
    negative = np.flatnonzero(~(var >= 0))
    if negative.size:
        raise InputError(
            f"var must hold variances (>= 0): var[{negative[0]}] = {float(var[negative[0]])!r}; pass the running "
            "variance of the training batches"
        )


def update_running_stats(running, mean, var, n) -> None:
    float_array("mean", mean, ndim=1, shape_text="(features,)")
    per_feature("var", var, mean[None, :])
    if not isinstance(running, dict) or set(running) != {"mean", "var"}:
        raise InputError(
            "running must be a dict {'mean': (features,), 'var': (features,)}, one layer's running statistics, "
            f"got {type(running).__name__}{' with keys ' + str(sorted(running)) if isinstance(running, dict) else ''}"
        )
    for key in ("mean", "var"):
        per_feature(f"running[{key!r}]", running[key], mean[None, :])
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise InputError(
            f"n must be the batch size, an integer >= 2 (the unbiased variance divides by n - 1), got {n!r}"
        )


def sigmoid_forward(x, backend) -> None:
    check_backend(backend)
    float_array("x", x)


def sigmoid_backward(dout, cache, backend) -> None:
    check_backend(backend)
    float_array("cache", cache)
    matches_forward(dout, cache.shape, cache.dtype, "sigmoid_forward")


def softmax_cross_entropy_forward(logits, labels, backend) -> None:
    check_backend(backend)
    float_array("logits", logits, ndim=2, shape_text="(batch, classes)")
    n_rows, n_classes = logits.shape
    if n_rows == 0 or n_classes == 0:
        raise InputError(f"logits must hold at least one example and one class, got shape {logits.shape}")
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        kind = labels.dtype if isinstance(labels, np.ndarray) else type(labels).__name__
        raise InputError(f"labels must be a NumPy array of integer class indices, got {kind}: pass np.asarray(labels)")
    if labels.shape != (n_rows,):
        raise InputError(f"labels must have shape ({n_rows},), one per row of logits, got {labels.shape}")
    outside = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if outside.size:
        raise InputError(
            f"labels must lie in 0..{n_classes - 1} (logits has {n_classes} classes), found labels[{outside[0]}] = "
            f"{int(labels[outside[0]])}"
        )


def softmax_cross_entropy_backward(dloss, cache, *, cache_type: type) -> None:
    cache_of(cache, cache_type, "softmax_cross_entropy_forward")
    if np.ndim(dloss) != 0 or not np.isrealobj(dloss) or not math.isfinite(float(dloss)):
        raise InputError(f"dloss must be a finite real number (d total / d loss; 1 for the loss itself), got {dloss!r}")


def softmax_cross_entropy(logits, labels, backend) -> None:
    softmax_cross_entropy_forward(logits, labels, backend)
