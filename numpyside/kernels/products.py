r"""The matrix products of a training step, by engine: NumPy's own BLAS, or :mod:`numpyside.kernels.gemm`.

``matmul``, ``matmul_tn``, ``matmul_nt`` call ``cblas_?gemm`` of the OpenBLAS that NumPy loaded
(:mod:`numpyside.kernels.blas`) exactly as ``np.matmul`` does for these operands: the same bits as the
readable trainer's products. :func:`nn`, :func:`tn`, :func:`nt` take an ``engine`` per product
(:data:`BLAS` or :data:`NUMBA_GEMM`) and the columns ``lo <= j < hi`` of the output to compute:
the numba GEMM computes just those (threads take a part each, the bits do not depend on the
split); BLAS computes the whole product in one call, so it is given the whole range.

A step's 11 products are numbered as in :data:`PRODUCTS` (the index into a trainer's ``engines``):
``x @ W`` of layers 0-3, ``x.T @ d`` (weight gradients) of layers 0-3, ``d @ W.T`` (input
gradients) of layers 1-3. Which engine is faster for each is measured (:mod:`numpyside.kernels.gemm_choice`).
"""

from __future__ import annotations

import numpy as np

from numpyside.kernels import blas, gemm, jit

_jit = jit.njit(fastmath=False, error_model="numpy", nogil=True, boundscheck=False)

#: Engines of a product.
BLAS, NUMBA_GEMM = 0, 1
#: The products of a step in the order of ``engines``: (kind, layer); kind "nn" is ``x @ W``,
#: "tn" ``x.T @ d``, "nt" ``d @ W.T``.
PRODUCTS = (
    *(("nn", layer) for layer in range(4)),
    *(("tn", layer) for layer in range(4)),
    *(("nt", layer) for layer in range(1, 4)),
)
FORWARD, WEIGHT_GRADIENT, INPUT_GRADIENT = 0, 4, 7  # engines[FORWARD + i], ...[INPUT_GRADIENT + i]


@_jit
def _gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, itemsize):
    """``C = op(A) @ op(B)`` (row-major, ``alpha = 1``, ``beta = 0``) on raw pointers, exactly the
    call that ``np.matmul`` makes for these operands."""
    if itemsize == 4:
        blas.cblas_sgemm(
            blas.ROW_MAJOR, trans_a, trans_b, m, n, k, np.float32(1), a, lda, b, ldb, np.float32(0), c, ldc
        )
    else:
        blas.cblas_dgemm(blas.ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc)


@_jit
def matmul(x, w, out):
    """``out = x @ w`` for C-contiguous 2-D arrays."""
    _gemm(
        blas.NO_TRANS,
        blas.NO_TRANS,
        x.shape[0],
        w.shape[1],
        x.shape[1],
        x.ctypes.data,
        x.shape[1],
        w.ctypes.data,
        w.shape[1],
        out.ctypes.data,
        out.shape[1],
        x.itemsize,
    )


@_jit
def matmul_tn(x, d, out):
    """``out = x.T @ d`` (a weight gradient) for C-contiguous 2-D arrays."""
    _gemm(
        blas.TRANS,
        blas.NO_TRANS,
        x.shape[1],
        d.shape[1],
        x.shape[0],
        x.ctypes.data,
        x.shape[1],
        d.ctypes.data,
        d.shape[1],
        out.ctypes.data,
        out.shape[1],
        x.itemsize,
    )


@_jit
def matmul_nt(d, w, out):
    """``out = d @ w.T`` (an input gradient) for C-contiguous 2-D arrays."""
    _gemm(
        blas.NO_TRANS,
        blas.TRANS,
        d.shape[0],
        w.shape[0],
        d.shape[1],
        d.ctypes.data,
        d.shape[1],
        w.ctypes.data,
        w.shape[1],
        out.ctypes.data,
        out.shape[1],
        d.itemsize,
    )


@_jit
def nn(engine, x, w, out, lo, hi):
    """``out[:, lo:hi] = x @ w[:, lo:hi]`` (BLAS: the whole ``out``; call it with the whole range)."""
    if engine == BLAS:
        matmul(x, w, out)
    else:
        gemm.nn(x, w, out, lo, hi)


@_jit
def tn(engine, x, d, out, lo, hi):
    """``out[:, lo:hi] = x.T @ d[:, lo:hi]`` (a weight gradient)."""
    if engine == BLAS:
        matmul_tn(x, d, out)
    else:
        gemm.tn(x, d, out, lo, hi)


@_jit
def nn_rows(engine, x, w, out, lo, hi):
    """``out[lo:hi] = x[lo:hi] @ w`` (BLAS: the whole ``out``; call it with the whole range)."""
    if engine == BLAS:
        matmul(x, w, out)
    else:
        gemm.nn_rows(x, w, out, lo, hi)


@_jit
def tn_rows(engine, x, d, out, lo, hi):
    """``out[lo:hi] = x[:, lo:hi].T @ d`` (rows of a weight gradient; BLAS: the whole ``out``)."""
    if engine == BLAS:
        matmul_tn(x, d, out)
    else:
        gemm.tn_rows(x, d, out, lo, hi)


@_jit
def nt(engine, d, w, packed, out, lo, hi):
    """``out[:, lo:hi] = d @ w.T[:, lo:hi]`` (an input gradient); ``packed``: scratch of at least
    ``w.size`` elements for the numba GEMM's copy of ``w.T``."""
    if engine == BLAS:
        matmul_nt(d, w, out)
    else:
        gemm.nt(d, w, packed, out, lo, hi)


@_jit
def blas_nn(engine, x, w, out, lo, hi):
    """:func:`nn` (and :func:`nn_rows`) with BLAS whatever ``engine`` says: an epoch compiled with
    these contains no GEMM."""
    matmul(x, w, out)


@_jit
def blas_tn(engine, x, d, out, lo, hi):
    """:func:`tn` (and :func:`tn_rows`) on BLAS (see :func:`blas_nn`)."""
    matmul_tn(x, d, out)


@_jit
def blas_nt(engine, d, w, packed, out, lo, hi):
    """:func:`nt` on BLAS (see :func:`blas_nn`)."""
    matmul_nt(d, w, out)


def engines_all(engine: int) -> np.ndarray:
    """One engine for every product of a step."""
    return np.full(len(PRODUCTS), engine, np.int64)
