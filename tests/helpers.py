"""Inputs shared by the test modules."""

from __future__ import annotations

import numpy as np

from compare import contract
from compare.init import init_params


def random_params(seed, dtype=np.float64, batch_norm=True):
    """Contract-layout parameters with gamma, beta and biases moved off their trivial 1 / 0, so
    that a mix-up between them (or a dropped term) changes the numbers. float32 parameters are
    the float64 ones rounded."""
    params = init_params(seed, np.float64, batch_norm=batch_norm)
    rng = np.random.default_rng(1000 + seed)
    for layer in params:
        for key in layer:
            if key == "gamma":
                layer[key] = rng.uniform(0.5, 1.5, layer[key].shape)
            elif key in ("beta", "bias"):
                layer[key] = rng.normal(0.0, 0.3, layer[key].shape)
    return [{k: v.astype(dtype) for k, v in layer.items()} for layer in params]


def random_state(seed, dtype=np.float64):
    """Running statistics away from 0 / 1, so that eval mode really uses them."""
    rng = np.random.default_rng(2000 + seed)
    return [
        {"mean": rng.normal(0.0, 0.5, s["mean"]).astype(dtype), "var": rng.uniform(0.5, 2.0, s["var"]).astype(dtype)}
        for s in contract.state_shapes()
    ]


def with_changes(layers, index, **changes):
    """A copy of a list of layer dicts with ``layers[index]``'s keys replaced (``None`` deletes)."""
    out = [dict(layer) for layer in layers]
    for key, new in changes.items():
        if new is None:
            del out[index][key]
        else:
            out[index][key] = new
    return out
