r"""A matrix product in numba, register tiles in cache blocks, for the network's small products.

:func:`nn`, :func:`tn` and :func:`nt` compute ``x @ w``, ``x.T @ d`` and ``d @ w.T`` (the forward
product, the weight gradient and the input gradient of a layer) into the columns ``lo <= j < hi``
of a preallocated output, :func:`nn_rows` and :func:`tn_rows` into the rows ``lo <= i < hi``, so
that threads can take a part each. Every element is ONE chain of
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
choice is measured in ``docs/performance.md``). The sum over ``k`` runs in blocks (:data:`KC_ROWS`
and :data:`KC_STRIDED` of ``k``, :data:`MC` rows) sized for the caches, and each block's tile
resumes the chains where the previous block stored them: the blocks change the memory traffic, not
the bits. The columns left over are one tile whose last vector is masked to them, the rows left
over are done one at a time. The tiles are compiled once per dtype into one C function
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
#: Blocks of ``k`` and of rows: ``KC`` rows of a panel of ``op(B)`` stay in the L1 cache while the
#: ``MC`` rows of ``op(A)``'s block (from L2) pass by them. Where ``op(A)``'s columns are strided
#: (``x.T``: each ``k`` a new cache line) its block shares L1 with them, and ``k`` is cut finer.
KC_ROWS, KC_STRIDED, MC = 128, 64, 8 * MR


def _lanes(dtype) -> int:
    return VECTOR_BYTES // (dtype.bitwidth // 8)


@intrinsic(prefer_literal=True)
def tile(typingctx, real, k, a, a_off, a_rs, a_ks, b, b_off, b_ks, c, c_off, c_rs, fresh, width, mr, nv, masked):
    """``C[r, j] = C0[r, j] + sum_k A[r, k] B[k, j]`` for ``r < mr`` and the ``j`` of ``nv`` vectors
    of ``W = VECTOR_BYTES / itemsize`` lanes, the last one cut to its first ``width`` lanes if
    ``masked`` (masked loads and stores: nothing past them is touched), as fma chains in ``k``
    order that start from ``C0 = 0`` if ``fresh`` else from ``C``'s values: so a sum split into
    consecutive blocks of ``k`` is the same chain as the whole.

    ``a``, ``b``, ``c`` are addresses of arrays of ``real``'s type (its value is not used): element
    ``(r, k)`` of ``A`` is ``a[a_off + r a_rs + k a_ks]``, element ``(k, j)`` of ``B`` is ``b[b_off + k
    b_ks + j]``, element ``(r, j)`` of ``C`` is ``c[c_off + r c_rs + j]``. ``mr``, ``nv``,
    ``masked`` are compile-time constants."""
    if not all(isinstance(t, types.IntegerLiteral) for t in (mr, nv, masked)):
        return None
    rows, vectors, is_masked = mr.literal_value, nv.literal_value, bool(masked.literal_value)
    signature = types.void(real, k, a, a_off, a_rs, a_ks, b, b_off, b_ks, c, c_off, c_rs, fresh, width, mr, nv, masked)
    dtype = real

    def codegen(context, builder, sig, args):
        k_count, a_arr, a_off, a_rs, a_ks, b_arr, b_off, b_ks, c_arr, c_off, c_rs, fresh, width = args[1:14]
        real = context.get_value_type(dtype)
        lanes = _lanes(dtype)
        vec = ir.VectorType(real, lanes)
        suffix = f"v{lanes}f{dtype.bitwidth}"  # LLVM's name for the vector type in an intrinsic's name
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.{suffix}"
        )
        i32, i64 = ir.IntType(32), ir.IntType(64)
        align = dtype.bitwidth // 8
        a_ptr = builder.gep(builder.inttoptr(a_arr, real.as_pointer()), [a_off])
        b_ptr = builder.gep(builder.inttoptr(b_arr, real.as_pointer()), [b_off])
        c_ptr = builder.gep(builder.inttoptr(c_arr, real.as_pointer()), [c_off])
        zero = ir.Constant(vec, [ir.Constant(real, 0.0)] * lanes)
        splat_mask = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)

        def splat(value, vector_type):
            one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), splat_mask)

        if is_masked:  # lane l of the last vector is used if l < width
            mask_type = ir.VectorType(ir.IntType(1), lanes)
            lane = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
            mask = builder.icmp_unsigned("<", lane, splat(width, ir.VectorType(i64, lanes)))
            pointer = vec.as_pointer()
            masked_load = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(vec, [pointer, i32, mask_type, vec]),
                f"llvm.masked.load.{suffix}.p0",
            )
            masked_store = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [vec, pointer, i32, mask_type]),
                f"llvm.masked.store.{suffix}.p0",
            )

        def load(address, v):
            if is_masked and v == vectors - 1:
                return builder.call(masked_load, [address, ir.Constant(i32, align), mask, zero])
            return builder.load(address, align=align)

        def store(value, address, v):
            if is_masked and v == vectors - 1:
                builder.call(masked_store, [value, address, ir.Constant(i32, align), mask])
            else:
                builder.store(value, address, align=align)

        def c_vector(r, v):
            row = builder.gep(c_ptr, [builder.mul(ir.Constant(i64, r), c_rs)])
            return builder.bitcast(builder.gep(row, [ir.Constant(i64, v * lanes)]), vec.as_pointer())

        before = builder.basic_block
        resume = builder.append_basic_block("tile.resume")
        start = builder.append_basic_block("tile.start")
        builder.cbranch(builder.icmp_signed("!=", fresh, ir.Constant(fresh.type, 0)), start, resume)
        builder.position_at_end(resume)
        loaded = [[load(c_vector(r, v), v) for v in range(vectors)] for r in range(rows)]
        builder.branch(start)
        builder.position_at_end(start)
        init = []
        for r in range(rows):
            init.append([builder.phi(vec) for _ in range(vectors)])
            for v, phi in enumerate(init[-1]):
                phi.add_incoming(zero, before)
                phi.add_incoming(loaded[r][v], resume)
        entry = builder.basic_block
        loop = builder.append_basic_block("tile.loop")
        done = builder.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_signed(">", k_count, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        kk = builder.phi(i64)
        kk.add_incoming(ir.Constant(i64, 0), entry)
        acc = [[builder.phi(vec) for _ in range(vectors)] for _ in range(rows)]
        for r in range(rows):
            for v in range(vectors):
                acc[r][v].add_incoming(init[r][v], entry)
        b_row = builder.gep(b_ptr, [builder.mul(kk, b_ks)])
        b_vec = [
            load(builder.bitcast(builder.gep(b_row, [ir.Constant(i64, v * lanes)]), vec.as_pointer()), v)
            for v in range(vectors)
        ]
        a_col = builder.gep(a_ptr, [builder.mul(kk, a_ks)])
        new = []
        for r in range(rows):
            scalar = builder.load(builder.gep(a_col, [builder.mul(ir.Constant(i64, r), a_rs)]))
            broadcast = splat(scalar, vec)
            new.append([builder.call(fma, [broadcast, b_vec[v], acc[r][v]]) for v in range(vectors)])
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
                phi.add_incoming(init[r][v], entry)
                phi.add_incoming(new[r][v], body_end)
        for r in range(rows):
            for v in range(vectors):
                store(results[r][v], c_vector(r, v), v)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def lanes_of(typingctx, real):
    """``W``, the lanes of one vector of ``real``'s type (a compile-time constant)."""
    count = _lanes(real)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, count)

    return types.intp(real), codegen


@numba.njit(inline="always")
def _panel(real, k, a, a_off, a_rs, a_ks, b, b_off, b_ks, c, c_off, c_rs, fresh, m, width, nv, masked):
    """``m`` rows of one column panel: tiles of ``MR`` rows, then single rows."""
    r = 0
    while r < m:
        a_r, c_r = a_off + r * a_rs, c_off + r * c_rs
        if r + MR <= m:
            tile(real, k, a, a_r, a_rs, a_ks, b, b_off, b_ks, c, c_r, c_rs, fresh, width, MR, nv, masked)
            r += MR
        else:
            tile(real, k, a, a_r, a_rs, a_ks, b, b_off, b_ks, c, c_r, c_rs, fresh, width, 1, nv, masked)
            r += 1


def _columns_of(dtype: np.dtype):
    """The body of :func:`columns` for ``dtype``, to be compiled as a C function."""
    real = dtype.type(0)

    def columns(a, a_rs, a_ks, b, b_ks, c, c_rs, m, k, lo, hi):
        w = lanes_of(real)
        block = KC_ROWS if a_ks == 1 else KC_STRIDED
        kb = 0
        while True:  # blocks of k in order, each chain resumed where the last block left it
            kc = min(block, k - kb)
            fresh = kb == 0
            for ib in range(0, m, MC):
                mc = min(MC, m - ib)
                a_off, b_off, c_off = ib * a_rs + kb * a_ks, kb * b_ks, ib * c_rs
                for j in range(lo, hi, NV * w):  # panels of NV vectors, the last one cut to the columns left
                    left, bj, cj = hi - j, b_off + j, c_off + j
                    if left >= NV * w:
                        _panel(real, kc, a, a_off, a_rs, a_ks, b, bj, b_ks, c, cj, c_rs, fresh, mc, w, NV, 0)
                    elif left > w:
                        _panel(real, kc, a, a_off, a_rs, a_ks, b, bj, b_ks, c, cj, c_rs, fresh, mc, left - w, NV, 1)
                    elif left == w:
                        _panel(real, kc, a, a_off, a_rs, a_ks, b, bj, b_ks, c, cj, c_rs, fresh, mc, w, 1, 0)
                    else:
                        _panel(real, kc, a, a_off, a_rs, a_ks, b, bj, b_ks, c, cj, c_rs, fresh, mc, left, 1, 1)
            kb += block
            if kb >= k:
                break

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
def nn_rows(x, w, out, lo, hi):
    """``out[lo:hi] = x[lo:hi] @ w``: the rows of :func:`nn`'s product, each the same chain."""
    nn(x[lo:hi], w, out[lo:hi], 0, w.shape[1])


@_jit
def tn_rows(x, d, out, lo, hi):
    """``out[lo:hi] = x[:, lo:hi].T @ d``; ``x`` (k, m), ``d`` (k, n), ``out`` (m, n): the rows of
    :func:`tn`'s product, each the same chain."""
    columns(x.reshape(-1)[lo:], 1, x.shape[1], d, d.shape[1], out[lo:hi], hi - lo, x.shape[0], 0, d.shape[1])


@_jit
def nt(d, w, packed, out, lo, hi):
    """``out[:, lo:hi] = d @ w.T[:, lo:hi]``; ``d`` (m, k), ``w`` (n, k), ``out`` (m, n). Rows
    ``lo:hi`` of ``w`` are first copied, transposed, into ``packed[lo k : hi k]`` as a ``(k, hi -
    lo)`` block (``packed``: a flat buffer of at least ``n k`` elements), so that the tile reads
    rows of ``w.T`` and parts on other threads write other memory than this one's."""
    k, width = w.shape[1], hi - lo
    block = packed[lo * k : hi * k].reshape((k, width))
    for j in range(width):
        for kk in range(k):
            block[kk, j] = w[lo + j, kk]
    # column j of the product is column j - lo of the block: B's origin lo elements before it
    columns(d, d.shape[1], 1, packed[max(lo * k - lo, 0) :], width, out, d.shape[0], k, lo, hi)
