"""Studies: each shows one thing about batch norm under ``vmap``, with a command of its own.

* :mod:`~compare.studies.jaxpr`: where batch norm's coupling lives in the gradient JAX derives
  (the collectives in its jaxprs), ``python -m compare.jaxpr``;
* :mod:`~compare.studies.per_example`: per-example gradients under batch norm, both sides, and how
  much of one example leaks into another's gradient, ``python -m compare.per_example``;
* :mod:`~compare.studies.variance`: why the batch variance is summed in two passes, ``python -m compare.variance``;
* :mod:`~compare.studies.sync_counts`: the all-reduces of one synchronised step, counted on both sides;
* :mod:`~compare.studies.bn_paper`: why batch norm at all, the BN paper's MNIST experiment on both sides,
  ``python -m compare.bn_paper``;
* :mod:`~compare.studies.mistakes`: the classic wrong batch-norm backwards, each in place of the
  correct one, and what the comparison shows, ``python -m compare.mistakes``.
"""
