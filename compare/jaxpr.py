"""Where batch norm's coupling lives in the gradient JAX derives: the collectives in its jaxpr.

    python -m compare.jaxpr [--features 4] [--batch 8] [--dtype float32|float64]
                            [--decoupled] [--show-vmapped]

``jaxside.layers.batchnorm_train`` sees ONE example; it reaches the rest of the batch only through
``jax.lax.pmean`` on the named ``vmap`` axis ``"batch"``. This module traces the VJP of that
per-example function with ``jax.make_jaxpr(..., axis_env=[("batch", N)])``, so that the named
axis stays visible, and lists the equations that communicate over it, split into the forward
part (they do not depend on the cotangent ``dout``) and the backward part (they do).

What JAX 0.10.2 prints (checked, not assumed): ``pmean`` is not a primitive; it is traced as
``psum[axes=('batch',)]`` followed by ``div ... N``. The forward has two such ``psum`` (the mean
and the variance), and the backward two more: the transpose of ``psum`` over a named axis is
again a ``psum`` over that axis (see ``docs/batchnorm_backward.md``).

Under ``jax.vmap`` (:func:`batched_bn_grad_jaxpr`) the named axis becomes array axis 0: the forward
``psum`` turn into ``psum[axes=(0,)]`` and the backward sums into ``reduce_sum[axes=(0,)]``;
:func:`find_batch_reductions` finds those.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as `python compare/jaxpr.py`: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.text import Text

from compare.contract import BN_EPS
from jaxside.layers import BATCH_AXIS, batchnorm_train

FORWARD, BACKWARD = "forward", "backward"


class Collective(NamedTuple):
    """One equation that reduces over the batch: its primitive, its ``axes`` parameter, and
    whether it belongs to the forward part (independent of the cotangent) or the backward part."""

    primitive: str
    axes: tuple
    phase: str


# ----------------------------------------------------------------------------------------------
# the per-example programs and their jaxprs
# ----------------------------------------------------------------------------------------------


def batchnorm_train_decoupled(x, gamma, beta, eps: float = BN_EPS, axis_name: str = BATCH_AXIS):
    """``jaxside.layers.batchnorm_train`` with ``stop_gradient`` on the batch mean and variance.

    Same forward values; but the gradient treats the statistics as constants, so the backward
    has no coupling terms (it is the eval-mode backward). Exists to show that the collectives in
    the backward come from differentiating through the statistics.
    """
    mean = jax.lax.stop_gradient(jax.lax.pmean(x, axis_name))
    centered = x - mean
    var = jax.lax.stop_gradient(jax.lax.pmean(centered * centered, axis_name))
    inv_std = 1.0 / jnp.sqrt(var + eps)
    return gamma * (centered * inv_std) + beta


def _bn_output(coupled: bool) -> Callable:
    if coupled:
        return lambda x, gamma, beta: batchnorm_train(x, gamma, beta)[0]
    return batchnorm_train_decoupled


def per_example_bn_vjp(x, gamma, beta, dout, *, coupled: bool = True):
    """Forward and VJP of batch norm for ONE example (run it under ``vmap(axis_name="batch")``).

    Returns ``(out, dx, dgamma_b, dbeta_b)``; ``dgamma_b, dbeta_b`` are this example's
    contributions (``dout * x_hat`` and ``dout``): their sums over the batch are ``dgamma, dbeta``.
    """
    out, vjp = jax.vjp(_bn_output(coupled), x, gamma, beta)
    return (out, *vjp(dout))


def _zeros(shape, dtype) -> np.ndarray:
    return np.zeros(shape, dtype=np.dtype(dtype))


def per_example_bn_grad_jaxpr(
    n_features: int = 4, batch: int = 8, *, dtype: Any = np.float32, coupled: bool = True
) -> jcore.ClosedJaxpr:
    """The jaxpr of :func:`per_example_bn_vjp`, traced for one example of ``n_features`` with the
    named axis ``"batch"`` of size ``batch`` in the axis environment.

    Inputs ``(x, gamma, beta, dout)``, each ``(n_features,)``: the cotangent is the LAST input
    (what :func:`find_collectives` assumes by default).
    """
    vector = _zeros((n_features,), dtype)

    def fn(x, gamma, beta, dout):
        return per_example_bn_vjp(x, gamma, beta, dout, coupled=coupled)

    return jax.make_jaxpr(fn, axis_env=[(BATCH_AXIS, batch)])(vector, vector, vector, vector)


def batched_bn_grad_jaxpr(
    n_features: int = 4, batch: int = 8, *, dtype: Any = np.float32, coupled: bool = True
) -> jcore.ClosedJaxpr:
    """The jaxpr of the VJP of the *vmapped* batch norm: ``X (batch, n)`` and the closed-over
    ``gamma, beta (n,)`` in, ``dout (batch, n)`` the cotangent (last input);
    outputs ``(out, dX, dgamma, dbeta)``. No named axis is left: ``vmap`` has turned it into axis 0.
    """
    matrix, vector = _zeros((batch, n_features), dtype), _zeros((n_features,), dtype)
    one_example = _bn_output(coupled)

    def forward(xs, gamma, beta):
        return jax.vmap(one_example, in_axes=(0, None, None), axis_name=BATCH_AXIS)(xs, gamma, beta)

    def fn(xs, gamma, beta, dout):
        out, vjp = jax.vjp(forward, xs, gamma, beta)
        return (out, *vjp(dout))

    return jax.make_jaxpr(fn)(matrix, vector, vector, matrix)


# ----------------------------------------------------------------------------------------------
# walking a jaxpr
# ----------------------------------------------------------------------------------------------


def _as_jaxpr(jaxpr) -> jcore.Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr


def _sub_jaxprs(params: dict) -> Iterable[jcore.Jaxpr]:
    """The jaxprs nested in an equation's parameters (``pjit``'s ``jaxpr``, ``custom_jvp_call``'s
    ``call_jaxpr``, ``cond``'s ``branches``, ``scan``/``while`` bodies, ...)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jcore.Jaxpr, jcore.ClosedJaxpr)):
                yield _as_jaxpr(item)


def _sub_tainted(sub: jcore.Jaxpr, eqn, tainted_in: list[bool]) -> list[bool]:
    """Which inputs of a nested jaxpr depend on the cotangent. One-to-one when the arities
    agree (``jit``, ``closed_call``, ``custom_jvp_call``), aligned on the tail when the
    nested jaxpr takes fewer (``cond``: its first operand is the branch index); otherwise every
    input counts as tainted as soon as one outer input is (conservative)."""
    n_sub, n_outer = len(sub.invars), len(eqn.invars)
    if n_sub == n_outer:
        return list(tainted_in)
    if n_sub < n_outer:
        return list(tainted_in[n_outer - n_sub :])
    return [any(tainted_in)] * n_sub


def _named_axes(params: dict) -> tuple | None:
    """The ``axes``/``axis_name`` parameter of a collective, as a tuple; None for other equations."""
    for key in ("axes", "axis_name"):
        if key in params:
            value = params[key]
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return None


class _Found(NamedTuple):
    collective: Collective
    top_level_index: int  # index of the top-level equation that is it or contains it
    nested: bool


def _walk(
    jaxpr: jcore.Jaxpr,
    tainted_inputs: Sequence[bool],
    match: Callable[[Any], tuple | None],
    found: list[_Found],
    top_level_index: int | None = None,
) -> list[bool]:
    """Depth-first in equation order, into nested jaxprs at each call site (so a jaxpr that is
    called twice is counted twice); returns which outputs of ``jaxpr`` depend on the tainted inputs."""
    tainted = {var for var, flag in zip(jaxpr.invars, tainted_inputs) if flag}

    def is_tainted(atom) -> bool:
        return not isinstance(atom, jcore.Literal) and atom in tainted

    for index, eqn in enumerate(jaxpr.eqns):
        top = index if top_level_index is None else top_level_index
        tainted_in = [is_tainted(atom) for atom in eqn.invars]
        depends = any(tainted_in)
        axes = match(eqn)
        if axes is not None:
            phase = BACKWARD if depends else FORWARD
            found.append(_Found(Collective(eqn.primitive.name, axes, phase), top, top_level_index is not None))
        subs = list(_sub_jaxprs(eqn.params))
        loop = eqn.primitive.name in _LOOPS
        sub_outs = [
            _walk(sub, [depends] * len(sub.invars) if loop else _sub_tainted(sub, eqn, tainted_in), match, found, top)
            for sub in subs
        ]
        if subs and not loop and all(len(o) == len(eqn.outvars) for o in sub_outs):
            # call-like (jit, custom_jvp_call, cond, ...): only the outputs that depend on dout
            out_flags = [any(flags) for flags in zip(*sub_outs)]
        else:  # plain equation, loop, or unknown layout: every output if any input
            out_flags = [depends] * len(eqn.outvars)
        tainted.update(var for var, flag in zip(eqn.outvars, out_flags) if flag)
    return [is_tainted(atom) for atom in jaxpr.outvars]


#: Equations whose nested jaxpr runs repeatedly: one pass over it does not show every dependence
#: (a carry can pick up the cotangent in a later iteration), so they are treated conservatively.
_LOOPS = ("while", "scan")


def _taint_flags(jaxpr: jcore.Jaxpr, cotangent_inputs: Sequence[int]) -> list[bool]:
    n = len(jaxpr.invars)
    indices = {i % n for i in cotangent_inputs}
    return [i in indices for i in range(n)]


def _find(jaxpr, match, cotangent_inputs: Sequence[int]) -> list[_Found]:
    inner = _as_jaxpr(jaxpr)
    found: list[_Found] = []
    _walk(inner, _taint_flags(inner, cotangent_inputs), match, found)
    return found


def _named_match(axis_name: str) -> Callable:
    def match(eqn):
        axes = _named_axes(eqn.params)
        return axes if axes is not None and axis_name in axes else None

    return match


def _batch_match(batch: int) -> Callable:
    def match(eqn):
        if eqn.primitive.name not in ("psum", "reduce_sum") or not eqn.invars:
            return None
        axes = _named_axes(eqn.params) or ()
        shape = getattr(eqn.invars[0].aval, "shape", ())
        summed = [int(a) for a in axes if isinstance(a, (int, np.integer)) and a < len(shape) and shape[a] == batch]
        return tuple(summed) if summed else None

    return match


def find_collectives(jaxpr, axis_name: str = BATCH_AXIS, cotangent_inputs: Sequence[int] = (-1,)) -> list[Collective]:
    """Every equation (nested ones included) whose ``axes``/``axis_name`` names ``axis_name``.

    ``psum``, ``pmax``, ``all_gather``, ``psum_invariant``, ``pvary``, ... are all recognised by
    that parameter, not by a list of names. An equation is ``"backward"`` if it depends on one of
    the inputs ``cotangent_inputs`` (indices into the jaxpr's inputs; by the convention of this
    module's ``*_jaxpr`` builders the cotangent is the last one), else ``"forward"``.
    """
    return [f.collective for f in _find(jaxpr, _named_match(axis_name), cotangent_inputs)]


def find_batch_reductions(jaxpr, batch: int, cotangent_inputs: Sequence[int] = (-1,)) -> list[Collective]:
    """In a vmapped jaxpr: the equations that sum over an axis of length ``batch``, which is where
    the named-axis collectives went (``psum[axes=(0,)]``, ``reduce_sum[axes=(0,)]``).

    Reductions over an axis of length 1 (reshuffling left by ``vmap``) and ``psum[axes=()]`` (the
    identity) are not counted. Forward/backward as in :func:`find_collectives`.
    """
    return [f.collective for f in _find(jaxpr, _batch_match(batch), cotangent_inputs)]


def count_by_phase(collectives: Iterable[Collective]) -> dict[str, Counter]:
    """``{"forward": Counter(primitive -> n), "backward": ...}``."""
    counts = {FORWARD: Counter(), BACKWARD: Counter()}
    for item in collectives:
        counts[item.phase][item.primitive] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# what the collectives compute: evaluate them on data
# ----------------------------------------------------------------------------------------------

#: What each collective of the coupled per-example VJP should sum, in jaxpr order, as a formula of
#: the batched quantities (sums over the batch; ``r = inv_std``, ``N`` = batch size).
MEANINGS = (
    ("forward", "mean:      sum(x)"),
    ("forward", "variance:  sum(centered**2)"),
    ("backward", "variance': -gamma r**2 sum(dout*x_hat) / (2N)   (= dvar / N)"),
    ("backward", "mean':     -gamma r sum(dout) / N               (= dmean / N)"),
)


def collective_values(closed: jcore.ClosedJaxpr, xs, gamma, beta, dout) -> list[np.ndarray]:
    """The outputs of the top-level collectives of a per-example jaxpr from
    :func:`per_example_bn_grad_jaxpr`, evaluated under ``vmap(axis_name="batch")`` on the batch
    ``xs, dout`` (B, n) with shared ``gamma, beta`` (n,); each (B, n), in jaxpr order."""
    inner = closed.jaxpr
    eqns = [eqn for eqn in inner.eqns if _named_match(BATCH_AXIS)(eqn) is not None]
    probe = inner.replace(outvars=[eqn.outvars[0] for eqn in eqns])

    def one_example(x, g, b, d):
        return jax.core.eval_jaxpr(probe, closed.consts, x, g, b, d)

    outs = jax.vmap(one_example, in_axes=(0, None, None, 0), axis_name=BATCH_AXIS)(xs, gamma, beta, dout)
    return [np.asarray(out) for out in outs]


def check_coupling(n_features: int = 4, batch: int = 8, seed: int = 0) -> list[tuple[str, float]]:
    """Evaluate the four collectives of the coupled per-example VJP (float64, random data) and
    compare each with its formula in :data:`MEANINGS`; returns ``(meaning, max relative error)``.
    Empty if the jaxpr does not have the expected 2 forward + 2 backward collectives."""
    closed = per_example_bn_grad_jaxpr(n_features, batch, dtype=np.float64)
    phases = [c.phase for c in find_collectives(closed)]
    if phases != [phase for phase, _ in MEANINGS]:
        return []
    rng = np.random.default_rng(seed)
    xs = rng.normal(1.0, 2.0, (batch, n_features))
    dout = rng.normal(size=(batch, n_features))
    gamma, beta = rng.normal(size=n_features), rng.normal(size=n_features)
    mean = xs.mean(axis=0)
    centered = xs - mean
    inv_std = 1.0 / np.sqrt((centered**2).mean(axis=0) + BN_EPS)
    x_hat = centered * inv_std
    expected = (
        xs.sum(axis=0),
        (centered**2).sum(axis=0),
        -gamma * inv_std**2 * (dout * x_hat).sum(axis=0) / (2 * batch),
        -gamma * inv_std * dout.sum(axis=0) / batch,
    )
    got = collective_values(closed, xs, gamma, beta, dout)
    return [
        (meaning, float(np.max(np.abs(value - want) / np.maximum(np.abs(want), 1e-300))))
        for (_, meaning), value, want in zip(MEANINGS, got, expected)
    ]


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

#: The printer indents top-level equations by 4 (a bracket there closes a long equation's params).
_TOP_LEVEL_EQUATION = re.compile(r"^ {4}[^\s\])}]")
STYLE = {FORWARD: "bold cyan", BACKWARD: "bold magenta"}


def _top_level_lines(lines: list[str], jaxpr: jcore.Jaxpr) -> list[int] | None:
    """The printed line on which each top-level equation starts, or None if that cannot be told.

    JAX 0.10 prints nested jaxprs first, as ``let name = { lambda ... } in``, then the top-level
    one; its equations are the 4-space-indented lines after the last ``{ lambda`` (continuation
    lines of a long equation are indented further). Each is checked against its primitive's name.
    """
    starts = [i for i, line in enumerate(lines) if line.startswith("{ lambda")]
    if not starts:
        return None
    candidates = [i for i in range(starts[-1] + 1, len(lines)) if _TOP_LEVEL_EQUATION.match(lines[i])]
    if len(candidates) != len(jaxpr.eqns):
        return None
    for i, eqn in zip(candidates, jaxpr.eqns):
        if not re.search(rf"(^|=)\s*{re.escape(eqn.primitive.name)}(\[|\s|$)", lines[i]):
            return None
    return candidates


def highlighted(jaxpr, found: Sequence[_Found]) -> Text:
    """The printed jaxpr with each line that holds a found equation styled by its phase and
    tagged ``<- forward`` / ``<- backward``. A collective inside a nested jaxpr marks the
    top-level equation that calls it (``<- calls ...``). If the printed layout is not the one
    expected, the jaxpr is returned unstyled."""
    inner = _as_jaxpr(jaxpr)
    lines = str(jaxpr).splitlines()
    line_of = _top_level_lines(lines, inner)
    tags: dict[int, list[_Found]] = {}
    if line_of is not None:
        for item in found:
            tags.setdefault(line_of[item.top_level_index], []).append(item)
    text = Text()
    for i, line in enumerate(lines):
        items = tags.get(i, [])
        if not items:
            text.append(line + "\n")
            continue
        phases = sorted({item.collective.phase for item in items})
        text.append(line, style=STYLE[phases[0]] if len(phases) == 1 else "bold yellow")
        if any(item.nested for item in items):
            calls = ", ".join(f"{item.collective.primitive} ({item.collective.phase})" for item in items)
            text.append(f"   <- calls {calls}\n", style="dim")
        else:
            text.append(f"   <- {phases[0]}\n", style="dim")
    return text


def _counts_phrase(counter: Counter) -> str:
    total = sum(counter.values())
    parts = ", ".join(f"{name} x{n}" for name, n in sorted(counter.items()))
    return f"{total} collective{'s' if total != 1 else ''}" + (f" ({parts})" if parts else "")


def summary_lines(
    collectives: Sequence[Collective], *, coupled: bool = True, checks: Sequence[tuple[str, float]] = ()
) -> list[str]:
    """The counts found, and what each collective sums if :func:`check_coupling` could tell."""
    counts = count_by_phase(collectives)
    forward, backward = counts[FORWARD], counts[BACKWARD]
    lines = [
        f"forward:  {_counts_phrase(forward)}",
        f"backward: {_counts_phrase(backward)}",
    ]
    n_bwd = sum(backward.values())
    if checks:
        lines.append("what each one sums, checked on random float64 data (every example gets the same value):")
        lines += [f"  {meaning}   max rel. err {error:.1e}" for meaning, error in checks]
    elif not coupled and n_bwd == 0:
        lines.append("  stop_gradient on mean and var: nothing to transpose, no coupling in the backward")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compare.jaxpr",
        description="Show the collectives over the 'batch' axis in the jaxpr of the per-example batch-norm gradient.",
    )
    parser.add_argument("--features", type=int, default=4, help="features per example (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="size of the named 'batch' axis (default 8)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--decoupled", action="store_true", help="stop_gradient on the batch mean and variance (no coupling)"
    )
    parser.add_argument(
        "--show-vmapped", action="store_true", help="also print the jaxpr of the vmapped (batched) gradient"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    jax.config.update("jax_enable_x64", True)  # so that float64 traces as float64
    if args.features < 1 or args.batch < 2:
        parser.error("--features must be >= 1 and --batch >= 2")
    coupled = not args.decoupled
    console = Console(highlight=False, soft_wrap=True)

    jaxpr = per_example_bn_grad_jaxpr(args.features, args.batch, dtype=args.dtype, coupled=coupled)
    found = _find(jaxpr, _named_match(BATCH_AXIS), (-1,))
    collectives = [item.collective for item in found]
    what = "batchnorm_train" if coupled else "batchnorm_train with stop_gradient(mean, var)"
    console.rule(f"VJP of per-example {what}, axis_env=[('batch', {args.batch})]")
    console.print("inputs (x, gamma, beta, dout); outputs (out, dx, dgamma_b, dbeta_b)", style="dim")
    console.print(highlighted(jaxpr, found), end="")
    console.rule("collectives over the named axis 'batch'")
    checks = check_coupling(args.features, args.batch) if coupled else []
    for line in summary_lines(collectives, coupled=coupled, checks=checks):
        console.print(line)

    batched = batched_bn_grad_jaxpr(args.features, args.batch, dtype=args.dtype, coupled=coupled)
    found_batched = _find(batched, _batch_match(args.batch), (-1,))
    reductions = [item.collective for item in found_batched]
    console.rule("after jax.vmap: the same program, batched (named axis -> array axis 0)")
    if args.show_vmapped:
        console.print(highlighted(batched, found_batched), end="")
    counts = count_by_phase(reductions)
    console.print(f"forward:  {_counts_phrase(counts[FORWARD]).replace('collective', 'reduction')} over axis 0")
    console.print(f"backward: {_counts_phrase(counts[BACKWARD]).replace('collective', 'reduction')} over axis 0")
    if coupled:
        console.print(
            "  (backward also sums dgamma and dbeta here: gamma and beta are shared by the batch)", style="dim"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
