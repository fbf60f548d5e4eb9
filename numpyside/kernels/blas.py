r"""NumPy's own BLAS ``gemm``, callable from numba code.

:mod:`numpyside.kernels.fused` calls ``cblas_sgemm`` / ``cblas_dgemm`` of the very OpenBLAS library that
NumPy loaded (same library, same threads, the same arguments NumPy's matmul passes for C-contiguous
operands and their transposed views: results bit-identical to ``np.matmul``) from inside its numba
kernels, so that a whole epoch is one call without Python's per-product overhead.

The library is found next to NumPy (``numpy.libs`` / ``numpy/.dylibs``: the ``scipy-openblas``
that NumPy >= 2 wheels ship, ILP64 with the symbol suffix ``64_``) and its functions are
registered with LLVM under fixed names, so numba's on-disk cache stays valid from process to
process. Where there is no such library (NumPy built against MKL, Accelerate, a system BLAS ...),
``available()`` is False and :class:`numpyside.fast.FastTrainer` calls ``np.matmul`` instead.
"""

from __future__ import annotations

import ctypes
import glob
import os

import llvmlite.binding as llvm
import numpy as np
from numba import types

SYMBOLS = {"s": "vmapbn_cblas_sgemm_ilp64", "d": "vmapbn_cblas_dgemm_ilp64"}
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def _signature(real):
    # cblas_?gemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), ILP64;
    # the pointers are passed as integers of pointer size (same calling convention).
    return types.void(
        types.int32,
        types.int32,
        types.int32,
        types.int64,
        types.int64,
        types.int64,
        real,
        types.intp,
        types.int64,
        types.intp,
        types.int64,
        real,
        types.intp,
        types.int64,
    )


cblas_sgemm = types.ExternalFunction(SYMBOLS["s"], _signature(types.float32))
cblas_dgemm = types.ExternalFunction(SYMBOLS["d"], _signature(types.float64))


def _numpy_openblas_candidates() -> list[str]:
    numpy_dir = os.path.dirname(np.__file__)
    patterns = [
        os.path.join(numpy_dir, os.pardir, "numpy.libs", "*openblas*"),
        os.path.join(numpy_dir, ".dylibs", "*openblas*"),
    ]
    return sorted(path for pattern in patterns for path in glob.glob(pattern))


#: NumPy's OpenBLAS (a ``ctypes.CDLL``) and its symbol prefix, once found by :func:`_register`.
LIBRARY: ctypes.CDLL | None = None
PREFIX = ""


def _register() -> str:
    """Register NumPy's ILP64 ``cblas_?gemm64_`` with LLVM; return "" or why not."""
    global LIBRARY, PREFIX
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return "not a 64-bit platform"
    for path in _numpy_openblas_candidates():
        try:
            library = ctypes.CDLL(path)  # already loaded by NumPy: the same handle
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            try:
                functions = {kind: getattr(library, f"{prefix}cblas_{kind}gemm64_") for kind in ("s", "d")}
            except AttributeError:
                continue
            for kind, function in functions.items():
                llvm.add_symbol(SYMBOLS[kind], ctypes.cast(function, ctypes.c_void_p).value)
            LIBRARY, PREFIX = library, prefix
            return ""
    return "NumPy's BLAS is not a bundled ILP64 OpenBLAS"


UNAVAILABLE_REASON = _register()


def available() -> bool:
    """True when the numba kernels may call NumPy's ``gemm`` directly."""
    return not UNAVAILABLE_REASON
