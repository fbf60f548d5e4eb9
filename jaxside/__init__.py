"""The per-example JAX side: one image in, ``jax.vmap(..., axis_name="batch")`` adds the batch.

Importing it changes no JAX setting. Float64 needs JAX's 64-bit mode, which the caller switches on
before computing (``jax.config.update("jax_enable_x64", True)``; the entry points and the tests do);
float64 input without it is refused with an error that says so, instead of silently computed in float32.

:mod:`jaxside.transforms` is the model-agnostic core (a batch, ghost batches, an ensemble, per-example
gradients, data parallelism) for anyone's per-example function; ``model``, ``ensemble`` and ``parallel``
are it applied to our ``forward_pass``.
"""

from jaxside.model import forward_pass, loss_and_grads, predict_logits

__all__ = ["forward_pass", "loss_and_grads", "predict_logits"]
