"""`--cpu-devices auto` (the default of train and bench): one XLA device per core for conv nets
on a CPU-only JAX, 1 otherwise; counts set outside accelctl win; decided before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from accelctl import config, devices
from accelctl.devices import CpuDevices, choose_cpu_devices, choose_cpu_devices_for
from accelctl.errors import UserError
from tests.conftest import ROOT, TINY, assert_user_error, invoke

CNN = """
model: {name: cnn, channels: [4, 8], dense: [16], dropout: 0.0}
data: {source: synthetic, shape: [8, 8, 1], num_train: 256, num_eval: 64, num_classes: 4,
       dtype: float32}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 16, steps: 6, log_every: 1, eval_every: null}
checkpoint: {enabled: false}
"""

CONV_NET = """
from flax import nnx

class Net(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.out = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x, *, train):
        return self.out(self.conv(x).mean(axis=(1, 2)))

class Dense(nnx.Module):
    def __init__(self, *, rngs):
        self.out = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x, *, train):
        return self.out(x.reshape(x.shape[0], -1))
"""


def cfg_of(text: str = CNN, overrides: list[str] | None = None) -> config.Config:
    return config.load_text(text, "x.yaml", overrides or [])


@pytest.fixture
def cpu_only(monkeypatch):
    """A fresh CPU-only process as auto sees it: no preset count, backends not started."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setattr(devices, "backends_initialised", lambda: False)
    monkeypatch.setattr(devices, "usable_cores", lambda: 4)
    return monkeypatch


# ---------------------------------------------------------------------------------- the rule
def test_a_given_count_wins():
    assert choose_cpu_devices(3, cfg_of()) == CpuDevices(3, "asked for 3", apply=True)
    for bad in (0, -1, "x"):
        with pytest.raises(UserError, match="at least 1, or auto"):
            choose_cpu_devices(bad, cfg_of())


def test_counts_set_outside_accelctl_are_kept():
    flags = devices.preset_count("--foo --xla_force_host_platform_device_count=3", None, -1)
    assert flags is not None and flags.count == 3 and not flags.apply
    assert "XLA_FLAGS" in flags.reason
    env = devices.preset_count("", "5", 5)
    assert env is not None and env.count == 5 and "JAX_NUM_CPU_DEVICES=5" in env.reason
    assert devices.preset_count("", None, 6).count == 6  # type: ignore[union-attr]
    assert devices.preset_count("--xla_cpu_use_thunk_runtime=false", None, -1) is None


def test_auto_applies_only_when_the_cpu_is_the_default_backend():
    assert devices.accelerator_default("cpu", ["xla_cuda13"]) is None
    assert devices.accelerator_default(None, []) is None
    assert "puts cuda first" in devices.accelerator_default("cuda,cpu", [])  # type: ignore[operator]
    reason = devices.accelerator_default(None, ["xla_cuda13"])
    assert reason is not None and "xla_cuda13" in reason


def test_auto_leaves_an_accelerator_jax_alone(cpu_only):
    cpu_only.setattr(devices, "accelerator_default", lambda platforms, plugins: "a GPU jax")
    choice = choose_cpu_devices("auto", cfg_of())
    assert choice == CpuDevices(None, "a GPU jax")


@pytest.mark.parametrize(
    ("text", "overrides", "cores", "count", "why"),
    [
        (CNN, [], 4, 4, "a cnn (convolutions); one CPU device per core, 4 of 4"),
        (CNN, [], 3, 2, "the batch does not divide over 3"),
        (CNN, ["train.batch_size=30", "train.eval_batch_size=30"], 4, 3, "does not divide"),
        (CNN, ["train.batch_size=7"], 4, 1, "batch 7 does not divide over 2..4"),
        (CNN, ["train.eval_batch_size=6"], 4, 2, "one CPU device per core, 2 of 4"),
        (CNN, ["optimizer.accumulate_steps=8"], 4, 2, "2 of 4"),
        (CNN, [], 1, 1, "only one core"),
        (CNN, ["parallel.num_devices=1"], 4, 1, "parallel.num_devices"),
        (TINY, [], 4, 1, "a mlp (no convolutions)"),
    ],
)
def test_auto_rule(cpu_only, text, overrides, cores, count, why):
    cpu_only.setattr(devices, "usable_cores", lambda: cores)
    choice = choose_cpu_devices("auto", cfg_of(text, overrides))
    assert choice.count == count and choice.apply, choice
    assert why in choice.reason, choice.reason


def test_auto_caps_at_eight_devices(cpu_only):
    cpu_only.setattr(devices, "usable_cores", lambda: 64)
    choice = choose_cpu_devices("auto", cfg_of(CNN, ["train.batch_size=64"]))
    assert choice.count == 8


def test_auto_resnet_and_transformer(cpu_only):
    resnet = "model: {name: resnet, stage_sizes: [1], width: 4}\n" + CNN.split("\n", 2)[2]
    assert choose_cpu_devices("auto", cfg_of(resnet)).count == 4
    gpt = config.load("gpt_tiny")
    assert choose_cpu_devices("auto", gpt).count == 1


def test_auto_inspects_the_users_nnx_model(cpu_only, tmp_path):
    (tmp_path / "nets.py").write_text(CONV_NET)
    base = CNN.replace(
        "model: {name: cnn, channels: [4, 8], dense: [16], dropout: 0.0}",
        f"model: {{target: {tmp_path / 'nets.py'}:Net}}",
    )
    conv = choose_cpu_devices("auto", cfg_of(base))
    assert conv.count == 4 and "convolution kernels" in conv.reason
    dense = choose_cpu_devices("auto", cfg_of(base.replace(":Net", ":Dense")))
    assert dense.count == 1 and "no convolution kernels" in dense.reason
    example = config.load(ROOT / "examples" / "own_nnx_model" / "config.yaml")
    assert choose_cpu_devices("auto", example).count == 4
    # A Linen module is initialised on data; with data other than synthetic it is not inspected.
    linen = config.load(ROOT / "examples" / "linen_model" / "config.yaml")
    choice = choose_cpu_devices("auto", linen)
    assert choice.count == 1 and "known only on data" in choice.reason


def test_bench_splits_only_when_every_workload_agrees(cpu_only):
    mlp, cnn = cfg_of(TINY), cfg_of(CNN)
    both = choose_cpu_devices_for("auto", [("mlp", mlp), ("cnn", cnn)])
    assert both.count == 1 and "mlp 1, cnn 4" in both.reason
    assert choose_cpu_devices_for("auto", [("a", cnn), ("b", cnn)]).count == 4
    assert choose_cpu_devices_for(2, [("mlp", mlp), ("cnn", cnn)]).count == 2


# ------------------------------------------------------------------------------------- the CLI
def test_cli_bad_cpu_devices(tiny_file):
    for bad in ("0", "many", "-2"):
        result = invoke("train", str(tiny_file), "--cpu-devices", bad)
        assert_user_error(result, "--cpu-devices", "at least 1, or auto")


def test_summary_records_the_count_and_why(tmp_path, tiny_file):
    # The test process's XLA_FLAGS asks for 8 host devices: auto keeps them.
    result = invoke("train", str(tiny_file), "--run-dir", str(tmp_path / "r"), "--json", "-")
    assert result.exit_code == 0, result.output
    cpu = json.loads(result.stdout)["cpu_devices"]
    assert cpu["count"] == 8 and "xla_force_host_platform_device_count=8" in cpu["reason"]


def _fresh(*args: str, tmp_path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """accelctl in a fresh process on a CPU-only JAX with no preset device count."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update({"JAX_PLATFORMS": "cpu", **(extra_env or {})})
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_auto_splits_a_cnn_and_trains_the_same(tmp_path):
    """No flag: a conv net on a CPU-only JAX gets one device per core (batch 16 permitting), and
    trains like one device within float tolerance."""
    cfg = tmp_path / "cnn.yaml"
    cfg.write_text(CNN)
    runs = {}
    for name, flags in (("auto", []), ("one", ["--cpu-devices", "1"])):
        out = _fresh(
            "-m", "accelctl", "train", str(cfg), "--run-dir", str(tmp_path / name), "--quiet",
            *flags, tmp_path=tmp_path,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses = [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]
        runs[name] = (summary, losses)
    cores = min(devices.usable_cores(), devices.AUTO_MAX_DEVICES)
    expected = max(n for n in range(1, cores + 1) if 16 % n == 0)
    auto, one = runs["auto"][0], runs["one"][0]
    assert auto["devices"] == auto["cpu_devices"]["count"] == expected
    assert "auto: a cnn" in auto["cpu_devices"]["reason"]
    assert one["devices"] == one["cpu_devices"]["count"] == 1
    assert one["cpu_devices"]["reason"] == "asked for 1"
    assert len(runs["auto"][1]) == len(runs["one"][1]) == 6
    assert runs["auto"][1] == pytest.approx(runs["one"][1], rel=2e-5, abs=2e-6)
    assert auto["final_eval"]["loss"] == pytest.approx(one["final_eval"]["loss"], rel=2e-5)


def test_inspecting_a_users_model_starts_no_backend(tmp_path):
    """auto builds the user's model under jax.eval_shape: JAX's backends stay unstarted, so the
    count can still be set."""
    code = (
        "from accelctl import config, devices; "
        f"cfg = config.load({str(ROOT / 'examples' / 'own_nnx_model' / 'config.yaml')!r}); "
        "c = devices.choose_cpu_devices('auto', cfg); "
        "print(c.count is not None and c.count > 0, c.apply, "
        "'convolution kernels' in c.reason or c.reason, devices.backends_initialised())"
    )
    out = _fresh("-c", code, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True", "True", "False"]
