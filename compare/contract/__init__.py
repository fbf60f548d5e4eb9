"""The contract both sides meet, and the only part of ``compare`` that ``jaxside`` and ``numpyside`` import.

* :mod:`compare.contract.layout`: layer sizes, the parameter layout and the input checks (its names are
  re-exported here: ``compare.contract.InputError``, ``compare.contract.LAYER_SIZES`` ...);
* :mod:`compare.contract.ensemble`: the same with a leading member axis, and the ensemble's options;
* :mod:`compare.contract.init`: the initial parameters and running statistics;
* :mod:`compare.contract.training`: the batch order, the SGD rule and the learning-rate schedule.

It imports neither side (``lint-imports`` checks it, see ``pyproject.toml``).
"""

from compare.contract.layout import (
    BN_EPS,
    BN_MOMENTUM,
    LAYER_SIZES,
    N_CLASSES,
    N_HIDDEN_LAYERS,
    N_INPUTS,
    SUPPORTED_DTYPES,
    InputError,
    check_epoch_plan,
    check_images,
    check_inputs,
    check_labels,
    check_params,
    check_state,
    check_training_batch_size,
    check_training_set,
    hidden_keys,
    param_shapes,
    state_shapes,
)

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "LAYER_SIZES",
    "N_CLASSES",
    "N_HIDDEN_LAYERS",
    "N_INPUTS",
    "SUPPORTED_DTYPES",
    "InputError",
    "check_epoch_plan",
    "check_images",
    "check_inputs",
    "check_labels",
    "check_params",
    "check_state",
    "check_training_batch_size",
    "check_training_set",
    "hidden_keys",
    "param_shapes",
    "state_shapes",
]
