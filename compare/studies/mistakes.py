"""The classic wrong batch-norm backwards, each put in place of the correct one, and what it does.

    python -m compare.mistakes [--epochs 1] [--dtype float32] [--quick] [--out DIR]

For the correct backward and each mistake of :data:`numpyside.mistakes.BATCHNORM_BACKWARD`:

* **dx vs JAX**: one batch-norm layer on the pre-activations of a batch of MNIST images (float64,
  the initial first-layer weights, a fixed random ``dout``, the initial running statistics 0 and 1),
  the mistaken ``dx`` against ``jax.vjp`` of ``jaxside.layers.batchnorm_train`` under ``vmap``:
  ``max|a - b| / max|b|``;
* **one step**: the whole network's loss on the first batch before and after one plain SGD step
  along the mistaken gradient (the forward is right in every case; only the gradient is wrong);
* **training**: ``numpyside.train.Trainer`` with the mistake in place for ``--epochs`` epochs from
  the same initial parameters on the same batches; the test accuracy (eval mode) along the way.

A table on the console and ``mistakes.png`` (the accuracy curves) in ``--out``. Exit status 0 when
the correct backward agrees with JAX to :data:`DX_TOLERANCE` and every mistake is farther than
that, 1 otherwise. The derivation and the mistakes in it: ``docs/batchnorm_backward.md`` §9.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import matplotlib
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compare import tolerances
from compare.contract import training
from compare.contract.init import init_params, init_state
from compare.metrics import RELATIVE_ERROR_FORMULA, max_rel_err
from compare.mnist import load_mnist
from jaxside.layers import BATCH_AXIS, batchnorm_train
from numpyside import layers, model
from numpyside.mistakes import BATCHNORM_BACKWARD, MISTAKES, Mistake, installed
from numpyside.train import Trainer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: The correct backward against JAX, float64, one layer: :data:`compare.tolerances.BATCHNORM_DX`
#: (the value and its reason are there).
DX_TOLERANCE = tolerances.BATCHNORM_DX[np.dtype(np.float64)]
#: ``--quick``: training and test images, and evaluations per run (a test's seconds).
QUICK_TRAIN, QUICK_TEST = 1024, 500
#: Test-accuracy evaluations per epoch (the points of the curves).
EVALUATIONS_PER_EPOCH = 12
CORRECT = "correct"
TABLE_WIDTH = 124


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compare.mistakes",
        description="Put each classic wrong batch-norm backward in place of the correct one and show what "
        "the comparison with JAX, one SGD step and one epoch of training make of it.",
    )
    parser.add_argument("--epochs", type=int, default=1, help="epochs of training per backward (default 1)")
    parser.add_argument("--batch-size", type=int, default=training.DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=training.DEFAULT_LR, help="base learning rate (cosine decay)")
    parser.add_argument("--momentum", type=float, default=training.DEFAULT_MOMENTUM)
    parser.add_argument("--seed", type=int, default=training.DEFAULT_SEED)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="training dtype")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN} training and {QUICK_TEST} test images")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for mistakes.png (default: here)")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST folder (default: MNIST_DIR or data/mnist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def backwards() -> dict[str, Mistake | None]:
    """The rows: the correct backward (None: nothing replaced), then the classic mistakes."""
    return {CORRECT: None, **{name: MISTAKES[name] for name in BATCHNORM_BACKWARD}}


# ----------------------------------------------------------------------------------------------
# dx of one layer against JAX
# ----------------------------------------------------------------------------------------------


def jax_layer_dx(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """``dx`` of the per-example ``jaxside.layers.batchnorm_train`` under ``vmap``, by ``jax.vjp``."""

    def layer(x):
        return jax.vmap(lambda x_b: batchnorm_train(x_b, gamma, beta)[0], axis_name=BATCH_AXIS)(x)

    return np.asarray(jax.vjp(layer, x)[1](dout)[0])


def dx_errors(images: np.ndarray, seed: int) -> dict[str, float]:
    """Relative error of each backward's ``dx`` against JAX on one layer (float64, module docstring)."""
    params, state = init_params(seed, np.float64), init_state(np.float64)
    x = images.astype(np.float64) @ params[0]["weight"]
    gamma, beta = params[0]["gamma"], params[0]["beta"]
    dout = np.random.default_rng([seed, 2]).standard_normal(x.shape)
    reference = jax_layer_dx(x, gamma, beta, dout)
    _, cache = layers.batchnorm_forward(x, gamma, beta)
    running_mean, running_var = state[0]["mean"], state[0]["var"]
    errors = {}
    for name, mistake in backwards().items():
        if mistake is None:
            dx = layers.batchnorm_backward(dout, cache)[0]
        else:
            dx = mistake.layer_backward(dout, cache, running_mean, running_var)[0]
        errors[name] = max_rel_err(dx, reference)
    return errors


def in_place(mistake: Mistake | None):
    """The mistake installed in numpyside.model for a ``with`` block; nothing for the correct backward."""
    return installed(mistake) if mistake else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# one step, and training
# ----------------------------------------------------------------------------------------------


def one_step(mistake: Mistake | None, params, state, images, labels, lr: float) -> tuple[float, float]:
    """The network's training-mode loss on ``images`` before and after one plain SGD step
    ``p <- p - lr g`` along the gradient that ``mistake`` computes (the correct one for None)."""
    with in_place(mistake):
        loss, grads, _ = model.loss_and_grads(params, state, images, labels, backend="numba")
    stepped = [
        {k: v - np.asarray(lr, v.dtype) * grads[i][k] for k, v in layer.items()} for i, layer in enumerate(params)
    ]
    after, _ = model.batch_loss(stepped, state, images, labels, backend="numba")
    return float(loss), float(after)


def train_curve(mistake: Mistake | None, setup: dict, advance) -> list[tuple[int, float]]:
    """Train from the initial parameters with ``mistake`` in place; ``(step, test accuracy)`` at the
    start and after every chunk of steps. ``advance(n)`` reports ``n`` steps done."""
    batches, rates = setup["batches"], setup["rates"]
    test_images, test_labels = setup["test"]
    chunk = max(1, len(batches) // (EVALUATIONS_PER_EPOCH * setup["epochs"]))
    with in_place(mistake):
        trainer = Trainer(setup["params"], setup["state"], *setup["train"], momentum=setup["momentum"], backend="numba")
        curve = [(0, float(np.mean(trainer.predict(test_images) == test_labels)))]
        for start in range(0, len(batches), chunk):
            with np.errstate(all="ignore"):  # a mistake may diverge: its accuracy then says so
                trainer.epoch(batches[start : start + chunk], rates[start : start + chunk])
                accuracy = float(np.mean(trainer.predict(test_images) == test_labels))
            curve.append((min(start + chunk, len(batches)), accuracy))
            advance(min(chunk, len(batches) - start))
    return curve


def training_setup(args, train_x, train_y, test_x, test_y) -> dict:
    """The shared starting point and batch plan of every run (the comparison's own defaults)."""
    dtype = np.dtype(args.dtype)
    rng = training.batch_rng(args.seed)
    plans = [training.epoch_batches(len(train_x), args.batch_size, rng) for _ in range(args.epochs)]
    batches = np.concatenate(plans)
    rates = training.LearningRateSchedule(args.lr, len(batches)).for_epoch(0, len(batches))
    return {
        "params": init_params(args.seed, dtype),
        "state": init_state(dtype),
        "train": (train_x.astype(dtype), train_y),
        "test": (test_x.astype(dtype), test_y),
        "batches": batches,
        "rates": rates.astype(dtype),
        "momentum": args.momentum,
        "epochs": args.epochs,
        "lr": args.lr,
    }


def run(args, progress=None) -> dict:
    """Every number of the table and the curves, per backward (``rows``), with the setup."""
    train_x, train_y, test_x, test_y = load_mnist(args.data_dir)
    if args.quick:
        train_x, train_y, test_x, test_y = (
            train_x[:QUICK_TRAIN],
            train_y[:QUICK_TRAIN],
            test_x[:QUICK_TEST],
            test_y[:QUICK_TEST],
        )
    setup = training_setup(args, train_x, train_y, test_x, test_y)
    first = setup["batches"][0]
    errors = dx_errors(train_x[first], args.seed)
    rows = {}
    task = (
        progress.add_task("training", total=len(setup["batches"]) * len(backwards()), status="") if progress else None
    )
    for name, mistake in backwards().items():
        if progress:
            progress.update(task, status=name)
        before, after = one_step(
            mistake, setup["params"], setup["state"], setup["train"][0][first], train_y[first], args.lr
        )
        curve = train_curve(mistake, setup, lambda n: progress.advance(task, n) if progress else None)
        title = "the correct backward" if mistake is None else mistake.title
        rows[name] = {
            "title": title,
            "dx_error": errors[name],
            "loss_before": before,
            "loss_after": after,
            "curve": curve,
        }
    return {"rows": rows, "steps": len(setup["batches"]), "train_images": len(train_x), "test_images": len(test_x)}


def table(result: dict, args) -> Table:
    steps = result["steps"]
    out = Table(
        title=f"Each backward in place of the correct one: {args.dtype}, batch {args.batch_size}, "
        f"{result['train_images']} training images, {steps} steps",
        caption=f"dx vs JAX: one layer, float64, {RELATIVE_ERROR_FORMULA}; one step: the whole network's loss on "
        f"the first batch before -> after one SGD step (lr {args.lr}); accuracy on {result['test_images']} test images",
    )
    out.add_column("backward")
    out.add_column("dx vs JAX", justify="right")
    out.add_column("one step: loss", justify="right")
    out.add_column("reduces it?", justify="center")
    out.add_column(f"test accuracy after {args.epochs} epoch{'s' if args.epochs > 1 else ''}", justify="right")
    for row in result["rows"].values():
        reduces = row["loss_after"] < row["loss_before"]
        out.add_row(
            row["title"],
            f"{row['dx_error']:.1e}",
            f"{row['loss_before']:.4f} -> {row['loss_after']:.4f}",
            "yes" if reduces else "[red]no[/red]",
            f"{100 * row['curve'][-1][1]:.2f} %",
        )
    return out


def plot(result: dict, path: Path) -> None:
    """``mistakes.png``: test accuracy along training, the correct backward and each mistake."""
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for name, row in result["rows"].items():
        steps, accuracy = zip(*row["curve"])
        # the correct curve wide and pale underneath, so that a mistake that trains as well stays visible on it
        style = dict(color="black", linewidth=6, alpha=0.3) if name == CORRECT else dict(linewidth=1.5, marker=".")
        ax.plot(steps, [100 * a for a in accuracy], label=f"{row['title']} ({100 * accuracy[-1]:.1f} %)", **style)
    ax.set(xlabel="SGD step", ylabel="test accuracy (%)", ylim=(0, 100))
    ax.set_title("The correct batch-norm backward against the classic mistakes", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="after the last step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def failures(result: dict) -> list[str]:
    rows = result["rows"]
    problems = []
    if not rows[CORRECT]["dx_error"] <= DX_TOLERANCE:
        problems.append(f"the correct backward differs from JAX by {rows[CORRECT]['dx_error']:.1e} > {DX_TOLERANCE:g}")
    problems += [
        f"{row['title']}: dx within {DX_TOLERANCE:g} of JAX, the mistake does not show"
        for name, row in rows.items()
        if name != CORRECT and not row["dx_error"] > DX_TOLERANCE
    ]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be at least 1 and --batch-size at least 2 (batch norm's variance)")
    jax.config.update("jax_enable_x64", True)  # the dx column is float64 (jaxside.layers says why)
    console = Console()
    if console.width < TABLE_WIDTH:  # a pipe or a narrow terminal would fold the table's rows
        console = Console(width=TABLE_WIDTH)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    start = time.perf_counter()
    with Progress(*columns, TextColumn("{task.fields[status]}"), console=console, disable=args.no_progress) as bar:
        result = run(args, bar)
    console.print(table(result, args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "mistakes.png"
    plot(result, path)
    console.print(f"accuracy curves: {path}; wall time {time.perf_counter() - start:.1f} s")
    problems = failures(result)
    for problem in problems:
        console.print(f"[red]FAILED[/red]: {problem}")
    return 1 if problems else 0
