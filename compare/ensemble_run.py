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

from compare import tolerances
from compare.contract import training
from compare.contract.init import init_ensemble, init_params, init_state
from compare.metrics import max_tree_err, member
from compare.sides import jax_side, numpy_side
from compare.tables import print_ensemble
from jaxside import ensemble as jax_ensemble
from jaxside.transforms import ensemble_probabilities
from numpyside import ensemble as numpy_ensemble

SIDES = ("jax", "numpy")


def drift_per_member(params_a, params_b) -> list[float]:
    """``max |p_a - p_b|`` of every member of two stacked parameter trees."""
    return [max_tree_err(member(params_a, m), member(params_b, m)) for m in range(len(params_a[0]["weight"]))]


def make_trainers(args: argparse.Namespace, train_x, train_y, seeds: list[int]):
    """The ensemble trainers of both sides, and (where a member is a single model: neither pooled nor
    ghost batch norm) each side's single model from ``seeds[0]``, for the identity check."""
    batch_norm = not args.no_batch_norm
    params, state = init_ensemble(seeds, args.dtype, batch_norm)
    options = dict(momentum=args.momentum, pool_members=args.pool_members, ghost_batches=args.ghost_batches)
    numpy_trainer = numpy_ensemble.trainer_class(
        fast=not args.reference_trainer,
        backend=args.backend,
        pool_members=args.pool_members,
        ghost_batches=args.ghost_batches,
    )
    trainers = {
        "jax": jax_ensemble.Trainer(params, state, train_x, train_y, **options),
        "numpy": numpy_trainer(params, state, train_x, train_y, backend=args.backend, **options),
    }
    singles = {}
    if not args.pool_members and args.ghost_batches == 1:  # member 0 alone, from seed, on member 0's batches
        single_sides = {"jax": jax_side("pmean"), "numpy": numpy_side(args.backend, fast=not args.reference_trainer)}
        start_params, start_state = init_params(seeds[0], args.dtype, batch_norm), init_state(args.dtype, batch_norm)
        singles = {
            key: side.make_trainer(start_params, start_state, train_x, train_y, momentum=args.momentum)
            for key, side in single_sides.items()
        }
    return trainers, singles


def epoch_row(epoch: int, trainers: dict, losses: dict, test_x, test_y) -> dict:
    """One epoch of the report's ensemble section: per-member losses, accuracies and differences."""
    logits = {key: trainer.predict_logits(test_x) for key, trainer in trainers.items()}
    predictions = {key: np.argmax(value, axis=-1) for key, value in logits.items()}
    pooled = {key: np.argmax(ensemble_probabilities(value), axis=-1) for key, value in logits.items()}
    return {
        "epoch": epoch + 1,
        "train_loss": {key: losses[key].tolist() for key in SIDES},
        "test_accuracy": {key: np.mean(predictions[key] == test_y, axis=1).tolist() for key in SIDES},
        "ensemble_accuracy": {key: float(np.mean(pooled[key] == test_y)) for key in SIDES},
        "disagreements": np.sum(predictions["jax"] != predictions["numpy"], axis=1).tolist(),
        "ensemble_disagreements": int(np.sum(pooled["jax"] != pooled["numpy"])),
        "max_param_drift": drift_per_member(trainers["jax"].params_numpy(), trainers["numpy"].params_numpy()),
    }


def train(args: argparse.Namespace, trainers: dict, singles: dict, data, seeds: list[int]):
    """Every epoch on both sides (the singles on member 0's batches); the rows and the timings."""
    train_x, _, test_x, test_y = data
    independent = args.ensemble_batches == "independent"
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
        losses = {}
        for key, trainer in trainers.items():
            start = time.perf_counter()
            losses[key] = trainer.epoch(batches, rates).mean(axis=0, dtype=np.float64)
            train_s[key] += time.perf_counter() - start
        for single in singles.values():
            single.epoch(orders[0], rates)
        rows.append(epoch_row(epoch, trainers, losses, test_x, test_y))
    samples = steps * args.batch_size * args.epochs * len(seeds)
    timings = {
        key: {"compile_s": compile_s[key], "train_s": train_s[key], "member_samples_per_s": samples / train_s[key]}
        for key in SIDES
    }
    return rows, timings


def identity_rows(trainers: dict, singles: dict, seed: int, dtype: str) -> list[dict]:
    """Member 0 of each side's ensemble against that side's single model trained alone."""
    rows = []
    tol = tolerances.IDENTITY[np.dtype(dtype)]
    for key, single in singles.items():
        diff = max_tree_err(member(trainers[key].params_numpy(), 0), single.params_numpy())
        rows.append({"side": key, "member": 0, "seed": seed, "max_abs_diff": diff, "tol": tol, "ok": diff <= tol})
    return rows


def failures_of(rows: list[dict], identity: list[dict], limits: dict) -> list[str]:
    """One line per member out of its tolerance after the last epoch, and per failed identity check."""
    last = rows[-1]
    failures = [
        f"ensemble member {m}: max param drift {d:.2e} > tol {limits['max_param_drift']:.0e}"
        for m, d in enumerate(last["max_param_drift"])
        if d > limits["max_param_drift"]
    ]
    failures += [
        f"ensemble member {m}: {d} test predictions differ > tol {limits['disagreements']}"
        for m, d in enumerate(last["disagreements"])
        if d > limits["disagreements"]
    ]
    failures += [
        f"identity check ({r['side']}): member 0 of the ensemble is {r['max_abs_diff']:.2e} from the single model > "
        f"tol {r['tol']:.0e}"
        for r in identity
        if not r["ok"]
    ]
    return failures


def run_ensemble(args: argparse.Namespace, data, console: Console) -> dict:
    """Train the ensemble on both sides (and member 0 alone, for the identity check); print the
    tables; return the report's ``"ensemble"`` section (with its own ``"failures"``)."""
    train_x, train_y, test_x, _ = data
    seeds = list(range(args.seed, args.seed + args.ensemble))
    trainers, singles = make_trainers(args, train_x, train_y, seeds)
    rows, timings = train(args, trainers, singles, data, seeds)
    identity = identity_rows(trainers, singles, seeds[0], args.dtype)
    dtype = np.dtype(args.dtype)
    limits = {
        "max_param_drift": tolerances.DRIFT[dtype],
        "disagreements": int(tolerances.DISAGREEMENT[dtype] * len(test_x)),
        "identity": tolerances.IDENTITY[dtype],
    }
    fast = isinstance(trainers["numpy"], numpy_ensemble.FastEnsembleTrainer)
    section = {
        "members": args.ensemble,
        "seeds": seeds,
        "batches": args.ensemble_batches,
        "ghost_batches": args.ghost_batches,
        "pool_members": args.pool_members,
        "sides": {
            "jax": "JAX: forward_pass under vmap('member') of vmap('batch') (jaxside.ensemble)",
            "numpy": (
                "NumPy: members side by side, hand backward, an epoch per numba call "
                "(numpyside.ensemble.FastEnsembleTrainer, bit-identical to numpyside.ensemble.Trainer)"
                if fast
                else f"NumPy: stacked (M, B) layers, hand backward, {args.backend} kernels (numpyside.ensemble)"
            ),
        },
        "ensemble_rule": "argmax of the mean over the members of softmax(logits)",
        "epochs": rows,
        "identity": identity
        or "skipped: with pooled statistics or ghost batches a member is not a single model trained alone",
        "tolerances": limits,
        "jax_compilations": jax_ensemble.compile_count(),
        "timings": timings,
        "failures": failures_of(rows, identity, limits),
    }
    print_ensemble(section, console)
    return section
