"""The handwritten, batched NumPy side: every forward has its backward right below it; no autodiff.

Start with the readable core, in this order (each mirrors the file of the same name in ``jaxside``):

* :mod:`numpyside.layers`: the layers, ``*_forward`` returning ``(out, cache)`` and ``*_backward``
  under it, batch norm's backward derived in ``docs/batchnorm_backward.md``;
* :mod:`numpyside.model`: the MLP, ``loss_and_grads`` / ``predict_logits`` / ``per_example_grads``;
* :mod:`numpyside.train`: SGD with momentum, one epoch per call.

Then the variants: :mod:`numpyside.per_example` (per-example gradients by hand), :mod:`numpyside.parallel`
(batch norm synchronised over shards), :mod:`numpyside.ensemble` (a second batch axis: members).
The speed lives apart: :mod:`numpyside.fast` (the same numbers, preallocated, one numba call per
epoch) and :mod:`numpyside.kernels` (numba, BLAS, a GEMM of its own, threads); :mod:`numpyside.backend`
picks the kernels, and :mod:`numpyside.warmup` compiles them in a second process on a cold cache.
"""
