"""How many devices JAX gets: ``--devices D`` on CPU means ``D`` host devices in one process.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX's CPU backend starts (at the
first computation or ``jax.devices()`` call), so :func:`request_devices` must run before that;
:func:`checked_devices` afterwards says clearly when JAX was already started with fewer devices.
On a machine with GPUs the flag does nothing and the GPUs are the devices.
"""

from __future__ import annotations

import os
import re

import jax
from jax._src import xla_bridge

from compare.contract import InputError

FLAG = "--xla_force_host_platform_device_count"


def request_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices (sets ``XLA_FLAGS``; replaces an earlier count)."""
    if count < 1:
        raise InputError(f"the number of devices must be at least 1, got {count}")
    flags = re.sub(rf"{FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{FLAG}={count}"])


def jax_started() -> bool:
    """Whether JAX's backends are already running (then the device count can no longer change)."""
    return bool(xla_bridge.backends_are_initialized())


def checked_devices(count: int, *, started_earlier: bool = False) -> list:
    """The first ``count`` of ``jax.local_devices()``, or an InputError that says why there are fewer
    (``started_earlier``: JAX was already running before the devices could be requested)."""
    devices = jax.local_devices()
    if count > len(devices):
        raise InputError(
            f"{count} devices requested but JAX has only {len(devices)} ({devices[0].platform}): "
            + ("JAX had already started in this process, and " if started_earlier else "")
            + f"the device count is fixed when JAX starts; on CPU set XLA_FLAGS={FLAG}={count} before the first "
            "JAX computation (the --devices option does it when JAX has not started yet), or start a new process"
        )
    return devices[:count]
