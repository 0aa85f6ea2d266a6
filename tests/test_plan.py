"""`accelctl plan`: the dry run on every shipped config (nothing allocated), its memory and FLOPs
against the real job's compiled step, the analytic transformer FLOPs against a hand count, the
remedies of a config that does not fit (each re-planned), pmap layouts, and the CLI.

Every plan compiles a train step, so configs are tiny except the shipped ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from accelctl import bench, data, max_batch, plan
from accelctl import config as config_mod
from accelctl.config import ConfigError
from accelctl.train.job import build_job
from tests.conftest import TINY, assert_user_error, invoke

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
TINY_GPT = """
model: {name: transformer, num_layers: 2, num_heads: 2, embed_dim: 16, max_len: 16}
data: {source: tokens, seq_len: 16, vocab_size: 32, num_train: 512, num_eval: 32}
train: {batch_size: 256, steps: 3}
"""
MEMORY_KEYS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes")


def _cfg(text: str = TINY, overrides: tuple[str, ...] = ()) -> config_mod.Config:
    return config_mod.load_text(text, "plan.yaml", list(overrides))


def _live() -> set[int]:
    return {id(a) for a in jax.live_arrays()}


# --- the data set's layout without its data -------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        TINY,
        TINY.replace("num_classes: 4}", "num_classes: 4, dtype: float32}"),
        TINY_GPT,
        (ROOT / "configs" / "gpt_tiny.yaml").read_text(),
    ],
    ids=["uint8", "float32", "tokens", "gpt_tiny"],
)
def test_shapes_from_the_config_match_the_built_data(text):
    """What plan takes from the config alone is what the source would generate."""
    cfg = _cfg(text)
    described, shapes_from = plan.describe_data(cfg)
    built = data.build(cfg.data)
    assert shapes_from == "config"
    for a, b in ((described.train, built.train), (described.eval, built.eval)):
        assert len(a) == len(b)
        assert a.example_shape == b.example_shape
        assert a.x_dtype == b.x_dtype
        assert a.nbytes == b.nbytes
    assert (described.num_classes, described.x_scale, described.tokens) == (
        built.num_classes,
        built.x_scale,
        built.tokens,
    )
    with pytest.raises(RuntimeError, match="holds no data"):
        described.train.take(np.arange(2))


# --- every shipped config: seconds, nothing allocated ---------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_plan_every_shipped_config_allocates_nothing(name):
    cfg = config_mod.load(ROOT / "configs" / name)
    before = _live()
    with jax.transfer_guard("disallow"):  # no host-to-device copy: no data, no parameters
        result = plan.plan(cfg, name=name)
    # No new array (arrays of earlier tests may be freed meanwhile: only new ones count).
    assert _live() - before == set()
    assert result["schema"] == plan.SCHEMA and result["config"] == name
    assert result["backend"] == "cpu" and result["note"] == plan.CPU_NOTE
    assert result["devices"] == 8 and result["fits"] is None  # the CPU has no limit
    assert result["memory"]["limit_bytes"] is None and result["remedies"] == []
    # tfds sets that are not prepared here are planned from their registered features.
    expected = {"source", "features"} if cfg.data.source == "tfds" else {"config", "source"}
    assert result["data"]["shapes_from"] in expected
    mem = result["memory"]
    assert mem["params_bytes"] > 0 and mem["opt_state_bytes"] > 0 and mem["temp_bytes"] > 0
    assert mem["need_bytes"] == mem["total_bytes"] + mem["data_cache_bytes"]
    # dp replicates the state: every device holds all parameters in float32.
    assert mem["params_bytes"] == 4 * result["num_params"]
    assert result["compute"]["flops_per_device"] > 0
    transformer = cfg.model.name == "transformer"
    assert (result["compute"]["model_flops_per_step"] is not None) == transformer
    assert result["compute"]["attention_kernel"] == ("xla" if transformer else None)
    assert result["roofline"]["bound"] is None  # no peak or bandwidth known for a CPU
    json.dumps(result, allow_nan=False)


# --- the same numbers as the real job -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "overrides"),
    [
        (TINY, ()),
        (TINY_GPT, ("train.batch_size=32", "model.num_layers=1")),
        (TINY, ("model={name: cnn, channels: [4], dense: [8], batch_norm: true}",)),
        (TINY, ("parallel.strategy=pmap",)),
        (TINY, ("parallel.strategy=fsdp", "optimizer.accumulate_steps=2")),
    ],
    ids=["mlp", "gpt", "cnn-batchnorm", "pmap", "fsdp-accumulate"],
)
def test_plan_memory_and_flops_equal_the_real_jobs(text, overrides):
    """build_job reads the data and compiles the step; the plan's numbers are the same."""
    cfg = _cfg(text, (*overrides, "data.cache=host"))
    row = plan.plan_config(cfg)
    job = build_job(cfg)
    real = bench._memory(job.steps.train, job.mesh.devices.flat[0])
    assert {k: row["memory"][k] for k in MEMORY_KEYS} == {k: real[k] for k in MEMORY_KEYS}
    flops = float(job.steps.train.cost_analysis()["flops"])
    assert row["compute"]["flops_per_device"] == flops
    assert row["strategy"] == job.state.strategy
    assert row["memory"]["input_bytes"] == sum(
        a.sharding.shard_shape(a.shape)[0] * int(np.prod(a.shape[1:])) * a.dtype.itemsize
        for a in jax.tree.leaves(job.feed.abstract_input)
    )


def test_fsdp_shards_the_state_per_device():
    dp = plan.plan_config(_cfg(TINY))
    fsdp = plan.plan_config(_cfg(TINY, ("parallel.strategy=fsdp",)))
    assert fsdp["strategy"] == "fsdp"
    # Leaves with an axis that divides by the 8 devices are split over them.
    assert fsdp["memory"]["params_bytes"] < dp["memory"]["params_bytes"]
    assert fsdp["memory"]["opt_state_bytes"] < dp["memory"]["opt_state_bytes"]


def test_device_cache_is_counted_per_device():
    cfg = _cfg(TINY)  # cache auto: 256 examples of 16 uint8 + int32 label fit the devices
    row = plan.plan_config(cfg)
    assert row["data"]["cache"] == "device"
    assert row["memory"]["data_cache_bytes"] == (256 // 8) * (16 + 4)
    host = plan.plan_config(_cfg(TINY, ("data.cache=host",)))
    assert host["memory"]["data_cache_bytes"] == 0
    assert host["memory"]["total_bytes"] == row["memory"]["total_bytes"]


# --- analytic FLOPs -------------------------------------------------------------------------------


def test_model_flops_of_gpt_tiny_and_gpt_small_equal_a_hand_count():
    """6*B*T*N + 6*L*B*T^2*d with N the weights each token is multiplied by."""
    # gpt_tiny: L=2, d=64, m=256, V=256, T=64, B=32.
    # per block 4*64*64 (q, k, v, out) + 2*64*256 (MLP) = 16384 + 32768 = 49152; x2 = 98304;
    # logits 64*256 = 16384 -> N = 114688. 6*B*T*N = 6*2048*114688 = 1409286144;
    # attention 6*2*32*64*64*64 = 100663296.
    tiny = config_mod.load(ROOT / "configs" / "gpt_tiny.yaml")
    assert plan.model_flops(tiny, plan.describe_data(tiny)[0], 32) == 1_509_949_440
    # gpt_small: L=12, d=768, m=3072, V=50257, T=1024, B=32.
    # per block 4*768^2 + 2*768*3072 = 2359296 + 4718592 = 7077888; x12 = 84934656;
    # logits 768*50257 = 38597376 -> N = 123532032; 6*32768*N = 24287385747456;
    # attention 6*12*32*1024*1024*768 = 1855425871872.
    small = config_mod.load(ROOT / "configs" / "gpt_small.yaml")
    assert plan.model_flops(small, plan.describe_data(small)[0], 32) == 26_142_811_619_328
    assert plan.model_flops(_cfg(), plan.describe_data(_cfg())[0], 32) is None  # not a GPT


def test_xla_counts_a_little_more_than_the_model():
    """XLA's count adds the full (unmasked) attention, norms, softmax and the optimizer."""
    row = plan.plan_config(config_mod.load(ROOT / "configs" / "gpt_tiny.yaml"))
    ratio = row["compute"]["flops_per_device"] / row["compute"]["model_flops_per_device"]
    assert 1.0 < ratio < 1.3


# --- roofline -------------------------------------------------------------------------------------


def test_roofline_names_the_bound(monkeypatch):
    from accelctl import devices

    monkeypatch.setattr(devices, "peak_flops", lambda kind, dtype: 1e12)
    monkeypatch.setattr(devices, "memory_bandwidth", lambda kind: 1e9)
    row = plan.plan_config(_cfg())
    roof, comp = row["roofline"], row["compute"]
    assert roof["compute_s"] == pytest.approx(comp["flops_per_device"] / 1e12)
    assert roof["memory_s"] == pytest.approx(comp["bytes_accessed_per_device"] / 1e9)
    assert roof["step_time_s"] == max(roof["compute_s"], roof["memory_s"])
    assert roof["bound"] == ("compute" if roof["compute_s"] >= roof["memory_s"] else "memory")
    monkeypatch.setattr(devices, "memory_bandwidth", lambda kind: None)
    unknown = plan.plan_config(_cfg())["roofline"]
    assert unknown["step_time_s"] is None and unknown["bound"] is None
    assert "unknown memory bandwidth" in unknown["note"]


# --- a config that does not fit -------------------------------------------------------------------


def test_a_config_that_does_not_fit_gets_a_working_suggestion():
    """A batch of 256 against a limit below its need but above that of half the batch's
    activations (accumulate_steps 2): some remedy fits, and re-planned it does."""
    conv = "model={name: cnn, channels: [16, 16], dense: [8]}"  # activations dominate
    cfg = _cfg(TINY, ("train.batch_size=256", "data.shape=[16, 16, 1]", conv))
    need = plan.plan_config(cfg)["memory"]["need_bytes"]
    half = plan.plan_config(config_mod.replace(cfg, {"optimizer.accumulate_steps": 2}))
    assert half["memory"]["need_bytes"] < need
    limit = (need + half["memory"]["need_bytes"]) // 2
    result = plan.plan(cfg, memory_limit=limit)
    assert result["fits"] is False
    assert result["memory"]["limit_bytes"] == limit and result["memory"]["limit_from"] == "given"
    suggestion = result["suggestion"]
    assert suggestion is not None and suggestion["fits"] is True
    assert result["remedies"][-1] == suggestion
    assert all(not t["fits"] for t in result["remedies"][:-1])
    # Re-planned from scratch, the suggested config fits, with the bytes reported.
    again = plan.plan_config(config_mod.replace(cfg, suggestion["change"]), memory_limit=limit)
    assert again["fits"] is True
    assert again["memory"]["need_bytes"] == suggestion["need_bytes"] <= limit
    key, value = next(iter(suggestion["change"].items()))
    assert suggestion["set"] == [f"--set {key}={value}"]


def test_remedies_in_order_of_cost():
    row = {"batch_size": 256, "mesh": {"data": 8, "model": 1}, "strategy": "dp"}
    assert plan.remedies(_cfg(TINY_GPT), row) == [
        {"model.remat": "dots"},
        {"model.remat": "full"},
        {"optimizer.accumulate_steps": 2},
        {"optimizer.accumulate_steps": 4},
        {"optimizer.accumulate_steps": 8},
        {"optimizer.accumulate_steps": 16},
        {"optimizer.accumulate_steps": 32},
        {"parallel.strategy": "fsdp"},
    ]
    full = _cfg(TINY_GPT, ("model.remat=full", "optimizer.accumulate_steps=2"))
    assert plan.remedies(full, {**row, "batch_size": 64}) == [
        {"optimizer.accumulate_steps": 4},
        {"optimizer.accumulate_steps": 8},  # 8 micro-batches of 8: one example per device
        {"parallel.strategy": "fsdp"},
    ]
    dots = _cfg(TINY_GPT, ("model.remat=dots",))
    assert plan.remedies(dots, {**row, "batch_size": 8, "strategy": "fsdp"}) == [
        {"model.remat": "full"}
    ]


def test_a_smaller_batch_is_searched_when_nothing_else_fits(monkeypatch):
    """The largest batch (in units of the data axis) below the configured one that fits."""
    monkeypatch.setattr(plan, "remedies", lambda cfg, row: [])

    def need(batch: int) -> int:
        cfg = _cfg(TINY, (f"train.batch_size={batch}", "data.cache=host"))
        return plan.plan_config(cfg)["memory"]["need_bytes"]

    limit = (need(96) + need(104)) // 2
    result = plan.plan(_cfg(TINY, ("train.batch_size=128", "data.cache=host")), memory_limit=limit)
    assert result["fits"] is False
    assert result["suggestion"]["change"] == {"train.batch_size": 96}
    assert result["suggestion"]["need_bytes"] == need(96) <= limit


# --- find_max_batch (bench --find-max-batch) under pmap -------------------------------------------


def test_find_max_batch_lowers_pmap_steps_per_device():
    """pmap steps take (devices, B / devices, ...) inputs; the probes must lower that layout
    (a plain (B, ...) batch maps B rows over 8 devices and does not lower)."""
    cfg = _cfg(TINY, ("parallel.strategy=pmap",))
    job, _ = plan.build_abstract_job(cfg)
    out = max_batch.find_max_batch(cfg, memory_limit=10**12, max_batch=32)
    assert [p["batch_size"] for p in out["probes"]] == [8, 16, 32]
    assert all(p["fits"] and p["bytes"] > 0 for p in out["probes"])
    # The job's own compile (its feed's abstract input) is the same program as the probe's.
    assert plan.compile_train_step(job).as_text() == plan.compile_train_step(job, 32).as_text()


def test_find_max_batch_counts_micro_batches_in_its_unit():
    cfg = _cfg(TINY, ("optimizer.accumulate_steps=2",))
    out = max_batch.find_max_batch(cfg, memory_limit=10**12, max_batch=64)
    assert [p["batch_size"] for p in out["probes"]] == [16, 32, 64]


# --- model settings the backend cannot run --------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.attention=cudnn", "NVIDIA GPUs only"),
        ("model.remat=offload", "pinned host memory"),
    ],
)
def test_gpu_only_settings_are_located_errors_on_cpu(override, needle):
    cfg = _cfg(TINY_GPT, (override,))
    with pytest.raises(ConfigError, match=needle) as e:
        plan.plan(cfg)
    assert f"--set {override}" in str(e.value) and override.split("=")[0] in str(e.value)
    with pytest.raises(ConfigError, match=needle):
        build_job(cfg, compile_train=False)


# --- the CLI --------------------------------------------------------------------------------------


PLAN_KEYS = {
    "schema",
    "config",
    "note",
    "backend",
    "device_kind",
    "devices",
    "mesh",
    "strategy",
    "batch_size",
    "precision",
    "remat",
    "accumulate_steps",
    "num_params",
    "data",
    "memory",
    "fits",
    "compute",
    "roofline",
    "remedies",
    "suggestion",
}


def test_cli_plan_json(tiny_file):
    result = invoke("plan", str(tiny_file), "--json", "-", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == PLAN_KEYS
    assert out["schema"] == plan.SCHEMA and out["config"] == "tiny"
    assert out["batch_size"] == 64
    assert set(out["memory"]) == {
        "params_bytes",
        "opt_state_bytes",
        "other_state_bytes",
        "input_bytes",
        "data_cache_bytes",
        *MEMORY_KEYS,
        "need_bytes",
        "limit_bytes",
        "limit_from",
    }
    assert set(out["compute"]) == {
        "flops_per_device",
        "flops_per_step",
        "bytes_accessed_per_device",
        "model_flops_per_step",
        "model_flops_per_device",
        "model_flops_formula",
        "attention_kernel",
    }


def test_cli_plan_text_names_the_backend_and_the_verdict(tiny_file, tmp_path):
    result = invoke("plan", str(tiny_file))
    assert result.exit_code == 0, result.output
    assert "compiled for the cpu backend" in result.output
    assert "a CPU plan is not a GPU plan" in result.output
    assert "no limit known" in result.output
    out = tmp_path / "plan.json"
    small = invoke(
        "plan", str(tiny_file), "--memory-limit", "1000", "--batch-size", "8", "--json", str(out)
    )
    assert small.exit_code == 0, small.output
    assert "NO" in small.output and "suggestion: none of these fits" in small.output
    result = json.loads(out.read_text())
    assert result["fits"] is False and result["suggestion"] is None
    assert result["remedies"] and not any(t["fits"] for t in result["remedies"])
    for t in result["remedies"]:
        assert " ".join(t["set"]) in small.output  # every remedy tried is listed


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--batch-size", "12"], ["batch_size"]),
        (["--set", "model.remat=sometimes"], ["model.remat"]),
        (["--set", "model.attention=cudnn"], ["model.attention", "NVIDIA GPUs only"]),
        (["--memory-limit", "0"], ["--memory-limit"]),
    ],
)
def test_cli_plan_bad_input_exits_2(tiny_file, args, needles):
    if "model.attention=cudnn" in args:  # the attention field belongs to the transformer
        path = tiny_file.parent / "gpt.yaml"
        path.write_text(TINY_GPT)
        tiny_file = path
    assert_user_error(invoke("plan", str(tiny_file), *args), *needles)


def test_cli_plan_missing_config(tmp_path):
    assert_user_error(invoke("plan", str(tmp_path / "nope.yaml")), "nope.yaml")
