"""The sharded JAX side against the same training on one device, and against the NumPy side.

Each process trains :class:`jaxside.parallel.Trainer` (batch norm synchronised over every device of
every process) on its block of every batch; process 0 (the leader) also trains the single-device
JAX side and the NumPy side on the same batches, prints the usual tables and a sharded-vs-one-device
table, and writes ``report.json`` (with a ``"parallel"`` section) and ``output.png`` under ``--out``.
Tolerances: :data:`compare.tolerances.SHARDED_STEP0` at step 0, then those of ``compare/run.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from compare import report as report_module
from compare import tolerances
from compare.contract import training
from compare.contract.init import init_params, init_state
from compare.metrics import RELATIVE_ERROR_FORMULA, max_tree_err
from compare.sides import Side, jax_side, numpy_side
from compare.step0 import step0_rows
from compare.tables import epoch_table, print_outcome, single_device_table, step0_table
from jaxside import parallel


@dataclass
class Step0:
    """Step 0 of the sharded side: its rows against NumPy, and its distance to one device."""

    rows: list  # compare.step0.Row, empty with per-device statistics (nothing to match)
    vs_single: float  # max |sharded - single| over loss, gradients and state


def _precomputed_side(train_logits, step, predict_logits, title) -> Side:
    """The sharded step as a :class:`compare.sides.Side` whose functions return what was computed."""
    return Side(
        key="jax",
        title=title,
        loss_and_grads=lambda *_: step,
        predict_logits=predict_logits,
        train_logits=lambda *_: train_logits,
        make_trainer=None,
    )


def sharded_step0(args, sides: dict, params, state, batch, step_sharded, logits_sharded, title: str) -> Step0:
    """(leader) The sharded step against one device and, with synchronised statistics, against NumPy."""
    x0, y0 = batch
    step_single = sides["single"].loss_and_grads(params, state, x0, y0)
    rows = []
    if logits_sharded is not None:
        sharded = _precomputed_side(logits_sharded, step_sharded, sides["single"].predict_logits, title)
        rows = step0_rows(sharded, sides["numpy"], params, state, x0, y0)
    return Step0(rows, max_tree_err(step_sharded, step_single))


def train_all(args, trainer, references: dict, data, leader: bool):
    """Every epoch: the sharded trainer in every process, the references in the leader. Returns the
    rows against NumPy, the rows against one device, and each trainer's seconds."""
    train_x, _, test_x, test_y = data
    steps = len(train_x) // args.batch_size
    schedule = training.LearningRateSchedule(args.lr, args.epochs * steps)
    rng = training.batch_rng(args.seed)
    seconds = {"jax": 0.0, "single": 0.0, "numpy": 0.0}
    epochs, vs_single = [], []
    for epoch in range(args.epochs):
        batches = training.epoch_batches(len(train_x), args.batch_size, rng)
        rates = schedule.for_epoch(epoch, steps)
        losses = {}
        for key, each in {"jax": trainer, **(references if leader else {})}.items():
            start = time.perf_counter()
            losses[key] = float(np.mean(each.epoch(batches, rates), dtype=np.float64))
            seconds[key] += time.perf_counter() - start
        if not leader:
            continue
        predictions = {"jax": trainer.predict(test_x), **{k: t.predict(test_x) for k, t in references.items()}}
        accuracy = {k: float(np.mean(p == test_y)) for k, p in predictions.items()}
        sharded_params = trainer.params_numpy()
        epochs.append(
            {
                "epoch": epoch + 1,
                "train_loss": {"jax": losses["jax"], "numpy": losses["numpy"]},
                "test_accuracy": {"jax": accuracy["jax"], "numpy": accuracy["numpy"]},
                "disagreements": int(np.sum(predictions["jax"] != predictions["numpy"])),
                "max_param_drift": max_tree_err(sharded_params, references["numpy"].params_numpy()),
            }
        )
        vs_single.append(
            {
                "epoch": epoch + 1,
                "loss_sharded": losses["jax"],
                "loss_single_device": losses["single"],
                "max_param_diff": max_tree_err(sharded_params, references["single"].params_numpy()),
                "max_state_diff": max_tree_err(trainer.state_numpy(), references["single"].state_numpy()),
                "predictions_differ": int(np.sum(predictions["jax"] != predictions["single"])),
            }
        )
    return epochs, vs_single, seconds


def sharded_tolerances(args, step0: Step0, n_test: int) -> dict:
    dtype = np.dtype(args.dtype)
    differ = int(tolerances.DISAGREEMENT[dtype] * n_test)
    return {
        "step0_rel_err": step0.rows[0].tol if step0.rows else None,
        "max_param_drift": tolerances.DRIFT[dtype],
        "disagreements": differ,
        "step0_vs_single_device": tolerances.SHARDED_STEP0[dtype],
        "max_param_diff_vs_single_device": tolerances.DRIFT[dtype],
        "predictions_differ_vs_single_device": differ,
    }


def sharded_failures(step0: Step0, epochs, vs_single, limits: dict, sync: bool) -> list[str]:
    """Step 0's rows out of tolerance, and (with synchronised statistics) every quantity against one
    device and NumPy out of its own. Per-device statistics are a different model: nothing to match."""
    failures = [
        f"step 0: {r.quantity}: max rel err {r.max_rel_err:.2e} > tol {r.tol:.0e}" for r in step0.rows if not r.ok
    ]
    last = vs_single[-1]
    checks = [
        ("step 0 vs one device: max abs diff", step0.vs_single, "step0_vs_single_device"),
        ("max param diff vs one device", last["max_param_diff"], "max_param_diff_vs_single_device"),
        (
            "test predictions differing from one device",
            last["predictions_differ"],
            "predictions_differ_vs_single_device",
        ),
        ("max param drift vs NumPy", epochs[-1]["max_param_drift"], "max_param_drift"),
        ("test predictions differing from NumPy", epochs[-1]["disagreements"], "disagreements"),
    ]
    return failures + [
        f"{name}: {value:.3g} > tol {limits[key]:.3g}"
        for name, value, key in (checks if sync else [])
        if value > limits[key]
    ]


def sharded_report(args, data, titles, step0: Step0, epochs, vs_single, timings, limits, failures, mesh) -> dict:
    """``report.json``: ``compare/run.py``'s keys, with a ``"parallel"`` section."""
    train_x, _, test_x, _ = data
    last, n_dev = vs_single[-1], mesh.size
    config = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "momentum", "dtype", "seed", "backend")}
    config |= {"lr_schedule": "cosine", "model": "pmean", "batch_norm": not args.no_batch_norm, "quick": args.quick}
    config |= {"n_train": len(train_x), "n_test": len(test_x), "machine_epsilon": float(np.finfo(args.dtype).eps)}
    return {
        "passed": not failures,
        "failures": failures,
        "config": config,
        "sides": titles,
        "relative_error": RELATIVE_ERROR_FORMULA,
        "tolerances": limits,
        "step0": [r.to_json() for r in step0.rows],
        "epochs": epochs,
        "parallel": {
            "devices": n_dev,
            "processes": args.processes,
            "devices_per_process": n_dev // args.processes,
            "sync_batch_norm": not args.no_sync_batch_norm,
            "max_param_diff_vs_single_device": last["max_param_diff"],
            "max_state_diff_vs_single_device": last["max_state_diff"],
            "test_predictions_differ_vs_single_device": last["predictions_differ"],
            "step0_max_abs_diff_vs_single_device": step0.vs_single,
            "per_epoch": vs_single,
        },
        "versions": report_module.versions(),
        "machine": report_module.machine(),
        "timings": {**timings, "wall_s": None},
    }


def print_timings(timings: dict, n_dev: int, console: Console) -> None:
    names = {"jax": f"sharded JAX ({n_dev} devices)", "single": "JAX, one device", "numpy": "NumPy"}
    for key, t in timings.items():
        console.print(f"  {names[key]:>24}: {t['train_s']:.2f} s training, {t['samples_per_s']:,.0f} samples/s")


def compare_sharded(args, mesh, data, console: Console, leader: bool) -> int:
    """The sharded JAX side against the NumPy side (the usual tables) and against one device."""
    wall_start = time.perf_counter()
    sync = not args.no_sync_batch_norm
    train_x, train_y, _, test_y = data
    batch_norm = not args.no_batch_norm
    params, state = init_params(args.seed, args.dtype, batch_norm=batch_norm), init_state(args.dtype, batch_norm)
    n_proc = args.processes
    title = f"JAX sharded: {mesh.size} devices in {n_proc} process{'es' if n_proc > 1 else ''}, sync batch norm {sync}"
    console.rule(f"[bold]vmap-batchnorm, data-parallel: {title}")

    first = training.epoch_batches(len(train_x), args.batch_size, training.batch_rng(args.seed))[0]
    batch = train_x[first], train_y[first]
    # collectives: every process makes these calls in this order
    step_sharded = parallel.loss_and_grads(params, state, *batch, mesh=mesh, sync_batch_norm=sync)
    logits_sharded = parallel.sharded_logits(params, state, batch[0], mesh=mesh) if sync else None
    trainer = parallel.Trainer(params, state, train_x, train_y, momentum=args.momentum, mesh=mesh, sync_batch_norm=sync)
    steps = len(train_x) // args.batch_size
    compile_s = {"jax": trainer.compile(steps, args.batch_size)}

    sides = {"single": jax_side("pmean"), "numpy": numpy_side(args.backend, fast=not args.reference_trainer)}
    references = {}
    if leader:
        step0 = sharded_step0(args, sides, params, state, batch, step_sharded, logits_sharded, title)
        if step0.rows:
            console.print(step0_table(step0.rows, args.dtype))
        references = {
            key: side.make_trainer(params, state, train_x, train_y, momentum=args.momentum)
            for key, side in sides.items()
        }
        compile_s.update({key: t.compile(steps, args.batch_size) for key, t in references.items()})
    epochs, vs_single, seconds = train_all(args, trainer, references, data, leader)
    if not leader:
        return 0

    console.print(epoch_table(epochs))
    console.print(single_device_table(vs_single))
    samples = steps * args.batch_size * args.epochs
    timings = {
        key: {"compile_s": compile_s[key], "train_s": seconds[key], "samples_per_s": samples / seconds[key]}
        for key in seconds
    }
    timings["jax"]["host_s"] = trainer.host_seconds  # gathering and sending the batches, part of train_s
    print_timings(timings, mesh.size, console)
    limits = sharded_tolerances(args, step0, len(test_y))
    failures = sharded_failures(step0, epochs, vs_single, limits, sync)
    titles = {"jax": title, "numpy": sides["numpy"].title}
    report = sharded_report(args, data, titles, step0, epochs, vs_single, timings, limits, failures, mesh)
    report_module.write_outputs(report, args.out, wall_start)
    console.print(f"wrote {args.out / 'report.json'} and {args.out / 'output.png'}")
    if not sync:
        note = "per-device batch statistics: another model than the single-device one, nothing to match"
        return print_outcome(console, failures, None, [note])
    return print_outcome(console, failures, "sharded == one device and == NumPy, every quantity within its tolerance")
