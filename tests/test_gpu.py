"""GPU-only checks (marked `gpu`): bf16 GEMMs, cuDNN attention, device memory stats, the data
cache in HBM, and the profile of a real GPU trace. Skipped when no GPU is visible.

conftest.py pins the suite to the CPU backend (JAX_PLATFORMS=cpu, 8 fake devices), so these run
only in a process of their own that lifts the pin before JAX starts:

    ACCELCTL_GPU_TESTS=1 python -m pytest -m gpu tests/test_gpu.py    # scripts/gpu_check.sh does
"""

from __future__ import annotations

import json
import os
import re

import jax
import pytest

if os.environ.get("ACCELCTL_GPU_TESTS") == "1":
    # Before any backend starts: let JAX pick its default (the GPU where there is one).
    jax.config.update("jax_platforms", None)

from accelctl import config, profile  # noqa: E402
from accelctl.devices import memory_limit  # noqa: E402
from accelctl.plan import attention_kernel, compiled_memory  # noqa: E402
from accelctl.train import train  # noqa: E402
from accelctl.train.job import build_job  # noqa: E402

pytestmark = pytest.mark.gpu

GPT = """
model: {name: transformer, num_layers: 2, num_heads: 4, embed_dim: 128, max_len: 128}
data: {source: tokens, kind: synthetic, seq_len: 128, vocab_size: 512, num_train: 512,
       num_eval: 64, seed: 0}
optimizer: {name: adamw, lr: 0.001}
train: {batch_size: 16, steps: 6, log_every: 1, eval_every: null}
checkpoint: {enabled: false}
output: {tensorboard: false}
"""

CNN = """
model: {name: cnn, channels: [8, 16], dense: [32]}
data: {source: synthetic, shape: [28, 28, 1], num_train: 4096, num_eval: 256, num_classes: 10,
       cache: device}
optimizer: {name: adam, lr: 0.001}
train: {batch_size: 64, steps: 4}
checkpoint: {enabled: false}
output: {tensorboard: false}
"""

# A GEMM in optimized GPU HLO: a dot (also inside a fusion's computation), a cuBLAS / cuBLASLt
# custom call, or a Triton GEMM fusion.
GEMM = re.compile(r"\bdot\(|__cublas|__triton_gemm")


@pytest.fixture(scope="module")
def gpu():
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    if not devices:
        pytest.skip(
            "no GPU visible (on a GPU machine: ACCELCTL_GPU_TESTS=1 pytest -m gpu "
            "tests/test_gpu.py, or scripts/gpu_check.sh)"
        )
    return devices[0]


def _cfg(text: str, *overrides: str) -> config.Config:
    return config.load_text(text, "gpu.yaml", list(overrides))


def _gemms(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if GEMM.search(line)]


def test_bf16_compiles_to_bf16_gemms(gpu):
    bf16 = build_job(_cfg(GPT, "precision.compute=bf16"))
    fp32 = build_job(_cfg(GPT, "precision.compute=fp32"))
    assert bf16.mesh.devices.flat[0].platform == "gpu"
    gemms16, gemms32 = _gemms(bf16.steps.train.as_text()), _gemms(fp32.steps.train.as_text())
    assert gemms16 and gemms32
    # bf16 compute: the layers' matmuls take bf16 operands (q/k/v/out and MLP, forward and
    # backward: many); fp32 compute: none does.
    with_bf16 = [line for line in gemms16 if "bf16[" in line]
    assert len(with_bf16) >= 8, gemms16[:20]
    assert not [line for line in gemms32 if "bf16[" in line]
    # The master weights stay fp32 either way.
    dtypes = {leaf.dtype.name for leaf in jax.tree.leaves(bf16.state.abstract.params)}
    assert dtypes == {"float32"}


def test_cudnn_attention_compiles_and_matches_xla(gpu, tmp_path):
    cudnn = _cfg(GPT, "precision.compute=bf16", "model.attention=cudnn")
    xla = _cfg(GPT, "precision.compute=bf16", "model.attention=xla")
    assert attention_kernel(build_job(cudnn).steps.train, cudnn) == "cudnn"  # __cudnn$fmha
    assert attention_kernel(build_job(xla).steps.train, xla) == "xla"
    losses = {}
    for name, cfg in (("cudnn", cudnn), ("xla", xla)):
        train(cfg, run_dir=tmp_path / name, quiet=True)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]
    assert len(losses["cudnn"]) == len(losses["xla"]) == 6
    # The same initial parameters and data: losses agree within bf16 tolerance at every step.
    assert losses["cudnn"] == pytest.approx(losses["xla"], rel=2e-2)


def test_device_memory_stats_are_read(gpu):
    limit = memory_limit(gpu)
    assert limit is not None and limit > 2**30
    assert "bytes_in_use" in gpu.memory_stats()
    job = build_job(_cfg(GPT, "precision.compute=bf16"))
    mem = compiled_memory(job.steps.train, gpu)
    assert mem["device_limit_bytes"] == limit and 0 < mem["total_bytes"] < limit


def test_device_data_cache_lives_in_hbm(gpu):
    before = gpu.memory_stats()["bytes_in_use"]
    job = build_job(_cfg(CNN))
    assert job.feed.cache_mode == "device", job.feed.cache_reason
    cache = job.feed.device_cache
    assert cache is not None and set(cache) == {"x", "y"}
    for arr in cache.values():
        assert {d.platform for d in arr.devices()} == {"gpu"}
        assert arr.sharding.memory_kind == "device"
    nbytes = sum(int(a.nbytes) for a in cache.values())
    assert nbytes >= 4096 * 28 * 28  # the uint8 split, whole
    assert gpu.memory_stats()["bytes_in_use"] - before >= nbytes


def test_profile_reads_a_real_gpu_trace(gpu, tmp_path):
    x = jax.device_put(jax.numpy.ones((2048, 2048), jax.numpy.bfloat16), gpu)
    f = jax.jit(lambda a: (a @ a).sum())
    f(x).block_until_ready()
    profile.start_trace(tmp_path)
    for _ in range(3):
        f(x).block_until_ready()
    profile.stop_trace()
    table = profile.parse_trace(profile.find_trace(tmp_path))
    # Device events, not host launches: the device's stream (or XLA Ops) lines.
    assert table.source in ("streams", "xla-ops", "streams+xla-ops"), table.source
    assert table.rows and table.total_ms > 0 and table.devices >= 1
    assert max(r["count"] for r in table.rows) >= 3
