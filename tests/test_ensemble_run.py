"""``compare/run.py --ensemble M`` end to end (one quick epoch), and its argument checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compare.run import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_ensemble_run_reports_members_ensemble_and_identity(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "compare" / "run.py"),
            "--quick",
            "--epochs",
            "1",
            "--no-progress",
            "--dtype",
            "float64",
            "--ensemble",
            "2",
            "--ensemble-batches",
            "independent",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identity" in proc.stdout and "member-samples/s" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is True
    section = report["ensemble"]
    assert section["members"] == 2 and section["seeds"] == [0, 1] and section["batches"] == "independent"
    (row,) = section["epochs"]
    assert len(row["test_accuracy"]["jax"]) == len(row["test_accuracy"]["numpy"]) == 2
    assert 0.5 < row["ensemble_accuracy"]["jax"] <= 1 and row["ensemble_disagreements"] == 0
    assert {r["side"] for r in section["identity"]} == {"jax", "numpy"}
    assert all(r["max_abs_diff"] <= 1e-12 and r["ok"] for r in section["identity"])  # float64
    assert section["jax_compilations"] >= 1
    assert (tmp_path / "output.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ghost-batches", "2"], "need --ensemble"),
        (["--ensemble", "0"], "at least 1"),
        (["--ensemble", "2", "--ghost-batches", "3"], "divisor"),
        (["--ensemble", "2", "--ghost-batches", "2", "--pool-members"], "not supported"),
        (["--ensemble", "2", "--ghost-batches", "128"], "at least 2 examples"),
        (["--ensemble", "2", "--pool-members", "--no-batch-norm"], "need it on"),
    ],
)
def test_bad_ensemble_arguments_exit_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
