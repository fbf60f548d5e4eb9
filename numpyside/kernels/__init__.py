"""The NumPy side's fast paths: compiled kernels that compute what :mod:`numpyside.layers` writes out in NumPy.

Nothing here is needed to follow the math; each module says which readable function it speeds up.

* :mod:`~numpyside.kernels.numba_layers`: the ``backend="numba"`` path of :mod:`numpyside.layers`;
* :mod:`~numpyside.kernels.numba_ensemble_layers`: the same for the stacked layers of :mod:`numpyside.ensemble`;
* :mod:`~numpyside.kernels.fused`, :mod:`~numpyside.kernels.fused_ensemble`: a whole training epoch in one
  numba call, for :class:`numpyside.fast.FastTrainer` and :class:`numpyside.ensemble.FastEnsembleTrainer`;
* :mod:`~numpyside.kernels.blas`: NumPy's own OpenBLAS ``gemm``, callable from numba;
* :mod:`~numpyside.kernels.gemm`: a register-blocked numba GEMM whose results do not depend on how
  its columns are split between threads; :mod:`~numpyside.kernels.products` gives each product of a
  step its engine (BLAS or this GEMM), :mod:`~numpyside.kernels.gemm_choice` measures which is faster;
* :mod:`~numpyside.kernels.fastexp`: an ``exp`` that vectorises inside a numba loop;
* :mod:`~numpyside.kernels.threads`: how many cores the NumPy side uses.
"""
