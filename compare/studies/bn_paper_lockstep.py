r"""The lockstep of :mod:`compare.studies.bn_paper`: both networks on both sides, evaluated as they train.

For each network (with and without batch norm) the two sides start from the same parameters and
train on the same batches, segment by segment (``--eval-every`` steps, one ``Trainer.epoch`` call
each: one jitted ``lax.scan`` on the JAX side, one numba call on the NumPy side). After each
segment, both are evaluated on the test images in eval mode (one forward pass per side, through
``eval_logits_and_pre_activations``), and the largest parameter difference between them is
recorded, so that a report shows when and how fast the two trajectories separate. Before training,
the first batch goes through both sides' ``loss_and_grads`` once (:func:`step0_check`): the loss,
every gradient and the running statistics, to tell a difference in the formulas (step 0) from
rounding differences that the training dynamics amplify (the trajectory).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compare import tolerances
from compare.contract import N_HIDDEN_LAYERS, training
from compare.metrics import max_abs_err, max_rel_err

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

#: How closely the two sides must agree, keyed by the ``--dtype`` name (as ``bn_paper.json`` writes
#: them): :data:`compare.tolerances.BN_PAPER_LOCKSTEP`, where the values and their reason are.
TOLERANCES = {dtype.name: bounds for dtype, bounds in tolerances.BN_PAPER_LOCKSTEP.items()}
#: The reason, one line per dtype, printed under the agreement table and written to the JSON.
TOLERANCE_REASON = {
    dtype: f"Same formulas, sums in another order: {dtype} rounding ({eps} per operation) that SGD carries "
    "along; the tolerances sit far above the differences measured over 50,000 steps, far below a wrong formula's."
    for dtype, eps in (("float32", "1.2e-7"), ("float64", "2.2e-16"))
}


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

    def evaluate_jax():  # JAX arrays: dispatched, not waited for (the NumPy side evaluates meanwhile)
        return jax_evaluate(jax_trainer.params, jax_trainer.state, test_on_device)

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
        "param_diff": [],
        "seconds": dict.fromkeys(SIDES, 0.0),
        "predictions": {},
    }


def max_param_diff(trainers: dict) -> float:
    """``max |p_jax - p_numpy|`` over every parameter of the two sides' trainers now."""
    jax_params, numpy_params = (_tree_leaves(trainers[side].params_numpy()) for side in SIDES)
    return max(max_abs_err(a, b) for a, b in zip(jax_params, numpy_params))


def record_evaluation(record: dict, step: int, sides: dict, test_y: np.ndarray) -> None:
    """Evaluate both sides now and append to ``record``. (The pooled percentiles of all units are
    taken in the activations' dtype: a float64 copy of 10,000 x 100 values would cost more than
    the partition itself.)"""
    record["steps"].append(step)
    outputs = {side: evaluate() for side, (_, evaluate) in sides.items()}
    for side, (predictions, pre) in outputs.items():
        predictions, pre = np.asarray(predictions), np.asarray(pre)
        record["predictions"][side] = predictions
        record["test_accuracy"][side].append(float(np.mean(predictions == test_y)))
        unit = pre[:, UNIT].astype(np.float64)
        record["percentiles"][side].append(np.percentile(unit, PERCENTILES).tolist())
        record["percentiles_all_units"][side].append(np.percentile(pre, PERCENTILES).astype(np.float64).tolist())
    record["param_diff"].append(max_param_diff({side: trainer for side, (trainer, _) in sides.items()}))


def step0_check(params, state, images, labels) -> dict:
    """The first batch through both sides' ``loss_and_grads`` once, from the same parameters: the
    worst relative error (:func:`compare.metrics.max_rel_err`) over the loss, every gradient and the
    new running statistics, where it occurs, and its tolerance (:data:`compare.tolerances.STEP0`, the
    main comparison's step 0, which also compares the logits)."""
    from jaxside import model as jax_model
    from numpyside import model as numpy_model

    def quantities(loss, grads, new_state) -> dict:
        named = {"loss": loss}
        named.update({f"grad layer {i} {key}": v for i, layer in enumerate(grads) for key, v in layer.items()})
        named.update({f"running {key} {i}": v for i, layer in enumerate(new_state) for key, v in layer.items()})
        return named

    jax_values = quantities(*jax_model.loss_and_grads(params, state, images, labels))
    numpy_values = quantities(*numpy_model.loss_and_grads(params, state, images, labels))
    errors = {name: max_rel_err(numpy_values[name], jax_values[name]) for name in jax_values}
    worst = max(errors, key=errors.get)
    tolerance = tolerances.STEP0[np.dtype(params[0]["weight"].dtype)]
    return {"max_rel_err": errors[worst], "quantity": worst, "tolerance": tolerance, "ok": errors[worst] <= tolerance}


def _progress(console: Console) -> Progress:
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    return Progress(*columns, console=console)


def train_lockstep(config, data, console: Console) -> tuple[dict, dict]:
    """Both networks on both sides, segment by segment on the same batches. ``config`` has ``lr``,
    ``init_std``, ``steps``, ``batch_size``, ``eval_every``, ``seed``, ``dtype``. Returns the records
    and the trainers (by network, then side)."""
    from compare.contract.init import init_params, init_state

    train_x, train_y, test_x, test_y = data
    plan = batch_plan(len(train_x), config.batch_size, config.steps, config.seed)
    stops = evaluation_steps(config.steps, config.eval_every)
    networks, records = {}, {}
    for name, batch_norm in NETWORKS.items():
        params = init_params(config.seed, config.dtype, batch_norm, weight_std=config.init_std)
        state = init_state(config.dtype, batch_norm)
        records[name] = new_record()
        records[name]["step0"] = step0_check(params, state, train_x[plan[0]], train_y[plan[0]])
        networks[name] = make_sides(params, state, train_x, train_y, test_x)
        for trainer, _ in networks[name].values():
            trainer.compile(min(config.eval_every, config.steps), config.batch_size)
        record_evaluation(records[name], 0, networks[name], test_y)
    with _progress(console) as progress:
        tasks = {name: progress.add_task(name.replace("_", " "), total=config.steps, status="") for name in NETWORKS}
        for start, stop in itertools.pairwise(stops):
            rates = np.full(stop - start, config.lr)
            for name, sides in networks.items():
                for side, (trainer, _) in sides.items():
                    began = time.perf_counter()
                    trainer.epoch(plan[start:stop], rates)
                    records[name]["seconds"][side] += time.perf_counter() - began
                record_evaluation(records[name], stop, sides, test_y)
                accuracy = records[name]["test_accuracy"]
                status = f"test accuracy: JAX {accuracy['jax'][-1]:.2%}, NumPy {accuracy['numpy'][-1]:.2%}"
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
    param_diff = record["param_diff"][-1]
    param_scale = max(float(np.max(np.abs(leaf))) for leaf in _tree_leaves(params["numpy"]))
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
        "param_diff": record["param_diff"],  # max |p_jax - p_numpy| at each evaluation
        "steps_to_by_side": {side: {f"{t:.2f}": steps_to(steps, acc[side], t) for t in THRESHOLDS} for side in SIDES},
        "max_state_diff": max((max_abs_err(a, b) for a, b in state_pairs), default=0.0),
        "final_predictions_differ": int(np.sum(record["predictions"]["jax"] != record["predictions"]["numpy"])),
        "step0": record["step0"],
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
    """One line per quantity beyond its tolerance: step 0 (a formula differs), or the trajectory."""
    failures = []
    for name, run in runs.items():
        step0 = run["step0"]
        if not step0["ok"]:
            failures.append(
                f"{name}: step 0 (first batch, same parameters): {step0['quantity']} max rel err "
                f"{step0['max_rel_err']:.2e} > tolerance {step0['tolerance']:.0e}: the sides compute different formulas"
            )
        for key, ok in run["agreement_ok"].items():
            if not ok:
                failures.append(
                    f"{name}: {key} {run['agreement'][key]:.2e} > tolerance {TOLERANCES[dtype][key]:.0e} ({dtype})"
                )
    return failures


def divergence_notes(runs: dict) -> list[str]:
    """For a trajectory that failed while step 0 agreed: how the parameter difference grew, which
    is what rounding differences amplified by the training dynamics look like (docs/bn_paper.md)."""
    notes = []
    for name, run in runs.items():
        if run["step0"]["ok"] and not all(run["agreement_ok"].values()):
            steps, diffs = run["steps"], run["param_diff"]
            first = next((k for k, d in enumerate(diffs) if d > 0), len(diffs) - 1)
            notes.append(
                f"{name}: step 0 agrees (max rel err {run['step0']['max_rel_err']:.1e}): the same formulas. "
                f"max |p_jax - p_numpy| grew from {diffs[first]:.1e} at step {steps[first]:,} to {diffs[-1]:.1e} at "
                f"step {steps[-1]:,}: rounding differences that these training dynamics amplify until the two "
                "trajectories part (float64 parts later, not never; see docs/bn_paper.md)"
            )
    return notes
