"""``numpyside.warmup``: a second process compiles the run's kernels, phase by phase, and the run
waits for a phase (or asks without waiting) instead of compiling it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from numpyside import warmup

ROOT = Path(__file__).resolve().parents[1]


def fake_warmup(script: str):
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    return warmup.Warmup(process)


def test_warmup_wait_follows_the_background_process():
    """``Warmup.wait`` returns True once the process printed the phase, False if it ended without
    it (the caller then compiles itself); the process is reaped either way."""
    done = fake_warmup("print('trainer', flush=True)")
    assert done.wait("trainer") and done.wait("trainer")
    done.close()
    assert done.process is None
    failed = fake_warmup("raise SystemExit(3)")
    assert not failed.wait("trainer")
    assert failed.process is None
    with pytest.raises(ValueError, match="phase"):
        failed.wait("everything")


def test_warmup_ready_does_not_wait():
    """``ready`` answers at once for a phase still compiling; ``close`` ends the process."""
    slow = fake_warmup("import time; print('model', flush=True); time.sleep(60)")
    try:
        assert slow.wait("model")
        assert not slow.ready("kernels") and not slow.ready("trainer")
    finally:
        process = slow.process
        slow.close()
    assert slow.process is None and process.returncode is not None
    with pytest.raises(ValueError, match="phase"):
        slow.ready("everything")


#: Loads real MNIST types (read-only float32 images, int32 labels) as compare/run.py does, runs the
#: step-0 NumPy side and the fast trainer, and prints how many kernel signatures numba's cache missed.
_RUN_LIKE = """
import json, sys, importlib, pkgutil, numba
import numpy as np
from numba.core.dispatcher import Dispatcher
from compare.contract import training
from compare.contract.init import init_params, init_state
from compare.mnist import load_mnist
from compare.sides import numpy_side
import numpyside.kernels
train_x, train_y, test_x, _ = load_mnist()
train_x, train_y = train_x[:1024], train_y[:1024]
side = numpy_side("numba")
params, state = init_params(0, "float32", True), init_state("float32", True)
batch = training.epoch_batches(len(train_x), 128, training.batch_rng(0))[0]
side.loss_and_grads(params, state, train_x[batch], train_y[batch])
side.train_logits(params, state, train_x[batch])
side.predict_logits(params, state, train_x[batch])
trainer = side.make_trainer(params, state, train_x, train_y, momentum=0.8)
trainer.compile(8, 128)
trainer.epoch(training.epoch_batches(len(train_x), 128, training.batch_rng(0)), np.full(8, 0.1, np.float32))
trainer.predict(test_x[:100])
misses, hits = {}, 0
for info in pkgutil.iter_modules(numpyside.kernels.__path__):
    module = importlib.import_module("numpyside.kernels." + info.name)
    for name, value in vars(module).items():
        if isinstance(value, Dispatcher) and value.__module__ == module.__name__:
            hits += sum(value.stats.cache_hits.values())
            if sum(value.stats.cache_misses.values()):
                misses[module.__name__ + "." + name] = [str(s) for s in value.stats.cache_misses]
print(json.dumps({"hits": hits, "misses": misses}))
"""


#: The warm-up's main with ``compile_phase`` made to fail: exit status 9 if any phase is compiled.
_COMPILING_EXITS = """
import os, sys
from numpyside import warmup
warmup.compile_phase = lambda *args: os._exit(9)
sys.exit(warmup.main(["--dtype", "float32"]))
"""


def test_a_phase_that_is_not_compiled_is_not_waited_for():
    """A warm-up started without ``trainer`` (a ``--quick`` run) answers ``wait("trainer")`` at once."""
    partial = warmup.Warmup(None, phases=("model", "kernels"))
    assert not partial.wait("trainer") and not partial.ready("trainer")


def test_the_warmup_compiles_exactly_the_signatures_a_run_calls(tmp_path):
    """After ``python -m numpyside.warmup`` on an empty cache, a run's NumPy side (step 0, the fast
    trainer's compile, an epoch, predict) loads every kernel from the cache: the synthetic
    arguments of the warm-up have the run's types, or the run would compile them a second time."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "VMAP_BN_THREADS": "1"}

    def python(*args, timeout=300):
        command = [sys.executable, *args]
        return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    warm = python("-m", "numpyside.warmup", "--dtype", "float32")
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.split() == list(warmup.PHASES)
    again = python("-c", _COMPILING_EXITS, timeout=120)  # every phase marked done: nothing compiled
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == list(warmup.PHASES)
    run = python("-c", _RUN_LIKE)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    assert counts["misses"] == {}
    assert counts["hits"] >= 5  # the kernels the run calls from Python; the whole epoch holds the rest
