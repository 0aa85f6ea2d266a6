"""`accelctl compare-devices` and `accelctl env` on the CPU backend."""

import json

import pytest
from typer.testing import CliRunner

from accelctl import compare, config, envreport
from accelctl.cli import app

runner = CliRunner()

TINY = """
model: {name: mlp, hidden: [16]}
data: {source: synthetic, shape: [4, 4, 1], num_train: 256, num_eval: 64, num_classes: 4}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 32, steps: 12}
"""


@pytest.mark.slow  # a process per device set: about 20 s on 2 cores
def test_compare_devices_on_cpu_end_to_end(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    args = ["compare-devices", str(cfg), "--cpu-devices", "4", "--steps", "3", "--warmup", "1"]
    result = runner.invoke(app, [*args, "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    assert res["schema"] == compare.SCHEMA and res["workload"] == "tiny"
    assert res["accelerators"] == {} and "no accelerator is visible" in res["note"]
    rows = res["rows"]
    assert [(r["platform"], r["devices"], r["strategy"]) for r in rows] == [
        ("cpu", 1, "dp"),
        ("cpu", 4, "dp"),
        ("cpu", 4, "pmap"),
    ]
    for r in rows:
        assert r["error"] is None and r["device_kind"] == "cpu"
        assert r["samples_per_s"] > 0 and r["step_time_median_s"] > 0 and r["compile_s"] > 0
        assert r["mfu"] is None and r["memory_bytes_per_device"] > 0
    one = rows[0]["samples_per_s"]
    assert rows[0]["speedup_vs_cpu"] == 1.0 and rows[0]["scaling_efficiency"] == 1.0
    for r in rows[1:]:
        assert r["speedup_vs_cpu"] == pytest.approx(r["samples_per_s"] / one)
        assert r["scaling_efficiency"] == pytest.approx(r["samples_per_s"] / (4 * one))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # The table (no --json) shows the same sets and the no-accelerator note.
    assert res["plot"] == str(png)


@pytest.mark.slow  # a process per device set: about 20 s on 2 cores
def test_a_failing_device_set_gets_a_row_with_the_reason(tmp_path):
    cfg = tmp_path / "odd.yaml"
    cfg.write_text(TINY.replace("batch_size: 32", "batch_size: 12"))  # not divisible by 8
    args = ["compare-devices", str(cfg), "--cpu-devices", "8", "--steps", "3", "--warmup", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "failed" in result.output and "no accelerator is visible" in result.output
    res = compare.compare_devices("odd", config.load(cfg), cpu_devices=8, steps=3, warmup=1)
    ok, dp8, pmap8 = res["rows"]
    assert ok["error"] is None and ok["samples_per_s"] > 0
    for r in (dp8, pmap8):
        assert "12 does not divide over the 8 devices" in r["error"]
        assert r["speedup_vs_cpu"] is None and r["scaling_efficiency"] is None


def test_compare_devices_refuses_a_plot_in_a_missing_folder(tmp_path):
    result = runner.invoke(app, ["compare-devices", "--plot", str(tmp_path / "no" / "x.png")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_device_sets_cover_every_accelerator():
    report = {"backends": {"cpu": {"devices": 1}, "gpu": {"devices": 4}, "tpu": {"error": "x"}}}
    sets = [(s["platform"], s["devices"], s["strategy"]) for s in compare.device_sets(report, 2)]
    assert sets == [
        ("cpu", 1, "dp"),
        ("cpu", 2, "dp"),
        ("cpu", 2, "pmap"),
        ("gpu", 1, "dp"),
        ("gpu", 4, "dp"),
        ("gpu", 4, "pmap"),
    ]
    one_gpu = {"backends": {"gpu": {"devices": 1}}}
    assert [s["platform"] for s in compare.device_sets(one_gpu, 1)] == ["cpu", "gpu"]


# ------------------------------------------------------------------------------------------- env
def test_env_json_schema():
    import jax

    jax.devices()  # initialise the backends first, as any earlier test may have
    result = runner.invoke(app, ["env", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    keys = {
        "python",
        "platform",
        "cpu",
        "packages",
        "cuda_libraries",
        "default_backend",
        "backends",
        "process_count",
        "process_index",
        "environment",
        "warnings",
        "backends_initialised_before",
    }
    assert keys <= set(report)
    assert report["packages"]["jax"] and report["packages"]["flax"]
    assert report["backends"]["cpu"] == {"devices": 8, "kind": "cpu", "memory_bytes": None}
    assert "error" in report["backends"]["gpu"]
    assert report["default_backend"] == "cpu" and report["process_count"] == 1
    assert "--xla_force_host_platform_device_count=8" in report["environment"]["XLA_FLAGS"]
    # This test process initialised its backends long before: the report says so.
    assert report["backends_initialised_before"]
    assert any("already initialised" in w for w in report["warnings"])
    text = runner.invoke(app, ["env"])
    assert text.exit_code == 0 and "default backend: cpu" in text.output
    assert "cpu: 8 x cpu" in text.output


def _report(**kw):
    base = {
        "packages": {"jax": "1"},
        "environment": {},
        "backends": {"cpu": {"devices": 1}},
        "backends_initialised_before": False,
    }
    return {**base, **kw}


def test_env_warnings_name_the_common_traps():
    assert envreport.env_warnings(_report()) == []
    no_gpu = _report(packages={"jax-cuda12-plugin": "1"}, backends={"gpu": {"error": "none"}})
    assert any("no GPU is visible" in w for w in envreport.env_warnings(no_gpu))
    gpu = {"gpu": {"devices": 1}}
    tf = envreport.env_warnings(_report(packages={"tensorflow": "2"}, backends=gpu))
    assert any("tensorflow-cpu" in w for w in tf)
    assert any("preallocates" in w for w in tf)
    shared = _report(backends=gpu, environment={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    assert envreport.env_warnings(shared) == []
