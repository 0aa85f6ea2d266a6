"""Mixed precision (bf16, fp16 with dynamic loss scaling) and gradient accumulation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accelctl import config
from accelctl.errors import UserError
from accelctl.precision import LossScale
from accelctl.train import train
from accelctl.train.job import build_job

MLP = """
model: {name: mlp, hidden: [32]}
data: {source: synthetic, shape: [8, 8, 1], num_train: 512, num_eval: 64}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 32, steps: 16, log_every: 1, eval_every: null}
checkpoint: {enabled: false}
"""


def run(overrides: list[str], run_dir, text: str = MLP) -> tuple[dict, list[dict]]:
    summary = train(config.load_text(text, "x.yaml", overrides), run_dir=run_dir, quiet=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return summary, [e for e in map(json.loads, lines) if e["event"] == "train"]


def test_bf16_trains_and_keeps_fp32_parameters(tmp_path):
    cfg = config.load_text(MLP, "x.yaml", ["precision.compute=bf16"])
    job = build_job(cfg)
    state = job.state.init()
    for tree in (state.params, state.opt_state):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    # The layers compute in bf16: the compiled step holds bf16 dot products.
    assert "bf16[" in job.steps.train.as_text()
    assert state.loss_scale is None
    summary, events = run(["precision.compute=bf16"], tmp_path / "r")
    assert events[-1]["loss"] < events[0]["loss"]
    assert summary["precision"] == "bf16" and "overflow_steps" not in summary
    ref, ref_events = run([], tmp_path / "fp32")
    assert "bf16[" not in build_job(config.load_text(MLP, "x.yaml")).steps.train.as_text()
    # Close to fp32, not equal: bf16 keeps 8 bits of mantissa.
    np.testing.assert_allclose(events[0]["loss"], ref_events[0]["loss"], rtol=2e-2)


def test_fp16_loss_scale_skips_overflows_and_recovers(tmp_path):
    # 2**24 makes the fp16 gradients overflow (65504 is fp16's largest number); the scale must
    # halve on each overflow, skip those updates without stopping, and grow back after 4 clean
    # steps.
    overrides = [
        "precision.compute=fp16",
        "precision.loss_scale=16777216",
        "precision.growth_interval=4",
        "train.steps=24",
    ]
    summary, events = run(overrides, tmp_path / "r")
    flags = [e["overflow"] for e in events]
    assert len(flags) == 24 and set(flags) <= {0, 1}
    assert flags[0] == 1 and sum(flags) == summary["overflow_steps"] >= 2
    assert summary["skipped_steps"] == 0 and summary["status"] == "completed"
    # Replay the scaling rule over the logged overflow flags: it must give the final scale.
    scale, good = 2.0**24, 0
    for f in flags:
        if f:
            scale, good = max(scale / 2, 1.0), 0
        elif good + 1 >= 4:
            scale, good = scale * 2, 0
        else:
            good += 1
    assert summary["loss_scale"] == scale
    assert 0 in flags[flags.index(0) :]  # clean steps after the first overflows
    clean = [e["loss"] for e, f in zip(events, flags, strict=True) if not f]
    assert clean[-1] < clean[0]  # it recovers and learns


def test_loss_scale_rule():
    ls = LossScale(jnp.float32(8.0), jnp.int32(0), jnp.int32(0), growth_interval=2)
    t, f = jnp.bool_(True), jnp.bool_(False)
    ls = ls.adjust(t, f)
    assert (float(ls.scale), int(ls.good_steps)) == (8.0, 1)
    ls = ls.adjust(t, f)
    assert (float(ls.scale), int(ls.good_steps)) == (16.0, 0)
    ls = ls.adjust(f, t)
    assert (float(ls.scale), int(ls.good_steps), int(ls.overflows)) == (8.0, 0, 1)
    one = LossScale(jnp.float32(1.0), jnp.int32(0), jnp.int32(0)).adjust(f, t)
    assert float(one.scale) == 1.0  # never below 1


@pytest.mark.parametrize("devices", [1, 8])
def test_accumulation_gives_the_whole_batch_update(tmp_path, devices):
    base = [f"parallel.num_devices={devices}", "train.steps=6", "data.cache=host"]
    whole, whole_events = run(base, tmp_path / "whole")
    micro, micro_events = run([*base, "optimizer.accumulate_steps=4"], tmp_path / "micro")
    assert micro["steps"] == whole["steps"] == 6  # steps count updates
    assert micro["accumulate_steps"] == 4
    np.testing.assert_allclose(
        [e["loss"] for e in micro_events], [e["loss"] for e in whole_events], rtol=1e-5, atol=1e-6
    )
    assert [e["accuracy"] for e in micro_events] == [e["accuracy"] for e in whole_events]
    np.testing.assert_allclose(
        micro["final_eval"]["loss"], whole["final_eval"]["loss"], rtol=1e-5, atol=1e-6
    )


def test_accumulation_must_split_the_batch_over_the_devices():
    cfg = config.load_text(MLP, "x.yaml", ["optimizer.accumulate_steps=8"])
    with pytest.raises(UserError, match=r"optimizer.accumulate_steps.*multiple of 64"):
        build_job(cfg)


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    # Overflows early on, so the scale differs from its initial value when the checkpoint is
    # written; the resumed run must continue with it and end bit-identical.
    fp16 = [
        "precision.compute=fp16",
        "precision.loss_scale=16777216",
        "precision.growth_interval=3",
    ]
    ckpt = ["checkpoint.enabled=true", "checkpoint.every_steps=4", "checkpoint.async=false"]
    full, _ = run([*fp16, *ckpt, "train.steps=10"], tmp_path / "full")
    cfg = config.load_text(MLP, "x.yaml", [*fp16, *ckpt, "train.steps=5"])
    first = train(cfg, run_dir=tmp_path / "cut", quiet=True)
    assert first["loss_scale"] != 2.0**24
    cfg = config.load_text(MLP, "x.yaml", [*fp16, *ckpt, "train.steps=10"])
    resumed = train(cfg, run_dir=tmp_path / "cut", quiet=True, resume=True)
    assert resumed["start_step"] == 5
    assert resumed["params_sha256"] == full["params_sha256"]
    assert resumed["loss_scale"] == full["loss_scale"]
    assert resumed["overflow_steps"] == full["overflow_steps"]
