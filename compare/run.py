"""The project's main command: both sides, same parameters, same batches, same numbers.

    python compare/run.py [--epochs 10] [--dtype float32|float64] [--quick] ...

1. Step 0: one batch through both sides; logits, loss, every gradient and the new running
   statistics side by side, with their errors, tolerances and a pass mark.
2. Training: both sides start from the same ``init_params(seed)`` and train on the same shuffled
   batches (one NumPy generator) with the same SGD-with-momentum schedule. After every epoch:
   train loss and test accuracy of each side, how many of the test predictions differ, and the
   max parameter drift ``max |p_jax - p_numpy|``.
3. ``report.json`` and ``output.png`` in ``--out``; exit status 1 if any tolerance is exceeded
   (the line that says which is printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python compare/run.py`: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compare import contract, ensemble_run, training
from compare.metrics import RELATIVE_ERROR_FORMULA

QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS = 4096, 1000, 2

#: Tolerances of the training trajectory. The drift tolerance is absolute (parameters are O(1)).
#: Each step adds rounding differences of a few ulps (float64 2.2e-16, float32 1.2e-7) that SGD
#: carries forward; over the default 4,680 steps they were measured to grow to 7e-15 (float64) and
#: 5e-6 (float32) and to level off as the learning rate decays. The tolerances sit ~100x and ~20x
#: above that: room for other machines and BLAS builds. (Formula errors are caught at step 0,
#: where they show as relative errors of 1e-3 or more.)
DRIFT_TOLERANCE = {"float32": 1e-4, "float64": 1e-12}
#: A test prediction may flip only if an example sits within rounding distance of a decision
#: boundary; in float64 that never happens, in float32 it is allowed for at most 0.1 % of the set.
DISAGREEMENT_TOLERANCE = {"float32": 0.001, "float64": 0.0}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def momentum_value(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare/run.py",
        description="Train the per-example JAX model and the handwritten NumPy model side by side "
        "and show that they compute the same numbers.",
    )
    parser.add_argument("--epochs", type=positive_int, default=training.DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=positive_int, default=training.DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=training.DEFAULT_LR,
        help="peak learning rate of the cosine schedule (default %(default)s)",
    )
    parser.add_argument("--momentum", type=momentum_value, default=training.DEFAULT_MOMENTUM)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=training.DEFAULT_SEED)
    parser.add_argument(
        "--backend",
        choices=contract.BACKENDS,
        default=contract.DEFAULT_BACKEND,
        help="kernels of the NumPy side (default %(default)s)",
    )
    parser.add_argument(
        "--model",
        choices=["pmean", "equinox"],
        default="pmean",
        help="JAX side: our own per-example model with pmean, or Equinox's BatchNorm",
    )
    parser.add_argument(
        "--reference-trainer",
        action="store_true",
        help="train the NumPy side with the readable numpyside.train.Trainer instead of the fast "
        "numpyside.fast.FastTrainer (same numbers, slower)",
    )
    parser.add_argument("--no-batch-norm", action="store_true", help="the same MLP without batch norm")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the four MNIST IDX .gz files")
    parser.add_argument("--out", type=Path, default=Path("."), help="where report.json and output.png go")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_TRAIN} training and {QUICK_TEST} test images, {QUICK_EPOCHS} epochs unless "
        "--epochs is given: a first look in seconds",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    ensemble_run.add_arguments(parser)
    parser.add_argument(
        "--devices",
        type=positive_int,
        help="split every batch over D devices (CPU: D host devices); see compare/parallel.py",
    )
    parser.add_argument("--processes", type=positive_int, help="P local processes (with --devices D each)")
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and validate; every problem exits with status 2 before any work starts."""
    parser = build_parser() if parser is None else parser
    args = parser.parse_args(argv)
    epochs_given = any(
        a == "--epochs" or a.startswith("--epochs=") for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.quick and not epochs_given:
        args.epochs = QUICK_EPOCHS
    n_train = QUICK_TRAIN if args.quick else 60_000
    if not args.no_batch_norm and args.batch_size < 2:
        parser.error("--batch-size must be at least 2 with batch norm (the variance of one example is undefined)")
    if args.batch_size > n_train:
        parser.error(f"--batch-size {args.batch_size} is larger than the training set ({n_train})")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    ensemble_run.check_arguments(parser, args)
    return args


def load_data(args, console: Console):
    from compare.mnist import load_mnist

    train_x, train_y, test_x, test_y, source = load_mnist(args.data_dir, return_source=True)
    console.print(f"[bold]MNIST[/]: {source}")
    if args.quick:
        train_x, train_y, test_x, test_y = (
            train_x[:QUICK_TRAIN],
            train_y[:QUICK_TRAIN],
            test_x[:QUICK_TEST],
            test_y[:QUICK_TEST],
        )
    dtype = np.dtype(args.dtype)
    return train_x.astype(dtype), train_y, test_x.astype(dtype), test_y


def step0_table(rows, dtype: str) -> Table:
    table = Table(
        title=f"Step 0: one batch through both sides ({dtype}); a = NumPy, b = JAX, "
        f"relative error = {RELATIVE_ERROR_FORMULA}"
    )
    for name, justify in (
        ("quantity", "left"),
        ("max |b|", "right"),
        ("max abs err", "right"),
        ("max rel err", "right"),
        ("tol", "right"),
        ("ok", "center"),
    ):
        table.add_column(name, justify=justify)
    for r in rows:
        table.add_row(
            r.quantity,
            f"{r.max_abs:.3e}",
            f"{r.max_abs_err:.2e}",
            f"{r.max_rel_err:.2e}",
            f"{r.tol:.0e}",
            "[green]✓[/]" if r.ok else "[red]✗[/]",
        )
    return table


def epoch_table(rows, titles) -> Table:
    table = Table(
        title="Training trajectory: mean train loss, test accuracy, test predictions that differ, max |p_jax - p_numpy|"
    )
    for name in ("epoch", "loss jax", "loss numpy", "acc jax", "acc numpy", "differ", "max drift"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r["epoch"]),
            f"{r['train_loss']['jax']:.6f}",
            f"{r['train_loss']['numpy']:.6f}",
            f"{r['test_accuracy']['jax']:.2%}",
            f"{r['test_accuracy']['numpy']:.2%}",
            str(r["disagreements"]),
            f"{r['max_param_drift']:.2e}",
        )
    return table


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def max_param_drift(params_a, params_b) -> float:
    return max(
        float(np.max(np.abs(la[k].astype(np.float64) - lb[k].astype(np.float64))))
        for la, lb in zip(params_a, params_b)
        for k in la
    )


def train_both(args, sides, params, state, data, console: Console, warmup=None):
    """Both sides, epoch by epoch, on the same batches; returns the per-epoch rows and timings.
    ``warmup``: the background compilation of the NumPy side's kernels (:mod:`numpyside.warmup`),
    waited for before its trainer compiles (the wait counts as its compile time)."""
    train_x, train_y, test_x, test_y = data
    trainers = {
        key: side.make_trainer(params, state, train_x, train_y, momentum=args.momentum) for key, side in sides.items()
    }
    steps = len(train_x) // args.batch_size
    compile_seconds = {}
    for key, trainer in trainers.items():
        start = time.perf_counter()
        if key == "numpy" and warmup is not None:
            warmup.wait("trainer")
        compile_seconds[key] = time.perf_counter() - start + trainer.compile(steps, args.batch_size)
    schedule = training.LearningRateSchedule(args.lr, args.epochs * steps)
    rng = training.batch_rng(args.seed)
    train_seconds = dict.fromkeys(sides, 0.0)
    rows, rss_per_epoch = [], []
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, disable=args.no_progress) as progress:
        tasks = {
            key: progress.add_task(sides[key].title.split(" (")[0] + f" ({key})", total=args.epochs, status="")
            for key in sides
        }
        for epoch in range(args.epochs):
            batches = training.epoch_batches(len(train_x), args.batch_size, rng)
            rates = schedule.for_epoch(epoch, steps)
            losses, predictions = {}, {}
            for key, trainer in trainers.items():
                start = time.perf_counter()
                losses[key] = float(np.mean(trainer.epoch(batches, rates), dtype=np.float64))
                train_seconds[key] += time.perf_counter() - start
                predictions[key] = trainer.predict(test_x)
                accuracy = float(np.mean(predictions[key] == test_y))
                progress.update(tasks[key], advance=1, status=f"loss {losses[key]:.4f}  test acc {accuracy:.2%}")
            rows.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": losses,
                    "test_accuracy": {key: float(np.mean(predictions[key] == test_y)) for key in sides},
                    "disagreements": int(np.sum(predictions["jax"] != predictions["numpy"])),
                    "max_param_drift": max_param_drift(
                        trainers["jax"].params_numpy(), trainers["numpy"].params_numpy()
                    ),
                }
            )
            rss_per_epoch.append(round(rss_mb(), 1))
    samples = steps * args.batch_size * args.epochs
    timings = {
        key: {
            "compile_s": compile_seconds[key],
            "train_s": train_seconds[key],
            "samples_per_s": samples / train_seconds[key],
        }
        for key in sides
    }
    timings["rss_mb_per_epoch"] = rss_per_epoch  # resident memory after each epoch: flat = no growth
    return rows, timings


def numba_warmup(args):
    """The background compilation of the NumPy side's numba kernels for this run's dtype
    (:mod:`numpyside.warmup`), or None where the run compiles none."""
    if args.backend != "numba" or args.reference_trainer:
        return None
    from numpyside import warmup

    return warmup.start(args.dtype, batch_norm=not args.no_batch_norm)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.devices or args.processes:  # data-parallel: the sharded JAX side, set up before JAX starts
        from compare.parallel import main as parallel_main

        return parallel_main(argv)
    warmup = numba_warmup(args)  # first: it compiles on the other core while JAX starts and MNIST loads
    try:
        return compare_sides(args, warmup)
    finally:
        if warmup is not None:
            warmup.close()


def compare_sides(args, warmup=None) -> int:
    """Step 0, training, report: the comparison of :func:`main` (``warmup`` as in :func:`train_both`)."""
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    console = Console()
    wall_start = time.perf_counter()
    from compare import report as report_module
    from compare.init import init_params, init_state
    from compare.sides import jax_side, numpy_side
    from compare.step0 import step0_rows

    sides = {"jax": jax_side(args.model), "numpy": numpy_side(args.backend, fast=not args.reference_trainer)}
    batch_norm = not args.no_batch_norm
    console.rule("[bold]vmap-batchnorm: the per-example JAX model vs the handwritten NumPy model")
    for side in sides.values():
        console.print(f"  [bold]{side.key:>5}[/]: {side.title}")
    console.print(
        f"  dtype {args.dtype}, seed {args.seed}, batch {args.batch_size}, {args.epochs} epochs, "
        f"lr {args.lr} (cosine), momentum {args.momentum}, batch norm {'on' if batch_norm else 'off'}"
    )
    try:
        data = load_data(args, console)
    except Exception as error:  # the loader's errors say what is missing and how to fix it
        console.print(f"[red]error:[/] {error}")
        return 2
    params = init_params(args.seed, args.dtype, batch_norm=batch_norm)
    state = init_state(args.dtype, batch_norm)

    # Step 0: the first training batch of the shared order.
    first_batch = training.epoch_batches(len(data[0]), args.batch_size, training.batch_rng(args.seed))[0]
    rows0 = step0_rows(sides["jax"], sides["numpy"], params, state, data[0][first_batch], data[1][first_batch])
    console.print(step0_table(rows0, args.dtype))

    epochs, timings = train_both(args, sides, params, state, data, console, warmup)
    console.print(epoch_table(epochs, {k: s.title for k, s in sides.items()}))
    for key in sides:
        t = timings[key]
        console.print(
            f"  {key:>5}: {t['train_s']:.2f} s training, {t['samples_per_s']:,.0f} samples/s "
            f"(+ {t['compile_s']:.2f} s compile/warm-up)"
        )
    # ru_maxrss can lag /proc's current figure by a few pages: the peak is at least every sample
    timings["peak_rss_mb"] = round(max(peak_rss_mb(), *timings["rss_mb_per_epoch"]), 1)
    console.print(
        f"  memory: peak RSS {timings['peak_rss_mb']:,.0f} MB; RSS after each epoch (MB): "
        + " ".join(f"{m:,.0f}" for m in timings["rss_mb_per_epoch"])
    )

    n_test = len(data[3])
    tolerances = {
        "step0_rel_err": rows0[0].tol,
        "max_param_drift": DRIFT_TOLERANCE[args.dtype],
        "disagreements": int(DISAGREEMENT_TOLERANCE[args.dtype] * n_test),
    }
    failures = [f"step 0: {r.quantity}: max rel err {r.max_rel_err:.2e} > tol {r.tol:.0e}" for r in rows0 if not r.ok]
    last = epochs[-1]
    if last["max_param_drift"] > tolerances["max_param_drift"]:
        failures.append(
            f"training: max param drift {last['max_param_drift']:.2e} > tol {tolerances['max_param_drift']:.0e}"
        )
    if last["disagreements"] > tolerances["disagreements"]:
        failures.append(
            f"training: {last['disagreements']} test predictions differ > tol {tolerances['disagreements']}"
        )
    ensemble = ensemble_run.run_ensemble(args, data, console) if args.ensemble else None
    failures += ensemble["failures"] if ensemble else []

    report = {
        "passed": not failures,
        "failures": failures,
        "config": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lr_schedule": "cosine",
            "momentum": args.momentum,
            "dtype": args.dtype,
            "seed": args.seed,
            "backend": args.backend,
            "model": args.model,
            "batch_norm": batch_norm,
            "quick": args.quick,
            "numpy_trainer": "reference" if args.reference_trainer else "fast",
            "n_train": len(data[0]),
            "n_test": n_test,
            "machine_epsilon": float(np.finfo(args.dtype).eps),
        },
        "sides": {k: s.title for k, s in sides.items()},
        "relative_error": RELATIVE_ERROR_FORMULA,
        "tolerances": tolerances,
        "step0": [r.to_json() for r in rows0],
        "epochs": epochs,
        "versions": report_module.versions(),
        "machine": report_module.machine(),
        "timings": {**timings, "wall_s": None},
        **({"ensemble": ensemble} if ensemble else {}),
    }
    report_module.write_outputs(report, args.out, wall_start)
    console.print(
        f"wrote {args.out / 'report.json'} and {args.out / 'output.png'} "
        f"(wall time {report['timings']['wall_s']:.1f} s)"
    )
    if failures:
        for line in failures:
            console.print(f"[bold red]FAIL[/] {line}")
        return 1
    console.print("[bold green]PASS[/]: every quantity within its tolerance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
