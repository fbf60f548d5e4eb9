r"""``exp(x)`` for ``x <= 0`` as plain arithmetic, so that numba vectorises it inside a kernel's loop.

numba's ``np.exp`` on a scalar is a C-library call per element, which stops a loop from
vectorising; :func:`exp_nonpositive` uses only ``+ - *``, a comparison and a reinterpretation of
integer bits as a float, so the sigmoid fuses into the loop that produces its input
(:mod:`numpyside.kernels.fused`). The method is the classic argument reduction (Cody & Waite; Muller,
*Elementary Functions*):

    x = n ln 2 + r,   n = round(x / ln 2),   |r| <= ln(2) / 2,   exp(x) = 2**n * exp(r)

with ``exp(r)`` a Taylor polynomial (details at :func:`_exp_nonpositive`). It is IEEE arithmetic
only (no FMA, no library call), so it gives the same bits on every machine: at most 1 ulp
(``compare.tolerances.FASTEXP_MAX_ULP``) from the correctly rounded ``exp`` (``tests/test_fastexp.py``;
measurements in ``docs/performance.md``). Only ``x <= 0`` is supported: the callers pass ``-|x|``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 (float64) whose bit pattern is the int32 (int64) ``bits``."""
    if bits == types.int32:
        signature, target = types.float32(types.int32), ir.FloatType()
    elif bits == types.int64:
        signature, target = types.float64(types.int64), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], target)

    return signature, codegen


def exp_nonpositive(x):
    """``exp(x)`` for a float32 or float64 scalar ``x <= 0``, in numba code (see the module
    docstring for the method and its accuracy). Only callable from numba-compiled functions."""
    raise TypeError("exp_nonpositive is only callable from numba-compiled code")


def _constants(float_type, int_type, degree, mantissa_bits, exponent_bias, lowest, ln2_hi, ln2_lo):
    f = float_type
    return dict(
        lowest=f(lowest),
        inv_ln2=f(1 / math.log(2)),
        ln2_hi=f(ln2_hi),
        ln2_lo=f(ln2_lo),
        round_magic=f(1.5 * 2.0 ** (mantissa_bits - 1)),
        coefficients=tuple(f(1 / math.factorial(k)) for k in range(degree, 1, -1)),  # 1/d!, ..., 1/2!
        one=f(1),
        int_type=int_type,
        bias=int_type(exponent_bias),
        shift=int_type(mantissa_bits - 1),
    )


_FLOAT32 = _constants(
    np.float32,
    np.int32,
    degree=7,
    mantissa_bits=24,
    exponent_bias=127,
    lowest=-104.0,
    ln2_hi=0.693359375,
    ln2_lo=-2.12194440e-4,
)
_FLOAT64 = _constants(
    np.float64,
    np.int64,
    degree=13,
    mantissa_bits=53,
    exponent_bias=1023,
    lowest=-746.0,
    ln2_hi=6.93147180369123816490e-01,
    ln2_lo=1.90821492927058770002e-10,
)


@overload(exp_nonpositive, jit_options={"fastmath": False, "error_model": "numpy"})
def _exp_nonpositive(x):
    r"""The numba implementation of :func:`exp_nonpositive`, per dtype.

    * ``n`` is rounded to nearest by adding and subtracting ``1.5 * 2**(p-1)`` (p = 24 or 53 bits).
    * ``r = (x - n * LN2_HI) - n * LN2_LO``: ``LN2_HI`` holds the leading bits of ln 2 only (9 bits
      in float32, 32 in float64), so ``n * LN2_HI`` and the subtraction are exact, and ``LN2_LO``
      carries the rest of ln 2.
    * ``exp(r) = 1 + r + r**2 (1/2! + r/3! + ... + r**(d-2)/d!)``, degree ``d`` 7 in float32 and
      13 in float64: the first omitted term, ``(ln(2)/2)**(d+1) / (d+1)!``, is 5e-9 and 4e-18,
      below half an ulp of the result (6e-8 and 1.1e-16). Evaluated as ``1 + (r + r*r*q)`` with
      ``q`` by Horner, which keeps the rounding of the small terms away from the leading 1.
    * ``2**n`` is built from its bits (exponent field ``n + bias``), applied as two factors
      ``2**(n//2) * 2**(n - n//2)``: both are normal numbers, the first product is exact, and the
      second rounds once, into the subnormal range where the result lies there.
    * ``x`` is clamped from below where ``exp(x)`` rounds to 0 (-104 in float32, -746 in float64),
      so that ``-inf`` gives 0; NaN gives NaN; ``x = 0`` gives exactly 1.
    """
    if x == types.float32:
        k = _FLOAT32
    elif x == types.float64:
        k = _FLOAT64
    else:
        return None
    lowest, inv_ln2, ln2_hi, ln2_lo, magic = k["lowest"], k["inv_ln2"], k["ln2_hi"], k["ln2_lo"], k["round_magic"]
    coefficients, one, as_int, bias, shift = k["coefficients"], k["one"], k["int_type"], k["bias"], k["shift"]
    degree_terms = len(coefficients)

    def impl(x):
        xc = x if x > lowest else lowest  # also maps NaN to `lowest`: restored at the end
        n = (xc * inv_ln2 + magic) - magic  # round to nearest
        r = (xc - n * ln2_hi) - n * ln2_lo
        q = coefficients[0]
        for i in range(1, degree_terms):
            q = q * r + coefficients[i]
        p = one + (r + (r * r) * q)
        half = as_int(n) >> 1
        rest = as_int(n) - half
        y = p * _float_from_bits(as_int((half + bias) << shift)) * _float_from_bits(as_int((rest + bias) << shift))
        return y if x == x else x

    return impl
