"""Per-example gradients under batch norm (``per_example_grads`` on both sides, ``compare.per_example``).

Tolerances, per leaf, the project's normwise ``max|a - b| / max|b|``:

* numpyside vs jaxside: float64 ``1e-10``, float32 ``1e-4`` (as for ``loss_and_grads``: the same
  formulas, different summation orders, amplified by batch norm's cancelling backward; measured
  ~5e-15 and ~2e-6).
* ``sum_b g_b`` vs ``B * grad``, ``g_b`` vs the example alone, the ``jacrev`` rows: float64
  ``1e-12`` (one side against itself, only the order of a few sums differs; measured ~2e-15).
* "Unchanged" means bit for bit; "changed" means by more than ``1e-6`` relative, far above any
  rounding (float64 rounding here is ~1e-15; the measured leakage is ~1e-2).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from compare.contract import InputError
from compare.init import init_state
from compare.metrics import max_rel_err
from compare.studies import per_example as P
from compare.studies.jaxpr import by_direction, is_named_collective
from jaxside import model as J
from numpyside import model as N
from numpyside.per_example import cross_entropy_rows_backward, cross_entropy_rows_forward
from tests.helpers import random_params, random_state
from tests.test_equivalence import BAD_INPUTS

F64, F32 = np.dtype(np.float64), np.dtype(np.float32)
TOL_SIDES = {F64: 1e-10, F32: 1e-4}
TOL_SAME_SIDE = 1e-12
MOVED = 1e-6
BATCH = 12
MODES = {"bn train": (True, True), "bn off": (False, True), "eval": (True, False)}  # name -> (batch_norm, train)


@pytest.fixture(scope="module")
def batch(mnist):
    """``BATCH`` MNIST training images and labels, and two spare examples to swap in."""
    images, labels = mnist[0], mnist[1]
    return images[:BATCH], labels[:BATCH].astype(np.int32), images[BATCH : BATCH + 2], labels[BATCH : BATCH + 2]


def _setup(mode, dtype=np.float64, seed=0):
    batch_norm, train = MODES[mode]
    params = random_params(seed, dtype, batch_norm=batch_norm)
    return params, (random_state(seed, dtype) if batch_norm else []), train


def _sides():
    return {
        "jax": J.per_example_grads,
        "numpy": N.per_example_grads,
        "numba": lambda *a, **k: N.per_example_grads(*a, **k, backend="numba"),
    }


def _leaf_errors(a, b):
    return {f"{i} {key}": max_rel_err(a[i][key], b[i][key]) for i in range(len(b)) for key in b[i]}


# ----------------------------------------------------------------------------------------------
# the two sides agree
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_numpy_per_example_grads_match_jax(batch, mode, dtype):
    params, state, train = _setup(mode, dtype)
    images = batch[0].astype(dtype)
    losses_j, grads_j, state_j = J.per_example_grads(params, state, images, batch[1], train=train)
    for backend in ("numpy", "numba"):
        losses_n, grads_n, state_n = N.per_example_grads(params, state, images, batch[1], train=train, backend=backend)
        assert losses_n.shape == losses_j.shape == (BATCH,)
        assert max_rel_err(losses_n, losses_j) <= TOL_SIDES[dtype]
        for i, layer in enumerate(params):
            assert set(grads_n[i]) == set(grads_j[i]) == set(layer)
            for key, value in layer.items():
                assert grads_j[i][key].shape == grads_n[i][key].shape == (BATCH, *value.shape)
                assert grads_j[i][key].dtype == grads_n[i][key].dtype == dtype
        errors = _leaf_errors(grads_n, grads_j)
        assert max(errors.values()) <= TOL_SIDES[dtype], errors
        if not train:
            assert state_n is state and state_j is state
        for i in range(len(state_j)):
            for key in ("mean", "var"):
                assert max_rel_err(state_n[i][key], state_j[i][key]) <= TOL_SIDES[dtype]


@pytest.mark.parametrize("side", ["jax", "numpy", "numba"])
@pytest.mark.parametrize("mode", ["bn train", "bn off"])
def test_sum_of_per_example_grads_is_B_times_the_batch_gradient(batch, side, mode):
    params, state, _ = _setup(mode)
    losses, grads, new_state = _sides()[side](params, state, batch[0], batch[1])
    loss, batch_grads, batch_state = J.loss_and_grads(params, state, batch[0], batch[1])
    assert abs(losses.mean() - loss) <= TOL_SAME_SIDE * abs(loss)
    sums = [{key: leaf.sum(axis=0) for key, leaf in layer.items()} for layer in grads]
    scaled = [{key: BATCH * leaf for key, leaf in layer.items()} for layer in batch_grads]
    errors = _leaf_errors(sums, scaled)
    assert max(errors.values()) <= TOL_SAME_SIDE, errors
    for i in range(len(batch_state)):  # training mode: the same running statistics as the batch step
        for key in ("mean", "var"):
            assert max_rel_err(new_state[i][key], batch_state[i][key]) <= TOL_SAME_SIDE


# ----------------------------------------------------------------------------------------------
# without coupling: each example on its own; with batch norm in training mode: not
# ----------------------------------------------------------------------------------------------


def _alone_jax(params, state, image, label, train):
    """``jax.grad`` of one example's loss, no ``vmap`` at all (batch norm off, or eval mode)."""
    grad = jax.grad(lambda p: J.example_loss(p, state, image, label, train=train)[0])(params)
    return J.to_numpy(grad)


def _alone_numpy(params, state, image, label, train, batch_norm):
    """The handwritten backward on a batch of one (the batch step itself when batch norm is off)."""
    if not batch_norm:
        return N.loss_and_grads(params, state, image[None], label[None])[1]
    grads = N.per_example_grads(params, state, image[None], label[None], train=train)[1]
    return [{key: leaf[0] for key, leaf in layer.items()} for layer in grads]


@pytest.mark.parametrize("side", ["jax", "numpy"])
@pytest.mark.parametrize("mode", ["bn off", "eval"])
def test_uncoupled_g_b_is_the_gradient_of_example_b_alone(batch, side, mode):
    params, state, train = _setup(mode)
    grads = _sides()[side](params, state, batch[0], batch[1], train=train)[1]
    for b in (0, 5, BATCH - 1):
        image, label = batch[0][b], batch[1][b]
        if side == "jax":
            alone = _alone_jax(params, state, image, label, train)
        else:
            alone = _alone_numpy(params, state, image, label, train, MODES[mode][0])
        row_b = [{key: leaf[b] for key, leaf in layer.items()} for layer in grads]
        errors = _leaf_errors(row_b, alone)
        assert max(errors.values()) <= TOL_SAME_SIDE, (b, errors)


def _swap(batch, k, spare):
    images, labels = batch[0].copy(), batch[1].copy()
    images[k], labels[k] = batch[2][spare], batch[3][spare]
    return images, labels


@pytest.mark.parametrize("side", ["jax", "numpy", "numba"])
@pytest.mark.parametrize("mode", list(MODES))
def test_changing_example_k_moves_g_j_only_with_batch_norm_in_training(batch, side, mode):
    params, state, train = _setup(mode)
    per_example = _sides()[side]
    before = per_example(params, state, batch[0], batch[1], train=train)[1]
    k = 3
    after = per_example(params, state, *_swap(batch, k, 0), train=train)[1]
    others = np.arange(BATCH) != k
    for i, layer in enumerate(before):
        for key, leaf in layer.items():
            other_before, other_after = leaf[others], after[i][key][others]
            if mode == "bn train":
                moved = P.row_distance(other_after, other_before)
                assert moved.min() > MOVED, (i, key, moved.min())
            else:
                assert np.array_equal(other_before, other_after), (i, key)
            # the control: the replaced example's own gradient does change
            assert P.row_distance(after[i][key][k : k + 1], leaf[k : k + 1])[0] > MOVED


# ----------------------------------------------------------------------------------------------
# the other decomposition: rows of jacrev of the per-example losses
# ----------------------------------------------------------------------------------------------


def test_jacrev_rows_sum_to_the_batch_gradient_and_differ_from_g_b(batch):
    params, state, _ = _setup("bn train")
    images, labels = batch[0], batch[1]
    rows = P.loss_jacobian_rows(params, state, images, labels)
    grads = J.per_example_grads(params, state, images, labels)[1]
    batch_grads = J.loss_and_grads(params, state, images, labels)[1]
    sums = [{key: leaf.sum(axis=0) for key, leaf in layer.items()} for layer in rows]
    scaled = [{key: BATCH * leaf for key, leaf in layer.items()} for layer in batch_grads]
    errors = _leaf_errors(sums, scaled)
    assert max(errors.values()) <= TOL_SAME_SIDE, errors
    # upstream of batch norm's statistics the two decompositions are different vectors ...
    for i, key in [(0, "weight"), (0, "gamma"), (0, "beta"), (1, "weight"), (2, "weight")]:
        assert P.row_distance(rows[i][key], grads[i][key]).max() > 1e-2, (i, key)
    # ... downstream of the last statistics (the last gamma, beta and the output layer) the same
    for i, key in [(2, "gamma"), (2, "beta"), (3, "weight"), (3, "bias")]:
        assert max_rel_err(rows[i][key], grads[i][key]) <= TOL_SAME_SIDE, (i, key)


def test_jacrev_row_b_is_the_gradient_of_loss_b_through_the_batch(batch):
    """``J_b = d loss_b / d theta`` with the other examples in the batch: one ``jax.grad`` per row."""
    params, state, _ = _setup("bn train")
    images, labels = batch[0], batch[1]
    rows = P.loss_jacobian_rows(params, state, images, labels)
    b = 4

    def loss_b(p):
        def one(x, y):
            return J.example_loss(p, state, x, y, train=True)[0]

        return jax.vmap(one, axis_name="batch")(images, labels)[b]

    alone = J.to_numpy(jax.jit(jax.grad(loss_b))(params))
    errors = _leaf_errors([{k: v[b] for k, v in layer.items()} for layer in rows], alone)
    assert max(errors.values()) <= TOL_SAME_SIDE, errors


def test_jacrev_rows_are_the_column_sums_of_the_handwritten_backward(batch):
    """``J_b`` by hand: ``numpyside.model.backward`` seeded with loss ``b``'s cotangent only (row ``b``
    of ``softmax - onehot``, the other rows 0). Its per-row terms, summed over the rows ``r``, are
    ``J_b``; summed over the seeds ``b`` instead, they are ``g_r`` (the derivation's matrix ``C[r, b]``)."""
    params, state, _ = _setup("bn train")
    images, labels = batch[0], batch[1]
    rows = P.loss_jacobian_rows(params, state, images, labels)
    logits, _, caches = N.forward(params, state, images.astype(np.float64), train=True)
    losses, loss_cache = cross_entropy_rows_forward(logits, labels)
    dlogits = cross_entropy_rows_backward(np.ones_like(losses), loss_cache)
    for b in (0, 7):
        seeded = np.zeros_like(dlogits)
        seeded[b] = dlogits[b]
        by_hand = N.backward(seeded, caches)
        errors = _leaf_errors(by_hand, [{k: v[b] for k, v in layer.items()} for layer in rows])
        assert max(errors.values()) <= TOL_SAME_SIDE, (b, errors)


def test_the_per_example_jaxpr_has_the_coupling_collectives_in_its_backward():
    """One example's VJP traced with the named axis: 2 ``psum`` per batch-norm layer forward (mean,
    variance) and 2 in the backward (their transposes), nothing else over the batch."""
    counts = by_direction(*P.per_example_grad_jaxprs(batch=8), is_named_collective)
    assert counts == {"forward": {"psum": 6}, "backward": {"psum": 6}}


# ----------------------------------------------------------------------------------------------
# the comparison's measurement and its checks
# ----------------------------------------------------------------------------------------------


def test_leakage_is_zero_for_unchanged_rows_and_excludes_the_changed_one():
    before = np.ones((3, 4))
    after = before.copy()
    after[1] = 7.0
    assert P.leakage(before, after, changed=1) == 0.0
    after[2, 0] = 1.5
    assert P.leakage(before, after, changed=1) == pytest.approx(0.25)


def test_measure_on_a_small_batch_passes_its_checks_and_sees_the_leak(batch):
    result = P.measure(0, F64, batch[0], batch[1], batch[2][0], batch[3][0])  # BATCH: shapes compiled above
    assert P.failures(result) == []
    total = result["all"]
    assert total["leak bn off"] == 0 and total["leak eval"] == 0
    assert total["leak bn train"] > MOVED and total["leak jacrev"] > MOVED and total["J vs g"] > MOVED
    broken = {**result, "all": {**total, "leak eval": 1e-17}}
    assert any("eval" in problem for problem in P.failures(broken))


def test_cli_prints_the_table_writes_the_heat_map_and_exits_0(batch, tmp_path, capsys):
    """``python -m compare.per_example`` end to end, at the test batch size (its shapes are compiled)."""
    assert P.main(["--batch", str(BATCH), "--heatmap-batch", str(BATCH), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "all parameters" in out and "all checks hold" in out
    assert (tmp_path / "per_example.png").stat().st_size > 10_000


def test_cli_jaxpr_and_bad_arguments(capsys):
    assert P.main(["--jaxpr"]) == 0
    assert "backward: 6 collectives (psum x6)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        P.main(["--batch", "1"])
    assert info.value.code == 2


# ----------------------------------------------------------------------------------------------
# bad input: as for loss_and_grads, the same InputError on both sides
# ----------------------------------------------------------------------------------------------


def _valid(dtype=np.float32):
    params, state = random_params(0, dtype), init_state(dtype)
    rng = np.random.default_rng(0)
    return params, state, rng.random((4, 784)).astype(dtype), np.array([0, 1, 2, 3], np.int32)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_same_error_on_both_sides(case):
    breaks, match, _ = BAD_INPUTS[case]
    args = breaks(*_valid())
    errors = []
    for side in _sides().values():
        with pytest.raises(InputError) as info:
            side(*args)
        errors.append(str(info.value))
    assert re.search(match, errors[0]), (errors[0], match)
    assert len(set(errors)) == 1, errors


def test_a_batch_of_one_is_refused_with_batch_norm_in_training_only():
    params, state, images, labels = _valid(np.float64)
    for side in _sides().values():
        with pytest.raises(InputError, match=r"at least 2 examples, got 1.*variance of a single example is undefined"):
            side(params, state, images[:1], labels[:1])
        assert side(params, state, images[:1], labels[:1], train=False)[1][0]["weight"].shape == (1, 784, 100)


def test_float64_needs_jax_64_bit_mode():
    params, state, images, labels = _valid(np.float64)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(InputError, match="64-bit mode"):
            J.per_example_grads(params, state, images, labels)
    finally:
        jax.config.update("jax_enable_x64", True)


def test_doc_code_links_point_at_the_statement_they_name():
    """Each ``[`code`](../file.py#L123)`` link of ``docs/per_example_gradients.md``: line 123 holds ``code``."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "per_example_gradients.md"
    links = re.findall(r"\[`([^`]+)`\]\((\.\./[^)#]+)#L(\d+)\)", doc.read_text(encoding="utf-8"))
    assert len(links) >= 7
    for code, target, line in links:
        lines = (doc.parent / target).resolve().read_text(encoding="utf-8").splitlines()
        assert code in lines[int(line) - 1], f"{target}#L{line}: expected {code!r} (stale link)"
