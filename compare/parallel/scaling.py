"""Samples/s of the sharded trainer against processes and devices (the scaling table).

    python -m compare.parallel --scaling [--quick] [--epochs N] [--batch-size B] [--dtype ...]

Each configuration ``(processes, devices per process)`` runs in fresh processes, since the device
count is fixed when JAX starts: ``python -m compare.parallel --throughput`` times the sharded epochs
after compiling and one warm-up epoch (and, in one process, ``jaxside.train.Trainer`` on the same
batches) and prints one JSON line. What the numbers mean on this machine: docs/sync_batchnorm.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from compare.contract import training
from compare.contract.init import init_params, init_state
from compare.parallel import launcher
from jaxside import parallel
from jaxside.train import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
#: (processes, devices per process) of the scaling table.
CONFIGS = ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2))


def throughput(args, mesh, data) -> dict:
    """Time ``args.epochs`` sharded epochs after compiling (every process takes part); with one
    process also the single-device ``jaxside.train.Trainer`` on the same batches."""
    train_x, train_y, _, _ = data
    params, state = init_params(args.seed, args.dtype), init_state(args.dtype)
    steps = len(train_x) // args.batch_size
    rng = training.batch_rng(args.seed)
    epochs = [training.epoch_batches(len(train_x), args.batch_size, rng) for _ in range(args.epochs)]
    rates = np.full(steps, 0.01)
    result = {"devices": mesh.size, "processes": jax.process_count(), "batch_size": args.batch_size}
    trainers = {"sharded": parallel.Trainer(params, state, train_x, train_y, momentum=args.momentum, mesh=mesh)}
    if jax.process_count() == 1:
        trainers["single_device"] = Trainer(params, state, train_x, train_y, momentum=args.momentum)
    samples = steps * args.batch_size * len(epochs)
    for key, trainer in trainers.items():
        trainer.compile(steps, args.batch_size)
        trainer.epoch(epochs[0], rates)  # warm-up
        host_before = getattr(trainer, "host_seconds", 0.0)
        start = time.perf_counter()
        for batches in epochs:
            trainer.epoch(batches, rates)
        seconds = time.perf_counter() - start
        result[f"{key}_samples_per_s"] = samples / seconds
        if key == "sharded":  # the host's share: gathering this process's block of every batch, sending it
            result["sharded_host_share"] = (trainer.host_seconds - host_before) / seconds
    return result


def scaling_rows(configs=CONFIGS, extra=(), timeout=600.0) -> list[dict]:
    """Samples/s of the sharded trainer for each ``(processes, devices per process)``, each in fresh
    processes (the device count is fixed when JAX starts). ``extra`` are more run options."""
    rows = []
    for processes, devices in configs:
        command = [sys.executable, "-m", "compare.parallel", "--throughput", "--no-progress", *extra]
        command += ["--processes", str(processes), "--devices", str(devices)]
        out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise launcher.RunFailed(f"{' '.join(command[1:])} failed:\n{out.stderr[-2000:]}")
        rows.append({**json.loads(lines[-1]), "devices_per_process": devices})
    return rows


def scaling_table(rows: list[dict], batch_size: int) -> Table:
    """The rows of :func:`scaling_rows` as a table."""
    table = Table(title=f"Data-parallel samples/s on this machine ({os.cpu_count()} cores), batch {batch_size}")
    columns = ("processes", "devices/process", "devices", "sharded samples/s", "of it host", "one-device Trainer")
    for name in columns:
        table.add_column(name, justify="right")
    for r in rows:
        single = r.get("single_device_samples_per_s")
        table.add_row(
            str(r["processes"]),
            str(r["devices_per_process"]),
            str(r["devices"]),
            f"{r['sharded_samples_per_s']:,.0f}",
            f"{r['sharded_host_share']:.0%}",
            "" if single is None else f"{single:,.0f}",
        )
    return table


def print_scaling(args) -> int:
    """Run :func:`scaling_rows` with this command's run options; print and save the table."""
    extra = launcher.without(args.argv, {"--scaling", "--processes", "--devices", "--devices-per-process", "--out"})
    rows = scaling_rows(extra=extra, timeout=args.timeout)
    Console().print(scaling_table(rows, args.batch_size))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0
