"""scripts/gpu_check.sh: its `--cpu` dry run (every step of the GPU proof, tiny, on the CPU) so
the script cannot rot, and its loud failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, "PYTHON": sys.executable, **env},
        timeout=timeout,
    )


def test_usage_and_a_failing_step_are_loud(tmp_path):
    assert _run(timeout=30).returncode == 2
    assert _run(str(tmp_path / "o"), "--gpu", timeout=30).returncode == 2
    # A step that fails stops the script: non-zero, the step named, no report printed.
    bad = _run(str(tmp_path / "out"), "--cpu", timeout=60, PYTHON="false")
    assert bad.returncode == 1
    assert "FAILED at step 'env'" in bad.stderr
    assert "all steps passed" not in bad.stdout and not (tmp_path / "out" / "report.md").exists()
    assert (tmp_path / "out" / "steps.tsv").read_text().startswith("env\tFAILED (exit 1)")


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    result = _run(str(out), "--cpu", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    text = result.stdout
    assert "gpu_check: all steps passed (cpu)" in text
    # The short tables, last.
    for needle in (
        "| workload | dtype | batch | samples/s |",
        "| mnist_cnn | bf16 |",
        "| gpt_remat_dots | bf16 |",
        "How good is the plan?",
        "| compare-devices set |",
        "| cpu x2 dp |",
        "train --profile 5:5:",
        "out of memory (exit 5): stopped:",
        "| oom | ok |",
    ):
        assert needle in text, needle
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    want = [
        "env", "env_json", "pytest_gpu", "bench_suite", "plan_gpt", "bench_gpt_none",
        "plan_gpt_dots", "bench_gpt_dots", "train_profile", "compare", "oom",
    ]  # fmt: skip
    assert all(steps[name] == "ok" for name in want), steps
    assert steps.get("torch") in ("ok", "skipped (no PyTorch here)")
    # The files the report was made from.
    suite = json.loads((out / "bench_suite.json").read_text())["results"]
    assert [(r["workload"], r["precision"]) for r in suite] == [
        ("mnist_mlp", "fp32"), ("mnist_mlp", "bf16"), ("mnist_cnn", "fp32"), ("mnist_cnn", "bf16"),
    ]  # fmt: skip
    for r in suite:
        assert r["profile"]["top_ops"] and (out / "profile_bench").is_dir()
    batch = int((out / "gpt_batch.txt").read_text())
    for remat in ("none", "dots"):
        plan = json.loads((out / f"plan_gpt_{remat}.json").read_text())
        row = json.loads((out / f"bench_gpt_{remat}.json").read_text())["results"][0]
        assert plan["batch_size"] == row["batch_size"] == batch
        assert plan["remat"] == remat and row["precision"] == "bf16"
        assert row["tokens_per_s"] > 0
    prof = json.loads((out / "train_profile.json").read_text())["profile"]
    assert prof["steps"] == [5, 9] and prof["top_ops"]
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["platform"], r["devices"], r["error"]) for r in rows] == [
        ("cpu", 1, None), ("cpu", 2, None), ("cpu", 2, None),
    ]  # fmt: skip
    junit = (out / "pytest_gpu.xml").read_text()
    assert 'skipped="5"' in junit
    assert (out / "report.md").read_text().startswith("# accelctl GPU check (cpu)")
    assert (out / "env.txt").read_text().startswith("python ")


# ------------------------------------------------------------- the env step's CUDA report
def test_env_reports_the_cuda_plugin_and_versions(monkeypatch):
    """A fabricated CUDA 13 plugin: `accelctl env` names it and its CUDA, driver, cuDNN and
    NCCL versions (NCCL from the nvidia-nccl-cu13 package: the plugin reports none)."""
    import types

    from accelctl import envreport

    versions = types.ModuleType("jax_cuda13_plugin._versions")
    versions.cuda_runtime_get_version = lambda: 13000  # type: ignore[attr-defined]
    versions.cuda_driver_get_version = lambda: 13010  # type: ignore[attr-defined]
    versions.cudnn_get_version = lambda: 91400  # type: ignore[attr-defined]

    def broken() -> int:
        raise RuntimeError("libcufft.so.12: cannot open shared object file")

    versions.cufft_get_version = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jax_cuda13_plugin", types.ModuleType("jax_cuda13_plugin"))
    monkeypatch.setitem(sys.modules, "jax_cuda13_plugin._versions", versions)
    plugin, libs = envreport._cuda_plugin()
    assert plugin == "jax_cuda13_plugin"
    assert libs == {"cuda_driver": 13010, "cuda_runtime": 13000, "cudnn": 91400}
    packages = {"jax": "0.11.2", "jax-cuda13-plugin": "0.11.2", "nvidia-nccl-cu13": "2.28.9"}
    cuda = envreport.cuda_summary(plugin, libs, packages)
    assert cuda == {
        "plugin": "jax_cuda13_plugin",
        "plugin_version": "0.11.2",
        "cuda": "13.0",
        "driver": "13.1",
        "cudnn": "9.14.0",
        "nccl": "2.28.9",
        "nccl_from": "the nvidia-nccl-cu13 package",
    }
    assert envreport.cuda_summary("jax_cuda12_plugin", {"cudnn": 8907}, {})["cudnn"] == "8.9.7"
    assert envreport.cuda_summary(None, {}, packages)["nccl"] is None
    report = {
        "python": "3.12.3",
        "platform": "Linux",
        "cpu": "x, 16 cores visible",
        "packages": packages,
        "cuda_plugin": plugin,
        "cuda_libraries": libs,
        "cuda": cuda,
        "default_backend": "gpu",
        "backends": {"gpu": {"devices": 1, "kind": "NVIDIA H200", "memory_bytes": 150 * 2**30}},
        "process_count": 1,
        "process_index": 0,
        "environment": {},
        "warnings": [],
    }
    text = envreport.format_env_report(report)
    assert (
        "cuda plugin: jax_cuda13_plugin 0.11.2: CUDA 13.0, driver 13.1, cuDNN 9.14.0, "
        "NCCL 2.28.9 (the nvidia-nccl-cu13 package)"
    ) in text
    assert "gpu: 1 x NVIDIA H200, 150.0 GiB each" in text
    no_nccl = envreport.format_env_report({**report, "cuda": {**cuda, "nccl": None}})
    assert "NCCL not found" in no_nccl
