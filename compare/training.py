"""``compare.training``, kept for its callers: the batch order and SGD rule live in :mod:`compare.contract.training`."""

from compare.contract.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_MOMENTUM,
    DEFAULT_SEED,
    LearningRateSchedule,
    batch_rng,
    epoch_batches,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_MOMENTUM",
    "DEFAULT_SEED",
    "LearningRateSchedule",
    "batch_rng",
    "epoch_batches",
]
