"""How two arrays are compared everywhere in the project (tables, tests, reports).

* absolute error:  ``max_i |a_i - b_i|``
* relative error:  ``max_i |a_i - b_i| / max_i |b_i|``  (normwise: the largest deviation measured
  against the largest reference entry, so that entries that happen to be near zero, such as a
  gradient that almost cancels, do not blow the figure up; ``b`` is the reference side).
  When ``b`` is all zeros the relative error is the absolute error.
* between two trees (lists, tuples and dicts of arrays in the same layout: parameters, states, a
  step's ``(loss, grads, state)``): the largest absolute error over their leaves, :func:`max_tree_err`.
"""

from __future__ import annotations

import numpy as np


def max_abs_err(a, b) -> float:
    """``max|a - b|`` in float64 (0 for empty arrays)."""
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


def leaves(tree) -> list:
    """The arrays of a tree of lists, tuples and dicts, in order; a dict's by sorted key (as JAX flattens
    it), so that two sides' dicts match whatever order their keys were inserted in."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in leaves(item)]
    return [tree]


def max_tree_err(tree_a, tree_b) -> float:
    """The largest :func:`max_abs_err` over the matching leaves of two trees of the same layout."""
    pairs = list(zip(leaves(tree_a), leaves(tree_b), strict=True))
    return max((max_abs_err(a, b) for a, b in pairs), default=0.0)


def member(tree, m: int):
    """Member ``m`` of a tree stacked on a leading member axis (an ensemble's parameters or state)."""
    if isinstance(tree, dict):
        return {key: member(value, m) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(member(item, m) for item in tree)
    return tree[m]
