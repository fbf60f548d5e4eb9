"""The command line of ``python -m compare.parallel``: ``compare/run.py``'s options plus the processes'."""

from __future__ import annotations

import argparse
import sys

from compare import cli
from compare.contract import InputError
from compare.parallel import launcher, scaling
from compare.parallel.process import run_process


def build_parser() -> argparse.ArgumentParser:
    """compare/run.py's options (``--devices``, ``--processes`` among them) plus the multi-process ones."""
    parser = cli.build_parser()
    parser.prog = "python -m compare.parallel"
    parser.description = "Data-parallel training (sync batch norm) over devices and processes, vs one device."
    group = parser.add_argument_group("processes")
    group.add_argument("--devices-per-process", dest="devices", type=cli.positive_int, help="the same as --devices")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator: run ONE process of a job")
    group.add_argument("--num-processes", type=cli.positive_int, help="processes in the job (with --coordinator)")
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
    """Parse and validate; every problem exits with status 2 before any work starts."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli.parse_args(argv, parser)
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
    """``--scaling``, the local launcher (``--processes P``), or one process; 2 for bad input, 1 on failure."""
    args = parse_args(argv)
    try:
        if args.scaling:
            return scaling.print_scaling(args)
        if args.coordinator is None and args.processes > 1:
            return launcher.launch(args)
        return run_process(args)
    except (InputError, launcher.RunFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, InputError) else 1
