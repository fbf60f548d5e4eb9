r"""Why batch norm's variance is summed in two passes: a float32 stress case, measured both ways.

    python -m compare.variance [--ratio 1e4] [--batch 256] [--devices 4]

Features with ``|mean| / std = ratio``. Two passes (what both sides do, synchronised or not):
``mu = sum(x) / N``, then ``var = sum((x - mu)^2) / N``; one pass (Flax/Haiku's sync BN):
``var = E[x^2] - E[x]^2``, which subtracts two numbers of size ``mean^2`` to get one of size
``std^2``, losing ``log10(ratio^2)`` digits. Both are computed over ``D`` shards with
all-reduced partial sums (:mod:`numpyside.parallel`'s scheme), and the JAX side's own
``batchnorm_train`` (pmean, two passes) on the whole batch, against a float64 reference.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from jaxside.layers import BATCH_AXIS, batchnorm_train


def stress_batch(ratio: float, batch: int, features: int = 100, seed: int = 0) -> np.ndarray:
    """float32 features with mean ``ratio`` and standard deviation 1 (so ``|mean| / std = ratio``)."""
    rng = np.random.default_rng(seed)
    return (ratio + rng.standard_normal((batch, features))).astype(np.float32)


def two_pass_variance(shards: list[np.ndarray]) -> np.ndarray:
    n = sum(len(s) for s in shards)
    mean = sum(s.sum(axis=0) for s in shards) / np.float32(n)
    return sum(((s - mean) ** 2).sum(axis=0) for s in shards) / np.float32(n)


def one_pass_variance(shards: list[np.ndarray]) -> np.ndarray:
    n = np.float32(sum(len(s) for s in shards))
    mean = sum(s.sum(axis=0) for s in shards) / n
    mean_of_squares = sum((s * s).sum(axis=0) for s in shards) / n
    return mean_of_squares - mean * mean


def jax_variance(x: np.ndarray) -> np.ndarray:
    """The biased batch variance that ``jaxside.layers.batchnorm_train`` computes (pmean, two passes)."""
    ones = np.ones(x.shape[1], x.dtype)

    def one_example(row):
        return batchnorm_train(row, ones, 0 * ones, axis_name=BATCH_AXIS)[1][1]

    return np.asarray(jax.vmap(one_example, axis_name=BATCH_AXIS, out_axes=None)(x))


def measure(ratio: float = 1e4, batch: int = 256, devices: int = 4) -> dict[str, float]:
    """Max relative error of each float32 variance against the float64 two-pass one, and how many
    features came out negative (a negative variance makes ``1/sqrt(var + eps)`` NaN for ``var < -eps``)."""
    x = stress_batch(ratio, batch)
    exact = x.astype(np.float64).var(axis=0)
    shards = np.split(x, devices)
    result = {}
    variances = {
        "two_pass": two_pass_variance(shards),
        "one_pass": one_pass_variance(shards),
        "jax_batchnorm_train": jax_variance(x),
    }
    for name, variance in variances.items():
        result[f"{name}_max_rel_err"] = float(np.max(np.abs(variance - exact) / exact))
        result[f"{name}_negative"] = int(np.sum(variance < 0))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.variance", description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=1e4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args(argv)
    result = measure(args.ratio, args.batch, args.devices)
    print(f"float32, |mean|/std = {args.ratio:g}, batch {args.batch} over {args.devices} shards, 100 features:")
    for name in ("two_pass", "one_pass", "jax_batchnorm_train"):
        print(
            f"  {name.replace('_', ' '):>19}: max relative error {result[f'{name}_max_rel_err']:.2e}, "
            f"negative variances {result[f'{name}_negative']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
