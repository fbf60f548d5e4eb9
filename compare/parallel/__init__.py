"""Data-parallel training over devices and processes, checked against one device and the NumPy side.

    python -m compare.parallel --devices D [run options]                  # D devices, one process
    python -m compare.parallel --processes P --devices-per-process D      # P local processes
    python -m compare.parallel --coordinator HOST:PORT --num-processes P --process-id I ...
                                                                          # one process of a multi-host job

``compare/run.py --devices D`` / ``--processes P`` land here. Read in this order:

* :mod:`~compare.parallel.cli`: the options (``compare/run.py``'s and the multi-process ones) and ``main``;
* :mod:`~compare.parallel.process`: one process: the devices asked for before JAX starts, JAX's
  distributed runtime joined (gloo on loopback), the mesh;
* :mod:`~compare.parallel.sharded`: the sharded JAX side (:class:`jaxside.parallel.Trainer`, batch norm
  synchronised over every device of every process) against one device and the NumPy side, the report;
* :mod:`~compare.parallel.launcher`: the local processes on a free loopback port, ended by PID, bounded waits;
* :mod:`~compare.parallel.scaling`: samples/s against processes and devices (``--scaling``, ``--throughput``).
"""

from compare.parallel.cli import main

__all__ = ["main"]
