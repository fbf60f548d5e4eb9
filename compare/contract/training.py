"""What both sides' training loops share: the defaults, the batch order, and the SGD rule.

SGD with momentum (PyTorch's form, no dampening, no weight decay), for every parameter ``p``:

    v <- momentum * v + grad        (v starts at 0)
    p <- p - lr * v

Both sides apply exactly this, elementwise, in this order, so that in float64 their trajectories
agree to rounding. The batches come from :func:`epoch_batches`, one NumPy generator shared by both.
"""

from __future__ import annotations

import numpy as np

from compare.contract.layout import InputError

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 0.3
DEFAULT_MOMENTUM = 0.8
DEFAULT_SEED = 0


def batch_rng(seed: int) -> np.random.Generator:
    """The generator that shuffles the training set; both sides draw from one such generator."""
    return np.random.default_rng([seed, 1])


def epoch_batches(n_examples: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one shuffled epoch, shape ``(n_examples // batch_size, batch_size)``, int32.

    The last ``n_examples % batch_size`` examples of the permutation are dropped (PyTorch's
    ``drop_last=True``): every step then has the same batch size, which keeps batch norm's
    statistics comparable and lets the JAX side scan over equal-shaped steps.
    """
    if batch_size < 1 or batch_size > n_examples:
        raise InputError(f"batch size must lie in 1..{n_examples}, got {batch_size}")
    steps = n_examples // batch_size
    order = rng.permutation(n_examples)[: steps * batch_size]
    return order.reshape(steps, batch_size).astype(np.int32)


class LearningRateSchedule:
    """Cosine decay from ``base_lr`` to 0 over ``total_steps`` (one value per SGD step):

        lr_k = base_lr * (1 + cos(pi * k / total_steps)) / 2,   k = 0 .. total_steps - 1

    The values are computed once in float64 and then rounded to the training dtype by each side,
    so both sides step with the very same learning rate.
    """

    def __init__(self, base_lr: float, total_steps: int):
        if not base_lr > 0:
            raise InputError(f"learning rate must be positive, got {base_lr}")
        self.base_lr = base_lr
        self.total_steps = total_steps
        k = np.arange(total_steps, dtype=np.float64)
        self.rates = base_lr * 0.5 * (1.0 + np.cos(np.pi * k / total_steps))

    def for_epoch(self, epoch: int, steps: int) -> np.ndarray:
        """The learning rates of epoch ``epoch`` (0-based) with ``steps`` steps per epoch."""
        return self.rates[epoch * steps : (epoch + 1) * steps]
