"""The opt-in rows of the bench (``compare/bench/``): ``--ensemble M`` (an ensemble against its members one
after another) and ``--scaling`` (samples/s against processes and devices). Structure and keys
only, on tiny runs; the numbers are the bench's to report, not a test's to assert."""

from __future__ import annotations

import json
import math

import pytest

from compare import bench
from compare.bench import ensemble as ensemble_rows
from compare.bench import limit, registry, sharded
from compare.parallel import scaling


def test_ensemble_rows_land_in_bench_json_next_to_the_usual_rows(tmp_path):
    argv = ["--quick", "--no-epoch", "--impls", "numba", "--ensemble", "2", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    ensemble = [r for r in rows if ensemble_rows.is_ensemble_row(r)]
    assert [r for r in rows if not ensemble_rows.is_ensemble_row(r)]  # the usual rows are still there
    modes = {(r["impl"], r["mode"]) for r in ensemble}
    assert {("jax", "ensemble, same batches"), ("jax", "single x 2")} <= modes
    assert {("numba", "ensemble, same batches"), ("numba", "single x 2 (FastTrainer)")} <= modes
    assert not any("2 threads" in mode for _, mode in modes)  # --quick: one thread, so no split over two
    single = {r["impl"]: r for r in ensemble if r["mode"].startswith("single")}
    for r in ensemble:
        assert r["members"] == 2 and r["threads"] == 1 and r["under_load"] is False
        assert r["impl"] in registry.IMPLS and isinstance(r["blas_kernel"], str) and r["blas_kernel"]
        assert (r["dtype"], r["batch_size"]) == (ensemble_rows.ENSEMBLE_DTYPE, ensemble_rows.ENSEMBLE_BATCH_SIZE)
        assert math.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0
        assert math.isfinite(r["limit_samples_per_s"]) and r["limit_samples_per_s"] > 0
        assert r["limit_engine"] in r["limit_engines"] and r["flops_per_s"] > 0  # per member-step, as samples/s
        assert r["speedup_vs_single"] == pytest.approx(r["samples_per_s"] / single[r["impl"]]["samples_per_s"])


@pytest.mark.parametrize("argv", [["--ensemble", "1"], ["--ensemble", "2", "--dtypes", "float64"]])
def test_ensemble_option_refuses_what_it_cannot_time(argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert "--ensemble" in capsys.readouterr().err


def test_scaling_rows_become_bench_json_rows():
    raw = [
        {"devices": 1, "processes": 1, "batch_size": 128, "sharded_samples_per_s": 5e4, "sharded_host_share": 0.1,
         "single_device_samples_per_s": 6e4, "devices_per_process": 1},
        {"devices": 4, "processes": 2, "batch_size": 128, "sharded_samples_per_s": 2e4, "sharded_host_share": 0.3,
         "devices_per_process": 2},
    ]  # fmt: skip
    rows = sharded.scaling_bench_rows(raw, "float32")
    assert [(r["processes"], r["devices"], r["devices_per_process"]) for r in rows] == [(1, 1, 1), (2, 4, 2)]
    assert [r["samples_per_s"] for r in rows] == [5e4, 2e4]
    for r, source in zip(rows, raw):
        assert (r["impl"], r["mode"], r["dtype"], r["batch_size"]) == ("jax", "sharded", "float32", 128)
        assert r["under_load"] is False and r["threads"] is None and r["scaling"] == source
        assert {"blas_kernel", "limit_samples_per_s", "limit_engine"} <= set(r) and r["limit_engine"] is None
        assert r["flops_per_s"] == pytest.approx(r["samples_per_s"] / 128 * limit.step_flops(128))
    json.dumps(rows)  # bench.json can hold them


def test_scaling_hook_runs_every_configuration_on_the_bench_batch(monkeypatch):
    seen = {}

    def fake_rows(configs=scaling.CONFIGS, extra=(), timeout=600.0):
        seen["configs"], seen["extra"] = configs, list(extra)
        return []

    monkeypatch.setattr(scaling, "scaling_rows", fake_rows)
    assert sharded.bench_scaling(True, "float32") == []
    assert seen["configs"] == scaling.CONFIGS
    extra = seen["extra"]
    assert extra[extra.index("--batch-size") + 1] == str(ensemble_rows.ENSEMBLE_BATCH_SIZE)
    assert extra[extra.index("--dtype") + 1] == "float32" and "--quick" in extra
