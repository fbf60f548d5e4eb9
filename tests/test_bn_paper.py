"""``python -m compare.bn_paper``: the batch-norm paper's MNIST experiment on both sides (issue 20).

One ``--quick`` run (in process, module fixture) is checked for the JSON's shape, the lockstep
agreement within the stated tolerances and the layouts of the two networks; the pieces it is built
from (the sigmoid inputs on both sides, the batch plan, the Gaussian init) and the refusal of bad
arguments are checked on their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compare import training
from compare.contract import InputError
from compare.init import init_params
from compare.studies import bn_paper, bn_paper_lockstep
from jaxside import model as jax_model
from numpyside import model as numpy_model
from tests.helpers import random_params, random_state

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {"steps", "test_accuracy", "percentiles", "final_test_accuracy", "steps_to", "max_param_diff"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bn_paper")
    status = bn_paper.main(["--quick", "--out", str(out)])
    return status, json.loads((out / "bn_paper.json").read_text()), out


def test_quick_run_passes_and_writes_both_files(quick_run):
    from matplotlib import image

    status, report, out = quick_run
    assert status == 0, report["failures"]
    assert report["passed"] and report["failures"] == []
    assert image.imread(out / "bn_paper.png").shape[:2] == (528, 1760)  # figsize (16, 4.8) at 110 dpi


def test_figure_draws_each_panels_curves(quick_run):
    """Panel (a) holds both networks' colours, (c) the three percentiles', (b) percentile curves
    (pixels of the NumPy side's opaque dashed lines, above the legend row; a quick run draws hundreds
    of each; without batch norm the three percentiles still lie on top of each other after 300 steps)."""
    from matplotlib import colors, image

    from compare.studies.bn_paper_plot import NETWORK_COLORS, PERCENTILE_COLORS

    pixels = image.imread(quick_run[2] / "bn_paper.png")[..., :3]
    third, above_legend = pixels.shape[1] // 3, int(0.85 * pixels.shape[0])

    def n_near(panel: int, color: str) -> int:
        region = pixels[:above_legend, panel * third : (panel + 1) * third]
        return int(np.sum(np.all(np.abs(region - colors.to_rgb(color)) < 0.08, axis=-1)))

    for color in NETWORK_COLORS.values():
        assert n_near(0, color) > 100 and n_near(1, color) == n_near(2, color) == 0, color
    for color in PERCENTILE_COLORS:
        assert n_near(0, color) == 0 and n_near(2, color) > 50, color
    assert sum(n_near(1, color) for color in PERCENTILE_COLORS) > 100


def test_json_has_the_issues_shape(quick_run):
    _, report, _ = quick_run
    assert {"config", "batch_norm", "no_batch_norm"} <= set(report)
    flags = {"lr", "init_std", "steps", "batch_size", "eval_every", "seed", "dtype", "out", "quick"}
    assert flags <= set(report["config"])
    config = report["config"]
    assert (config["steps"], config["eval_every"], config["quick"]) == (300, 50, True)
    expected_steps = list(range(0, 301, 50))
    for name in ("batch_norm", "no_batch_norm"):
        run = report[name]
        assert set(run) >= RUN_KEYS, name
        assert run["steps"] == expected_steps
        for side in ("jax", "numpy"):
            accuracy = run["test_accuracy"][side]
            assert len(accuracy) == len(expected_steps) and all(0 <= a <= 1 for a in accuracy)
            percentiles = np.asarray(run["percentiles"][side])
            assert percentiles.shape == (len(expected_steps), 3)
            assert np.all(np.diff(percentiles, axis=1) >= 0)  # p15 <= p50 <= p85
            assert run["final_test_accuracy"][side] == accuracy[-1]
        assert set(run["steps_to"]) == {"0.90", "0.95"}
        for threshold, step in run["steps_to"].items():
            reached = [
                s for s, a, b in zip(run["steps"], *run["test_accuracy"].values()) if min(a, b) >= float(threshold)
            ]
            assert step == (reached[0] if reached else None)
        assert isinstance(run["max_param_diff"], float) and run["max_param_diff"] >= 0
        assert len(run["param_diff"]) == len(expected_steps) and run["param_diff"][0] == 0.0  # same start
        assert run["max_param_diff"] == run["param_diff"][-1]


def test_sides_agree_within_the_stated_tolerance(quick_run):
    """The lockstep pairs agree; and they moved (a run that trained nothing would agree trivially)."""
    _, report, _ = quick_run
    tolerance = bn_paper_lockstep.TOLERANCES[report["config"]["dtype"]]
    assert report["tolerances"] == tolerance
    for name in ("batch_norm", "no_batch_norm"):
        run = report[name]
        assert run["step0"]["ok"] and run["step0"]["max_rel_err"] <= run["step0"]["tolerance"] == 1e-4
        for key, value in run["agreement"].items():
            assert value <= tolerance[key], (name, key, value)
        assert run["max_param_diff"] < 1e-5  # float32, 300 steps: ~1e-7 measured
    first, last = report["batch_norm"]["test_accuracy"]["jax"][0], report["batch_norm"]["test_accuracy"]["jax"][-1]
    assert last > first + 0.3  # batch norm learns in 300 steps at lr 0.01
    assert report["batch_norm"]["percentiles"]["jax"][0] != report["batch_norm"]["percentiles"]["jax"][-1]


def test_the_batch_norm_network_has_no_bias_and_the_other_no_batch_norm(quick_run):
    """``z = g(BN(W u))``: hidden layers {weight, gamma, beta}, running statistics; without batch
    norm ``z = g(W u + b)``: {weight, bias}, no state. The output layer has its bias in both."""
    _, report, _ = quick_run
    bn, plain = report["batch_norm"], report["no_batch_norm"]
    assert bn["parameter_keys"] == [["beta", "gamma", "weight"]] * 3 + [["bias", "weight"]]
    assert bn["state_keys"] == [["mean", "var"]] * 3
    assert plain["parameter_keys"] == [["bias", "weight"]] * 4
    assert plain["state_keys"] == []


def test_both_networks_start_from_the_same_gaussian_weights():
    with_bn = init_params(3, np.float64, True, weight_std=0.05)
    without = init_params(3, np.float64, False, weight_std=0.05)
    for a, b in zip(with_bn, without):
        np.testing.assert_array_equal(a["weight"], b["weight"])
    first = with_bn[0]["weight"]  # 78,400 draws: the sample std is within 1 % of 0.05
    assert abs(first.std() / 0.05 - 1) < 0.01 and abs(first.mean()) < 0.05 * 0.02
    assert all(np.all(layer["bias"] == 0) for layer in without)
    assert all(np.all(layer["gamma"] == 1) and np.all(layer["beta"] == 0) for layer in with_bn[:3])
    with pytest.raises(InputError, match="weight_std must be a positive finite number"):
        init_params(0, weight_std=-1.0)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_hidden_pre_activations_are_the_sigmoid_inputs_on_both_sides(batch_norm):
    """Both sides return the same eval-mode sigmoid inputs, and they are the forward's own: the
    output layer applied to the last one's sigmoid gives ``predict_logits``."""
    rng = np.random.default_rng(0)
    images = rng.random((16, 784))
    params = random_params(0, np.float64, batch_norm)
    state = random_state(0) if batch_norm else []
    jax_pre = jax_model.hidden_pre_activations(params, state, images)
    numpy_pre = numpy_model.hidden_pre_activations(params, state, images)
    assert [p.shape for p in numpy_pre] == [(16, 100)] * 3
    for a, b in zip(jax_pre, numpy_pre):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    last = 1 / (1 + np.exp(-numpy_pre[-1]))
    logits = last @ params[-1]["weight"] + params[-1]["bias"]
    np.testing.assert_allclose(logits, numpy_model.predict_logits(params, state, images), atol=1e-12)
    first = images @ params[0]["weight"]
    if batch_norm:
        layer, running = params[0], state[0]
        first = layer["gamma"] * (first - running["mean"]) / np.sqrt(running["var"] + 1e-5) + layer["beta"]
    else:
        first = first + params[0]["bias"]
    np.testing.assert_allclose(numpy_pre[0], first, atol=1e-12)


def test_batch_plan_is_the_projects_epochs_one_after_another():
    plan = bn_paper_lockstep.batch_plan(600, 60, 25, seed=4)
    rng = training.batch_rng(4)
    epochs = [training.epoch_batches(600, 60, rng) for _ in range(3)]
    np.testing.assert_array_equal(plan, np.concatenate(epochs)[:25])
    assert bn_paper_lockstep.evaluation_steps(25, 10) == [0, 10, 20, 25]
    assert bn_paper_lockstep.steps_to([0, 10, 20], [0.5, 0.91, 0.96], 0.9) == 10
    assert bn_paper_lockstep.steps_to([0, 10], [0.5, 0.6], 0.9) is None


def test_disagreements_are_reported_and_step_0_tells_formulas_from_dynamics():
    """A trajectory beyond tolerance fails; if step 0 agreed, a note says how the difference grew;
    a step 0 beyond tolerance fails as different formulas, and no note excuses it."""
    tolerance = bn_paper_lockstep.TOLERANCES["float32"]
    step0 = {"max_rel_err": 1e-7, "quantity": "loss", "tolerance": 1e-4, "ok": True}
    run = {"agreement": {"accuracy": 0.01, "percentiles": 0.0, "max_param_diff": 0.0}, "step0": step0}
    run.update(steps=[0, 500, 1000], param_diff=[0.0, 1e-6, 0.5])
    run["agreement_ok"] = {key: value <= tolerance[key] for key, value in run["agreement"].items()}
    (failure,) = bn_paper_lockstep.failures_of({"batch_norm": run}, "float32")
    assert failure.startswith("batch_norm: accuracy 1.00e-02 > tolerance 2e-03")
    (note,) = bn_paper_lockstep.divergence_notes({"batch_norm": run})
    assert "grew from 1.0e-06 at step 500 to 5.0e-01 at step 1,000" in note
    broken = {**run, "step0": {**step0, "max_rel_err": 0.1, "ok": False}}
    failures = bn_paper_lockstep.failures_of({"batch_norm": broken}, "float32")
    assert len(failures) == 2 and "the sides compute different formulas" in failures[0]
    assert bn_paper_lockstep.divergence_notes({"batch_norm": broken}) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "1"], "--batch-size: '1' is not an integer of at least 2"),
        (["--batch-size", "60001"], "larger than the training set"),
        (["--steps", "0"], "--steps: '0' is not a positive integer"),
        (["--init-std", "-0.1"], "--init-std: '-0.1' is not a positive finite number"),
        (["--lr", "fast"], "--lr: 'fast' is not a positive finite number"),
        (["--lr", "nan"], "--lr: 'nan' is not a positive finite number"),
        (["--eval-every", "0"], "--eval-every: '0' is not a positive integer"),
        (["--seed", "-1"], "--seed: '-1' is not a non-negative integer"),
        (["--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    assert bn_paper.main(argv) == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert bn_paper.main(["--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_module_shim_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "compare.bn_paper", "--steps", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--steps" in result.stderr
