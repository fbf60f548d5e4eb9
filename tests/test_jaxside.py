"""Tests of the per-example JAX side (``jaxside``) against the shared contract and a NumPy reference.

The NumPy reference below (``np_forward``) is written independently of the module under test: it
is the textbook batched forward pass (batch statistics with ``x.mean(0)`` / ``x.var(0)``), so that
agreement with it checks what the ``vmap`` + ``pmean`` formulation computes, not just that it runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compare import contract, training
from compare.contract import BN_EPS, BN_MOMENTUM, InputError
from compare.init import init_params, init_state
from compare.train_jax import main as train_main
from compare.train_jax import train
from jaxside import forward_pass, loss_and_grads, predict_logits
from jaxside import layers as jax_layers
from jaxside.layers import UnboundBatchAxisError, batchnorm_eval, batchnorm_train
from jaxside.model import batched_forward
from tests.helpers import random_params, random_state, with_changes

DTYPES = [np.float32, np.float64]
BATCH = 8


# ----------------------------------------------------------------------------------------------
# helpers: an independent NumPy reference and non-trivial inputs
# ----------------------------------------------------------------------------------------------


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_forward(params, state, x, *, train_mode):
    """Batched NumPy forward; returns ``(logits, stats)`` with ``stats[i] = (mean, biased var)``
    of hidden layer ``i``'s pre-batch-norm activations (training mode only)."""
    h, stats = x, []
    for i, layer in enumerate(params[:-1]):
        z = h @ layer["weight"]
        if "gamma" in layer:
            if train_mode:
                mean, var = z.mean(axis=0), z.var(axis=0)
                stats.append((mean, var))
            else:
                mean, var = state[i]["mean"], state[i]["var"]
            z = layer["gamma"] * (z - mean) / np.sqrt(var + BN_EPS) + layer["beta"]
        else:
            z = z + layer["bias"]
        h = np_sigmoid(z)
    return h @ params[-1]["weight"] + params[-1]["bias"], stats


def np_loss(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def random_batch(seed, n=BATCH, dtype=np.float64):
    rng = np.random.default_rng(3000 + seed)
    return rng.random((n, contract.N_INPUTS)).astype(dtype), rng.integers(0, contract.N_CLASSES, n).astype(np.int32)


def to_jax(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


def vmapped_bn_train(x, gamma, beta):
    """``batchnorm_train`` mapped over the rows of ``x``; the statistics leave the vmap unbatched."""
    fn = jax.vmap(lambda row: batchnorm_train(row, gamma, beta), axis_name="batch", out_axes=(0, None))
    y, (mean, var) = fn(jnp.asarray(x))
    return np.asarray(y), np.asarray(mean), np.asarray(var)


# ----------------------------------------------------------------------------------------------
# 1. layout contract
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_init_params_layout(dtype, batch_norm):
    params = init_params(0, dtype, batch_norm=batch_norm)
    assert isinstance(params, list) and len(params) == 4
    hidden = {"weight", "gamma", "beta"} if batch_norm else {"weight", "bias"}
    sizes = [784, 100, 100, 100]
    for i in range(3):
        assert set(params[i]) == hidden
        assert params[i]["weight"].shape == (sizes[i], 100)
        for key in hidden - {"weight"}:
            assert params[i][key].shape == (100,)
    assert set(params[3]) == {"weight", "bias"}
    assert params[3]["weight"].shape == (100, 10) and params[3]["bias"].shape == (10,)
    for layer in params:
        for value in layer.values():
            assert type(value) is np.ndarray and value.dtype == np.dtype(dtype)
    if batch_norm:
        for layer in params[:3]:
            np.testing.assert_array_equal(layer["gamma"], 1)
            np.testing.assert_array_equal(layer["beta"], 0)
    # Glorot-uniform bound and a non-degenerate spread
    for layer in params:
        fan_in, fan_out = layer["weight"].shape
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(layer["weight"]).max() <= limit
        assert layer["weight"].std() > limit / 3


@pytest.mark.parametrize("batch_norm", [True, False])
def test_init_params_reproducible_and_dtype_rounding(batch_norm):
    a = init_params(7, np.float64, batch_norm=batch_norm)
    b = init_params(7, np.float64, batch_norm=batch_norm)
    c = init_params(8, np.float64, batch_norm=batch_norm)
    f32 = init_params(7, np.float32, batch_norm=batch_norm)
    for la, lb, lc, lf in zip(a, b, c, f32):
        for key in la:
            np.testing.assert_array_equal(la[key], lb[key])
            np.testing.assert_array_equal(lf[key], la[key].astype(np.float32))
        assert not np.array_equal(la["weight"], lc["weight"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_state(dtype):
    state = init_state(dtype)
    assert isinstance(state, list) and len(state) == 3
    for layer in state:
        assert set(layer) == {"mean", "var"}
        for value in layer.values():
            assert value.shape == (100,) and value.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(layer["mean"], 0)
        np.testing.assert_array_equal(layer["var"], 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_loss_and_grads_and_predict_layout(dtype, batch_norm):
    params = init_params(0, dtype, batch_norm=batch_norm)
    state = init_state(dtype, batch_norm)
    images, labels = random_batch(0, dtype=np.float64)  # cast to the parameters' dtype inside
    loss, grads, new_state = loss_and_grads(params, state, images, labels)

    assert isinstance(loss, np.floating) and loss.dtype == np.dtype(dtype) and np.isfinite(loss)
    assert isinstance(grads, list) and len(grads) == len(params)
    for g_layer, p_layer in zip(grads, params):
        assert isinstance(g_layer, dict) and set(g_layer) == set(p_layer)
        for key in p_layer:
            assert type(g_layer[key]) is np.ndarray, type(g_layer[key])
            assert not isinstance(g_layer[key], jax.Array)
            assert g_layer[key].shape == p_layer[key].shape
            assert g_layer[key].dtype == p_layer[key].dtype
            assert np.isfinite(g_layer[key]).all()
    # the weights of every layer get a non-zero gradient
    assert all(np.abs(g["weight"]).max() > 0 for g in grads)

    if batch_norm:
        assert isinstance(new_state, list) and len(new_state) == 3
        for layer in new_state:
            assert set(layer) == {"mean", "var"}
            for value in layer.values():
                assert type(value) is np.ndarray and value.shape == (100,) and value.dtype == np.dtype(dtype)
    else:
        assert new_state == []

    logits = predict_logits(params, state, images)
    assert type(logits) is np.ndarray and logits.shape == (BATCH, 10) and logits.dtype == np.dtype(dtype)


# ----------------------------------------------------------------------------------------------
# 2. forward_pass is per-example
# ----------------------------------------------------------------------------------------------


def test_forward_pass_refuses_a_batch():
    params, state = to_jax(init_params(0, np.float64)), to_jax(init_state(np.float64))
    images, _ = random_batch(0)
    with pytest.raises(InputError, match=r"takes ONE image vector of shape \(784,\), got shape \(8, 784\)"):
        forward_pass(params, state, jnp.asarray(images), train=False)
    # one image is fine in eval mode
    logits, _ = forward_pass(params, state, jnp.asarray(images[0]), train=False)
    assert logits.shape == (10,)


def test_forward_pass_train_mode_needs_vmap():
    params, state = to_jax(init_params(0, np.float64)), to_jax(init_state(np.float64))
    images, _ = random_batch(0)
    with pytest.raises(UnboundBatchAxisError, match=r"jax\.vmap\(\.\.\., axis_name='batch'\)") as info:
        forward_pass(params, state, jnp.asarray(images[0]), train=True)
    assert isinstance(info.value, NameError)
    # ... and under vmap with that axis name it works
    fn = jax.vmap(lambda x: forward_pass(params, state, x, train=True), axis_name="batch", out_axes=(0, None))
    logits, _ = fn(jnp.asarray(images))
    assert logits.shape == (BATCH, 10)


# ----------------------------------------------------------------------------------------------
# 3. batch norm in training mode
# ----------------------------------------------------------------------------------------------


def test_batchnorm_train_normalises_over_the_vmapped_batch():
    rng = np.random.default_rng(0)
    n = 100
    x = rng.normal(3.0, 1.0, (32, n)) * rng.uniform(0.01, 5.0, n) + rng.normal(0.0, 4.0, n)
    y, mean, var = vmapped_bn_train(x, jnp.ones(n), jnp.zeros(n))

    assert y.shape == x.shape and y.dtype == np.float64
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-12, atol=0)  # biased variance
    assert np.abs(y.mean(axis=0)).max() < 1e-12
    batch_var = x.var(axis=0)
    np.testing.assert_allclose(y.var(axis=0), batch_var / (batch_var + BN_EPS), rtol=1e-9, atol=0)
    # the small-variance features make eps visible: var/(var+eps) is measurably below 1 there
    assert (batch_var / (batch_var + BN_EPS)).min() < 1 - 1e-4

    # gamma and beta act per feature after normalising
    gamma, beta = rng.uniform(0.5, 2.0, n), rng.normal(0.0, 1.0, n)
    y2, _, _ = vmapped_bn_train(x, jnp.asarray(gamma), jnp.asarray(beta))
    np.testing.assert_allclose(y2, gamma * y + beta, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 4. train vs eval mode, running statistics
# ----------------------------------------------------------------------------------------------


def test_batchnorm_eval_with_fresh_state_differs_from_train():
    rng = np.random.default_rng(1)
    n = 100
    x = rng.normal(2.0, 3.0, (16, n))
    gamma, beta = rng.uniform(0.5, 2.0, n), rng.normal(0.0, 1.0, n)
    fresh = init_state(np.float64)[0]
    y_eval = np.asarray(
        jax.vmap(lambda row: batchnorm_eval(row, gamma, beta, fresh["mean"], fresh["var"]))(jnp.asarray(x))
    )
    np.testing.assert_allclose(y_eval, x / np.sqrt(1.0 + BN_EPS) * gamma + beta, rtol=1e-13, atol=1e-13)
    y_train, _, _ = vmapped_bn_train(x, jnp.asarray(gamma), jnp.asarray(beta))
    assert np.abs(y_train - y_eval).max() > 1.0


def test_running_statistics_update_and_converge():
    n = BATCH
    params = random_params(0)
    images, labels = random_batch(1, n=n)
    state = init_state(np.float64)
    pre_bn = images @ params[0]["weight"]  # layer 0's activations before batch norm
    batch_mean, biased, unbiased = pre_bn.mean(axis=0), pre_bn.var(axis=0), pre_bn.var(axis=0, ddof=1)

    # one step, exactly PyTorch's rule with the unbiased variance
    _, _, new_state = loss_and_grads(params, state, images, labels)
    np.testing.assert_allclose(new_state[0]["mean"], 0.9 * 0.0 + 0.1 * batch_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(new_state[0]["var"], 0.9 * 1.0 + 0.1 * biased * n / (n - 1), rtol=1e-12)
    assert BN_MOMENTUM == 0.1
    # deeper layers: the same rule on the reference's statistics
    _, stats = np_forward(params, None, images, train_mode=True)
    for i in (1, 2):
        mean_i, var_i = stats[i]
        np.testing.assert_allclose(new_state[i]["mean"], 0.1 * mean_i, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(new_state[i]["var"], 0.9 + 0.1 * var_i * n / (n - 1), rtol=1e-10)
    # the inputs were not modified in place
    np.testing.assert_array_equal(state[0]["mean"], 0)
    np.testing.assert_array_equal(state[0]["var"], 1)

    # many steps on the same batch (parameters fixed): geometric convergence to the batch statistics
    steps = 150
    for _ in range(steps):
        _, _, state = loss_and_grads(params, state, images, labels)
    decay = 0.9**steps
    np.testing.assert_allclose(state[0]["mean"], batch_mean * (1 - decay), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state[0]["var"], unbiased + decay * (1.0 - unbiased), rtol=1e-9)
    assert np.abs(state[0]["mean"] - batch_mean).max() < 1e-3 * np.abs(batch_mean).max()
    # it is the unbiased variance that the running variance tends to, not the biased one
    assert (np.abs(state[0]["var"] - unbiased) < 0.01 * np.abs(state[0]["var"] - biased)).all()


# ----------------------------------------------------------------------------------------------
# 5. eval mode is per-example; training mode couples the examples
# ----------------------------------------------------------------------------------------------


def test_eval_mode_is_per_example_train_mode_couples():
    params, state = random_params(2), random_state(2)
    images, _ = random_batch(2)

    logits = predict_logits(params, state, images)
    np.testing.assert_allclose(logits, np_forward(params, state, images, train_mode=False)[0], rtol=1e-12, atol=1e-12)
    for i in range(len(images)):
        alone = predict_logits(params, state, images[i : i + 1])  # a batch of 1 is fine in eval mode
        np.testing.assert_allclose(alone[0], logits[i], rtol=1e-12, atol=1e-12)

    changed = images.copy()
    changed[0] = np.random.default_rng(99).random(784)
    eval_changed = predict_logits(params, state, changed)
    np.testing.assert_allclose(eval_changed[1:], logits[1:], rtol=1e-12, atol=1e-12)
    assert np.abs(eval_changed[0] - logits[0]).max() > 1e-3

    jp, js = to_jax(params), to_jax(state)
    train_logits = np.asarray(batched_forward(jp, js, jnp.asarray(images), train=True)[0])
    np.testing.assert_allclose(
        train_logits, np_forward(params, state, images, train_mode=True)[0], rtol=1e-10, atol=1e-12
    )
    train_changed = np.asarray(batched_forward(jp, js, jnp.asarray(changed), train=True)[0])
    # every other example's logits move when example 0 changes: the coupling through pmean
    assert (np.abs(train_changed[1:] - train_logits[1:]).max(axis=1) > 1e-4).all()


# ----------------------------------------------------------------------------------------------
# 6. batch norm off
# ----------------------------------------------------------------------------------------------


def test_batch_norm_off():
    params = random_params(3, batch_norm=False)
    images, labels = random_batch(3)
    loss, grads, new_state = loss_and_grads(params, [], images, labels)
    assert new_state == []
    assert [set(g) for g in grads] == [{"weight", "bias"}] * 4
    ref_logits = np_forward(params, [], images, train_mode=True)[0]
    np.testing.assert_allclose(loss, np_loss(ref_logits, labels), rtol=1e-12)
    np.testing.assert_allclose(predict_logits(params, [], images), ref_logits, rtol=1e-12, atol=1e-12)
    # without batch norm a batch of one is fine in training mode too
    loss1, grads1, state1 = loss_and_grads(params, [], images[:1], labels[:1])
    assert state1 == [] and np.isfinite(loss1)
    np.testing.assert_allclose(loss1, np_loss(ref_logits[:1], labels[:1]), rtol=1e-12)
    assert all(np.abs(g["weight"]).max() > 0 for g in grads1)


# ----------------------------------------------------------------------------------------------
# 7. gradients vs finite differences
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [True, False])
def test_gradients_match_central_differences(batch_norm):
    params = random_params(4, batch_norm=batch_norm)
    state = init_state(np.float64, batch_norm)
    images, labels = random_batch(4)
    loss, grads, _ = loss_and_grads(params, state, images, labels)
    ref_loss = np_loss(np_forward(params, state, images, train_mode=True)[0], labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)

    # Why 1e-6: in float64 the central difference with h = 1e-6 has truncation error ~ h^2 |L'''| / 6
    # ~ 1e-13 and rounding error ~ k * eps_machine * |L| / h ~ 1e-16 * 2.5 / 1e-6 ~ 3e-10 per entry
    # (|L| ~ ln 10). The smallest gradients here (layer 0 with batch norm off, behind three sigmoids)
    # are ~5e-4 per entry, so the relative error floor is ~1e-7 (measured worst: 3.3e-7); 1e-6 sits
    # above that floor, while a real bug (a dropped batch-norm coupling term, a wrong transpose)
    # gives relative errors of order 1e-2..1. Entries are drawn at random from the upper half of each
    # tensor by |gradient|, so that no near-zero entry makes the relative error meaningless.
    h = 1e-6
    rng = np.random.default_rng(5)
    n_entries = 4
    for i, layer in enumerate(params):
        for key, value in layer.items():
            magnitude = np.abs(grads[i][key]).ravel()
            candidates = np.flatnonzero(magnitude >= np.median(magnitude))
            flat_indices = rng.choice(candidates, size=n_entries, replace=False)
            numeric = np.empty(n_entries)
            for j, flat in enumerate(flat_indices):
                idx = np.unravel_index(flat, value.shape)
                losses = []
                for sign in (+1, -1):
                    bumped = [{k: v.copy() for k, v in lyr.items()} for lyr in params]
                    bumped[i][key][idx] += sign * h
                    losses.append(loss_and_grads(bumped, state, images, labels)[0])
                numeric[j] = (losses[0] - losses[1]) / (2 * h)
            analytic = grads[i][key].ravel()[flat_indices]
            rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
            assert rel <= 1e-6, (i, key, rel, analytic, numeric)


# ----------------------------------------------------------------------------------------------
# 8. a short training run on real MNIST
# ----------------------------------------------------------------------------------------------


def test_short_training_run_lowers_loss(mnist):
    train_x, train_y, test_x, test_y = mnist
    data = (train_x[:2000], train_y[:2000], test_x[:1000], test_y[:1000])
    params, state = init_params(0, np.float32), init_state(np.float32)
    params_before = [{k: v.copy() for k, v in layer.items()} for layer in params]
    trainer, history = train(
        params,
        state,
        data,
        epochs=2,
        batch_size=64,
        lr=training.DEFAULT_LR,
        momentum=training.DEFAULT_MOMENTUM,
        seed=0,
        progress=False,
    )
    assert len(history.train_loss) == 2 and len(history.test_accuracy) == 2
    assert history.train_loss[1] < history.train_loss[0]
    assert history.test_accuracy[-1] > 0.8, history
    # the caller's arrays survive the donated buffers; the trained ones come back in the layout
    for before, after in zip(params_before, params):
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])
    trained, trained_state = trainer.params_numpy(), trainer.state_numpy()
    assert contract.check_params(trained) == (True, np.dtype(np.float32))
    contract.check_state(trained_state, True, np.dtype(np.float32))
    assert not np.array_equal(trained[0]["weight"], params[0]["weight"])
    assert np.abs(trained_state[0]["mean"]).max() > 0


# ----------------------------------------------------------------------------------------------
# 9. bad input
# ----------------------------------------------------------------------------------------------


def _valid():
    params, state = init_params(0, np.float32), init_state(np.float32)
    images, labels = random_batch(0, n=4, dtype=np.float32)
    return params, state, images, labels


def _nan(images):
    images = images.copy()
    images[2, 5] = np.nan
    return images


def _inf(images):
    images = images.copy()
    images[1, 7] = np.inf
    return images


IMAGE_CASES = {
    "wrong width": (lambda x: x[:, :783], r"images must have shape \(batch, 784\), got \(4, 783\)"),
    "1-D": (lambda x: x[0], r"images must have shape \(batch, 784\), got \(784,\)"),
    "uint8": (lambda x: (x * 255).astype(np.uint8), r"floating point.*divide raw uint8 pixels by 255"),
    "NaN": (_nan, r"NaN or Inf \(first at row 2, column 5\)"),
    "Inf": (_inf, r"NaN or Inf \(first at row 1, column 7\)"),
    "empty": (lambda x: x[:0], r"empty batch"),
}


@pytest.mark.parametrize("entry", ["loss_and_grads", "predict_logits"])
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_images(entry, case):
    params, state, images, labels = _valid()
    mutate, match = IMAGE_CASES[case]
    with pytest.raises(InputError, match=match):
        if entry == "loss_and_grads":
            loss_and_grads(params, state, mutate(images), labels)
        else:
            predict_logits(params, state, mutate(images))


# each case: (params, state, images, labels) -> the same with one thing broken
BAD_INPUTS = {
    "labels wrong length": (lambda p, s, x, y: (p, s, x, y[:3]), r"labels must have shape \(4,\).*got \(3,\)"),
    "float labels": (lambda p, s, x, y: (p, s, x, y.astype(np.float32)), r"labels must be integers"),
    "label 10": (lambda p, s, x, y: (p, s, x, np.array([0, 10, 1, 2])), r"0\.\.9, found 10"),
    "label -1": (lambda p, s, x, y: (p, s, x, np.array([0, 1, -1, 2])), r"0\.\.9, found -1"),
    "batch of one": (lambda p, s, x, y: (p, s, x[:1], y[:1]), r"at least 2 examples, got 1"),
    "missing key": (
        lambda p, s, x, y: (with_changes(p, 1, beta=None), s, x, y),
        r"params\[1\] has keys \['gamma', 'weight'\]",
    ),
    "wrong shape": (
        lambda p, s, x, y: (with_changes(p, 2, weight=np.zeros((100, 99), np.float32)), s, x, y),
        r"params\[2\]\['weight'\] has shape \(100, 99\), expected \(100, 100\)",
    ),
    "mixed dtypes": (
        lambda p, s, x, y: (with_changes(p, 3, bias=p[3]["bias"].astype(np.float64)), s, x, y),
        r"share one dtype",
    ),
    "float16 params": (
        lambda p, s, x, y: ([{k: v.astype(np.float16) for k, v in lyr.items()} for lyr in p], s, x, y),
        r"float32 or float64, got float16",
    ),
    "params wrong length": (lambda p, s, x, y: (p[:3], s, x, y), r"params must be a list of 4 layer dicts"),
    "state wrong length": (lambda p, s, x, y: (p, s[:2], x, y), r"state must be a list of 3 dicts"),
    "state missing": (lambda p, s, x, y: (p, [], x, y), r"state must be a list of 3 dicts"),
    "state wrong dtype": (
        lambda p, s, x, y: (p, with_changes(s, 0, var=s[0]["var"].astype(np.float64)), x, y),
        r"state\[0\]\['var'\] has dtype float64, parameters are float32",
    ),
    "state for batch norm off": (
        lambda p, s, x, y: (init_params(0, np.float32, batch_norm=False), s, x, y),
        r"with batch norm off, state must be an empty list",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case):
    breaks, match = BAD_INPUTS[case]
    params, state, images, labels = breaks(*_valid())
    with pytest.raises(InputError, match=match):
        loss_and_grads(params, state, images, labels)


def test_valid_input_passes():
    """The control for the bad-input cases: the unbroken input goes through."""
    loss, _, _ = loss_and_grads(*_valid())
    assert np.isfinite(loss)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "1"], "--batch-size must be at least 2 with batch norm"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# JAX's 64-bit mode: importing jaxside leaves it alone, and float64 without it is refused
# ----------------------------------------------------------------------------------------------

X64_OFF_SCRIPT = """
import jax, numpy as np
from compare.contract import InputError
from compare.init import init_params, init_state
from jaxside import equinox_model, loss_and_grads, predict_logits
from jaxside.train import Trainer
assert not jax.config.jax_enable_x64, "importing jaxside switched x64 on"
params, state = init_params(0, np.float64), init_state(np.float64)
images, labels = np.full((4, 784), 0.5), np.arange(4)
calls = {
    "loss_and_grads": lambda: loss_and_grads(params, state, images, labels),
    "predict_logits": lambda: predict_logits(params, state, images),
    "Trainer": lambda: Trainer(params, state, images, labels, momentum=0.9),
    "equinox loss_and_grads": lambda: equinox_model.loss_and_grads(params, state, images, labels),
    "equinox Trainer": lambda: equinox_model.Trainer(params, state, images, labels, momentum=0.9),
}
for name, call in calls.items():
    try:
        call()
    except InputError as error:
        print(name, "refused:", error)
    else:
        print(name, "ACCEPTED")
p32, s32 = init_params(0, np.float32), init_state(np.float32)
print("float32 loss", float(loss_and_grads(p32, s32, images.astype(np.float32), labels)[0]))
"""


def test_float64_is_refused_when_x64_is_off():
    """In a fresh interpreter (this session's conftest switches x64 on): float64 parameters are
    refused with an error that says how to switch x64 on, by every public JAX entry point, instead
    of being computed in float32; float32 still runs."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", X64_OFF_SCRIPT], cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    refused = [line for line in lines if " refused: " in line]
    assert len(refused) == 5 and "ACCEPTED" not in proc.stdout, proc.stdout
    for line in refused:
        assert "float64 parameters need JAX's 64-bit mode" in line
        assert "jax.config.update('jax_enable_x64', True)" in line
    assert np.isfinite(float(lines[-1].split()[-1]))


def test_layers_refuse_float64_they_can_see_while_64_bit_mode_is_off():
    """With JAX's 64-bit mode off a float64 NumPy array would be computed in float32 without a word;
    a layer that sees one says so (under vmap/jit it is float32 already: only the switch helps)."""
    x = np.linspace(-1.0, 1.0, 3)
    jax.config.update("jax_enable_x64", False)
    try:
        for call in (
            lambda: jax_layers.sigmoid(x),
            lambda: jax_layers.linear(x, np.eye(3)),
            lambda: jax_layers.batchnorm_eval(x, x, x, x, np.ones(3)),
            lambda: jax_layers.cross_entropy(x, 0),
        ):
            with pytest.raises(InputError, match="jax_enable_x64"):
                call()
        assert jax_layers.sigmoid(x.astype(np.float32)).dtype == np.float32  # float32 is fine
    finally:
        jax.config.update("jax_enable_x64", True)
    assert jax_layers.sigmoid(x).dtype == np.float64
