"""``numpyside.fastexp.exp_nonpositive`` against NumPy's ``np.exp``, in units in the last place.

The bound is the one the module states (``MAX_ULP``: 2 in float32, 1 in float64), measured here
on normal samples, a uniform sweep down to where exp underflows to 0, tiny arguments and the edge
cases; an ulp is counted as the distance between the two results' bit patterns (both are >= 0,
so their integer views are ordered like the values).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from numpyside.fastexp import MAX_ULP, exp_nonpositive


@numba.njit(fastmath=False, error_model="numpy")
def _apply(x):
    out = np.empty_like(x)
    for k in range(x.size):
        out[k] = exp_nonpositive(x[k])
    return out


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    as_int = np.int32 if a.dtype == np.float32 else np.int64
    return np.abs(a.view(as_int).astype(np.int64) - b.view(as_int).astype(np.int64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_within_the_stated_ulp_of_numpys_exp(dtype):
    rng = np.random.default_rng(0)
    lowest = {np.float32: -110.0, np.float64: -760.0}[dtype]
    x = np.concatenate(
        [
            -np.abs(rng.standard_normal(100_000) * 3),  # the sigmoid's range
            rng.uniform(lowest, 0, 100_000),  # down through the subnormal results to 0
            -np.abs(rng.standard_normal(10_000) * 1e-6),  # tiny |x|
        ]
    ).astype(dtype)
    with np.errstate(all="ignore"):
        expected = np.exp(x)
    distance = ulp_distance(_apply(x), expected)
    assert distance.max() <= MAX_ULP[np.dtype(dtype)], f"worst case x = {x[np.argmax(distance)]!r}"
    assert np.mean(distance == 0) > 0.5  # mostly the same bits: a sign that nothing is off by a factor


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
