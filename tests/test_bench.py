"""`accelctl bench`: the result schema, the regression gate, find-max-batch, peak FLOP/s, the
persistent compile cache, and bad input (exit 2, no traceback).

Timing values are checked for consistency (finite, ordered, derived correctly), never for speed.

`bench.LOOP_SECONDS` (how long the pipelined and real-loop measurements last) is set to 0 here, so
both run exactly `steps` (+ warm-up) steps. That keeps the file fast, and it is also needed: with 8
forced host devices on a small machine, XLA:CPU can deadlock in the train step's all-reduce when
more than roughly a hundred steps are dispatched without a sync (a rendezvous termination timeout
then aborts the whole process), which the default 2-second windows do on a 2-core box.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from accelctl import bench, compile_cache, plan
from accelctl import config as config_mod
from accelctl.devices import (
    MEMORY_BANDWIDTH,
    PEAK_FLOPS,
    memory_bandwidth,
    memory_limit,
    peak_flops,
)
from accelctl.errors import UserError
from tests.conftest import TINY, assert_user_error, invoke

ROOT = Path(__file__).resolve().parents[1]
LOOP_SECONDS = 0.0  # instead of bench.LOOP_SECONDS (2 s): see the module docstring
STEPS, WARMUP = 3, 1
BATCHES = [16, 32]
TINY_HOST = TINY.replace("num_classes: 4}", "num_classes: 4, cache: host}")


@pytest.fixture(autouse=True)
def short_loops(monkeypatch):
    monkeypatch.setattr(bench, "LOOP_SECONDS", LOOP_SECONDS)


@pytest.fixture(scope="module")
def tiny_dict():
    return config_mod.load_text(TINY, "tiny.yaml")


@pytest.fixture(scope="module")
def result(tiny_dict):
    """One run_bench call for the whole module: TINY at two batch sizes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "LOOP_SECONDS", LOOP_SECONDS)
        return bench.run_bench(
            [("tiny", tiny_dict)], batch_sizes=BATCHES, steps=STEPS, warmup=WARMUP
        )


def _numbers(obj, path=""):
    """Yield (dotted path, value) for every int/float leaf of a nested dict."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


# --- the result schema -------------------------------------------------------------------------


ROW_FIELDS = {
    "workload",
    "batch_size",
    "precision",
    "strategy",
    "devices",
    "device_kind",
    "platform",
    "num_params",
    "steps",
    "warmup",
    "compile_s",
    "step_time_s",
    "samples_per_s",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "pipelined_samples_per_s",
    "pipelined_windows_samples_per_s",
    "flops_per_step",
    "model_flops_per_step",
    "flops_per_s",
    "peak_flops_per_s",
    "mfu",
    "mfu_flops",
    "attention_kernel",
    "memory",
    "h2d",
    "loop",
    "profile",
}
NESTED_FIELDS = {
    "compile_s": {"cold", "warm"},
    "step_time_s": {"median", "p90", "min", "mean"},
    "memory": {
        "argument_bytes",
        "output_bytes",
        "alias_bytes",
        "temp_bytes",
        "total_bytes",
        "device_limit_bytes",
        "peak_bytes_in_use",
    },
    "h2d": {"bytes", "bytes_per_s"},
    "loop": {"steps", "samples_per_s", "input_wait_fraction", "vs_bare_step"},
}


def test_result_top_level(result):
    assert result["schema"] == bench.SCHEMA == "accelctl.bench/1"
    assert {"schema", "machine", "jax_version", "compile_cache", "results"} <= set(result)
    assert isinstance(result["machine"], str) and "8 x cpu (cpu)" in result["machine"]
    import jax

    assert result["jax_version"] == jax.__version__
    # Strict JSON: no NaN or inf anywhere, and it survives a round trip unchanged.
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result


def test_one_row_per_batch_size(result):
    rows = result["results"]
    assert [r["batch_size"] for r in rows] == BATCHES
    assert all(r["workload"] == "tiny" and r["precision"] == "fp32" for r in rows)


@pytest.mark.parametrize("index", range(len(BATCHES)))
def test_row_fields_and_values(result, index):
    r = result["results"][index]
    assert set(r) == ROW_FIELDS
    for key, fields in NESTED_FIELDS.items():
        assert set(r[key]) == fields, key
    assert r["devices"] == 8
    assert r["platform"] == "cpu" and r["device_kind"] == "cpu"
    assert r["num_params"] == (16 * 16 + 16) + (16 * 4 + 4)  # MLP 16 -> [16] -> 4 classes

    for name, value in _numbers(r):
        assert math.isfinite(value), name
        assert value >= 0, name
    positive = [
        r["compile_s"]["cold"],
        r["compile_s"]["warm"],
        *r["step_time_s"].values(),
        r["samples_per_s"],
        r["pipelined_samples_per_s"],
        r["flops_per_step"],
        r["flops_per_s"],
        r["h2d"]["bytes"],
        r["h2d"]["bytes_per_s"],
        r["loop"]["samples_per_s"],
        r["loop"]["vs_bare_step"],
        r["memory"]["argument_bytes"],
        r["memory"]["output_bytes"],
        r["memory"]["total_bytes"],
    ]
    assert all(v > 0 for v in positive), positive

    st = r["step_time_s"]
    assert st["p90"] >= st["median"] >= st["min"]
    assert st["mean"] >= st["min"]
    assert r["samples_per_s"] == pytest.approx(r["batch_size"] / st["median"])
    assert r["flops_per_s"] == pytest.approx(r["flops_per_step"] / st["median"])

    # The CPU has no honest peak and no memory limit.
    assert r["peak_flops_per_s"] is None
    assert r["mfu"] is None
    assert r["memory"]["device_limit_bytes"] is None

    mem = r["memory"]
    assert mem["total_bytes"] >= (
        mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    )

    # H2D moves one host batch: x as stored (synthetic default uint8) plus int32 labels.
    assert r["h2d"]["bytes"] == r["batch_size"] * (4 * 4 * 1 * 1 + 4)

    loop = r["loop"]
    assert 0.0 <= loop["input_wait_fraction"] <= 1.0
    assert loop["vs_bare_step"] == pytest.approx(
        loop["samples_per_s"] / r["pipelined_samples_per_s"]
    )


def test_flops_grow_with_the_batch(result):
    small, large = result["results"]
    assert large["flops_per_step"] > small["flops_per_step"]
    assert large["h2d"]["bytes"] == 2 * small["h2d"]["bytes"]


# --- the built-in suite (configs only: running it is too slow here) -----------------------------


@pytest.mark.parametrize("name", ["mnist_mlp", "mnist_cnn", "cifar10_resnet"])
def test_builtin_config_loads_with_synthetic_data(name):
    cfg = bench.builtin_config(name)
    expected = [32, 32, 3] if name == "cifar10_resnet" else [28, 28, 1]
    assert name.startswith("cifar10" if name == "cifar10_resnet" else "mnist_")
    assert cfg.data.source == "synthetic"
    assert list(cfg.data.shape) == expected == bench.BUILTIN[name][1]
    assert cfg.data.num_classes == 10
    assert cfg.data.dtype == "uint8"
    # The shipped config's model is kept.
    shipped = config_mod.load(ROOT / "configs" / f"{bench.BUILTIN[name][0]}.yaml")
    assert cfg.model == shipped.model


def test_builtin_config_options():
    cfg = bench.builtin_config("mnist_mlp", num_train=1000, dtype="float32")
    assert cfg.data.num_train == 1000 and cfg.data.dtype == "float32"
    assert set(bench.BUILTIN) == {"mnist_mlp", "mnist_cnn", "cifar10_resnet", "gpt_tiny"}


def test_builtin_gpt_is_the_shipped_config_on_synthetic_tokens():
    cfg = bench.builtin_config("gpt_tiny")
    assert cfg.to_dict() == config_mod.load(ROOT / "configs" / "gpt_tiny.yaml").to_dict()
    assert cfg.data.source == "tokens" and cfg.data.kind == "synthetic"


def test_token_workloads_report_tokens_per_second(result, monkeypatch):
    from accelctl import devices
    from accelctl.models.transformer import training_flops

    # A made-up peak (the CPU has none) only to check how MFU is derived from the counts.
    monkeypatch.setattr(devices, "peak_flops", lambda kind, dtype: 1e12)
    gpt = {
        "model": {
            "name": "transformer",
            "num_layers": 1,
            "num_heads": 2,
            "embed_dim": 16,
            "max_len": 8,
        },
        "data": {"source": "tokens", "seq_len": 8, "vocab_size": 11, "num_train": 256},
        "train": {"batch_size": 16},
    }
    gpt = config_mod.from_dict(gpt)
    (row,) = bench.run_bench([("gpt", gpt)], precisions=["bf16"], steps=STEPS, warmup=WARMUP)[
        "results"
    ]
    assert row["precision"] == "bf16" and row["strategy"] == "dp"
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 8)
    assert all(r["tokens_per_s"] is None for r in result["results"])  # image workloads
    assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / 8)
    # MFU of a transformer counts the model's FLOPs (6 N tokens + attention), not XLA's.
    model = training_flops(
        batch=16, seq_len=8, num_layers=1, embed_dim=16, mlp_dim=64, vocab_size=11
    )
    assert row["model_flops_per_step"] == model
    assert row["mfu_flops"] == "model" and row["attention_kernel"] == "xla"
    median = row["step_time_s"]["median"]
    assert row["peak_flops_per_s"] == 8e12
    assert row["mfu"] == pytest.approx(model / median / 8e12)
    assert row["flops_per_s"] == pytest.approx(row["flops_per_step"] / median)  # XLA's


def test_image_workloads_count_xla_flops(result):
    for r in result["results"]:
        assert r["model_flops_per_step"] is None and r["mfu_flops"] == "xla"
        assert r["tokens_per_s_per_device"] is None and r["attention_kernel"] is None


# --- compare ------------------------------------------------------------------------------------


def _scaled(result, factor, **extra):
    base = copy.deepcopy(result)
    for r in base["results"]:
        r["samples_per_s"] *= factor
        if "pipelined_samples_per_s" in r:
            r["pipelined_samples_per_s"] *= factor
            r["pipelined_windows_samples_per_s"] = [
                w * factor for w in r["pipelined_windows_samples_per_s"]
            ]
    base.update(extra)
    return base


def test_compare_flags_a_2x_faster_baseline(result):
    rows = bench.compare(result["results"], _scaled(result, 2.0), 5)
    assert len(rows) == len(BATCHES)
    for row, r in zip(rows, result["results"], strict=True):
        assert row["regressed"] is True
        assert row["ratio"] == pytest.approx(0.5)
        # The medians of the repeated windows are compared, and the windows' spread stated.
        assert row["samples_per_s"] == r["pipelined_samples_per_s"]
        assert row["baseline_samples_per_s"] == pytest.approx(2 * r["pipelined_samples_per_s"])
        assert row["drop_pct"] == pytest.approx(50.0)
        windows = r["pipelined_windows_samples_per_s"]
        spread = 100 * (max(windows) - min(windows)) / r["pipelined_samples_per_s"]
        assert row["noise_pct"] == pytest.approx(spread)
        assert (row["workload"], row["batch_size"], row["precision"]) == (
            "tiny",
            r["batch_size"],
            "fp32",
        )


def test_compare_equal_baseline_is_no_regression(result):
    rows = bench.compare(result["results"], result, 0)
    assert [row["ratio"] for row in rows] == [1.0] * len(BATCHES)
    assert not any(row["regressed"] for row in rows)


def test_compare_within_tolerance(result):
    rows = bench.compare(result["results"], _scaled(result, 1.03), 5)
    assert all(row["ratio"] == pytest.approx(1 / 1.03) for row in rows)
    assert not any(row["regressed"] for row in rows)
    # The same 3% drop is a regression with a 2% tolerance.
    assert all(
        row["regressed"] for row in bench.compare(result["results"], _scaled(result, 1.03), 2)
    )


def test_compare_skips_rows_without_a_match(result):
    base = copy.deepcopy(result)
    first, second = base["results"]
    first["pipelined_samples_per_s"] *= 10
    first["pipelined_windows_samples_per_s"] = [
        w * 10 for w in first["pipelined_windows_samples_per_s"]
    ]
    second["devices"] = 4  # a different machine: no match
    base["results"].append({**first, "workload": "other"})
    rows = bench.compare(result["results"], base, 5)
    assert [row["batch_size"] for row in rows] == [BATCHES[0]]
    assert rows[0]["regressed"]
    assert bench.compare(result["results"], {"results": []}, 5) == []
    assert bench.compare(result["results"], {}, 5) == []


# --- the CLI regression gate --------------------------------------------------------------------


def test_cli_bench_json_and_regression_gate(tiny_file, tmp_path):
    out = tmp_path / "out.json"
    args = [str(tiny_file), "--steps", str(STEPS), "--warmup", str(WARMUP)]
    first = invoke("bench", *args, "--json", str(out))
    assert first.exit_code == 0, first.output
    assert "tiny" in first.output  # the rendered table names the workload
    data = json.loads(out.read_text())
    assert data["schema"] == bench.SCHEMA
    assert [r["workload"] for r in data["results"]] == ["tiny"]
    assert set(data["results"][0]) == ROW_FIELDS
    assert data["results"][0]["batch_size"] == 32  # the config's own

    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps(_scaled(data, 10)))
    gated = invoke("bench", *args, "--baseline", str(faster), "--tolerance", "5", "--json", "-")
    assert gated.exit_code == 4, gated.output
    assert "regression" in gated.output
    assert "Traceback" not in gated.output
    report = json.loads(gated.stdout)["baseline"]
    assert report["path"] == str(faster) and report["tolerance_pct"] == 5
    assert [row["regressed"] for row in report["rows"]] == [True]

    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(_scaled(data, 0.1)))
    ok = invoke("bench", *args, "--baseline", str(slower), "--tolerance", "5")
    assert ok.exit_code == 0, ok.output
    assert "regression" not in ok.output


# --- find-max-batch -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_cfg():
    # data.cache: host, see test_find_max_batch_with_the_default_cache for why.
    return config_mod.load_text(TINY_HOST, "tiny_host.yaml")


@pytest.fixture(scope="module")
def need(host_cfg):
    """need(batch) -> bytes per device of the train step, as the probes measure it."""
    job, _ = plan.build_abstract_job(host_cfg)
    memo = {}

    def need(batch):
        if batch not in memo:
            compiled = plan.compile_train_step(job, batch)
            memo[batch] = plan.compiled_memory(compiled, None)["total_bytes"]
        return memo[batch]

    return need


@pytest.fixture(scope="module")
def limit(need):
    # Between the needs of 48 and 56: the search must go past the power of two (32).
    lo, hi = need(48), need(56)
    assert lo < hi
    return (lo + hi) // 2


@pytest.fixture(scope="module")
def max_batch(host_cfg, limit):
    return bench.find_max_batch(host_cfg, memory_limit=limit)


def test_find_max_batch_result(max_batch, need, limit):
    b = max_batch["max_batch_size"]
    assert max_batch["memory_limit_bytes"] == limit
    assert max_batch["data_axis"] == 8
    assert b % 8 == 0 and b > 0
    probes = {p["batch_size"]: p for p in max_batch["probes"]}
    assert probes[b]["fits"] is True
    assert max_batch["bytes_per_device"] == probes[b]["bytes"] == need(b)
    assert max_batch["bytes_per_device"] <= limit
    # Every probe's verdict agrees with its bytes, and with an independent measurement.
    for p in max_batch["probes"]:
        assert p["batch_size"] % 8 == 0
        assert p["fits"] == (p["bytes"] <= limit)
        assert p["bytes"] == need(p["batch_size"])
    # One unit more does not fit.
    above = probes[b + 8]["bytes"] if b + 8 in probes else need(b + 8)
    assert above > limit
    # Power of two or better: at least the largest 8 * 2^k that fits.
    pow2 = 8
    while need(pow2 * 2) <= limit:
        pow2 *= 2
    assert b >= pow2
    assert b == 48  # need(48) <= limit < need(56), and needs grow with the batch here


def test_find_max_batch_stops_at_max_batch(host_cfg, need):
    out = bench.find_max_batch(host_cfg, memory_limit=need(64) * 10, max_batch=32)
    assert out["max_batch_size"] == 32
    assert [p["batch_size"] for p in out["probes"]] == [8, 16, 32]


def test_find_max_batch_needs_a_limit_on_cpu(host_cfg):
    with pytest.raises(UserError, match="memory_limit"):
        bench.find_max_batch(host_cfg)


def test_find_max_batch_nothing_fits(host_cfg):
    with pytest.raises(UserError, match="even a batch of 8"):
        bench.find_max_batch(host_cfg, memory_limit=1000)


def test_find_max_batch_with_the_default_cache(host_cfg, max_batch, limit):
    """data.cache: auto resolves to 'device' for this small set; the probes must still lower the
    step for plain (batch, ...) inputs (once a pytree-mismatch ValueError) and measure the step
    alone, so the answer is that of the host-fed config."""
    cfg = config_mod.load_text(TINY, "tiny.yaml")
    assert cfg.data.cache == "auto"
    assert bench.find_max_batch(cfg, memory_limit=limit) == max_batch


def test_cli_find_max_batch(tmp_path, max_batch, limit):
    path = tmp_path / "tiny_host.yaml"
    path.write_text(TINY_HOST)
    out = tmp_path / "fmb.json"
    result = invoke(
        "bench", str(path), "--find-max-batch", "--memory-limit", str(limit), "--json", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "tiny_host" in result.output and str(max_batch["max_batch_size"]) in result.output
    data = json.loads(out.read_text())
    assert data["schema"] == bench.SCHEMA
    assert data["find_max_batch"] == [{"workload": "tiny_host", **max_batch}]


# --- peak FLOP/s and memory limits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.7e12),
        ("NVIDIA H100 PCIe", "fp32", 378e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "bf16", 835.5e12),
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", 156e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("NVIDIA L40", "bf16", None),
        ("NVIDIA A10G", "bf16", None),
        ("NVIDIA A10", "bf16", 125e12),
        ("Tesla V100-SXM2-16GB", "fp32", 15.7e12),
        ("Tesla V100-SXM2-16GB", "bf16", None),
        ("TPU v4", "bf16", 275e12),
        ("TPU v5 lite", "bf16", 197e12),
        ("cpu", "fp32", None),
        ("cpu", "bf16", None),
        ("NVIDIA H100 80GB HBM3", "fp8", None),
        ("NVIDIA H100 80GB HBM3", "float32", None),
        ("Some Future Accelerator", "bf16", None),
    ],
)
def test_peak_flops(kind, dtype, expected):
    assert peak_flops(kind, dtype) == expected
    assert peak_flops(kind.upper(), dtype) == expected  # case-insensitive


@pytest.mark.parametrize(
    ("kind", "bf16", "fp32"),
    [
        # CUDA's device names, which JAX reports as device_kind (SXM unless the name says else).
        ("NVIDIA H100 80GB HBM3", 989.4e12, 494.7e12),
        ("NVIDIA H100 PCIe", 756e12, 378e12),
        ("NVIDIA H100 NVL", 835.5e12, 417.5e12),
        ("NVIDIA H200", 989.4e12, 494.7e12),  # the H100 SXM's chip
        ("NVIDIA H200 NVL", None, None),  # lower clock, no datasheet number recorded
        ("NVIDIA GH200 480GB", 989.4e12, 494.7e12),
        ("NVIDIA A100-SXM4-40GB", 312e12, 156e12),
        ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
        ("NVIDIA B200", None, None),  # not in the table: unknown, never guessed
    ],
)
def test_peak_flops_of_the_device_kinds_jax_reports(kind, bf16, fp32):
    assert peak_flops(kind, "bf16") == bf16
    assert peak_flops(kind, "fp32") == fp32


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA H100 NVL", 3.9e12),
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA H200 NVL", 4.8e12),
        ("NVIDIA GH200 480GB", None),  # HBM3 or HBM3e variant: the name does not say
        ("NVIDIA A100-SXM4-40GB", 1.555e12),
        ("NVIDIA A100-SXM4-80GB", 2.039e12),
        ("NVIDIA A100 80GB PCIe", 1.935e12),
        ("NVIDIA A100-PCIE-40GB", 1.555e12),
        ("NVIDIA L4", 300e9),
        ("NVIDIA L40S", 864e9),
        ("NVIDIA A10G", None),
        ("Tesla V100-SXM2-16GB", 900e9),
        ("TPU v5 lite", 819e9),
        ("cpu", None),
        ("Some Future Accelerator", None),
    ],
)
def test_memory_bandwidth(kind, expected):
    assert memory_bandwidth(kind) == expected
    assert memory_bandwidth(kind.upper()) == expected


def test_memory_bandwidth_table_is_sane():
    for pattern, bandwidth in MEMORY_BANDWIDTH:
        assert pattern == pattern.lower()
        assert bandwidth is None or 1e11 < bandwidth < 1e13, pattern


def test_peak_flops_l4_and_l40s_differ():
    for dtype in ("bf16", "fp16", "fp32"):
        l4, l40s = peak_flops("NVIDIA L4", dtype), peak_flops("NVIDIA L40S", dtype)
        assert l4 and l40s and l4 != l40s


def test_peak_flops_table_is_sane():
    for pattern, peaks in PEAK_FLOPS:
        assert pattern == pattern.lower()
        for dtype, value in peaks.items():
            assert dtype in ("bf16", "fp16", "fp32") and value > 1e12, (pattern, dtype)


def test_memory_limit():
    class Dev:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    assert memory_limit(Dev({"bytes_limit": 80 * 2**30, "bytes_in_use": 1})) == 80 * 2**30
    assert memory_limit(Dev(None)) is None
    assert memory_limit(Dev({})) is None
    assert memory_limit(Dev(RuntimeError("unsupported"))) is None
    assert memory_limit(object()) is None
    import jax

    assert memory_limit(jax.devices()[0]) is None  # the CPU backend reports none


# --- the persistent compile cache ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["off", "OFF", " off ", "0", "false", "none"])
def test_compile_cache_off(monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.default_dir() is None
    assert compile_cache.enable() is None  # off: nothing configured


def test_compile_cache_custom_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cc"))
    assert compile_cache.default_dir() == tmp_path / "cc"
    monkeypatch.setenv(compile_cache.ENV, "~/somewhere")
    assert compile_cache.default_dir() == Path.home() / "somewhere"


def test_compile_cache_default_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    default = compile_cache.default_dir()
    assert default == Path.home() / ".cache" / "accelctl" / "jax"
    assert default.parts[-2:] == ("accelctl", "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "accelctl" / "jax"
    monkeypatch.setenv(compile_cache.ENV, "")
    assert compile_cache.default_dir() == tmp_path / "accelctl" / "jax"


def _python(*args, env_extra=None, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def test_train_fills_the_compile_cache_named_by_the_env(tiny_file, tmp_path):
    cache = tmp_path / "cache"
    result = _python(
        "-m",
        "accelctl",
        "train",
        str(tiny_file),
        "--run-dir",
        str(tmp_path / "r"),
        "--quiet",
        env_extra={compile_cache.ENV: str(cache)},
    )
    assert result.returncode == 0, result.stderr
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert entries, "no compile-cache entries written"


def test_run_bench_uses_its_fresh_cache_after_earlier_compiles(tmp_path):
    """JAX opens its persistent cache once per process: run_bench's fresh folder must still be the
    one used after earlier compilations with another folder, or the 'cold' compile may load from
    the old one and result["compile_cache"] names a folder that stays empty."""
    code = f"""
import pathlib, jax, jax.numpy as jnp
from accelctl import bench, compile_cache, config
from tests.conftest import TINY
compile_cache.enable(pathlib.Path({str(tmp_path / "earlier")!r}))
jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
bench.LOOP_SECONDS = 0.0
r = bench.run_bench([("tiny", config.load_text(TINY, "t"))], steps=2, warmup=0)
print(sum(p.is_file() for p in pathlib.Path(r["compile_cache"]).rglob("*")))
"""
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0, "the bench's own cache folder is empty"


# --- bad input: exit 2, no traceback ------------------------------------------------------------


def test_cli_rejects_an_unknown_precision(tiny_file):
    assert_user_error(invoke("bench", str(tiny_file), "--precision", "fp8"), "fp8", "bf16")


def test_cli_find_max_batch_needs_memory_limit_on_cpu(tiny_file):
    assert_user_error(invoke("bench", str(tiny_file), "--find-max-batch"), "--memory-limit")


def test_cli_find_max_batch_limit_too_small(tmp_path):
    path = tmp_path / "tiny_host.yaml"
    path.write_text(TINY_HOST)
    result = invoke("bench", str(path), "--find-max-batch", "--memory-limit", "1000")
    assert_user_error(result, "even a batch of 8")


def test_cli_baseline_not_json(tiny_file, tmp_path):
    bad = tmp_path / "base.txt"
    bad.write_text("not json {")
    assert_user_error(invoke("bench", str(tiny_file), "--baseline", str(bad)), "--baseline")


def test_cli_baseline_missing_file(tiny_file, tmp_path):
    missing = tmp_path / "nope.json"
    assert_user_error(invoke("bench", str(tiny_file), "--baseline", str(missing)), "--baseline")


@pytest.mark.parametrize("content", [{"schema": bench.SCHEMA}, {"results": {}}, [1, 2]])
def test_cli_baseline_without_results(tiny_file, tmp_path, content):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(content))
    assert_user_error(invoke("bench", str(tiny_file), "--baseline", str(base)), "results")


def test_cli_missing_config(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_user_error(invoke("bench", str(missing)), "nope.yaml")


def test_cli_batch_size_not_divisible_by_the_devices(tiny_file):
    assert_user_error(invoke("bench", str(tiny_file), "--batch-size", "12"), "batch_size")


@pytest.mark.parametrize("row", [{"workload": "tiny"}, 7])
def test_cli_baseline_rows_without_the_match_fields(tiny_file, tmp_path, row):
    """Rejected up front (exit 2), not a KeyError in compare() after the whole benchmark ran."""
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"schema": bench.SCHEMA, "results": [row]}))
    result = invoke("bench", str(tiny_file), "--baseline", str(base))
    assert_user_error(result, "--baseline", "results[0]", "batch_size")
    assert "bench tiny" not in result.output  # nothing was measured


def test_cli_baseline_with_a_zero_rate(tiny_file, tmp_path):
    row = {"workload": "tiny", "batch_size": 32, "precision": "fp32", "devices": 8}
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"results": [{**row, "samples_per_s": 0}]}))
    result = invoke(
        "bench", str(tiny_file), "--steps", "2", "--warmup", "0", "--baseline", str(base)
    )
    assert_user_error(result, "--baseline", "samples_per_s")


def test_cpu_devices_after_backend_start_is_a_clear_error():
    jax.devices()  # the test process has initialised its backends
    result = invoke("bench", "--cpu-devices", "2", "--steps", "2")
    assert result.exit_code == 2 and "already initialised" in result.output
    assert invoke("bench", "--cpu-devices", "0").exit_code == 2
