"""The two sides behind one small interface, so that the comparison code names no framework.

A :class:`Side` bundles what the comparison calls: the contract functions ``loss_and_grads`` and
``predict_logits``, the training-mode logits of a batch (for the step-0 table), and a factory of
trainers (``epoch(batch_indices, learning_rates)``, ``predict(images)``, ``params_numpy()``,
``state_numpy()``, ``compile(steps, batch_size)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxside import model as jax_model
from jaxside.train import Trainer as JaxTrainer
from numpyside import model as numpy_model
from numpyside.backend import DEFAULT_BACKEND
from numpyside.fast import FastTrainer
from numpyside.train import Trainer as NumpyTrainer

JAX_MODELS = ("pmean", "equinox")


@dataclass(frozen=True)
class Side:
    key: str  # "jax" or "numpy": the key used in report.json
    title: str
    loss_and_grads: Callable[..., tuple[Any, list, list]]
    predict_logits: Callable[..., np.ndarray]
    train_logits: Callable[[list, list, np.ndarray], np.ndarray]
    make_trainer: Callable[..., Any]
    state_note: str = ""  # appended to the running-statistics rows of the step-0 table


def jax_side(model: str = "pmean") -> Side:
    """The per-example JAX model (``pmean`` in our own code, or Equinox's ``BatchNorm``)."""
    if model == "equinox":
        from jaxside import equinox_model  # Equinox loads only for the runs that use it

        def loss_and_grads_bessel(params, state, images, labels):
            # Equinox's running variance takes the biased batch variance; ours the unbiased one.
            # The step-0 table compares them after converting Equinox's update (documented in
            # jaxside/equinox_model.py), so that the row checks everything else about the state.
            loss, grads, new_state = equinox_model.loss_and_grads(params, state, images, labels)
            return loss, grads, equinox_model.with_bessel_correction(new_state, state, len(images))

        return Side(
            key="jax",
            title="JAX · Equinox (eqx.nn.BatchNorm, vmap axis 'batch')",
            loss_and_grads=loss_and_grads_bessel,
            state_note=" (eqx +Bessel)",
            predict_logits=equinox_model.predict_logits,
            train_logits=equinox_model.train_logits,
            make_trainer=equinox_model.Trainer,
        )
    if model != "pmean":
        raise ValueError(f"unknown JAX model {model!r}; choose from {JAX_MODELS}")
    return Side(
        key="jax",
        title="JAX (per example, vmap + pmean)",
        loss_and_grads=jax_model.loss_and_grads,
        predict_logits=jax_model.predict_logits,
        train_logits=jax_model.train_logits,
        make_trainer=JaxTrainer,
    )


def numpy_side(backend: str = DEFAULT_BACKEND, *, fast: bool = True) -> Side:
    """The batched, hand-differentiated NumPy side with the given kernel backend.

    Training uses :class:`numpyside.fast.FastTrainer` (preallocated buffers, fused kernels; the
    same numbers as the reference) unless ``fast=False`` asks for the readable reference
    :class:`numpyside.train.Trainer`. The step-0 functions are the reference model's either way.
    """
    return Side(
        key="numpy",
        title=f"NumPy (batched, hand backward, {backend} kernels{', fast trainer' if fast else ''})",
        loss_and_grads=functools.partial(numpy_model.loss_and_grads, backend=backend),
        predict_logits=functools.partial(numpy_model.predict_logits, backend=backend),
        train_logits=functools.partial(numpy_model.train_logits, backend=backend),
        make_trainer=functools.partial(FastTrainer if fast else NumpyTrainer, backend=backend),
    )
