r"""Why batch norm at all: the MNIST experiment of Ioffe & Szegedy (2015, §4.1, Figure 1), on both sides.

    python -m compare.bn_paper [--lr 0.01] [--init-std 0.05] [--steps 50000] [--batch-size 60]
                               [--eval-every 500] [--seed 0] [--dtype float32] [--out .] [--quick]

Four models: {JAX side, NumPy side} x {with, without batch norm}, the project's network
784 -> 100 -> 100 -> 100 -> 10 with sigmoid hidden units. Hidden layer with batch norm
``z = g(BN(W u))`` (no bias: ``beta`` takes its role), without ``z = g(W u + b)``. All four start
from the same weights ``N(0, init_std^2)`` (:func:`compare.init.init_params`), biases 0, and train
on the same batches (:func:`compare.training.epoch_batches`, epoch after epoch) with plain SGD
``p <- p - lr * grad`` at a constant rate: the sides' own trainers with momentum 0
(``v <- 0 * v + g`` is ``g`` exactly). The JAX side runs the steps between two evaluations as one
jitted ``lax.scan`` (:class:`jaxside.train.Trainer`), the NumPy side with
:class:`numpyside.fast.FastTrainer`.

Every ``--eval-every`` steps, in eval mode (running statistics), over the test images: the test
accuracy, and the 15th/50th/85th percentiles of the input to one sigmoid of the last hidden layer
(:data:`UNIT`), ``gamma * x_hat + beta`` with batch norm, ``W u + b`` without; the same percentiles
over all units of that layer pooled are the second view. Output: ``bn_paper.png`` (the paper's
Figure 1 layout), ``bn_paper.json``, a table; exit status 0, 1 if the sides disagree beyond
:data:`TOLERANCES`, 2 for bad arguments. Results and discussion: ``docs/bn_paper.md``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compare import training
from compare.contract import N_HIDDEN_LAYERS
from compare.metrics import RELATIVE_ERROR_FORMULA, max_abs_err, max_rel_err

SIDES = ("jax", "numpy")
#: The two networks, by their key in ``bn_paper.json``.
NETWORKS = {"no_batch_norm": False, "batch_norm": True}
#: The sigmoid of the last hidden layer whose input is followed. Fixed before training, as the
#: paper's "typical sigmoid": the units of a layer are exchangeable at the start (i.i.d. weights,
#: equal biases, gammas and betas), so no index is special, and choosing one after seeing the
#: curves would pick the most striking unit instead of a typical one. The pooled percentiles of
#: all units show whether it stays typical.
UNIT = 0
PERCENTILES = (15, 50, 85)
THRESHOLDS = (0.90, 0.95)
MNIST_TRAIN = 60_000

DEFAULTS = dict(lr=0.01, init_std=0.05, steps=50_000, batch_size=60, eval_every=500, seed=0, dtype="float32")
#: ``--quick``: the same protocol, shorter (unless --steps / --eval-every are given).
QUICK = dict(steps=300, eval_every=50)

#: How closely the two sides must agree, per dtype. Both sides compute the same formulas and differ
#: only in the order of floating-point sums (XLA vs BLAS/numba), a few ulps per operation; plain SGD
#: carries these differences along. Measured over the full default run (docs/bn_paper.md): float64
#: parameters differ by ~1e-13 after 50,000 steps, float32 ones by ~1e-5. ``max_param_diff`` and
#: ``percentiles`` are normwise relative errors (:func:`compare.metrics.max_rel_err`, over all
#: parameters / all evaluations); ``accuracy`` is the largest difference of the two sides' test
#: accuracies at any evaluation: in float32 a test image within rounding distance of a decision
#: boundary may flip (allowed for 0.2 % of the test set), in float64 none does.
TOLERANCES = {
    "float32": {"accuracy": 0.002, "percentiles": 1e-3, "max_param_diff": 1e-3},
    "float64": {"accuracy": 0.0, "percentiles": 1e-9, "max_param_diff": 1e-9},
}
#: The reason, one line per dtype, printed under the agreement table and written to the JSON.
TOLERANCE_REASON = {
    "float32": "Same formulas, sums in another order: float32 rounding (1.2e-7 per operation) that 50,000 SGD "
    "steps carry along; tolerances far above the differences measured, far below a wrong formula's.",
    "float64": "Same formulas, sums in another order: float64 rounding (2.2e-16 per operation) that 50,000 SGD "
    "steps carry along; tolerances far above the differences measured, far below a wrong formula's.",
}


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
    add("--init-std", type=positive_float, default=d["init_std"], help="std of the N(0, std^2) weights (%(default)s)")
    add("--steps", type=_number(int, minimum=1, inclusive=True, what="a positive integer"), default=d["steps"])
    add(
        "--batch-size",
        type=_number(int, minimum=2, inclusive=True, what="an integer of at least 2 (batch norm needs a variance)"),
        default=d["batch_size"],
    )
    add(
        "--eval-every",
        type=_number(int, minimum=1, inclusive=True, what="a positive integer"),
        default=d["eval_every"],
        help="evaluate on the test set every N steps (default %(default)s)",
    )
    add("--seed", type=_number(int, minimum=0, inclusive=True, what="a non-negative integer"), default=d["seed"])
    add("--dtype", choices=["float32", "float64"], default=d["dtype"])
    add("--out", type=Path, default=Path("."), help="folder for bn_paper.json and bn_paper.png")
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
# training and evaluation
# ------------------------------------------------------------------------------------------------


def batch_plan(n_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` training indices: the project's shuffled epochs, one after another."""
    rng = training.batch_rng(seed)
    epochs, total = [], 0
    while total < steps:
        epochs.append(training.epoch_batches(n_examples, batch_size, rng))
        total += len(epochs[-1])
    return np.concatenate(epochs)[:steps]


def evaluation_steps(steps: int, eval_every: int) -> list[int]:
    """0, eval_every, 2 eval_every, ..., and ``steps`` itself."""
    return [*range(0, steps, eval_every), steps]


def _jax_evaluator():
    import jax
    import jax.numpy as jnp

    from jaxside import model

    @jax.jit
    def evaluate(params, state, images):
        """Predicted classes and the last hidden layer's sigmoid inputs, one jitted forward pass."""
        logits, pre_activations = model.eval_logits_and_pre_activations(params, state, images)
        return jnp.argmax(logits, axis=-1), pre_activations[N_HIDDEN_LAYERS - 1]

    return evaluate


def make_sides(params, state, train_x, train_y, test_x):
    """Per side: a trainer (momentum 0: plain SGD) and ``evaluate() -> (predictions, last pre-activations)``."""
    import jax

    from jaxside.train import Trainer
    from numpyside import model as numpy_model
    from numpyside.fast import FastTrainer

    jax_trainer = Trainer(params, state, train_x, train_y, momentum=0.0)
    numpy_trainer = FastTrainer(params, state, train_x, train_y, momentum=0.0)
    jax_evaluate, test_on_device = _jax_evaluator(), jax.device_put(test_x)

    def evaluate_jax():
        predictions, pre = jax_evaluate(jax_trainer.params, jax_trainer.state, test_on_device)
        return np.asarray(predictions), np.asarray(pre)

    def evaluate_numpy():
        logits, pre_activations = numpy_model.eval_logits_and_pre_activations(
            numpy_trainer.params, numpy_trainer.state, test_x, backend=numpy_trainer.backend
        )
        return np.argmax(logits, axis=-1), pre_activations[N_HIDDEN_LAYERS - 1]

    return {"jax": (jax_trainer, evaluate_jax), "numpy": (numpy_trainer, evaluate_numpy)}


def new_record() -> dict:
    per_side = lambda: {side: [] for side in SIDES}  # noqa: E731
    return {
        "steps": [],
        "test_accuracy": per_side(),
        "percentiles": per_side(),
        "percentiles_all_units": per_side(),
        "seconds": dict.fromkeys(SIDES, 0.0),
        "predictions": {},
    }


def record_evaluation(record: dict, step: int, sides: dict, test_y: np.ndarray) -> None:
    """Evaluate both sides now and append to ``record``."""
    record["steps"].append(step)
    for side, (_, evaluate) in sides.items():
        predictions, pre = evaluate()
        record["predictions"][side] = predictions
        record["test_accuracy"][side].append(float(np.mean(predictions == test_y)))
        pre = pre.astype(np.float64)
        record["percentiles"][side].append(np.percentile(pre[:, UNIT], PERCENTILES).tolist())
        record["percentiles_all_units"][side].append(np.percentile(pre, PERCENTILES).tolist())


def train_lockstep(args, data, console: Console) -> tuple[dict, dict]:
    """Both networks on both sides, segment by segment on the same batches; returns the records
    and the trainers (by network, then side)."""
    from compare.init import init_params, init_state

    train_x, train_y, test_x, test_y = data
    plan = batch_plan(len(train_x), args.batch_size, args.steps, args.seed)
    stops = evaluation_steps(args.steps, args.eval_every)
    networks, records = {}, {}
    for name, batch_norm in NETWORKS.items():
        params = init_params(args.seed, args.dtype, batch_norm, weight_std=args.init_std)
        networks[name] = make_sides(params, init_state(args.dtype, batch_norm), train_x, train_y, test_x)
        for trainer, _ in networks[name].values():
            trainer.compile(min(args.eval_every, args.steps), args.batch_size)
        records[name] = new_record()
        record_evaluation(records[name], 0, networks[name], test_y)
    columns = (
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console) as progress:
        tasks = {name: progress.add_task(name.replace("_", " "), total=args.steps, status="") for name in NETWORKS}
        for start, stop in itertools.pairwise(stops):
            rates = np.full(stop - start, args.lr)
            for name, sides in networks.items():
                for side, (trainer, _) in sides.items():
                    began = time.perf_counter()
                    trainer.epoch(plan[start:stop], rates)
                    records[name]["seconds"][side] += time.perf_counter() - began
                record_evaluation(records[name], stop, sides, test_y)
                accuracy = records[name]["test_accuracy"]
                status = f"test acc jax {accuracy['jax'][-1]:.2%}  numpy {accuracy['numpy'][-1]:.2%}"
                progress.update(tasks[name], completed=stop, status=status)
    trainers = {name: {side: trainer for side, (trainer, _) in sides.items()} for name, sides in networks.items()}
    return records, trainers


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------


def steps_to(steps: list[int], accuracies: list[float], threshold: float) -> int | None:
    """The first evaluated step with test accuracy >= ``threshold`` (None if never)."""
    return next((s for s, a in zip(steps, accuracies) if a >= threshold), None)


def _tree_leaves(tree) -> list[np.ndarray]:
    return [np.asarray(layer[key]) for layer in tree for key in sorted(layer)]


def summarise(record: dict, trainers: dict, dtype: str) -> dict:
    """One network's RUN entry of ``bn_paper.json``, with the sides' agreement and its verdict."""
    steps, acc = record["steps"], record["test_accuracy"]
    params = {side: trainer.params_numpy() for side, trainer in trainers.items()}
    states = {side: trainer.state_numpy() for side, trainer in trainers.items()}
    leaves = {side: _tree_leaves(params[side]) for side in SIDES}
    jax_leaves, numpy_leaves = leaves["jax"], leaves["numpy"]
    param_diff = max(max_abs_err(a, b) for a, b in zip(jax_leaves, numpy_leaves))
    param_scale = max(float(np.max(np.abs(b))) for b in numpy_leaves)
    state_pairs = zip(_tree_leaves(states["jax"]), _tree_leaves(states["numpy"]))
    agreement = {
        "accuracy": max(abs(a - b) for a, b in zip(acc["jax"], acc["numpy"])),
        "percentiles": max_rel_err(record["percentiles"]["jax"], record["percentiles"]["numpy"]),
        "max_param_diff": param_diff / param_scale if param_scale > 0 else param_diff,
    }
    tolerance = TOLERANCES[dtype]
    return {
        "steps": steps,
        "test_accuracy": acc,
        "percentiles": record["percentiles"],
        "final_test_accuracy": {side: acc[side][-1] for side in SIDES},
        "steps_to": {f"{t:.2f}": _first_of_both(steps, acc, t) for t in THRESHOLDS},
        "max_param_diff": param_diff,
        # more keys than the shape
        "percentiles_all_units": record["percentiles_all_units"],
        "steps_to_by_side": {side: {f"{t:.2f}": steps_to(steps, acc[side], t) for t in THRESHOLDS} for side in SIDES},
        "max_state_diff": max((max_abs_err(a, b) for a, b in state_pairs), default=0.0),
        "final_predictions_differ": int(np.sum(record["predictions"]["jax"] != record["predictions"]["numpy"])),
        "agreement": agreement,
        "agreement_ok": {key: agreement[key] <= tolerance[key] for key in agreement},
        "train_seconds": record["seconds"],
        "parameter_keys": [sorted(layer) for layer in params["numpy"]],
        "state_keys": [sorted(layer) for layer in states["numpy"]],
    }


def _first_of_both(steps, acc, threshold) -> int | None:
    """The first evaluated step at which BOTH sides have reached ``threshold``."""
    both = [min(a, b) for a, b in zip(acc["jax"], acc["numpy"])]
    return steps_to(steps, both, threshold)


def failures_of(runs: dict, dtype: str) -> list[str]:
    failures = []
    for name, run in runs.items():
        for key, ok in run["agreement_ok"].items():
            if not ok:
                failures.append(
                    f"{name}: {key} {run['agreement'][key]:.2e} > tolerance {TOLERANCES[dtype][key]:.0e} ({dtype})"
                )
    return failures


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
            name.replace("_", " "),
            f"{final['jax']:.2%}",
            f"{final['numpy']:.2%}",
            *(_steps_to_text(run, t) for t in THRESHOLDS),
        )
    return table


def agreement_table(runs: dict, dtype: str) -> Table:
    caption = f"rel err = {RELATIVE_ERROR_FORMULA}. {TOLERANCE_REASON[dtype]}"
    table = Table(title=f"JAX side vs NumPy side ({dtype}), lockstep", caption=caption)
    columns = {
        "network": "left",
        "accuracy\nmax |Δ|": "right",
        "percentiles\nrel err": "right",
        "parameters\nrel err": "right",
        "parameters\nmax |Δ|": "right",
        "ok": "center",
    }
    for column, justify in columns.items():
        table.add_column(column, justify=justify)
    for name, run in runs.items():
        agreement, ok = run["agreement"], all(run["agreement_ok"].values())
        table.add_row(
            name.replace("_", " "),
            *(f"{agreement[key]:.1e}" for key in ("accuracy", "percentiles", "max_param_diff")),
            f"{run['max_param_diff']:.1e}",
            "[green]✓[/]" if ok else "[red]✗[/]",
        )
    tolerance = TOLERANCES[dtype]
    table.add_row("tolerance", *(f"{tolerance[key]:.0e}" for key in ("accuracy", "percentiles", "max_param_diff")))
    return table


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def load_data(dtype: str, console: Console):
    from compare.mnist import load_mnist

    train_x, train_y, test_x, test_y, source = load_mnist(return_source=True)
    console.print(f"[bold]MNIST[/]: {source}")
    return train_x.astype(dtype), train_y, test_x.astype(dtype), test_y


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: status 2 for bad arguments (0 for --help)
        return int(exit_.code or 0)
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 inputs stay float32
    from compare import report as report_module
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
    failures = failures_of(runs, args.dtype)
    report = {
        "config": {**{k: getattr(args, k) for k in (*DEFAULTS, "quick")}, "out": str(args.out)},
        "batch_norm": runs["batch_norm"],
        "no_batch_norm": runs["no_batch_norm"],
        "protocol": {
            "unit": UNIT,
            "layer": N_HIDDEN_LAYERS - 1,
            "percentiles": list(PERCENTILES),
            "momentum": 0.0,
            "n_train": len(data[0]),
            "n_test": len(data[3]),
            "numpy_trainer": "FastTrainer, whole epoch in one numba call"
            if trainers["batch_norm"]["numpy"].whole_epoch
            else "FastTrainer, step by step",
        },
        "tolerances": TOLERANCES[args.dtype],
        "tolerance_reason": TOLERANCE_REASON[args.dtype],
        "passed": not failures,
        "failures": failures,
        "versions": report_module.versions(),
        "machine": report_module.machine(),
        "timings": {"wall_s": None},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot_bn_paper(report, args.out / "bn_paper.png")
    report["timings"]["wall_s"] = time.perf_counter() - wall_start
    report_module.write_report(report, args.out / "bn_paper.json")
    console.print(
        f"wrote {args.out / 'bn_paper.json'} and {args.out / 'bn_paper.png'} "
        f"(wall time {report['timings']['wall_s']:.1f} s)"
    )
    for line in failures:
        console.print(f"[bold red]FAIL[/] {line}")
    if not failures:
        console.print("[bold green]PASS[/]: the two sides agree within every tolerance")
    return 1 if failures else 0
