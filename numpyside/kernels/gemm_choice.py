r"""Which engine does each product of a training step, NumPy's BLAS or :mod:`numpyside.kernels.gemm`: measured.

Neither engine wins everywhere: which one is faster for a given shape depends on the CPU (its
vector width, its cores) and on the BLAS build and kernel. So :func:`engines` times both on each
of a step's 11 products (:data:`numpyside.kernels.products.PRODUCTS`) at the trainer's batch size and
dtype, on one thread, interleaved (BLAS, numba, BLAS, numba, ...), and picks per product the one
with the smaller median. The choice is measured once per machine and kept in a small JSON file
(:func:`cache_path`), under a key that names what it depends on: the CPU numba compiles for, the
GEMM's code, the BLAS kernel, the dtype and the batch size.

A trainer uses it with ``gemm="measured"`` (or ``VMAP_BN_GEMM=measured``). The default, ``auto``,
keeps NumPy's BLAS on one thread (the readable trainer's bits, whichever engine is faster) and
takes the numba GEMM on more (its bits do not depend on the thread count); ``blas`` and ``numba``
put every product on that engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import time
from pathlib import Path

import numba
import numpy as np
from numba.core.registry import cpu_target

from compare.contract import LAYER_SIZES
from numpyside.kernels import gemm, products, threads

#: The environment variable that overrides the measured choice.
VARIABLE = "VMAP_BN_GEMM"
CHOICES = ("auto", "measured", "blas", "numba")
#: Rounds of the interleaved timing, and the work (multiply-adds) of one timed sample.
ROUNDS, SAMPLE_MACS = 7, 10_000_000

_corename = threads._openblas_function("openblas_get_corename", [], ctypes.c_char_p)


def default() -> str:
    """``auto``, or the choice in ``$VMAP_BN_GEMM``."""
    value = os.environ.get(VARIABLE, "").strip() or "auto"
    return check(value, VARIABLE)


def check(value: str, name: str = "gemm") -> str:
    if value not in CHOICES:
        raise ValueError(f"{name} must be one of {CHOICES}, got {value!r}")
    return value


def cache_path() -> Path:
    """``gemm_choice.json`` in ``$NUMBA_CACHE_DIR`` if set, else in ``~/.cache/vmap-batchnorm``
    (``$XDG_CACHE_HOME`` if set)."""
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmap-batchnorm"
    )
    return Path(base) / "gemm_choice.json"


def machine_key(dtype: np.dtype, batch: int) -> str:
    """What the measured choice depends on, as one string."""
    codegen = cpu_target.target_context.codegen()
    blas_kernel = _corename().decode() if _corename is not None else "unknown"
    gemm_code = hashlib.sha256(Path(gemm.__file__).read_bytes()).hexdigest()[:12]  # its tile, blocks, ...
    return (
        f"cpu={codegen._get_host_cpu_name()} vector={gemm.VECTOR_BYTES} gemm={gemm_code} fma={gemm.HAS_FMA} "
        f"blas={blas_kernel} numba={numba.__version__} dtype={np.dtype(dtype).name} batch={batch}"
    )


def _operands(kind: str, layer: int, batch: int, dtype: np.dtype, rng: np.random.Generator):
    """Random operands of product ``(kind, layer)``, laid out as the trainer's, and its output."""
    n_in, n_out = LAYER_SIZES[layer], LAYER_SIZES[layer + 1]
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    w = rng.standard_normal((n_in, n_out)).astype(dtype)
    d = rng.standard_normal((batch, n_out)).astype(dtype)
    if kind == "nn":
        return (x, w), np.empty((batch, n_out), dtype)
    if kind == "tn":
        return (x, d), np.empty((n_in, n_out), dtype)
    return (d, w, np.empty(w.size, dtype)), np.empty((batch, n_in), dtype)


def measure(dtype, batch: int, rounds: int = ROUNDS) -> np.ndarray:
    """Per product, the engine with the smaller median time (one thread, interleaved)."""
    dtype, rng = np.dtype(dtype), np.random.default_rng(0)
    gemm.register(dtype)
    chosen = products.engines_all(products.BLAS)
    with threads.limited(1):
        for j, (kind, layer) in enumerate(products.PRODUCTS):
            operands, out = _operands(kind, layer, batch, dtype, rng)
            function = getattr(products, kind)
            n = out.shape[1]
            reps = max(1, SAMPLE_MACS // (batch * LAYER_SIZES[layer] * LAYER_SIZES[layer + 1]))
            samples = {products.BLAS: [], products.NUMBA_GEMM: []}
            for _ in range(rounds + 1):  # the first round warms up and is dropped
                for engine, times in samples.items():
                    start = time.perf_counter()
                    for _ in range(reps):
                        function(engine, *operands, out, 0, n)
                    times.append(time.perf_counter() - start)
            medians = {engine: np.median(times[1:]) for engine, times in samples.items()}
            if medians[products.NUMBA_GEMM] < medians[products.BLAS]:
                chosen[j] = products.NUMBA_GEMM
    return chosen


def engines(dtype, batch: int) -> np.ndarray:
    """The measured choice for ``dtype`` and ``batch`` on this machine: read from
    :func:`cache_path`, else measured now and written there (if it can be)."""
    key, path = machine_key(dtype, batch), cache_path()
    known = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text())
    if isinstance(known.get(key), list) and len(known[key]) == len(products.PRODUCTS):
        return np.asarray(known[key], np.int64)
    chosen = measure(dtype, batch)
    known[key] = [int(e) for e in chosen]
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known, indent=1, sort_keys=True))
        temporary.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    return chosen
