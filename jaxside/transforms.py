r"""The "more vmap" transforms for ANY per-example model: a batch, ghost batches, an ensemble,
per-example gradients, data parallelism over a mesh. Pytrees in, pytrees out; traceable, jit-able.

A *per-example function* sees ONE example and reaches the others only through collectives on a
named axis (``jax.lax.pmean(x, "batch")``, ``eqx.nn.BatchNorm(axis_name="batch")``,
``flax.linen.BatchNorm(axis_name="batch")``): ``f(params, state, *example, **hyper) -> (output,
new_state)``, ``params`` and ``state`` any pytrees of arrays, ``hyper`` keyword hyper-parameters
the same for every example. Every transform returns ``fn(params, state, *batch, **hyper)``:
:func:`batch_apply` / :func:`batch_loss` (``vmap`` over ``"batch"``, ghost batches over
``"ghost"``), :func:`with_grads`, :func:`per_example_grads`, :func:`ensemble` / :func:`ensemble_loss`
(``vmap`` over ``"member"``; :func:`ensemble_probabilities`, :func:`ensemble_accuracy`) and
:func:`data_parallel` (``shard_map`` over a mesh axis the caller names; :func:`device_mean`).

Which examples batch norm's statistics cover is said by the axis names the USER's collectives
name: ``"batch"`` alone gives each member, ghost batch or device its own statistics;
``("member", "batch")`` pools them over the members, ``("device", "batch")`` over the devices
(synchronised batch norm). Our MLP is these transforms applied to ``forward_pass``
(:mod:`jaxside.model`, :mod:`jaxside.ensemble`, :mod:`jaxside.parallel`);
``docs/bring_your_own_model.md`` applies them to Equinox and Flax models.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree, Shaped

from compare.contract import InputError

BATCH_AXIS = "batch"
GHOST_AXIS = "ghost"
MEMBER_AXIS = "member"
DEVICE_AXIS = "device"

AxisName = str | tuple[str, ...]
Fn = Callable[..., Any]


class UnboundAxisError(NameError):
    """A collective in the user's function names an axis that no enclosing transform binds."""


class StateNotSharedError(InputError):
    """The per-example function returned a ``new_state`` that differs between the examples."""


# ------------------------------------------------------------------------------------------------
# checks, made once at trace time (shapes are static), and JAX's errors said in terms of the fix
# ------------------------------------------------------------------------------------------------

_UNBOUND = re.compile(r"unbound axis name: ([^\s.]+)")
_STATE_BATCHED = re.compile(r"got axis spec None but output was batched|has mapped output .*but out_axes is None")
_FIX_NAMES = (
    "name the same axis in the function's collectives (jax.lax.pmean(x, {axis!r}), "
    "eqx.nn.BatchNorm(..., axis_name={axis!r}), flax.linen.BatchNorm(axis_name={axis!r}))"
)


@contextlib.contextmanager
def _explained(transform: str, axis_name: AxisName):
    """Re-raise JAX's errors about axis names with what the user's function got wrong, and the fix."""
    try:
        yield
    except NameError as error:
        match = _UNBOUND.search(str(error))
        if type(error) is not NameError or match is None:  # ours (already explained) or the user's own
            raise
        raise UnboundAxisError(
            f"the function given to {transform} reaches across an axis named {match.group(1)!r} (a collective "
            f"such as jax.lax.pmean(x, {match.group(1)!r})), but no enclosing transform binds that name: "
            f"{transform} binds {axis_name!r}. Either pass axis_name={match.group(1)!r} to {transform}, or "
            + _FIX_NAMES.format(axis=axis_name)
            + ", or wrap it in the transform that binds it (ensemble(..., axis_name=...), data_parallel(mesh, ...))"
        ) from error
    except ValueError as error:
        if not _STATE_BATCHED.search(str(error)):
            raise
        raise StateNotSharedError(
            f"the new_state returned by the function given to {transform} differs between the examples of "
            f"axis {axis_name!r}: a per-example function must compute its state only from collectives over the "
            f"batch (running statistics from jax.lax.pmean(x, {axis_name!r})). Did its batch norm forget the axis "
            f"name? " + _FIX_NAMES.format(axis=axis_name)
        ) from error


def _check_array_leaves(tree: PyTree, name: str) -> None:
    """Every leaf is mapped or differentiated, so it must be an array (or a number)."""
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            raise InputError(
                f"{name}{jtu.keystr(path)} is a {type(leaf).__name__}, not an array: the transforms map "
                f"and differentiate every leaf of {name}, so split the model into its arrays and the rest first "
                "(Equinox: params, static = eqx.partition(model, eqx.is_inexact_array); Flax linen: "
                "variables['params'] and variables['batch_stats'])"
            )


def _leading_size(trees: tuple, what: str) -> int:
    """The common size of axis 0 of every leaf of ``trees``, or an error naming the sizes."""
    sizes = {}
    for i, tree in enumerate(trees):
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
            shape = np.shape(leaf)
            where = f"batch argument {i}{jtu.keystr(path)}"
            if not shape:
                raise InputError(f"{where} is a scalar: {what} need a leading batch axis")
            sizes.setdefault(shape[0], f"{where} {shape}")
    if len(sizes) > 1:
        raise InputError(f"{what} disagree on their leading size: " + ", ".join(sizes.values()))
    if not sizes:
        raise InputError(f"no {what} given")
    return next(iter(sizes))


def _check_ghosts(ghost_batches: int, batch_size: int) -> None:
    if batch_size % ghost_batches or batch_size // ghost_batches < 2:
        fits = [g for g in range(1, batch_size // 2 + 1) if batch_size % g == 0]
        raise InputError(
            f"ghost_batches={ghost_batches} cannot split a batch of {batch_size} examples into ghost batches of "
            f"at least 2 equal examples ({batch_size / ghost_batches:g} each): batch norm's variance needs 2 or "
            f"more per ghost batch; choose ghost_batches among {fits}"
        )


def _ghost_mean(states: PyTree) -> PyTree:
    """The ghost batches' new states, ``(G, ...)`` leaves, averaged: floating leaves by their mean
    (the running statistics' momentum step is linear), others (counters) ghost 0's."""
    return jtu.tree_map(lambda s: s.mean(axis=0) if jnp.issubdtype(s.dtype, jnp.inexact) else s[0], states)


_ARRAYS = (jax.Array, np.ndarray, np.generic)


def _split_arrays(tree: PyTree) -> tuple[list, Callable[[list], PyTree]]:
    """The array leaves of ``tree`` (what a ``vmap`` or ``shard_map`` may take as arguments), and how to
    put them back; other leaves (flags, strings, Python numbers) stay in ``tree``, closed over."""
    leaves, treedef = jtu.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, _ARRAYS)]

    def rebuild(arrays: list) -> PyTree:
        merged = list(leaves)
        for i, array in zip(where, arrays):
            merged[i] = array
        return jtu.tree_unflatten(treedef, merged)

    return [leaves[i] for i in where], rebuild


# ------------------------------------------------------------------------------------------------
# a batch: vmap over the examples (and over ghost batches)
# ------------------------------------------------------------------------------------------------


def batch_apply(
    per_example_fn: Fn, axis_name: AxisName = BATCH_AXIS, *, ghost_batches: int = 1, ghost_axis_name: str = GHOST_AXIS
) -> Fn:
    r"""``per_example_fn(params, state, *example, **hyper) -> (output, new_state)`` over a batch:
    ``fn(params, state, *batch, **hyper) -> (outputs with a leading B axis, new_state)``.

    ``jax.vmap`` over axis 0 of every ``batch`` argument, named ``axis_name``; ``params``, ``state``
    and ``hyper`` are the same for every example. ``new_state`` leaves the ``vmap`` unbatched
    (``out_axes=None``): the function's collectives made it the same for every example.

    ``ghost_batches = G`` splits the batch into ``G`` ghost batches of ``n = B / G`` consecutive
    examples under a second ``vmap`` named ``ghost_axis_name``, so collectives over ``axis_name``
    reduce within a ghost batch; the new state is the ghost batches' mean, which for running
    statistics with momentum ``m`` is :math:`(1 - m)\, r + m \tfrac1G \sum_g \mu_g`.
    ``G = 1`` adds no ``vmap`` at all.
    """
    if isinstance(ghost_batches, bool) or not isinstance(ghost_batches, (int, np.integer)) or ghost_batches < 1:
        raise InputError(f"ghost_batches must be a positive integer, got {ghost_batches!r}")
    ghost_batches = int(ghost_batches)

    def fn(params: PyTree, state: PyTree, *batch: PyTree[Shaped[Array, "batch ..."]], **hyper):
        _check_array_leaves(params, "params")
        _check_array_leaves(state, "state")
        size = _leading_size(batch, "the batch arguments (images, labels, ...)")

        def one_batch(*examples):
            per_example = functools.partial(per_example_fn, params, state, **hyper)
            return jax.vmap(per_example, axis_name=axis_name, out_axes=(0, None))(*examples)

        with _explained("batch_apply" if ghost_batches == 1 else "batch_apply(ghost_batches=...)", axis_name):
            if ghost_batches == 1:
                return one_batch(*batch)
            _check_ghosts(ghost_batches, size)
            ghosts = jtu.tree_map(lambda a: a.reshape(ghost_batches, size // ghost_batches, *a.shape[1:]), batch)
            outputs, states = jax.vmap(one_batch, axis_name=ghost_axis_name)(*ghosts)
            outputs = jtu.tree_map(lambda a: a.reshape(size, *a.shape[2:]), outputs)
            return outputs, _ghost_mean(states)

    return fn


def batch_loss(
    per_example_loss: Fn, axis_name: AxisName = BATCH_AXIS, *, ghost_batches: int = 1, ghost_axis_name: str = GHOST_AXIS
) -> Fn:
    r"""``per_example_loss(params, state, x, y, **hyper) -> (loss, new_state)`` to the batch's mean loss:
    ``f(params, state, images, labels, **hyper) -> (L, new_state)``,

    .. math:: L = \tfrac1B \textstyle\sum_{b=1}^{B} \ell(x_b, y_b),

    where each :math:`\ell(x_b, y_b)` is computed per example under ``jax.vmap(..., axis_name=axis_name)``
    (:func:`batch_apply`, ghost batches included). ``jax.grad`` of ``L`` is the batch gradient:
    the transposed collectives carry every example's cotangent to the others.
    """
    per_batch = batch_apply(per_example_loss, axis_name, ghost_batches=ghost_batches, ghost_axis_name=ghost_axis_name)

    def loss(
        params: PyTree, state: PyTree, images: Shaped[Array, "batch ..."], labels: Shaped[Array, "batch ..."], **hyper
    ) -> tuple[Float[Array, ""], PyTree]:
        losses, new_state = per_batch(params, state, images, labels, **hyper)
        if losses.ndim != 1:
            raise InputError(f"per_example_loss must return a scalar loss per example, got shape {losses.shape[1:]}")
        return losses.mean(), new_state

    return loss


def with_grads(batch_fn: Fn) -> Fn:
    """``batch_fn(params, state, *batch, **hyper) -> (loss, new_state)`` and its gradient with respect
    to ``params``: ``fn(params, state, *batch, **hyper) -> (loss, grads, new_state)``, ``grads`` shaped
    like ``params`` (``jax.value_and_grad(..., has_aux=True)``)."""

    def fn(params: PyTree, state: PyTree, *batch: PyTree, **hyper) -> tuple[Float[Array, ""], PyTree, PyTree]:
        (loss, new_state), grads = jax.value_and_grad(lambda p: batch_fn(p, state, *batch, **hyper), has_aux=True)(
            params
        )
        return loss, grads, new_state

    return fn


def per_example_grads(per_example_loss: Fn, axis_name: AxisName = BATCH_AXIS) -> Fn:
    r"""``h(params, state, images, labels, **hyper) -> (losses (B,), grads (B, ...), new_state)``:
    ``jax.vmap(jax.value_and_grad(per_example_loss), axis_name=axis_name)``, nothing batched by hand.

    With batch norm (collectives over ``axis_name``) :math:`g_b` is the per-row term of the batch
    backward of :math:`S = \sum_b \ell_b`: every example's backward receives the coupling sums of all
    examples' cotangents, and the parameters are an argument of the per-example function, so

    .. math:: g_b = \frac{\partial S(\theta_1, \dots, \theta_B)}{\partial \theta_b}\Big|_{\theta_b = \theta},
              \qquad \textstyle\sum_b g_b = \nabla S = B\, \nabla L

    (example ``b`` run with its own copy :math:`\theta_b` of the parameters). Not the gradient of
    :math:`\ell_b` alone; see ``docs/per_example_gradients.md``.
    """

    def h(
        params: PyTree, state: PyTree, images: Shaped[Array, "batch ..."], labels: Shaped[Array, "batch ..."], **hyper
    ) -> tuple[Float[Array, " batch"], PyTree, PyTree]:
        _check_array_leaves(params, "params")
        _check_array_leaves(state, "state")
        _leading_size((images, labels), "images and labels")
        one_example = jax.value_and_grad(functools.partial(per_example_loss, **hyper), has_aux=True)
        vmapped = jax.vmap(one_example, in_axes=(None, None, 0, 0), axis_name=axis_name, out_axes=((0, None), 0))
        with _explained("per_example_grads", axis_name):
            (losses, new_state), grads = vmapped(params, state, images, labels)
        return losses, grads, new_state

    return h


# ------------------------------------------------------------------------------------------------
# an ensemble: vmap over members
# ------------------------------------------------------------------------------------------------

_STACK_HINT = (
    "the ensemble maps axis 0 of every leaf of params and state over the members; if these are ONE model's "
    "parameters, stack M members: jax.tree.map(lambda *leaves: jnp.stack(leaves), *members) (our MLP: "
    "compare.init.init_ensemble(seeds))"
)


def _member_count(params: PyTree, state: PyTree) -> int:
    sizes: dict[int, str] = {}
    for name, tree in (("params", params), ("state", state)):
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
            shape = np.shape(leaf)
            where = f"{name}{jtu.keystr(path)}"
            if not shape:
                raise InputError(f"{where} is a scalar, without a member axis: {_STACK_HINT}")
            sizes.setdefault(shape[0], f"{where} {shape}")
    if len(sizes) != 1:
        found = ", ".join(sizes.values()) if sizes else "no array leaves"
        raise InputError(f"the leading (member) sizes of params and state disagree: {found}; {_STACK_HINT}")
    return next(iter(sizes))


def _hyper_axes(hyper: dict, n_members: int) -> list:
    """For each hyper-parameter array (in :func:`_split_arrays`' order): 0 if it holds one value per
    member (leading axis M), None if it is a scalar shared by all."""
    axes = []
    for path, leaf in jtu.tree_flatten_with_path(hyper)[0]:
        if not isinstance(leaf, _ARRAYS):
            continue
        shape = np.shape(leaf)
        if shape and shape[0] != n_members:
            raise InputError(
                f"hyper-parameter {path[0].key}{jtu.keystr(path[1:])} has shape {shape}, but the ensemble has "
                f"{n_members} members: give one value per member (leading axis {n_members}) or a scalar for all"
            )
        axes.append(0 if shape else None)
    return axes


def ensemble(batch_fn: Fn, *, axis_name: str = MEMBER_AXIS, shared_batch: bool = True) -> Fn:
    r"""``batch_fn(params, state, *batch, **hyper) -> outputs`` for ``M`` members in one program:
    ``g(params, state, *batch, **hyper) -> outputs with a leading M axis``.

    ``jax.vmap`` named ``axis_name`` over axis 0 of every leaf of ``params`` and ``state`` (stacked
    members), of every non-scalar hyper-parameter (one value per member: learning rates, momenta;
    scalars are shared) and, with ``shared_batch=False``, of the batch arguments (one batch per
    member, ``(M, B, ...)``). Members meet only where the function's collectives name ``axis_name``:
    batch norm over ``(axis_name, "batch")`` pools the statistics of all :math:`M \times B` examples
    (and ``jax.grad`` inside then gives each member the gradient of the SUM of the members' losses).
    """

    def g(params: PyTree, state: PyTree, *batch: PyTree, **hyper):
        n_members = _member_count(params, state)
        if not shared_batch:
            for i, array in enumerate(jtu.tree_leaves(batch)):
                if np.shape(array)[:1] != (n_members,):
                    raise InputError(
                        f"shared_batch=False: batch argument {i} needs a leading member axis of {n_members} (one "
                        f"batch per member, (members, batch, ...)), got shape {np.shape(array)}; for one batch "
                        "shared by every member use shared_batch=True"
                    )
        arrays, rebuild = _split_arrays(hyper)
        in_axes = (0, 0, *[None if shared_batch else 0] * len(batch), _hyper_axes(hyper, n_members))

        def one_member(p, s, *args):
            *member_batch, member_arrays = args
            return batch_fn(p, s, *member_batch, **rebuild(member_arrays))

        with _explained("ensemble", axis_name):
            return jax.vmap(one_member, in_axes=in_axes, axis_name=axis_name)(params, state, *batch, arrays)

    return g


def ensemble_loss(f: Fn, *, axis_name: str = MEMBER_AXIS, shared_batch: bool = True) -> Fn:
    """:func:`ensemble` of a batch loss ``f(params, state, images, labels, **hyper) -> (loss, new_state)``
    (:func:`batch_loss`): ``g(params, state, images, labels, **hyper) -> (losses (M,), new_state)``,
    each leaf of ``new_state`` with its leading member axis. ``jax.grad`` of ``losses.sum()`` is
    every member's gradient at once (members are independent unless their statistics are pooled)."""
    return ensemble(f, axis_name=axis_name, shared_batch=shared_batch)


def ensemble_probabilities(member_logits: Float[Array, "members batch classes"]) -> Float[Array, "batch classes"]:
    r"""The ensemble's averaged prediction, the mean of the members' softmax:
    :math:`p(c \mid x) = \tfrac1M \sum_k \mathrm{softmax}(z_k(x))_c`."""
    if jnp.ndim(member_logits) != 3:
        raise InputError(f"member_logits must be (members, batch, classes), got shape {jnp.shape(member_logits)}")
    return jax.nn.softmax(member_logits, axis=-1).mean(axis=0)


def ensemble_accuracy(member_logits: Float[Array, "members batch classes"], labels: Int[Array, " batch"]):
    r"""The fraction of examples whose label is the argmax of :func:`ensemble_probabilities`."""
    predicted = jnp.argmax(ensemble_probabilities(member_logits), axis=-1)
    if jnp.shape(labels) != predicted.shape:
        raise InputError(f"labels must have shape {predicted.shape} to match the logits, got {jnp.shape(labels)}")
    return jnp.mean(predicted == labels)


# ------------------------------------------------------------------------------------------------
# data parallel: the batch split over a mesh axis, the outputs averaged over its devices
# ------------------------------------------------------------------------------------------------


def device_mean(tree: PyTree, axis_name: str) -> PyTree:
    r"""Every floating leaf averaged over the devices of mesh axis ``axis_name``,
    :math:`\tfrac1D \sum_d t_d`, in ONE ``pmean`` of all of them flattened into one vector (one
    round of communication, not one per leaf); other leaves (counters) are returned as they are.

    For per-device means over equal blocks of a batch (a loss, its gradients, running statistics)
    this is the mean over the whole batch. Call it inside ``jax.shard_map`` (:func:`data_parallel`).
    """
    leaves, treedef = jtu.tree_flatten(tree)
    floating = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    if floating:
        flat, unflatten = jax.flatten_util.ravel_pytree([leaves[i] for i in floating])
        for i, mean in zip(floating, unflatten(jax.lax.pmean(flat, axis_name))):
            leaves[i] = mean
    return jtu.tree_unflatten(treedef, leaves)


def _reduce_outputs(outputs: PyTree, split_outputs: PyTree, axis_name: str) -> PyTree:
    """:func:`device_mean` of the outputs that ``split_outputs`` (a prefix of bools) does not mark split."""
    marks = jtu.tree_map(lambda split, sub: jtu.tree_map(lambda _: split, sub), split_outputs, outputs)
    leaves, treedef = jtu.tree_flatten(outputs)
    kept = treedef.flatten_up_to(marks)
    reduced = iter(device_mean([leaf for leaf, split in zip(leaves, kept) if not split], axis_name))
    return jtu.tree_unflatten(treedef, [leaf if split else next(reduced) for leaf, split in zip(leaves, kept)])


def data_parallel(f: Fn, mesh: Mesh, axis_name: str, *, split_outputs: PyTree = False) -> Fn:
    r"""``f(params, state, *batch, **hyper)`` with every batch argument split over the devices of the
    mesh axis ``axis_name`` (device ``d`` gets the ``d``-th block of consecutive examples), ``params``,
    ``state`` and ``hyper`` replicated; same signature and results as ``f`` on the whole batch.

    Each device runs ``f`` on its block; the outputs are then averaged over the devices
    (:func:`device_mean`): for ``f`` = a mean loss, its gradients and the new running statistics,
    the mean over the whole batch. ``split_outputs`` (a bool or a prefix pytree of bools, e.g.
    ``(True, True, False)`` for :func:`per_example_grads`) marks outputs with a leading batch axis,
    which are concatenated instead. Batch norm's statistics are:

    * **synchronised** (those of the whole batch, as on one device) when the user's collectives
      name the mesh axis as well as the batch axis, ``axis_name=(axis_name, "batch")``;
    * **per device** (ghost batch norm with one ghost batch per device; running statistics averaged
      over the devices) when they name ``"batch"`` only.

    ``jax.shard_map(..., check_vma=False)``: jax 0.10.2 refuses a ``pmean`` over a ``vmap`` axis
    inside ``shard_map`` otherwise; every unsplit output is reduced over ``axis_name`` here, so
    it IS replicated, as ``out_specs=P()`` says. Wrap the result in ``jax.jit``.
    """
    if not isinstance(mesh, Mesh) or axis_name not in mesh.axis_names:
        found = mesh.axis_names if isinstance(mesh, Mesh) else type(mesh).__name__
        raise InputError(f"data_parallel needs a jax.sharding.Mesh with an axis named {axis_name!r}, got {found}")
    n_devices = mesh.shape[axis_name]
    out_specs = jtu.tree_map(lambda split: P(axis_name) if split else P(), split_outputs)

    def on_device(params, state, batch, hyper_arrays, rebuild):
        return _reduce_outputs(f(params, state, *batch, **rebuild(hyper_arrays)), split_outputs, axis_name)

    def fn(params: PyTree, state: PyTree, *batch: PyTree[Shaped[Array, "batch ..."]], **hyper):
        size = _leading_size(batch, "the batch arguments (images, labels, ...)")
        if size % n_devices:
            raise InputError(
                f"a batch of {size} examples cannot be split evenly over the {n_devices} devices of mesh axis "
                f"{axis_name!r}: choose a batch size divisible by {n_devices}"
            )
        arrays, rebuild = _split_arrays(hyper)
        sharded = jax.shard_map(
            functools.partial(on_device, rebuild=rebuild),
            mesh=mesh,
            in_specs=(P(), P(), P(axis_name), P()),
            out_specs=out_specs,
            check_vma=False,
        )
        with _explained("data_parallel", axis_name):
            return sharded(params, state, batch, arrays)

    return fn
