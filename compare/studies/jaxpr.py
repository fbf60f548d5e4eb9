"""Where batch norm's coupling lives in the gradient JAX derives: the collectives in its jaxprs.

    python -m compare.jaxpr [--features 4] [--batch 8] [--dtype float32|float64]
                            [--decoupled] [--show-vmapped]

``jaxside.layers.batchnorm_train`` sees ONE example and reaches the rest of the batch only through
``jax.lax.pmean`` on the named ``vmap`` axis ``"batch"`` (traced as ``psum`` + ``div``). This module
traces its forward and its VJP with ``jax.make_jaxpr(..., axis_env=[("batch", N)])``, so that the
named axis stays visible, and counts the ``psum`` over it in each: the forward's are the forward's
collectives, the rest of the VJP's are the backward's (the transpose of a ``psum`` over a named axis
is again a ``psum``; ``docs/batchnorm_backward.md``). Under ``jax.vmap`` the named axis becomes array
axis 0, and the same count runs over the reductions (``psum``/``reduce_sum``) along it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.text import Text

from compare.contract import BN_EPS
from jaxside.layers import BATCH_AXIS, batchnorm_train

FORWARD, BACKWARD = "forward", "backward"


def batchnorm_train_decoupled(x, gamma, beta, eps: float = BN_EPS, axis_name: str = BATCH_AXIS):
    """``jaxside.layers.batchnorm_train`` with ``stop_gradient`` on the batch mean and variance: the
    same forward, but a backward without coupling terms (the eval-mode backward). It shows that the
    collectives of the backward come from differentiating through the statistics."""
    mean = jax.lax.stop_gradient(jax.lax.pmean(x, axis_name))
    centered = x - mean
    var = jax.lax.stop_gradient(jax.lax.pmean(centered * centered, axis_name))
    return gamma * (centered * (1.0 / jnp.sqrt(var + eps))) + beta


def _bn_output(coupled: bool) -> Callable:
    return (lambda x, gamma, beta: batchnorm_train(x, gamma, beta)[0]) if coupled else batchnorm_train_decoupled


def per_example_bn_vjp(x, gamma, beta, dout, *, coupled: bool = True):
    """Forward and VJP of batch norm for ONE example (run it under ``vmap(axis_name="batch")``).

    Returns ``(out, dx, dgamma_b, dbeta_b)``; ``dgamma_b, dbeta_b`` are this example's contributions
    (``dout * x_hat`` and ``dout``): their sums over the batch are ``dgamma, dbeta``.
    """
    out, vjp = jax.vjp(_bn_output(coupled), x, gamma, beta)
    return (out, *vjp(dout))


def per_example_jaxprs(n_features=4, batch=8, *, dtype: Any = np.float32, coupled=True):
    """``(forward, vjp)`` jaxprs of one example's batch norm, with the axis ``"batch"`` of size ``batch``.

    The forward takes ``(x, gamma, beta)``; the VJP ``(x, gamma, beta, dout)`` and returns
    ``(out, dx, dgamma_b, dbeta_b)``; every input is ``(n_features,)``.
    """
    v = np.zeros(n_features, np.dtype(dtype))
    env = [(BATCH_AXIS, batch)]
    forward = jax.make_jaxpr(_bn_output(coupled), axis_env=env)(v, v, v)
    vjp = jax.make_jaxpr(lambda x, g, b, d: per_example_bn_vjp(x, g, b, d, coupled=coupled), axis_env=env)(v, v, v, v)
    return forward, vjp


def batched_jaxprs(n_features=4, batch=8, *, dtype: Any = np.float32, coupled=True):
    """The same two jaxprs after ``jax.vmap``: ``X, dout (batch, n)``, shared ``gamma, beta (n,)``.
    No named axis is left: ``vmap`` has turned it into array axis 0."""
    m, v = np.zeros((batch, n_features), np.dtype(dtype)), np.zeros(n_features, np.dtype(dtype))

    def forward(xs, gamma, beta):
        return jax.vmap(_bn_output(coupled), in_axes=(0, None, None), axis_name=BATCH_AXIS)(xs, gamma, beta)

    def vjp(xs, gamma, beta, dout):
        out, pullback = jax.vjp(forward, xs, gamma, beta)
        return (out, *pullback(dout))

    return jax.make_jaxpr(forward)(m, v, v), jax.make_jaxpr(vjp)(m, v, v, m)


def _equations(jaxpr) -> list:
    """Every equation of ``jaxpr``, nested jaxprs (``jit``, ``custom_jvp_call``, ...) included."""
    out = []
    for eqn in (jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr).eqns:
        out.append(eqn)
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, (jcore.Jaxpr, jcore.ClosedJaxpr)):
                    out += _equations(item)
    return out


def is_named_collective(eqn, axis_name: str = BATCH_AXIS) -> bool:
    """``psum``, ``pmax``, ``all_gather``, ...: any equation whose ``axes``/``axis_name`` names ``axis_name``."""
    axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
    return axis_name in (axes if isinstance(axes, (tuple, list)) else (axes,))


def is_batch_reduction(eqn, batch: int) -> bool:
    """A ``psum``/``reduce_sum`` over an array axis of length ``batch`` (where ``vmap`` put the named axis)."""
    if eqn.primitive.name not in ("psum", "reduce_sum") or not eqn.invars:
        return False
    shape = getattr(eqn.invars[0].aval, "shape", ())
    return any(isinstance(a, (int, np.integer)) and a < len(shape) and shape[a] == batch for a in eqn.params["axes"])


def count(jaxpr, match: Callable) -> Counter:
    """``Counter(primitive name -> n)`` of the equations (nested ones included) that ``match``."""
    return Counter(eqn.primitive.name for eqn in _equations(jaxpr) if match(eqn))


def by_direction(forward, vjp, match: Callable) -> dict[str, Counter]:
    """The matching equations of the forward, and those the VJP adds to it (the backward's)."""
    in_forward = count(forward, match)
    return {FORWARD: in_forward, BACKWARD: count(vjp, match) - in_forward}


def psum_counts(n_features=4, batch=8, *, dtype: Any = np.float32, coupled=True) -> dict[str, int]:
    """How many collectives over ``"batch"`` one batch-norm layer makes per direction:
    ``{"forward": 2, "backward": 2}`` (``"backward": 0`` with ``coupled=False``)."""
    counts = by_direction(*per_example_jaxprs(n_features, batch, dtype=dtype, coupled=coupled), is_named_collective)
    return {direction: sum(counter.values()) for direction, counter in counts.items()}


#: What each collective of the coupled per-example VJP sums, in jaxpr order (``r = inv_std``, ``N`` = batch).
MEANINGS = (
    "mean:      sum(x)",
    "variance:  sum(centered**2)",
    "variance': -gamma r**2 sum(dout*x_hat) / (2N)   (= dvar / N)",
    "mean':     -gamma r sum(dout) / N               (= dmean / N)",
)


def check_coupling(n_features: int = 4, batch: int = 8, seed: int = 0) -> list[tuple[str, float]]:
    """Evaluate the four top-level collectives of the coupled per-example VJP (float64, random data)
    under ``vmap`` and compare each with its formula in :data:`MEANINGS`: ``(meaning, max rel. err)``.
    Empty if the VJP does not hold exactly four of them at its top level."""
    _, closed = per_example_jaxprs(n_features, batch, dtype=np.float64)
    eqns = [eqn for eqn in closed.jaxpr.eqns if is_named_collective(eqn)]
    if len(eqns) != len(MEANINGS):
        return []
    probe = closed.jaxpr.replace(outvars=[eqn.outvars[0] for eqn in eqns])
    rng = np.random.default_rng(seed)
    xs, dout = rng.normal(1.0, 2.0, (batch, n_features)), rng.normal(size=(batch, n_features))
    gamma, beta = rng.normal(size=n_features), rng.normal(size=n_features)
    centered = xs - xs.mean(axis=0)
    inv_std = 1.0 / np.sqrt((centered**2).mean(axis=0) + BN_EPS)
    x_hat = centered * inv_std
    expected = (
        xs.sum(axis=0),
        (centered**2).sum(axis=0),
        -gamma * inv_std**2 * (dout * x_hat).sum(axis=0) / (2 * batch),
        -gamma * inv_std * dout.sum(axis=0) / batch,
    )
    run = jax.vmap(lambda *a: jax.core.eval_jaxpr(probe, closed.consts, *a), (0, None, None, 0), axis_name=BATCH_AXIS)
    got = run(xs, gamma, beta, dout)
    return [
        (meaning, float(np.max(np.abs(np.asarray(value) - want) / np.maximum(np.abs(want), 1e-300))))
        for meaning, value, want in zip(MEANINGS, got, expected)
    ]


STYLE = {FORWARD: "bold cyan", BACKWARD: "bold magenta"}


def highlighted(vjp, n_forward: int, marker: str = f"[axes=('{BATCH_AXIS}',)") -> Text:
    """The printed VJP jaxpr with every line holding ``marker`` (a collective over the named axis)
    highlighted; the first ``n_forward`` are tagged forward (the VJP traces the forward first)."""
    text, seen = Text(), 0
    for line in str(vjp).splitlines():
        if marker not in line:
            text.append(line + "\n")
            continue
        direction = FORWARD if seen < n_forward else BACKWARD
        seen += 1
        text.append(line, style=STYLE[direction])
        text.append(f"   <- {direction}\n", style="dim")
    return text


def phrase(counter: Counter, noun: str) -> str:
    total = sum(counter.values())
    parts = ", ".join(f"{name} x{n}" for name, n in sorted(counter.items()))
    return f"{total} {noun}{'s' if total != 1 else ''}" + (f" ({parts})" if parts else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compare.jaxpr",
        description="Show the collectives over the 'batch' axis in the jaxpr of the per-example batch-norm gradient.",
    )
    parser.add_argument("--features", type=int, default=4, help="features per example (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="size of the named 'batch' axis (default 8)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--decoupled", action="store_true", help="stop_gradient on the batch mean and variance")
    parser.add_argument("--show-vmapped", action="store_true", help="also print the jaxpr of the vmapped gradient")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.features < 1 or args.batch < 2:
        parser.error("--features must be >= 1 and --batch >= 2")
    jax.config.update("jax_enable_x64", True)  # so that float64 traces as float64
    coupled = not args.decoupled
    console = Console(highlight=False, soft_wrap=True)

    forward, vjp = per_example_jaxprs(args.features, args.batch, dtype=args.dtype, coupled=coupled)
    counts = by_direction(forward, vjp, is_named_collective)
    what = "batchnorm_train" if coupled else "batchnorm_train with stop_gradient(mean, var)"
    console.rule(f"VJP of per-example {what}, axis_env=[('batch', {args.batch})]")
    console.print("inputs (x, gamma, beta, dout); outputs (out, dx, dgamma_b, dbeta_b)", style="dim")
    console.print(highlighted(vjp, sum(counts[FORWARD].values())), end="")
    console.rule("collectives over the named axis 'batch' (forward jaxpr; what the VJP adds)")
    console.print(f"forward:  {phrase(counts[FORWARD], 'collective')}")
    console.print(f"backward: {phrase(counts[BACKWARD], 'collective')}")
    checks = check_coupling(args.features, args.batch) if coupled else []
    if checks:
        console.print("what each one sums, checked on random float64 data (every example gets the same value):")
        for meaning, error in checks:
            console.print(f"  {meaning}   max rel. err {error:.1e}")
    elif not coupled:
        console.print("  stop_gradient on mean and var: nothing to transpose, no coupling in the backward")

    forward, vjp = batched_jaxprs(args.features, args.batch, dtype=args.dtype, coupled=coupled)
    counts = by_direction(forward, vjp, lambda eqn: is_batch_reduction(eqn, args.batch))
    console.rule("after jax.vmap: the same program, batched (named axis -> array axis 0)")
    if args.show_vmapped:
        console.print(Text(str(vjp)))
    console.print(f"forward:  {phrase(counts[FORWARD], 'reduction')} over axis 0")
    console.print(f"backward: {phrase(counts[BACKWARD], 'reduction')} over axis 0")
    if coupled:
        console.print(
            "  (backward also sums dgamma and dbeta here: gamma and beta are shared by the batch)", style="dim"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
