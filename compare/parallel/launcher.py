"""Starting and watching the processes of a local multi-process JAX run, with bounded waits.

* :func:`free_loopback_port`: a port the OS has just given out on 127.0.0.1 (none is hard-coded).
* :func:`wait_for_coordinator`: a TCP connect to the coordinator, retried until a deadline, so an
  unreachable coordinator is a clear error instead of JAX's abort after its own timeout.
* :func:`supervise`: waits for child processes; the first that fails, or the deadline, ends the
  others (by PID: terminate, then kill) and raises :class:`RunFailed` saying which and why.
* :func:`watchdog`: ends this process with a message if a phase does not finish in time.
* :func:`launch`: the ``--processes P`` processes of one ``python -m compare.parallel`` job.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class RunFailed(RuntimeError):
    """A process of the run failed, or the run did not finish in time."""


def without(argv: list[str], options: set[str]) -> list[str]:
    """``argv`` without the given options (and their values)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in options:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Return once ``address`` accepts a TCP connection; RunFailed after ``timeout`` seconds."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout)):
                return
        except OSError as error:
            last_error = error
            time.sleep(0.2)
    raise RunFailed(
        f"cannot reach the coordinator at {address} within {timeout:g} s ({last_error}): is process 0 running "
        "and is the address one this machine can reach?"
    )


def watchdog(seconds: float, message: str) -> threading.Event:
    """Print ``message`` and end this process (status 1) unless the returned event is set within
    ``seconds``. (JAX's distributed runtime blocks in C++; a thread is the way to bound it.)"""
    done = threading.Event()

    def watch():
        if not done.wait(seconds):
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    return done


def end_process(process: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate ``process`` (by its PID), then kill it if it is still there after ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _tail(path: Path | None, lines: int = 12) -> str:
    if path is None or not path.exists():
        return ""
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join("    " + line for line in text[-lines:])


def supervise(
    processes: Sequence[subprocess.Popen], timeout: float, logs: Sequence[Path | None] = (), poll: float = 0.1
) -> None:
    """Wait until every process has exited with status 0. If one fails or ``timeout`` seconds pass,
    end the others and raise RunFailed naming the process, its status and the end of its log."""
    logs = list(logs) + [None] * (len(processes) - len(logs))
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in processes]
            for index, code in enumerate(codes):
                if code not in (None, 0):
                    tail = _tail(logs[index])
                    raise RunFailed(
                        f"process {index} (pid {processes[index].pid}) {_describe(code)}; ended the others"
                        + (f"\n  its last lines:\n{tail}" if tail else "")
                    )
            if all(code == 0 for code in codes):
                return
            if time.monotonic() > deadline:
                waiting = [i for i, code in enumerate(codes) if code is None]
                raise RunFailed(f"the run did not finish within {timeout:g} s (processes {waiting} still running)")
            time.sleep(poll)
    finally:
        for process in processes:
            end_process(process)


def launch(args) -> int:
    """Start ``args.processes`` local processes of one job and wait for them (bounded by ``--timeout``)."""
    port = free_loopback_port()
    address = f"127.0.0.1:{port}"
    common = without(args.argv, {"--processes", "--devices", "--devices-per-process"})
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}  # logs current when a process fails
    print(f"launching {args.processes} processes x {args.devices} devices, coordinator on {address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` below ends the children
    with tempfile.TemporaryDirectory(prefix="vmap-bn-parallel-") as folder:
        logs = [Path(folder, f"process{i}.log") for i in range(args.processes)]
        children = []
        try:
            for i in range(args.processes):
                command = [
                    *(sys.executable, "-m", "compare.parallel", *common),
                    *("--coordinator", address, "--bind-address", address),
                    *("--num-processes", str(args.processes), "--process-id", str(i)),
                    *("--devices-per-process", str(args.devices)),
                ]
                with open(logs[i], "w") as log:
                    children.append(
                        subprocess.Popen(
                            command,
                            cwd=REPO_ROOT,
                            env=env,
                            stdout=None if i == 0 else log,
                            stderr=log,
                        )
                    )
            supervise(children, args.timeout, logs)
        finally:
            for child in children:
                end_process(child)
    return 0
