"""One pool of threads for NumPy's BLAS and the numba kernels: OpenBLAS's parallel jobs run on
numba's threads.

On this 2-core machine a training step alternates BLAS products (two threads) with elementwise
kernels. OpenBLAS keeps its own worker thread spinning between products, so a numba thread of our
own on the second core would fight it for that core (measured: a gather with numba threads took a
training step from 0.4 ms to 8.7 ms), and the kernels ran on one core while the other spun.

OpenBLAS (0.3.27 and later) lets a program replace its thread server:
``openblas_set_threads_callback_function(cb)`` makes every parallel BLAS call hand its jobs to
``cb(sync, dojob, numjobs, jobdata_elsize, jobdata, dojob_data)``, which must run
``dojob(i, jobdata + i * jobdata_elsize, dojob_data)`` for ``i < numjobs`` concurrently and return
when they are done. :func:`_callback` is that function, compiled by numba; it runs the jobs as a
``prange`` on numba's threads. Inside :func:`blas_on_numba_threads`, then, BLAS and the kernels of
:mod:`numpyside.fused` share ONE pool: with the OpenMP threading layer the same two threads take
one job of every product and one part of every kernel, so nothing competes for a core, and a
product's two halves are computed exactly as OpenBLAS's own threads compute them
(same jobs, same kernels: the same bits, ``tests/test_fast.py``).

:func:`available` is False (and :class:`numpyside.fast.FastTrainer` keeps OpenBLAS's own threads
and single-threaded kernels) when NumPy's OpenBLAS is not reachable or too old for the callback,
when OpenBLAS or numba has fewer than 2 threads, or when numba's threading layer is its
``workqueue`` fallback (no OpenMP or TBB runtime): that layer starts each parallel region by
waking threads through the OS, several microseconds, and a step has ~20 regions.
"""

from __future__ import annotations

import contextlib
import ctypes

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from numpyside import blas

_jit_parallel = numba.njit(cache=True, parallel=True, nogil=True)


@intrinsic
def _call_job(typingctx, function, index, job, data):
    """Call the C function ``void dojob(int index, void *job, int data)`` at address ``function``."""
    signature = types.void(types.intp, types.int32, types.intp, types.int32)

    def codegen(context, builder, sig, args):
        void_pointer = ir.IntType(8).as_pointer()
        job_type = ir.FunctionType(ir.VoidType(), [ir.IntType(32), void_pointer, ir.IntType(32)])
        target = builder.inttoptr(args[0], job_type.as_pointer())
        builder.call(target, [args[1], builder.inttoptr(args[2], void_pointer), args[3]])
        return context.get_dummy_value()

    return signature, codegen


@_jit_parallel
def run_jobs(dojob, numjobs, jobdata_elsize, jobdata, dojob_data):
    """``dojob(i, jobdata + i * jobdata_elsize, dojob_data)`` for ``i < numjobs``, one per thread."""
    for i in numba.prange(numjobs):
        _call_job(dojob, np.int32(i), jobdata + i * jobdata_elsize, dojob_data)


def _callback(sync, dojob, numjobs, jobdata_elsize, jobdata, dojob_data):
    """OpenBLAS's thread-server callback: its jobs on numba's threads (synchronous in every case)."""
    run_jobs(dojob, numjobs, np.intp(jobdata_elsize), jobdata, dojob_data)


_callback_cfunc = None


def callback_address() -> int:
    """The address of :func:`_callback` compiled as a C function, for OpenBLAS. Compiled on first
    use, after numba's threads are started (a cached parallel function needs them to load)."""
    global _callback_cfunc
    if _callback_cfunc is None:
        numba.get_num_threads()  # starts the threading layer
        # void cb(int sync, openblas_dojob_callback dojob, int numjobs, size_t jobdata_elsize,
        #         void *jobdata, int dojob_data); pointers as integers of pointer size
        signature = types.void(types.int32, types.intp, types.int32, types.uintp, types.intp, types.int32)
        _callback_cfunc = numba.cfunc(signature, cache=True)(_callback)
    return _callback_cfunc.address


def _openblas_function(name: str, argtypes, restype):
    """NumPy's OpenBLAS's ``name`` (ILP64 symbol with the ``64_`` suffix, else the plain one), or
    None if the library or the function is not there."""
    if blas.LIBRARY is None:
        return None
    for symbol in (f"{blas.PREFIX}{name}64_", f"{blas.PREFIX}{name}"):
        function = getattr(blas.LIBRARY, symbol, None)
        if function is not None:
            function.argtypes, function.restype = argtypes, restype
            return function
    return None


def _openblas_threads() -> int:
    getter = _openblas_function("openblas_get_num_threads", [], ctypes.c_int)
    return int(getter()) if getter is not None else 1


_SET_CALLBACK = _openblas_function("openblas_set_threads_callback_function", [ctypes.c_void_p], None)
_reason: str | None = None


def unavailable_reason() -> str:
    """ "" when :func:`blas_on_numba_threads` can be used, else why not (checked once, lazily:
    finding numba's threading layer means starting its threads)."""
    global _reason
    if _reason is None:
        if blas.UNAVAILABLE_REASON:
            _reason = blas.UNAVAILABLE_REASON
        elif _SET_CALLBACK is None:
            _reason = "NumPy's OpenBLAS has no openblas_set_threads_callback_function (needs 0.3.27+)"
        elif _openblas_threads() < 2 or numba.get_num_threads() < 2:
            _reason = "fewer than 2 BLAS or numba threads"
        else:
            callback_address()  # starts numba's threads and compiles the callback
            run_jobs(0, 0, 0, 0, 0)  # no jobs: fixes the threading layer
            layer = numba.threading_layer()
            _reason = "" if layer in ("omp", "tbb") else f"numba's threading layer is {layer!r}, not omp or tbb"
    return _reason


def available() -> bool:
    return not unavailable_reason()


def parts() -> int:
    """Into how many parts the kernels split their work: one per numba thread."""
    return numba.get_num_threads()


@contextlib.contextmanager
def blas_on_numba_threads():
    """Inside: NumPy's OpenBLAS runs its parallel jobs on numba's threads (:func:`_callback`).
    On exit OpenBLAS's own thread server is back."""
    if not available():
        raise RuntimeError(f"numpyside.threads is not available: {unavailable_reason()}")
    _SET_CALLBACK(callback_address())
    try:
        yield
    finally:
        _SET_CALLBACK(None)
