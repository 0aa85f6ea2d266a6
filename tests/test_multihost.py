"""Multi-process training on the CPU backend: `accelctl launch` on loopback, gloo collectives."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accelctl import distributed, launch
from accelctl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
model: {name: mlp, hidden: [16], dropout: 0.1}
data: {source: synthetic, shape: [4, 4, 1], num_train: 256, num_eval: 100, num_classes: 4}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 32, steps: 12, log_every: 1, eval_every: 6}
"""


LAUNCH_2X2 = ("launch", "-n", "2", "--devices-per-process", "2", "--platform", "cpu")


def child_env() -> dict[str, str]:
    """The test's environment without its 8 fake devices: each command sets its own."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def accelctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run(
        [sys.executable, "-m", "accelctl", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def train_events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mh")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(CONFIG)
    two = accelctl(
        *LAUNCH_2X2,
        str(cfg),
        "--run-dir",
        str(tmp / "two"),
    )
    one = accelctl("train", str(cfg), "--cpu-devices", "4", "--run-dir", str(tmp / "one"))
    return tmp, two, one


def test_two_processes_train_like_one_process_with_the_same_devices(runs):
    tmp, two, one = runs
    assert two.returncode == 0, two.stdout[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = train_events(tmp / "one"), train_events(tmp / "two")
    assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-5, abs=2e-6)
    s1 = json.loads((tmp / "one" / "summary.json").read_text())
    s2 = json.loads((tmp / "two" / "summary.json").read_text())
    assert (s1["processes"], s1["devices"]) == (1, 4)
    assert (s2["processes"], s2["devices"]) == (2, 4)
    assert s2["final_eval"]["loss"] == pytest.approx(s1["final_eval"]["loss"], rel=2e-5)
    assert s2["final_eval"]["count"] == 100
    assert sorted(p.name for p in (tmp / "two" / "checkpoints").iterdir()) == ["12", "8"]


def test_only_process_zero_writes_logs_and_reports(runs):
    tmp, two, _ = runs
    lines = two.stdout.splitlines()
    assert any(line.startswith("[launch] process 1: pid") for line in lines)
    p0 = [line for line in lines if line.startswith("[0] ")]
    p1 = [line for line in lines if line.startswith("[1] ")]
    assert any("train step 12/12" in line for line in p0)
    assert any("eval accuracy" in line for line in p0)  # the summary table
    assert not any("train step" in line or "eval accuracy" in line for line in p1)
    # One set of logs: every step once, one config, one summary.
    steps = [e["step"] for e in train_events(tmp / "two")]
    assert steps == sorted(set(steps))
    assert {p.name for p in (tmp / "two").iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
        "tensorboard",
    }


def test_a_killed_process_stops_the_job_with_its_name(tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(CONFIG.replace("steps: 12, log_every: 1", "steps: 100000, log_every: 50"))
    env = child_env()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelctl",
            "launch",
            "-n",
            "2",
            "--platform",
            "cpu",
            str(cfg),
            "--run-dir",
            str(tmp_path / "r"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    pid1, out = None, []
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        out.append(line)
        if line.startswith("[launch] process 1: pid"):
            pid1 = int(line.split()[-1])
        if line.startswith("[0] train step") and pid1 is not None:
            break
        assert time.monotonic() < deadline, "".join(out)
    assert pid1 is not None, "".join(out)
    killed = time.monotonic()
    os.kill(pid1, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    took = time.monotonic() - killed
    text = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGKILL, text[-3000:]
    assert f"process 1 (pid {pid1}) was killed by SIGKILL" in text
    assert "stopping the other 1 process(es)" in text
    assert took < launch.GRACE_S + 30


def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)

    def join(process_id: str) -> subprocess.CompletedProcess:
        port = f"127.0.0.1:{launch.free_port()}"  # nothing listens there
        return accelctl(
            *("train", str(cfg), "--run-dir", str(tmp_path / "r"), "--coordinator", port),
            *("--num-processes", "2", "--process-id", process_id, "--dist-timeout", "3"),
            timeout=120,
        )

    t0 = time.monotonic()
    result = join("1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "process 1 of 2 could not join the coordinator 127.0.0.1:" in result.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "r").exists()
    # Process 0 hosts the coordinator; when the others never come it gives up the same way.
    alone = join("0")
    assert alone.returncode == 2 and "process 0 of 2 could not join" in alone.stderr
    no_dir = accelctl(
        "train",
        str(cfg),
        "--coordinator",
        "127.0.0.1:1",
        "--num-processes",
        "2",
        "--process-id",
        "0",
    )
    assert no_dir.returncode == 2 and "needs --run-dir" in no_dir.stderr


def test_resolve_reads_flags_then_environment_then_clusters():
    assert distributed.resolve(environ={}) is None
    spec = distributed.resolve("h:1", 2, 1, environ={})
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.source) == (
        "h:1",
        2,
        1,
        "flags",
    )
    env = {"ACCELCTL_COORDINATOR": "h:2", "ACCELCTL_NUM_PROCESSES": "4", "ACCELCTL_PROCESS_ID": "3"}
    spec = distributed.resolve(environ=env)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("h:2", 4, 3)
    assert distributed.resolve(environ={"SLURM_NTASKS": "8"}).source == "SLURM"
    assert distributed.resolve(environ={"SLURM_NTASKS": "1"}) is None
    assert distributed.resolve(environ={"OMPI_COMM_WORLD_SIZE": "2"}).source == "Open MPI"
    with pytest.raises(UserError, match="missing --process-id"):
        distributed.resolve("h:1", 2, None, environ={})
    with pytest.raises(UserError, match=r"must be in 0\.\.1"):
        distributed.resolve("h:1", 2, 2, environ={})
    with pytest.raises(UserError, match="HOST:PORT"):
        distributed.resolve("h", 2, 0, environ={})
    with pytest.raises(UserError, match="ACCELCTL_NUM_PROCESSES"):
        distributed.resolve(environ={"ACCELCTL_COORDINATOR": "h:1", "ACCELCTL_PROCESS_ID": "0"})


def test_process_envs_give_each_process_its_devices():
    envs = launch.process_envs(2, 3, "cpu", 1234)
    assert [e["ACCELCTL_PROCESS_ID"] for e, _ in envs] == ["0", "1"]
    assert all(e["ACCELCTL_COORDINATOR"] == "127.0.0.1:1234" for e, _ in envs)
    assert all(extra == ["--cpu-devices", "3"] for _, extra in envs)
    gpus = launch.process_envs(2, 2, "gpu", 1, gpus=4)
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in gpus] == ["0,1", "2,3"]
    with pytest.raises(UserError, match="needs 6 GPUs; 4 are visible"):
        launch.process_envs(3, 2, "gpu", 1, gpus=4)
    assert launch.exit_code(-9) == 137 and launch.exit_code(3) == 3


@pytest.mark.slow  # two 2-process jobs and a resume: 30-50 s on 2 cores
def test_sigterm_stops_every_process_at_one_step_and_the_job_resumes(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(CONFIG.replace("steps: 12, log_every: 1", "steps: 300, log_every: 20"))
    env = child_env()
    base = ["launch", "-n", "2", "--platform", "cpu", str(cfg)]
    cmd = [sys.executable, "-m", "accelctl", *base, "--run-dir", str(tmp_path / "cut")]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("[0] train step"):
            proc.send_signal(signal.SIGTERM)  # launch passes it on to both processes
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(out) + rest
    assert proc.returncode == 75, text[-3000:]
    events = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    stop = [e for e in events if e["event"] == "preempted"]
    assert len(stop) == 1 and stop[0]["step"] % 20 == 0 and stop[0]["step"] < 300
    assert (tmp_path / "cut" / "checkpoints" / str(stop[0]["step"])).is_dir()
    resumed = accelctl(*base, "--run-dir", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    full = accelctl(*base, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stdout[-3000:]
    a = json.loads((tmp_path / "cut" / "summary.json").read_text())
    b = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert a["start_step"] == stop[0]["step"] and a["steps"] == b["steps"] == 300
    assert a["params_sha256"] == b["params_sha256"]


def test_fsdp_across_processes(runs):
    # Parameters sharded across the two processes: the summary's digest gathers them.
    tmp, _, one = runs
    result = accelctl(
        *LAUNCH_2X2,
        str(tmp / "cfg.yaml"),
        "--run-dir",
        str(tmp / "fsdp"),
        "--set",
        "parallel.strategy=fsdp",
    )
    assert result.returncode == 0, result.stdout[-3000:]
    s = json.loads((tmp / "fsdp" / "summary.json").read_text())
    ref = json.loads((tmp / "one" / "summary.json").read_text())
    assert s["strategy"] == "fsdp" and s["processes"] == 2
    assert s["final_eval"]["loss"] == pytest.approx(ref["final_eval"]["loss"], rel=2e-5)
    assert len(s["params_sha256"]) == 64
