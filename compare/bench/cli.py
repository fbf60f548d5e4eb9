"""``vmap-bn-bench`` (``python -m compare.bench``): the command line, and the run over thread counts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from compare.bench import sharded
from compare.bench.ensemble import ENSEMBLE_BATCH_SIZE, ENSEMBLE_DTYPE
from compare.bench.limit import ENGINES
from compare.bench.output import peak_table, plot, tables, verdicts
from compare.bench.registry import IMPLS, default_registry
from compare.bench.rows import BATCH_SIZES, DTYPES, LOADED_BATCH_SIZE, THREADS
from compare.bench.timing import BUSY_THRESHOLD
from compare.bench.worker import run_worker, worker
from compare.contract import training
from compare.parallel.scaling import scaling_table
from compare.report import machine

DESCRIPTION = (
    "Throughput of one training step (gather, forward, backward, SGD) of every implementation, next to "
    '"the limit": the step\'s 11 matrix products alone on the same shapes, done by the fastest of several '
    "engines (NumPy's BLAS from Python and from numba, the NumPy side's own GEMM, XLA's dot) in each repeat; "
    "and each row's FLOP/s against the machine's peak (one large square product)."
)
#: The command that runs the bench on this CPU's own OpenBLAS kernels where the environment pins them.
NATIVE_KERNEL_COMMAND = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE vmap-bn-bench"
#: The environment variables that set the libraries' kernels and threads (printed, and kept in bench_run.json).
LIBRARY_VARIABLES = ("OPENBLAS_", "OMP_", "MKL_", "XLA_", "NUMBA_", "VMAP_BN_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmap-bn-bench", description=DESCRIPTION)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: float32, batch size 128, one thread, 3 short repeats, no reference trainers",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where bench.json and bench.png go")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help=f"default {list(BATCH_SIZES)}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help=f"default {list(DTYPES)}")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help=f"thread counts to run (default {list(THREADS)})"
    )
    parser.add_argument(
        "--under-load",
        action="store_true",
        help=f"time B={LOADED_BATCH_SIZE} again while processes of the bench keep every core busy",
    )
    parser.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch rows")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=0,
        metavar="M",
        help=f"also an ensemble of M at B={ENSEMBLE_BATCH_SIZE}, {ENSEMBLE_DTYPE}, against M single models one "
        "after another (member-samples/s)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also the data-parallel scaling table: samples/s against processes and devices (bench.json mode "
        '"sharded")',
    )
    parser.add_argument("--seed", type=int, default=training.DEFAULT_SEED)
    parser.add_argument("--worker-threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse, fill in the defaults of ``--quick``, and refuse contradictions (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([LOADED_BATCH_SIZE] if args.quick else list(BATCH_SIZES))
    args.dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))
    args.impls = list(dict.fromkeys(args.impls))
    args.threads = list(dict.fromkeys(args.threads or ([1] if args.quick else THREADS)))
    if any(b < 2 for b in args.batch_sizes):
        parser.error("batch sizes must be at least 2 (batch norm)")
    if any(t < 1 for t in args.threads):
        parser.error("thread counts must be at least 1")
    if args.under_load and LOADED_BATCH_SIZE not in args.batch_sizes:
        parser.error(f"--under-load times batch size {LOADED_BATCH_SIZE}: include it in --batch-sizes")
    if args.ensemble and (args.ensemble < 2 or ENSEMBLE_DTYPE not in args.dtypes):
        parser.error(f"--ensemble needs at least 2 members and {ENSEMBLE_DTYPE} in --dtypes")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    return args


def coretype_note() -> str:
    """What to say when ``OPENBLAS_CORETYPE`` pins OpenBLAS's kernels ("" when it does not)."""
    if "OPENBLAS_CORETYPE" not in os.environ:
        return ""
    return (
        f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set: OpenBLAS runs those kernels, not this "
        f"CPU's own. For the native kernel: {NATIVE_KERNEL_COMMAND}"
    )


def simd_flags() -> list[str]:
    """The CPU's vector-instruction flags (``lscpu``'s, from ``/proc/cpuinfo``; [] elsewhere): which
    kernels a BLAS can run here (AVX2 and FMA, AVX-512 ...)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return sorted(flag for flag in flags if flag.startswith(("sse", "ssse", "avx", "fma", "amx", "f16c")))


def run_metadata(argv, started: float, peaks: list[dict], notes: list[str]) -> dict:
    """``bench_run.json``: what ran where: the command, the machine (CPU model and vector flags), the
    libraries' environment, the limit's engines, the machine's peak per dtype and thread count."""
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return {
        "command": ["vmap-bn-bench", *(sys.argv[1:] if argv is None else argv)],
        "started_utc": time.strftime(stamp, time.gmtime(started)),
        "finished_utc": time.strftime(stamp, time.gmtime()),
        "machine": {**machine(), "cpu_flags": simd_flags()},
        "environment": {k: v for k, v in os.environ.items() if k.startswith(LIBRARY_VARIABLES)},
        "limit_engines": [{"name": engine.name, "label": engine.label} for engine in ENGINES],
        "peaks": peaks,
        "notes": notes,
    }


def print_results(
    console: Console, timed: list[dict], scaling: list[dict] | None, notes: list[str], peaks: list[dict] = ()
) -> None:
    """The tables, the scaling table, the verdicts and the notes of a run."""
    if peaks:
        console.print(peak_table(peaks))
    for table in tables(timed, default_registry().labels()):
        console.print(table)
    if scaling is not None:
        console.print(scaling_table(scaling, ENSEMBLE_BATCH_SIZE))
        console.print(
            f"  [yellow]note[/]: {os.cpu_count()} cores: more devices or processes cannot run faster here, they "
            "share the same cores (see docs/sync_batchnorm.md)"
        )
    for line in verdicts(timed):
        console.print(f"  {line}")
    for note in notes:
        console.print(f"  {note}")
    busy = [r for r in timed if r["other_cpu"] > BUSY_THRESHOLD and not r["under_load"]]
    if busy:
        console.print(
            f"[yellow]note[/]: {len(busy)} rows were timed while other processes used more than "
            f"{BUSY_THRESHOLD} cores (marked *): re-run on a quiet machine for this machine's speed"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker_threads is not None:
        return worker(args)
    console = Console(width=None if Console().is_terminal else 120)
    console.rule("[bold]vmap-batchnorm benchmark: one training step, samples/s")
    env = {k: v for k, v in os.environ.items() if k.startswith(LIBRARY_VARIABLES)}
    console.print(f"  {machine()['cpu']}, {os.cpu_count()} cores; " + ", ".join(f"{k}={v}" for k, v in env.items()))
    note = coretype_note()
    if note:
        console.print(f"  [yellow]note[/]: {note}")
    started = time.time()
    rows, notes, peaks = [], [], []
    for count in args.threads:
        result = run_worker(args, count, console)
        rows += result["rows"]
        peaks += result["peaks"]
        notes += [n for n in result["notes"] if n not in notes]
    scaling = sharded.bench_scaling(args.quick, ENSEMBLE_DTYPE) if args.scaling else None
    rows += sharded.scaling_bench_rows(scaling, ENSEMBLE_DTYPE) if scaling is not None else []
    timed = [r for r in rows if r["mode"] != "sharded"]  # held to cores and timed with the limit
    print_results(console, timed, scaling, notes, peaks)
    if note:
        console.print(f"[yellow]note[/]: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    # bench.json: the implementations' rows (the limit is in every row's limit_samples_per_s)
    (args.out / "bench.json").write_text(json.dumps([r for r in rows if r["impl"] in IMPLS], indent=1) + "\n")
    meta = run_metadata(argv, started, peaks, notes)
    (args.out / "bench_run.json").write_text(json.dumps(meta, indent=1) + "\n")
    registry = default_registry()
    plot(timed, args.out / "bench.png", registry.labels(), registry.styles())
    console.print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench_run.json'} and {args.out / 'bench.png'}")
    return 0
