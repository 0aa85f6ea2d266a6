"""Killed and preempted runs, resumed in real processes, end bit-identical to uninterrupted ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accelctl import config
from accelctl.train import train

# Long enough (in steps and checkpoints) that a kill lands mid-run; dropout and a cosine
# schedule make the RNG and the schedule position matter for an exact continuation.
CONFIG = """
model: {name: mlp, hidden: [16], dropout: 0.1}
data: {source: synthetic, shape: [4, 4, 1], num_train: 256, num_eval: 100, num_classes: 4}
optimizer: {name: adam, lr: 0.01}
schedule: {name: cosine, warmup_steps: 10}
train: {batch_size: 32, steps: 400, log_every: 7, eval_every: 50}
checkpoint: {every_steps: 5, every_epochs: null, keep: 3}
"""
DEVICES = {1: ["--set", "parallel.num_devices=1"], 8: []}
_LOGGED = ("event", "step", "loss", "accuracy", "lr", "skipped", "count")


def _events(run_dir: Path) -> list[tuple]:
    """The logged values of every train/eval event (timings left out)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] in ("train", "eval"):
            out.append(tuple(event.get(k) for k in _LOGGED))
    return out


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "resume.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Uninterrupted runs (in this process) on 1 and 8 devices: what resumed runs must match."""
    runs = {}
    for n, extra in DEVICES.items():
        run_dir = tmp_path_factory.mktemp(f"ref{n}") / "run"
        # Checkpoints do not change the numbers; leaving them out keeps this fast.
        cfg = config.load(config_file, [*extra[1:], "checkpoint.enabled=false"])
        train(cfg, run_dir=run_dir, quiet=True)
        runs[n] = run_dir
    return runs


def _start(config_file: Path, run_dir: Path, n: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelctl", "train", str(config_file), "--run-dir", str(run_dir)]
    return subprocess.Popen(
        [*cmd, "--quiet", *DEVICES[n], *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> None:
    """Return once the run has a complete checkpoint (a folder named by its step alone)."""
    ckpt = run_dir / "checkpoints"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint within the timeout")


def _resume(config_file: Path, run_dir: Path, n: int) -> tuple[dict, str]:
    # A sparser cadence is an allowed change (and keeps the test fast).
    proc = _start(
        config_file, run_dir, n, "--resume", "--json", "-", "--set", "checkpoint.every_steps=100"
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out), err


@pytest.mark.parametrize("n", [1, 8])
def test_sigkill_then_resume_is_bit_identical(
    n: int, config_file: Path, reference: dict[int, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = _start(config_file, run_dir, n)
    _wait_for_checkpoint(proc, run_dir)
    time.sleep(0.5)  # let it run on (and start more checkpoints) before the kill
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()

    summary, err = _resume(config_file, run_dir, n)
    assert "resuming from" in err
    assert "checkpoint.every_steps: 5 -> 100" in err  # reported as an allowed change
    start = summary["start_step"]
    assert 5 <= start < 400 and start % 5 == 0
    ref = json.loads((reference[n] / "summary.json").read_text())
    assert summary["params_sha256"] == ref["params_sha256"]
    assert summary["final_eval"] == ref["final_eval"]
    assert summary["steps"] == 400 and summary["devices"] == n
    # Every logged value, before the kill (kept) and after it (re-run), is the reference's.
    assert _events(run_dir) == _events(reference[n])


def test_sigterm_checkpoints_exits_75_and_resumes(
    config_file: Path, reference: dict[int, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = _start(config_file, run_dir, 8)
    _wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Traceback" not in err
    assert "SIGTERM" in err and "--resume" in err
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    preempted = [e for e in events if e["event"] == "preempted"]
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGTERM"
    step = preempted[0]["step"]
    assert 0 < step < 400
    assert (run_dir / "checkpoints" / str(step) / "state").is_dir()
    # Metrics were flushed up to the stop: the last train event is within one log interval.
    last_train = max(e["step"] for e in events if e["event"] == "train")
    assert step - 7 < last_train <= step

    summary, err = _resume(config_file, run_dir, 8)
    assert summary["start_step"] == step
    ref = json.loads((reference[8] / "summary.json").read_text())
    assert summary["params_sha256"] == ref["params_sha256"]
    assert _events(run_dir) == _events(reference[8])
