"""TensorBoard event files beside metrics.jsonl, read back without TensorFlow."""

from __future__ import annotations

import json
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog

from accelctl.metrics import TENSORBOARD_DIR, TensorBoardWriter
from accelctl.train import train

Scalars = dict[str, list[tuple[int, float]]]


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated and offset."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_known_answer():
    crc = _masked_crc32c(b"123456789")
    # Unmask to compare with the standard CRC-32C check value.
    rot = (crc - 0xA282EAD8) & 0xFFFFFFFF
    assert ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF == 0xE3069283


def read_events(path: Path) -> list[Event]:
    """Every Event of one file: TFRecord framing (u64 length, u32 crc, payload, u32 crc)."""
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert header_crc == _masked_crc32c(header), f"{path}: bad length checksum at {pos}"
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _masked_crc32c(payload), f"{path}: bad payload checksum at {pos}"
        events.append(Event.FromString(payload))
        pos += 16 + length
    return events


def event_files(log_dir: Path) -> list[Path]:
    # TensorBoard reads a folder's event files in name order.
    return sorted(log_dir.glob("events.out.tfevents.*"))


def read_scalars(log_dir: Path, *, purge: bool = True) -> Scalars:
    """tag -> [(step, value)] as TensorBoard shows them: a SessionLog START at step S (a resumed
    run's purge_step) hides the values logged earlier at steps >= S."""
    out: Scalars = defaultdict(list)
    for path in event_files(log_dir):
        for event in read_events(path):
            if purge and event.session_log.status == SessionLog.START:
                for tag in out:
                    out[tag] = [(s, v) for s, v in out[tag] if s < event.step]
            for value in event.summary.value:
                out[value.tag].append((event.step, value.simple_value))
    return dict(out)


def jsonl(run_dir: Path, kind: str, key: str) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e[key]) for e in map(json.loads, lines) if e["event"] == kind]


def assert_same(tb: list[tuple[int, float]], ref: list[tuple[int, float]]) -> None:
    assert [s for s, _ in tb] == [s for s, _ in ref]
    # TensorBoard stores float32.
    np.testing.assert_allclose([v for _, v in tb], [v for _, v in ref], rtol=1e-6, atol=1e-7)


def test_writer_logs_train_and_eval_scalars(tmp_path):
    writer = TensorBoardWriter(tmp_path / "tb")
    writer.start(10, "train")
    writer.write({"event": "resume", "step": 0, "checkpoint": "x", "notes": [], "changes": []})
    train_event = {"event": "train", "step": 5, "loss": 1.25, "accuracy": float("nan")}
    writer.write({**train_event, "lr": 0.1, "skipped": 0, "overflow": 2, "steps_per_s": 3.0})
    writer.write({"event": "train", "step": 10, "loss": 1.0, "accuracy": 0.5, "lr": 0.05})
    writer.write({"event": "eval", "step": 10, "loss": 0.9, "accuracy": 0.75, "count": 100})
    writer.close()
    writer.close()  # the loop and train() both close it
    scalars = read_scalars(tmp_path / "tb")
    assert scalars == {
        "train/loss": [(5, 1.25), (10, 1.0)],
        "train/accuracy": [(10, 0.5)],  # NaN left out
        "train/lr": [(5, pytest.approx(0.1)), (10, pytest.approx(0.05))],
        "train/skipped": [(5, 0.0)],
        "train/overflow": [(5, 2.0)],
        "train/steps_per_s": [(5, 3.0)],
        "eval/loss": [(10, pytest.approx(0.9))],
        "eval/accuracy": [(10, 0.75)],
    }


def test_training_writes_the_metrics_jsonl_values(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(["train.log_every=2"]), run_dir=run_dir, quiet=True)
    log_dir = run_dir / TENSORBOARD_DIR
    assert len(event_files(log_dir)) == 1
    scalars = read_scalars(log_dir)
    for key in ("loss", "accuracy", "lr", "steps_per_s", "samples_per_s", "skipped"):
        assert_same(scalars[f"train/{key}"], jsonl(run_dir, "train", key))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "accuracy"):
        assert_same(scalars[f"eval/{key}"], jsonl(run_dir, "eval", key))
    assert [s for s, _ in scalars["eval/loss"]] == [6, 12]
    assert "train/overflow" not in scalars  # fp16 runs only


def test_resumed_run_replaces_the_steps_it_logs_again(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(["checkpoint.every_steps=4", "checkpoint.every_epochs=null"])
    train(cfg, run_dir=run_dir, quiet=True)
    # As if killed after step 12 was logged but before its checkpoint was written.
    shutil.rmtree(run_dir / "checkpoints" / "12")
    summary = train(cfg, run_dir=run_dir, quiet=True, resume=True, log_fn=lambda _: None)
    assert summary["start_step"] == 8
    log_dir = run_dir / TENSORBOARD_DIR
    assert len(event_files(log_dir)) == 2
    # Both files hold step 12; TensorBoard shows it once, as metrics.jsonl does.
    raw = read_scalars(log_dir, purge=False)
    assert [s for s, _ in raw["train/loss"]] == [4, 8, 12, 12]
    scalars = read_scalars(log_dir)
    assert_same(scalars["train/loss"], jsonl(run_dir, "train", "loss"))
    assert_same(scalars["eval/loss"], jsonl(run_dir, "eval", "loss"))
    assert [s for s, _ in scalars["train/loss"]] == [4, 8, 12]
    assert [s for s, _ in scalars["eval/accuracy"]] == [6, 12]


def test_switch_off_writes_no_tensorboard_folder(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(["output.tensorboard=false", "train.steps=4"]), run_dir=run_dir, quiet=True)
    assert (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / TENSORBOARD_DIR).exists()
