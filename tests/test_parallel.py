"""Data-parallel training with synchronised batch norm: equal to one device, over devices and processes.

Several devices need a fresh JAX (the device count is fixed when JAX starts), so those checks run
in subprocesses with bounded time: ``tests/parallel_checks.py`` (4 CPU devices, meshes of 2 and 4)
and ``python -m compare.parallel`` (2 processes x 2 devices). Every process a test starts is ended
by the test (by PID) or by the launcher it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compare.contract import InputError
from compare.parallel import launcher
from tests.helpers import random_params, random_state

ROOT = Path(__file__).resolve().parents[1]
#: float64: sharded and single-device runs differ only in the order of sums (a few ulps, 2.2e-16
#: each); the issue's bound 1e-12 leaves room for the growth over 20 steps.
EXACT = 1e-12
#: The NumPy mirror sums in another order than XLA (BLAS, NumPy's pairwise sums): a few hundred ulps.
ACROSS_SIDES = 1e-10
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}  # so that the test can read a worker's log as it goes


def _run(command, timeout, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` with a time limit; on timeout SIGTERM it (its own cleanup runs), then kill it."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.end_process(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# ------------------------------------------------------------------------------------------------
# several devices in one process (one subprocess for all checks)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "checks.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = _run([sys.executable, str(ROOT / "tests" / "parallel_checks.py"), str(out)], timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("devices", [2, 4])
def test_sharded_step_equals_one_device(device_checks, devices):
    r = device_checks[f"D{devices}"]
    assert device_checks["device_count"] == 4
    assert r["step_vs_single"] <= EXACT  # loss, every gradient, running statistics
    assert r["loss_vs_single"] <= EXACT and r["state_vs_single"] <= EXACT
    assert r["params_after_20_steps"] <= EXACT and r["state_after_20_steps"] <= EXACT
    assert r["float32_predictions_differ"] == 0  # an epoch at --quick sizes, 1000 test images


@pytest.mark.parametrize("devices", [2, 4])
def test_every_device_holds_the_same_result(device_checks, devices):
    """With check_vma=False, out_specs=P() would return device 0's copy even if the copies differed:
    each device's copy is compared; and without the psum of the gradients the check does fail."""
    r = device_checks[f"D{devices}"]
    assert r["spread"] == 0.0 and r["unsynced_spread"] == 0.0
    assert r["spread_unreduced"] > 1e-3


@pytest.mark.parametrize("devices", [2, 4])
def test_per_device_statistics_are_ghost_batch_norm(device_checks, devices):
    r = device_checks[f"D{devices}"]
    assert r["unsynced_vs_synced"] > 1e-3  # a different model
    assert r["unsynced_vs_ghost"] <= EXACT  # ghost batch norm, G = D, from jaxside.model's pieces
    assert r["unsynced_vs_ensemble_ghost"] <= EXACT  # and jaxside.ensemble's ghost_batches=D


@pytest.mark.parametrize("devices", [2, 4])
def test_numpy_mirror_equals_sharded_jax(device_checks, devices):
    assert device_checks[f"D{devices}"]["numpy_mirror_vs_sharded"] <= ACROSS_SIDES


def test_batch_not_divisible_by_devices(device_checks):
    message = device_checks["D4"]["indivisible_error"]
    assert message is not None and "63 examples cannot be split evenly over 4 devices" in message


#: An ensemble's members over D devices against one device, float64, 6 steps: the partitioned
#: program sums the same terms except where XLA fuses a reduction differently, a few ulp that SGD
#: carries (measured: at most 8.9e-16, pooled over 2 devices); 1e-13 is ~100x that.
ENSEMBLE_OVER_DEVICES = 1e-13


@pytest.mark.parametrize("kind", ["shared", "per_member", "pooled"])
@pytest.mark.parametrize("devices", [2, 4])
def test_ensemble_members_over_devices_train_as_on_one(device_checks, kind, devices):
    found = device_checks["ensemble"]
    assert found[f"{kind}_D{devices}_shards"] == devices  # really split, not replicated
    assert found[f"{kind}_D{devices}_vs_D1"] <= ENSEMBLE_OVER_DEVICES


def test_ensemble_devices_are_checked(device_checks):
    found = device_checks["ensemble"]
    assert "devices must divide the number of members: 4 members over 3 devices" in found["not_dividing_error"]
    assert "8 devices requested but JAX has only 4" in found["too_many_error"]


# ------------------------------------------------------------------------------------------------
# the NumPy mirror and the all-reduce counts (no devices needed)
# ------------------------------------------------------------------------------------------------


def _max_diff(a, b) -> float:
    import jax

    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_numpy_mirror_equals_full_batch(mnist, shards):
    from numpyside import model
    from numpyside import parallel as numpy_parallel

    params, state = random_params(0), random_state(0)
    x, y = mnist[0][:64].astype(np.float64), mnist[1][:64]
    full = model.loss_and_grads(params, state, x, y, backend="numpy")
    assert _max_diff(numpy_parallel.loss_and_grads(params, state, x, y, shards=shards), full) <= EXACT
    with pytest.raises(InputError, match="cannot be split evenly over"):
        numpy_parallel.loss_and_grads(params, state, x[:63], y[:63], shards=4)


def test_all_reduce_counts_match_the_jaxpr():
    """2 forward + 2 backward all-reduces per batch-norm layer on both sides. At the end of the step
    JAX sums the loss and all 11 gradients in ONE psum (flattened); the mirror makes one all-reduce
    per weight and bias gradient (5) and the loss, and reuses its coupling sums as dgamma, dbeta."""
    from compare.studies.sync_counts import jax_counts, numpy_counts
    from numpyside.parallel import BATCH_NORM, END, LOSS_AND_GRADIENTS

    jax_side, numpy_side = jax_counts(n_devices=2), numpy_counts(shards=2)
    for phase in ("forward", "backward"):
        assert jax_side[phase, BATCH_NORM] == numpy_side[phase, BATCH_NORM] == 2 * 3
    assert (jax_side[END, LOSS_AND_GRADIENTS], numpy_side[END, LOSS_AND_GRADIENTS]) == (1, 6)
    assert sum(jax_side.values()) == 13 and sum(numpy_side.values()) == 18  # nothing else


def test_two_pass_variance_survives_the_stress_case():
    from compare.studies.variance import measure

    result = measure(ratio=1e4, batch=256, devices=4)
    assert result["two_pass_max_rel_err"] < 1e-4 and result["two_pass_negative"] == 0
    assert result["one_pass_max_rel_err"] > 1.0  # E[x^2] - E[x]^2 loses every digit here
    assert result["jax_batchnorm_train_max_rel_err"] < 1e-4  # the JAX side sums in two passes too


# ------------------------------------------------------------------------------------------------
# several processes
# ------------------------------------------------------------------------------------------------


def test_two_processes_of_two_devices_equal_one_device(tmp_path):
    command = [sys.executable, "-m", "compare.parallel", "--processes", "2", "--devices-per-process", "2"]
    command += ["--quick", "--epochs", "1", "--dtype", "float64", "--no-progress", "--out", str(tmp_path)]
    proc = _run([*command, "--timeout", "300"], timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["parallel"]
    assert (section["devices"], section["processes"], section["devices_per_process"]) == (4, 2, 2)
    assert section["step0_max_abs_diff_vs_single_device"] <= EXACT  # loss, grads, running stats
    assert section["max_param_diff_vs_single_device"] <= EXACT  # after 32 steps
    assert section["max_state_diff_vs_single_device"] <= EXACT
    assert report["passed"] is True


def _worker(port: int, process_id: int, *extra: str) -> list[str]:
    address = f"127.0.0.1:{port}"
    return [
        *(sys.executable, "-m", "compare.parallel", "--coordinator", address, "--bind-address", address),
        *("--num-processes", "2", "--process-id", str(process_id), "--quick", "--no-progress", *extra),
    ]


def test_a_dying_process_ends_the_run(tmp_path):
    port = launcher.free_loopback_port()
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    extra = ("--epochs", "3", "--heartbeat-timeout", "5", "--out", str(tmp_path))
    processes = []
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                processes.append(
                    subprocess.Popen(_worker(port, i, *extra), cwd=ROOT, stdout=log, stderr=log, env=UNBUFFERED)
                )
        deadline = time.monotonic() + 180
        while "data-parallel" not in logs[0].read_text():  # printed once the job has started
            assert time.monotonic() < deadline, logs[0].read_text()[-2000:]
            assert processes[0].poll() is None, logs[0].read_text()[-2000:]
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = processes[0].wait(timeout=60)
        assert code != 0
        assert time.monotonic() - killed < 45
        log = logs[0].read_text()
        assert "another task died" in log or "heartbeat" in log or "Gloo" in log, log[-2000:]
    finally:
        for process in processes:
            launcher.end_process(process)


def test_a_process_count_that_does_not_match(tmp_path):
    """Process 0 of a job of 2 started alone: a clear error after --connect-timeout, not a hang."""
    port = launcher.free_loopback_port()
    proc = _run(_worker(port, 0, "--connect-timeout", "3", "--out", str(tmp_path)), timeout=120)
    assert proc.returncode == 1
    assert "not all 2 processes joined the coordinator" in proc.stderr


def test_processes_started_with_different_options(tmp_path):
    port = launcher.free_loopback_port()
    processes = [
        subprocess.Popen(
            _worker(port, i, "--epochs", str(1 + i), "--out", str(tmp_path)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 2 and "started with different options" in err, err[-2000:]
    finally:
        for process in processes:
            launcher.end_process(process)


def test_an_unreachable_coordinator(tmp_path, capsys):
    from compare import parallel

    port = launcher.free_loopback_port()  # nobody listens there
    start = time.monotonic()
    argv = _worker(port, 1, "--connect-timeout", "1", "--out", str(tmp_path))[3:]
    assert parallel.main(argv) == 1
    assert time.monotonic() - start < 30
    assert f"cannot reach the coordinator at 127.0.0.1:{port}" in capsys.readouterr().err


def test_more_devices_than_jax_started_with(tmp_path, capsys):
    import jax

    from compare import parallel

    jax.devices()  # JAX is running (with one CPU device): the count can no longer change
    assert parallel.main(["--devices", "64", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "64 devices requested but JAX has only" in err and "had already started" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--processes", "3", "--batch-size", "128"], "cannot be split evenly over 3 devices"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id must lie"),
        (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    from compare import parallel

    with pytest.raises(SystemExit) as exit_info:
        parallel.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_supervise_ends_the_others_when_one_fails():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    start = time.monotonic()
    try:
        with pytest.raises(launcher.RunFailed, match=r"process 1 \(pid \d+\) exited with status 3"):
            launcher.supervise([sleeper, failing], timeout=60)
        assert sleeper.poll() is not None and time.monotonic() - start < 30
        sleeper2 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with pytest.raises(launcher.RunFailed, match="did not finish within"):
            launcher.supervise([sleeper2], timeout=0.5)
        assert sleeper2.poll() is not None
    finally:
        launcher.end_process(sleeper)
        launcher.end_process(failing)
