"""``vmap-bn-train-jax``: train the per-example JAX model alone on MNIST and draw its test accuracy.

    vmap-bn-train-jax [--epochs 10] [--batch-size 128] [--dtype float32|float64] [--out output.png] ...

The training is :class:`jaxside.train.Trainer` on the batch order and schedule every run shares
(:mod:`compare.contract.training`); after each epoch the test accuracy, with a progress bar.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import jax
import matplotlib.pyplot as plt
import numpy as np
from rich.progress import Progress

from compare import contract
from compare.contract import training
from compare.contract.init import init_params, init_state
from compare.mnist import load_mnist
from compare.plot import accuracy_figure
from jaxside.train import Trainer


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def train(params, state, data, *, epochs, batch_size, lr, momentum, seed, progress=True) -> tuple[Trainer, History]:
    """Train for ``epochs`` on ``data = (train_x, train_y, test_x, test_y)``; test after each epoch."""
    train_x, train_y, test_x, test_y = data
    trainer = Trainer(params, state, train_x, train_y, momentum=momentum)
    schedule = training.LearningRateSchedule(lr, epochs * (len(train_x) // batch_size))
    test_images = contract.check_images(test_x, trainer.dtype)
    test_labels = contract.check_labels(test_y, len(test_x))
    rng = training.batch_rng(seed)
    history = History()
    with Progress(disable=not progress) as bar:
        task = bar.add_task("jax train", total=epochs)
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            batches = training.epoch_batches(len(train_x), batch_size, rng)
            losses = trainer.epoch(batches, schedule.for_epoch(epoch - 1, len(batches)))
            correct = int(np.sum(trainer.predict(test_images) == test_labels))
            history.seconds.append(time.perf_counter() - start)
            history.train_loss.append(float(losses.mean()))
            history.test_accuracy.append(correct / len(test_x))
            description = f"jax train: loss {history.train_loss[-1]:.4f}, test acc {history.test_accuracy[-1]:.2%}"
            bar.update(task, advance=1, description=description)
    return trainer, history


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmap-bn-train-jax", description="Train the per-example JAX MLP with batch norm on MNIST."
    )
    parser.add_argument("--epochs", type=int, default=training.DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=training.DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=training.DEFAULT_LR)
    parser.add_argument("--momentum", type=float, default=training.DEFAULT_MOMENTUM)
    parser.add_argument("--seed", type=int, default=training.DEFAULT_SEED)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="output.png", help="accuracy graph (PNG)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.batch_size < (1 if args.no_batch_norm else 2):
        parser.error("--batch-size must be at least 2 with batch norm (a batch of one has no variance)")

    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    *data, source = load_mnist(args.data_dir, return_source=True)
    print(f"MNIST: {source}")
    batch_norm = not args.no_batch_norm
    params = init_params(args.seed, args.dtype, batch_norm=batch_norm)
    state = init_state(args.dtype, batch_norm)
    _, history = train(
        params,
        state,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        seed=args.seed,
    )
    for epoch, (loss, acc, sec) in enumerate(zip(history.train_loss, history.test_accuracy, history.seconds), 1):
        print(f"epoch {epoch:2d}  train loss {loss:.4f}  test accuracy {acc:.2%}  ({sec:.2f} s)")

    fig = accuracy_figure(history.test_accuracy, f"Per-example JAX MLP, batch norm {'on' if batch_norm else 'off'}")
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
