"""How many cores the NumPy side uses, and one pool of threads for NumPy's BLAS and the numba kernels.

:func:`limited` holds NumPy's OpenBLAS to ``count`` threads for a block (``openblas_set_num_threads``).
With ``count = 1`` nothing else starts: no numba threads, no BLAS jobs for OpenBLAS's workers, so
no thread of ours waits for another one on a machine that other processes share. That is the
default (:data:`DEFAULT_THREADS`, or ``VMAP_BN_THREADS`` in the environment).

With ``count >= 2`` and ``shared_pool``, OpenBLAS's parallel jobs run on numba's threads: OpenBLAS
(0.3.27+) calls ``cb(sync, dojob, numjobs, jobdata_elsize, jobdata, dojob_data)`` set by
``openblas_set_threads_callback_function`` instead of its own thread server; :func:`_callback`
runs ``dojob(i, jobdata + i * jobdata_elsize, dojob_data)`` for ``i < numjobs`` as a ``prange``.
BLAS and the kernels of :mod:`numpyside.kernels.fused` then share one pool, and each product's jobs are
OpenBLAS's own jobs (the same bits, ``tests/test_fast.py``). :func:`available` says whether this
works here.

:func:`numba_parts` holds OpenBLAS to one thread and gives numba's parallel regions ``count``
threads (the fast trainer's mode with the numba GEMM), and :class:`Pacer` decides, chunk of steps
by chunk, whether those parts run on the threads or one after another. Measurements:
``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from numpyside.kernels import blas, jit

#: Threads of the NumPy side's training when nobody asks for more: one core, which the products
#: fill on their own, and nothing that waits for a second core that other processes may hold.
DEFAULT_THREADS = 1
#: The environment variable that overrides :data:`DEFAULT_THREADS`.
THREADS_VARIABLE = "VMAP_BN_THREADS"

_jit_parallel = jit.njit(parallel=True, nogil=True)


def default_count() -> int:
    """:data:`DEFAULT_THREADS`, or the positive integer in ``$VMAP_BN_THREADS``."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return DEFAULT_THREADS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_VARIABLE} must be a positive integer, got {value!r}")
    return int(value)


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
        _callback_cfunc = jit.cfunc(signature)(_callback)
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


_GET_THREADS = _openblas_function("openblas_get_num_threads", [], ctypes.c_int)
_SET_THREADS = _openblas_function("openblas_set_num_threads", [ctypes.c_int], None)
_SET_CALLBACK = _openblas_function("openblas_set_threads_callback_function", [ctypes.c_void_p], None)


def openblas_threads() -> int:
    """How many threads NumPy's OpenBLAS uses now (1 if it cannot be asked)."""
    return int(_GET_THREADS()) if _GET_THREADS is not None else 1


#: OpenBLAS's thread count as the process started (its environment's choice).
OPENBLAS_THREADS_AT_START = openblas_threads()
_reason: str | None = None


def unavailable_reason() -> str:
    """ "" when OpenBLAS's jobs can run on numba's threads, else why not (checked once, lazily:
    finding numba's threading layer means starting its threads)."""
    global _reason
    if _reason is None:
        if blas.UNAVAILABLE_REASON:
            _reason = blas.UNAVAILABLE_REASON
        elif _SET_CALLBACK is None or _SET_THREADS is None:
            _reason = "NumPy's OpenBLAS has no openblas_set_threads_callback_function (needs 0.3.27+)"
        elif OPENBLAS_THREADS_AT_START < 2 or numba.config.NUMBA_NUM_THREADS < 2:
            _reason = "fewer than 2 BLAS or numba threads"
        else:
            callback_address()  # starts numba's threads and compiles the callback
            run_jobs(0, 0, 0, 0, 0)  # no jobs: fixes the threading layer
            layer = numba.threading_layer()
            # workqueue (no OpenMP or TBB runtime) wakes its threads through the OS for each of a
            # step's ~20 parallel regions
            _reason = "" if layer in ("omp", "tbb") else f"numba's threading layer is {layer!r}, not omp or tbb"
    return _reason


def available() -> bool:
    return not unavailable_reason()


@contextlib.contextmanager
def limited(count: int, *, shared_pool: bool = True):
    """Inside: NumPy's OpenBLAS uses at most ``count`` threads. With ``count >= 2``, ``shared_pool``
    and :func:`available`, its jobs run on ``count`` numba threads (:func:`_callback`). Yields the
    number of parts the kernels may split their work into: ``count`` when the pool is shared, else 1.
    On exit OpenBLAS's own thread count and thread server are back."""
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    previous = openblas_threads()
    if _SET_THREADS is not None:
        _SET_THREADS(min(count, max(previous, OPENBLAS_THREADS_AT_START)))
    share = count >= 2 and shared_pool and available()
    numba_threads = numba.get_num_threads() if share else 0
    try:
        if share:
            parts = min(count, numba.config.NUMBA_NUM_THREADS)
            numba.set_num_threads(parts)
            _SET_CALLBACK(callback_address())
            yield parts
        else:
            yield 1
    finally:
        if share:
            _SET_CALLBACK(None)
            numba.set_num_threads(numba_threads)
        if _SET_THREADS is not None:
            _SET_THREADS(previous)


@contextlib.contextmanager
def blas_on_numba_threads():
    """Inside: NumPy's OpenBLAS runs its parallel jobs on all of numba's threads."""
    if not available():
        raise RuntimeError(f"numpyside.kernels.threads is not available: {unavailable_reason()}")
    with limited(numba.config.NUMBA_NUM_THREADS):
        yield


@contextlib.contextmanager
def numba_parts(count: int):
    """Inside: NumPy's OpenBLAS on one thread, numba's parallel regions on ``count`` threads (at
    most ``NUMBA_NUM_THREADS``). Yields that number of parts."""
    with limited(1):
        parts = max(1, min(count, numba.config.NUMBA_NUM_THREADS))
        previous = numba.get_num_threads()  # starts numba's threads
        numba.set_num_threads(parts)
        try:
            yield parts
        finally:
            numba.set_num_threads(previous)


class Pacer:
    """Chooses, chunk of steps by chunk, whether a step's parts run on their threads or one after
    another on the calling thread (the same operations either way, so the same bits).

    On a machine where another process holds a core, every part waits at the end of each region
    for a thread that the scheduler has set aside for a time slice (milliseconds, against a step of
    a fraction of one), and threads lose to one thread several times over. The pacer keeps, per
    mode, an average of the seconds per step it measured, runs the faster mode, and tries the
    other one on a short chunk now and then (its figure replaces the stale one): first after
    :attr:`interval` chunks, then, while it keeps losing, after twice as many (up to
    :attr:`max_interval`), so that a busy machine pays little for the tries and a machine that
    became idle is noticed within about a second.
    """

    def __init__(self, chunk: int = 32, probe: int = 4, interval: int = 4, max_interval: int = 64):
        self.chunk, self.probe, self.base_interval, self.max_interval = chunk, probe, interval, max_interval
        self.interval = interval
        self.seconds_per_step = {True: None, False: None}  # threaded -> running average
        self.since_probe = 0
        self.chunks = {True: 0, False: 0}  # chunks run per mode (what the bench may report)

    def next_chunk(self) -> tuple[bool, int]:
        """``(threaded, steps)`` of the next chunk."""
        pace = self.seconds_per_step
        for mode in (True, False):  # measure each mode once, on a short chunk
            if pace[mode] is None:
                return mode, self.probe
        best = pace[True] <= pace[False]
        if self.since_probe >= self.interval:
            return not best, self.probe
        return best, self.chunk

    def record(self, threaded: bool, steps: int, seconds: float) -> None:
        """A chunk of ``steps`` ran ``threaded`` (or not) in ``seconds``."""
        pace = self.seconds_per_step
        known = pace[True] is not None and pace[False] is not None
        was_best = known and (pace[True] <= pace[False]) == threaded
        per_step = seconds / max(steps, 1)
        fresh = pace[threaded] is None or (known and not was_best)  # a try replaces a stale figure
        pace[threaded] = per_step if fresh else 0.5 * pace[threaded] + 0.5 * per_step
        self.chunks[threaded] += 1
        if known and not was_best:  # a try of the other mode
            self.since_probe = 0
            still_losing = (pace[True] <= pace[False]) != threaded
            self.interval = min(2 * self.interval, self.max_interval) if still_losing else self.base_interval
        else:
            self.since_probe += 1
