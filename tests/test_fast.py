"""``numpyside.fast.FastTrainer`` computes what the reference ``numpyside.train.Trainer`` computes.

Both trainers start from the same parameters and train on the same batches; afterwards their
parameters, velocities, running statistics, per-step losses and test predictions are compared.

Tolerances (absolute, the parameters are O(1)): float64 ``1e-12``, float32 ``1e-5``. The fast path
performs the reference's floating-point operations in the reference's order (same BLAS calls with
the same operands, same kernels' arithmetic, only fused and written into preallocated buffers), so
on one machine the two agree bit for bit, which ``test_bit_identical_to_the_reference`` checks; the
tolerances are what the comparison may rely on anywhere (where the BLAS or NumPy's SIMD loops might
differ between the two call paths, the difference is rounding, ~1e-16 per step in float64 and
~1e-7 in float32, accumulated over a few dozen steps).
"""

from __future__ import annotations

import inspect
import itertools
import os
import subprocess
import sys
import tracemalloc

import numba
import numpy as np
import pytest

from compare import training
from compare.contract import InputError
from compare.init import init_params, init_state
from numpyside.fast import FastTrainer
from numpyside.kernels import blas, fused, products, threads
from numpyside.train import Trainer

TOL = {"float64": 1e-12, "float32": 1e-5}
N_TRAIN = 2048


@pytest.fixture(scope="module")
def data(mnist):
    train_x, train_y, test_x, _test_y = mnist
    return train_x[:N_TRAIN], train_y[:N_TRAIN], test_x[:500]


def make_pair(data, dtype, batch_norm, backend, seed=0):
    train_x, train_y, _ = data
    params = init_params(seed, dtype, batch_norm=batch_norm)
    state = init_state(dtype, batch_norm)
    images = train_x.astype(dtype)
    reference = Trainer(params, state, images, train_y, momentum=0.8, backend=backend)
    fast = FastTrainer(params, state, images, train_y, momentum=0.8, backend=backend)
    return reference, fast


def train_both(reference, fast, schedule, seed=0):
    """The same epochs on both trainers: ``schedule`` is a list of batch sizes, one per epoch. The
    reference's BLAS gets as many threads as the fast trainer's (OpenBLAS's results depend on its
    thread count: one thread and two differ in the last bits of some products)."""
    rng = training.batch_rng(seed)
    losses = []
    for epoch, batch_size in enumerate(schedule):
        batches = training.epoch_batches(N_TRAIN, batch_size, rng)
        rates = training.LearningRateSchedule(0.3, len(schedule) * len(batches)).for_epoch(epoch, len(batches))
        with threads.limited(fast.threads, shared_pool=False):
            reference_losses = reference.epoch(batches, rates)
        losses.append((reference_losses, fast.epoch(batches, rates)))
    return losses


def max_diff(tree_a, tree_b) -> float:
    return max(
        (
            float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
            for a, b in zip(tree_a, tree_b)
            for k in a
        ),
        default=0.0,
    )


CASES = [
    (dtype, batch_norm, backend)
    for dtype in ("float64", "float32")
    for batch_norm in (True, False)
    for backend in ("numba", "numpy")
]


@pytest.mark.parametrize("dtype, batch_norm, backend", CASES)
def test_fast_trainer_matches_the_reference(data, dtype, batch_norm, backend):
    reference, fast = make_pair(data, dtype, batch_norm, backend)
    fast.compile(N_TRAIN // 128, 128)  # warm-up must not change anything
    losses = train_both(reference, fast, [128, 64])
    tol = TOL[dtype]
    for ref_losses, fast_losses in losses:
        assert fast_losses.dtype == np.dtype(dtype) and fast_losses.shape == ref_losses.shape
        assert np.max(np.abs(fast_losses.astype(np.float64) - ref_losses)) <= tol
    assert max_diff(fast.params_numpy(), reference.params_numpy()) <= tol
    assert max_diff(fast.velocity, reference.velocity) <= tol
    assert max_diff(fast.state_numpy(), reference.state_numpy()) <= tol
    assert len(fast.state_numpy()) == (3 if batch_norm else 0)
    test_x = data[2].astype(dtype)
    with threads.limited(fast.threads, shared_pool=False):
        expected = reference.predict(test_x)
    np.testing.assert_array_equal(fast.predict(test_x), expected)
    # the layout of params/state is the shared one
    for a, b in zip(fast.params_numpy(), reference.params_numpy()):
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "backend, whole_epoch, n_threads, shared_pool",
    [
        ("numba", True, 1, True),
        ("numba", True, 2, True),
        ("numba", True, 2, False),
        ("numba", False, 1, False),
        ("numpy", False, 1, False),
        ("numpy", False, 2, False),
    ],
)
def test_bit_identical_to_the_reference(data, dtype, backend, whole_epoch, n_threads, shared_pool):
    """On one machine the fast path with ``gemm="blas"`` repeats the reference's operations exactly,
    with as many BLAS threads as the reference: the numba backend with a whole epoch in one call (on one core; on two
    with its kernels and BLAS's jobs on numba's threads; BLAS on its own two threads and the kernels
    on one) and with np.matmul between the kernels; the NumPy backend."""
    if whole_epoch and not blas.available():
        pytest.skip(f"numpyside.kernels.blas: {blas.UNAVAILABLE_REASON}")
    if n_threads > 1 and shared_pool and not threads.available():
        pytest.skip(f"numpyside.kernels.threads: {threads.unavailable_reason()}")
    reference, fast = make_pair(data, dtype, True, backend)
    fast.whole_epoch, fast.threads, fast.shared_pool = whole_epoch, n_threads, shared_pool
    fast.gemm = "blas"  # every product on NumPy's BLAS, as the reference's
    for ref_losses, fast_losses in train_both(reference, fast, [128]):
        np.testing.assert_array_equal(fast_losses, ref_losses)
    for a, b in zip(fast.params_numpy() + fast.state_numpy(), reference.params_numpy() + reference.state_numpy()):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("dtype, batch", [("float64", 128), ("float32", 100)])  # 100: parts of unequal rows
def test_numba_gemm_gives_the_same_bits_on_one_thread_and_on_two(data, dtype, batch):
    """Every product on the numba GEMM (one fma chain per element, whatever the split): the
    trainer's numbers do not depend on its threads, nor on whether the pacer ran a chunk of steps
    on them or on one, so it may follow the machine's load without changing the result. Against
    the reference (BLAS products, summed in another order) they agree within the tolerance."""
    reference, one = make_pair(data, dtype, True, "numba")
    _, two = make_pair(data, dtype, True, "numba")
    one.gemm = two.gemm = "numba"
    one.threads, two.threads = 1, 2
    two.pacer = threads.Pacer(chunk=3, probe=2, interval=1, max_interval=1)  # switches modes often
    ((ref_losses, one_losses),) = train_both(reference, one, [batch])
    rng = training.batch_rng(0)
    batches = training.epoch_batches(N_TRAIN, batch, rng)
    rates = training.LearningRateSchedule(0.3, len(batches)).for_epoch(0, len(batches))
    np.testing.assert_array_equal(two.epoch(batches, rates), one_losses)
    for a, b in zip(two.params_numpy() + two.state_numpy(), one.params_numpy() + one.state_numpy()):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    if numba.config.NUMBA_NUM_THREADS >= 2:
        assert two.pacer.chunks[True] and two.pacer.chunks[False]  # both modes ran
    assert np.max(np.abs(one_losses.astype(np.float64) - ref_losses)) <= TOL[dtype]
    assert max_diff(one.params_numpy(), reference.params_numpy()) <= TOL[dtype]


def test_bad_gemm_choice_is_refused(data):
    _, fast = make_pair(data, "float32", True, "numba")
    fast.gemm = "mkl"
    with pytest.raises(ValueError, match=r"FastTrainer\.gemm"):
        fast.epoch(np.arange(128).reshape(1, 128), np.full(1, 0.1))


ONE_THREAD_SCRIPT = """
import numpy as np, numba.np.ufunc.parallel as parallel
from compare.init import init_params, init_state
from numpyside.kernels import threads
from numpyside.fast import FastTrainer
rng = np.random.default_rng(0)
images, labels = rng.random((256, 784), np.float32), rng.integers(0, 10, 256).astype(np.int32)
trainer = FastTrainer(init_params(0, "float32"), init_state("float32"), images, labels, momentum=0.8)
before = threads.openblas_threads()
trainer.epoch(np.arange(256).reshape(2, 128), np.full(2, 0.1))
trainer.predict(images[:3])
print(trainer.threads, parallel._is_initialized, threads.openblas_threads() == before)
"""


def test_one_thread_by_default_starts_no_threads():
    """A default trainer, in a fresh process, trains and predicts on one thread: numba's threading
    layer is never started (nothing of ours waits for a second core), and OpenBLAS's thread count
    is back afterwards."""
    env = {k: v for k, v in os.environ.items() if k != threads.THREADS_VARIABLE}
    result = subprocess.run(
        [sys.executable, "-c", ONE_THREAD_SCRIPT], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    assert result.stdout.split() == ["1", "False", "True"], result.stderr
    with threads.limited(1) as parts:
        assert parts == 1 and threads.openblas_threads() == 1
    with pytest.raises(ValueError), threads.limited(0):
        pass


def test_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv(threads.THREADS_VARIABLE, "2")
    assert threads.default_count() == 2
    monkeypatch.setenv(threads.THREADS_VARIABLE, "two")
    with pytest.raises(ValueError, match=threads.THREADS_VARIABLE):
        threads.default_count()
    monkeypatch.delenv(threads.THREADS_VARIABLE)
    assert threads.default_count() == threads.DEFAULT_THREADS


@pytest.mark.skipif(not blas.available(), reason=f"numpyside.kernels.blas: {blas.UNAVAILABLE_REASON}")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gemm_from_numba_is_numpys_matmul(dtype):
    """products.matmul / matmul_tn / matmul_nt call NumPy's own BLAS exactly as np.matmul does."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((37, 53)).astype(dtype), rng.standard_normal((53, 29)).astype(dtype)
    d = rng.standard_normal((37, 29)).astype(dtype)
    for kernel, a, b, expected in (
        (products.matmul, x, w, x @ w),
        (products.matmul_tn, x, d, x.T @ d),
        (products.matmul_nt, d, w, d @ w.T),
    ):
        out = np.full(expected.shape, np.nan, dtype)
        kernel(a, b, out)
        np.testing.assert_array_equal(out, expected)


def test_buffers_are_reused_across_batch_sizes(data):
    reference, fast = make_pair(data, "float64", True, "numba")
    train_both(reference, fast, [32])
    buffers_32 = fast._buffers[32]
    arrays_32 = [id(buffers_32.x), id(buffers_32.z), id(buffers_32.d)]
    losses = train_both(reference, fast, [64, 32, 128, 32], seed=1)
    assert sorted(fast._buffers) == [32, 64, 128]
    assert fast._buffers[32] is buffers_32 and [id(buffers_32.x), id(buffers_32.z), id(buffers_32.d)] == arrays_32
    for ref_losses, fast_losses in losses:
        assert np.max(np.abs(fast_losses - ref_losses)) <= TOL["float64"]
    assert max_diff(fast.params_numpy(), reference.params_numpy()) <= TOL["float64"]
    assert max_diff(fast.state_numpy(), reference.state_numpy()) <= TOL["float64"]


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_a_step_allocates_almost_nothing(data, backend):
    """After the first epoch at a batch size, training allocates only the losses, one copy of the
    indices (as ``np.intp``) and a few small temporaries (the NumPy path's fancy indexing): less
    than one activation (128 x 100) on top of the indices."""
    _, fast = make_pair(data, "float32", True, backend)
    batches = training.epoch_batches(N_TRAIN, 128, training.batch_rng(0))
    rates = np.full(len(batches), 0.1)
    fast.epoch(batches, rates)
    tracemalloc.start()
    try:
        fast.epoch(batches, rates)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    activation_bytes = 128 * 100 * 4
    index_bytes = batches.size * np.dtype(np.intp).itemsize
    assert peak < index_bytes + activation_bytes, f"an epoch allocated {peak} bytes at its peak"


def test_compile_changes_nothing(data):
    _, fast = make_pair(data, "float64", True, "numba")
    before = fast.params_numpy(), fast.state_numpy()
    seconds = fast.compile(10, 128)
    assert seconds >= 0
    assert max_diff(fast.params_numpy(), before[0]) == 0 and max_diff(fast.state_numpy(), before[1]) == 0
    assert not np.any(fast._velocity.flat)


def test_same_interface_as_the_reference_trainer():
    def public(cls):
        return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}

    assert public(Trainer) <= public(FastTrainer)
    ref_params = inspect.signature(Trainer.__init__).parameters
    fast_params = inspect.signature(FastTrainer.__init__).parameters
    assert list(ref_params) == list(fast_params)
    assert all(fast_params[k].default == ref_params[k].default for k in ref_params)
    for name in public(Trainer):
        reference = list(inspect.signature(getattr(Trainer, name)).parameters)
        fast = inspect.signature(getattr(FastTrainer, name)).parameters
        assert list(fast)[: len(reference)] == reference, name
        extras = [fast[k] for k in list(fast)[len(reference) :]]  # optional keywords only (compile's background)
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extras), name


@pytest.mark.parametrize(
    "batches, rates, match",
    [
        (np.array([[0, 1], [2, N_TRAIN]]), np.ones(2), r"batch_indices must lie in 0\.\."),
        (np.array([[0, -1]]), np.ones(1), r"batch_indices must lie in 0\.\."),
        (np.array([0, 1, 2]), np.ones(1), r"\(steps, batch\) integer array"),
        (np.array([[0.0, 1.0]]), np.ones(1), r"\(steps, batch\) integer array"),
        (np.array([[0, 1], [2, 3]]), np.ones(3), r"one rate per step, shape \(2,\)"),
        (np.array([[0], [1]]), np.ones(2), "at least 2 examples"),
    ],
)
def test_bad_epoch_input_is_refused(data, batches, rates, match):
    _, fast = make_pair(data, "float32", True, "numba")
    before = fast.params_numpy()
    with pytest.raises(InputError, match=match):
        fast.epoch(batches, rates)
    assert max_diff(fast.params_numpy(), before) == 0


def test_bad_backend_is_refused(data):
    train_x, train_y, _ = data
    with pytest.raises(InputError, match="backend"):
        FastTrainer(init_params(0), init_state(), train_x, train_y, momentum=0.8, backend="cuda")


def test_the_comparison_trains_the_numpy_side_with_the_fast_trainer(data):
    from compare.run import parse_args
    from compare.sides import numpy_side

    train_x, train_y, _ = data
    params, state = init_params(0), init_state()
    assert isinstance(numpy_side("numba").make_trainer(params, state, train_x, train_y, momentum=0.8), FastTrainer)
    slow = numpy_side("numpy", fast=False).make_trainer(params, state, train_x, train_y, momentum=0.8)
    assert type(slow) is Trainer and slow.backend == "numpy"
    assert parse_args([]).reference_trainer is False and parse_args(["--reference-trainer"]).reference_trainer


@pytest.mark.parametrize(
    "n, parts, align", [(100, 2, 16), (128, 2, 1), (99_584, 2, 16), (100, 3, 16), (7, 2, 16), (5, 1, 16)]
)
def test_part_bounds_cover_the_range_in_aligned_disjoint_parts(n, parts, align):
    bounds = [fused.part_bounds(n, part, parts, align) for part in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(hi == next_lo for (_, hi), (next_lo, _) in itertools.pairwise(bounds))
    assert all(lo <= hi for lo, hi in bounds)
    assert all(lo % align == 0 for lo, _ in bounds[1:] if lo < n)


@pytest.mark.skipif(not threads.available(), reason=f"numpyside.kernels.threads: {threads.unavailable_reason()}")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_blas_on_numba_threads_gives_the_same_products(dtype):
    """OpenBLAS's jobs run on numba's threads compute exactly what its own threads compute; on exit
    its own threads are back and still give those bits."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((128, 784)).astype(dtype), rng.standard_normal((784, 100)).astype(dtype)
    native = x @ w
    with threads.blas_on_numba_threads():
        on_numba_threads = x @ w
        transposed = x.T @ native
    np.testing.assert_array_equal(on_numba_threads, native)
    np.testing.assert_array_equal(transposed, x.T @ native)
    np.testing.assert_array_equal(x @ w, native)


def test_predict_refuses_bad_images(data):
    _, fast = make_pair(data, "float32", True, "numba")
    with pytest.raises(InputError, match="784"):
        fast.predict(np.zeros((3, 783), np.float32))


class _CompilingElsewhere:
    """A stand-in for :class:`numpyside.warmup.Warmup`: every phase is ready but the whole-epoch
    kernel, until the test sets ``trainer_ready``."""

    def __init__(self):
        self.trainer_ready, self.waited = False, []

    def ready(self, phase):
        return phase != "trainer" or self.trainer_ready

    def wait(self, phase):
        self.waited.append(phase)
        return True


@pytest.mark.skipif(not blas.available(), reason=f"numpyside.kernels.blas: {blas.UNAVAILABLE_REASON}")
def test_first_epochs_kernel_by_kernel_while_the_whole_epoch_compiles_give_the_same_bits(data, monkeypatch):
    """``compile(background=...)``: on one thread, epochs run kernel by kernel until the background
    has the whole-epoch kernel, then in one call; the parameters are the same bits as a trainer
    that ran every epoch in one call."""
    whole_epoch_calls = []
    blas_epoch = fused.train_steps_blas
    monkeypatch.setattr(fused, "train_steps_blas", lambda *a: whole_epoch_calls.append(1) or blas_epoch(*a))
    _, staged = make_pair(data, "float32", True, "numba")
    _, plain = make_pair(data, "float32", True, "numba")
    background = _CompilingElsewhere()
    staged.compile(N_TRAIN // 128, 128, background=background)
    assert background.waited == ["kernels"]
    plain.compile(N_TRAIN // 128, 128)
    whole_epoch_calls.clear()
    rng_a, rng_b = training.batch_rng(0), training.batch_rng(0)
    calls_per_epoch = []
    for epoch in range(4):
        batches = training.epoch_batches(N_TRAIN, 128, rng_a)
        np.testing.assert_array_equal(batches, training.epoch_batches(N_TRAIN, 128, rng_b))
        rates = training.LearningRateSchedule(0.3, 4 * len(batches)).for_epoch(epoch, len(batches))
        background.trainer_ready = epoch >= 2
        before = len(whole_epoch_calls)
        np.testing.assert_array_equal(staged.epoch(batches, rates), plain.epoch(batches, rates))
        calls_per_epoch.append(len(whole_epoch_calls) - before)
    assert calls_per_epoch == [1, 1, 2, 2]  # staged: kernel by kernel in epochs 1-2, then one call
    for a, b in zip(staged.params_numpy() + staged.state_numpy(), plain.params_numpy() + plain.state_numpy()):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_compile_waits_for_the_whole_epoch_where_kernel_by_kernel_would_change_the_bits(data):
    """With two threads the whole-epoch path puts the products on the numba GEMM, which sums in
    another order than BLAS: no kernel-by-kernel epochs then, ``compile`` waits for the trainer."""
    _, fast = make_pair(data, "float32", True, "numba")
    fast.threads = 2
    background = _CompilingElsewhere()
    fast.compile(N_TRAIN // 128, 128, background=background)
    assert background.waited == (["trainer"] if fast.whole_epoch else [])
