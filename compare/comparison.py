"""The comparison of ``compare/run.py``: step 0, both sides trained side by side, the report.

:func:`compare_sides` is the whole of it, from parsed arguments to the exit status;
``compare/run.py`` parses the arguments and starts the background compilation of the NumPy side's
kernels (:mod:`numpyside.warmup`) before this module's imports (JAX, matplotlib) load.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compare import ensemble_run, tolerances
from compare import report as report_module
from compare.cli import load_data
from compare.contract import training
from compare.contract.init import init_params, init_state
from compare.metrics import RELATIVE_ERROR_FORMULA, max_tree_err
from compare.sides import jax_side, numpy_side
from compare.step0 import step0_rows
from compare.tables import epoch_table, print_outcome, step0_table

__all__ = ["compare_sides", "train_both"]


def _progress(args, console: Console) -> Progress:
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    return Progress(*columns, console=console, disable=args.no_progress)


def train_both(args, sides, params, state, data, console: Console, warmup=None):
    """Both sides, epoch by epoch, on the same batches; returns the per-epoch rows and timings.
    ``warmup``: the background compilation of the NumPy side's kernels (:mod:`numpyside.warmup`),
    handed to its trainer's ``compile`` (the wait counts as its compile time)."""
    train_x, train_y, test_x, test_y = data
    trainers = {
        key: side.make_trainer(params, state, train_x, train_y, momentum=args.momentum) for key, side in sides.items()
    }
    steps = len(train_x) // args.batch_size
    compile_seconds = {
        key: trainer.compile(steps, args.batch_size, **({"background": warmup} if key == "numpy" and warmup else {}))
        for key, trainer in trainers.items()
    }
    schedule = training.LearningRateSchedule(args.lr, args.epochs * steps)
    rng = training.batch_rng(args.seed)
    train_seconds = dict.fromkeys(sides, 0.0)
    rows, rss_per_epoch = [], []
    with _progress(args, console) as progress:
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
                    "max_param_drift": max_tree_err(trainers["jax"].params_numpy(), trainers["numpy"].params_numpy()),
                }
            )
            rss_per_epoch.append(round(report_module.rss_mb(), 1))
    samples = steps * args.batch_size * args.epochs
    timings = {
        key: {"compile_s": compile_seconds[key], "train_s": seconds, "samples_per_s": samples / seconds}
        for key, seconds in train_seconds.items()
    }
    timings["rss_mb_per_epoch"] = rss_per_epoch  # resident memory after each epoch: flat = no growth
    return rows, timings


def run_tolerances(args, rows0, n_test: int) -> dict:
    """The report's ``"tolerances"``: step 0's, and the trajectory's (:mod:`compare.tolerances`)."""
    dtype = np.dtype(args.dtype)
    return {
        "step0_rel_err": rows0[0].tol,
        "max_param_drift": tolerances.DRIFT[dtype],
        "disagreements": int(tolerances.DISAGREEMENT[dtype] * n_test),
    }


def failures_of(rows0, epochs, limits: dict) -> list[str]:
    """One line per quantity out of its tolerance: step 0's rows, the last epoch's drift and differences."""
    failures = [f"step 0: {r.quantity}: max rel err {r.max_rel_err:.2e} > tol {r.tol:.0e}" for r in rows0 if not r.ok]
    last = epochs[-1]
    if last["max_param_drift"] > limits["max_param_drift"]:
        failures.append(
            f"training: max param drift {last['max_param_drift']:.2e} > tol {limits['max_param_drift']:.0e}"
        )
    if last["disagreements"] > limits["disagreements"]:
        failures.append(f"training: {last['disagreements']} test predictions differ > tol {limits['disagreements']}")
    return failures


def print_timings(timings: dict, console: Console) -> None:
    """Each side's training time and throughput, and the memory after each epoch (adds the peak)."""
    for key in ("jax", "numpy"):
        t = timings[key]
        console.print(
            f"  {key:>5}: {t['train_s']:.2f} s training, {t['samples_per_s']:,.0f} samples/s "
            f"(+ {t['compile_s']:.2f} s compile/warm-up)"
        )
    # ru_maxrss can lag /proc's current figure by a few pages: the peak is at least every sample
    timings["peak_rss_mb"] = round(max(report_module.peak_rss_mb(), *timings["rss_mb_per_epoch"]), 1)
    console.print(
        f"  memory: peak RSS {timings['peak_rss_mb']:,.0f} MB; RSS after each epoch (MB): "
        + " ".join(f"{m:,.0f}" for m in timings["rss_mb_per_epoch"])
    )


def build_report(args, sides, data, rows0, epochs, timings, limits, failures, ensemble) -> dict:
    """``report.json``'s contents (its ``wall_s`` is filled in when it is written)."""
    config = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr")}
    config |= {"lr_schedule": "cosine", "momentum": args.momentum, "dtype": args.dtype, "seed": args.seed}
    config |= {"backend": args.backend, "model": args.model, "batch_norm": not args.no_batch_norm}
    config |= {"quick": args.quick, "numpy_trainer": "reference" if args.reference_trainer else "fast"}
    config |= {"n_train": len(data[0]), "n_test": len(data[3]), "machine_epsilon": float(np.finfo(args.dtype).eps)}
    return {
        "passed": not failures,
        "failures": failures,
        "config": config,
        "sides": {k: s.title for k, s in sides.items()},
        "relative_error": RELATIVE_ERROR_FORMULA,
        "tolerances": limits,
        "step0": [r.to_json() for r in rows0],
        "epochs": epochs,
        "versions": report_module.versions(),
        "machine": report_module.machine(),
        "timings": {**timings, "wall_s": None},
        **({"ensemble": ensemble} if ensemble else {}),
    }


def print_header(args, sides, console: Console) -> None:
    console.rule("[bold]vmap-batchnorm: the per-example JAX model vs the handwritten NumPy model")
    for side in sides.values():
        console.print(f"  [bold]{side.key:>5}[/]: {side.title}")
    console.print(
        f"  dtype {args.dtype}, seed {args.seed}, batch {args.batch_size}, {args.epochs} epochs, "
        f"lr {args.lr} (cosine), momentum {args.momentum}, batch norm {'off' if args.no_batch_norm else 'on'}"
    )


def compare_sides(args, warmup=None) -> int:
    """Step 0, training, report: the comparison of :func:`main` (``warmup`` as in :func:`train_both`)."""
    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    console = Console()
    wall_start = time.perf_counter()
    sides = {"jax": jax_side(args.model), "numpy": numpy_side(args.backend, fast=not args.reference_trainer)}
    print_header(args, sides, console)
    try:
        data = load_data(args, console)
    except Exception as error:  # the loader's errors say what is missing and how to fix it
        console.print(f"[red]error:[/] {error}")
        return 2
    params, state = (
        init_params(args.seed, args.dtype, not args.no_batch_norm),
        init_state(args.dtype, not args.no_batch_norm),
    )
    first_batch = training.epoch_batches(len(data[0]), args.batch_size, training.batch_rng(args.seed))[0]
    numpy_ready = (lambda: warmup.wait("model")) if warmup is not None else None  # the JAX side goes first
    rows0 = step0_rows(
        sides["jax"], sides["numpy"], params, state, data[0][first_batch], data[1][first_batch], numpy_ready=numpy_ready
    )
    console.print(step0_table(rows0, args.dtype))

    epochs, timings = train_both(args, sides, params, state, data, console, warmup)
    console.print(epoch_table(epochs))
    print_timings(timings, console)
    limits = run_tolerances(args, rows0, len(data[3]))
    failures = failures_of(rows0, epochs, limits)
    ensemble = ensemble_run.run_ensemble(args, data, console) if args.ensemble else None
    failures += ensemble["failures"] if ensemble else []

    report = build_report(args, sides, data, rows0, epochs, timings, limits, failures, ensemble)
    report_module.write_outputs(report, args.out, wall_start)
    wall = report["timings"]["wall_s"]
    console.print(f"wrote {args.out / 'report.json'} and {args.out / 'output.png'} (wall time {wall:.1f} s)")
    return print_outcome(console, failures, "every quantity within its tolerance")
