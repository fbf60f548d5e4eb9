"""Every tolerance of the project, once, each with the reason for its value. Keyed by ``np.dtype``.

Errors are measured as :mod:`compare.metrics` defines them: the relative error is normwise,
``max|a - b| / max|b|``; the drift is the absolute ``max|p_a - p_b|`` (parameters are O(1)).
A formula mistake shows at 1e-3 or worse, far above every bound here, which only leave room
for the order of floating-point sums.
"""

from __future__ import annotations

import numpy as np

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

#: Step 0, JAX against NumPy on one batch: logits, loss, every gradient, the new running statistics
#: (relative error). Both sides compute the same formulas and differ only in the order of
#: floating-point sums (XLA's dot and reductions vs BLAS and NumPy/numba): a few hundred ulps
#: (float64 2.2e-16) at most, so 1e-10 leaves a wide margin. In float32 (ulp 1.2e-7) batch norm's
#: backward subtracts nearly equal terms (``N*dout - sum(dout) - xhat*sum(dout*xhat)``), which
#: amplifies rounding by up to a few hundred: 1e-4 is the honest bound for float32 on this network.
STEP0 = {F32: 1e-4, F64: 1e-10}

#: The training trajectory, JAX against NumPy: max parameter drift after the last epoch (absolute).
#: Each step adds rounding differences of a few ulps that SGD carries forward; over the default
#: 4,680 steps they were measured to grow to 7e-15 (float64) and 5e-6 (float32) and to level off as
#: the learning rate decays. The bounds sit ~100x and ~20x above that: room for other machines and
#: BLAS builds.
DRIFT = {F32: 1e-4, F64: 1e-12}

#: Test predictions that may differ between the sides, as a share of the test set: a prediction flips
#: only if an example sits within rounding distance of a decision boundary; in float64 that never
#: happens, in float32 it is allowed for at most 0.1 % of the set.
DISAGREEMENT = {F32: 0.001, F64: 0.0}

#: Member 0 of an ensemble against the single model trained alone (max |p_ens - p_single|): the two
#: programs differ only in how the products and sums are batched, rounding that SGD carries forward
#: like the drift between the sides, hence the same bounds (issue 11 asked for 1e-12 in float64).
IDENTITY = DRIFT

#: Step 0, the sharded JAX side against one device (max absolute difference of loss, gradients and
#: state): the same sums in another order (per-device partial sums, then a sum over devices), a few
#: ulps. Over a run the difference grows like the drift between the sides: :data:`DRIFT` applies.
SHARDED_STEP0 = {F32: 1e-5, F64: 1e-12}

#: Per-example gradients, ``sum_b g_b`` against ``B`` times the batch gradient (relative error): the
#: same side, the same products, only the order of one more sum differs; float64 reaches ~1e-15
#: (1e-12 is the bound asked for), float32 ~1e-6 (bounded as :data:`STEP0`). The two sides'
#: per-example gradients against each other are bounded by :data:`STEP0`.
PER_EXAMPLE_SUM = {F32: 1e-4, F64: 1e-12}

#: The NumPy side's numba kernels against its NumPy lines, ``max|numba - numpy| / max|numpy|``:
#: float32 1e-5 (84 ulp), float64 2e-14 (90 ulp), at least 3x above every measured case for B up to
#: 4096 and C up to 1000, 20x above the training shape (B = 128, C = 10); held for the bit-identical
#: kernels too, since NumPy's reduction order and SIMD code path may differ on another machine
#: (measurements: docs/performance.md). Only the sigmoid's ``exp`` and the cross-entropy's
#: ``exp``/``log`` and sums differ; batch norm agrees bit for bit here.
NUMBA_VS_NUMPY = {F32: 1e-5, F64: 2e-14}

#: ``numpyside.kernels.fastexp.exp_nonpositive`` against the correctly rounded ``exp``, in units in
#: the last place. It is IEEE arithmetic only, so its bits are the same on every machine and the bound
#: is an exact check, not a measurement with a margin: over 2.1 million arguments per dtype at most
#: 1 ulp, 91 % exactly rounded (tests/test_fastexp.py).
FASTEXP_MAX_ULP = {F32: 1, F64: 1}

#: One batch-norm layer's backward ``dx``, the NumPy side's against ``jax.vjp`` of the per-example
#: layer under ``vmap``, float64 (``python -m compare.mistakes`` runs it in float64 only; relative
#: error): the same formula, rounded differently only in the order of the batch sums, measured
#: ~1e-16 on MNIST batches of 128. Each classic mistaken backward is off by 1e-6 (eps left out) to
#: O(1), far beyond, so the bound tells the right backward from every wrong one.
BATCHNORM_DX = {F64: 1e-12}

#: The batch-norm paper's experiment (``python -m compare.bn_paper``), JAX against NumPy in lockstep
#: over a whole run of plain SGD (50,000 steps by default). Both sides compute the same formulas and
#: differ only in the order of floating-point sums (XLA vs BLAS/numba), a few ulps per operation,
#: which plain SGD carries along. ``percentiles`` and ``max_param_diff`` are normwise relative errors
#: (over all evaluations / all parameters at the end); ``accuracy`` is the largest difference of the
#: two sides' test accuracies at any evaluation. Measured over 50,000 steps (docs/bn_paper.md):
#: float64 parameters 3.4e-15, percentiles 9.5e-15, accuracy 0; float32 parameters up to 6.8e-6,
#: percentiles up to 8.3e-6, accuracy 0 (lr 0.01 and 0.1). The bounds sit 1e4x (float64) and 100x
#: (float32) above; a test image within rounding distance of a decision boundary may flip in float32
#: (0.2 % of the test set allowed). A wrong formula shows at step 0 already (:data:`STEP0`). Where the
#: training dynamics amplify rounding differences, in float64 too (without batch norm from saturated
#: sigmoids, ``--init-std 5``: tenfold every 40 to 100 steps; at ``--lr 1.0``: some 1e6 to 2e7 over
#: 50,000 steps), the two trajectories part: the command then fails, and
#: ``compare.studies.bn_paper_lockstep.divergence_notes`` says how the difference grew.
BN_PAPER_LOCKSTEP = {
    F32: {"accuracy": 0.002, "percentiles": 1e-3, "max_param_diff": 1e-3},
    F64: {"accuracy": 0.0, "percentiles": 1e-10, "max_param_diff": 1e-10},
}
