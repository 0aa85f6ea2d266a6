"""Profiling: `train --profile START:COUNT`, `bench --profile DIR`, and reading jax's traces."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from accelctl import profile
from tests.conftest import TINY, assert_user_error, invoke


def _trace_events(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _write_trace(path: Path, events: list[dict]) -> Path:
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return path


# ------------------------------------------------------------------------------ the window
def test_parse_window():
    assert profile.parse_window("3:4") == profile.Window(3, 4)
    assert profile.Window(3, 4).last == 6 and str(profile.Window(3, 4)) == "3:4"
    for bad, why in [
        ("3", "START:COUNT"),
        ("1:2:3", "START:COUNT"),
        ("a:2", "whole numbers"),
        ("1.5:2", "whole numbers"),
        ("0:2", "START must be at least 1"),
        ("2:0", "COUNT must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=why):
            profile.parse_window(bad)


def test_check_window_inside_the_run():
    profile.check_window(profile.Window(1, 12), first_step=0, total=12)
    with pytest.raises(profile.UserError, match="past the 12 steps"):
        profile.check_window(profile.Window(10, 4), first_step=0, total=12)
    with pytest.raises(profile.UserError, match="continues from step 6"):
        profile.check_window(profile.Window(5, 2), first_step=6, total=12)


# ------------------------------------------------------------------------- reading a trace
def test_parse_a_real_cpu_trace(tmp_path):
    """A trace jax writes on XLA:CPU: the ops of the jitted function, per device, by self time."""
    x = jnp.ones((64, 64))

    @jax.jit
    def f(x):
        return jnp.tanh(x @ x).sum()

    f(x).block_until_ready()  # compiled outside the trace
    profile.start_trace(tmp_path)
    for _ in range(3):
        f(x).block_until_ready()
    profile.stop_trace()
    table = profile.parse_trace(profile.find_trace(tmp_path))
    assert table.source == "cpu-thunks" and table.devices == 1
    assert table.rows and sum(r["share"] for r in table.rows) == pytest.approx(1.0)
    assert table.total_ms == pytest.approx(sum(r["total_ms"] for r in table.rows))
    # Every op of f ran once per call: three times.
    assert {r["count"] for r in table.rows} == {3}
    # The "end: <op>" markers XLA:CPU writes after each op are not ops.
    assert not any(r["name"].startswith("end:") for r in table.rows)
    shares = [r["total_ms"] for r in table.rows]
    assert shares == sorted(shares, reverse=True)


def test_parse_device_streams_ignores_host_launches_and_nesting(tmp_path):
    """GPU layout: ops are the device's stream events (keyed by hlo_op, else the kernel name);
    host events are launches; a nested event is charged to itself, not twice."""
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
        {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 700, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 500, "name": "jit_train_step(1)"},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 100, "name": "sm90_xmma_gemm_bf16",
         "args": {"hlo_op": "gemm_fusion_dot.3"}},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 200, "dur": 100, "name": "sm90_xmma_gemm_bf16",
         "args": {"hlo_op": "gemm_fusion_dot.3"}},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 300, "dur": 60, "name": "loop_add_fusion",
         "args": {"hlo_op": "while.2"}},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 310, "dur": 20, "name": "inner",
         "args": {"hlo_op": "add.9"}},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 400, "dur": 40, "name": "MemcpyH2D"},
        {"ph": "X", "pid": 700, "tid": 1, "ts": 0, "dur": 900, "name": "launch",
         "args": {"hlo_op": "gemm_fusion_dot.3"}},
    ]  # fmt: skip
    table = profile.parse_trace(_write_trace(tmp_path / "t.trace.json.gz", events))
    assert table.source == "streams" and table.devices == 1
    got = {r["name"]: (r["total_ms"], r["count"]) for r in table.rows}
    assert got == {
        "gemm_fusion_dot.3": (pytest.approx(0.2), 2),
        "while.2": (pytest.approx(0.04), 1),  # 60 us less its nested 20
        "MemcpyH2D": (pytest.approx(0.04), 1),
        "add.9": (pytest.approx(0.02), 1),
    }
    assert table.rows[0]["name"] == "gemm_fusion_dot.3"
    assert table.rows[0]["share"] == pytest.approx(0.2 / 0.3)


def test_parse_prefers_a_devices_xla_ops_line(tmp_path):
    events = [
        {"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/device:TPU:0"}},
        {"ph": "M", "pid": 3, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 3, "tid": 5, "name": "thread_name", "args": {"name": "Stream #5"}},
        {"ph": "X", "pid": 3, "tid": 2, "ts": 0, "dur": 30, "name": "fusion.1"},
        {"ph": "X", "pid": 3, "tid": 2, "ts": 40, "dur": 10, "name": "convolution.4"},
        {"ph": "X", "pid": 3, "tid": 5, "ts": 0, "dur": 30, "name": "kernel_of_fusion_1"},
    ]
    table = profile.parse_trace(_write_trace(tmp_path / "t.trace.json.gz", events))
    assert table.source == "xla-ops"
    assert [r["name"] for r in table.rows] == ["fusion.1", "convolution.4"]


def test_unreadable_trace_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.trace.json.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(profile.UserError, match="Chrome-trace"):
        profile.parse_trace(bad)
    out = profile.summarize(tmp_path / "none", steps=(1, 2), wall_s=1.0, input_wait_s=0.5)
    assert out["top_ops"] == [] and "no plugins/profile" in out["error"]
    assert out["input_wait_fraction"] == 0.5


# ------------------------------------------------------------------------------ train --profile
def test_train_profile_traces_exactly_the_window(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run_dir = tmp_path / "run"
    # Evaluations at steps 4 (just before the window) and 8 (its last step).
    args = ["train", str(cfg), "--run-dir", str(run_dir), "--profile", "5:4", "--quiet"]
    result = invoke(*args, "--set", "train.eval_every=4", "--json", "-")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    p = summary["profile"]
    assert p["steps"] == [5, 8] and p["error"] is None
    assert p["dir"] == str(run_dir / "profile")
    assert 0.0 <= p["input_wait_fraction"] <= 1.0 and p["wall_s"] > 0
    assert p["top_ops"] and len(p["top_ops"]) <= profile.TOP_OPS
    assert p["devices"] == summary["devices"] == 8
    trace = Path(p["trace"])
    assert trace.parent.parent == run_dir / "profile" / "plugins" / "profile"
    assert list(trace.parent.glob("*.xplane.pb"))  # what TensorBoard's profile plugin reads
    # The trace holds steps 5..8 and nothing else of training: 4 executions of the train step on
    # each device, and no evaluation (the one after step 4 ran before the trace started, the one
    # after step 8 after it stopped).
    runs = defaultdict(set)
    for e in _trace_events(trace):
        args = e.get("args") or {}
        if "hlo_module" in args:
            runs[(args["hlo_module"], args.get("device_ordinal"))].add(args.get("run_id"))
    train_runs = {dev: len(r) for (mod, dev), r in runs.items() if mod == "jit_train_step"}
    assert len(train_runs) == 8 and set(train_runs.values()) == {4}
    assert {mod for mod, _ in runs} <= {"jit_train_step", "jit_take_sums"}
    # Trace start/stop and parsing are kept out of the training time.
    assert summary["time_s"]["profile"] > 0
    assert summary["time_s"]["train"] > 0


def test_train_profile_from_the_first_step(tmp_path, tiny_file):
    run_dir = tmp_path / "run"
    result = invoke(
        "train", str(tiny_file), "--run-dir", str(run_dir), "--profile", "1:2", "--json", "-"
    )
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)["profile"]
    assert p["steps"] == [1, 2] and p["top_ops"]


def test_train_profile_table_is_printed(tmp_path, tiny_file):
    result = invoke("train", str(tiny_file), "--run-dir", str(tmp_path / "r"), "--profile", "2:2")
    assert result.exit_code == 0, result.output
    assert "profile: steps 2-3" in result.output and "device operation" in result.output
    assert "tensorboard --logdir" in result.output


@pytest.mark.parametrize(
    ("window", "needle"),
    [
        ("0:2", "START must be at least 1"),
        ("x:2", "whole numbers"),
        ("5", "START:COUNT"),
        ("10:5", "past the 12 steps"),
    ],
)
def test_train_profile_bad_window_is_a_usage_error(tmp_path, tiny_file, window, needle):
    result = invoke("train", str(tiny_file), "--run-dir", str(tmp_path / "r"), "--profile", window)
    assert_user_error(result, "profile", needle)
    assert not list(tmp_path.glob("r/profile/**/*.trace.json.gz"))


# ------------------------------------------------------------------------------ bench --profile
def test_bench_profile_traces_each_workload(tmp_path, tiny_file):
    out = tmp_path / "prof"
    result = invoke(
        "bench", str(tiny_file), "--steps", "3", "--warmup", "1", "--profile", str(out),
        "--json", "-",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    p = row["profile"]
    assert p["steps"] == [1, 3] and p["top_ops"] and p["error"] is None
    assert p["input_wait_fraction"] is None  # the bare step has no input pipeline
    assert Path(p["dir"]) == out / "tiny-b32-fp32"
    assert Path(p["trace"]).is_file()
    # Three bare steps on each of the 8 devices, nothing else.
    runs = defaultdict(set)
    for e in _trace_events(Path(p["trace"])):
        args = e.get("args") or {}
        if args.get("hlo_module") == "jit_train_step":
            runs[args.get("device_ordinal")].add(args.get("run_id"))
    assert len(runs) == 8 and {len(r) for r in runs.values()} == {3}
    plain = invoke("bench", str(tiny_file), "--steps", "2", "--warmup", "0", "--json", "-")
    assert json.loads(plain.stdout)["results"][0]["profile"] is None


def test_bench_profile_folder_must_be_writable(tmp_path, tiny_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("bench", str(tiny_file), "--profile", str(blocker / "sub"))
    assert_user_error(result, "--profile", "is a file")
