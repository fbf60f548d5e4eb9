"""Data-parallel training over devices and processes, checked against one device and the NumPy side.

    python -m compare.parallel --devices D [run options]                  # D devices, one process
    python -m compare.parallel --processes P --devices-per-process D      # P local processes
    python -m compare.parallel --coordinator HOST:PORT --num-processes P --process-id I ...
                                                                          # one process of a multi-host job

``compare/run.py --devices D`` / ``--processes P`` land here. Each process trains the sharded JAX side
(:class:`jaxside.parallel.Trainer`, batch norm synchronised over every device of every process) on
its block of every batch; process 0 also trains the single-device JAX side and the NumPy side on
the same batches, prints the usual tables and a sharded-vs-single-device table, and writes
``report.json`` (with a ``"parallel"`` section) and ``output.png`` under ``--out``. The local launcher
picks a free loopback port, binds the coordinator to 127.0.0.1, and ends every child by PID when one
fails or ``--timeout`` passes. ``--throughput`` only times the sharded epochs (see :func:`scaling_rows`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python compare/parallel.py`: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
from rich.console import Console
from rich.table import Table

from compare import launcher, run, scaling
from compare.contract import InputError
from compare.devices import jax_started, request_devices

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Sharded vs single-device: the same sums in a different order (per-device partial sums, then a
#: sum over devices), so rounding differences only. At step 0 they are a few ulps; over a run they
#: grow like the JAX-vs-NumPy drift of compare/run.py (same tolerances, same reasons).
STEP0_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
DRIFT_TOLERANCE = run.DRIFT_TOLERANCE


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """compare/run.py's options (``--devices``, ``--processes`` among them) plus the multi-process ones."""
    parser = run.build_parser()
    parser.prog = "python -m compare.parallel"
    parser.description = "Data-parallel training (sync batch norm) over devices and processes, vs one device."
    group = parser.add_argument_group("processes")
    group.add_argument("--devices-per-process", dest="devices", type=run.positive_int, help="the same as --devices")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator: run ONE process of a job")
    group.add_argument("--num-processes", type=run.positive_int, help="processes in the job (with --coordinator)")
    group.add_argument("--process-id", type=int, help="this process's id, 0..num-processes-1 (with --coordinator)")
    group.add_argument(
        "--bind-address", help="where process 0's coordinator listens (default: all interfaces, JAX's default)"
    )
    group.add_argument(
        "--timeout", type=float, default=600.0, help="seconds the local launcher waits for its processes (600)"
    )
    group.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to wait for the coordinator and all processes"
    )
    group.add_argument(
        "--heartbeat-timeout", type=int, default=10, help="seconds after which a silent process counts as dead (10)"
    )
    group.add_argument("--no-sync-batch-norm", action="store_true", help="per-device batch statistics")
    group.add_argument("--throughput", action="store_true", help="only time the sharded epochs (JSON on stdout)")
    group.add_argument(
        "--scaling",
        action="store_true",
        help="samples/s against processes and devices: --throughput for each (P, D) in "
        + " ".join(f"({p}, {d})" for p, d in scaling.CONFIGS)
        + "; the table is printed and written to OUT/scaling.json",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = run.parse_args(argv, parser)
    args.devices = args.devices or 1
    if args.coordinator is not None:
        if args.num_processes is None or args.process_id is None:
            parser.error("--coordinator needs --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            parser.error(f"--process-id must lie in 0..{args.num_processes - 1}, got {args.process_id}")
        try:
            launcher.split_address(args.coordinator)
        except ValueError as error:
            parser.error(str(error))
        args.processes = args.num_processes
    elif args.num_processes is not None or args.process_id is not None:
        parser.error("--num-processes and --process-id go with --coordinator (or use --processes P to launch locally)")
    args.processes = args.processes or 1
    total = args.processes * args.devices
    if args.batch_size % total:
        parser.error(
            f"--batch-size {args.batch_size} cannot be split evenly over {total} devices "
            f"({args.processes} processes x {args.devices}): choose a multiple of {total}"
        )
    if args.no_sync_batch_norm and not args.no_batch_norm and args.batch_size // total < 2:
        parser.error("per-device batch norm needs at least 2 examples per device")
    if getattr(args, "ensemble", None) is not None:
        parser.error("--ensemble does not combine with --devices / --processes")
    if args.model != "pmean":
        parser.error("data-parallel training runs our own per-example model (--model pmean)")
    args.argv = argv
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.scaling:
            return scaling.print_scaling(args)
        if args.coordinator is None and args.processes > 1:
            return launch(args)
        return run_process(args)
    except (InputError, launcher.RunFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, InputError) else 1


# ----------------------------------------------------------------------------------------------
# the local launcher
# ----------------------------------------------------------------------------------------------


def launch(args) -> int:
    """Start ``args.processes`` local processes of one job and wait for them (bounded by ``--timeout``)."""
    port = launcher.free_loopback_port()
    address = f"127.0.0.1:{port}"
    common = launcher.without(args.argv, {"--processes", "--devices", "--devices-per-process"})
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}  # logs current when a process fails
    print(f"launching {args.processes} processes x {args.devices} devices, coordinator on {address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` below ends the children
    with tempfile.TemporaryDirectory(prefix="vmap-bn-parallel-") as folder:
        logs = [Path(folder, f"process{i}.log") for i in range(args.processes)]
        children = []
        try:
            for i in range(args.processes):
                command = [
                    *(sys.executable, "-m", "compare.parallel", *common),
                    *("--coordinator", address, "--bind-address", address),
                    *("--num-processes", str(args.processes), "--process-id", str(i)),
                    *("--devices-per-process", str(args.devices)),
                ]
                with open(logs[i], "w") as log:
                    children.append(
                        subprocess.Popen(
                            command,
                            cwd=REPO_ROOT,
                            env=env,
                            stdout=None if i == 0 else log,
                            stderr=log,
                        )
                    )
            launcher.supervise(children, args.timeout, logs)
        finally:
            for child in children:
                launcher.end_process(child)
    return 0


# ----------------------------------------------------------------------------------------------
# one process
# ----------------------------------------------------------------------------------------------


def start_jax(args):
    """Ask for the devices, start JAX (and its distributed runtime with ``--coordinator``); return
    the mesh over the first ``args.devices`` devices of every process."""
    started_earlier = jax_started()
    if not started_earlier:
        request_devices(args.devices)
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    if args.coordinator is not None:
        if args.process_id != 0:
            launcher.wait_for_coordinator(args.coordinator, args.connect_timeout)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        joined = launcher.watchdog(
            args.connect_timeout,
            f"not all {args.num_processes} processes joined the coordinator at {args.coordinator} within "
            f"{args.connect_timeout:g} s (does every process have the same --num-processes, and did all start?)",
        )
        jax.distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            coordinator_bind_address=args.bind_address,
            initialization_timeout=int(args.connect_timeout) + 30,  # the watchdog's clear message comes first
            heartbeat_timeout_seconds=args.heartbeat_timeout,
            shutdown_timeout_seconds=int(args.timeout),
        )
        joined.set()
    from compare.devices import checked_devices
    from jaxside.parallel import make_mesh

    checked_devices(args.devices, started_earlier=started_earlier)
    if jax.process_count() != args.processes:
        raise InputError(f"JAX reports {jax.process_count()} processes, the job has {args.processes}")
    per_process = {}
    for device in jax.devices():
        per_process.setdefault(device.process_index, []).append(device)
    counts = {process: len(devices) for process, devices in per_process.items()}
    if len(set(counts.values())) > 1:
        raise InputError(f"the processes have different numbers of devices ({counts}): give each the same --devices")
    if args.coordinator is not None:
        from jax.experimental import multihost_utils

        options = [args.devices, args.batch_size, args.epochs, args.seed, args.quick, args.dtype == "float64"]
        options += [args.no_sync_batch_norm]
        try:
            multihost_utils.assert_equal(np.array(options, np.int64), "")
        except AssertionError as error:
            raise InputError(
                "the processes of this job were started with different options (devices per process, batch size, "
                "epochs, seed, --quick, dtype, --no-sync-batch-norm)"
            ) from error
    return make_mesh([d for devices in per_process.values() for d in devices[: args.devices]])


def run_process(args) -> int:
    launcher.watchdog(args.timeout, f"this process did not finish within --timeout {args.timeout:g} s")
    mesh = start_jax(args)
    import jax

    from jaxside import parallel

    leader = jax.process_index() == 0
    console = Console(quiet=not leader)
    try:
        data = run.load_data(args, console)
    except Exception as error:  # the loader's errors say what is missing and how to fix it
        raise InputError(str(error)) from error
    if args.throughput:
        result = scaling.throughput(args, mesh, data)
        if leader:
            print(json.dumps(result), flush=True)
        return 0
    status = compare_sharded(args, mesh, data, console, leader, parallel)
    if args.coordinator is not None:
        jax.distributed.shutdown()
    return status


def _max_diff(a, b) -> float:
    import jax

    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(
        (float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in leaves), default=0.0
    )


def _precomputed_side(train_logits, step, predict_logits, title):
    from compare.sides import Side

    return Side(
        key="jax",
        title=title,
        loss_and_grads=lambda *_: step,
        predict_logits=predict_logits,
        train_logits=lambda *_: train_logits,
        make_trainer=None,
    )


def compare_sharded(args, mesh, data, console, leader: bool, parallel) -> int:
    """The sharded JAX side against the NumPy side (the usual tables) and against one device."""
    from compare import report as report_module
    from compare.contract import training
    from compare.contract.init import init_params, init_state
    from compare.sides import jax_side, numpy_side
    from compare.step0 import step0_rows

    wall_start = time.perf_counter()
    sync = not args.no_sync_batch_norm
    train_x, train_y, test_x, test_y = data
    batch_norm = not args.no_batch_norm
    params = init_params(args.seed, args.dtype, batch_norm=batch_norm)
    state = init_state(args.dtype, batch_norm)
    n_proc, n_dev = args.processes, mesh.size
    title = f"JAX sharded: {n_dev} devices in {n_proc} process{'es' if n_proc > 1 else ''}, sync batch norm {sync}"
    console.rule(f"[bold]vmap-batchnorm, data-parallel: {title}")

    first = training.epoch_batches(len(train_x), args.batch_size, training.batch_rng(args.seed))[0]
    x0, y0 = train_x[first], train_y[first]
    # collectives: every process makes these calls in this order
    step_sharded = parallel.loss_and_grads(params, state, x0, y0, mesh=mesh, sync_batch_norm=sync)
    logits_sharded = parallel.sharded_logits(params, state, x0, mesh=mesh) if sync else None
    trainer = parallel.Trainer(params, state, train_x, train_y, momentum=args.momentum, mesh=mesh, sync_batch_norm=sync)
    steps = len(train_x) // args.batch_size
    compile_s = {"jax": trainer.compile(steps, args.batch_size)}

    single, numpy = jax_side("pmean"), numpy_side(args.backend, fast=not args.reference_trainer)
    if leader:
        step_single = single.loss_and_grads(params, state, x0, y0)
        step0_vs_single = _max_diff(step_sharded, step_single)
        if sync:
            sharded = _precomputed_side(logits_sharded, step_sharded, single.predict_logits, title)
            rows0 = step0_rows(sharded, numpy, params, state, x0, y0)
            console.print(run.step0_table(rows0, args.dtype))
        else:
            rows0 = []
        references = {
            "single": single.make_trainer(params, state, train_x, train_y, momentum=args.momentum),
            "numpy": numpy.make_trainer(params, state, train_x, train_y, momentum=args.momentum),
        }
        compile_s.update({key: t.compile(steps, args.batch_size) for key, t in references.items()})

    schedule = training.LearningRateSchedule(args.lr, args.epochs * steps)
    rng = training.batch_rng(args.seed)
    seconds = {"jax": 0.0, "single": 0.0, "numpy": 0.0}
    epochs, vs_single = [], []
    for epoch in range(args.epochs):
        batches = training.epoch_batches(len(train_x), args.batch_size, rng)
        rates = schedule.for_epoch(epoch, steps)
        start = time.perf_counter()
        losses = {"jax": float(np.mean(trainer.epoch(batches, rates), dtype=np.float64))}
        seconds["jax"] += time.perf_counter() - start
        if not leader:
            continue
        for key, reference in references.items():
            start = time.perf_counter()
            losses[key] = float(np.mean(reference.epoch(batches, rates), dtype=np.float64))
            seconds[key] += time.perf_counter() - start
        predictions = {"jax": trainer.predict(test_x), **{k: t.predict(test_x) for k, t in references.items()}}
        accuracy = {k: float(np.mean(p == test_y)) for k, p in predictions.items()}
        sharded_params = trainer.params_numpy()
        epochs.append(
            {
                "epoch": epoch + 1,
                "train_loss": {"jax": losses["jax"], "numpy": losses["numpy"]},
                "test_accuracy": {"jax": accuracy["jax"], "numpy": accuracy["numpy"]},
                "disagreements": int(np.sum(predictions["jax"] != predictions["numpy"])),
                "max_param_drift": run.max_param_drift(sharded_params, references["numpy"].params_numpy()),
            }
        )
        vs_single.append(
            {
                "epoch": epoch + 1,
                "loss_sharded": losses["jax"],
                "loss_single_device": losses["single"],
                "max_param_diff": _max_diff(sharded_params, references["single"].params_numpy()),
                "max_state_diff": _max_diff(trainer.state_numpy(), references["single"].state_numpy()),
                "predictions_differ": int(np.sum(predictions["jax"] != predictions["single"])),
            }
        )
    if not leader:
        return 0

    console.print(run.epoch_table(epochs, None))
    console.print(single_device_table(vs_single))
    samples = steps * args.batch_size * args.epochs
    timings = {
        key: {"compile_s": compile_s[key], "train_s": seconds[key], "samples_per_s": samples / seconds[key]}
        for key in seconds
    }
    timings["jax"]["host_s"] = trainer.host_seconds  # gathering and sending the batches, part of train_s
    names = {"jax": f"sharded JAX ({n_dev} devices)", "single": "JAX, one device", "numpy": "NumPy"}
    for key, t in timings.items():
        console.print(f"  {names[key]:>24}: {t['train_s']:.2f} s training, {t['samples_per_s']:,.0f} samples/s")

    last = vs_single[-1]
    tolerances = {
        "step0_rel_err": rows0[0].tol if rows0 else None,
        "max_param_drift": DRIFT_TOLERANCE[args.dtype],
        "disagreements": int(run.DISAGREEMENT_TOLERANCE[args.dtype] * len(test_x)),
        "step0_vs_single_device": STEP0_TOLERANCE[args.dtype],
        "max_param_diff_vs_single_device": DRIFT_TOLERANCE[args.dtype],
        "predictions_differ_vs_single_device": int(run.DISAGREEMENT_TOLERANCE[args.dtype] * len(test_x)),
    }
    failures = [f"step 0: {r.quantity}: max rel err {r.max_rel_err:.2e} > tol {r.tol:.0e}" for r in rows0 if not r.ok]
    checks = [
        ("step 0 vs one device: max abs diff", step0_vs_single, "step0_vs_single_device"),
        ("max param diff vs one device", last["max_param_diff"], "max_param_diff_vs_single_device"),
        (
            "test predictions differing from one device",
            last["predictions_differ"],
            "predictions_differ_vs_single_device",
        ),
        ("max param drift vs NumPy", epochs[-1]["max_param_drift"], "max_param_drift"),
        ("test predictions differing from NumPy", epochs[-1]["disagreements"], "disagreements"),
    ]
    if not sync:  # per-device statistics are a different model: nothing to match
        checks = []
    failures += [
        f"{name}: {value:.3g} > tol {tolerances[key]:.3g}" for name, value, key in checks if value > tolerances[key]
    ]

    report = {
        "passed": not failures,
        "failures": failures,
        "config": {
            **{k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "momentum", "dtype", "seed", "backend")},
            "lr_schedule": "cosine",
            "model": "pmean",
            "batch_norm": batch_norm,
            "quick": args.quick,
            "n_train": len(train_x),
            "n_test": len(test_x),
            "machine_epsilon": float(np.finfo(args.dtype).eps),
        },
        "sides": {"jax": title, "numpy": numpy.title},
        "relative_error": run.RELATIVE_ERROR_FORMULA,
        "tolerances": tolerances,
        "step0": [r.to_json() for r in rows0],
        "epochs": epochs,
        "parallel": {
            "devices": n_dev,
            "processes": n_proc,
            "devices_per_process": n_dev // n_proc,
            "sync_batch_norm": sync,
            "max_param_diff_vs_single_device": last["max_param_diff"],
            "max_state_diff_vs_single_device": last["max_state_diff"],
            "test_predictions_differ_vs_single_device": last["predictions_differ"],
            "step0_max_abs_diff_vs_single_device": step0_vs_single,
            "per_epoch": vs_single,
        },
        "versions": report_module.versions(),
        "machine": report_module.machine(),
        "timings": {**timings, "wall_s": None},
    }
    report_module.write_outputs(report, args.out, wall_start)
    console.print(f"wrote {args.out / 'report.json'} and {args.out / 'output.png'}")
    for line in failures:
        console.print(f"[bold red]FAIL[/] {line}")
    if not sync:
        console.print("per-device batch statistics: another model than the single-device one, nothing to match")
    elif not failures:
        console.print("[bold green]PASS[/]: sharded == one device and == NumPy, every quantity within its tolerance")
    return 1 if failures else 0


def single_device_table(rows):
    table = Table(
        title="Sharded vs one device: the same training, batch split over the devices (max |p_sharded - p_single|)"
    )
    for name in ("epoch", "loss sharded", "loss 1 device", "max param diff", "max state diff", "preds differ"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r["epoch"]),
            f"{r['loss_sharded']:.6f}",
            f"{r['loss_single_device']:.6f}",
            f"{r['max_param_diff']:.2e}",
            f"{r['max_state_diff']:.2e}",
            str(r["predictions_differ"]),
        )
    return table


if __name__ == "__main__":
    raise SystemExit(main())
