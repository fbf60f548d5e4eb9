"""One process of a data-parallel run: its devices, JAX's distributed runtime, the mesh, then the work.

XLA fixes the number of CPU devices when JAX's backend starts, so :func:`start_jax` asks for them
(:func:`jaxside.devices.request_devices`) before the first JAX computation; with ``--coordinator``
it joins JAX's distributed runtime (gloo collectives on CPU) within ``--connect-timeout``.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils
from rich.console import Console

from compare.cli import load_data
from compare.contract import InputError
from compare.parallel import launcher, scaling
from compare.parallel.sharded import compare_sharded
from jaxside.devices import checked_devices, jax_started, request_devices
from jaxside.parallel import make_mesh


def join_job(args) -> None:
    """With ``--coordinator``: join JAX's distributed runtime (gloo collectives on CPU), within
    ``--connect-timeout`` or with a message that says which processes to check."""
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


def check_same_options(args) -> None:
    """Every process of a job must have been started with the same options (a collective: all call it)."""
    options = [args.devices, args.batch_size, args.epochs, args.seed, args.quick, args.dtype == "float64"]
    options += [args.no_sync_batch_norm]
    try:
        multihost_utils.assert_equal(np.array(options, np.int64), "")
    except AssertionError as error:
        raise InputError(
            "the processes of this job were started with different options (devices per process, batch size, "
            "epochs, seed, --quick, dtype, --no-sync-batch-norm)"
        ) from error


def start_jax(args):
    """Ask for the devices, start JAX (and its distributed runtime with ``--coordinator``); return
    the mesh over the first ``args.devices`` devices of every process."""
    started_earlier = jax_started()
    if not started_earlier:
        request_devices(args.devices)
    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    if args.coordinator is not None:
        join_job(args)
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
        check_same_options(args)
    return make_mesh([d for devices in per_process.values() for d in devices[: args.devices]])


def run_process(args) -> int:
    """This process's part of the job: ``--throughput`` timings, or the sharded run against its references."""
    launcher.watchdog(args.timeout, f"this process did not finish within --timeout {args.timeout:g} s")
    mesh = start_jax(args)
    leader = jax.process_index() == 0
    console = Console(quiet=not leader)
    try:
        data = load_data(args, console)
    except Exception as error:  # the loader's errors say what is missing and how to fix it
        raise InputError(str(error)) from error
    if args.throughput:
        result = scaling.throughput(args, mesh, data)
        if leader:
            print(json.dumps(result), flush=True)
        return 0
    status = compare_sharded(args, mesh, data, console, leader)
    if args.coordinator is not None:
        jax.distributed.shutdown()
    return status
