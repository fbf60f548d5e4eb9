r"""A register-blocked matrix product in numba, for the network's small products.

:func:`nn`, :func:`tn` and :func:`nt` compute ``x @ w``, ``x.T @ d`` and ``d @ w.T`` (the forward
product, the weight gradient and the input gradient of a layer) into the columns ``lo <= j < hi``
of a preallocated output, so that threads can take a part each. Every element is ONE chain of
fused multiply-adds in ``k`` order,

.. math::  c_{ij} = \mathrm{fma}(a_{i,K-1}, b_{K-1,j}, \dots \mathrm{fma}(a_{i1}, b_{1j},
           \mathrm{fma}(a_{i0}, b_{0j}, 0))\dots),

whatever the tile, the part or the machine: the result does not depend on how the columns are
split between threads, nor on the vector width (``tests/test_gemm.py`` checks the chain exactly).
Its error is that of a sum of ``k`` products, ``|c - ab| <= k eps sum_kk |a_ikk| |b_kkj|`` (the
classical bound ``gamma_k`` with ``u = eps / 2``, rounded up); a BLAS ``gemm`` blocks ``k`` and
sums in another order, so the two differ by rounding, a few ulp of ``sum |a| |b|`` per element.

The work is done by :func:`tile`, an LLVM microkernel written as a numba intrinsic: ``MR`` rows
times ``NV`` vectors of ``W`` lanes of the output stay in registers for the whole sum (``MR x NV``
accumulators), each step loads ``NV`` vectors of a row of ``op(B)`` and broadcasts ``MR`` elements
of a column of ``op(A)``. ``W`` is the target's vector width (:data:`VECTOR_BYTES`: 64 with AVX-512,
else 32); the tile is 2 vectors wide and :data:`MR` rows high: 6 rows with AVX2 (12 accumulators, 2
loaded vectors and a broadcast: 15 of its 16 vector registers), 8 with AVX-512 (19 of its 32; the
choice is measured in ``docs/performance.md``). The columns left over are done by narrower tiles,
the rows left over one at a time. The tiles are compiled once per dtype into one C function
(:func:`register`), which the kernels call by a fixed symbol. Whether this beats NumPy's BLAS on a
given shape is measured (:mod:`numpyside.kernels.gemm_choice`), not assumed.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic, overload

from numpyside.kernels import jit


def _target_features() -> str:
    codegen = cpu_target.target_context.codegen()
    return codegen._tm_features or codegen._get_host_cpu_features()  # what numba compiles for


#: Bytes of one vector register on the machine numba compiles for.
VECTOR_BYTES = 64 if "+avx512f" in _target_features().split(",") else 32
#: The target fuses multiply and add in hardware (else ``llvm.fma`` is a library call: slow, same bits).
HAS_FMA = "+fma" in _target_features().split(",")
#: Rows and vectors of the main tile.
MR, NV = (8 if VECTOR_BYTES == 64 else 6), 2
#: ``divisor`` of :func:`tile` meaning "one lane".
ONE_LANE = 64


def _lanes(dtype, divisor: int) -> int:
    return max(1, VECTOR_BYTES // (dtype.bitwidth // 8) // divisor)


@intrinsic(prefer_literal=True)
def tile(typingctx, real, k, a, a_off, a_rs, a_ks, b, b_off, b_ks, c, c_off, c_rs, mr, nv, divisor):
    """``C[r, v W + l] = sum_k A[r, k] B[k, v W + l]`` for ``r < mr``, ``v < nv``, ``l < W``, with
    ``W = VECTOR_BYTES / itemsize / divisor`` lanes (at least 1), as fma chains in ``k`` order.

    ``a``, ``b``, ``c`` are addresses of arrays of ``real``'s type (its value is not used): element
    ``(r, k)`` of ``A`` is ``a[a_off + r a_rs + k a_ks]``, element ``(k, j)`` of ``B`` is ``b[b_off + k
    b_ks + j]``, element ``(r, j)`` of ``C`` is ``c[c_off + r c_rs + j]``. ``mr``, ``nv``,
    ``divisor`` are compile-time constants."""
    if not all(isinstance(t, types.IntegerLiteral) for t in (mr, nv, divisor)):
        return None
    rows, vectors, divisor_value = mr.literal_value, nv.literal_value, divisor.literal_value
    signature = types.void(real, k, a, a_off, a_rs, a_ks, b, b_off, b_ks, c, c_off, c_rs, mr, nv, divisor)
    dtype = real

    def codegen(context, builder, sig, args):
        k_count, a_arr, a_off, a_rs, a_ks, b_arr, b_off, b_ks, c_arr, c_off, c_rs = args[1:12]
        real = context.get_value_type(dtype)
        lanes = _lanes(dtype, divisor_value)
        vec = ir.VectorType(real, lanes)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{lanes}f{dtype.bitwidth}"
        )
        i64 = ir.IntType(64)
        align = dtype.bitwidth // 8
        a_ptr = builder.gep(builder.inttoptr(a_arr, real.as_pointer()), [a_off])
        b_ptr = builder.gep(builder.inttoptr(b_arr, real.as_pointer()), [b_off])
        c_ptr = builder.gep(builder.inttoptr(c_arr, real.as_pointer()), [c_off])
        zero = ir.Constant(vec, [ir.Constant(real, 0.0)] * lanes)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        entry = builder.basic_block
        loop = builder.append_basic_block("tile.loop")
        done = builder.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_signed(">", k_count, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        kk = builder.phi(i64)
        kk.add_incoming(ir.Constant(i64, 0), entry)
        acc = [[builder.phi(vec) for _ in range(vectors)] for _ in range(rows)]
        for phi in (p for row in acc for p in row):
            phi.add_incoming(zero, entry)
        b_row = builder.gep(b_ptr, [builder.mul(kk, b_ks)])
        b_vec = [
            builder.load(
                builder.bitcast(builder.gep(b_row, [ir.Constant(i64, v * lanes)]), vec.as_pointer()), align=align
            )
            for v in range(vectors)
        ]
        a_col = builder.gep(a_ptr, [builder.mul(kk, a_ks)])
        new = []
        for r in range(rows):
            scalar = builder.load(builder.gep(a_col, [builder.mul(ir.Constant(i64, r), a_rs)]))
            splat = builder.insert_element(ir.Constant(vec, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
            splat = builder.shuffle_vector(splat, ir.Constant(vec, ir.Undefined), splat_mask)
            new.append([builder.call(fma, [splat, b_vec[v], acc[r][v]]) for v in range(vectors)])
        k_next = builder.add(kk, ir.Constant(i64, 1))
        body_end = builder.basic_block
        kk.add_incoming(k_next, body_end)
        for r in range(rows):
            for v in range(vectors):
                acc[r][v].add_incoming(new[r][v], body_end)
        builder.cbranch(builder.icmp_signed("<", k_next, k_count), loop, done)

        builder.position_at_end(done)
        results = []
        for r in range(rows):
            results.append([builder.phi(vec) for _ in range(vectors)])
            for v, phi in enumerate(results[-1]):
                phi.add_incoming(zero, entry)
                phi.add_incoming(new[r][v], body_end)
        for r in range(rows):
            c_row = builder.gep(c_ptr, [builder.mul(ir.Constant(i64, r), c_rs)])
            for v in range(vectors):
                target = builder.bitcast(builder.gep(c_row, [ir.Constant(i64, v * lanes)]), vec.as_pointer())
                builder.store(results[r][v], target, align=align)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def lanes_of(typingctx, real):
    """``W``, the lanes of one vector of ``real``'s type (a compile-time constant)."""
    count = _lanes(real, 1)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, count)

    return types.intp(real), codegen


@numba.njit(inline="always")
def _panel(real, k, a, a_rs, a_ks, b, b_ks, c, c_rs, m, j, nv, divisor):
    """All ``m`` rows of the column panel starting at ``j``: tiles of ``MR`` rows, then single rows."""
    r = 0
    while r + MR <= m:
        tile(real, k, a, r * a_rs, a_rs, a_ks, b, j, b_ks, c, r * c_rs + j, c_rs, MR, nv, divisor)
        r += MR
    while r < m:
        tile(real, k, a, r * a_rs, a_rs, a_ks, b, j, b_ks, c, r * c_rs + j, c_rs, 1, nv, divisor)
        r += 1


def _columns_of(dtype: np.dtype):
    """The body of :func:`columns` for ``dtype``, to be compiled as a C function."""
    real = dtype.type(0)

    def columns(a, a_rs, a_ks, b, b_ks, c, c_rs, m, k, lo, hi):
        w = lanes_of(real)
        j = lo
        while j + NV * w <= hi:
            _panel(real, k, a, a_rs, a_ks, b, b_ks, c, c_rs, m, j, NV, 1)
            j += NV * w
        if j + w <= hi:
            _panel(real, k, a, a_rs, a_ks, b, b_ks, c, c_rs, m, j, 1, 1)
            j += w
        if w >= 2 and j + w // 2 <= hi:
            _panel(real, k, a, a_rs, a_ks, b, b_ks, c, c_rs, m, j, 1, 2)
            j += w // 2
        if w >= 4 and j + w // 4 <= hi:
            _panel(real, k, a, a_rs, a_ks, b, b_ks, c, c_rs, m, j, 1, 4)
            j += w // 4
        while j < hi:
            _panel(real, k, a, a_rs, a_ks, b, b_ks, c, c_rs, m, j, 1, ONE_LANE)
            j += 1

    columns.__qualname__ = columns.__name__ = f"columns_{dtype.name}"
    return columns


#: ``void columns(a, a_rs, a_ks, b, b_ks, c, c_rs, m, k, lo, hi)``: ``c[:m, lo:hi] = op(A) @
#: op(B)[:, lo:hi]`` with ``op(A)[i, kk] = a[i a_rs + kk a_ks]`` (``m x k``), ``op(B)[kk, j] = b[kk
#: b_ks + j]``, ``c[i, j] = c[i c_rs + j]``; addresses and strides as 64-bit integers.
_SIGNATURE = types.void(types.intp, *[types.int64] * 2, types.intp, types.int64, types.intp, *[types.int64] * 5)
_SYMBOLS = {np.dtype(np.float32): "vmapbn_gemm_columns_float32", np.dtype(np.float64): "vmapbn_gemm_columns_float64"}
_EXTERNAL = {dtype: types.ExternalFunction(name, _SIGNATURE) for dtype, name in _SYMBOLS.items()}
_COMPILED: dict[np.dtype, object] = {}


def register(dtype) -> None:
    """Compile (or load from numba's cache) the C function ``columns`` for ``dtype`` and register
    its address under a fixed symbol, which the kernels below call. Call it before their first
    call in ``dtype``. The tiles are compiled once here, not inlined into every caller: a training
    epoch calls the product eleven times per step, and inlining them there multiplied its
    compilation time."""
    dtype = np.dtype(dtype)
    if dtype not in _COMPILED:
        compiled = jit.cfunc(_SIGNATURE, nogil=True)(_columns_of(dtype))
        llvm.add_symbol(_SYMBOLS[dtype], compiled.address)
        _COMPILED[dtype] = compiled


def columns(a, a_rs, a_ks, b, b_ks, c, m, k, lo, hi):
    """``c[:m, lo:hi] = op(A) @ op(B)[:, lo:hi]`` with ``op(A)[i, kk] = a.flat[i a_rs + kk a_ks]``
    (``m x k``) and ``op(B)[kk, j] = b.flat[kk b_ks + j]``; ``c`` C-contiguous. numba code only;
    :func:`register` the dtype first."""
    raise TypeError("gemm.columns is only callable from numba-compiled code")


@overload(columns, jit_options={"nogil": True})
def _columns(a, a_rs, a_ks, b, b_ks, c, m, k, lo, hi):
    external = _EXTERNAL[np.dtype(c.dtype.name)]

    def impl(a, a_rs, a_ks, b, b_ks, c, m, k, lo, hi):
        external(a.ctypes.data, a_rs, a_ks, b.ctypes.data, b_ks, c.ctypes.data, c.shape[1], m, k, lo, hi)

    return impl


_jit = jit.njit(nogil=True, boundscheck=False)


@_jit
def nn(x, w, out, lo, hi):
    """``out[:, lo:hi] = x @ w[:, lo:hi]``; ``x`` (m, k), ``w`` (k, n), ``out`` (m, n), C-contiguous."""
    columns(x, x.shape[1], 1, w, w.shape[1], out, x.shape[0], x.shape[1], lo, hi)


@_jit
def tn(x, d, out, lo, hi):
    """``out[:, lo:hi] = x.T @ d[:, lo:hi]``; ``x`` (k, m), ``d`` (k, n), ``out`` (m, n)."""
    columns(x, 1, x.shape[1], d, d.shape[1], out, x.shape[1], x.shape[0], lo, hi)


@_jit
def nt(d, w, packed, out, lo, hi):
    """``out[:, lo:hi] = d @ w.T[:, lo:hi]``; ``d`` (m, k), ``w`` (n, k), ``out`` (m, n). Rows
    ``lo:hi`` of ``w`` are first copied, transposed, into ``packed`` (a flat buffer of at least
    ``n k`` elements), so that the tile reads rows of ``w.T``."""
    n, k = w.shape
    wt = packed[: k * n].reshape((k, n))
    for j in range(lo, hi):
        for kk in range(k):
            wt[kk, j] = w[j, kk]
    columns(d, d.shape[1], 1, wt, n, out, d.shape[0], k, lo, hi)
