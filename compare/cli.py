"""The command line of ``compare/run.py`` (also the base of ``python -m compare.parallel``'s), and its data.

Every problem with the arguments ends the command with status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from compare.contract import training
from compare.mnist import load_mnist
from numpyside import backend

QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS = 4096, 1000, 2
MNIST_TRAIN = 60_000


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
        choices=backend.BACKENDS,
        default=backend.DEFAULT_BACKEND,
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
    add_ensemble_arguments(parser)
    parser.add_argument(
        "--devices",
        type=positive_int,
        help="split every batch over D devices (CPU: D host devices); see python -m compare.parallel",
    )
    parser.add_argument("--processes", type=positive_int, help="P local processes (with --devices D each)")
    return parser


def add_ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    """The ensemble's options (:mod:`compare.ensemble_run`)."""
    group = parser.add_argument_group("ensemble (more vmap: an ensemble of batch-normed models)")
    group.add_argument(
        "--ensemble", type=int, default=None, metavar="M", help="also train M members (seeds seed .. seed+M-1)"
    )
    group.add_argument(
        "--ensemble-batches",
        choices=["same", "independent"],
        default="same",
        help="every member on the same batches (default), or one batch order per member",
    )
    group.add_argument(
        "--ghost-batches", type=int, default=1, metavar="G", help="ghost batch norm: G sub-batches per batch"
    )
    group.add_argument("--pool-members", action="store_true", help="batch norm's statistics over all members' batches")


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and validate; every problem exits with status 2 before any work starts."""
    parser = build_parser() if parser is None else parser
    args = parser.parse_args(argv)
    epochs_given = any(
        a == "--epochs" or a.startswith("--epochs=") for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.quick and not epochs_given:
        args.epochs = QUICK_EPOCHS
    n_train = QUICK_TRAIN if args.quick else MNIST_TRAIN
    if not args.no_batch_norm and args.batch_size < 2:
        parser.error("--batch-size must be at least 2 with batch norm (the variance of one example is undefined)")
    if args.batch_size > n_train:
        parser.error(f"--batch-size {args.batch_size} is larger than the training set ({n_train})")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    check_ensemble_arguments(parser, args)
    return args


def check_ensemble_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse contradictory ensemble options before any work starts (exit status 2)."""
    if args.ensemble is None:
        if args.ghost_batches != 1 or args.pool_members or args.ensemble_batches != "same":
            parser.error("--ghost-batches, --pool-members and --ensemble-batches need --ensemble M")
        return
    if args.ensemble < 1:
        parser.error(f"--ensemble must be at least 1, got {args.ensemble}")
    if args.ghost_batches < 1 or args.batch_size % args.ghost_batches:
        parser.error(
            f"--ghost-batches {args.ghost_batches} must be a positive divisor of --batch-size {args.batch_size}"
        )
    if args.pool_members and args.ghost_batches > 1:
        parser.error("--pool-members with --ghost-batches > 1 is not supported: choose one")
    if args.no_batch_norm and (args.pool_members or args.ghost_batches > 1):
        parser.error("--ghost-batches and --pool-members change batch norm: they need it on")
    if not args.no_batch_norm and args.batch_size // args.ghost_batches < 2 and not args.pool_members:
        parser.error("every ghost batch needs at least 2 examples (the variance of one is undefined)")


def load_data(args: argparse.Namespace, console: Console):
    """``(train_x, train_y, test_x, test_y)`` for the run: MNIST (``--quick``: its first images), the
    images in ``--dtype``. The loader's errors say what is missing and how to fix it."""
    train_x, train_y, test_x, test_y, source = load_mnist(args.data_dir, return_source=True)
    console.print(f"[bold]MNIST[/]: {source}")
    if args.quick:
        train_x, train_y = train_x[:QUICK_TRAIN], train_y[:QUICK_TRAIN]
        test_x, test_y = test_x[:QUICK_TEST], test_y[:QUICK_TEST]
    dtype = np.dtype(args.dtype)
    return train_x.astype(dtype), train_y, test_x.astype(dtype), test_y
