"""Throughput of an ensemble against the same members trained one after another, on both sides.

    python -m compare.ensemble_bench [--members 8] [--batch-size 128] [--steps 40] [--repeats 5]

Rows in member-samples/s (``members x steps x batch`` over the seconds of one epoch of ``steps``
steps): :class:`jaxside.ensemble.Trainer` (nested vmaps, an epoch as one ``lax.scan``) and
:class:`numpyside.ensemble.Trainer` (stacked layers, numba kernels), each with every member on the
same batches and with one batch order per member (NumPy also with the members split over two
threads, ``threads=2``); and ``M`` single trainers one after another,
:class:`jaxside.train.Trainer` and :class:`numpyside.fast.FastTrainer` (numba). Round-robin: one
epoch of each row per round, the median over ``--repeats`` rounds after a warm-up round, with the
load average (a shared machine drifts). Writes ``ensemble_bench.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python compare/ensemble_bench.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from compare.contract import training

BENCH_LR = 0.01  # small and constant: the parameters stay sane over many repeats


def runners(images, labels, *, members: int, batch_size: int, steps: int, dtype: str, seed: int = 0) -> dict:
    """One callable per row; each trains one epoch of ``steps`` steps (all members) when called."""
    import jax

    from compare.contract.init import init_ensemble, init_params, init_state
    from jaxside import ensemble as jax_ensemble
    from jaxside.train import Trainer as JaxTrainer
    from numpyside import ensemble as numpy_ensemble
    from numpyside.ensemble.fast import FastEnsembleTrainer
    from numpyside.fast import FastTrainer

    params, state = init_ensemble(range(seed, seed + members), dtype)
    rng = np.random.default_rng(seed)
    shared = training.epoch_batches(len(images), batch_size, rng)[:steps]
    independent = np.stack([training.epoch_batches(len(images), batch_size, rng)[:steps] for _ in range(members)], 1)
    rates = np.full(steps, BENCH_LR)

    def epoch_of(trainer, batches):
        trainer.compile(steps, batch_size, **({"per_member_batches": batches.ndim == 3}))
        return lambda: trainer.epoch(batches, rates)

    def one_after_another(make):
        trainers = [make(init_params(seed + k, dtype), init_state(dtype)) for k in range(members)]
        for trainer in trainers:
            trainer.compile(steps, batch_size)

        def run():
            for trainer in trainers:
                trainer.epoch(shared, rates)

        return run

    options = dict(momentum=0.9)
    return {
        "jax ensemble, same batches": epoch_of(jax_ensemble.Trainer(params, state, images, labels, **options), shared),
        "jax ensemble, independent batches": epoch_of(
            jax_ensemble.Trainer(params, state, images, labels, **options), independent
        ),
        **(
            {
                f"jax ensemble, {kind} batches, {devices} devices over members": epoch_of(
                    jax_ensemble.Trainer(params, state, images, labels, devices=devices, **options), batches
                )
                for kind, batches in (("same", shared), ("independent", independent))
            }
            if (devices := min(jax.device_count(), 2)) > 1 and members % devices == 0
            else {}
        ),
        f"jax single x {members}": one_after_another(lambda p, s: JaxTrainer(p, s, images, labels, **options)),
        "numpy ensemble, same batches": epoch_of(
            numpy_ensemble.Trainer(params, state, images, labels, backend="numba", **options), shared
        ),
        "numpy ensemble, independent batches": epoch_of(
            numpy_ensemble.Trainer(params, state, images, labels, backend="numba", **options), independent
        ),
        "numpy ensemble, same batches, 2 threads over members": epoch_of(
            numpy_ensemble.Trainer(params, state, images, labels, backend="numba", threads=2, **options), shared
        ),
        "numpy ensemble, independent batches, 2 threads over members": epoch_of(
            numpy_ensemble.Trainer(params, state, images, labels, backend="numba", threads=2, **options), independent
        ),
        "numpy fast ensemble, same batches": epoch_of(
            FastEnsembleTrainer(params, state, images, labels, threads=1, **options), shared
        ),
        "numpy fast ensemble, independent batches": epoch_of(
            FastEnsembleTrainer(params, state, images, labels, threads=1, **options), independent
        ),
        "numpy fast ensemble, same batches, 2 threads over members": epoch_of(
            FastEnsembleTrainer(params, state, images, labels, threads=2, **options), shared
        ),
        "numpy fast ensemble, independent batches, 2 threads over members": epoch_of(
            FastEnsembleTrainer(params, state, images, labels, threads=2, **options), independent
        ),
        f"numpy single x {members} (FastTrainer)": one_after_another(
            lambda p, s: FastTrainer(p, s, images, labels, backend="numba", **options)
        ),
    }


def measure(rows: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every row, round-robin: one call of each per round, after one warm-up round."""
    seconds = {name: [] for name in rows}
    for round_ in range(repeats + 1):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            if round_:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", type=Path, default=Path("."))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 needs it; float32 stays float32
    from compare.mnist import load_mnist
    from compare.report import machine, versions

    train_x, train_y, _, _ = load_mnist()
    n = args.steps * args.batch_size
    images, labels = train_x[:n].astype(args.dtype), train_y[:n]
    rows = runners(images, labels, members=args.members, batch_size=args.batch_size, steps=args.steps, dtype=args.dtype)
    load_before = os.getloadavg()[0]
    seconds = measure(rows, args.repeats)
    load_after = os.getloadavg()[0]
    samples = args.members * args.steps * args.batch_size
    results = []
    for name, times in seconds.items():
        median = float(np.median(times))
        results.append({"row": name, "member_samples_per_s": samples / median, "seconds": times})
    by_name = {r["row"]: r["member_samples_per_s"] for r in results}
    single = {side: next(v for k, v in by_name.items() if k.startswith(f"{side} single")) for side in ("jax", "numpy")}
    print(
        f"Ensemble of {args.members}, batch {args.batch_size}, {args.dtype}, {args.steps} steps per epoch, "
        f"median of {args.repeats} (load average {load_before:.1f} -> {load_after:.1f})"
    )
    for r in results:
        side = r["row"].split()[0]
        r["speedup_vs_single"] = r["member_samples_per_s"] / single[side]
        print(f"  {r['row']:<60} {r['member_samples_per_s']:>12,.0f} member-samples/s  x{r['speedup_vs_single']:.2f}")
    report = {
        "config": vars(args) | {"out": str(args.out)},
        "load_average": [load_before, load_after],
        "rows": results,
        "versions": versions(),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ensemble_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
