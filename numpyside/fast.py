r"""The fast trainer of the handwritten model: the reference computation, without the overhead.

``FastTrainer`` has the interface of :class:`numpyside.train.Trainer` and performs its
floating-point operations, in its order, but every array a step touches is preallocated once per
batch size; all parameters (and their velocities and gradients) live in ONE flat buffer, so SGD is
one fused pass; the products are ``gemm`` calls into those buffers (``dW = x.T @ d``, ``dx = d @
W.T`` from transposed operands); and, with ``backend="numba"``, the elementwise work runs in the
fused kernels of :mod:`numpyside.kernels.fused`, a whole epoch in ONE numba call where NumPy's
OpenBLAS can be called from numba (:mod:`numpyside.kernels.blas`), the counterpart of the JAX side's
``lax.scan``. ``threads`` (default :func:`numpyside.kernels.threads.default_count`, 1) sets how many
cores an epoch uses (:mod:`numpyside.kernels.threads`). With ``backend="numpy"`` the same buffers
are filled by NumPy ufuncs.

Bits. Each product of a whole-epoch step runs on NumPy's BLAS or on the numba GEMM of
:mod:`numpyside.kernels.gemm` (``gemm``; by default BLAS on one thread, the numba GEMM on more).
With ``gemm="blas"`` the results are bit-identical to the reference trainer's
(``tests/test_fast.py``); the numba GEMM sums each element as one fma chain where BLAS blocks the
sum, so its products differ from the reference's by rounding (a few ulp of ``sum |a| |b|``), which
training carries on as it carries the difference between one and two BLAS threads: after a few dozen
steps within ``1e-5`` (float32) and ``1e-12`` (float64) of the reference, the tolerances
``tests/test_fast.py`` holds every configuration to. The numba GEMM's results do not depend on the
thread count, so with it one thread and two give the same bits.

The readable reference is :mod:`numpyside.layers` / :mod:`numpyside.model` / :mod:`numpyside.train`;
where the time goes and what was tried: ``docs/performance.md``.
"""

from __future__ import annotations

import time

import numpy as np

from compare import contract
from compare.contract import BN_EPS, BN_MOMENTUM, InputError
from numpyside.backend import DEFAULT_BACKEND, check_backend
from numpyside.kernels import blas, fused, gemm, gemm_choice, products, threads
from numpyside.model import forward
from numpyside.train import Trainer

#: Parameter blocks start at multiples of 64 bytes in the flat buffers.
_ALIGN_BYTES = 64


def flat_blocks(shapes: dict[str, tuple[int, ...]], dtype: np.dtype) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One zeroed flat buffer holding an array of each of ``shapes``, each starting at a multiple of
    64 bytes; returns the buffer and the arrays (views of it), by name."""
    align = _ALIGN_BYTES // dtype.itemsize
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += -(-int(np.prod(shape)) // align) * align
    flat = np.zeros(total, dtype)
    views = {
        name: flat[offsets[name] : offsets[name] + int(np.prod(shape))].reshape(shape) for name, shape in shapes.items()
    }
    return flat, views


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class _Blocks:
    """All parameters (or all velocities, or all gradients) in ONE flat buffer, as blocks that
    stack the layers of equal shape:

    ``w0`` (784, n), ``w_hidden`` (2, n, n), ``w_out`` (n, 10), ``a`` (3, n) the hidden layers'
    ``gamma`` (batch norm) or ``bias``, ``b`` (3, n) their ``beta`` (unused without batch norm),
    ``b_out`` (10,). ``tree`` is the same memory in the shared layout (a list of dicts of views).
    """

    def __init__(self, dtype: np.dtype, batch_norm: bool, values=None):
        sizes = contract.LAYER_SIZES
        n = sizes[1]
        if len(set(sizes[1:-1])) != 1:
            raise InputError(f"FastTrainer needs hidden layers of one width, got {sizes[1:-1]}")
        shapes = {
            "w0": (sizes[0], n),
            "w_hidden": (len(sizes) - 3, n, n),
            "w_out": (n, sizes[-1]),
            "a": (len(sizes) - 2, n),
            "b": (len(sizes) - 2, n),
            "b_out": (sizes[-1],),
        }
        self.flat, views = flat_blocks(shapes, dtype)
        for name, view in views.items():
            setattr(self, name, view)
        self.tree = []
        for i in range(len(sizes) - 2):
            layer = {"weight": self.w0 if i == 0 else self.w_hidden[i - 1]}
            layer.update({"gamma": self.a[i], "beta": self.b[i]} if batch_norm else {"bias": self.a[i]})
            self.tree.append(layer)
        self.tree.append({"weight": self.w_out, "bias": self.b_out})
        self.layers = fused.Layers(self.w0, self.w_hidden, self.w_out, self.a, self.b, self.b_out, self.flat)
        if values is not None:
            for layer, source in zip(self.tree, values):
                for key, view in layer.items():
                    view[...] = np.asarray(source[key], dtype=dtype)


class _StepBuffers:
    """Everything one training step of batch size ``batch`` writes, allocated once. Hidden-layer
    buffers stack the three layers: ``z[i]`` is layer ``i``'s (B, n)."""

    def __init__(self, batch: int, dtype: np.dtype, backend: str):
        sizes = contract.LAYER_SIZES
        n, n_hidden = sizes[1], len(sizes) - 2
        empty = lambda *shape: np.empty(shape, dtype)  # noqa: E731
        self.batch = batch
        self.x = empty(batch, sizes[0])  # the gathered images
        self.labels = np.empty(batch, np.int32)  # contract.check_labels gives int32
        self.z = empty(n_hidden, batch, n)  # x @ W (the NumPy path then reuses it for the BN output, 1 + e)
        self.x_hat = empty(n_hidden, batch, n)
        self.s = empty(n_hidden, batch, n)  # sigmoid outputs (the next layer's input)
        self.mean = empty(n_hidden, n)
        self.var = empty(n_hidden, n)
        self.inv_std = empty(n_hidden, n)
        self.logits = empty(batch, sizes[-1])
        self.dlogits = empty(batch, sizes[-1])
        self.ds = empty(n_hidden, batch, n)  # dL/d(sigmoid output)
        self.d = empty(n_hidden, batch, n)  # dL/d(pre-activation)
        self.packed = empty(n * max(n, sizes[-1]))  # the numba GEMM's copy of a W.T
        self.count = dtype.type(batch)
        self.unbias = dtype.type(batch / (batch - 1)) if batch > 1 else dtype.type(np.nan)
        self.fused: fused.Activations | None = None  # the same arrays, for fused.train_steps
        if backend == "numpy":  # temporaries of the ufunc path
            self.centered = empty(n_hidden, batch, n)
            self.tmp = empty(n_hidden, batch, n)
            self.mask = np.empty((n_hidden, batch, n), bool)
            self.row_max = empty(batch, 1)
            self.row_sum = empty(batch, 1)
            self.picked = empty(batch)
            self.rows = np.arange(batch)
            self.stat = empty(n_hidden, n)


class FastTrainer:
    """Same interface and same numbers as :class:`numpyside.train.Trainer`; preallocated buffers,
    fused kernels. One ``epoch()`` per call."""

    def __init__(self, params, state, train_images, train_labels, *, momentum: float, backend: str = DEFAULT_BACKEND):
        check_backend(backend)
        batch_norm, dtype, images, labels = contract.check_training_set(params, state, train_images, train_labels)
        # read-only views: the kernels only read them, and one array type whatever the caller's
        # flags means one compilation (and numba cache entry) for every caller
        self.images, self.labels = _read_only(images), _read_only(labels)
        self.dtype = dtype
        self.backend = backend
        self.batch_norm = batch_norm
        self._params = _Blocks(dtype, batch_norm, params)
        self._velocity = _Blocks(dtype, batch_norm)
        self._grads = _Blocks(dtype, batch_norm)
        self.params, self.velocity, self.grads = self._params.tree, self._velocity.tree, self._grads.tree
        n_hidden, width = len(contract.LAYER_SIZES) - 2, contract.LAYER_SIZES[1]
        self._running_mean = np.zeros((n_hidden, width), dtype)
        self._running_var = np.ones((n_hidden, width), dtype)
        for i, layer in enumerate(state or []):
            self._running_mean[i] = np.asarray(layer["mean"], dtype)
            self._running_var[i] = np.asarray(layer["var"], dtype)
        self.state = (
            [{"mean": self._running_mean[i], "var": self._running_var[i]} for i in range(n_hidden)]
            if batch_norm
            else []
        )
        self.momentum = dtype.type(momentum)
        self._eps = dtype.type(BN_EPS)
        self._keep = dtype.type(1 - BN_MOMENTUM)
        self._new = dtype.type(BN_MOMENTUM)
        self._buffers: dict[int, _StepBuffers] = {}
        #: numba backend: a whole epoch in one numba call (:func:`numpyside.kernels.fused.train_steps`) where
        #: NumPy's BLAS can be called from numba, else kernel by kernel from Python
        self.whole_epoch = backend == "numba" and blas.available()
        #: cores an epoch (and ``predict``) may use: NumPy's OpenBLAS is held to this many threads
        self.threads = threads.default_count()
        #: with ``threads >= 2``: False (default), OpenBLAS splits the products on its own threads and
        #: the kernels run on one; True (a whole epoch per call): OpenBLAS's jobs and the kernels'
        #: parts on the same numba threads (:func:`numpyside.kernels.threads.limited`), more fork-join points
        #: per step (``docs/performance.md``, "Two threads": no consistent gain since the kernels vectorise)
        self.shared_pool = False
        #: the products' engine (a whole epoch per call; default ``$VMAP_BN_GEMM`` or "auto"): "auto"
        #: on one thread NumPy's BLAS (the readable trainer's bits), on more the numba GEMM, split by
        #: columns; "measured" per product the faster of the two on one thread
        #: (:mod:`numpyside.kernels.gemm_choice`); "blas" or "numba" every product on that engine
        self.gemm = gemm_choice.default()
        #: with ``threads >= 2`` and the numba GEMM: runs chunks of steps on the threads or on one,
        #: whichever it measures faster (the same bits either way; :class:`numpyside.kernels.threads.Pacer`)
        self.pacer = threads.Pacer()
        self._engines: dict[tuple[str, int, int], np.ndarray] = {}
        self._background = None  # a warm-up still compiling the whole-epoch kernel (see compile)

    # ----------------------------------------------------------------------------------------
    # the interface of numpyside.train.Trainer
    # ----------------------------------------------------------------------------------------

    def compile(self, steps: int, batch_size: int, *, background=None) -> float:
        """Allocate the buffers for ``batch_size`` and run one throw-away step, so that numba has
        loaded (or compiled) its kernels for this dtype before timing starts. Nothing is updated:
        parameters, velocities and running statistics are restored afterwards. Returns seconds.

        ``background``: a :class:`numpyside.warmup.Warmup` compiling these kernels in another
        process; its phases are waited for instead of compiled here. Where running kernel by
        kernel gives the same bits as a whole epoch in one call (one thread, every product on
        NumPy's BLAS), only the kernels are waited for, and epochs run kernel by kernel until the
        whole-epoch kernel is ready."""
        start = time.perf_counter()
        self._check_batch_size(batch_size)
        if background is not None and self.whole_epoch:
            if self._same_bits_kernel_by_kernel() and not background.ready("trainer"):
                background.wait("kernels")
                self._background = background
            else:
                background.wait("trainer")
        saved = [a.copy() for a in self._owned_arrays()]
        indices = np.tile(np.arange(batch_size) % len(self.images), (2, 1))
        pacer, self.pacer = self.pacer, threads.Pacer(probe=1)  # two steps: one threaded, one not
        self._run(indices, np.zeros(2, self.dtype))
        self.pacer = pacer  # the compiling steps' times are not the pacer's business
        for array, copy in zip(self._owned_arrays(), saved):
            np.copyto(array, copy)
        self.predict(self.images[:2])
        return time.perf_counter() - start

    def epoch(self, batch_indices: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
        """Train on the given batches (``(steps, batch)`` indices) with one learning rate per step;
        return the per-step losses."""
        batch_indices, rates = contract.check_epoch_plan(
            batch_indices, learning_rates, len(self.images), self.batch_norm, self.dtype
        )
        if len(batch_indices) == 0:
            return np.empty(0, self.dtype)
        self._check_batch_size(batch_indices.shape[1])
        return self._run(batch_indices, rates)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode class predictions for ``images`` (the reference forward pass, on the same
        threads as the epochs: OpenBLAS's own workers are not woken to compete with them)."""
        images = contract.check_images(images, self.dtype)
        with self._threads():
            logits = forward(self.params, self.state, images, train=False, backend=self.backend)[0]
        return np.argmax(logits, axis=-1)

    params_numpy = Trainer.params_numpy  # copies of self.params / self.state, as the reference's
    state_numpy = Trainer.state_numpy

    # ----------------------------------------------------------------------------------------
    # internals
    # ----------------------------------------------------------------------------------------

    def _owned_arrays(self):
        return [self._params.flat, self._velocity.flat, self._grads.flat, self._running_mean, self._running_var]

    def _check_batch_size(self, batch_size: int) -> None:
        if batch_size < 1 or batch_size > len(self.images):
            raise InputError(f"batch size must lie in 1..{len(self.images)}, got {batch_size}")
        if self.batch_norm:
            contract.check_training_batch_size(batch_size)

    def _buffers_for(self, batch_size: int) -> _StepBuffers:
        buffers = self._buffers.get(batch_size)
        if buffers is None:
            buffers = self._buffers[batch_size] = _StepBuffers(batch_size, self.dtype, self.backend)
        return buffers

    def _run(self, batch_indices: np.ndarray, rates: np.ndarray) -> np.ndarray:
        """Train on checked ``batch_indices`` with ``rates`` (in the dtype); the losses."""
        steps, batch_size = batch_indices.shape
        batch_indices = np.ascontiguousarray(batch_indices, dtype=np.intp)  # one index type: one compilation
        buffers = self._buffers_for(batch_size)
        losses = np.empty(steps, self.dtype)
        whole_epoch = self.whole_epoch and self._whole_epoch_ready()
        if whole_epoch:
            engines = self.engines(batch_size)
            if self.threads > 1 and np.all(engines == products.NUMBA_GEMM):
                self._run_paced(batch_indices, rates, losses, buffers, engines)
                return losses
        with self._threads() as parts:
            if whole_epoch:
                epoch = fused.Epoch(self.images, self.labels, batch_indices, rates, losses)
                train_steps = fused.train_steps_threaded if parts > 1 else fused.train_steps
                if parts == 1 and np.all(engines == products.BLAS):
                    train_steps = fused.train_steps_blas  # compiled without the GEMM
                arguments = self._fused_arguments(buffers)
                train_steps(epoch, *arguments, self.batch_norm, parts, engines, buffers.packed, parts == 1)
                return losses
            step = self._step_numpy if self.backend == "numpy" else self._step_numba
            with np.errstate(under="ignore"):  # exp(-|x|) underflows to 0 far out: intended
                for k in range(steps):
                    losses[k] = step(buffers, batch_indices[k], rates[k])
        return losses

    def engines(self, batch_size: int) -> np.ndarray:
        """The engine of each of a step's products (:data:`numpyside.kernels.products.PRODUCTS`) at this
        batch size, as :attr:`gemm` says ("auto" with the shared pool or without fused multiply-add
        in hardware: BLAS)."""
        choice = gemm_choice.check(self.gemm, "FastTrainer.gemm")
        if choice == "auto":
            numba_gemm = self.threads > 1 and not self.shared_pool and gemm.HAS_FMA
            choice = "numba" if numba_gemm else "blas"
        if choice != "blas" or self.threads > 1:
            gemm.register(self.dtype)  # every epoch but train_steps_blas calls it
        key = (choice, batch_size, self.threads)
        if key not in self._engines:
            if choice == "measured":
                self._engines[key] = gemm_choice.engines(self.dtype, batch_size)
            else:
                self._engines[key] = products.engines_all(products.BLAS if choice == "blas" else products.NUMBA_GEMM)
        return self._engines[key]

    def _same_bits_kernel_by_kernel(self) -> bool:
        """Whether a step driven kernel by kernel from Python does exactly what the whole-epoch
        kernel does: on one thread with every product on NumPy's BLAS."""
        return self.threads == 1 and gemm_choice.check(self.gemm, "FastTrainer.gemm") in ("auto", "blas")

    def _whole_epoch_ready(self) -> bool:
        """False while a background warm-up still compiles the whole-epoch kernel (see :meth:`compile`)."""
        if self._background is not None and self._background.ready("trainer"):
            self._background = None
        return self._background is None or not self._same_bits_kernel_by_kernel()

    def _run_paced(self, batch_indices, rates, losses, buffers: _StepBuffers, engines: np.ndarray) -> None:
        """:meth:`_run` with ``threads >= 2`` and every product on the numba GEMM: chunks of steps,
        each on the threads or on this one as :attr:`pacer` chooses (the same bits)."""
        arguments = self._fused_arguments(buffers)
        with threads.numba_parts(self.threads) as parts:
            k, steps = 0, len(batch_indices)
            while k < steps:
                threaded, count = self.pacer.next_chunk() if parts > 1 else (False, steps)
                stop = min(steps, k + count)
                epoch = fused.Epoch(self.images, self.labels, batch_indices[k:stop], rates[k:stop], losses[k:stop])
                train_steps = fused.train_steps_threaded if threaded else fused.train_steps
                start = time.perf_counter()
                train_steps(epoch, *arguments, self.batch_norm, parts if threaded else 1, engines, buffers.packed, True)
                self.pacer.record(threaded, stop - k, time.perf_counter() - start)
                k = stop

    def _threads(self):
        """:func:`numpyside.kernels.threads.limited` to ``self.threads``; the kernels' parts only where a
        whole epoch runs in one numba call."""
        shared = self.shared_pool and self.whole_epoch
        return threads.limited(self.threads, shared_pool=shared)

    def _fused_arguments(self, b: _StepBuffers):
        """The arguments of :func:`numpyside.kernels.fused.train_steps` after the epoch: buffers,
        parameters, gradients, velocities, running statistics, scalars."""
        if b.fused is None:
            b.fused = fused.Activations(
                b.x, b.labels, b.z, b.s, b.x_hat, b.mean, b.var, b.inv_std, b.ds, b.d, b.logits, b.dlogits
            )
        return (
            b.fused,
            self._params.layers,
            self._grads.layers,
            self._velocity.flat,
            self._running_mean,
            self._running_var,
            fused.Settings(self._eps, self._keep, self._new, b.unbias, self.momentum),
        )

    def _step_numba(self, b: _StepBuffers, indices: np.ndarray, lr) -> np.floating:
        """Gather, forward, backward, SGD: one training step with the fused kernels."""
        params, grads, state, bn = self.params, self.grads, self.state, self.batch_norm
        matmul = np.matmul
        fused.gather_rows(self.images, indices, b.x, 0, b.batch)
        fused.gather_labels(self.labels, indices, b.labels)
        x = b.x
        for i in range(3):
            layer, z, s = params[i], b.z[i], b.s[i]
            matmul(x, layer["weight"], out=z)
            if bn:
                fused.bn_sigmoid_forward(
                    z,
                    layer["gamma"],
                    layer["beta"],
                    self._eps,
                    state[i]["mean"],
                    state[i]["var"],
                    self._keep,
                    self._new,
                    b.unbias,
                    b.mean[i],
                    b.var[i],
                    b.inv_std[i],
                    b.x_hat[i],
                    s,
                    0,
                    s.shape[1],
                )
            else:
                fused.bias_sigmoid_forward(z, layer["bias"], s, 0, s.shape[1])
            x = s
        out_layer, out_grads = params[3], grads[3]
        matmul(x, out_layer["weight"], out=b.logits)
        loss = fused.bias_softmax_cross_entropy(b.logits, out_layer["bias"], b.labels, b.dlogits, out_grads["bias"])
        matmul(x.T, b.dlogits, out=out_grads["weight"])
        d, weight = b.dlogits, out_layer["weight"]
        for i in (2, 1, 0):
            layer, layer_grads, ds = params[i], grads[i], b.ds[i]
            matmul(d, weight.T, out=ds)
            if bn:
                fused.sigmoid_bn_backward(
                    ds,
                    b.s[i],
                    b.x_hat[i],
                    layer["gamma"],
                    b.inv_std[i],
                    b.d[i],
                    layer_grads["gamma"],
                    layer_grads["beta"],
                    0,
                    ds.shape[1],
                )
            else:
                fused.sigmoid_bias_backward(ds, b.s[i], b.d[i], layer_grads["bias"], 0, ds.shape[1])
            d, weight = b.d[i], layer["weight"]
            matmul((b.s[i - 1] if i else b.x).T, d, out=layer_grads["weight"])
        flat = self._params.flat
        fused.sgd_momentum(flat, self._velocity.flat, self._grads.flat, lr, self.momentum, 0, flat.shape[0])
        return loss

    def _step_numpy(self, b: _StepBuffers, indices: np.ndarray, lr) -> np.floating:
        """The same step with NumPy ufuncs writing into the buffers, in the reference NumPy
        backend's operation order (``numpyside.layers``, ``backend="numpy"``)."""
        params, grads, bn = self.params, self.grads, self.batch_norm
        matmul = np.matmul
        # mode="clip": with the default mode="raise", take() buffers `out` (a copy); the indices
        # were checked in epoch()
        np.take(self.images, indices, axis=0, out=b.x, mode="clip")
        np.take(self.labels, indices, out=b.labels, mode="clip")
        count = b.count
        x = b.x
        for i in range(3):
            layer, z, s, e, mask = params[i], b.z[i], b.s[i], b.tmp[i], b.mask[i]
            matmul(x, layer["weight"], out=z)
            if bn:
                self._bn_forward_numpy(b, i, z)
            else:
                np.add(z, layer["bias"], out=z)
            # sigmoid: e = exp(-|z|); s = where(z >= 0, 1, e) / (1 + e)
            np.abs(z, out=e)
            np.negative(e, out=e)
            np.exp(e, out=e)
            np.greater_equal(z, 0, out=mask)
            np.add(e, 1, out=z)
            np.divide(e, z, out=s)
            np.divide(1, z, out=s, where=mask)
            x = s
        out_layer, out_grads = params[3], grads[3]
        logits, dlogits, rows, labels = b.logits, b.dlogits, b.rows, b.labels
        matmul(x, out_layer["weight"], out=logits)
        np.add(logits, out_layer["bias"], out=logits)
        # layers.softmax_cross_entropy, NumPy backend
        np.maximum.reduce(logits, axis=1, keepdims=True, out=b.row_max)
        np.subtract(logits, b.row_max, out=logits)  # shifted
        np.exp(logits, out=dlogits)
        np.add.reduce(dlogits, axis=1, keepdims=True, out=b.row_sum)
        picked = b.picked
        np.log(b.row_sum[:, 0], out=picked)
        np.subtract(logits[rows, labels], picked, out=picked)
        loss = -picked.mean()
        np.divide(dlogits, b.row_sum, out=dlogits)
        dlogits[rows, labels] -= 1
        np.divide(dlogits, count, out=dlogits)
        np.add.reduce(dlogits, axis=0, out=out_grads["bias"])
        matmul(x.T, dlogits, out=out_grads["weight"])
        d, weight = dlogits, out_layer["weight"]
        for i in (2, 1, 0):
            layer, layer_grads, ds, s, dz, tmp = params[i], grads[i], b.ds[i], b.s[i], b.d[i], b.tmp[i]
            matmul(d, weight.T, out=ds)
            np.multiply(ds, s, out=ds)  # dout * s * (1 - s)
            np.subtract(1, s, out=tmp)
            np.multiply(ds, tmp, out=ds)
            if bn:
                self._bn_backward_numpy(b, i)
            else:
                dz = ds
                np.add.reduce(dz, axis=0, out=layer_grads["bias"])
            d, weight = dz, layer["weight"]
            matmul((b.s[i - 1] if i else b.x).T, d, out=layer_grads["weight"])
        v, p, g = self._velocity.flat, self._params.flat, self._grads.flat  # train.sgd_momentum
        np.multiply(v, self.momentum, out=v)
        np.add(v, g, out=v)
        np.multiply(v, lr, out=g)  # the gradients are spent: g holds lr * v
        np.subtract(p, g, out=p)
        return self.dtype.type(loss)

    def _bn_forward_numpy(self, b: _StepBuffers, i: int, z: np.ndarray) -> None:
        """Hidden layer ``i``'s batch norm of ``z`` in place (``layers.batchnorm_forward``, NumPy backend),
        then ``model.update_running_stats`` in place."""
        layer, count, e = self.params[i], b.count, b.tmp[i]
        mean, var, inv_std, centered, x_hat = b.mean[i], b.var[i], b.inv_std[i], b.centered[i], b.x_hat[i]
        np.add.reduce(z, axis=0, out=mean)  # x.mean(axis=0)
        np.divide(mean, count, out=mean)
        np.subtract(z, mean, out=centered)
        np.multiply(centered, centered, out=e)  # (centered**2).mean(axis=0)
        np.add.reduce(e, axis=0, out=var)
        np.divide(var, count, out=var)
        np.add(var, self._eps, out=inv_std)  # 1.0 / np.sqrt(var + eps)
        np.sqrt(inv_std, out=inv_std)
        np.divide(1.0, inv_std, out=inv_std)
        np.multiply(centered, inv_std, out=x_hat)
        np.multiply(layer["gamma"], x_hat, out=z)  # gamma * x_hat + beta
        np.add(z, layer["beta"], out=z)
        running, stat = self.state[i], b.stat[i]
        np.multiply(running["mean"], self._keep, out=running["mean"])
        np.multiply(mean, self._new, out=stat)
        np.add(running["mean"], stat, out=running["mean"])
        np.multiply(var, b.unbias, out=stat)
        np.multiply(stat, self._new, out=stat)
        np.multiply(running["var"], self._keep, out=running["var"])
        np.add(running["var"], stat, out=running["var"])

    def _bn_backward_numpy(self, b: _StepBuffers, i: int) -> None:
        """Hidden layer ``i``'s batch norm backward from ``b.ds[i]`` into ``b.d[i]`` and the gamma, beta
        gradients: ``(gamma * inv_std / N) * (N * dout - dbeta - x_hat * dgamma)`` (NumPy backend's order)."""
        layer, layer_grads, count = self.params[i], self.grads[i], b.count
        ds, dz, tmp, x_hat, stat = b.ds[i], b.d[i], b.tmp[i], b.x_hat[i], b.stat[i]
        dgamma, dbeta = layer_grads["gamma"], layer_grads["beta"]
        np.add.reduce(ds, axis=0, out=dbeta)
        np.multiply(ds, x_hat, out=tmp)
        np.add.reduce(tmp, axis=0, out=dgamma)
        np.multiply(layer["gamma"], b.inv_std[i], out=stat)
        np.divide(stat, count, out=stat)
        np.multiply(ds, count, out=dz)
        np.subtract(dz, dbeta, out=dz)
        np.multiply(x_hat, dgamma, out=tmp)
        np.subtract(dz, tmp, out=dz)
        np.multiply(stat, dz, out=dz)
