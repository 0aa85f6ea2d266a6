"""Strategies on 8 fake CPU devices: dp, fsdp, tp and pmap train like one device, and really
shard what they claim to shard."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from accelctl import config, parallel
from accelctl.errors import UserError
from accelctl.train import train
from accelctl.train.job import build_job

MLP = """
model: {name: mlp, hidden: [32, 16], dropout: 0.0}
data: {source: synthetic, shape: [8, 8, 1], num_train: 512, num_eval: 64, dtype: float32}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 32, steps: 8, log_every: 1, eval_every: null}
checkpoint: {enabled: false}
"""

STRATEGIES = {
    "dp": ["parallel.strategy=dp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "tp": ["parallel.strategy=tp", "parallel.mesh={data: 4, model: 2}"],
    "pmap": ["parallel.strategy=pmap"],
}


def train_losses(text: str, overrides: list[str], run_dir) -> tuple[dict, list[float]]:
    summary = train(config.load_text(text, "x.yaml", overrides), run_dir=run_dir, quiet=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return summary, [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    return train_losses(MLP, ["parallel.num_devices=1"], tmp_path_factory.mktemp("one") / "r")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_gives_the_one_device_losses(strategy, one_device_losses, tmp_path):
    ref_summary, ref = one_device_losses
    summary, got = train_losses(MLP, STRATEGIES[strategy], tmp_path / "r")
    assert summary["strategy"] == strategy and summary["devices"] == 8
    assert len(got) == len(ref) == 8
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(
        summary["final_eval"]["loss"], ref_summary["final_eval"]["loss"], rtol=2e-5, atol=2e-6
    )
    assert got[-1] < got[0]


def _bytes_on_first_device(tree) -> int:
    dev = jax.devices()[0]
    return sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for s in leaf.addressable_shards
        if s.device == dev
    )


def test_fsdp_splits_parameters_and_optimizer_state_over_eight_devices():
    wide = MLP.replace("hidden: [32, 16]", "hidden: [256, 128]")
    job = build_job(config.load_text(wide, "x.yaml", ["parallel.strategy=fsdp"]))
    state = job.state.init()
    params = state.params
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    per_device = _bytes_on_first_device(params)
    # The kernels split 8 ways; only the 10-wide head bias stays whole.
    assert per_device <= total / 8 + 10 * 4
    kernel = params["hidden"][0]["kernel"]
    assert kernel[...].sharding.spec == P(None, "data")  # (64, 256): the larger dim
    mu = state.opt_state[0].mu["hidden"][0]["kernel"]
    assert mu[...].sharding.spec == P(None, "data")
    assert _bytes_on_first_device(state.opt_state) <= 2 * (total / 8 + 10 * 4)  # mu, nu
    # The compiled step agrees: its parameter arguments are an eighth of the replicated size.
    dp = build_job(config.load_text(wide, "x.yaml", ["parallel.strategy=dp"]))
    fsdp_args = job.steps.train.memory_analysis().argument_size_in_bytes
    dp_args = dp.steps.train.memory_analysis().argument_size_in_bytes
    assert fsdp_args < dp_args / 4


def test_tp_splits_weights_by_their_logical_axes():
    job = build_job(config.load_text(MLP, "x.yaml", STRATEGIES["tp"]))
    assert dict(job.mesh.shape) == {"data": 4, "model": 2}
    state = job.state.init()
    p = state.params
    # Megatron pairs: column-split, row-split, column-split (the head keeps its classes whole).
    assert p["hidden"][0]["kernel"][...].sharding.spec == P(None, "model")
    assert p["hidden"][0]["bias"][...].sharding.spec == P("model")
    assert p["hidden"][1]["kernel"][...].sharding.spec == P("model", None)
    assert p["head"]["kernel"][...].sharding.spec == P(None, None)
    assert state.opt_state[0].nu["hidden"][0]["kernel"][...].sharding.spec == P(None, "model")


def test_tp_spec_keeps_axes_the_mesh_does_not_divide(tmp_path):
    mesh = build_job(config.load_text(MLP, "x.yaml", STRATEGIES["tp"])).mesh
    assert parallel.tp_spec((8, 6), ("embed", "mlp"), mesh) == P(None, "model")
    assert parallel.tp_spec((8, 7), ("embed", "mlp"), mesh) == P(None, None)
    assert parallel.tp_spec((8, 6), None, mesh) == P()
    assert parallel.fsdp_spec((3, 16, 8), 8) == P(None, "data", None)
    assert parallel.fsdp_spec((10,), 8) == P()


def test_auto_takes_dp_for_a_small_state_and_fsdp_for_a_large_one(monkeypatch):
    cfg = config.load_text(MLP, "x.yaml", ["parallel.strategy=auto"])
    job = build_job(cfg)
    assert job.state.strategy == "dp" and "no memory limit" in job.state.strategy_reason
    import accelctl.devices

    monkeypatch.setattr(accelctl.devices, "memory_limit", lambda device: 1000)
    strategy, reason = parallel.resolve_strategy(cfg, job.mesh, job.state.abstract)
    assert strategy == "fsdp" and "would take" in reason
    monkeypatch.setattr(accelctl.devices, "memory_limit", lambda device: 10**12)
    assert parallel.resolve_strategy(cfg, job.mesh, job.state.abstract)[0] == "dp"


def test_model_axis_without_tp_is_a_config_error():
    with pytest.raises(UserError, match="needs strategy: tp"):
        config.load_text(MLP, "x.yaml", ["parallel.mesh={data: 4, model: 2}"])


def test_pmap_refuses_an_explicit_device_cache():
    cfg = config.load_text(MLP, "x.yaml", ["parallel.strategy=pmap", "data.cache=device"])
    with pytest.raises(UserError, match="data.cache"):
        build_job(cfg)
    job = build_job(config.load_text(MLP, "x.yaml", ["parallel.strategy=pmap"]))
    assert job.feed.cache_mode == "host" and "pmap" in job.feed.cache_reason


def test_a_dp_checkpoint_resumes_under_fsdp(tmp_path):
    ckpt = ["checkpoint.enabled=true", "checkpoint.every_steps=4", "checkpoint.async=false"]
    ref, ref_losses = train_losses(MLP, [*ckpt, "parallel.strategy=fsdp"], tmp_path / "ref")
    train_losses(MLP, [*ckpt, "train.steps=4"], tmp_path / "run")
    cfg = config.load_text(MLP, "x.yaml", [*ckpt, "parallel.strategy=fsdp"])
    resumed = train(cfg, run_dir=tmp_path / "run", quiet=True, resume=True)
    assert resumed["start_step"] == 4 and resumed["strategy"] == "fsdp"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    got = [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]
    np.testing.assert_allclose(got, ref_losses, rtol=2e-5, atol=2e-6)
