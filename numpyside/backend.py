"""The NumPy side's choice of kernels for the elementwise and reduction work (the products are BLAS either way).

``backend="numpy"`` runs the plain NumPy lines of :mod:`numpyside.layers`; ``backend="numba"`` their
compiled kernels (:mod:`numpyside.kernels`), which agree with them to a stated tolerance.
"""

from __future__ import annotations

from compare.contract import InputError

BACKENDS = ("numpy", "numba")
#: The trainers' and the comparison's kernels: compiled.
DEFAULT_BACKEND = "numba"
#: The default of :mod:`numpyside.layers` and :mod:`numpyside.model`: plain NumPy, for reading and
#: stepping through in a debugger (the lines ``docs/batchnorm_backward.md`` derives);
#: ``backend="numba"`` is one argument away.
DEFAULT_LAYER_BACKEND = "numpy"


def check_backend(backend: str) -> None:
    """The NumPy side's kernel choice: one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
