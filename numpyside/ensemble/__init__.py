"""An ensemble of ``M`` batch-normed MLPs, stacked on a leading member axis and differentiated by hand.

Mirror of :mod:`jaxside.ensemble` (there: ``forward_pass`` under nested ``vmap``s). Read in this order:

* :mod:`~numpyside.ensemble.layers`: :mod:`numpyside.layers` with a member axis (and ghost batches,
  and batch norm pooled over the members), each backward under its forward;
* :mod:`~numpyside.ensemble.model`: ``loss_and_grads`` and ``predict_logits`` of all members;
* :mod:`~numpyside.ensemble.train`: :class:`Trainer`, SGD with per-member hyper-parameters;
* :mod:`~numpyside.ensemble.fast`: :class:`FastEnsembleTrainer`, the same numbers, an epoch per numba call,
  and :func:`trainer_class`, which of the two applies to a set of options.
"""

from numpyside.ensemble.fast import FastEnsembleTrainer, trainer_class, why_not_fast
from numpyside.ensemble.model import (
    backward,
    batch_loss,
    batch_loss_and_grads,
    forward,
    loss_and_grads,
    predict_logits,
    update_running_stats,
)
from numpyside.ensemble.train import Trainer, sgd_momentum, train_epoch

__all__ = [
    "FastEnsembleTrainer",
    "Trainer",
    "backward",
    "batch_loss",
    "batch_loss_and_grads",
    "forward",
    "loss_and_grads",
    "predict_logits",
    "sgd_momentum",
    "train_epoch",
    "trainer_class",
    "update_running_stats",
    "why_not_fast",
]
