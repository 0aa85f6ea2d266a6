"""Faults a cluster and a careless hand produce: damaged checkpoints, full and read-only disks,
a hung step, unwritable outputs, damaged logs, a run killed before its first checkpoint.

Each either falls back and ends where an undamaged run ends (bit for bit), or stops cleanly:
one message, a documented exit code, no traceback, no hang, nothing intact changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from accelctl import checkpoint, config
from accelctl.errors import OutputError, UserError
from accelctl.metrics import JsonlWriter
from accelctl.train import train
from tests.conftest import ROOT, TINY, assert_user_error, invoke

# 12 steps, checkpoints at 4, 8 and 12.
REF = ["checkpoint.every_steps=4", "checkpoint.every_epochs=null"]


def _cfg(overrides=()) -> config.Config:
    return config.load_text(TINY, "tiny.yaml", [*REF, *overrides])


def _steps(run_dir: Path) -> list[int]:
    return checkpoint.complete_steps(run_dir / "checkpoints")


def _tree_digest(folder: Path) -> str:
    """Every file's path and bytes under `folder`: equal digests = nothing was modified."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    summary = train(_cfg(), run_dir=run_dir, quiet=True, log_fn=lambda m: None)
    assert _steps(run_dir) == [4, 8, 12]
    return run_dir, summary


# --------------------------------------------------------------------- the checkpoint damage matrix
def _data_files(step_dir: Path) -> list[Path]:
    """The array data orbax reads (OCDBT's merged `state/d/`; the per-process copies under
    `ocdbt.process_N/` are not read once the checkpoint is finalised)."""
    return [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]


def _truncate(step_dir: Path) -> None:
    for p in _data_files(step_dir):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete_a_file(step_dir: Path) -> None:
    max(_data_files(step_dir), key=lambda f: f.stat().st_size).unlink()  # the one with the data


def _flip_one_byte(step_dir: Path) -> None:
    # One byte in the middle of the largest data file: the kind of damage a disk or a copy
    # does without failing to read.
    p = max(_data_files(step_dir), key=lambda f: f.stat().st_size)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _folder_to_file(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.write_text("not a checkpoint")


def _drop_metadata(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "meta")


DAMAGE = {
    "truncate": _truncate,
    "delete": _delete_a_file,
    "flip": _flip_one_byte,
    "folder_to_file": _folder_to_file,
    "drop_metadata": _drop_metadata,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_ends_bit_identical(
    ref, tmp_path, damage
):
    run_dir = tmp_path / "run"
    shutil.copytree(ref[0], run_dir)
    # Killed after checkpoint 8 (12 and the summary gone), then 8 damaged on disk.
    shutil.rmtree(run_dir / "checkpoints" / "12")
    (run_dir / "summary.json").unlink()
    DAMAGE[damage](run_dir / "checkpoints" / "8")
    intact = _tree_digest(run_dir / "checkpoints" / "4")
    notes: list[str] = []
    summary = train(_cfg(), run_dir=run_dir, quiet=True, resume=True, log_fn=notes.append)
    assert summary["params_sha256"] == ref[1]["params_sha256"]
    assert summary["start_step"] == 4 and summary["steps"] == 12
    assert _tree_digest(run_dir / "checkpoints" / "4") == intact  # never modified
    if damage != "folder_to_file":  # a file named 8 is no checkpoint at all: nothing to skip
        assert any("skipped" in n and "/8" in n for n in notes), notes
        assert any("moved the damaged" in n for n in notes), notes
        assert list((run_dir / "checkpoints").glob("8.damaged-*"))
    # The run saved step 8 again (no collision with the damaged one) and finished.
    assert _steps(run_dir) == [4, 8, 12]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_eval_of_a_run_falls_back_and_changes_nothing(ref, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(ref[0], run_dir)
    DAMAGE[damage](run_dir / "checkpoints" / "12")
    before = _tree_digest(run_dir / "checkpoints")
    result = invoke("eval", "--checkpoint", str(run_dir), "--json", "-")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["step"] == 8
    assert _tree_digest(run_dir / "checkpoints") == before  # eval never moves or repairs


@pytest.mark.parametrize("damage", [d for d in DAMAGE if d != "folder_to_file"])
def test_eval_of_a_damaged_step_fails_cleanly(ref, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(ref[0], run_dir)
    DAMAGE[damage](run_dir / "checkpoints" / "12")
    result = invoke("eval", "--checkpoint", str(run_dir / "checkpoints" / "12"))
    if damage == "drop_metadata":  # without its meta the step cannot say what it holds
        assert_user_error(result, "no checkpoint with readable metadata", "/12")
    else:
        assert_user_error(result, "no readable checkpoint", "unreadable")


def test_flipped_bytes_are_found_by_the_saved_fingerprints(ref, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ref[0] / "checkpoints", ckpts)
    _flip_one_byte(ckpts / "12")
    abstract = checkpoint.read_meta(ckpts, 12)
    assert "fingerprints" in abstract and abstract["fingerprints"]
    from accelctl.train.job import build_job

    target = build_job(_cfg(), compile_train=False).state.abstract
    restored = checkpoint.restore(ckpts, target)
    assert restored.step == 8
    assert any("/12: unreadable" in n for n in restored.notes), restored.notes


# ----------------------------------------------------- a run killed before its first checkpoint
def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_zero(ref, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ref[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "summary.json").unlink()
    with pytest.raises(UserError, match="already holds a run"):
        train(_cfg(), run_dir=run_dir, quiet=True)
    notes: list[str] = []
    summary = train(_cfg(), run_dir=run_dir, quiet=True, resume=True, log_fn=notes.append)
    assert any("starting it again from step 0" in n for n in notes)
    assert summary["params_sha256"] == ref[1]["params_sha256"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == sorted(steps)  # the old events were dropped, not repeated


@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_a_damaged_metrics_log_does_not_stop_a_resume(ref, tmp_path, kind):
    run_dir = tmp_path / "run"
    shutil.copytree(ref[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "12")
    (run_dir / "summary.json").unlink()
    log = run_dir / "metrics.jsonl"
    if kind == "binary":
        log.write_bytes(log.read_bytes()[:200] + bytes(range(256)) * 4 + b"\n")
    else:
        log.unlink()
        log.mkdir()
    summary = train(_cfg(), run_dir=run_dir, quiet=True, resume=True, log_fn=lambda m: None)
    assert summary["params_sha256"] == ref[1]["params_sha256"]
    assert log.is_file()
    if kind == "directory":
        assert list(run_dir.glob("metrics.jsonl.damaged-*"))


def test_plot_skips_values_that_are_not_finite_numbers(ref, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ref[0], run_dir)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 13, "loss": "high", "accuracy": 1e999}\n')
        f.write('{"event": "train", "step": "x", "loss": 1.0}\n')
        f.write('{"event": "eval", "step": 14, "loss": true, "accuracy": null}\n')
        f.write("\xff\xfe not json\n")
    result = invoke("plot", str(run_dir), "-o", str(tmp_path / "p.png"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 1000


# ------------------------------------------------------------------------- unwritable outputs
@pytest.mark.parametrize(
    "target, needle",
    [
        ("missing/x.json", "does not exist"),
        (".", "is a folder"),
        ("/dev/full", "pseudo file system"),
        ("/proc/self/status", "pseudo file system"),
    ],
)
@pytest.mark.parametrize("command", ["train", "env", "bench", "plot"])
def test_json_output_is_checked_before_any_work(tmp_path, tiny_file, command, target, needle):
    json_out = str(tmp_path / target) if not target.startswith("/") else target
    run_dir = tmp_path / "run"
    args = {
        "train": ["train", str(tiny_file), "--run-dir", str(run_dir)],
        "env": ["env"],
        "bench": ["bench", str(tiny_file), "--steps", "2"],
        "plot": ["plot", str(tmp_path)],
    }[command]
    assert_user_error(invoke(*args, "--json", json_out), "--json", needle)
    assert not run_dir.exists()  # nothing was started


def test_run_dir_paths_the_os_refuses_or_inside_another_runs_checkpoints(ref, tmp_path, tiny_file):
    too_long = tmp_path / ("x" * 300)
    assert_user_error(invoke("train", str(tiny_file), "--run-dir", str(too_long)), "longer than")
    inside = ref[0] / "checkpoints" / "99"
    before = _tree_digest(ref[0])
    assert_user_error(
        invoke("train", str(tiny_file), "--run-dir", str(inside)), "inside the checkpoints folder"
    )
    assert _tree_digest(ref[0]) == before


# ------------------------------------------------------------------- disk full, read-only disk
def test_a_failing_metrics_write_stops_cleanly_with_exit_74(tmp_path, monkeypatch):
    def full(self, event):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run/metrics.jsonl"))

    monkeypatch.setattr(JsonlWriter, "write", full)
    with pytest.raises(OutputError) as e:
        train(_cfg(), run_dir=tmp_path / "run", quiet=True)
    assert e.value.exit_code == 74
    message = str(e.value)
    assert "No space left on device" in message and "metrics.jsonl" in message
    assert "checkpoint" in message


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
    )
    return proc.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs (root only; skipped where mounting is not allowed)."""
    where = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(where, "400k"):
        pytest.skip(
            "mounting a small tmpfs needs root (the ENOSPC path is also tested by patching)"
        )
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


DIGITS = [
    "--set", "checkpoint.every_steps=10", "--set", "checkpoint.keep=100",
    "--set", "output.tensorboard=false", "--set", "train.epochs=4", "--quiet",
]  # fmt: skip


def _train_cli(run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "accelctl", "train", "digits_mlp", "--run-dir", str(run_dir)]
    return subprocess.run(
        [*cmd, *DIGITS, *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def test_a_full_disk_stops_cleanly_and_the_run_resumes_after_freeing_space(small_disk):
    run_dir = small_disk / "run"
    out = _train_cli(run_dir)
    assert out.returncode == 74, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stderr.count("\n") <= 3, out.stderr
    assert "No space left on device" in out.stderr and "--resume" in out.stderr
    last = _steps(run_dir)[-1]
    assert f"checkpoints/{last} (step {last})" in out.stderr
    # Free space (the disk grows), then resume to the end.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    out = _train_cli(run_dir, "--resume", "--set", "checkpoint.keep=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_checkpoint_storage_turning_read_only_mid_run_stops_cleanly(tmp_path):
    """The checkpoints folder is its own (tmpfs) mount, remounted read-only once the first
    checkpoint is on it: the next save fails with EROFS and the run stops with exit 74."""
    import time

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    if os.geteuid() != 0 or not _mount_tmpfs(ckpts, "64m"):
        pytest.skip(
            "mounting a tmpfs needs root (the write-failure path is also tested by patching)"
        )
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "accelctl", "train", "digits_mlp", "--run-dir", str(run_dir)]
    cmd += ["--set", "checkpoint.every_steps=20", "--set", "checkpoint.keep=2", "--quiet"]
    cmd += ["--set", "train.epochs=400", "--set", "checkpoint.async=false"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.complete_steps(ckpts) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        assert checkpoint.complete_steps(ckpts), "no checkpoint was written"
        while time.monotonic() < deadline:  # busy while a save has files open: try again
            ro = subprocess.run(["mount", "-o", "remount,ro", str(ckpts)], capture_output=True)
            if ro.returncode == 0:
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=120)  # no hang
    finally:
        proc.kill()
        subprocess.run(["umount", "-l", str(ckpts)], capture_output=True)
    assert proc.returncode == 74, err[-3000:]
    assert "Read-only file system" in err and "Traceback" not in err, err
    assert "The last complete checkpoint is" in err


# ------------------------------------------------------------------------------------ a hung step
STALL = textwrap.dedent(
    """
    # Injected stall: the prefetch thread's 20th batch never comes.
    import sys, time
    from accelctl.data import prefetch
    real = prefetch.Prefetcher.__next__
    count = [0]
    def stalled(self):
        count[0] += 1
        if count[0] == 20:
            time.sleep(3600)
        return real(self)
    prefetch.Prefetcher.__next__ = stalled
    from accelctl.cli import main
    sys.argv = ["accelctl", *sys.argv[1:]]
    main()
    """
)


def test_a_hung_step_dumps_every_stack_and_exits_124(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", STALL, "train", "digits_mlp", "--run-dir", str(run_dir),
         "--set", "data.cache=host", "--set", "train.hang_timeout=3", "--quiet"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert "no training progress" in proc.stderr and "--resume" in proc.stderr
    assert "Thread 0x" in proc.stderr and "stalled" in proc.stderr  # the stacks, incl. the culprit
    (dump,) = run_dir.glob("hang-*.txt")
    assert "stalled" in dump.read_text()
