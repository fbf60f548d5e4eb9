r"""The fast ensemble trainer: :class:`numpyside.ensemble.Trainer`'s computation, without the overhead.

``FastEnsembleTrainer`` has the interface of :class:`numpyside.ensemble.Trainer` and performs exactly
its floating-point operations (bit-identical results, ``tests/test_fast_ensemble.py``), a whole
epoch in ONE numba call (:func:`numpyside.kernels.fused_ensemble.train_steps`) on preallocated buffers in
the side-by-side layout of :mod:`numpyside.kernels.fused_ensemble`, where a batch shared by all members
makes the first layer's products one ``gemm`` each.

``threads = T`` splits the members into ``T`` contiguous groups, as the reference does, and each
group trains the whole epoch in a thread of its own with single-threaded BLAS: the members are
independent, so no thread ever waits for another within an epoch (the numbers are those of the
reference with the same ``threads``; see there what ``T`` changes).

It covers members with their own batch-norm statistics (``pool_members=False``) and one batch
per member (``ghost_batches=1``); pooled or ghost batch norm train with
:class:`numpyside.ensemble.Trainer` (asking this one for them is refused with an error that says
so). Where the time goes: ``docs/performance.md``.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from compare import contract
from compare.contract import BN_EPS, InputError
from compare.contract import ensemble as ensemble_contract
from numpyside.backend import DEFAULT_BACKEND, check_backend
from numpyside.ensemble import model as ensemble
from numpyside.ensemble.train import Trainer
from numpyside.fast import flat_blocks
from numpyside.kernels import blas, fused, fused_ensemble, threads
from numpyside.kernels.fused_ensemble import MemberSettings


class _MemberBlocks:
    """The parameters (or velocities, or gradients) of a group of ``M`` members in ONE flat buffer, as
    :class:`numpyside.kernels.fused.Layers` with the members side by side (:mod:`numpyside.kernels.fused_ensemble`)."""

    def __init__(self, n_members: int, dtype: np.dtype):
        sizes = contract.LAYER_SIZES
        n, n_in, n_out, n_hidden = sizes[1], sizes[0], sizes[-1], len(sizes) - 2
        shapes = {
            "w0": (n_in, n_members * n),
            "w_hidden": (n_hidden - 1, n_members, n, n),
            "w_out": (n_members, n, n_out),
            "a": (n_hidden, n_members * n),
            "b": (n_hidden, n_members * n),
            "b_out": (n_members, n_out),
        }
        self.flat, views = flat_blocks(shapes, dtype)
        self.layers = fused.Layers(**views, flat=self.flat)
        m = n_members
        #: every parameter once, as (outer, M, inner) views for the per-member SGD
        self.sgd = (
            views["w0"].reshape(n_in, m, n),
            views["w_hidden"].reshape(n_hidden - 1, m, n * n),
            views["w_out"].reshape(1, m, n * n_out),
            views["a"].reshape(n_hidden, m, n),
            views["b"].reshape(n_hidden, m, n),
            views["b_out"].reshape(1, m, n_out),
        )

    def member_views(self, batch_norm: bool) -> list[dict[str, np.ndarray]]:
        """The shared layout with a member axis first (views, not all contiguous)."""
        p, sizes = self.layers, contract.LAYER_SIZES
        m, n = p.w_out.shape[0], sizes[1]
        tree = []
        for i in range(len(sizes) - 2):
            weight = p.w0.reshape(sizes[0], m, n).transpose(1, 0, 2) if i == 0 else p.w_hidden[i - 1]
            a, b = p.a[i].reshape(m, n), p.b[i].reshape(m, n)
            tree.append({"weight": weight, **({"gamma": a, "beta": b} if batch_norm else {"bias": a})})
        tree.append({"weight": p.w_out, "bias": p.b_out})
        return tree


class _Group:
    """Members ``members`` of the ensemble: their parameters, velocities, gradients, running
    statistics, per-member hyper-parameters and step buffers."""

    def __init__(self, params, state, members: slice, setup, batch_norm: bool):
        dtype, width = setup.dtype, contract.LAYER_SIZES[1]
        self.members, self.dtype, self.batch_norm = members, dtype, batch_norm
        self.n_members = members.stop - members.start
        self.params = _MemberBlocks(self.n_members, dtype)
        self.velocity = _MemberBlocks(self.n_members, dtype)
        self.grads = _MemberBlocks(self.n_members, dtype)
        for layer, source in zip(self.params.member_views(batch_norm), params):
            for key, view in layer.items():
                view[...] = np.asarray(source[key])[members]
        n_hidden = len(contract.LAYER_SIZES) - 2
        self.running_mean = np.zeros((n_hidden, self.n_members * width), dtype)
        self.running_var = np.ones((n_hidden, self.n_members * width), dtype)
        for i, layer in enumerate(state or []):
            self.running_mean[i] = np.asarray(layer["mean"])[members].reshape(-1)
            self.running_var[i] = np.asarray(layer["var"])[members].reshape(-1)
        new = setup.bn_momentum[members]
        self.keep, self.new = (dtype.type(1) - new).astype(dtype), new.astype(dtype)
        self.momentum = setup.momentum[members].astype(dtype)
        self._buffers: dict[int, fused.Activations] = {}

    def state_views(self) -> list[dict[str, np.ndarray]]:
        m = self.n_members
        return [
            {"mean": self.running_mean[i].reshape(m, -1), "var": self.running_var[i].reshape(m, -1)}
            for i in range(len(self.running_mean))
        ]

    def buffers(self, batch: int) -> fused.Activations:
        """The step buffers for batch size ``batch``."""
        key = batch
        if key not in self._buffers:
            sizes, dtype = contract.LAYER_SIZES, self.dtype
            n_hidden, width = len(sizes) - 2, self.n_members * sizes[1]
            empty = lambda *shape: np.empty(shape, dtype)  # noqa: E731
            self._buffers[key] = fused.Activations(
                x=empty(batch, sizes[0]),
                y=np.empty(batch, np.int32),
                z=empty(n_hidden, batch, width),
                s=empty(n_hidden, batch, width),
                x_hat=empty(n_hidden, batch, width),
                mean=empty(n_hidden, width),
                var=empty(n_hidden, width),
                inv_std=empty(n_hidden, width),
                ds=empty(n_hidden, batch, width),
                d=empty(n_hidden, batch, width),
                logits=empty(self.n_members, batch, sizes[-1]),
                dlogits=empty(self.n_members, batch, sizes[-1]),
            )
        return self._buffers[key]

    def train(self, images, labels, indices: np.ndarray, rates: np.ndarray) -> np.ndarray:
        """Train the group on ``indices`` (steps, S, B) with ``rates`` (steps, M); the losses."""
        steps, _, batch = indices.shape
        losses = np.empty((steps, self.n_members), self.dtype)
        unbias = self.dtype.type(batch / (batch - 1)) if batch > 1 else self.dtype.type(np.nan)
        settings = MemberSettings(self.dtype.type(BN_EPS), unbias, self.keep, self.new, self.momentum)
        fused_ensemble.train_steps(
            fused_ensemble.Epoch(images, labels, indices, rates, losses),
            self.buffers(batch),
            self.params.layers,
            self.grads.layers,
            self.params.sgd,
            self.velocity.sgd,
            self.grads.sgd,
            self.running_mean,
            self.running_var,
            settings,
            self.batch_norm,
        )
        return losses


def why_not_fast(*, backend: str = DEFAULT_BACKEND, pool_members: bool = False, ghost_batches: int = 1) -> str:
    """Why :class:`FastEnsembleTrainer` cannot train with these options on this machine ("" if it can):
    it runs numba kernels on NumPy's own OpenBLAS (:mod:`numpyside.kernels.blas`), for members with
    their own batch statistics and one batch each."""
    if backend != "numba" or not blas.available():
        why = f"backend={backend!r}" if backend != "numba" else blas.UNAVAILABLE_REASON
        return f"FastEnsembleTrainer runs numba kernels on NumPy's OpenBLAS ({why}): use numpyside.ensemble.Trainer"
    if pool_members or ghost_batches != 1:
        return (
            "FastEnsembleTrainer trains members with their own batch statistics (pool_members=False, "
            "ghost_batches=1); pooled or ghost batch norm: numpyside.ensemble.Trainer"
        )
    return ""


def trainer_class(*, fast: bool = True, backend: str = DEFAULT_BACKEND, pool_members: bool = False, ghost_batches=1):
    """The NumPy ensemble trainer for these options: :class:`FastEnsembleTrainer` where it applies and
    ``fast`` asks for it, else the readable :class:`numpyside.ensemble.Trainer` (the same numbers)."""
    if fast and not why_not_fast(backend=backend, pool_members=pool_members, ghost_batches=ghost_batches):
        return FastEnsembleTrainer
    return Trainer


class FastEnsembleTrainer:
    """Same interface and same numbers as :class:`numpyside.ensemble.Trainer` (for
    ``pool_members=False``, ``ghost_batches=1``); a whole epoch per numba call, members split over
    ``threads`` threads."""

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
        backend: str = DEFAULT_BACKEND,
        threads: int | None = None,
    ):
        check_backend(backend)
        why = why_not_fast(backend=backend, pool_members=pool_members, ghost_batches=ghost_batches)
        if why:
            raise InputError(why)
        count = threads_count(threads)
        setup = ensemble_contract.check_training_setup(
            params, state, train_images, train_labels, momentum=momentum, bn_momentum=bn_momentum
        )
        self.n_members, self.dtype, self.backend = setup.n_members, setup.dtype, backend
        self.images, self.labels = setup.images, setup.labels
        self.pool_members, self.ghost_batches = False, 1
        self.momentum, self.bn_momentum = setup.momentum, setup.bn_momentum
        self.batch_norm = "gamma" in params[0]
        self.threads = min(count, self.n_members)
        bounds = np.linspace(0, self.n_members, self.threads + 1).round().astype(int)
        self._groups = [
            _Group(params, state, slice(int(a), int(b)), setup, self.batch_norm) for a, b in itertools.pairwise(bounds)
        ]

    def compile(self, steps: int, batch_size: int, *, per_member_batches: bool = False) -> float:
        """One throw-away step per group so numba has loaded (or compiled) the epoch for this dtype
        and batch layout; parameters, velocities and running statistics are restored. Seconds."""
        start = time.perf_counter()
        n_sets = self.n_members if per_member_batches else 1
        indices = np.broadcast_to(np.arange(batch_size) % len(self.images), (1, n_sets, batch_size))
        for group in self._groups:
            owned = [group.params.flat, group.velocity.flat, group.grads.flat, group.running_mean, group.running_var]
            saved = [a.copy() for a in owned]
            group_sets = group.n_members if per_member_batches else 1
            with threads.limited(1):
                group.train(
                    self.images,
                    self.labels,
                    np.ascontiguousarray(indices[:, :group_sets], np.intp),
                    np.zeros((1, group.n_members), self.dtype),
                )
            for array, copy in zip(owned, saved):
                np.copyto(array, copy)
        self.predict(self.images[:2])
        return time.perf_counter() - start

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train every member on its batches (``(steps, B)`` shared or ``(steps, M, B)``); return the
        per-step losses ``(steps, M)``."""
        batch_indices, rates = ensemble_contract.check_epoch(
            batch_indices, learning_rates, self.n_members, len(self.images)
        )
        if self.batch_norm:
            contract.check_training_batch_size(batch_indices.shape[-1])
        indices = batch_indices[:, None, :] if batch_indices.ndim == 2 else batch_indices
        rates = rates.astype(self.dtype)

        def train(group: _Group) -> np.ndarray:
            members = slice(0, 1) if indices.shape[1] == 1 else group.members
            return group.train(
                self.images,
                self.labels,
                np.ascontiguousarray(indices[:, members], np.intp),
                np.ascontiguousarray(rates[:, group.members]),
            )

        with threads.limited(1), np.errstate(under="ignore"):
            if len(self._groups) == 1:
                return train(self._groups[0])
            with ThreadPoolExecutor(len(self._groups)) as pool:
                return np.concatenate(list(pool.map(train, self._groups)), axis=1)

    def predict_logits(self, images) -> np.ndarray:
        """Eval-mode logits ``(M, n, 10)`` of shared images ``(n, 784)`` (the reference forward)."""
        images, _, _ = ensemble_contract.check_ensemble_batch(images, None, self.n_members, self.dtype)
        with threads.limited(1):
            return ensemble.forward(self.params_numpy(), self.state_numpy(), images, train=False, backend=self.backend)[
                0
            ]

    def predict(self, images) -> np.ndarray:
        """Eval-mode class predictions ``(M, n)``."""
        return np.argmax(self.predict_logits(images), axis=-1)

    def params_numpy(self):
        """The parameters in the stacked layout (copies)."""
        trees = [g.params.member_views(self.batch_norm) for g in self._groups]
        return [{key: np.concatenate([t[i][key] for t in trees]) for key in layer} for i, layer in enumerate(trees[0])]

    def state_numpy(self):
        """The running statistics in the stacked layout (copies; ``[]`` without batch norm)."""
        if not self.batch_norm:
            return []
        trees = [g.state_views() for g in self._groups]
        return [{key: np.concatenate([t[i][key] for t in trees]) for key in layer} for i, layer in enumerate(trees[0])]


def threads_count(value) -> int:
    """``None``: :func:`numpyside.kernels.threads.default_count`; else a positive integer."""
    return threads.default_count() if value is None else ensemble_contract.check_positive_int(value, "threads")
