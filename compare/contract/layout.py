"""The parameter layout both sides share: layer sizes, the arrays of ``params`` and ``state``, the input checks.

``params`` is a list of 4 layer dicts, the same arrays for either side::

    hidden layer i = 0, 1, 2   {"weight": (in, 100), "gamma": (100,), "beta": (100,)}   batch norm on
                               {"weight": (in, 100), "bias": (100,)}                    batch norm off
    output layer               {"weight": (100, 10), "bias": (10,)}

(with batch norm a hidden layer has no bias: the batch mean cancels it). ``state`` is a list of 3
dicts ``{"mean": (100,), "var": (100,)}``, batch norm's running statistics; ``[]`` with batch norm off.

Every public entry point of both sides (``model``, ``train``, ``equinox_model``) validates once,
through :func:`check_inputs` (the NumPy side adds its backend check, :mod:`numpyside.backend`): bad input is refused
with an :class:`InputError` that names the problem; past that boundary the layers trust their input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Widths of the network: 784 -> 100 -> 100 -> 100 -> 10.
LAYER_SIZES: tuple[int, ...] = (784, 100, 100, 100, 10)
N_INPUTS = LAYER_SIZES[0]
N_CLASSES = LAYER_SIZES[-1]
N_HIDDEN_LAYERS = len(LAYER_SIZES) - 2

#: Batch norm's epsilon, added to the (biased) batch variance before the square root.
BN_EPS = 1e-5
#: PyTorch-style momentum of the running statistics: running = (1 - m) * running + m * batch.
BN_MOMENTUM = 0.1

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class InputError(ValueError):
    """Bad input to either side: wrong shape, dtype, layout, labels, or non-finite values."""


def hidden_keys(batch_norm: bool) -> tuple[str, ...]:
    """Keys of a hidden layer's dict."""
    return ("weight", "gamma", "beta") if batch_norm else ("weight", "bias")


def param_shapes(batch_norm: bool = True) -> list[dict[str, tuple[int, ...]]]:
    """The expected shape of every parameter, in the shared layout."""
    shapes: list[dict[str, tuple[int, ...]]] = []
    for i in range(N_HIDDEN_LAYERS):
        n_in, n_out = LAYER_SIZES[i], LAYER_SIZES[i + 1]
        layer = {"weight": (n_in, n_out)}
        if batch_norm:
            layer.update(gamma=(n_out,), beta=(n_out,))
        else:
            layer.update(bias=(n_out,))
        shapes.append(layer)
    shapes.append({"weight": (LAYER_SIZES[-2], N_CLASSES), "bias": (N_CLASSES,)})
    return shapes


def state_shapes() -> list[dict[str, tuple[int, ...]]]:
    """The expected shape of the running statistics (batch norm on)."""
    return [{"mean": (n,), "var": (n,)} for n in LAYER_SIZES[1:-1]]


def _dtype_of(array: Any) -> np.dtype:
    return np.dtype(getattr(array, "dtype", np.asarray(array).dtype))


def check_params(params: Sequence[dict[str, Any]]) -> tuple[bool, np.dtype]:
    """Check ``params`` against the layout; return ``(batch_norm, dtype)``.

    Works on NumPy and JAX arrays alike (only ``.shape`` and ``.dtype`` are read).
    """
    if not isinstance(params, (list, tuple)) or len(params) != N_HIDDEN_LAYERS + 1:
        raise InputError(
            f"params must be a list of {N_HIDDEN_LAYERS + 1} layer dicts, got "
            f"{type(params).__name__}" + (f" of length {len(params)}" if hasattr(params, "__len__") else "")
        )
    if not all(isinstance(layer, dict) for layer in params):
        raise InputError("params must be a list of dicts, one per layer")
    batch_norm = "gamma" in params[0]
    expected = param_shapes(batch_norm)
    dtypes = set()
    for i, (layer, want) in enumerate(zip(params, expected)):
        if set(layer) != set(want):
            raise InputError(
                f"params[{i}] has keys {sorted(layer)}, expected {sorted(want)} "
                f"(batch norm {'on' if batch_norm else 'off'}, decided by params[0])"
            )
        for key, shape in want.items():
            got = tuple(getattr(layer[key], "shape", ()))
            if got != shape:
                raise InputError(f"params[{i}][{key!r}] has shape {got}, expected {shape}")
            dtypes.add(_dtype_of(layer[key]))
    if len(dtypes) != 1:
        raise InputError(f"all parameters must share one dtype, found {sorted(map(str, dtypes))}")
    (dtype,) = dtypes
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"parameters must be float32 or float64, got {dtype}")
    return batch_norm, dtype


def check_state(state: Sequence[dict[str, Any]], batch_norm: bool, dtype: np.dtype) -> None:
    """Check the running statistics: 3 dicts ``{"mean", "var"}`` with batch norm, ``[]`` without."""
    if not batch_norm:
        if state is not None and len(state) != 0:
            raise InputError("with batch norm off, state must be an empty list (there are no running statistics)")
        return
    if not isinstance(state, (list, tuple)) or len(state) != N_HIDDEN_LAYERS:
        raise InputError(f"state must be a list of {N_HIDDEN_LAYERS} dicts {{'mean', 'var'}} (running statistics)")
    for i, (layer, want) in enumerate(zip(state, state_shapes())):
        if not isinstance(layer, dict) or set(layer) != set(want):
            raise InputError(f"state[{i}] must be a dict with keys ['mean', 'var']")
        for key, shape in want.items():
            got = tuple(getattr(layer[key], "shape", ()))
            if got != shape:
                raise InputError(f"state[{i}][{key!r}] has shape {got}, expected {shape}")
            if _dtype_of(layer[key]) != dtype:
                raise InputError(f"state[{i}][{key!r}] has dtype {_dtype_of(layer[key])}, parameters are {dtype}")


def flatten_hint(shape: tuple[int, ...], batch_axes: int = 1) -> str:
    """The fix for images given as ``28 x 28`` arrays: flatten each into ``N_INPUTS`` pixels ("" otherwise)."""
    if len(shape) == batch_axes + 2 and shape[-1] * shape[-2] == N_INPUTS:
        target = (*shape[:batch_axes], N_INPUTS)
        return f"; these look like unflattened {shape[-2]}x{shape[-1]} images: flatten them, images.reshape{target}"
    return ""


def check_images(images: Any, dtype: np.dtype) -> np.ndarray:
    """Check a batch of images and return it as a C-contiguous array of the parameters' dtype.

    Images must be floating point (MNIST pixels scaled to [0, 1]); raw ``uint8`` pixels are refused
    rather than silently fed in at a 255x larger scale.
    """
    array = np.asarray(images)
    if array.ndim != 2 or array.shape[1] != N_INPUTS:
        raise InputError(f"images must have shape (batch, {N_INPUTS}), got {array.shape}" + flatten_hint(array.shape))
    if array.shape[0] == 0:
        raise InputError("images is an empty batch")
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"images must be floating point (pixels scaled to [0, 1]), got dtype {array.dtype}"
            + ("; divide raw uint8 pixels by 255" if array.dtype == np.uint8 else "")
        )
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise InputError(f"images contain NaN or Inf (first at row {bad[0]}, column {bad[1]})")
    return np.ascontiguousarray(array, dtype=dtype)


def check_labels(labels: Any, batch_size: int) -> np.ndarray:
    """Check class labels: integers in 0..9, one per image. Returns them as int32."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != batch_size:
        raise InputError(f"labels must have shape ({batch_size},) to match the images, got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"labels must be integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= N_CLASSES):
        bad = array[(array < 0) | (array >= N_CLASSES)][0]
        raise InputError(f"labels must lie in 0..{N_CLASSES - 1}, found {int(bad)}")
    return array.astype(np.int32, copy=False)


def check_training_batch_size(batch_size: int) -> None:
    """Batch norm in training mode needs at least two examples: the variance of one is undefined."""
    if batch_size < 2:
        raise InputError(
            f"batch norm in training mode needs a batch of at least 2 examples, got {batch_size}: "
            "the batch variance of a single example is undefined (and the unbiased running variance divides by n - 1)"
        )


def check_inputs(
    params, state, images, labels=None, *, train: bool = False
) -> tuple[bool, np.dtype, np.ndarray, np.ndarray | None]:
    """The one check at every public entry point: parameters, state, images and (if given) labels.

    With ``train=True`` and batch norm on, the batch must hold at least two examples. Returns
    ``(batch_norm, dtype, images, labels)``: the images cast to the parameters' dtype (C-contiguous),
    the labels as int32 (``None`` if none were given).
    """
    batch_norm, dtype = check_params(params)
    check_state(state, batch_norm, dtype)
    images = check_images(images, dtype)
    if labels is not None:
        labels = check_labels(labels, len(images))
    if train and batch_norm:
        check_training_batch_size(len(images))
    return batch_norm, dtype, images, labels


def check_epoch_plan(batch_indices: Any, learning_rates: Any, n_images: int, batch_norm: bool, dtype: np.dtype):
    """A trainer's epoch: ``(steps, batch)`` integer indices into its ``n_images`` training images and
    one learning rate per step. With batch norm, a batch must hold at least two examples.

    Returns the indices as int32 and the learning rates in ``dtype``.
    """
    indices = np.asarray(batch_indices)
    if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
        raise InputError(f"batch_indices must be a (steps, batch) integer array, got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_images):
        raise InputError(
            f"batch_indices must lie in 0..{n_images - 1} (the training images), found {indices.min()}..{indices.max()}"
        )
    if batch_norm:
        check_training_batch_size(indices.shape[1])
    rates = np.asarray(learning_rates, dtype)
    if rates.shape != (indices.shape[0],):
        raise InputError(f"learning_rates must hold one rate per step, shape ({indices.shape[0]},), got {rates.shape}")
    return indices.astype(np.int32, copy=False), rates


def check_training_set(params, state, images, labels) -> tuple[bool, np.dtype, np.ndarray, np.ndarray]:
    """:func:`check_inputs` for a trainer's whole training set (its batches are checked where they are drawn)."""
    return check_inputs(params, state, images, labels)
