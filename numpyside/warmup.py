r"""Compile the NumPy side's numba kernels in a second process while this one does other work.

numba compiles a kernel the first time it is called with new argument types and keeps the machine
code in its on-disk cache (``cache=True``); a later process loads it in milliseconds. On a cold
cache (a fresh clone, a new numba version or CPU), compiling what one ``compare/run.py`` calls
takes several seconds of one core, during which the comparison would wait. :func:`start` runs
``python -m numpyside.warmup`` in the background, which calls the same functions with the same
argument types on a few synthetic images and so fills the cache. Its phase ``trainer`` compiles
:class:`numpyside.fast.FastTrainer`'s whole-epoch kernels (``compile``, which also measures the
products' engines, :mod:`numpyside.kernels.gemm_choice`): the most compiling a run does, and the last the
run needs. The caller meanwhile imports JAX, loads MNIST, compiles the readable model's kernels for
the step-0 table itself (the two processes split the compiling between the two cores) and the JAX
side, and calls :meth:`Warmup.wait` before the trainer's first call, so that its kernels come from
the cache instead of being compiled a second time. (A phase ``model`` compiles the readable
model's kernels, for callers that want those in the background too.) Only what the run uses is
compiled: its dtype, batch norm on or off. If the second process fails or cannot start, ``wait``
returns and the caller compiles as it would have anyway: the warm-up changes when the compiling
happens, never what is computed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: The phases, in the order the background process compiles them (each line it prints is one).
PHASES = ("trainer",)
#: Every phase :func:`compile_phase` knows.
KNOWN_PHASES = ("trainer", "model")
#: Seconds :meth:`Warmup.wait` waits for a phase at most before the caller compiles it itself.
WAIT_LIMIT_S = 300.0


class Warmup:
    """A background ``python -m numpyside.warmup`` and the phases it has finished."""

    def __init__(self, process: subprocess.Popen | None):
        self.process = process
        self.done: set[str] = set()
        self.waited_s = 0.0  # seconds the caller spent in wait()

    def wait(self, phase: str) -> bool:
        """Block until the background process has compiled ``phase`` (True), or has ended without
        it or took longer than :data:`WAIT_LIMIT_S` (False: the caller compiles it itself)."""
        if phase not in KNOWN_PHASES:
            raise ValueError(f"phase must be one of {KNOWN_PHASES}, got {phase!r}")
        start = time.perf_counter()
        try:
            while phase not in self.done and self.process is not None:
                line = self.process.stdout.readline()  # one line per finished phase
                if not line:  # the process ended
                    self.close()
                    break
                self.done.add(line.strip())
                if time.perf_counter() - start > WAIT_LIMIT_S:
                    self.close()
                    break
        finally:
            self.waited_s += time.perf_counter() - start
        return phase in self.done

    def close(self) -> None:
        """End the background process (if it still runs) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.process = None


def _in_cache(dtype: np.dtype) -> bool:
    """Whether numba's on-disk cache holds, for this CPU and ``dtype``, the trainer's epoch (the
    kernel that takes longest to compile): then the warm-up would only cost a process start. Reads
    numba's cache index (``Dispatcher._cache``, not public API): any surprise counts as "no"."""
    from numba.core.registry import cpu_target

    from numpyside.kernels import fused, threads

    try:
        magic = cpu_target.target_context.codegen().magic_tuple()
        for dispatcher in (fused.train_steps_blas if threads.default_count() == 1 else fused.train_steps,):
            index = dispatcher._cache._cache_file._load_index()
            if not any(key[1] == magic and f"({dtype.name}," in str(key[0]) for key in index):
                return False
        return True
    except Exception:  # an internal API changed: compile in the background
        return False


def start(dtype, batch_norm: bool = True) -> Warmup:
    """Start compiling, in a second process, the kernels that a run in ``dtype`` calls (nothing
    starts when numba's cache has them already)."""
    if _in_cache(np.dtype(dtype)):
        warmup = Warmup(None)
        warmup.done.update(PHASES)
        return warmup
    root = Path(__file__).resolve().parents[1]  # the repository: what this process imports
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "numpyside.warmup", "--dtype", np.dtype(dtype).name]
    if not batch_norm:
        command.append("--no-batch-norm")
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env, text=True
        )
    except OSError:
        process = None
    return Warmup(process)


def _synthetic_data(dtype: np.dtype, batch_norm: bool, n: int = 256):
    """Random images, labels, parameters and running statistics in the run's types and layout."""
    from compare.contract import LAYER_SIZES, param_shapes, state_shapes

    rng = np.random.default_rng(0)
    images = rng.random((n, LAYER_SIZES[0])).astype(dtype)
    labels = rng.integers(0, LAYER_SIZES[-1], n).astype(np.uint8)  # MNIST's label type
    params = [
        {key: (0.1 * rng.standard_normal(shape)).astype(dtype) for key, shape in layer.items()}
        for layer in param_shapes(batch_norm)
    ]
    state = [{key: np.ones(shape, dtype) for key, shape in layer.items()} for layer in state_shapes()]
    return params, state if batch_norm else [], images, labels


def compile_phase(phase: str, dtype: np.dtype, batch_norm: bool) -> None:
    """Call ``phase``'s kernels once with the run's argument types (see the module docstring)."""
    params, state, images, labels = _synthetic_data(dtype, batch_norm)
    batch = images[:128]
    if phase == "model":
        from numpyside import model

        model.loss_and_grads(params, state, batch, labels[:128], backend="numba")
        model.train_logits(params, state, batch, backend="numba")
        model.predict_logits(params, state, batch, backend="numba")
    elif phase == "trainer":
        from numpyside.fast import FastTrainer

        FastTrainer(params, state, images, labels, momentum=0.9, backend="numba").compile(1, 128)
    else:
        raise ValueError(f"phase must be one of {KNOWN_PHASES}, got {phase!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m numpyside.warmup", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--phases", nargs="+", choices=KNOWN_PHASES, default=list(PHASES))
    args = parser.parse_args(argv)
    for phase in args.phases:
        compile_phase(phase, np.dtype(args.dtype), not args.no_batch_norm)
        print(phase, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
