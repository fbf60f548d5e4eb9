r"""A whole epoch of an ensemble in ONE numba call: :func:`numpyside.kernels.fused.train_steps` with a
member axis, for :class:`numpyside.ensemble.fast.FastEnsembleTrainer`.

Layout: the members' features sit side by side, ``W = M n`` columns. A hidden layer's activations
are ``(B, W)`` (member ``m`` in columns ``m n .. (m + 1) n``), the first weight is ``(784, W)``,
so that with a batch shared by all members the first layer's two big products are ONE ``gemm``
each:

.. math:: Z_0 = X\, [W_0^{(1)} \cdots W_0^{(M)}], \qquad
          [dW_0^{(1)} \cdots dW_0^{(M)}] = X^T [D_0^{(1)} \cdots D_0^{(M)}]

(one product of ``(B, 784)`` by ``(784, M n)`` instead of ``M`` products by ``(784, n)``: the same
dot products, element by element, though the BLAS may sum some of them in another order than in
the narrower product; :mod:`numpyside.ensemble` makes the same wide product). The hidden and
output weights are ``(M, n, n)`` and ``(M, n, 10)``; their products are ``gemm`` calls on member
``m``'s column block (leading dimension ``W``). Batch norm's features are independent, so the
single model's fused kernels run on a member's column range unchanged; only the running
statistics' momentum is per member. Every operation is the one :mod:`numpyside.ensemble` performs
(``backend="numba"``), in its order, each product of the same shape: bit-identical results
(``tests/test_fast_ensemble.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from numpyside.kernels import blas, fused, products

_jit = fused._jit  # one set of numba options for every fused kernel


class MemberSettings(NamedTuple):
    """``eps`` and ``unbias = B / (B - 1)`` (scalars); per member (M,): the running statistics'
    ``keep = 1 - bn_momentum`` and ``new = bn_momentum``, and SGD's ``momentum``."""

    eps: np.floating
    unbias: np.floating
    keep: np.ndarray
    new: np.ndarray
    momentum: np.ndarray


class Epoch(NamedTuple):
    """What an epoch trains on: the training set, ``indices`` (steps, S, B), ``rates`` (steps, M);
    the losses (steps, M) are written."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    rates: np.ndarray
    losses: np.ndarray


@_jit
def gemm(trans_a, trans_b, m, n, k, a, a_offset, lda, b, b_offset, ldb, c, c_offset, ldc):
    """``C = op(A) @ op(B)`` where ``A`` starts ``a_offset`` elements into ``a`` with leading
    dimension ``lda`` (row-major), and so on: a member's block of a wider array."""
    item = a.itemsize
    products._gemm(
        trans_a,
        trans_b,
        m,
        n,
        k,
        a.ctypes.data + a_offset * item,
        lda,
        b.ctypes.data + b_offset * item,
        ldb,
        c.ctypes.data + c_offset * item,
        ldc,
        item,
    )


@_jit
def sgd_members(params, velocity, grads, lr, momentum):
    """Per member ``m``: ``v <- v * momentum_m + g``; ``p <- p - lr_m * v`` on ``(outer, M, inner)``
    views (the reference's ``np.multiply``, ``np.add``, ``p -= lr * v``: two roundings each)."""
    n_outer, n_members, n_inner = params.shape
    for o in range(n_outer):
        for m in range(n_members):
            rate, mu = lr[m], momentum[m]
            p, v, g = params[o, m], velocity[o, m], grads[o, m]
            for k in range(n_inner):
                vk = v[k] * mu + g[k]
                v[k] = vk
                p[k] = p[k] - rate * vk


@_jit
def train_steps(epoch, act, p, g, p_sgd, v_sgd, g_sgd, running_mean, running_var, c, batch_norm):
    r"""Step ``k``: every member trains on its batch ``epoch.indices[k]`` (one shared, ``S = 1``, or
    one per member) with its rate ``epoch.rates[k, m]``; its loss goes to ``epoch.losses[k, m]``.

    A step: gather; with a shared batch, layer 0's ``Z = X [W_0^{(1)} \cdots]`` as one ``gemm``;
    then member by member (so that a member's activations are still in cache when its backward
    reads them): its first product (per-member batches), batch norm + sigmoid and the products of
    every hidden layer on its columns, the output layer, softmax and loss, and the backward in
    reverse down to layer 0 (its ``dW_0`` too, per-member batches); with a shared batch, layer 0's
    ``dW_0`` of all members as one ``gemm``; SGD per member over ``p_sgd, v_sgd, g_sgd`` (tuples
    of ``(outer, M, inner)`` views). ``p, g`` are the single model's :class:`numpyside.kernels.fused.Layers`
    with the members side by side (``w0`` (784, M n), ``w_hidden`` (2, M, n, n), ``w_out``
    (M, n, 10), ``a, b`` (3, M n), ``b_out`` (M, 10)), ``running_*`` (3, M n),
    ``c`` :class:`MemberSettings`; ``act`` the single model's :class:`numpyside.kernels.fused.Activations`
    with the members side by side: ``x`` (B, 784) and ``y`` (B,) one gathered batch (the shared one,
    or each member's in turn), ``z, s, x_hat, ds, d`` (3, B, M n), ``mean, var, inv_std`` (3, M n),
    ``logits, dlogits`` (M, B, 10).
    """
    n_hidden, n_rows, width = act.z.shape
    n_members, n_in = act.logits.shape[0], act.x.shape[1]
    n = width // n_members
    n_classes = act.logits.shape[2]
    shared = epoch.indices.shape[1] == 1
    last = n_hidden - 1
    x, z, s, ds, d = act.x, act.z, act.s, act.ds, act.d
    NO, T = blas.NO_TRANS, blas.TRANS
    for k in range(epoch.indices.shape[0]):
        if shared:
            fused.gather_rows(epoch.images, epoch.indices[k, 0], x, 0, n_rows)
            fused.gather_labels(epoch.labels, epoch.indices[k, 0], act.y)
            products.matmul(x, p.w0, z[0])
        for m in range(n_members):
            lo, hi = m * n, (m + 1) * n
            if not shared:  # into the one buffer, right before the member's two products read it
                fused.gather_rows(epoch.images, epoch.indices[k, m], x, 0, n_rows)
                fused.gather_labels(epoch.labels, epoch.indices[k, m], act.y)
            for i in range(n_hidden):
                if i == 0 and not shared:
                    gemm(NO, NO, n_rows, n, n_in, x, 0, n_in, p.w0, lo, width, z, lo, width)
                elif i > 0:
                    gemm(NO, NO, n_rows, n, n, s[i - 1], lo, width, p.w_hidden[i - 1, m], 0, n, z[i], lo, width)
                fused.hidden_forward(
                    act, p, running_mean, running_var, i, c.eps, c.keep[m], c.new[m], c.unbias, batch_norm, lo, hi
                )
            logits, dlogits, w_out = act.logits[m], act.dlogits[m], p.w_out[m]
            gemm(NO, NO, n_rows, n_classes, n, s[last], lo, width, w_out, 0, n_classes, logits, 0, n_classes)
            epoch.losses[k, m] = fused.bias_softmax_cross_entropy(logits, p.b_out[m], act.y, dlogits, g.b_out[m])
            gemm(T, NO, n, n_classes, n_rows, s[last], lo, width, dlogits, 0, n_classes, g.w_out[m], 0, n_classes)
            gemm(NO, T, n_rows, n, n_classes, dlogits, 0, n_classes, w_out, 0, n_classes, ds[last], lo, width)
            for i in range(last, -1, -1):
                fused.hidden_backward(act, p, g, i, batch_norm, lo, hi)
                if i == 0 and not shared:
                    gemm(T, NO, n_in, n, n_rows, x, 0, n_in, d[0], lo, width, g.w0, lo, width)
                elif i > 0:
                    gemm(T, NO, n, n, n_rows, s[i - 1], lo, width, d[i], lo, width, g.w_hidden[i - 1, m], 0, n)
                    gemm(NO, T, n_rows, n, n, d[i], lo, width, p.w_hidden[i - 1, m], 0, n, ds[i - 1], lo, width)
        if shared:
            products.matmul_tn(x, d[0], g.w0)
        rates = epoch.rates[k]
        for block in range(len(p_sgd)):
            sgd_members(p_sgd[block], v_sgd[block], g_sgd[block], rates, c.momentum)
