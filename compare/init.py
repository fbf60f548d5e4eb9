"""``compare.init``, kept for its callers: the initialisation lives in :mod:`compare.contract.init`."""

from compare.contract.init import init_ensemble, init_params, init_state

__all__ = ["init_ensemble", "init_params", "init_state"]
