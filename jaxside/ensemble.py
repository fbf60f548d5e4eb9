"""An ensemble of ``M`` batch-normed models in one program: the per-example ``forward_pass``, unchanged,
under the nested ``vmap``s of :mod:`jaxside.transforms` (``ensemble``, ``batch_loss``).
Mirror: :mod:`numpyside.ensemble`; layout and checks: :mod:`compare.contract.ensemble`.

* outer ``vmap`` over members, ``axis_name="member"`` (stacked parameters, state and momenta);
* a ``vmap`` over ghost batches, ``axis_name="ghost"`` (``G`` sub-batches of consecutive examples);
* inner ``vmap`` over examples, ``axis_name="batch"``: batch norm's ``pmean`` runs over ``"batch"``,
  or over ``("member", "batch")`` when the statistics are pooled over the members.

Public API (NumPy in, NumPy out): ``loss_and_grads(params, state, images, labels, *, pool_members,
ghost_batches, bn_momentum) -> (losses (M,), grads, new_state)``, ``predict_logits(params, state,
images) -> (M, B, 10)``, and :class:`Trainer` (an epoch as one jitted ``lax.scan``, per-member
learning rates and momenta as traced ``(M,)`` arrays: one compilation serves a sweep).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from compare.contract import ensemble as ensemble_contract
from jaxside import transforms
from jaxside.devices import checked_devices
from jaxside.layers import BATCH_AXIS
from jaxside.model import check_float64_enabled, example_loss, forward_pass, to_numpy
from jaxside.train import sgd_momentum

MEMBER_AXIS = transforms.MEMBER_AXIS


def _statistics_axes(pool_members: bool) -> str | tuple[str, str]:
    """Batch norm's axes: each member's own batch, or every member's (pooled statistics)."""
    return (MEMBER_AXIS, BATCH_AXIS) if pool_members else BATCH_AXIS


def member_forward(
    params,
    state,
    images: Float[Array, "batch x"],
    bn_momentum: Float[Array, ""],
    *,
    pool_members: bool,
    ghost_batches: int,
):
    r"""One member's training-mode logits ``(B, 10)`` and new running statistics:
    :func:`jaxside.transforms.batch_apply` of ``forward_pass``.

    The batch is split into ``G`` ghost batches of ``n = B / G`` consecutive examples, each
    normalised with its own statistics (``pmean`` over ``"batch"``; with ``pool_members``, over
    ``("member", "batch")``, i.e. all ``M x B`` examples). Each ghost batch's ``forward_pass``
    returns its momentum step; the new state is their mean over the ghosts,
    ``(1 - m) r + m \tfrac1G \sum_g \mu_g`` (and the unbiased variances alike).
    """
    forward = functools.partial(forward_pass, train=True, axis_name=_statistics_axes(pool_members))
    return transforms.batch_apply(forward, ghost_batches=ghost_batches)(params, state, images, bn_momentum=bn_momentum)


def batch_loss_and_grads(
    params, state, images, labels, bn_momentum, *, per_member: bool, pool_members: bool, ghost_batches: int
):
    """Every member's loss, gradients and new running statistics: :func:`jaxside.transforms.ensemble`
    of ``with_grads(batch_loss(example_loss))``, the member ``vmap`` around the batch ``vmap``.

    With pooled statistics the transposed ``pmean`` over ``("member", "batch")`` carries cotangents
    across members, so member ``k``'s gradient is that of the SUM of the members' losses.
    """
    example = functools.partial(example_loss, train=True, axis_name=_statistics_axes(pool_members))
    member_step = transforms.with_grads(transforms.batch_loss(example, ghost_batches=ghost_batches))
    step = transforms.ensemble(member_step, shared_batch=not per_member)
    return step(params, state, images, labels, bn_momentum=bn_momentum)


_loss_and_grads = jax.jit(batch_loss_and_grads, static_argnames=("per_member", "pool_members", "ghost_batches"))


@functools.partial(jax.jit, static_argnames=("per_member",))
def _predict_logits(params, state, images, *, per_member: bool):
    forward = transforms.batch_apply(functools.partial(forward_pass, train=False))
    return transforms.ensemble(forward, shared_batch=not per_member)(params, state, images)[0]


def loss_and_grads(params, state, images, labels, *, pool_members=False, ghost_batches=1, bn_momentum=None):
    """Per-member training-mode losses ``(M,)``, gradients and new running statistics (stacked).

    ``images`` ``(B, 784)`` (every member sees the same batch) or ``(M, B, 784)`` (each its own);
    ``labels`` ``(B,)`` or ``(M, B)`` to match. Bad input raises :class:`compare.contract.InputError`.
    """
    checked = ensemble_contract.check_ensemble_inputs(
        params, state, images, labels, ghost_batches=ghost_batches, pool_members=pool_members, bn_momentum=bn_momentum
    )
    check_float64_enabled(checked.dtype)
    losses, grads, new_state = _loss_and_grads(
        params,
        list(state or []),
        checked.images,
        checked.labels,
        checked.bn_momentum,
        per_member=checked.per_member,
        pool_members=bool(pool_members),
        ghost_batches=checked.ghost_batches,
    )
    return np.asarray(losses), to_numpy(grads), to_numpy(new_state)


def predict_logits(params, state, images) -> np.ndarray:
    """Eval-mode logits ``(M, B, 10)`` (running statistics; independent of any ghost batching)."""
    checked = ensemble_contract.check_ensemble_inputs(params, state, images)
    check_float64_enabled(checked.dtype)
    return np.asarray(_predict_logits(params, list(state or []), checked.images, per_member=checked.per_member))


# ------------------------------------------------------------------------------------------------
# training: an epoch as one jitted lax.scan; per-member hyper-parameters are traced (M,) arrays
# ------------------------------------------------------------------------------------------------


def train_epoch(
    params,
    velocity,
    state,
    images: Float[Array, "n x"],
    labels: Int[Array, " n"],
    batch_indices: Int[Array, "steps *members batch"],
    learning_rates: Float[Array, "steps members"],
    momentum: Float[Array, " members"],
    bn_momentum: Float[Array, " members"],
    *,
    pool_members: bool,
    ghost_batches: int,
):
    """One epoch for all members: ``lax.scan`` of (gather batch, :func:`batch_loss_and_grads`,
    per-member SGD step) over ``batch_indices`` (``(steps, B)`` shared or ``(steps, M, B)`` per member).

    Member ``k`` steps with ``learning_rates[:, k]`` and SGD momentum ``momentum[k]``, both traced.
    Returns the new ``(params, velocity, state)`` and the per-step losses ``(steps, M)``.
    """
    per_member = batch_indices.ndim == 3

    def step(carry, step_inputs):
        params, velocity, state = carry
        indices, lr = step_inputs
        losses, grads, state = batch_loss_and_grads(
            params,
            state,
            images[indices],
            labels[indices],
            bn_momentum,
            per_member=per_member,
            pool_members=pool_members,
            ghost_batches=ghost_batches,
        )
        params, velocity = jax.vmap(sgd_momentum)(params, velocity, grads, lr, momentum)
        return (params, velocity, state), losses

    (params, velocity, state), losses = jax.lax.scan(step, (params, velocity, state), (batch_indices, learning_rates))
    return params, velocity, state, losses


_train_epoch_jit = jax.jit(train_epoch, static_argnames=("pool_members", "ghost_batches"), donate_argnums=(0, 1, 2))

#: Compiled epochs, keyed by everything XLA specialises on (shapes, dtypes, static options).
_COMPILED: dict = {}


def compile_count() -> int:
    """How many epoch programs have been compiled in this process (a sweep over learning rates,
    SGD momenta and BN momenta of the same shapes adds exactly one)."""
    return len(_COMPILED)


class Trainer:
    """All members' device buffers and the training set; one ``epoch()`` per call.

    ``momentum`` (SGD) is a number or an ``(M,)`` array, ``bn_momentum`` None (0.1) or ``(M,)``;
    learning rates come per step, ``(steps,)`` shared or ``(steps, M)`` per member. All of them are
    traced: a Trainer with other values but the same shapes reuses the compiled epoch
    (:func:`compile_count`).

    ``devices = D`` splits the member axis over the first ``D`` devices (``D`` must divide ``M``):
    the parameters, velocities, running statistics and per-member values are placed sharded along
    their leading axis, the training set replicated, and ``jit`` partitions the same epoch program
    (computation follows data). Unpooled members never talk to each other, so each device trains
    its ``M / D`` members on its own; pooled statistics become an all-reduce across the devices.
    On CPU, ``D`` host devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` before
    JAX starts (:mod:`jaxside.devices`).
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
        devices: int = 1,
    ):
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
        check_float64_enabled(setup.dtype)
        self.n_members, self.dtype = setup.n_members, setup.dtype
        self.pool_members, self.ghost_batches = setup.pool_members, setup.ghost_batches
        self.params = jax.tree_util.tree_map(lambda a: jnp.array(a, dtype=setup.dtype), params)
        self.velocity = jax.tree_util.tree_map(jnp.zeros_like, self.params)
        self.state = jax.tree_util.tree_map(lambda a: jnp.array(a, dtype=setup.dtype), list(state or []))
        self.images, self.labels = jax.device_put(setup.images), jax.device_put(setup.labels)
        self.momentum = jnp.asarray(setup.momentum)
        self.bn_momentum = jnp.asarray(setup.bn_momentum)
        self.devices = ensemble_contract.check_member_devices(devices, self.n_members)
        self._by_member = self._replicated = None
        if self.devices > 1:
            mesh = jax.sharding.Mesh(np.array(checked_devices(self.devices)), ("members",))
            self._by_member = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("members"))
            self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self.params, self.velocity, self.state, self.momentum, self.bn_momentum = jax.device_put(
                (self.params, self.velocity, self.state, self.momentum, self.bn_momentum), self._by_member
            )
            self.images, self.labels = jax.device_put((self.images, self.labels), self._replicated)

    def _epoch_args(self, batch_indices, learning_rates):
        batch_indices, rates = ensemble_contract.check_epoch(
            batch_indices, learning_rates, self.n_members, self.images.shape[0]
        )
        ensemble_contract.check_ghost_batches(
            self.ghost_batches, batch_indices.shape[-1], self.pool_members, bool(self.state)
        )
        batch_indices, rates = jnp.asarray(batch_indices, jnp.int32), jnp.asarray(rates, self.dtype)
        if self.devices > 1:  # (steps, M, B) and (steps, M): the member axis is the second
            spec = jax.sharding.PartitionSpec(None, "members")
            per_member = jax.sharding.NamedSharding(self._by_member.mesh, spec)
            batch_indices = jax.device_put(batch_indices, per_member if batch_indices.ndim == 3 else self._replicated)
            rates = jax.device_put(rates, per_member)
        return (
            self.params,
            self.velocity,
            self.state,
            self.images,
            self.labels,
            batch_indices,
            rates,
            self.momentum,
            self.bn_momentum,
        )

    def _compiled(self, args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (
            tree,
            tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves),
            self.pool_members,
            self.ghost_batches,
            self.devices,
        )
        if key not in _COMPILED:
            statics = dict(pool_members=self.pool_members, ghost_batches=self.ghost_batches)
            _COMPILED[key] = _train_epoch_jit.lower(*args, **statics).compile()
        return _COMPILED[key]

    def compile(self, steps: int, batch_size: int, *, per_member_batches: bool = False) -> float:
        """Compile the epoch for ``steps`` batches of ``batch_size`` ahead of time; return the seconds."""
        start = time.perf_counter()
        shape = (steps, self.n_members, batch_size) if per_member_batches else (steps, batch_size)
        self._compiled(self._epoch_args(np.zeros(shape, np.int32), np.zeros(steps)))
        return time.perf_counter() - start

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train every member on its batches; return the per-step losses ``(steps, M)``."""
        args = self._epoch_args(batch_indices, learning_rates)
        self.params, self.velocity, self.state, losses = self._compiled(args)(*args)
        return np.asarray(losses)

    def predict_logits(self, images) -> np.ndarray:
        """Eval-mode logits ``(M, n, 10)`` of shared images ``(n, 784)``."""
        images, _, per_member = ensemble_contract.check_ensemble_batch(images, None, self.n_members, self.dtype)
        return np.asarray(_predict_logits(self.params, self.state, jnp.asarray(images), per_member=per_member))

    def predict(self, images) -> np.ndarray:
        """Eval-mode class predictions ``(M, n)``."""
        return np.argmax(self.predict_logits(images), axis=-1)

    def params_numpy(self):
        return to_numpy(self.params)

    def state_numpy(self):
        return to_numpy(self.state)
