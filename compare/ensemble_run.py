"""``compare/run.py --ensemble M``: ``M`` members trained on both sides in lockstep, and the identity check.

Member ``k`` starts from ``init_params(seed + k)``. ``--ensemble-batches same`` (default) gives every
member the batch order of ``seed``; ``independent`` gives member ``k`` the order of ``seed + k`` (the
order a single run with ``--seed seed+k`` uses). ``--ghost-batches`` and ``--pool-members`` go to both
sides. After every epoch: each member's test accuracy on each side, the test predictions that differ
between the sides, the parameter drift, and the ensemble's accuracy (argmax of the mean of the
members' softmax). The identity check trains member 0 alone, as a single model (``jaxside.train`` /
the NumPy side's trainer), on the same batches, and compares it with member 0 of the ensemble.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from compare import training
from compare.init import init_ensemble, init_params, init_state

#: Member 0 of the ensemble against the single model trained alone (max |p_ens - p_single|). In
#: float64 the two programs differ only in how the products and sums are batched: rounding, which
#: SGD carries forward like the drift between the sides (``compare/run.py``'s DRIFT_TOLERANCE
#: reasoning); the issue's bound is 1e-12. float32: the drift tolerance, 1e-4.
IDENTITY_TOLERANCE = {"float32": 1e-4, "float64": 1e-12}
SIDES = ("jax", "numpy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ensemble's options of ``compare/run.py``."""
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


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


def _drift_per_member(params_a, params_b) -> list[float]:
    n_members = params_a[0]["weight"].shape[0]
    return [
        max(
            float(np.max(np.abs(la[k][m].astype(np.float64) - lb[k][m])))
            for la, lb in zip(params_a, params_b)
            for k in la
        )
        for m in range(n_members)
    ]


def _max_diff(params_a, params_b) -> float:
    return max(
        float(np.max(np.abs(la[k].astype(np.float64) - lb[k]))) for la, lb in zip(params_a, params_b) for k in la
    )


def run_ensemble(args: argparse.Namespace, data, console: Console) -> dict:
    """Train the ensemble on both sides (and member 0 alone, for the identity check); print the
    tables; return the report's ``"ensemble"`` section (with its own ``"failures"``)."""
    from compare.run import DISAGREEMENT_TOLERANCE, DRIFT_TOLERANCE
    from compare.sides import jax_side, numpy_side
    from jaxside import ensemble as jax_ensemble
    from jaxside.transforms import ensemble_probabilities
    from numpyside import blas
    from numpyside import ensemble as numpy_ensemble
    from numpyside.fast_ensemble import FastEnsembleTrainer

    train_x, train_y, test_x, test_y = data
    n_members, batch_norm = args.ensemble, not args.no_batch_norm
    seeds = list(range(args.seed, args.seed + n_members))
    independent = args.ensemble_batches == "independent"
    params, state = init_ensemble(seeds, args.dtype, batch_norm)
    options = dict(momentum=args.momentum, pool_members=args.pool_members, ghost_batches=args.ghost_batches)
    fast = not (args.reference_trainer or args.pool_members or args.ghost_batches != 1 or args.backend != "numba")
    numpy_trainer = FastEnsembleTrainer if fast and blas.available() else numpy_ensemble.Trainer
    trainers = {
        "jax": jax_ensemble.Trainer(params, state, train_x, train_y, **options),
        "numpy": numpy_trainer(params, state, train_x, train_y, backend=args.backend, **options),
    }
    identity = not args.pool_members and args.ghost_batches == 1
    singles = {}
    if identity:  # member 0 alone: the single model of each side, from seed, on member 0's batches
        single_sides = {"jax": jax_side("pmean"), "numpy": numpy_side(args.backend, fast=not args.reference_trainer)}
        start_params, start_state = init_params(seeds[0], args.dtype, batch_norm), init_state(args.dtype, batch_norm)
        singles = {
            key: side.make_trainer(start_params, start_state, train_x, train_y, momentum=args.momentum)
            for key, side in single_sides.items()
        }
    steps = len(train_x) // args.batch_size
    compile_s = {key: t.compile(steps, args.batch_size, per_member_batches=independent) for key, t in trainers.items()}
    for single in singles.values():
        single.compile(steps, args.batch_size)
    schedule = training.LearningRateSchedule(args.lr, args.epochs * steps)
    rngs = [training.batch_rng(seed) for seed in (seeds if independent else seeds[:1])]
    train_s = dict.fromkeys(SIDES, 0.0)
    rows = []
    for epoch in range(args.epochs):
        orders = [training.epoch_batches(len(train_x), args.batch_size, rng) for rng in rngs]
        batches = np.stack(orders, axis=1) if independent else orders[0]
        rates = schedule.for_epoch(epoch, steps)
        losses, predictions, ensemble_predictions = {}, {}, {}
        for key, trainer in trainers.items():
            start = time.perf_counter()
            losses[key] = trainer.epoch(batches, rates).mean(axis=0, dtype=np.float64)
            train_s[key] += time.perf_counter() - start
            logits = trainer.predict_logits(test_x)
            predictions[key] = np.argmax(logits, axis=-1)
            ensemble_predictions[key] = np.argmax(ensemble_probabilities(logits), axis=-1)
        for single in singles.values():
            single.epoch(orders[0], rates)
        rows.append(
            {
                "epoch": epoch + 1,
                "train_loss": {key: losses[key].tolist() for key in SIDES},
                "test_accuracy": {key: np.mean(predictions[key] == test_y, axis=1).tolist() for key in SIDES},
                "ensemble_accuracy": {key: float(np.mean(ensemble_predictions[key] == test_y)) for key in SIDES},
                "disagreements": np.sum(predictions["jax"] != predictions["numpy"], axis=1).tolist(),
                "ensemble_disagreements": int(np.sum(ensemble_predictions["jax"] != ensemble_predictions["numpy"])),
                "max_param_drift": _drift_per_member(trainers["jax"].params_numpy(), trainers["numpy"].params_numpy()),
            }
        )
    identity_rows = []
    for key, single in singles.items():
        member0 = [{k: v[0] for k, v in layer.items()} for layer in trainers[key].params_numpy()]
        diff = _max_diff(member0, single.params_numpy())
        tol = IDENTITY_TOLERANCE[args.dtype]
        identity_rows.append(
            {"side": key, "member": 0, "seed": seeds[0], "max_abs_diff": diff, "tol": tol, "ok": diff <= tol}
        )

    samples = steps * args.batch_size * args.epochs * n_members
    timings = {
        key: {"compile_s": compile_s[key], "train_s": train_s[key], "member_samples_per_s": samples / train_s[key]}
        for key in SIDES
    }
    tolerances = {
        "max_param_drift": DRIFT_TOLERANCE[args.dtype],
        "disagreements": int(DISAGREEMENT_TOLERANCE[args.dtype] * len(test_x)),
        "identity": IDENTITY_TOLERANCE[args.dtype],
    }
    last = rows[-1]
    failures = [
        f"ensemble member {m}: max param drift {d:.2e} > tol {tolerances['max_param_drift']:.0e}"
        for m, d in enumerate(last["max_param_drift"])
        if d > tolerances["max_param_drift"]
    ]
    failures += [
        f"ensemble member {m}: {d} test predictions differ > tol {tolerances['disagreements']}"
        for m, d in enumerate(last["disagreements"])
        if d > tolerances["disagreements"]
    ]
    failures += [
        f"identity check ({r['side']}): member 0 of the ensemble is {r['max_abs_diff']:.2e} from the single model > "
        f"tol {r['tol']:.0e}"
        for r in identity_rows
        if not r["ok"]
    ]
    section = {
        "members": n_members,
        "seeds": seeds,
        "batches": args.ensemble_batches,
        "ghost_batches": args.ghost_batches,
        "pool_members": args.pool_members,
        "sides": {
            "jax": "JAX: forward_pass under vmap('member') of vmap('batch') (jaxside.ensemble)",
            "numpy": (
                "NumPy: members side by side, hand backward, an epoch per numba call "
                "(numpyside.fast_ensemble.FastEnsembleTrainer, bit-identical to numpyside.ensemble)"
                if numpy_trainer is FastEnsembleTrainer
                else f"NumPy: stacked (M, B) layers, hand backward, {args.backend} kernels (numpyside.ensemble)"
            ),
        },
        "ensemble_rule": "argmax of the mean over the members of softmax(logits)",
        "epochs": rows,
        "identity": identity_rows
        or "skipped: with pooled statistics or ghost batches a member is not a single model trained alone",
        "tolerances": tolerances,
        "jax_compilations": jax_ensemble.compile_count(),
        "timings": timings,
        "failures": failures,
    }
    print_ensemble(section, console)
    return section


def print_ensemble(section: dict, console: Console) -> None:
    """The ensemble's per-epoch table, its per-member table, the identity check and the timings."""
    rows = section["epochs"]
    table = Table(
        title=f"Ensemble of {section['members']} (seeds {section['seeds'][0]}..{section['seeds'][-1]}, "
        f"{section['batches']} batches, ghost batches {section['ghost_batches']}, "
        f"{'pooled' if section['pool_members'] else 'per-member'} statistics): mean train loss over the "
        "members, the ensemble's test accuracy (mean softmax), predictions that differ, max drift"
    )
    for name in ("epoch", "loss jax", "loss numpy", "ens acc jax", "ens acc numpy", "differ", "max drift"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r["epoch"]),
            f"{np.mean(r['train_loss']['jax']):.6f}",
            f"{np.mean(r['train_loss']['numpy']):.6f}",
            f"{r['ensemble_accuracy']['jax']:.2%}",
            f"{r['ensemble_accuracy']['numpy']:.2%}",
            f"{sum(r['disagreements'])} + {r['ensemble_disagreements']}",
            f"{max(r['max_param_drift']):.2e}",
        )
    console.print(table)
    last = rows[-1]
    members = Table(
        title="After the last epoch, per member: test accuracy on each side, predictions that differ, drift"
    )
    for name in ("member", "seed", "acc jax", "acc numpy", "differ", "max drift"):
        members.add_column(name, justify="right")
    for m, seed in enumerate(section["seeds"]):
        members.add_row(
            str(m),
            str(seed),
            f"{last['test_accuracy']['jax'][m]:.2%}",
            f"{last['test_accuracy']['numpy'][m]:.2%}",
            str(last["disagreements"][m]),
            f"{last['max_param_drift'][m]:.2e}",
        )
    members.add_row(
        "ensemble",
        "mean softmax",
        f"{last['ensemble_accuracy']['jax']:.2%}",
        f"{last['ensemble_accuracy']['numpy']:.2%}",
        str(last["ensemble_disagreements"]),
        "",
        style="bold",
    )
    console.print(members)
    if isinstance(section["identity"], str):
        console.print(f"  identity check {section['identity']}")
    else:
        for r in section["identity"]:
            mark = "[green]✓[/]" if r["ok"] else "[red]✗[/]"
            console.print(
                f"  identity ({r['side']:>5}): member {r['member']} of the ensemble vs the single model trained alone "
                f"from seed {r['seed']}: max |p_ens - p_single| = {r['max_abs_diff']:.2e} (tol {r['tol']:.0e}) {mark}"
            )
    for key, t in section["timings"].items():
        console.print(
            f"  ensemble {key:>5}: {t['train_s']:.2f} s training, {t['member_samples_per_s']:,.0f} member-samples/s "
            f"(+ {t['compile_s']:.2f} s compile/warm-up)"
        )
    console.print(f"  JAX epoch programs compiled in this process: {section['jax_compilations']}")


def plot_ensemble_panel(ax, section: dict, jax_style: dict, numpy_style: dict) -> None:
    """``output.png``'s ensemble panel: every member's test accuracy per epoch (thin lines) and the
    ensemble's (mean softmax, thick), JAX and NumPy drawn over each other."""
    epochs = [r["epoch"] for r in section["epochs"]]
    for key, style in (("jax", jax_style), ("numpy", numpy_style)):
        thin = {**style, "linewidth": 0.8, "markersize": 3, "alpha": 0.5}
        for m in range(section["members"]):
            label = f"{key}: members" if m == 0 else None
            ax.plot(epochs, [100 * r["test_accuracy"][key][m] for r in section["epochs"]], label=label, **thin)
        ax.plot(
            epochs, [100 * r["ensemble_accuracy"][key] for r in section["epochs"]], label=f"{key}: ensemble", **style
        )
    pooled = "pooled BN" if section["pool_members"] else "per-member BN"
    ax.set(
        xlabel="epoch", ylabel="test accuracy (%)", title=f"Ensemble of {section['members']}: members and mean softmax"
    )
    ax.text(
        0.02,
        0.97,
        f"{section['batches']} batches, {pooled}, ghost batches {section['ghost_batches']}",
        transform=ax.transAxes,
        fontsize=8,
        va="top",
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    ax.set_xticks(epochs)
