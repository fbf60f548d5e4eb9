"""Step 0: one batch, every quantity of both sides side by side.

Each row's relative error (``max|a - b| / max|b|``, :mod:`compare.metrics`) is held to
:data:`compare.tolerances.STEP0` (float32 1e-4, float64 1e-10; the reasons are there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from compare import tolerances
from compare.metrics import max_abs_err, max_rel_err


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
    tol = tolerances.STEP0[np.dtype(params[0]["weight"].dtype)]
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
