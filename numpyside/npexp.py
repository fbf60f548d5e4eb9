"""NumPy's own ``exp`` loop (SIMD, float32 and float64), callable from numba code.

The sigmoid needs ``exp``. numba has no vectorised ``exp`` (without Intel's SVML its ``np.exp`` is
a scalar ``libm`` call per element, several times slower than NumPy's AVX2/AVX-512 loop), and a
hand-written one would round differently from the reference, which calls ``np.exp``. So
:mod:`numpyside.fused` calls *the very loop* ``np.exp`` runs: the inner loop that NumPy registered
for the ufunc's ``f->f`` (``d->d``) signature, a C function
``loop(char **args, npy_intp const *dimensions, npy_intp const *steps, void *data)``, read from the
public ``PyUFuncObject`` struct of ``numpy/ufuncobject.h`` (fields ``functions``, ``data``,
``ntypes``, ``name``, ``types``). Same function, same operands: the same bits as ``np.exp``
(``tests/test_fast.py`` checks it, on lengths that do and do not fill whole SIMD registers). What
the call skips is the ufunc machinery around the loop (argument parsing, dtype resolution,
floating-point error checks: ~1-2 us per call), and it lets a whole epoch run inside one numba call.

The loop's address is registered with LLVM under a fixed name, like :mod:`numpyside.blas` does for
``gemm``, so numba's on-disk cache stays valid from process to process. Everything is checked
before it is used (the struct's name field must read ``exp``, one input, one output, the type
codes must be there); if anything does not match (a NumPy whose struct differs, a free-threaded or
debug Python whose object header has another size), ``available()`` is False and
:class:`numpyside.fast.FastTrainer` keeps calling ``np.exp`` from Python between its kernels.

Call from numba: ``exp_loop_f32(args, dims, steps, data)`` with ``args`` the address of two
pointers (input, output), ``dims`` of one ``npy_intp`` (the length), ``steps`` of two ``npy_intp``
(the strides in bytes), ``data`` the loop's registered data pointer (:data:`LOOP_DATA`).
"""

from __future__ import annotations

import ctypes
import sys

import llvmlite.binding as llvm
import numpy as np
from numba import types

SYMBOLS = {np.dtype(np.float32): "vmapbn_numpy_exp_loop_f32", np.dtype(np.float64): "vmapbn_numpy_exp_loop_f64"}

_LOOP_SIGNATURE = types.void(types.intp, types.intp, types.intp, types.intp)
exp_loop_f32 = types.ExternalFunction(SYMBOLS[np.dtype(np.float32)], _LOOP_SIGNATURE)
exp_loop_f64 = types.ExternalFunction(SYMBOLS[np.dtype(np.float64)], _LOOP_SIGNATURE)

#: The ``void *data`` argument NumPy passes with each loop (registered alongside the function).
LOOP_DATA: dict[np.dtype, int] = {}


class _PyUFuncObjectHead(ctypes.Structure):
    """The leading fields of ``PyUFuncObject`` (numpy/ufuncobject.h) up to ``types``."""

    _fields_ = [
        ("ob_refcnt", ctypes.c_ssize_t),  # PyObject_HEAD of a regular (non-debug, GIL) build
        ("ob_type", ctypes.c_void_p),
        ("nin", ctypes.c_int),
        ("nout", ctypes.c_int),
        ("nargs", ctypes.c_int),
        ("identity", ctypes.c_int),
        ("functions", ctypes.c_void_p),  # PyUFuncGenericFunction *
        ("data", ctypes.c_void_p),  # void *const *
        ("ntypes", ctypes.c_int),
        ("reserved1", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("types", ctypes.c_void_p),  # const char *, ntypes * nargs type numbers
    ]


def _register() -> str:
    """Find ``np.exp``'s float32 and float64 loops and register them; return "" or why not."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return "not a 64-bit platform"
    if hasattr(sys, "_is_gil_enabled") and not sys._is_gil_enabled():
        return "a free-threaded Python (another object header layout)"
    if hasattr(sys, "gettotalrefcount"):
        return "a debug build of Python (another object header layout)"
    head = _PyUFuncObjectHead.from_address(id(np.exp))
    if head.ob_type != id(type(np.exp)) or head.name != b"exp" or (head.nin, head.nout, head.nargs) != (1, 1, 2):
        return "np.exp's PyUFuncObject does not have the expected layout"
    if not 0 < head.ntypes < 64 or not head.functions or not head.data or not head.types:
        return "np.exp's PyUFuncObject does not have the expected layout"
    codes = ctypes.string_at(head.types, head.ntypes * head.nargs)
    functions = (ctypes.c_void_p * head.ntypes).from_address(head.functions)
    data = (ctypes.c_void_p * head.ntypes).from_address(head.data)
    found = {}
    for dtype in SYMBOLS:
        matches = [i for i in range(head.ntypes) if codes[2 * i] == codes[2 * i + 1] == dtype.num]
        if not matches or not functions[matches[0]]:
            return f"np.exp has no {dtype} -> {dtype} loop"
        found[dtype] = matches[0]  # NumPy, too, uses the first loop that matches exactly
    for dtype, index in found.items():
        llvm.add_symbol(SYMBOLS[dtype], functions[index])
        LOOP_DATA[dtype] = data[index] or 0
    return ""


UNAVAILABLE_REASON = _register()


def available() -> bool:
    """True when numba code may call NumPy's ``exp`` loops directly."""
    return not UNAVAILABLE_REASON
