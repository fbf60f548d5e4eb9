"""Where the two sides meet, and the commands that compare them. Start with:

* :mod:`compare.contract`: what both sides agree on (the parameter layout, initialisation, batch
  order, SGD) and the only part of ``compare`` that ``jaxside`` and ``numpyside`` import;
* :mod:`compare.run`: the main command, ``python compare/run.py``: both sides trained side by side,
  step 0 and every epoch compared (in :mod:`~compare.comparison`, with :mod:`~compare.cli`,
  :mod:`~compare.sides`, :mod:`~compare.step0`,
  :mod:`~compare.tables`, :mod:`~compare.report`, :mod:`~compare.plot`; every tolerance in
  :mod:`compare.tolerances`, every distance in :mod:`compare.metrics`);
* the other commands: :mod:`compare.ensemble_run` (``--ensemble M``), :mod:`compare.parallel`
  (devices and processes), :mod:`compare.studies` (jaxprs, per-example gradients, variance,
  all-reduce counts), :mod:`compare.bench` (speed), :mod:`compare.train_jax` (the JAX side alone).

The layering (commands above shared modules above the contract) is checked by ``lint-imports``.
"""
