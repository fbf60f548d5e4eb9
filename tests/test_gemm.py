"""``numpyside.kernels.gemm``: each element is one chain of fused multiply-adds in ``k`` order, whatever the
split of the columns or the layout; ``numpyside.kernels.gemm_choice`` measures once and remembers;
``numpyside.kernels.threads.Pacer`` runs the faster mode and keeps trying the other; ``numpyside.warmup``
waits for its background process, or gives up when it ends."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

from numpyside.kernels import gemm, gemm_choice, products, threads

SHAPES = [(1, 1, 1), (7, 3, 37), (13, 17, 70), (128, 100, 10), (6, 0, 5), (33, 100, 100), (70, 300, 37)]


def product(kind, x, w, parts):
    """``x @ w`` through ``kind``'s layout, the columns computed in ``parts`` (lo, hi) calls."""
    m, n = x.shape[0], w.shape[1]
    out = np.full((m, n), np.nan, x.dtype)
    for lo, hi in parts:
        if kind == "nn":
            gemm.nn(x, w, out, lo, hi)
        elif kind == "tn":
            gemm.tn(np.ascontiguousarray(x.T), w, out, lo, hi)
        else:
            gemm.nt(x, np.ascontiguousarray(w.T), np.empty(w.size, x.dtype), out, lo, hi)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_every_split_and_layout_gives_the_same_bits(dtype, m, k, n):
    gemm.register(dtype)
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    x, w = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    whole = product("nn", x, w, [(0, n)])
    assert not np.isnan(whole).any()
    cuts = sorted({0, n, n // 3, n // 2, min(n, 16), min(n, 48)})
    split = list(itertools.pairwise(cuts))
    for kind in ("nn", "tn", "nt"):
        for parts in ([(0, n)], split, split[::-1]):  # reversed: a write past a part shows
            np.testing.assert_array_equal(product(kind, x, w, parts), whole)
    # within the bound of a sum of k products (|error| <= k eps sum |x||w|, with room for rounding)
    exact = x.astype(np.longdouble) @ w.astype(np.longdouble)
    bound = (k + 1) * np.finfo(dtype).eps * (np.abs(x).astype(np.longdouble) @ np.abs(w).astype(np.longdouble))
    assert np.all(np.abs(whole - exact) <= bound)


@pytest.mark.parametrize("m, k, n", [(3, 5, 7), (7, 11, 20), (9, 2 * gemm.KC_ROWS + 5, 3)])
def test_each_element_is_one_fma_chain_in_k_order(m, k, n):
    """float64, against the chain computed exactly: c <- round(x[i, kk] w[kk, j] + c), kk = 0..k-1
    (``Fraction`` is exact; ``float`` of it rounds correctly to float64). The last shape crosses
    blocks of ``k`` (and, through ``tn``, the strided layout's smaller blocks)."""
    gemm.register(np.float64)
    rng = np.random.default_rng(k)
    x, w = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    got = product("nn", x, w, [(0, n)])
    np.testing.assert_array_equal(product("tn", x, w, [(0, n)]), got)
    for i in range(m):
        for j in range(n):
            c = 0.0
            for kk in range(k):
                c = float(Fraction(x[i, kk]) * Fraction(w[kk, j]) + Fraction(c))
            assert got[i, j] == c


def test_the_choice_is_measured_once_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(dtype, batch, rounds=gemm_choice.ROUNDS):
        calls.append((np.dtype(dtype).name, batch))
        return products.engines_all(products.NUMBA_GEMM)

    monkeypatch.setattr(gemm_choice, "measure", fake_measure)
    first = gemm_choice.engines(np.float32, 64)
    second = gemm_choice.engines(np.float32, 64)
    assert calls == [("float32", 64)]
    np.testing.assert_array_equal(first, second)
    stored = json.loads(gemm_choice.cache_path().read_text())
    assert stored == {gemm_choice.machine_key(np.float32, 64): [products.NUMBA_GEMM] * len(products.PRODUCTS)}


def test_measure_returns_an_engine_per_product():
    chosen = gemm_choice.measure(np.float32, 16, rounds=1)
    assert chosen.shape == (len(products.PRODUCTS),)
    assert set(chosen.tolist()) <= {products.BLAS, products.NUMBA_GEMM}


def test_bad_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv(gemm_choice.VARIABLE, "mkl")
    with pytest.raises(ValueError, match=gemm_choice.VARIABLE):
        gemm_choice.default()
    monkeypatch.setenv(gemm_choice.VARIABLE, "numba")
    assert gemm_choice.default() == "numba"


def drive(pacer, seconds_per_step, chunks):
    """Run ``chunks`` chunks with ``seconds_per_step[threaded]``; the modes chosen, in order."""
    modes = []
    for _ in range(chunks):
        threaded, steps = pacer.next_chunk()
        modes.append(threaded)
        pacer.record(threaded, steps, steps * seconds_per_step[threaded])
    return modes


def test_pacer_runs_the_faster_mode_and_backs_off_its_tries():
    pacer = threads.Pacer(interval=4, max_interval=16)
    busy = {True: 10e-3, False: 1e-3}  # threads ten times slower: another process holds a core
    modes = drive(pacer, busy, 200)
    assert modes[:2] == [True, False]  # each mode measured once
    assert modes[2:].count(True) <= 200 // 16 + 4  # tries of the threads, ever rarer
    assert pacer.interval == 16
    idle = {True: 0.6e-3, False: 1e-3}  # the core is free again
    modes = drive(pacer, idle, 40)
    assert modes[-10:].count(True) >= 8  # back on the threads, trying one thread now and then


def test_pacer_stays_threaded_on_an_idle_machine():
    modes = drive(threads.Pacer(interval=4), {True: 0.6e-3, False: 1e-3}, 100)
    assert modes.count(False) <= 100 // 4 + 1  # short tries of one thread only
