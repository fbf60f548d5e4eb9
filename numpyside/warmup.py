r"""Compile the NumPy side's numba kernels in a second process while this one does other work.

numba compiles a kernel at its first call with new argument types and keeps the machine code in its
on-disk cache; a later process loads it instead. :func:`start` runs ``python -m numpyside.warmup``
in the background, which calls the run's functions with the run's argument types on synthetic data,
phase by phase in the order the run needs them (:data:`PHASES`):

1. ``model``: the readable model's kernels (:mod:`numpyside.model`, ``backend="numba"``), for the
   step-0 table and every ``predict``;
2. ``kernels``: :class:`numpyside.fast.FastTrainer`'s kernels, for a step driven kernel by kernel;
3. ``trainer``: its whole-epoch kernel, the slowest to compile.

The caller calls :meth:`Warmup.wait` before it first needs a phase, or :meth:`Warmup.ready` to ask
without waiting (a trainer runs kernel by kernel until ``trainer`` is ready: the same bits). A
completed phase leaves a marker in numba's cache directory (:func:`_marker`), so a later warm-up
reports it at once. If the second process fails, ``wait`` returns False and the caller compiles as
it would have anyway: the warm-up changes when the compiling happens, never what is computed.
Measurements: ``docs/performance.md``, "The first run".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

#: The phases, in the order the background process compiles them (it prints each one's name when
#: it is done).
PHASES = ("model", "kernels", "trainer")
#: Seconds :meth:`Warmup.wait` waits for a phase at most before the caller compiles it itself.
WAIT_LIMIT_S = 300.0


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return phase


class Warmup:
    """A background ``python -m numpyside.warmup`` and the phases it has finished (a thread reads
    the lines it prints)."""

    def __init__(self, process: subprocess.Popen | None, phases=PHASES):
        self.process = process
        self.phases = tuple(check_phase(phase) for phase in phases)  # what it compiles, in order
        self.done: set[str] = set()
        self._changed = threading.Condition()
        self._ended = process is None
        if process is not None:
            threading.Thread(target=self._follow, args=(process,), daemon=True).start()

    def _follow(self, process: subprocess.Popen) -> None:
        for line in process.stdout:  # one line per finished phase, until the process ends
            with self._changed:
                self.done.add(line.strip())
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def ready(self, phase: str) -> bool:
        """Whether ``phase``'s kernels are in the cache now (never blocks)."""
        return check_phase(phase) in self.done

    def wait(self, phase: str) -> bool:
        """Block until the background process has compiled ``phase`` (True), or has ended without
        it or took longer than :data:`WAIT_LIMIT_S`, or does not compile it (False: the caller
        compiles it itself)."""
        if check_phase(phase) not in self.phases:
            return False
        with self._changed:
            finished = self._changed.wait_for(lambda: phase in self.done or self._ended, timeout=WAIT_LIMIT_S)
        if not finished or phase not in self.done:
            self.close()
        return phase in self.done

    def close(self) -> None:
        """End the background process (if it still runs) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        with self._changed:
            self._ended = True
            self._changed.notify_all()


def start(dtype, batch_norm: bool = True, phases=PHASES) -> Warmup:
    """Start compiling, in a second process, ``phases`` of the kernels that a run in ``dtype`` calls
    (the process reports a phase that an earlier warm-up completed at once, :func:`_marker`)."""
    phases = tuple(check_phase(phase) for phase in phases)
    root = Path(__file__).resolve().parents[1]  # the repository: what this process imports
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "numpyside.warmup", "--dtype", np.dtype(dtype).name, "--phases", *phases]
    if not batch_norm:
        command.append("--no-batch-norm")
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env, text=True
        )
    except OSError:
        process = None
    return Warmup(process, phases)


def _marker(phase: str, dtype: np.dtype, batch_norm: bool) -> Path | None:
    """The file that says ``phase`` was compiled completely into numba's cache for this CPU, dtype
    and batch-norm setting: in the cache directory of :mod:`numpyside.kernels` (which
    :mod:`numpyside.kernels.jit` keys by the kernels' sources, so a changed kernel drops it), named
    after numba's identification of the CPU. None where nothing is cached."""
    from numba.core.registry import cpu_target

    from numpyside.kernels import jit

    directory = jit.cache_dir(Path(jit.__file__).resolve().parent)
    if directory is None:
        return None
    cpu = hashlib.sha256(repr(cpu_target.target_context.codegen().magic_tuple()).encode()).hexdigest()[:16]
    return directory / f"warmup-{cpu}-{dtype.name}-{'bn' if batch_norm else 'plain'}-{phase}.done"


def _synthetic_data(dtype: np.dtype, batch_norm: bool, n: int = 256):
    """Random images, labels, parameters and running statistics in the run's types and layout."""
    from compare.contract import LAYER_SIZES, param_shapes, state_shapes

    rng = np.random.default_rng(0)
    images = rng.random((n, LAYER_SIZES[0])).astype(dtype)
    labels = rng.integers(0, LAYER_SIZES[-1], n).astype(np.int32)  # compare.mnist's label type
    params = [
        {key: (0.1 * rng.standard_normal(shape)).astype(dtype) for key, shape in layer.items()}
        for layer in param_shapes(batch_norm)
    ]
    state = [{key: np.ones(shape, dtype) for key, shape in layer.items()} for layer in state_shapes()]
    return params, state if batch_norm else [], images, labels


def compile_phase(phase: str, dtype: np.dtype, batch_norm: bool) -> None:
    """Call ``phase``'s kernels once with the run's argument types (see the module docstring)."""
    check_phase(phase)
    params, state, images, labels = _synthetic_data(dtype, batch_norm)
    batch = images[:128]
    if phase == "model":
        from numpyside import model

        model.loss_and_grads(params, state, batch, labels[:128], backend="numba")
        model.train_logits(params, state, batch, backend="numba")
        model.predict_logits(params, state, batch, backend="numba")
    else:
        from numpyside.fast import FastTrainer

        trainer = FastTrainer(params, state, images, labels, momentum=0.9, backend="numba")
        trainer.whole_epoch = trainer.whole_epoch and phase == "trainer"
        trainer.compile(1, 128)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m numpyside.warmup", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    args = parser.parse_args(argv)
    dtype, batch_norm = np.dtype(args.dtype), not args.no_batch_norm
    for phase in args.phases:
        marker = _marker(phase, dtype, batch_norm)
        if marker is None or not marker.exists():
            compile_phase(phase, dtype, batch_norm)
            if marker is not None:
                marker.touch()
        print(phase, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
