"""The ensemble layout and its input checks, shared by ``jaxside.ensemble`` and ``numpyside.ensemble``.

An ensemble of ``M`` members is the shared layout of :mod:`compare.contract.layout` with a leading member
axis on every leaf: ``params[i]["weight"]`` is ``(M, in, out)``, ``state[i]["mean"]`` is ``(M, 100)``
(``[]`` with batch norm off). A batch is either shared, ``images (B, 784)`` and ``labels (B,)``, or
one per member, ``(M, B, 784)`` and ``(M, B)``. ``ghost_batches = G`` splits every batch into ``G``
sub-batches of ``B / G`` consecutive examples; ``bn_momentum`` is ``None`` (the contract's 0.1) or
one running-statistics momentum per member, ``(M,)`` in ``[0, 1]``.

Each check raises :class:`compare.contract.InputError` naming the problem; the single-model checks
of :mod:`compare.contract.layout` run on member 0's shapes, so both layouts give the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from compare.contract import layout
from compare.contract.layout import InputError


@dataclass(frozen=True)
class _Leaf:
    """What the contract's checks read of an array: its shape and dtype (one member's)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _members_of(tree: Any, name: str) -> tuple[int | None, list]:
    """The ensemble size of a stacked list of dicts, and the tree of one member's shapes."""
    sizes: set[int] = set()
    member = []
    for i, layer in enumerate(tree):
        if not isinstance(layer, dict):
            raise InputError(f"{name} must be a list of dicts, one per layer (stacked over members)")
        one = {}
        for key, value in layer.items():
            shape = tuple(getattr(value, "shape", np.shape(value)))
            if len(shape) == 0:
                raise InputError(f"{name}[{i}][{key!r}] is a scalar: ensemble leaves need a leading member axis")
            sizes.add(shape[0])
            dtype = np.dtype(getattr(value, "dtype", np.asarray(value).dtype))
            one[key] = _Leaf(shape[1:], dtype)
        member.append(one)
    if len(sizes) > 1:
        found = sorted(
            {(f"{name}[{i}][{k!r}]", np.shape(v)[0]) for i, layer in enumerate(tree) for k, v in layer.items()}
        )
        raise InputError(
            f"the member axes of {name} disagree: leading sizes {sorted(sizes)} "
            f"({', '.join(f'{leaf}: {size}' for leaf, size in found[:4])}, ...); every leaf needs the same M"
        )
    return (sizes.pop() if sizes else None), member


STACK_HINT = (
    "an ensemble needs a leading member axis on every leaf: stack M members with "
    "compare.init.init_ensemble(seeds), or jax.tree.map(lambda *leaves: jnp.stack(leaves), *members) "
    "(for one model use jaxside.model / numpyside.model)"
)


def _is_single_model(check, *args) -> bool:
    try:
        check(*args)
    except InputError:
        return False
    return True


def check_ensemble_params(params: Any) -> tuple[int, bool, np.dtype]:
    """Check stacked parameters; return ``(M, batch_norm, dtype)``."""
    if not isinstance(params, (list, tuple)):
        raise InputError(f"params must be a list of layer dicts stacked over members, got {type(params).__name__}")
    if _is_single_model(layout.check_params, params):
        raise InputError(
            f"params have ONE model's layout (params[0]['weight'] is {np.shape(params[0]['weight'])}): {STACK_HINT}"
        )
    n_members, member = _members_of(params, "params")
    if n_members == 0:
        raise InputError("an ensemble of size 0: the parameters' member axis is empty")
    batch_norm, dtype = layout.check_params(member)
    return n_members, batch_norm, dtype


def check_ensemble_state(state: Any, n_members: int, batch_norm: bool, dtype: np.dtype) -> None:
    """Check stacked running statistics (``[]`` with batch norm off) against ``M`` members."""
    if not batch_norm or state is None or not isinstance(state, (list, tuple)):
        layout.check_state(state, batch_norm, dtype)
        return
    if _is_single_model(layout.check_state, state, batch_norm, dtype):
        raise InputError(
            f"state has ONE model's layout (state[0]['mean'] is {np.shape(state[0]['mean'])}): {STACK_HINT}"
        )
    size, member = _members_of(state, "state")
    layout.check_state(member, batch_norm, dtype)
    if size != n_members:
        raise InputError(f"the member axes disagree: state has {size} members, params have {n_members}")


def check_ensemble_batch(images: Any, labels: Any | None, n_members: int, dtype: np.dtype):
    """Check a shared ``(B, 784)`` or per-member ``(M, B, 784)`` batch (and its labels, if given).

    Returns ``(images, labels, per_member)`` with the images in the parameters' dtype (C-contiguous)
    and the labels as int32 (``(B,)`` or ``(M, B)``, matching the images), or None if not given.
    """
    array = np.asarray(images)
    if array.ndim >= 3 and array.shape[-1] != layout.N_INPUTS:
        raise InputError(
            f"images must have shape (batch, {layout.N_INPUTS}) (shared by every member) or (members, batch, "
            f"{layout.N_INPUTS}) (one batch per member), got {array.shape}"
            + layout.flatten_hint(array.shape, array.ndim - 2)
        )
    per_member = array.ndim == 3
    if per_member:
        if array.shape[0] != n_members:
            raise InputError(
                f"the member axes disagree: images have {array.shape[0]} members (shape {array.shape}), "
                f"params have {n_members}"
            )
        if array.shape[2] != layout.N_INPUTS or array.shape[1] == 0:
            raise InputError(
                f"per-member images must have shape (members, batch, {layout.N_INPUTS}), got {array.shape}"
            )
        flat = layout.check_images(array.reshape(-1, layout.N_INPUTS), dtype)
        images = flat.reshape(array.shape)
    elif array.ndim == 2:
        images = layout.check_images(array, dtype)
    else:
        raise InputError(
            f"images must have shape (batch, {layout.N_INPUTS}) (shared by every member) or "
            f"(members, batch, {layout.N_INPUTS}) (one batch per member), got {array.shape}"
        )
    if labels is None:
        return images, None, per_member
    labels = np.asarray(labels)
    expected = images.shape[:-1]
    if labels.shape != expected:
        what = "one row per member" if per_member else "shared by every member"
        raise InputError(f"labels must have shape {expected} to match the images ({what}), got {labels.shape}")
    checked = layout.check_labels(labels.reshape(-1), labels.size).reshape(expected)
    return images, checked, per_member


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (not a bool); else an InputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_ghost_batches(ghost_batches: Any, batch_size: int, pool_members: bool, batch_norm: bool = True) -> int:
    """``G`` must be a positive integer that divides ``B``; with batch norm, at least 2 examples per
    ghost batch (the variance of one is undefined)."""
    ghost_batches = check_positive_int(ghost_batches, "ghost_batches")
    if batch_size % ghost_batches:
        raise InputError(
            f"ghost_batches={ghost_batches} does not divide the batch size {batch_size}: ghost batches are "
            f"{ghost_batches} equal sub-batches of consecutive examples"
        )
    if ghost_batches > 1 and pool_members:
        raise InputError(
            "pool_members=True with ghost_batches > 1 is not supported: choose statistics pooled over the "
            "members or per ghost batch, not both"
        )
    if batch_norm and not pool_members and ghost_batches == 1:
        layout.check_training_batch_size(batch_size)
    elif batch_norm and not pool_members and batch_size // ghost_batches < 2:
        fits = [g for g in range(1, batch_size // 2 + 1) if batch_size % g == 0]
        raise InputError(
            f"ghost_batches={ghost_batches} splits the batch of {batch_size} into ghost batches of "
            f"{batch_size // ghost_batches} example: batch norm needs at least 2 examples per ghost batch (the "
            f"variance of one is undefined); choose ghost_batches among {fits}"
        )
    return ghost_batches


def check_bn_momentum(bn_momentum: Any, n_members: int, dtype: np.dtype) -> np.ndarray:
    """``None`` means the contract's ``BN_MOMENTUM`` for every member; else an ``(M,)`` array in [0, 1].

    Returns the ``(M,)`` momenta in the parameters' dtype.
    """
    if bn_momentum is None:
        return np.full(n_members, layout.BN_MOMENTUM, dtype)
    array = np.asarray(bn_momentum)
    if array.shape != (n_members,):
        raise InputError(
            f"bn_momentum must be None or one momentum per member, shape ({n_members},), got shape {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"bn_momentum must be real numbers, got dtype {array.dtype}")
    if not np.all((array >= 0) & (array <= 1)):
        bad = array[~((array >= 0) & (array <= 1))][0]
        raise InputError(f"bn_momentum must lie in [0, 1] for every member, found {bad}")
    return array.astype(dtype)


class EnsembleInputs(NamedTuple):
    """What :func:`check_ensemble_inputs` returns: the checked inputs and what they imply."""

    n_members: int
    batch_norm: bool
    dtype: np.dtype
    images: np.ndarray  # (B, 784) shared or (M, B, 784), in the parameters' dtype
    labels: np.ndarray | None  # int32, (B,) or (M, B); None in eval calls
    per_member: bool  # one batch per member
    ghost_batches: int
    bn_momentum: np.ndarray  # (M,) in the parameters' dtype


def check_ensemble_inputs(
    params, state, images, labels=None, *, ghost_batches=1, pool_members=False, bn_momentum=None
) -> EnsembleInputs:
    """Every check of a training call (``labels`` given) or an eval call (``labels=None``: the options
    keep their defaults), in one place."""
    n_members, batch_norm, dtype = check_ensemble_params(params)
    check_ensemble_state(state, n_members, batch_norm, dtype)
    images, labels, per_member = check_ensemble_batch(images, labels, n_members, dtype)
    if not isinstance(pool_members, (bool, np.bool_)):
        raise InputError(f"pool_members must be True or False, got {pool_members!r}")
    if labels is not None:  # training: batch norm's groups need >= 2 examples (eval mode has no groups)
        ghost_batches = check_ghost_batches(ghost_batches, images.shape[-2], bool(pool_members), batch_norm)
        if batch_norm and pool_members:
            layout.check_training_batch_size(n_members * images.shape[-2])
    momentum = check_bn_momentum(bn_momentum, n_members, dtype)
    return EnsembleInputs(n_members, batch_norm, dtype, images, labels, per_member, ghost_batches, momentum)


def per_member_values(value: Any, n_members: int, dtype: np.dtype, name: str) -> np.ndarray:
    """A hyper-parameter given as one number for all members or one per member: ``(M,)`` in ``dtype``."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{name} must be a number or one number per member, got dtype {array.dtype}")
    if array.ndim == 0:
        array = np.full(n_members, array)
    if array.shape != (n_members,):
        raise InputError(f"{name} must be a number or one per member, shape ({n_members},), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} must be finite, got {array}")
    return array.astype(dtype)


def check_epoch(batch_indices: Any, learning_rates: Any, n_members: int, n_examples: int):
    """An epoch's batches, ``(steps, B)`` shared or ``(steps, M, B)`` per member, with indices into
    the training set, and its learning rates, ``(steps,)`` shared or ``(steps, M)`` per member.

    Returns ``(batch_indices int32, learning_rates (steps, M) float64)``.
    """
    indices = np.asarray(batch_indices)
    if indices.ndim not in (2, 3) or (indices.ndim == 3 and indices.shape[1] != n_members) or indices.size == 0:
        raise InputError(
            f"batch_indices must be (steps, B) shared or (steps, {n_members}, B) per member, got {indices.shape}"
        )
    if not np.issubdtype(indices.dtype, np.integer):
        raise InputError(f"batch_indices must be integers, got dtype {indices.dtype}")
    if indices.min() < 0 or indices.max() >= n_examples:
        raise InputError(
            f"batch_indices must lie in 0..{n_examples - 1} (the training set), found {indices.min()}..{indices.max()}"
        )
    rates = np.asarray(learning_rates, dtype=np.float64)
    if rates.ndim == 1:
        rates = np.repeat(rates[:, None], n_members, axis=1)
    if rates.shape != (indices.shape[0], n_members) or not np.all(np.isfinite(rates)):
        raise InputError(
            f"learning_rates must be finite, (steps,) or (steps, {n_members}) with steps = {indices.shape[0]}, "
            f"got shape {np.shape(learning_rates)}"
        )
    return indices.astype(np.int32, copy=False), rates


class TrainingSetup(NamedTuple):
    """What :func:`check_training_setup` returns for an ensemble trainer."""

    n_members: int
    dtype: np.dtype
    images: np.ndarray  # (n, 784), shared by the members
    labels: np.ndarray  # (n,) int32
    momentum: np.ndarray  # (M,) SGD momenta
    bn_momentum: np.ndarray  # (M,) running-statistics momenta
    pool_members: bool
    ghost_batches: int


def check_training_setup(
    params, state, images, labels, *, momentum, bn_momentum=None, pool_members=False, ghost_batches=1
) -> TrainingSetup:
    """Every check an ensemble trainer makes once: the stacked parameters and state, the shared
    training set, the per-member momenta and the batch-norm options (whether ``G`` divides the
    batch size is checked per epoch, when the batch size is known)."""
    n_members, batch_norm, dtype = check_ensemble_params(params)
    check_ensemble_state(state, n_members, batch_norm, dtype)
    images, labels, per_member = check_ensemble_batch(images, labels, n_members, dtype)
    if per_member:
        raise InputError(
            "the training set is shared by the members: pass images (n, 784); per-member batch orders "
            "come from epoch(batch_indices of shape (steps, M, B))"
        )
    if not isinstance(pool_members, (bool, np.bool_)):
        raise InputError(f"pool_members must be True or False, got {pool_members!r}")
    check_positive_int(ghost_batches, "ghost_batches")
    return TrainingSetup(
        n_members,
        dtype,
        images,
        labels,
        per_member_values(momentum, n_members, dtype, "momentum"),
        check_bn_momentum(bn_momentum, n_members, dtype),
        bool(pool_members),
        int(ghost_batches),
    )


def check_member_devices(devices: Any, n_members: int) -> int:
    """``devices`` to split ``n_members`` members over: a positive integer that divides ``n_members``."""
    devices = check_positive_int(devices, "devices")
    if n_members % devices:
        raise InputError(f"devices must divide the number of members: {n_members} members over {devices} devices")
    return devices
