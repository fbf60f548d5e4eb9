r"""Why batch norm at all: the MNIST experiment of Ioffe & Szegedy (2015, §4.1, Figure 1), on both sides.

    python -m compare.bn_paper [--lr 0.01] [--init-std 0.05] [--steps 50000] [--batch-size 60]
                               [--eval-every 500] [--seed 0] [--dtype float32] [--out .] [--quick]

Four models: {JAX side, NumPy side} x {with, without batch norm}, the project's network
784 -> 100 -> 100 -> 100 -> 10 with sigmoid hidden units. Hidden layer with batch norm
``z = g(BN(W u))`` (no bias: ``beta`` takes its role), without ``z = g(W u + b)``. All four start
from the same weights ``N(0, init_std^2)`` (:func:`compare.contract.init.init_params`), biases 0, and train
on the same batches (:func:`compare.contract.training.epoch_batches`, epoch after epoch) with plain SGD
``p <- p - lr * grad`` at a constant rate: the sides' own trainers with momentum 0
(``v <- 0 * v + g`` is ``g`` exactly). The JAX side runs the steps between two evaluations as one
jitted ``lax.scan`` (:class:`jaxside.train.Trainer`), the NumPy side with
:class:`numpyside.fast.FastTrainer`.

Every ``--eval-every`` steps, in eval mode (running statistics), over the test images: the test
accuracy, and the 15th/50th/85th percentiles of the input to one sigmoid of the last hidden layer
(``UNIT``), ``gamma * x_hat + beta`` with batch norm, ``W u + b`` without; the same percentiles
over all units of that layer pooled are the second view. The lockstep itself and the evaluation:
:mod:`compare.studies.bn_paper_lockstep`; the tolerances, with their reason:
:data:`compare.tolerances.BN_PAPER_LOCKSTEP`. Output: ``bn_paper.png`` (the paper's
Figure 1 layout, :mod:`compare.studies.bn_paper_plot`), ``bn_paper.json``, two tables; exit
status 0, 1 if the sides disagree beyond the tolerances, 2 for bad arguments. Results and
discussion: ``docs/bn_paper.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compare.contract import N_HIDDEN_LAYERS
from compare.metrics import RELATIVE_ERROR_FORMULA
from compare.studies.bn_paper_lockstep import (
    NETWORKS,
    PERCENTILES,
    SIDES,
    THRESHOLDS,
    TOLERANCE_REASON,
    TOLERANCES,
    UNIT,
    divergence_notes,
    failures_of,
    summarise,
    train_lockstep,
)
from compare.tables import print_outcome

MNIST_TRAIN = 60_000
LABELS = {"no_batch_norm": "without BN", "batch_norm": "with BN"}
DEFAULTS = dict(lr=0.01, init_std=0.05, steps=50_000, batch_size=60, eval_every=500, seed=0, dtype="float32")
#: ``--quick``: the same protocol, shorter (unless --steps / --eval-every are given).
QUICK = dict(steps=300, eval_every=50)


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------


def _number(kind: type, *, minimum: float, inclusive: bool, what: str):
    """An argparse type: a finite ``kind`` above ``minimum``; the error names the value and the rule."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="python -m compare.bn_paper",
        description="The batch-norm paper's MNIST experiment (Ioffe & Szegedy 2015, Figure 1) on the JAX "
        "and the NumPy side, with and without batch norm, in lockstep.",
    )
    positive_float = _number(float, minimum=0.0, inclusive=False, what="a positive finite number")
    add = parser.add_argument
    add("--lr", type=positive_float, default=d["lr"], help="constant SGD learning rate (default %(default)s)")
    add(
        "--init-std",
        type=positive_float,
        default=d["init_std"],
        help="std of the N(0, std^2) initial weights (default %(default)s)",
    )
    add(
        "--steps",
        type=_number(int, minimum=1, inclusive=True, what="a positive integer"),
        default=d["steps"],
        help="SGD steps per model (default %(default)s)",
    )
    add(
        "--batch-size",
        type=_number(int, minimum=2, inclusive=True, what="an integer of at least 2 (batch norm needs a variance)"),
        default=d["batch_size"],
        help="examples per mini-batch (default %(default)s)",
    )
    add(
        "--eval-every",
        type=_number(int, minimum=1, inclusive=True, what="a positive integer"),
        default=d["eval_every"],
        help="evaluate on the test set every N steps (default %(default)s)",
    )
    add(
        "--seed",
        type=_number(int, minimum=0, inclusive=True, what="a non-negative integer"),
        default=d["seed"],
        help="seed of the initial weights and of the batch order (default %(default)s)",
    )
    add("--dtype", choices=["float32", "float64"], default=d["dtype"], help="default %(default)s")
    add("--out", type=Path, default=Path("."), help="folder for bn_paper.json and bn_paper.png (default: here)")
    add("--quick", action="store_true", help=f"{QUICK['steps']} steps, evaluated every {QUICK['eval_every']}")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check; every problem exits with status 2 (argparse's) before any work starts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    if args.quick:
        args.steps = args.steps if "--steps" in given else QUICK["steps"]
        args.eval_every = args.eval_every if "--eval-every" in given else QUICK["eval_every"]
    if args.batch_size > MNIST_TRAIN:
        parser.error(f"argument --batch-size: {args.batch_size} is larger than the training set ({MNIST_TRAIN})")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a directory")
    return args


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


def _steps_to_text(run: dict, threshold: float) -> str:
    """Steps to ``threshold``: one number when the sides agree, ``jax / numpy`` when not."""
    texts = [run["steps_to_by_side"][side][f"{threshold:.2f}"] for side in SIDES]
    texts = ["never" if step is None else f"{step:,}" for step in texts]
    return texts[0] if texts[0] == texts[1] else " / ".join(texts)


def results_table(runs: dict) -> Table:
    table = Table(title="Test accuracy (eval mode)", caption="steps to: the first evaluation at or above")
    for column in ("network", "final, JAX", "final, NumPy", "steps to 90 %", "steps to 95 %"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for name, run in runs.items():
        final = run["final_test_accuracy"]
        table.add_row(
            LABELS[name],
            f"{final['jax']:.2%}",
            f"{final['numpy']:.2%}",
            *(_steps_to_text(run, t) for t in THRESHOLDS),
        )
    return table


def agreement_table(runs: dict, dtype: str) -> Table:
    """Per network: how far apart the sides are (step 0, the trajectory, the end) against the tolerances."""
    caption = f"rel err = {RELATIVE_ERROR_FORMULA}. {TOLERANCE_REASON[dtype]}"
    table = Table(title=f"JAX side vs NumPy side ({dtype}), lockstep", caption=caption)
    columns = {
        "network": "left",
        "step 0\nrel err": "right",
        "accuracy\nmax |Δ|": "right",
        "percentiles\nrel err": "right",
        "params\nrel err": "right",
        "params\nmax |Δ|": "right",
        "ok": "center",
    }
    for column, justify in columns.items():
        table.add_column(column, justify=justify)
    for name, run in runs.items():
        agreement, ok = run["agreement"], run["step0"]["ok"] and all(run["agreement_ok"].values())
        table.add_row(
            LABELS[name],
            f"{run['step0']['max_rel_err']:.1e}",
            *(f"{agreement[key]:.1e}" for key in ("accuracy", "percentiles", "max_param_diff")),
            f"{run['max_param_diff']:.1e}",
            "[green]✓[/]" if ok else "[red]✗[/]",
        )
    tolerance, step0_tolerance = TOLERANCES[dtype], next(iter(runs.values()))["step0"]["tolerance"]
    table.add_row(
        "tolerance",
        f"{step0_tolerance:.0e}",
        *(f"{tolerance[key]:.0e}" for key in ("accuracy", "percentiles", "max_param_diff")),
    )
    return table


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def load_data(dtype: str, console: Console):
    from compare.mnist import load_mnist

    train_x, train_y, test_x, test_y, source = load_mnist(return_source=True)
    console.print(f"[bold]MNIST[/]: {source}")
    return train_x.astype(dtype), train_y, test_x.astype(dtype), test_y


def build_report(args, runs: dict, data, trainers: dict, failures: list[str], notes: list[str]) -> dict:
    """``bn_paper.json``: the issue's shape (config, batch_norm, no_batch_norm) and more keys."""
    from compare import report as report_module

    return {
        "config": {**{key: getattr(args, key) for key in (*DEFAULTS, "quick")}, "out": str(args.out)},
        "batch_norm": runs["batch_norm"],
        "no_batch_norm": runs["no_batch_norm"],
        "protocol": {
            "unit": UNIT,
            "layer": N_HIDDEN_LAYERS - 1,
            "percentiles": list(PERCENTILES),
            "momentum": 0.0,
            "n_train": len(data[0]),
            "n_test": len(data[3]),
            "numpy_trainer": "FastTrainer, "
            + ("whole epoch in one numba call" if trainers["batch_norm"]["numpy"].whole_epoch else "step by step"),
        },
        "tolerances": TOLERANCES[args.dtype],
        "tolerance_reason": TOLERANCE_REASON[args.dtype],
        "passed": not failures,
        "failures": failures,
        "notes": notes,
        "versions": report_module.versions(),
        "machine": report_module.machine(),
        "timings": {"wall_s": None},
    }


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: status 2 for bad arguments (0 for --help)
        return int(exit_.code or 0)
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    from compare.report import write_report
    from compare.studies.bn_paper_plot import plot_bn_paper

    console = Console()
    wall_start = time.perf_counter()
    console.rule("[bold]Batch norm, or not: Ioffe & Szegedy (2015) §4.1 on MNIST, JAX side and NumPy side")
    console.print(
        f"  784-100-100-100-10 sigmoid MLP, weights N(0, {args.init_std}²), plain SGD lr {args.lr} (constant), "
        f"batch {args.batch_size}, {args.steps:,} steps, test every {args.eval_every}, {args.dtype}, seed {args.seed}"
    )
    try:
        data = load_data(args.dtype, console)
    except Exception as error:  # the loader's errors say what is missing and how to fix it
        console.print(f"[red]error:[/] {error}")
        return 2
    records, trainers = train_lockstep(args, data, console)
    runs = {name: summarise(records[name], trainers[name], args.dtype) for name in NETWORKS}
    console.print(results_table(runs))
    console.print(agreement_table(runs, args.dtype))
    failures, notes = failures_of(runs, args.dtype), divergence_notes(runs)
    report = build_report(args, runs, data, trainers, failures, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_bn_paper(report, args.out / "bn_paper.png")
    report["timings"]["wall_s"] = time.perf_counter() - wall_start
    write_report(report, args.out / "bn_paper.json")
    console.print(
        f"wrote {args.out / 'bn_paper.json'} and {args.out / 'bn_paper.png'} ({report['timings']['wall_s']:.1f} s)"
    )
    return print_outcome(console, failures, "the two sides agree within every tolerance", notes)
