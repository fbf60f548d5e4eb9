"""How many devices JAX gets: ``--devices D`` on CPU means ``D`` host devices in one process.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX's CPU backend starts (at the
first computation or ``jax.devices()`` call), so :func:`request_devices` must run before that;
:func:`checked_devices` afterwards says clearly when JAX was already started with fewer devices.
On a machine with GPUs the flag does nothing and the GPUs are the devices.
"""

from __future__ import annotations

import os
import re

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
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def checked_devices(count: int) -> list:
    """The first ``count`` of ``jax.local_devices()``, or an InputError that says why there are fewer."""
    import jax

    devices = jax.local_devices()
    if count > len(devices):
        flags = os.environ.get("XLA_FLAGS", "")
        raise InputError(
            f"{count} devices requested but JAX has only {len(devices)} ({devices[0].platform}); "
            + (
                f"XLA_FLAGS says {flags!r} but JAX had already started before it was set: set "
                f"XLA_FLAGS={FLAG}={count} before the first JAX computation (or start a new process)"
                if FLAG in flags
                else f"on CPU set XLA_FLAGS={FLAG}={count} before JAX starts (the --devices option does)"
            )
        )
    return devices[:count]


def setup_devices(count: int) -> list:
    """:func:`request_devices` if JAX has not started yet, then :func:`checked_devices`."""
    if not jax_started():
        request_devices(count)
    return checked_devices(count)
