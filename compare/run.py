"""The project's main command: both sides, same parameters, same batches, same numbers.

    python compare/run.py [--epochs 10] [--dtype float32|float64] [--quick] ...

1. Step 0: one batch through both sides; logits, loss, every gradient and the new running
   statistics side by side, with their errors, tolerances and a pass mark (:mod:`compare.step0`).
2. Training: both sides start from the same ``init_params(seed)`` and train on the same shuffled
   batches (one NumPy generator) with the same SGD-with-momentum schedule. After every epoch:
   train loss and test accuracy of each side, how many of the test predictions differ, and the
   max parameter drift ``max |p_jax - p_numpy|``.
3. ``--ensemble M`` also trains an ensemble on both sides (:mod:`compare.ensemble_run`);
   ``--devices D`` / ``--processes P`` hand over to ``python -m compare.parallel``.
4. ``report.json`` and ``output.png`` in ``--out``; exit status 1 if any tolerance
   (:mod:`compare.tolerances`) is exceeded (the line that says which is printed), 2 for bad arguments.
"""

from __future__ import annotations

import atexit
import gc
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python compare/run.py`: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# light imports only: the background compilation starts before JAX and matplotlib load
from compare.cli import parse_args
from numpyside import warmup as warmup_module

__all__ = ["main", "parse_args"]


def numba_warmup(args):
    """The background compilation of the NumPy side's numba kernels for this run's dtype
    (:mod:`numpyside.warmup`), or None where the run compiles none. A ``--quick`` run trains kernel
    by kernel throughout (the same bits): its whole-epoch kernel would be ready only after the run."""
    if args.backend != "numba" or args.reference_trainer:
        return None
    phases = tuple(p for p in warmup_module.PHASES if p != "trainer") if args.quick else warmup_module.PHASES
    return warmup_module.start(args.dtype, batch_norm=not args.no_batch_norm, phases=phases)


def main(argv=None) -> int:
    args = parse_args(argv)
    # at exit, Python's last garbage collection would walk every object JAX, numba and matplotlib
    # made; frozen, they are left to the operating system (docs/performance.md, "The first run")
    atexit.register(gc.freeze)
    if args.devices or args.processes:  # data-parallel: the sharded JAX side, set up before JAX starts
        from compare import parallel

        return parallel.main(argv)
    warmup = numba_warmup(args)  # first: it compiles on the other core while MNIST loads and JAX compiles
    try:
        from compare.comparison import compare_sides  # JAX, matplotlib: loads while the kernels compile

        return compare_sides(args, warmup)
    finally:
        if warmup is not None:
            warmup.close()


if __name__ == "__main__":
    raise SystemExit(main())
