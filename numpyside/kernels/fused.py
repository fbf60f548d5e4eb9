r"""Fused numba kernels for :class:`numpyside.fast.FastTrainer`: one pass where the reference path
(:mod:`numpyside.layers` with ``backend="numba"``) makes several, into preallocated buffers.

Every kernel performs, element by element, the SAME floating-point operations in the SAME order as
the reference kernels of :mod:`numpyside.kernels.numba_layers` and the NumPy code around them (``fastmath=False``:
no reassociation, no FMA contraction; constants in the arrays' dtype). Only the loops and the memory
traffic are fused, not the arithmetic: ``FastTrainer`` and the reference ``Trainer`` give
bit-identical parameters (``tests/test_fast.py``). The sigmoid's ``exp`` is
:func:`numpyside.kernels.fastexp.exp_nonpositive`, which vectorises inside the loop.

Each kernel works on a range ``lo <= j < hi`` of its array (features of batch norm, rows of the
gather, elements of SGD); the parts of a range are independent (a feature's batch sums stay whole,
in row order), so threads can take one part each without changing the result
(:func:`train_steps_threaded`). Shapes: ``B`` batch, ``n`` features; arrays C-contiguous.
"""

from __future__ import annotations

import types as pytypes
from typing import NamedTuple

import numba
import numpy as np

from numpyside.kernels import jit, products
from numpyside.kernels import numba_layers as kernels
from numpyside.kernels.gemm import MR

_jit = jit.njit(fastmath=False, error_model="numpy", nogil=True, boundscheck=False)


@_jit
def _unsigned(index):
    """``index`` as an unsigned integer. A loop ``for j in range(lo, hi)`` over signed bounds
    indexes with a signed ``j``, which numba wraps around (``a[j]`` is ``a[j + len(a)]`` for
    ``j < 0``): that select per access keeps LLVM from vectorising the loop. Over unsigned bounds
    ``j`` is unsigned and ``a[j]`` a plain load."""
    return np.uint64(index)


@_jit
def gather_rows(source, indices, out, lo, hi):
    """``out[k] = source[indices[k]]`` for the rows ``lo <= k < hi`` of a batch of images."""
    lo, hi = _unsigned(lo), _unsigned(hi)
    n = source.shape[1]
    for k in range(lo, hi):
        row = indices[k]
        for j in range(n):
            out[k, j] = source[row, j]


@_jit
def gather_labels(labels, indices, out):
    """``out[k] = labels[indices[k]]``."""
    for k in range(indices.shape[0]):
        out[k] = labels[indices[k]]


@_jit
def bn_sigmoid_forward(
    z, gamma, beta, eps, running_mean, running_var, keep, new, unbias, mean, var, inv_std, x_hat, s, lo, hi
):
    """Training-mode batch norm of ``z`` (B, n), the running-statistics update, and the sigmoid,
    in three passes over the batch:

    1. ``mean = sum_b z / B``;
    2. ``var = sum_b (z - mean)**2 / B``, ``inv_std = 1 / sqrt(var + eps)``; running statistics
       ``rm <- keep * rm + new * mean``, ``rv <- keep * rv + new * (var * unbias)`` (in place;
       ``keep = 1 - momentum``, ``new = momentum``, ``unbias = B / (B - 1)``);
    3. ``x_hat = (z - mean) * inv_std``, ``out = gamma * x_hat + beta``, ``s = sigmoid(out)``.

    Same operations as ``kernels.batchnorm_forward`` + ``model.update_running_stats`` +
    ``kernels.sigmoid`` (``centered`` is recomputed instead of stored: the same rounding). The sums
    of passes 1 and 2 take four rows per sweep over the features, adding them in row order: the
    same sums, with a quarter of the loads and stores of the accumulators.
    """
    lo, hi = _unsigned(lo), _unsigned(hi)
    n_rows = z.shape[0]
    dt = z.dtype.type
    count = dt(n_rows)
    one = dt(1)
    for j in range(lo, hi):
        mean[j] = 0
        var[j] = 0
    i = 0
    while i + 4 <= n_rows:
        for j in range(lo, hi):
            mean[j] = (((mean[j] + z[i, j]) + z[i + 1, j]) + z[i + 2, j]) + z[i + 3, j]
        i += 4
    for row in range(i, n_rows):
        for j in range(lo, hi):
            mean[j] += z[row, j]
    for j in range(lo, hi):
        mean[j] = mean[j] / count
    i = 0
    while i + 4 <= n_rows:
        for j in range(lo, hi):
            m = mean[j]
            c0 = z[i, j] - m
            c1 = z[i + 1, j] - m
            c2 = z[i + 2, j] - m
            c3 = z[i + 3, j] - m
            var[j] = (((var[j] + c0 * c0) + c1 * c1) + c2 * c2) + c3 * c3
        i += 4
    for row in range(i, n_rows):
        for j in range(lo, hi):
            c = z[row, j] - mean[j]
            var[j] += c * c
    for j in range(lo, hi):
        var[j] = var[j] / count
        inv_std[j] = one / np.sqrt(var[j] + eps)
        running_mean[j] = keep * running_mean[j] + new * mean[j]
        running_var[j] = keep * running_var[j] + new * (var[j] * unbias)
    for i in range(n_rows):
        for j in range(lo, hi):
            h = (z[i, j] - mean[j]) * inv_std[j]
            x_hat[i, j] = h
            s[i, j] = kernels.logistic(gamma[j] * h + beta[j], one)


@_jit
def bias_sigmoid_forward(z, bias, s, lo, hi):
    """Batch norm off: ``s = sigmoid(z + bias)`` (``kernels.sigmoid``'s operations), one pass."""
    lo, hi = _unsigned(lo), _unsigned(hi)
    n_rows = z.shape[0]
    one = z.dtype.type(1)
    for i in range(n_rows):
        for j in range(lo, hi):
            s[i, j] = kernels.logistic(z[i, j] + bias[j], one)


@_jit
def sigmoid_bn_backward(ds, s, x_hat, gamma, inv_std, d, dgamma, dbeta, lo, hi):
    """Backward of sigmoid then batch norm; ``ds = dL/ds`` (B, n). Two passes:

    1. ``dout = ds * s * (1 - s)`` (stored in ``d``), ``dbeta = sum_b dout``,
       ``dgamma = sum_b dout * x_hat``;
    2. ``d = (gamma * inv_std / B) * (B * dout - dbeta - x_hat * dgamma)``, in place.

    Same operations as ``kernels.sigmoid_backward`` + ``kernels.batchnorm_backward``.
    """
    lo, hi = _unsigned(lo), _unsigned(hi)
    n_rows = ds.shape[0]
    dt = ds.dtype.type
    count = dt(n_rows)
    one = dt(1)
    for j in range(lo, hi):
        dbeta[j] = 0
        dgamma[j] = 0
    for i in range(n_rows):
        for j in range(lo, hi):
            sk = s[i, j]
            dout = ds[i, j] * sk * (one - sk)
            d[i, j] = dout
            dbeta[j] += dout
            dgamma[j] += dout * x_hat[i, j]
    for i in range(n_rows):
        for j in range(lo, hi):
            scale = gamma[j] * inv_std[j] / count
            d[i, j] = scale * (count * d[i, j] - dbeta[j] - x_hat[i, j] * dgamma[j])


@_jit
def sigmoid_bias_backward(ds, s, d, dbias, lo, hi):
    """Batch norm off: ``d = ds * s * (1 - s)`` and ``dbias = sum_b d`` (one pass)."""
    lo, hi = _unsigned(lo), _unsigned(hi)
    n_rows = ds.shape[0]
    one = ds.dtype.type(1)
    for j in range(lo, hi):
        dbias[j] = 0
    for i in range(n_rows):
        for j in range(lo, hi):
            sk = s[i, j]
            dout = ds[i, j] * sk * (one - sk)
            d[i, j] = dout
            dbias[j] += dout


@_jit
def hidden_forward(act, p, running_mean, running_var, i, eps, keep, new, unbias, batch_norm, lo, hi):
    """Hidden layer ``i`` after its product, features ``lo <= j < hi``: :func:`bn_sigmoid_forward`
    (batch norm + running statistics + sigmoid) or, without batch norm, :func:`bias_sigmoid_forward`;
    ``act``, ``p`` as in :func:`train_steps`."""
    if batch_norm:
        bn_sigmoid_forward(
            act.z[i],
            p.a[i],
            p.b[i],
            eps,
            running_mean[i],
            running_var[i],
            keep,
            new,
            unbias,
            act.mean[i],
            act.var[i],
            act.inv_std[i],
            act.x_hat[i],
            act.s[i],
            lo,
            hi,
        )
    else:
        bias_sigmoid_forward(act.z[i], p.a[i], act.s[i], lo, hi)


@_jit
def hidden_backward(act, p, g, i, batch_norm, lo, hi):
    """Backward of :func:`hidden_forward` from ``act.ds[i]`` into ``act.d[i]`` and the gradients
    ``g.a[i]``, ``g.b[i]``, features ``lo <= j < hi``."""
    if batch_norm:
        sigmoid_bn_backward(act.ds[i], act.s[i], act.x_hat[i], p.a[i], act.inv_std[i], act.d[i], g.a[i], g.b[i], lo, hi)
    else:
        sigmoid_bias_backward(act.ds[i], act.s[i], act.d[i], g.a[i], lo, hi)


@_jit
def bias_softmax_cross_entropy(logits, bias, labels, dlogits, dbias):
    """Output bias, loss, and the loss's gradients w.r.t. the logits and the bias.

    ``logits += bias`` in place, then per row ``kernels.softmax_cross_entropy``'s operations
    (``m = max z``, ``e = exp(z - m)``, ``s = sum e``, ``log p_y = (z_y - m) - log s``,
    ``dlogits = (e / s - onehot(y)) / B``), and ``dbias = sum_b dlogits`` (rows in order, as
    NumPy's axis-0 sum). Returns ``loss = -(sum_b log p_{y_b}) / B`` in the logits' dtype.
    """
    n_rows, n_classes = logits.shape
    for i in range(n_rows):
        for j in range(n_classes):
            logits[i, j] = logits[i, j] + bias[j]
    loss = kernels.softmax_cross_entropy_into(logits, labels, dlogits)
    for j in range(n_classes):
        dbias[j] = 0
    for i in range(n_rows):
        for j in range(n_classes):
            dbias[j] += dlogits[i, j]
    return loss


@_jit
def sgd_momentum(params, velocity, grads, lr, momentum, lo, hi):
    """``v <- v * momentum + g``; ``p <- p - lr * v`` over the elements ``lo <= k < hi`` of flat
    (1-D) buffers holding every parameter (the reference's ``np.multiply``, ``np.add``,
    ``p -= lr * v``: two roundings each, no FMA)."""
    lo, hi = _unsigned(lo), _unsigned(hi)
    for k in range(lo, hi):
        v = velocity[k] * momentum + grads[k]
        velocity[k] = v
        params[k] = params[k] - lr * v


@_jit
def part_bounds(n, part, parts, align):
    """``(lo, hi)``: part ``part`` of ``parts`` nearly equal parts of ``range(n)``, the inner
    boundaries rounded to multiples of ``align`` (16 floats: one cache line, so that two threads
    writing neighbouring parts of a row share no line where the row starts on one)."""
    lo = 0 if part == 0 else min(n, (part * n // parts + align // 2) // align * align)
    hi = n if part == parts - 1 else min(n, ((part + 1) * n // parts + align // 2) // align * align)
    return lo, hi


class Epoch(NamedTuple):
    """What an epoch trains on: the training set, ``indices`` (steps, B) and ``rates`` (steps,);
    the per-step ``losses`` (steps,) are written."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    rates: np.ndarray
    losses: np.ndarray


class Layers(NamedTuple):
    """Parameters (or their gradients) in the stacked layout: ``w0`` (784, n), ``w_hidden``
    (2, n, n), ``w_out`` (n, 10), ``a`` (3, n) gamma (or bias), ``b`` (3, n) beta, ``b_out`` (10,);
    ``flat`` is the one buffer all of them are views of."""

    w0: np.ndarray
    w_hidden: np.ndarray
    w_out: np.ndarray
    a: np.ndarray
    b: np.ndarray
    b_out: np.ndarray
    flat: np.ndarray


class Activations(NamedTuple):
    """One step's buffers: ``x`` (B, 784) and ``y`` (B,) the gathered batch; ``z, s, x_hat, ds, d``
    (3, B, n) per hidden layer; ``mean, var, inv_std`` (3, n); ``logits, dlogits`` (B, 10)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    s: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    inv_std: np.ndarray
    ds: np.ndarray
    d: np.ndarray
    logits: np.ndarray
    dlogits: np.ndarray


class Settings(NamedTuple):
    """Scalars in the arrays' dtype: batch norm's ``eps``; the running statistics' ``keep = 1 -
    momentum`` and ``new = momentum``; ``unbias = B / (B - 1)``; SGD's ``momentum``."""

    eps: np.floating
    keep: np.floating
    new: np.floating
    unbias: np.floating
    momentum: np.floating


def _train_steps(epoch, act, p, g, velocity, running_mean, running_var, c, batch_norm, parts, engines, packed, split):
    r"""Step ``k``: train on the batch ``epoch.indices[k]`` with the rate ``epoch.rates[k]``, write
    the loss to ``epoch.losses[k]``. The numba counterpart of ``jaxside.train``'s ``lax.scan``.

    A step: gather the batch; per hidden layer ``z = x @ W`` then batch norm + sigmoid; the output
    layer, softmax and loss, ``dW = x.T @ d``; per hidden layer, last first, ``ds = d_next @
    W_next.T``, the sigmoid + batch-norm backward and ``dW = x.T @ d``; the SGD update of all
    parameters (``p`` and ``g`` are :class:`Layers`, ``velocity`` flat, ``running_*`` (3, n), ``c``
    :class:`Settings`). Product ``j`` (:data:`numpyside.kernels.products.PRODUCTS`) runs on the engine
    ``engines[j]``; ``packed`` is the numba GEMM's scratch for ``W.T`` (``n * n`` elements).

    Every kernel's work is split into ``parts`` independent parts, one ``prange`` iteration each:
    rows of the gather, FEATURES of batch norm (a feature's sum over the batch stays whole, in row
    order), slices of the flat parameters in SGD. With ``split`` (every engine the numba GEMM, or
    one part) a hidden layer's products are split by the same columns and done inside the same
    part as its kernels: each part computes its features' ``z``, batch norm and sigmoid, and in the
    backward its features' ``ds``, ``d`` and ``dW``, with no wait in between (a layer's parts wait
    for each other once, as the next product needs all of them); the first layer's two products,
    whose operand ``x`` is the largest, are split by rows instead (``z = x @ W`` with the gather,
    ``dW = x.T @ d`` after the backward), so that each part reads only its share of ``x``.
    Otherwise (BLAS with ``parts > 1``) each product is one call before or after the parts. The
    results do not depend on ``parts``. Compiled three times: :func:`train_steps` (``prange`` is
    ``range``), :func:`train_steps_threaded` and :func:`train_steps_blas` (one thread, every product
    on BLAS).
    """
    n_hidden, n_rows, n = act.z.shape
    last, n_out = n_hidden - 1, act.logits.shape[1]
    x, z, s, ds, d = act.x, act.z, act.s, act.ds, act.d
    for k in range(epoch.indices.shape[0]):
        indices = epoch.indices[k]
        for part in numba.prange(parts):
            lo, hi = part_bounds(n_rows, part, parts, MR)
            gather_rows(epoch.images, indices, x, lo, hi)
            if split:  # the first layer's product by rows: each part reads its rows of x only
                products.nn_rows(engines[0], x, p.w0, z[0], lo, hi)
        gather_labels(epoch.labels, indices, act.y)
        for i in range(n_hidden):
            src, w, engine = x if i == 0 else s[i - 1], p.w0 if i == 0 else p.w_hidden[i - 1], engines[i]
            if not split:
                products.nn(engine, src, w, z[i], 0, n)
            for part in numba.prange(parts):
                lo, hi = part_bounds(n, part, parts, 16)
                if split and i > 0:
                    products.nn(engine, src, w, z[i], lo, hi)
                hidden_forward(act, p, running_mean, running_var, i, c.eps, c.keep, c.new, c.unbias, batch_norm, lo, hi)
        products.nn(engines[products.FORWARD + n_hidden], s[last], p.w_out, act.logits, 0, n_out)
        epoch.losses[k] = bias_softmax_cross_entropy(act.logits, p.b_out, act.y, act.dlogits, g.b_out)
        products.tn(engines[products.WEIGHT_GRADIENT + n_hidden], s[last], act.dlogits, g.w_out, 0, n_out)
        for i in range(last, -1, -1):
            d_next, w_next = (act.dlogits, p.w_out) if i == last else (d[i + 1], p.w_hidden[i])
            src, dw = (x, g.w0) if i == 0 else (s[i - 1], g.w_hidden[i - 1])
            e_dx, e_dw = engines[products.INPUT_GRADIENT + i + 1], engines[products.WEIGHT_GRADIENT + i]
            if not split:
                products.nt(e_dx, d_next, w_next, packed, ds[i], 0, n)
            for part in numba.prange(parts):
                lo, hi = part_bounds(n, part, parts, 16)
                if split:
                    products.nt(e_dx, d_next, w_next, packed, ds[i], lo, hi)
                hidden_backward(act, p, g, i, batch_norm, lo, hi)
                if split and i > 0:
                    products.tn(e_dw, src, d[i], dw, lo, hi)
            if not split:
                products.tn(e_dw, src, d[i], dw, 0, n)
            elif i == 0:  # the first layer's weight gradient by rows: each part reads its columns of x
                for part in numba.prange(parts):
                    lo, hi = part_bounds(dw.shape[0], part, parts, MR)
                    products.tn_rows(e_dw, src, d[i], dw, lo, hi)
        for part in numba.prange(parts):
            lo, hi = part_bounds(p.flat.shape[0], part, parts, 16)
            sgd_momentum(p.flat, velocity, g.flat, epoch.rates[k], c.momentum, lo, hi)


def _copy_named(function, name: str, **globals_):
    """``function`` under another name (and with ``globals_`` replacing some of its globals):
    numba's on-disk cache files a compiled function under its name and line, so two compilations
    of one body need two names."""
    namespace = dict(function.__globals__, **globals_) if globals_ else function.__globals__
    copy = pytypes.FunctionType(function.__code__, namespace, name, function.__defaults__, function.__closure__)
    copy.__qualname__ = name
    copy.__doc__ = function.__doc__
    return copy


#: :mod:`numpyside.kernels.products` as an epoch with every product on BLAS sees it (the default on one
#: thread): the same names, BLAS behind each, so that epoch compiles no GEMM code at all.
_BLAS_PRODUCTS = pytypes.ModuleType("numpyside.kernels.products, BLAS only")
_BLAS_PRODUCTS.__dict__.update(
    {name: getattr(products, name) for name in ("FORWARD", "WEIGHT_GRADIENT", "INPUT_GRADIENT")},
    nn=products.blas_nn,
    nn_rows=products.blas_nn,  # BLAS computes the whole product in either: the same call
    tn=products.blas_tn,
    tn_rows=products.blas_tn,
    nt=products.blas_nt,
)

train_steps = _jit(_copy_named(_train_steps, "train_steps"))
train_steps_threaded = jit.njit(parallel=True, fastmath=False, error_model="numpy", nogil=True, boundscheck=False)(
    _copy_named(_train_steps, "train_steps_threaded")
)
#: :func:`train_steps` with every product on BLAS (``engines`` is not read)
train_steps_blas = _jit(_copy_named(_train_steps, "train_steps_blas", products=_BLAS_PRODUCTS))
