"""Step 0: one batch, every quantity of both sides side by side.

Tolerances (relative error ``max|a - b| / max|b|``, see :mod:`compare.metrics`):

* float64: ``1e-10``. Both sides compute the same formulas; they differ only in the order of
  floating-point sums (XLA's dot and reductions vs BLAS and NumPy/numba), so the errors are a few
  hundred ulps (2.2e-16 each) at most; ``1e-10`` leaves a wide margin and still catches any
  mistake in a formula, which would show at 1e-3 or worse.
* float32: ``1e-4``. Same reasoning with float32's ulp (1.2e-7); batch norm's backward subtracts
  nearly equal terms (``N*dout - sum(dout) - xhat*sum(dout*xhat)``), which amplifies rounding
  by up to a few hundred, so 1e-4 is the honest bound for float32 on this network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from compare.metrics import max_abs_err, max_rel_err

TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


@dataclass
class Row:
    quantity: str
    max_abs_err: float
    max_rel_err: float
    tol: float
    ok: bool
    max_abs: float  # the size of the reference values, to read the errors against

    def to_json(self) -> dict:
        return asdict(self)


def _row(quantity, jax_value, numpy_value, tol) -> Row:
    rel = max_rel_err(numpy_value, jax_value)
    return Row(
        quantity=quantity,
        max_abs_err=max_abs_err(numpy_value, jax_value),
        max_rel_err=rel,
        tol=tol,
        ok=bool(rel <= tol),
        max_abs=float(np.max(np.abs(np.asarray(jax_value, np.float64)))),
    )


def step0_rows(jax_side, numpy_side, params, state, images, labels) -> list[Row]:
    """Compare logits, loss, every gradient and the new running statistics on one batch."""
    tol = TOLERANCE[np.dtype(params[0]["weight"].dtype)]
    rows = [
        _row(
            "logits (train mode)",
            jax_side.train_logits(params, state, images),
            numpy_side.train_logits(params, state, images),
            tol,
        ),
        _row(
            "logits (eval mode)",
            jax_side.predict_logits(params, state, images),
            numpy_side.predict_logits(params, state, images),
            tol,
        ),
    ]
    jax_loss, jax_grads, jax_state = jax_side.loss_and_grads(params, state, images, labels)
    np_loss, np_grads, np_state = numpy_side.loss_and_grads(params, state, images, labels)
    rows.append(_row("loss", jax_loss, np_loss, tol))
    for i, (jax_layer, np_layer) in enumerate(zip(jax_grads, np_grads)):
        for key in jax_layer:
            rows.append(_row(f"grad layer {i} {key}", jax_layer[key], np_layer[key], tol))
    for i, (jax_layer, np_layer) in enumerate(zip(jax_state, np_state)):
        for key in ("mean", "var"):
            rows.append(_row(f"running {key} {i}{jax_side.state_note}", jax_layer[key], np_layer[key], tol))
    return rows
