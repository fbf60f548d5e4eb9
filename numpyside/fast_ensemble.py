"""``numpyside.fast_ensemble``, kept for its callers: the fast ensemble trainer is :mod:`numpyside.ensemble.fast`."""

from numpyside.ensemble.fast import FastEnsembleTrainer

__all__ = ["FastEnsembleTrainer"]
