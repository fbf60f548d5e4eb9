"""Throughput of one training step (gather, forward, backward, SGD) of every implementation, next to
"the limit": the step's 11 matrix products alone on the same shapes, done in each repeat by the
fastest of the limit's engines (NumPy's BLAS from Python and from numba, the NumPy side's own GEMM,
XLA's dot); and each row's FLOP/s against the machine's peak (one large square product).

    vmap-bn-bench [--quick] [--threads 1 2] [--under-load] [--out DIR] [--batch-sizes ...] [--dtypes ...]
                  [--ensemble M] [--scaling]

Each thread count runs in a worker process of its own, on that many cores, with OpenBLAS, numba,
XLA's intra-op pool and PyTorch held to that many threads. There, per dtype and batch size, the rows
and the limit's engines are timed round-robin: a row's ``fraction_of_limit`` is the median over the
rounds of ``t(limit) / t(row)``, ``t(limit)`` the fastest engine's time in the same round. Output:
tables, ``bench.json`` (a list of rows, keys in :func:`compare.bench.rows.row`), ``bench_run.json``
(the command, the machine, the peaks) and ``bench.png`` in ``--out``. Method and results:
``docs/performance.md``.

By concern:

* :mod:`~compare.bench.cli`: the command (``main``), the run over thread counts;
* :mod:`~compare.bench.worker`: one worker process, held to its cores and threads;
* :mod:`~compare.bench.registry`: the rows (implementations), built when a bench runs;
* :mod:`~compare.bench.runners`: each implementation's training steps, made ready to time;
* :mod:`~compare.bench.limit`: the limit's engines (the step's matrix products alone), the machine's peak;
* :mod:`~compare.bench.timing`: the one timing loop every row goes through, and the load;
* :mod:`~compare.bench.rows`: the rows at one batch size, under load, over a whole epoch;
* :mod:`~compare.bench.ensemble`, :mod:`~compare.bench.sharded`: the opt-in ``--ensemble`` and ``--scaling`` rows;
* :mod:`~compare.bench.output`: tables, verdicts, ``bench.png``.
"""

from compare.bench.cli import main

__all__ = ["main"]
