"""The per-example JAX side: one image in, ``jax.vmap(..., axis_name="batch")`` adds the batch.

64-bit floats are switched on at import so that float64 comparisons with the NumPy side are
possible; float32 inputs still compute in float32 (JAX keeps the inputs' dtype).
"""

import jax

jax.config.update("jax_enable_x64", True)

from jaxside.model import forward_pass, loss_and_grads, predict_logits  # noqa: E402

__all__ = ["forward_pass", "loss_and_grads", "predict_logits"]
