"""Per-example gradients under batch norm, measured on one MNIST batch.

    python -m compare.per_example [--batch 128] [--dtype float64] [--seed 0] [--heatmap-batch 16] [--out DIR]

``g_b`` is ``per_example_grads`` (JAX: ``vmap`` of ``grad`` of one example's loss; NumPy: the per-row
terms of the handwritten backward). ``J_b`` is row ``b`` of ``jax.jacrev`` of the vector of
per-example losses. For every parameter the table shows: the two sides' agreement, ``sum_b g_b``
against ``B`` times the batch gradient, how far ``J_b`` is from ``g_b``, and the leakage: how much
``g_j`` (and ``J_j``) moves when one other example is replaced, with batch norm in training mode,
without batch norm, and in eval mode. ``per_example.png`` shows the leakage between every pair of
examples of a small batch. Exit status 0 when every check holds, 1 otherwise.
The derivation: ``docs/per_example_gradients.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from compare import tolerances
from compare.contract import N_INPUTS
from compare.contract.init import init_params, init_state
from compare.metrics import RELATIVE_ERROR_FORMULA, max_rel_err
from compare.mnist import load_mnist
from compare.studies.jaxpr import FORWARD, by_direction, highlighted, is_named_collective, phrase
from jaxside import model as jax_model
from jaxside.layers import BATCH_AXIS
from numpyside import model as numpy_model
from numpyside.backend import DEFAULT_BACKEND

Grads = list[dict[str, np.ndarray]]


@jax.jit
def _loss_jacobian_rows(params, state, images, labels):
    def losses(p):
        def one(image_vector, label):
            return jax_model.example_loss(p, state, image_vector, label, train=True)[0]

        return jax.vmap(one, axis_name=BATCH_AXIS)(images, labels)

    return jax.jacrev(losses)(params)


def loss_jacobian_rows(params, state, images, labels) -> Grads:
    r"""Rows of ``jax.jacrev`` of the per-example losses (training mode): ``J_b = d loss_b / d theta``
    with the batch statistics differentiated too. Leaves ``(B, *shape)``; ``sum_b J_b`` is the
    gradient of ``sum_b loss_b``, like ``sum_b g_b``."""
    state = list(state or [])
    return jax_model.to_numpy(_loss_jacobian_rows(params, state, np.asarray(images), np.asarray(labels, np.int32)))


def leaves(grads: Grads) -> list[tuple[str, np.ndarray]]:
    """``("layer i key", leaf)`` in layout order."""
    return [(f"layer {i} {key}", layer[key]) for i, layer in enumerate(grads) for key in sorted(layer)]


def flat_rows(grads: Grads) -> np.ndarray:
    """All parameters of each example in one row: ``(B, n_params)``."""
    return np.concatenate([leaf.reshape(leaf.shape[0], -1) for _, leaf in leaves(grads)], axis=1)


def row_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``||a_j - b_j|| / ||b_j||`` per example ``j`` (Euclidean norms over the row; ``b`` the reference)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    scale = np.linalg.norm(b, axis=1)
    return np.linalg.norm(a - b, axis=1) / np.where(scale > 0, scale, 1.0)


def leakage(before: np.ndarray, after: np.ndarray, changed: int) -> float:
    """``max_{j != changed} ||after_j - before_j|| / ||before_j||``: how far the other examples'
    per-example gradients moved when example ``changed`` was replaced. Exactly 0 means bit for bit."""
    return float(np.delete(row_distance(after, before), changed).max())


def replaced(images: np.ndarray, labels: np.ndarray, k: int, image, label) -> tuple[np.ndarray, np.ndarray]:
    """The batch with example ``k`` replaced by ``(image, label)``."""
    images, labels = images.copy(), labels.copy()
    images[k], labels[k] = image, label
    return images, labels


def leakage_matrix(per_example: Callable, images, labels, spare_images, spare_labels) -> np.ndarray:
    """``L[j, k] = ||g_j' - g_j|| / ||g_j||`` over all parameters, where ``g'`` comes from the batch with
    example ``k`` replaced by ``spare_images[k]``; the diagonal (the changed example itself) is NaN.
    ``per_example(images, labels) -> grads`` (leaves ``(B, ...)``)."""
    before = flat_rows(per_example(images, labels))
    matrix = np.full((len(images), len(images)), np.nan)
    for k in range(len(images)):
        after = flat_rows(per_example(*replaced(images, labels, k, spare_images[k], spare_labels[k])))
        matrix[:, k] = row_distance(after, before)
        matrix[k, k] = np.nan
    return matrix


def per_example_grad_jaxprs(batch: int = 8, dtype=np.float32):
    """``(forward, vjp)`` jaxprs of ONE example's loss and of its VJP w.r.t. the parameters (batch norm
    in training mode), traced with the named axis ``"batch"`` of size ``batch`` in the axis environment.

    The forward takes ``(params, image_vector, label)``; the VJP also ``seed``, the cotangent of the
    example's loss (``jax.grad`` uses 1.0), and returns the gradients in the layout of ``params``.
    """
    params, state = init_params(0, dtype), init_state(dtype)

    def loss_of_one_example(params, image_vector, label):
        return jax_model.example_loss(params, state, image_vector, label, train=True)[0]

    def vjp_of_one_example(params, image_vector, label, seed):
        _, vjp = jax.vjp(lambda p: loss_of_one_example(p, image_vector, label), params)
        return vjp(seed)[0]

    example = (params, np.zeros(N_INPUTS, dtype), np.int32(0))
    env = [(BATCH_AXIS, batch)]
    forward = jax.make_jaxpr(loss_of_one_example, axis_env=env)(*example)
    return forward, jax.make_jaxpr(vjp_of_one_example, axis_env=env)(*example, np.dtype(dtype).type(1))


# ----------------------------------------------------------------------------------------------
# the measurement
# ----------------------------------------------------------------------------------------------


def _configurations(seed: int, dtype, images, labels) -> dict[str, tuple]:
    """``name -> (params, state, train)`` for batch norm in training mode, off, and in eval mode.
    Eval mode uses the running statistics after one training step on the batch (not 0 and 1)."""
    params, state = init_params(seed, dtype), init_state(dtype)
    stepped_state = jax_model.loss_and_grads(params, state, images, labels)[2]
    return {
        "bn train": (params, state, True),
        "bn off": (init_params(seed, dtype, batch_norm=False), [], True),
        "eval": (params, stepped_state, False),
    }


def _side_agreement(params, state, images, labels, train: bool) -> dict[str, float]:
    """numpy vs jax ``per_example_grads``, per leaf (``max|a - b| / max|b|``, b = JAX)."""
    jax_grads = jax_model.per_example_grads(params, state, images, labels, train=train)[1]
    numpy_grads = numpy_model.per_example_grads(params, state, images, labels, train=train, backend=DEFAULT_BACKEND)[1]
    return {label: max_rel_err(b, a) for (label, a), (_, b) in zip(leaves(jax_grads), leaves(numpy_grads))}


def _add_leakage(rows: dict, total: dict, column: str, before: Grads, after: Grads, changed: int) -> None:
    for (label, leaf), (_, leaf_after) in zip(leaves(before), leaves(after)):
        rows.setdefault(label, {})[column] = leakage(leaf, leaf_after, changed)
    total[column] = leakage(flat_rows(before), flat_rows(after), changed)


def measure(params_seed: int, dtype, images, labels, spare_image, spare_label, changed: int = 0) -> dict:
    """Every number of the table, per parameter (``rows``) and over all parameters (``all``).

    Example ``changed`` is replaced by ``(spare_image, spare_label)`` for the leakage columns.
    """
    configs = _configurations(params_seed, dtype, images, labels)
    batch = len(images)
    changed_batch = replaced(images, labels, changed, spare_image, spare_label)
    rows: dict[str, dict] = {}
    total: dict[str, float] = {}

    # batch norm in training mode: the two sides, the sums, the jacrev rows
    params, state, _ = configs["bn train"]
    agreement = _side_agreement(params, state, images, labels, train=True)
    g = jax_model.per_example_grads(params, state, images, labels)[1]
    jac = loss_jacobian_rows(params, state, images, labels)
    batch_grads = jax_model.loss_and_grads(params, state, images, labels)[1]
    for (label, g_leaf), (_, jac_leaf), (_, batch_leaf) in zip(leaves(g), leaves(jac), leaves(batch_grads)):
        rows[label] = {
            "numpy vs jax": agreement[label],
            "sum g vs B grad": max_rel_err(g_leaf.sum(axis=0), batch * batch_leaf),
            "sum J vs B grad": max_rel_err(jac_leaf.sum(axis=0), batch * batch_leaf),
            "J vs g": float(row_distance(jac_leaf, g_leaf).max()),
        }
    for column in ("numpy vs jax", "sum g vs B grad", "sum J vs B grad"):
        total[column] = max(row[column] for row in rows.values())
    total["J vs g"] = float(row_distance(flat_rows(jac), flat_rows(g)).max())

    # leakage: g in all three modes, J with batch norm in training mode
    for name, (p, s, train) in configs.items():
        before = jax_model.per_example_grads(p, s, images, labels, train=train)[1]
        after = jax_model.per_example_grads(p, s, *changed_batch, train=train)[1]
        _add_leakage(rows, total, f"leak {name}", before, after, changed)
    _add_leakage(rows, total, "leak jacrev", jac, loss_jacobian_rows(params, state, *changed_batch), changed)

    agreement_other = {
        name: max(_side_agreement(p, s, images, labels, train).values())
        for name, (p, s, train) in configs.items()
        if name != "bn train"
    }
    return {"rows": rows, "all": total, "agreement_other": agreement_other, "batch": batch, "dtype": str(dtype)}


def failures(result: dict) -> list[str]:
    """The checks that do not hold (empty: all do)."""
    dtype = np.dtype(result["dtype"])
    total, problems = result["all"], []
    tol, sum_tol = tolerances.STEP0[dtype], tolerances.PER_EXAMPLE_SUM[dtype]
    if total["numpy vs jax"] > tol or max(result["agreement_other"].values()) > tol:
        problems.append(f"numpy and jax per-example gradients differ by more than {tol:g}")
    for key in ("sum g vs B grad", "sum J vs B grad"):
        if total[key] > sum_tol:
            problems.append(f"{key}: {total[key]:.2e} > {sum_tol:g}")
    for name in ("bn off", "eval"):
        if total[f"leak {name}"] != 0:
            problems.append(f"leakage with {name} is {total[f'leak {name}']:.2e}, not exactly 0")
    return problems


COLUMNS = (
    ("numpy vs jax", "np vs jax"),
    ("sum g vs B grad", "Σg_b vs B∇L"),
    ("J vs g", "|J_b-g_b|/|g_b|"),
    ("leak bn train", "leak g BN"),
    ("leak jacrev", "leak J BN"),
    ("leak bn off", "leak g noBN"),
    ("leak eval", "leak g eval"),
)


def _cell(value: float | None) -> str:
    if value is None:
        return "—"
    return "0" if value == 0 else f"{value:.1e}"


def table(result: dict) -> Table:
    t = Table(
        title=(
            f"Per-example gradients on one MNIST batch (B = {result['batch']}, {result['dtype']}); "
            f"errors {RELATIVE_ERROR_FORMULA} per leaf, distances max_b |a_b - b_b| / |b_b|, "
            "leakage max_(j != k) |g_j' - g_j| / |g_j| when example k is replaced"
        )
    )
    t.add_column("parameter", no_wrap=True)
    for _, header in COLUMNS:
        t.add_column(header, justify="right", no_wrap=True)
    for label, row in sorted(result["rows"].items()):
        t.add_row(label, *(_cell(row.get(key)) for key, _ in COLUMNS))
    t.add_section()
    t.add_row("all parameters", *(_cell(result["all"].get(key)) for key, _ in COLUMNS))
    return t


def plot_leakage(matrices: dict[str, np.ndarray], zero_note: str, path: Path) -> None:
    """One heat map per decomposition: ``L[j, k]`` on one linear colour scale, the diagonal blank."""
    vmax = max(float(np.nanmax(m)) for m in matrices.values())
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.3 * len(matrices) + 1, 4.2), constrained_layout=True)
    for ax, (title, matrix) in zip(np.atleast_1d(axes), matrices.items()):
        image = ax.imshow(matrix, vmin=0, vmax=vmax, cmap="viridis")
        ax.set(title=title, xlabel="k: the example replaced", ylabel="j: whose gradient moved")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes, label="|v_j' - v_j| / |v_j|  (v = g or J)")
    fig.suptitle(f"Leakage between the examples of one batch, batch norm in training mode\n({zero_note})", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmaps(seed: int, dtype, images, labels, spare_images, spare_labels) -> tuple[dict[str, np.ndarray], str]:
    """Leakage matrices of ``g`` and ``J`` with batch norm in training mode, and the largest entry of
    the same matrix for ``g`` without batch norm and in eval mode (exactly 0 when nothing leaks)."""
    configs = _configurations(seed, dtype, images, labels)
    params, state, _ = configs["bn train"]

    def grads_of(p, s, train):
        return lambda x, y: jax_model.per_example_grads(p, s, x, y, train=train)[1]

    matrices = {
        "g_b = vmap(grad(loss_b))": leakage_matrix(
            grads_of(*configs["bn train"]), images, labels, spare_images, spare_labels
        ),
        "J_b = rows of jacrev(losses)": leakage_matrix(
            lambda x, y: loss_jacobian_rows(params, state, x, y), images, labels, spare_images, spare_labels
        ),
    }
    zeros = {
        name: np.nanmax(leakage_matrix(grads_of(*configs[name]), images, labels, spare_images, spare_labels))
        for name in ("bn off", "eval")
    }
    note = "the same for g: " + ", ".join(f"{name} max {_cell(value)}" for name, value in zeros.items())
    return matrices, note


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmap-bn-per-example",
        description="Per-example gradients under batch norm: vmap(grad) vs jacrev rows, both sides, leakage.",
    )
    parser.add_argument("--batch", type=int, default=128, help="examples in the batch of the table (default 128)")
    parser.add_argument("--heatmap-batch", type=int, default=16, help="examples in the heat map's batch (default 16)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--seed", type=int, default=0, help="initial parameters and the batch drawn from MNIST")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the four MNIST IDX .gz files")
    parser.add_argument("--out", type=Path, default=Path("."), help="where per_example.png goes")
    parser.add_argument(
        "--jaxpr", action="store_true", help="only print the jaxpr of one example's gradient and its collectives"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 2 or args.heatmap_batch < 2:
        build_parser().error("--batch and --heatmap-batch must be at least 2 (batch norm's variance)")
    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    dtype = np.dtype(args.dtype)
    if args.jaxpr:
        console = Console(highlight=False, soft_wrap=True)
        forward, vjp = per_example_grad_jaxprs(dtype=dtype)
        counts = by_direction(forward, vjp, is_named_collective)
        console.print(highlighted(vjp, sum(counts[FORWARD].values())), end="")
        for direction, counter in counts.items():
            console.print(f"{direction + ':':9} {phrase(counter, 'collective')}")
        return 0
    train_images, train_labels, _, _ = load_mnist(args.data_dir)
    picked = np.random.default_rng(args.seed).choice(len(train_images), args.batch + args.heatmap_batch, replace=False)
    images, labels = train_images[picked[: args.batch]].astype(dtype), train_labels[picked[: args.batch]]
    spare_images, spare_labels = train_images[picked[args.batch :]].astype(dtype), train_labels[picked[args.batch :]]

    console = Console()
    if console.width < 116:  # the table needs 116 columns; a pipe or a narrow terminal would fold it
        console = Console(width=116)
    result = measure(args.seed, dtype, images, labels, spare_images[0], spare_labels[0])
    console.print(table(result))
    others = ", ".join(f"{name} {value:.1e}" for name, value in result["agreement_other"].items())
    console.print(
        f"numpy vs jax in the other modes (max over leaves): {others}; sum_b J_b vs B * grad: "
        f"{result['all']['sum J vs B grad']:.1e}. BN off has biases instead of gamma/beta (in 'all parameters')."
    )

    small = slice(0, args.heatmap_batch)
    matrices, note = heatmaps(args.seed, dtype, images[small], labels[small], spare_images, spare_labels)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "per_example.png"
    plot_leakage(matrices, note, path)
    console.print(f"heat map: {path} ({note})")

    problems = failures(result)
    for problem in problems:
        console.print(f"[red]FAILED[/red]: {problem}")
    if not problems:
        console.print("all checks hold")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
