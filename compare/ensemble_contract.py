"""``compare.ensemble_contract``, kept for its callers: the ensemble layout is :mod:`compare.contract.ensemble`."""

from compare.contract.ensemble import (
    EnsembleInputs,
    TrainingSetup,
    check_bn_momentum,
    check_ensemble_batch,
    check_ensemble_inputs,
    check_ensemble_params,
    check_ensemble_state,
    check_epoch,
    check_ghost_batches,
    check_member_devices,
    check_positive_int,
    check_training_setup,
    per_member_values,
)

__all__ = [
    "EnsembleInputs",
    "TrainingSetup",
    "check_bn_momentum",
    "check_ensemble_batch",
    "check_ensemble_inputs",
    "check_ensemble_params",
    "check_ensemble_state",
    "check_epoch",
    "check_ghost_batches",
    "check_member_devices",
    "check_positive_int",
    "check_training_setup",
    "per_member_values",
]
