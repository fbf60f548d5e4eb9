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


def side_values(side, params, state, images, labels) -> dict:
    """One side's step-0 quantities by row name: logits, loss, every gradient, the new running statistics."""
    values = {
        "logits (train mode)": side.train_logits(params, state, images),
        "logits (eval mode)": side.predict_logits(params, state, images),
    }
    loss, grads, new_state = side.loss_and_grads(params, state, images, labels)
    values["loss"] = loss
    for i, layer in enumerate(grads):
        values |= {f"grad layer {i} {key}": layer[key] for key in layer}
    for i, layer in enumerate(new_state):
        values |= {f"running {key} {i}": layer[key] for key in ("mean", "var")}
    return values


def step0_rows(jax_side, numpy_side, params, state, images, labels, *, numpy_ready=None) -> list[Row]:
    """Compare logits, loss, every gradient and the new running statistics on one batch. The JAX
    side runs first; ``numpy_ready()``, if given, is called before the NumPy side (a run waits there
    for its kernels' background compilation, :mod:`numpyside.warmup`)."""
    tol = tolerances.STEP0[np.dtype(params[0]["weight"].dtype)]
    jax_values = side_values(jax_side, params, state, images, labels)
    if numpy_ready is not None:
        numpy_ready()
    numpy_values = side_values(numpy_side, params, state, images, labels)
    return [
        _row(name + (jax_side.state_note if name.startswith("running") else ""), value, numpy_values[name], tol)
        for name, value in jax_values.items()
    ]
