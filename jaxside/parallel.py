r"""Data-parallel training of the per-example model, batch norm synchronised across devices:
:func:`jaxside.transforms.data_parallel` applied to our ``forward_pass``, plus NumPy in/out, the
placement of arrays over processes, and an epoch as one program.

``jax.shard_map`` splits every batch over the 1-D mesh axis ``axis_name`` (default ``"device"``;
device ``d`` holds the ``d``-th block of consecutive examples). On each device ``forward_pass`` is
vmapped over the local examples (axis ``"batch"``), and batch norm's ``pmean`` reduces over
``(axis_name, "batch")``: the mean and variance of the whole batch, as on one device. ``jax.grad``
runs per device on the mean loss of its block; :func:`jaxside.transforms.device_mean` averages the
loss, the gradients and the running statistics over the devices in one ``pmean`` (equal blocks:
the mean over the whole batch), so parameters and running statistics stay replicated.
``sync_batch_norm=False`` gives each device its own statistics (ghost batch norm with one ghost
batch per device); the running statistics are then the mean over devices of the updated ones.

``check_vma=False`` is needed (jax 0.10.2: a ``pmean`` over a vmap axis inside ``shard_map``
raises otherwise). It also switches off the check that ``out_specs=P()`` outputs are replicated:
an output not reduced over the mesh axis would silently come back as device 0's.
:func:`per_device_results` returns every device's copy, and the tests check that they agree.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compare import contract
from compare.contract import InputError
from jaxside import transforms
from jaxside.layers import BATCH_AXIS
from jaxside.model import check_float64_enabled, check_inputs, example_loss, forward_pass
from jaxside.train import predict_classes, sgd_momentum

#: The mesh axis the batch is split over, unless the caller names another.
DEVICE_AXIS = transforms.DEVICE_AXIS


# ----------------------------------------------------------------------------------------------
# the mesh and the placement of arrays on it
# ----------------------------------------------------------------------------------------------


def make_mesh(devices=None, axis_name: str = DEVICE_AXIS) -> Mesh:
    """A 1-D mesh named ``axis_name`` over ``devices`` (default: all of ``jax.devices()``, every
    process's), ordered by process, so that each process's devices hold one contiguous block of the batch."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis_name,))


def check_mesh(mesh, axis_name: str = DEVICE_AXIS) -> Mesh:
    """``mesh`` must be a 1-D mesh whose one axis is ``axis_name``."""
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise InputError(f"mesh must be a 1-D jax.sharding.Mesh (the batch is split over its axis), got {mesh!r}")
    if mesh.axis_names != (axis_name,):
        raise InputError(
            f"the mesh's axis is named {mesh.axis_names[0]!r} but axis_name={axis_name!r}: "
            f"pass axis_name={mesh.axis_names[0]!r}"
        )
    return mesh


def check_batch_split(batch_size: int, n_devices: int, *, batch_norm: bool, sync_batch_norm: bool) -> None:
    """Every device must get the same number of examples (and two or more for per-device statistics)."""
    if batch_size % n_devices:
        raise InputError(
            f"a batch of {batch_size} examples cannot be split evenly over {n_devices} devices: "
            f"choose a batch size divisible by {n_devices}"
        )
    if batch_norm:
        contract.check_training_batch_size(batch_size)
        if not sync_batch_norm and batch_size // n_devices < 2:
            raise InputError(
                f"per-device batch norm (sync_batch_norm=False) needs at least 2 examples per device, "
                f"got {batch_size // n_devices} ({batch_size} over {n_devices} devices)"
            )


def process_block(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> slice:
    """The contiguous block of ``axis`` that this process's devices hold under ``sharding``."""
    indices = sharding.addressable_devices_indices_map(shape).values()
    starts = [index[axis].start or 0 for index in indices]
    stops = [shape[axis] if index[axis].stop is None else index[axis].stop for index in indices]
    return slice(min(starts), max(stops))


def replicate(mesh: Mesh, tree, dtype=None):
    """Every array of ``tree`` replicated on all devices of ``mesh`` (each process passes its own copy)."""

    def one(array):
        array = np.asarray(array, dtype)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), array, array.shape)

    return jax.tree_util.tree_map(one, tree)


def split(mesh: Mesh, spec: P, shape: tuple[int, ...], local_part) -> jax.Array:
    """A global array of ``shape`` split by ``spec`` along one axis, made from this process's block
    only: ``local_part(block)`` returns the rows ``block`` (a slice) of that axis."""
    sharding = NamedSharding(mesh, spec)
    (axis,) = [i for i, name in enumerate(spec) if name is not None]
    local = np.ascontiguousarray(local_part(process_block(sharding, shape, axis)))
    return jax.make_array_from_process_local_data(sharding, local, shape)


def split_batch(mesh: Mesh, array) -> jax.Array:
    """``array`` (B, ...) split along its first axis over the mesh's one axis, from this process's rows."""
    array = np.asarray(array)
    return split(mesh, P(*mesh.axis_names), array.shape, lambda block: array[block])


def to_host(tree):
    """Replicated global arrays to NumPy (each process reads its own copy)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_shards[0].data), tree)


# ----------------------------------------------------------------------------------------------
# one device's share of a training step: the transforms applied to example_loss
# ----------------------------------------------------------------------------------------------


def statistics_axes(axis_name: str, sync_batch_norm: bool) -> str | tuple[str, str]:
    """Batch norm's axes: every example on every device, or this device's examples only."""
    return (axis_name, BATCH_AXIS) if sync_batch_norm else BATCH_AXIS


def local_loss(params, state, images, labels, *, sync_batch_norm: bool, axis_name: str = DEVICE_AXIS):
    r"""On one device: the mean loss of its block, :math:`-\frac1{B_d} \sum_{b \in \text{local}} \log p_b[y_b]`,
    and the new running statistics from this device's view (:func:`jaxside.transforms.batch_loss`).
    Batch norm's collectives reach the other devices when synchronised."""
    example = functools.partial(example_loss, train=True, axis_name=statistics_axes(axis_name, sync_batch_norm))
    return transforms.batch_loss(example)(params, state, images, labels)


def local_loss_and_grads(params, state, images, labels, *, sync_batch_norm: bool, axis_name: str = DEVICE_AXIS):
    """:func:`local_loss`, and the gradient of this device's mean loss (:func:`jaxside.transforms.with_grads`)."""
    loss_fn = functools.partial(local_loss, sync_batch_norm=sync_batch_norm, axis_name=axis_name)
    return transforms.with_grads(loss_fn)(params, state, images, labels)


def device_step(params, state, images, labels, *, sync_batch_norm: bool, axis_name: str = DEVICE_AXIS, reduce=True):
    """:func:`local_loss_and_grads`, then the reduction over the devices, as in
    :func:`jaxside.transforms.data_parallel`: the loss, the gradients and the running statistics
    averaged in one ``pmean`` of them all, flattened into one vector (one round of communication
    instead of twelve; see docs/sync_batchnorm.md). ``reduce=False`` leaves the gradients
    unreduced (for the test that must catch it)."""
    loss, grads, new_state = local_loss_and_grads(
        params, state, images, labels, sync_batch_norm=sync_batch_norm, axis_name=axis_name
    )
    if reduce:
        return transforms.device_mean((loss, grads, new_state), axis_name)
    loss, new_state = transforms.device_mean((loss, new_state), axis_name)
    return loss, grads, new_state


@functools.cache
def _sharded_step(mesh: Mesh, sync_batch_norm: bool, stacked: bool = False, reduce: bool = True):
    (axis_name,) = mesh.axis_names
    if not stacked:  # the transform itself
        local = functools.partial(local_loss_and_grads, sync_batch_norm=sync_batch_norm, axis_name=axis_name)
        return jax.jit(transforms.data_parallel(local, mesh, axis_name))

    def per_device(params, state, images, labels):  # each device's reduced copy, on a leading axis
        out = device_step(
            params, state, images, labels, sync_batch_norm=sync_batch_norm, axis_name=axis_name, reduce=reduce
        )
        return jax.tree_util.tree_map(lambda a: a[None], out)

    return jax.jit(transforms.data_parallel(per_device, mesh, axis_name, split_outputs=True))


def _checked(params, state, images, labels, mesh, sync_batch_norm, axis_name):
    batch_norm, dtype, images, labels = check_inputs(params, state, images, labels, train=True)
    mesh = make_mesh(axis_name=axis_name) if mesh is None else check_mesh(mesh, axis_name)
    check_batch_split(len(images), mesh.size, batch_norm=batch_norm, sync_batch_norm=sync_batch_norm)
    args = (
        replicate(mesh, params, dtype),
        replicate(mesh, list(state or []), dtype),
        split_batch(mesh, images),
        split_batch(mesh, labels),
    )
    return mesh, args


def loss_and_grads(params, state, images, labels, *, mesh=None, sync_batch_norm=True, axis_name=DEVICE_AXIS):
    """Training-mode loss, gradients and new running statistics of one batch split over the devices
    of ``mesh`` (default: a 1-D mesh named ``axis_name`` over all of ``jax.devices()``). NumPy in,
    NumPy out, the layout of :func:`jaxside.model.loss_and_grads`, whose result it equals to rounding
    when ``sync_batch_norm`` is on. The batch size must be divisible by the number of devices."""
    mesh, args = _checked(params, state, images, labels, mesh, sync_batch_norm, axis_name)
    loss, grads, new_state = _sharded_step(mesh, bool(sync_batch_norm))(*args)
    return to_host(loss)[()], to_host(grads), to_host(new_state)


def per_device_results(
    params, state, images, labels, *, mesh=None, sync_batch_norm=True, reduce=True, axis_name=DEVICE_AXIS
):
    """Every device's own copy of :func:`loss_and_grads`' results, stacked on a leading device axis.

    ``out_specs=P()`` with ``check_vma=False`` would return device 0's copy whether or not the
    copies agree; this returns all of them, so that a test can check they do. ``reduce=False``
    skips the reduction of the gradients over the devices (what that check must catch)."""
    mesh, args = _checked(params, state, images, labels, mesh, sync_batch_norm, axis_name)
    out = _sharded_step(mesh, bool(sync_batch_norm), stacked=True, reduce=reduce)(*args)
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), out)


# ----------------------------------------------------------------------------------------------
# an epoch: one jitted shard_map around a lax.scan over the steps
# ----------------------------------------------------------------------------------------------


@functools.cache
def _epoch_fn(mesh: Mesh, sync_batch_norm: bool):
    (axis_name,) = mesh.axis_names

    def on_device(params, velocity, state, images, labels, learning_rates, momentum):
        def step(carry, inputs):
            params, velocity, state = carry
            x, y, lr = inputs
            loss, grads, state = device_step(params, state, x, y, sync_batch_norm=sync_batch_norm, axis_name=axis_name)
            params, velocity = sgd_momentum(params, velocity, grads, lr, momentum)
            return (params, velocity, state), loss

        (params, velocity, state), losses = jax.lax.scan(
            step, (params, velocity, state), (images, labels, learning_rates)
        )
        return params, velocity, state, losses

    steps_batch = P(None, axis_name)
    sharded = jax.shard_map(
        on_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), steps_batch, steps_batch, P(), P()),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(sharded, donate_argnums=(0, 1, 2))


class Trainer:
    """SGD with momentum over epochs, each batch split over the devices of ``mesh``.

    The interface of :class:`jaxside.train.Trainer`. Each process keeps the training set on the
    host and sends to its devices only its own block of every batch of the epoch
    (``jax.make_array_from_process_local_data``); parameters, velocity and running statistics are
    replicated and updated in place (donated). ``axis_name`` names the mesh's axis (default ``"device"``)."""

    def __init__(
        self,
        params,
        state,
        train_images,
        train_labels,
        *,
        momentum: float,
        mesh=None,
        sync_batch_norm=True,
        axis_name: str = DEVICE_AXIS,
    ):
        batch_norm, dtype, train_images, train_labels = contract.check_training_set(
            params, state, train_images, train_labels
        )
        check_float64_enabled(dtype)
        self.mesh = make_mesh(axis_name=axis_name) if mesh is None else check_mesh(mesh, axis_name)
        self.axis_name = axis_name
        self.batch_norm, self.dtype, self.sync_batch_norm = batch_norm, dtype, bool(sync_batch_norm)
        self.images, self.labels = train_images, train_labels
        self.params = replicate(self.mesh, params, dtype)
        self.velocity = replicate(self.mesh, jax.tree_util.tree_map(np.zeros_like, params), dtype)
        self.state = replicate(self.mesh, list(state or []), dtype)
        self.momentum = replicate(self.mesh, momentum, dtype)
        self._compiled = {}
        self.host_seconds = 0.0  # time spent gathering and sending the batches (part of epoch())

    def _batches(self, batch_indices: np.ndarray):
        """This process's block of every batch, placed on its devices: (steps, B, ...) global arrays."""
        spec = P(None, self.axis_name)
        steps, batch = batch_indices.shape
        images = split(
            self.mesh, spec, (steps, batch, self.images.shape[1]), lambda block: self.images[batch_indices[:, block]]
        )
        labels = split(self.mesh, spec, (steps, batch), lambda block: self.labels[batch_indices[:, block]])
        return images, labels

    def compile(self, steps: int, batch_size: int) -> float:
        """Compile the epoch for ``steps`` batches of ``batch_size`` ahead of time; return the seconds."""
        start = time.perf_counter()
        check_batch_split(batch_size, self.mesh.size, batch_norm=self.batch_norm, sync_batch_norm=self.sync_batch_norm)
        if (steps, batch_size) not in self._compiled:
            sharding = NamedSharding(self.mesh, P(None, self.axis_name))
            replicated = NamedSharding(self.mesh, P())
            args = (
                self.params,
                self.velocity,
                self.state,
                jax.ShapeDtypeStruct((steps, batch_size, self.images.shape[1]), self.dtype, sharding=sharding),
                jax.ShapeDtypeStruct((steps, batch_size), np.int32, sharding=sharding),
                jax.ShapeDtypeStruct((steps,), self.dtype, sharding=replicated),
                self.momentum,
            )
            epoch = _epoch_fn(self.mesh, self.sync_batch_norm)
            self._compiled[steps, batch_size] = epoch.lower(*args).compile()
        return time.perf_counter() - start

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train on the batches ``batch_indices`` (steps, B), one learning rate per step; return the
        per-step losses. Every process passes the same indices."""
        batch_indices, learning_rates = contract.check_epoch_plan(
            batch_indices, learning_rates, len(self.images), self.batch_norm, self.dtype
        )
        self.compile(*batch_indices.shape)
        start = time.perf_counter()
        images, labels = self._batches(batch_indices)
        rates = replicate(self.mesh, learning_rates)
        self.host_seconds += time.perf_counter() - start
        self.params, self.velocity, self.state, losses = self._compiled[batch_indices.shape](
            self.params, self.velocity, self.state, images, labels, rates, self.momentum
        )
        return to_host(losses)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode class predictions on this process's first device (no batch coupling in eval mode)."""
        images = contract.check_images(images, self.dtype)
        device = self.mesh.local_devices[0]
        params, state, images = jax.device_put((self.params_numpy(), self.state_numpy(), images), device)
        return np.asarray(predict_classes(params, state, images))

    def params_numpy(self):
        return to_host(self.params)

    def state_numpy(self):
        return to_host(self.state)


def sharded_logits(params, state, images, *, mesh: Mesh, axis_name: str = DEVICE_AXIS) -> np.ndarray:
    """Training-mode logits ``(B, 10)`` of a batch split over ``mesh`` (synchronised batch norm)."""
    batch_norm, dtype, images, _ = check_inputs(params, state, images, train=True)
    mesh = check_mesh(mesh, axis_name)
    check_batch_split(len(images), mesh.size, batch_norm=batch_norm, sync_batch_norm=True)
    args = replicate(mesh, params, dtype), replicate(mesh, list(state or []), dtype), split_batch(mesh, images)
    return np.asarray(multihost_utils.process_allgather(_sharded_logits(mesh)(*args)[0], tiled=True))


@functools.cache
def _sharded_logits(mesh: Mesh):
    """:func:`jaxside.transforms.data_parallel` of the batched training-mode forward: the logits
    concatenated over the devices, the (synchronised, so equal) running statistics averaged."""
    (axis_name,) = mesh.axis_names
    forward = functools.partial(forward_pass, train=True, axis_name=statistics_axes(axis_name, True))
    return jax.jit(
        transforms.data_parallel(transforms.batch_apply(forward), mesh, axis_name, split_outputs=(True, False))
    )
