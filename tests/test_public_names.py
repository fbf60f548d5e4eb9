"""The names and commands outside checks call keep working wherever the code behind them moves.

Each public name is imported from the place earlier issues gave it (a re-export from a new home is
fine); each command answers ``--help``; each console entry point of ``pyproject.toml`` names a
callable. A later move that drops one fails here, not in a user's script.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PUBLIC_NAMES = {
    "compare.init": ["init_params", "init_state", "init_ensemble"],
    "compare.mnist": ["load_mnist"],
    "compare.contract": [
        "InputError",
        "LAYER_SIZES",
        "N_INPUTS",
        "N_CLASSES",
        "N_HIDDEN_LAYERS",
        "BN_EPS",
        "BN_MOMENTUM",
        "SUPPORTED_DTYPES",
        "param_shapes",
        "state_shapes",
        "check_inputs",
    ],
    "compare.contract.ensemble": ["check_ensemble_inputs", "check_training_setup", "check_epoch"],
    "compare.contract.init": ["init_params", "init_state", "init_ensemble"],
    "compare.contract.training": ["epoch_batches", "batch_rng", "LearningRateSchedule", "DEFAULT_EPOCHS"],
    "compare.training": ["epoch_batches", "batch_rng", "LearningRateSchedule"],
    "compare.ensemble_contract": ["check_ensemble_inputs", "check_training_setup"],
    "jaxside": ["forward_pass", "loss_and_grads", "predict_logits"],
    "jaxside.model": ["forward_pass", "loss_and_grads", "predict_logits", "train_logits", "per_example_grads"],
    "numpyside.model": ["loss_and_grads", "predict_logits", "train_logits", "per_example_grads"],
    "jaxside.train": ["Trainer", "train_epoch", "sgd_momentum"],
    "numpyside.train": ["Trainer", "train_epoch", "sgd_momentum"],
    "jaxside.ensemble": ["loss_and_grads", "predict_logits", "Trainer", "compile_count"],
    "numpyside.ensemble": ["loss_and_grads", "predict_logits", "Trainer", "FastEnsembleTrainer"],
    "jaxside.parallel": ["make_mesh", "loss_and_grads", "per_device_results", "sharded_logits", "Trainer"],
    "numpyside.parallel": ["AllReduce", "loss_and_grads", "split_batch", "sync_batchnorm_forward"],
    "jaxside.devices": ["request_devices", "checked_devices", "jax_started"],
    "jaxside.transforms": [
        "batch_loss",
        "batch_apply",
        "with_grads",
        "per_example_grads",
        "ensemble",
        "ensemble_loss",
        "data_parallel",
        "ensemble_probabilities",
        "ensemble_accuracy",
    ],
    "numpyside.layers": [
        "linear_forward",
        "linear_backward",
        "batchnorm_forward",
        "batchnorm_backward",
        "batchnorm_eval",
        "sigmoid_forward",
        "sigmoid_backward",
        "softmax_cross_entropy_forward",
        "softmax_cross_entropy_backward",
    ],
    "numpyside.backend": ["BACKENDS", "DEFAULT_BACKEND", "check_backend"],
    "numpyside.fast": ["FastTrainer"],
    "numpyside.fast_ensemble": ["FastEnsembleTrainer"],
}

#: Every command earlier issues named, as a user types it (``--help`` only: no work is done).
COMMANDS = [
    ["compare/run.py"],
    ["-m", "compare.bench"],
    ["-m", "compare.parallel"],
    ["-m", "compare.per_example"],
    ["-m", "compare.jaxpr"],
    ["-m", "compare.variance"],
    ["-m", "compare.train_jax"],
    ["-m", "compare.bn_paper"],
    ["-m", "compare.mistakes"],
]


@pytest.mark.parametrize("module", sorted(PUBLIC_NAMES))
def test_public_names_import(module):
    imported = importlib.import_module(module)
    missing = [name for name in PUBLIC_NAMES[module] if not hasattr(imported, name)]
    assert not missing, f"{module} no longer has {missing}"


def test_the_same_objects_under_old_and_new_names():
    from compare import contract, ensemble_contract, init, training
    from compare.contract import ensemble, layout
    from compare.contract import init as contract_init
    from compare.contract import training as contract_training
    from numpyside import ensemble as numpy_ensemble
    from numpyside import fast_ensemble

    assert init.init_params is contract_init.init_params and contract.InputError is layout.InputError
    assert training.epoch_batches is contract_training.epoch_batches
    assert ensemble_contract.check_ensemble_inputs is ensemble.check_ensemble_inputs
    assert fast_ensemble.FastEnsembleTrainer is numpy_ensemble.FastEnsembleTrainer


def test_console_entry_points_name_callables():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert set(scripts) == {
        "vmap-bn-compare",
        "vmap-bn-bench",
        "vmap-bn-train-jax",
        "vmap-bn-per-example",
        "vmap-bn-paper",
        "vmap-bn-mistakes",
    }
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), f"{name} -> {target}"


def test_every_command_answers_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    processes = [
        (command, subprocess.Popen([sys.executable, *command, "--help"], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for command in COMMANDS
    ]  # fmt: skip
    failed = []
    try:
        for command, process in processes:
            out, err = process.communicate(timeout=300)
            if process.returncode != 0 or "usage:" not in out:
                failed.append(f"python {' '.join(command)} --help: status {process.returncode}\n{err[-1500:]}")
    finally:
        for _, process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not failed, "\n".join(failed)
