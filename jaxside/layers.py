r"""Per-example layers: each function sees ONE example, never a batch axis. Mirror: :mod:`numpyside.layers`.

``linear`` ↔ ``linear_forward``/``linear_backward``; ``batchnorm_train`` ↔ ``batchnorm_forward``/
``batchnorm_backward``; ``batchnorm_eval`` ↔ ``batchnorm_eval``; ``sigmoid`` ↔ ``sigmoid_forward``/
``sigmoid_backward``; ``cross_entropy`` ↔ ``softmax_cross_entropy_forward``/``softmax_cross_entropy_backward``.

Here there is no backward: ``jax.grad`` derives it. The one place where an example needs the rest
of the batch is batch norm's statistics, and it gets them only through collectives on the named
``vmap`` axis (``jax.lax.pmean``); under ``jax.grad`` these transpose into the two "coupling"
sums of the hand-derived batch-norm backward (see ``docs/batchnorm_backward.md``).

**float64 needs JAX's 64-bit mode**, ``jax.config.update("jax_enable_x64", True)`` before the first
JAX computation (the study guide's first line). With it off, JAX turns every float64 input into
float32 as it enters (``jnp.asarray``, ``vmap``, ``jit``), before these functions see it, and a
float64 reference then differs from the NumPy side by ~1e-7: it looks like a bug in the
derivation and is only float32's rounding. What a layer can still see, a float64 NumPy array
passed to it directly, it refuses (:func:`refuse_float64_without_x64`); under ``vmap`` or ``jit``
only the 64-bit switch helps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from compare.contract import BN_EPS, InputError

#: The name of the vmapped batch axis that batch norm's collectives reduce over.
BATCH_AXIS = "batch"


class UnboundBatchAxisError(NameError):
    """Batch norm in training mode was called outside ``jax.vmap(..., axis_name="batch")``."""


class NestedBatchAxisError(ValueError):
    """Two nested ``jax.vmap``s bind the same axis name. JAX accepts this silently (the inner axis
    shadows the outer one), so batch norm would average over the inner axis only."""


def _vmap_levels_named(value, axis_name: str) -> int:
    """How many enclosing ``vmap``s named ``axis_name`` ``value`` is batched over.

    JAX's public API cannot tell: its axis environment is a dict from name to size, so an inner
    ``vmap`` simply overwrites the outer one's entry. A vmapped value, though, is a chain of tracers
    (a batch tracer's ``val`` is the value one level out, a JVP/linearize tracer's ``primal``), and
    each batch tracer's trace records its axis name. These are JAX internals (checked against jax
    0.10.2); if they change, this returns at most 1 and the check below turns into a no-op.
    """
    levels, seen = 0, 0
    while isinstance(value, jax.core.Tracer) and seen < 64:
        seen += 1
        axis_data = getattr(getattr(value, "_trace", None), "axis_data", None)
        if getattr(axis_data, "name", None) == axis_name:
            levels += 1
        value = getattr(value, "val", getattr(value, "primal", None))
    return levels


def refuse_float64_without_x64(*values) -> None:
    """Refuse a float64 input while JAX's 64-bit mode is off: JAX would compute it in float32 without a
    word. Only concrete arrays can show it (a traced value under ``vmap``/``jit`` is float32 already)."""
    if jax.config.jax_enable_x64:
        return
    for value in values:
        if not isinstance(value, jax.core.Tracer) and getattr(value, "dtype", None) == np.float64:
            raise InputError(
                "a float64 input while JAX's 64-bit mode is off: JAX would silently compute it in float32. Call "
                "jax.config.update('jax_enable_x64', True) before the first JAX computation (or pass float32)"
            )


def check_batch_axis_not_shadowed(value, axis_name: str = BATCH_AXIS) -> None:
    """Refuse ``value`` if it is batched over two nested ``vmap``s that are both named ``axis_name``."""
    if _vmap_levels_named(value, axis_name) > 1:
        raise NestedBatchAxisError(
            f"two nested jax.vmap calls both bind the axis name {axis_name!r} and JAX silently lets the inner one "
            f"shadow the outer, so batch norm would average over the inner axis only: give the outer vmap a "
            f"different axis_name (e.g. 'batches')"
        )


def linear(
    x: Float[Array, " n_in"], weight: Float[Array, "n_in n_out"], bias: Float[Array, " n_out"] | None = None
) -> Float[Array, " n_out"]:
    """``y = x @ W (+ b)`` for one example."""
    refuse_float64_without_x64(x, weight, bias)
    y = x @ weight
    if bias is not None:
        y = y + bias
    return y


def batch_mean(value: Float[Array, ...], axis_name: str = BATCH_AXIS) -> Float[Array, ...]:
    """Mean of ``value`` over the examples of the named ``vmap`` axis: ``(1/N) sum_n value_n``.

    This is the only door through which an example sees the others. Outside a ``vmap`` that
    binds ``axis_name`` JAX cannot know what "the batch" is; we say so in one sentence.
    """
    check_batch_axis_not_shadowed(value, axis_name)
    try:
        return jax.lax.pmean(value, axis_name)
    except NameError as error:
        raise UnboundBatchAxisError(
            f"batch norm in training mode averages over the named axis {axis_name!r}: call the per-example "
            f"function under jax.vmap(..., axis_name={axis_name!r}) (or use train=False, which needs no batch)"
        ) from error


def batch_size(axis_name: str = BATCH_AXIS) -> Int[Array, ""]:
    """``N``, the number of examples on the named axis (``psum`` of 1)."""
    try:
        return jax.lax.psum(1, axis_name)
    except NameError as error:
        raise UnboundBatchAxisError(
            f"the batch size is only defined under jax.vmap(..., axis_name={axis_name!r})"
        ) from error


def batchnorm_train(
    x: Float[Array, " n"],
    gamma: Float[Array, " n"],
    beta: Float[Array, " n"],
    eps: float = BN_EPS,
    axis_name: str = BATCH_AXIS,
) -> tuple[Float[Array, " n"], tuple[Float[Array, " n"], Float[Array, " n"]]]:
    r"""Batch norm in training mode, per feature, seen from one example.

    .. math::
        \mu = \tfrac1N \sum_n x_n, \quad
        \sigma^2 = \tfrac1N \sum_n (x_n - \mu)^2 \ (\text{biased}), \quad
        \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, \quad
        y = \gamma \hat x + \beta

    Both sums are ``pmean`` collectives over ``axis_name``. Returns ``y`` and the batch
    statistics ``(mu, sigma^2)`` (identical on every example), for the running statistics.
    float64 input needs JAX's 64-bit mode (module docstring): under ``vmap`` this function only
    ever sees the float32 that JAX made of it.
    """
    refuse_float64_without_x64(x, gamma, beta)
    mean = batch_mean(x, axis_name)
    centered = x - mean
    var = batch_mean(centered * centered, axis_name)
    inv_std = 1.0 / jnp.sqrt(var + eps)
    x_hat = centered * inv_std
    return gamma * x_hat + beta, (mean, var)


def batchnorm_eval(
    x: Float[Array, " n"],
    gamma: Float[Array, " n"],
    beta: Float[Array, " n"],
    mean: Float[Array, " n"],
    var: Float[Array, " n"],
    eps: float = BN_EPS,
) -> Float[Array, " n"]:
    """Batch norm in eval mode: the same affine map with the running ``mean`` and ``var``."""
    refuse_float64_without_x64(x, gamma, beta, mean, var)
    inv_std = 1.0 / jnp.sqrt(var + eps)
    return gamma * ((x - mean) * inv_std) + beta


def sigmoid(x: Float[Array, " n"]) -> Float[Array, " n"]:
    """``1 / (1 + exp(-x))`` (``jax.nn.sigmoid`` is stable for large ``|x|``)."""
    refuse_float64_without_x64(x)
    return jax.nn.sigmoid(x)


def cross_entropy(logits: Float[Array, " classes"], label: Int[Array, ""]) -> Float[Array, ""]:
    r"""Softmax cross-entropy of ONE example's logits against its integer label.

    .. math:: \ell(z, y) = -\log \mathrm{softmax}(z)_y = -\big(z_y - \log \textstyle\sum_j e^{z_j}\big)

    (``jax.nn.log_softmax`` subtracts the maximum first, so any logits are safe.)
    """
    refuse_float64_without_x64(logits)
    return -jax.nn.log_softmax(logits)[label]
