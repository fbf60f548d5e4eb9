"""``python -m compare.mistakes --quick``: every classic mistake runs in place of the correct backward,
the table names each, the figure is written, and the correct backward alone agrees with JAX."""

from __future__ import annotations

from compare.studies.mistakes import DX_TOLERANCE, backwards, dx_errors, main
from numpyside import model
from numpyside.mistakes import BATCHNORM_BACKWARD, MISTAKES, installed


def test_quick_run_prints_every_mistake_and_draws_the_curves(tmp_path, capsys):
    assert main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in BATCHNORM_BACKWARD:
        assert MISTAKES[name].title.split(",")[0][:30] in " ".join(text.split()), name
    assert "the correct backward" in text and "dx vs JAX" in text
    assert (tmp_path / "mistakes.png").stat().st_size > 10_000


def test_only_the_correct_backward_agrees_with_jax(mnist):
    errors = dx_errors(mnist[0][:64], seed=0)
    assert list(errors) == list(backwards())
    assert errors["correct"] <= DX_TOLERANCE
    assert all(errors[name] > 1e3 * DX_TOLERANCE for name in BATCHNORM_BACKWARD), errors


def test_a_mistake_is_in_place_only_inside_its_block():
    correct = model.batchnorm_backward
    with installed(MISTAKES["mean held constant"]):
        assert model.batchnorm_backward is MISTAKES["mean held constant"].patches["batchnorm_backward"]
    assert model.batchnorm_backward is correct
    try:
        with installed(MISTAKES["running statistics in the backward"]):
            raise RuntimeError
    except RuntimeError:
        pass
    assert model.forward is not MISTAKES["running statistics in the backward"].patches["forward"]
