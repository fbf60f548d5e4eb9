"""Initial parameters and running statistics in the shared layout (see :mod:`compare.contract.layout`).

Initialisation (Glorot/Xavier uniform, the standard choice for sigmoid layers):

    weight[i] ~ U(-a, a),  a = sqrt(6 / (fan_in + fan_out))
    bias = 0,  gamma = 1,  beta = 0

or, with ``weight_std=s``, Gaussian weights ``weight[i] ~ N(0, s^2)`` (the batch-norm paper's
MNIST protocol, :mod:`compare.studies.bn_paper`). The weights are drawn before any other
parameter and only weights are drawn, so a network with batch norm and one without start from the
same weights for the same seed.

All draws come from ``numpy.random.default_rng(seed)`` in float64, layer by layer, in the order of
the layout, and are then rounded to ``dtype``. So the result depends on the seed alone, and the
float32 parameters are exactly the float64 ones rounded to float32.
"""

from __future__ import annotations

import numpy as np

from compare.contract.layout import SUPPORTED_DTYPES, InputError, param_shapes, state_shapes


def _resolve_dtype(dtype) -> np.dtype:
    resolved = np.dtype(dtype)
    if resolved not in SUPPORTED_DTYPES:
        raise InputError(f"dtype must be float32 or float64, got {resolved}")
    return resolved


def init_params(
    seed: int, dtype=np.float32, batch_norm: bool = True, *, weight_std: float | None = None
) -> list[dict[str, np.ndarray]]:
    """Glorot-uniform weights (or ``N(0, weight_std^2)`` ones), zero biases, unit gamma, zero beta;
    reproducible from ``seed``."""
    dtype = _resolve_dtype(dtype)
    if weight_std is not None and not (np.isfinite(weight_std) and weight_std > 0):
        raise InputError(f"weight_std must be a positive finite number, got {weight_std}")
    rng = np.random.default_rng(seed)
    params = []
    for shapes in param_shapes(batch_norm):
        fan_in, fan_out = shapes["weight"]
        if weight_std is None:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            weight = rng.uniform(-limit, limit, size=(fan_in, fan_out))
        else:
            weight = rng.normal(0.0, weight_std, size=(fan_in, fan_out))
        layer = {"weight": weight.astype(dtype)}
        for key, shape in shapes.items():
            if key == "gamma":
                layer[key] = np.ones(shape, dtype)
            elif key in ("beta", "bias"):
                layer[key] = np.zeros(shape, dtype)
        params.append(layer)
    return params


def init_state(dtype=np.float32, batch_norm: bool = True) -> list[dict[str, np.ndarray]]:
    """Running statistics before any training: means 0, variances 1 (as PyTorch's BatchNorm1d).

    With ``batch_norm=False`` there are no running statistics: ``[]``, as the contract has it.
    """
    dtype = _resolve_dtype(dtype)
    if not batch_norm:
        return []
    return [{"mean": np.zeros(s["mean"], dtype), "var": np.ones(s["var"], dtype)} for s in state_shapes()]


def init_ensemble(seeds, dtype=np.float32, batch_norm: bool = True) -> tuple[list[dict], list[dict]]:
    """``M = len(seeds)`` members stacked on a new leading axis of every leaf (the ensemble layout).

    Member ``k`` is exactly ``init_params(seeds[k], dtype, batch_norm)`` and ``init_state(dtype,
    batch_norm)``: ``params[i]["weight"]`` is ``(M, in, out)``, ``state[i]["mean"]`` is ``(M, 100)``.
    With batch norm off the state is ``[]``, as the contract has it.
    """
    seeds = [int(seed) for seed in np.atleast_1d(np.asarray(seeds))]
    if not seeds:
        raise InputError("an ensemble needs at least one member: seeds is empty")
    members = [init_params(seed, dtype, batch_norm) for seed in seeds]
    params = [{key: np.stack([m[i][key] for m in members]) for key in layer} for i, layer in enumerate(members[0])]
    state = [
        {key: np.stack([value] * len(seeds)) for key, value in layer.items()} for layer in init_state(dtype, batch_norm)
    ]
    return params, state
