"""The collectives in the jaxprs of the per-example batch-norm gradient (``compare.jaxpr``).

Counts established against jax 0.10.2: the forward of ``jaxside.layers.batchnorm_train`` traced with
``axis_env=[("batch", N)]`` holds 2 ``psum[axes=('batch',)]`` (``pmean`` is ``psum`` + ``div``: mean and
variance), its VJP 4: the backward adds 2 (their transposes). With ``stop_gradient`` on the statistics
the backward adds none. After ``vmap`` the forward ones are ``psum[axes=(0,)]`` and the backward adds
4 ``reduce_sum[axes=(0,)]`` (2 coupling + dgamma + dbeta), 2 when decoupled.
"""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np
import pytest

from compare.studies.jaxpr import (
    BACKWARD,
    FORWARD,
    batched_jaxprs,
    by_direction,
    check_coupling,
    count,
    is_batch_reduction,
    is_named_collective,
    main,
    per_example_bn_vjp,
    per_example_jaxprs,
    psum_counts,
)
from jaxside.layers import BATCH_AXIS
from numpyside.layers import batchnorm_backward, batchnorm_backward_staged, batchnorm_forward


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_example_gradient_has_collectives_in_forward_and_backward(dtype):
    counts = by_direction(*per_example_jaxprs(4, 8, dtype=dtype), is_named_collective)
    assert counts == {FORWARD: Counter(psum=2), BACKWARD: Counter(psum=2)}, counts
    assert psum_counts(4, 8, dtype=dtype) == {FORWARD: 2, BACKWARD: 2}
    _, vjp = per_example_jaxprs(4, 8, dtype=dtype)
    assert all(eqn.params["axes"] == (BATCH_AXIS,) for eqn in vjp.jaxpr.eqns if eqn.primitive.name == "psum")


def test_stop_gradient_on_the_statistics_removes_the_backward_collectives():
    assert psum_counts(coupled=False) == {FORWARD: 2, BACKWARD: 0}
    assert psum_counts(coupled=True)[BACKWARD] == 2


def test_collectives_inside_a_jit_are_counted():
    """The count looks into nested jaxprs (here a ``jit`` around the VJP), and counts a collective
    that is called twice twice; a collective over another axis name does not count."""
    vector = np.zeros(4, np.float32)
    inner = jax.jit(per_example_bn_vjp)

    def fn(x, gamma, beta, dout):
        out, dx, _, _ = inner(x, gamma, beta, dout)
        again = inner(x, gamma, beta, dout)[1]
        return jax.lax.psum(out, BATCH_AXIS), dx + again + jax.lax.psum(x, "other")

    closed = jax.make_jaxpr(fn, axis_env=[(BATCH_AXIS, 8), ("other", 2)])(vector, vector, vector, vector)
    assert next(eqn.primitive.name for eqn in closed.jaxpr.eqns) != "psum"  # really nested
    assert count(closed, is_named_collective) == Counter(psum=4 + 4 + 1)


def test_vmapped_gradient_turns_collectives_into_reductions_over_axis_0():
    batch = 8
    forward, vjp = batched_jaxprs(4, batch)
    assert count(vjp, is_named_collective) == Counter()  # no named axis left
    coupled = by_direction(forward, vjp, lambda eqn: is_batch_reduction(eqn, batch))
    decoupled = by_direction(*batched_jaxprs(4, batch, coupled=False), lambda eqn: is_batch_reduction(eqn, batch))
    assert coupled == {FORWARD: Counter(psum=2), BACKWARD: Counter(reduce_sum=4)}, coupled  # coupling x2, dgamma, dbeta
    assert decoupled == {FORWARD: Counter(psum=2), BACKWARD: Counter(reduce_sum=2)}, decoupled  # dgamma, dbeta


@pytest.mark.parametrize("n_features, batch", [(4, 8), (3, 2), (5, 33)])
def test_backward_collectives_compute_the_coupling_sums(n_features, batch):
    checks = check_coupling(n_features, batch, seed=batch)
    assert len(checks) == 4
    for meaning, error in checks:
        assert error < 1e-12, (meaning, error)


@pytest.mark.parametrize("coupled", [True, False])
def test_per_example_vjp_under_vmap_matches_the_numpy_backward(coupled):
    rng = np.random.default_rng(1)
    xs, dout = rng.normal(0.5, 2.0, (16, 5)), rng.normal(size=(16, 5))
    gamma, beta = rng.normal(size=5), rng.normal(size=5)

    def one(x, d):
        return per_example_bn_vjp(x, gamma, beta, d, coupled=coupled)

    out, dx, dgamma_b, dbeta_b = jax.vmap(one, axis_name=BATCH_AXIS)(xs, dout)
    ref_out, cache = batchnorm_forward(xs, gamma, beta)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    ref_dx, ref_dgamma, ref_dbeta = batchnorm_backward(dout, cache)
    np.testing.assert_allclose(np.sum(dgamma_b, axis=0), ref_dgamma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.sum(dbeta_b, axis=0), ref_dbeta, rtol=1e-12, atol=1e-12)
    if coupled:
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, batchnorm_backward_staged(dout, cache)[0], rtol=1e-10, atol=1e-12)
    else:  # the coupling terms are exactly what is missing
        np.testing.assert_allclose(dx, gamma * cache.inv_std * dout, rtol=1e-12, atol=1e-12)
        assert np.max(np.abs(dx - ref_dx)) > 1e-3


def test_cli_prints_the_collectives_and_their_counts(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert "psum[axes=('batch',)" in text
    assert "forward:  2 collectives (psum x2)" in text
    assert "backward: 2 collectives (psum x2)" in text
    assert text.count("<- backward") >= 2
    assert main(["--decoupled", "--show-vmapped", "--dtype", "float64"]) == 0
    text = capsys.readouterr().out
    assert "backward: 0 collectives" in text
    assert "psum[axes=(0,)" in text


def test_cli_refuses_a_batch_of_one(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--batch", "1"])
    assert excinfo.value.code == 2
