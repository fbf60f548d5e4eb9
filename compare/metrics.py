"""How two arrays are compared everywhere in the project (tables, tests, reports).

* absolute error:  ``max_i |a_i - b_i|``
* relative error:  ``max_i |a_i - b_i| / max_i |b_i|``  (normwise: the largest deviation measured
  against the largest reference entry, so that entries that happen to be near zero, such as a
  gradient that almost cancels, do not blow the figure up; ``b`` is the reference side).
  When ``b`` is all zeros the relative error is the absolute error.
"""

from __future__ import annotations

import numpy as np


def max_abs_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def max_rel_err(a, b) -> float:
    """``max|a - b| / max|b|`` (see the module docstring)."""
    scale = float(np.max(np.abs(np.asarray(b, np.float64)))) if np.size(b) else 0.0
    err = max_abs_err(a, b)
    return err / scale if scale > 0 else err


RELATIVE_ERROR_FORMULA = "max|a - b| / max|b|"
