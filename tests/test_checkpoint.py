"""Checkpoints in-process: cadence, retention, keep_best, resume, damaged and partial folders,
config changes, on_nan, `accelctl eval`'s evaluate_checkpoint and the preemption guard."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from accelctl import checkpoint, config
from accelctl.checkpoint import Checkpointer, IncompatibleCheckpoint
from accelctl.config import CheckpointConfig
from accelctl.data.batches import epoch_batch_table
from accelctl.errors import NonFiniteLoss, UserError
from accelctl.train import train
from accelctl.train.checkpoint_eval import evaluate_checkpoint
from accelctl.train.job import build_job
from accelctl.train.preempt import PreemptionGuard
from accelctl.train.resume import config_changes, truncate_metrics
from tests.conftest import TINY

# The reference run: 12 steps (8 per epoch), checkpoints at 4, 8 and 12, evaluations at 6 and 12.
REF = ["checkpoint.every_steps=4", "checkpoint.every_epochs=null"]
# keep_best runs: a checkpoint and an evaluation every 2 steps, the newest 2 kept.
BEST = ["checkpoint.every_steps=2", "checkpoint.every_epochs=null", "checkpoint.keep=2"]
BEST += ["train.eval_every=2"]
_LOGGED = ("event", "step", "loss", "accuracy")


def _cfg(overrides=()) -> config.Config:
    return config.load_text(TINY, "tiny.yaml", list(overrides))


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logged(run_dir: Path) -> list[tuple]:
    """(event, step, loss, accuracy) of every train/eval event, in order; timings left out."""
    return [
        tuple(e[k] for k in _LOGGED) for e in _events(run_dir) if e["event"] in ("train", "eval")
    ]


def _steps(run_dir: Path) -> list[int]:
    return checkpoint.complete_steps(run_dir / "checkpoints")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cut_after(run_dir: Path, step: int) -> None:
    """Leave the run as if killed right after checkpoint `step`: later checkpoints and the
    summary gone, metrics.jsonl still holding the events logged after it."""
    for s in _steps(run_dir):
        if s > step:
            shutil.rmtree(run_dir / "checkpoints" / str(s))
    (run_dir / "summary.json").unlink()


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run; tests copy its directory before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    summary = train(_cfg(REF), run_dir=run_dir, quiet=True, log_fn=lambda m: None)
    assert _steps(run_dir) == [4, 8, 12]
    return run_dir, summary


@pytest.fixture(scope="module")
def ref_abstract():
    """Restore target of the reference config's state."""
    return build_job(_cfg(REF), compile_train=False).state.abstract


@pytest.fixture(scope="module")
def best_run(tmp_path_factory) -> tuple[Path, dict]:
    """keep_best by eval_accuracy; its best evaluation is not among the newest 2 checkpoints."""
    run_dir = tmp_path_factory.mktemp("best") / "run"
    summary = train(
        _cfg([*BEST, "checkpoint.keep_best={metric: eval_accuracy}"]), run_dir=run_dir, quiet=True
    )
    return run_dir, summary


# ------------------------------------------------------------------------------- config_changes
def test_config_changes_splits_allowed_and_refused_fields(tiny_config):
    saved = tiny_config().to_dict()
    assert config_changes(saved, tiny_config().to_dict()) == ([], [])
    current = tiny_config(
        [
            "train.steps=null",
            "train.epochs=3",
            "train.log_every=2",
            "checkpoint.keep=5",
            "data.cache=host",
            "parallel.mesh.data=4",
            "model.hidden=[8]",
            "optimizer.name=sgd",
            "optimizer.lr=0.02",
            "train.seed=1",
            "train.batch_size=64",
        ]
    ).to_dict()
    allowed, refused = config_changes(saved, current)
    assert allowed == [
        "checkpoint.keep: 3 -> 5",
        'data.cache: "auto" -> "host"',
        "parallel.mesh.data: -1 -> 4",
        "train.epochs: null -> 3",
        "train.log_every: 4 -> 2",
        "train.steps: 12 -> null",
    ]
    assert refused == [
        "model.hidden: [16] -> [8]",
        "optimizer.lr: 0.01 -> 0.02",
        'optimizer.name: "adam" -> "sgd"',
        "train.batch_size: 32 -> 64",
        "train.seed: 0 -> 1",
    ]


def test_config_changes_reports_fields_present_on_one_side(tiny_config):
    saved = tiny_config().to_dict()
    current = tiny_config(["model={name: cnn, channels: [4], dense: [8]}"]).to_dict()
    allowed, refused = config_changes(saved, current)
    assert allowed == []
    assert refused == [
        "model.batch_norm: (not set) -> false",
        "model.channels: (not set) -> [4]",
        "model.dense: (not set) -> [8]",
        "model.hidden: [16] -> (not set)",
        "model.kernels: (not set) -> 3",
        'model.name: "mlp" -> "cnn"',
        'model.pool: (not set) -> "max"',
    ]
    # Symmetric: switching back lists the same fields the other way round.
    assert [line.split(":")[0] for line in config_changes(current, saved)[1]] == [
        line.split(":")[0] for line in refused
    ]


# ----------------------------------------------------------------------------- truncate_metrics
def test_truncate_metrics_drops_later_events_and_a_torn_line(tmp_path):
    lines = [
        '{"event": "train", "step": 4, "loss": 1.0}',
        '{"event": "note"}',
        '{"event": "eval", "step": 6, "loss": 0.9}',
        '{"event": "train", "step": 8, "loss": 0.8}',
        '{"event": "eval", "step": 12, "loss": 0.7}',
        '{"event": "train", "st',
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines))  # torn: no final newline either
    assert truncate_metrics(path, 6) == 3
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert truncate_metrics(path, 4) == 1
    assert path.read_text() == "\n".join(lines[:2]) + "\n"


def test_truncate_metrics_leaves_the_file_alone_when_nothing_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"event": "train", "step": 4}\n{"event": "note"}\n{"event": "eval", "step": 6}\n'
    path.write_text(text)
    before = os.stat(path)
    assert truncate_metrics(path, 6) == 0
    after = os.stat(path)
    assert path.read_text() == text
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0
    assert not (tmp_path / "missing.jsonl").exists()


# ------------------------------------------------------------------------------ find_checkpoint
def test_find_checkpoint_resolves_run_dir_checkpoints_folder_and_step_folder(ref, tmp_path):
    run_dir, _ = ref
    ckpts = run_dir / "checkpoints"
    assert checkpoint.find_checkpoint(run_dir) == (ckpts, None)
    assert checkpoint.find_checkpoint(ckpts) == (ckpts, None)
    assert checkpoint.find_checkpoint(ckpts / "8") == (ckpts, 8)
    with pytest.raises(UserError, match=r"does not exist; .* has steps 4, 8, 12$"):
        checkpoint.find_checkpoint(ckpts / "99")
    with pytest.raises(UserError, match="does not exist") as e:
        checkpoint.find_checkpoint(tmp_path / "nowhere")
    assert "has steps" not in str(e.value)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "5").mkdir()  # a number folder without state/ is no checkpoint
    for not_one in (tmp_path / "plain" / "5", tmp_path):
        with pytest.raises(UserError, match="not a run directory, a checkpoints folder"):
            checkpoint.find_checkpoint(not_one)
    # A folder with only a checkpoint that was being written is still a checkpoints folder.
    (tmp_path / "partial" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    assert checkpoint.find_checkpoint(tmp_path / "partial") == (tmp_path / "partial", None)


# ------------------------------------------------------------------------ cadence and retention
@pytest.mark.parametrize(
    ("section", "steps_per_epoch", "total", "due"),
    [
        ({"every_steps": 3, "every_epochs": None}, 8, 10, [3, 6, 9, 10]),
        ({"every_epochs": 2}, 4, 20, [8, 16, 20]),
        ({}, 5, 12, [5, 10, 12]),  # default: every epoch
        ({"every_steps": 5, "every_epochs": 1}, 4, 12, [4, 5, 8, 10, 12]),
        ({"every_steps": None, "every_epochs": None}, 4, 12, [12]),
    ],
)
def test_due_follows_the_cadence_and_always_the_last_step(
    tmp_path, section, steps_per_epoch, total, due
):
    cfg = CheckpointConfig.model_validate(section)
    ckpt = Checkpointer(
        tmp_path / "checkpoints", cfg, steps_per_epoch=steps_per_epoch, total_steps=total
    )
    try:
        assert [s for s in range(1, total + 1) if ckpt.due(s)] == due
    finally:
        ckpt.close()


def test_keep_retains_the_newest_checkpoints(tiny_config, tmp_path):
    cfg = tiny_config([*BEST[:3], "checkpoint.async=false"])
    summary = train(cfg, run_dir=tmp_path, quiet=True)
    assert _steps(tmp_path) == [10, 12]
    assert checkpoint.incomplete_checkpoints(tmp_path / "checkpoints") == []
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "12")
    assert summary["best_checkpoint"] is None
    meta = checkpoint.read_meta(tmp_path / "checkpoints")
    assert meta["step"] == 12 and meta["config"] == cfg.to_dict()
    assert meta["data_position"] == {"step": 12, "epoch": 1, "batch_in_epoch": 4, "seed": 0}
    assert meta["eval"] == summary["final_eval"]  # step 12 was evaluated
    assert checkpoint.read_meta(tmp_path / "checkpoints", 10)["eval"] is None  # step 10 was not


def _best_step(run_dir: Path, metric: str, best_is_max: bool) -> tuple[int, float]:
    """The best evaluated checkpoint step from metrics.jsonl, checking it is unambiguous."""
    key = metric.removeprefix("eval_")
    saved = set(range(2, 13, 2))
    evals = {e["step"]: e[key] for e in _events(run_dir) if e["event"] == "eval"}
    assert set(evals) == saved
    best = (max if best_is_max else min)(evals.values())
    steps = [s for s, v in evals.items() if v == best]
    assert len(steps) == 1, f"tied best {metric} at steps {steps}: pick another config"
    return steps[0], best


@pytest.mark.parametrize(
    ("spec", "metric", "best_is_max"),
    [
        ("{metric: eval_accuracy}", "eval_accuracy", True),
        ("{metric: eval_loss}", "eval_loss", False),
        ("{metric: eval_loss, mode: max}", "eval_loss", True),  # an early step wins
    ],
)
def test_keep_best_keeps_the_best_evaluated_step_too(
    request, tiny_config, tmp_path, spec, metric, best_is_max
):
    if metric == "eval_accuracy":
        run_dir, summary = request.getfixturevalue("best_run")
    else:
        run_dir = tmp_path / "run"
        summary = train(
            tiny_config([*BEST, f"checkpoint.keep_best={spec}"]), run_dir=run_dir, quiet=True
        )
    step, value = _best_step(run_dir, metric, best_is_max)
    assert _steps(run_dir) == sorted({10, 12, step})
    assert summary["best_checkpoint"] == {
        "step": step,
        "metric": metric,
        "value": value,
        "path": str(run_dir / "checkpoints" / str(step)),
    }
    if spec == "{metric: eval_accuracy}":
        assert step not in (10, 12)  # the case that needs keep_best at all


def test_keep_best_tie_goes_to_the_newest_checkpoint(tiny_config, tmp_path):
    # lr so small that the eval accuracy never changes: every evaluation ties.
    cfg = tiny_config([*BEST, "checkpoint.keep_best={metric: eval_accuracy}", "optimizer.lr=1e-7"])
    summary = train(cfg, run_dir=tmp_path, quiet=True)
    accuracies = {e["accuracy"] for e in _events(tmp_path) if e["event"] == "eval"}
    assert len(accuracies) == 1
    assert _steps(tmp_path) == [10, 12]
    assert summary["best_checkpoint"]["step"] == 12
    assert Path(summary["best_checkpoint"]["path"]).is_dir()


def test_keep_best_survives_a_resume(best_run, tmp_path):
    src, full = best_run
    best = full["best_checkpoint"]["step"]
    assert best == 6 and _steps(src) == [6, 10, 12]
    run_dir = _copy(src, tmp_path / "run")
    _cut_after(run_dir, best)
    summary = train(
        _cfg([*BEST, "checkpoint.keep_best={metric: eval_accuracy}"]),
        run_dir=run_dir,
        quiet=True,
        resume=True,
        log_fn=lambda m: None,
    )
    assert summary["params_sha256"] == full["params_sha256"]
    assert summary["best_checkpoint"]["step"] == best
    assert _steps(run_dir) == [6, 10, 12]  # as in the uninterrupted run


# ---------------------------------------------------------------------------------------- resume
def test_resume_after_a_kill_matches_the_uninterrupted_run(ref, tmp_path):
    src, full = ref
    run_dir = _copy(src, tmp_path / "run")
    _cut_after(run_dir, 4)
    # The killed run had logged past its last checkpoint, and died mid-line.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 1')
    log: list[str] = []
    summary = train(_cfg(REF), run_dir=run_dir, quiet=True, resume=True, log_fn=log.append)
    assert log == [f"resuming from {run_dir / 'checkpoints' / '4'} (step 4 of 12)"]
    assert summary["start_step"] == 4 and summary["steps"] == 12
    assert summary["params_sha256"] == full["params_sha256"]
    assert summary["final_eval"] == full["final_eval"]
    assert _logged(run_dir) == _logged(src)
    resumes = [e for e in _events(run_dir) if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 4 and resumes[0]["changes"] == []
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12
    assert _steps(run_dir) == [4, 8, 12]


def test_resume_of_a_complete_run_does_nothing(ref, tmp_path):
    src, full = ref
    run_dir = _copy(src, tmp_path / "run")
    metrics = (run_dir / "metrics.jsonl").read_text()
    log: list[str] = []
    summary = train(_cfg(REF), run_dir=run_dir, quiet=True, resume=True, log_fn=log.append)
    assert summary == json.loads((src / "summary.json").read_text())
    assert log[-1] == "the run is already complete; nothing to do"
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_resume_ignores_a_checkpoint_still_being_written(ref, tmp_path):
    src, _ = ref
    run_dir = _copy(src, tmp_path / "run")
    (run_dir / "summary.json").unlink()
    # A copy of a complete checkpoint under a temporary name: it must not be read at all.
    tmp = run_dir / "checkpoints" / "16.orbax-checkpoint-tmp-123"
    shutil.copytree(run_dir / "checkpoints" / "12", tmp)
    log: list[str] = []
    summary = train(
        _cfg([*REF, "train.steps=16"]), run_dir=run_dir, quiet=True, resume=True, log_fn=log.append
    )
    assert log[0] == (
        f"ignored {tmp}: a checkpoint that was still being written when its process stopped"
    )
    assert log[-1] == f"resuming from {run_dir / 'checkpoints' / '12'} (step 12 of 16)"
    assert summary["start_step"] == 12 and summary["steps"] == 16
    assert _steps(run_dir) == [8, 12, 16]
    assert not tmp.exists()  # the new manager cleans it up


def test_restore_reports_a_leftover_temporary_folder(ref, ref_abstract, tmp_path):
    ckpts = _copy(ref[0] / "checkpoints", tmp_path / "checkpoints")
    (ckpts / "13.orbax-checkpoint-tmp-123").mkdir()
    restored = checkpoint.restore(ckpts, ref_abstract)
    assert restored.step == 12 and int(restored.state.step) == 12
    assert restored.path == ckpts / "12"
    assert len(restored.notes) == 1 and "still being written" in restored.notes[0]
    assert "13.orbax-checkpoint-tmp-123" in restored.notes[0]


def _flip_data_files(step_dir: Path) -> int:
    n = 0
    for p in (step_dir / "state").rglob("*"):
        if p.is_file() and "/d/" in p.as_posix():
            p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes()))
            n += 1
    return n


def test_restore_falls_back_from_a_damaged_checkpoint(ref, ref_abstract, tmp_path):
    ckpts = _copy(ref[0] / "checkpoints", tmp_path / "checkpoints")
    assert _flip_data_files(ckpts / "12") > 0
    restored = checkpoint.restore(ckpts, ref_abstract)
    assert restored.step == 8 and int(restored.state.step) == 8
    assert restored.meta["step"] == 8
    assert len(restored.notes) == 1
    assert re.match(rf"skipped {re.escape(str(ckpts / '12'))}: unreadable \(", restored.notes[0])
    # Exactly that step, without a fallback.
    with pytest.raises(UserError, match="no readable checkpoint"):
        checkpoint.restore(ckpts, ref_abstract, step=12)
    with pytest.raises(UserError, match="no complete checkpoint for step 7; it has 4, 8, 12"):
        checkpoint.restore(ckpts, ref_abstract, step=7)


def test_restore_falls_back_from_a_garbage_manifest(ref, ref_abstract, tmp_path):
    ckpts = _copy(ref[0] / "checkpoints", tmp_path / "checkpoints")
    (ckpts / "12" / "state" / "manifest.ocdbt").write_bytes(b"garbage" * 20)
    restored = checkpoint.restore(ckpts, ref_abstract)
    assert restored.step == 8
    assert "skipped" in restored.notes[0] and "unreadable" in restored.notes[0]


def test_restore_fails_when_every_checkpoint_is_damaged(ref, ref_abstract, tmp_path):
    ckpts = _copy(ref[0] / "checkpoints", tmp_path / "checkpoints")
    for step in (4, 8, 12):
        _flip_data_files(ckpts / str(step))
    with pytest.raises(UserError, match="no readable checkpoint") as e:
        checkpoint.restore(ckpts, ref_abstract)
    assert all(f"skipped {ckpts / str(s)}: unreadable" in str(e.value) for s in (4, 8, 12))


def test_resume_refuses_a_different_model_or_optimizer(ref, tmp_path):
    run_dir = _copy(ref[0], tmp_path / "run")
    metrics = (run_dir / "metrics.jsonl").read_text()
    cfg = _cfg([*REF, "model.hidden=[8]", "optimizer.lr=0.02", "train.log_every=2"])
    with pytest.raises(IncompatibleCheckpoint) as e:
        train(cfg, run_dir=run_dir, quiet=True, resume=True, log_fn=lambda m: None)
    assert isinstance(e.value, UserError) and e.value.exit_code == 2
    message = str(e.value)
    assert "model.hidden: [16] -> [8]" in message and "optimizer.lr: 0.01 -> 0.02" in message
    assert "train.log_every" not in message  # allowed, so not listed as a reason
    assert str(run_dir / "checkpoints" / "12") in message  # refused at the newest, no fallback
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert _steps(run_dir) == [4, 8, 12]


def test_resume_allows_more_steps_and_reports_the_change(ref, tmp_path):
    run_dir = _copy(ref[0], tmp_path / "run")
    log: list[str] = []
    summary = train(
        _cfg([*REF, "train.steps=20", "train.log_every=2"]),
        run_dir=run_dir,
        quiet=True,
        resume=True,
        log_fn=log.append,
    )
    allowed = [m for m in log if "allowed" in m]
    assert allowed == [
        "config changes since the checkpoint (allowed): train.log_every: 4 -> 2; "
        "train.steps: 12 -> 20"
    ]
    assert summary["start_step"] == 12 and summary["steps"] == 20
    assert _steps(run_dir) == [12, 16, 20]
    train_steps = [e["step"] for e in _events(run_dir) if e["event"] == "train"]
    assert train_steps == [4, 8, 12, 14, 16, 18, 20]


def test_resume_refuses_fewer_steps_than_the_checkpoint(ref, tmp_path):
    run_dir = _copy(ref[0], tmp_path / "run")
    with pytest.raises(UserError, match=r"is at step 12, past the 8 steps .* raise train\.steps"):
        train(_cfg([*REF, "train.steps=8"]), run_dir=run_dir, quiet=True, resume=True)


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="resume: .* holds no run to continue"):
        train(_cfg(REF), run_dir=tmp_path / "new", quiet=True, resume=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "partial" / "checkpoints" / "4.orbax-checkpoint-tmp-9").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no complete checkpoint \(only ones that were still"):
        train(_cfg(REF), run_dir=tmp_path / "partial", quiet=True, resume=True)


def test_a_fresh_run_never_overwrites_a_run_with_checkpoints(ref, tmp_path):
    run_dir = _copy(ref[0], tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run .*checkpoints"):
        train(_cfg(REF), run_dir=run_dir, quiet=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    (tmp_path / "only" / "checkpoints" / "4").mkdir(parents=True)  # even one checkpoint folder
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints\)"):
        train(_cfg(REF), run_dir=tmp_path / "only", quiet=True)
    # An empty checkpoints folder (e.g. a mount point made for them) holds nothing to lose.
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert train(_cfg(REF), run_dir=tmp_path / "empty", quiet=True)["status"] == "completed"


# ---------------------------------------------------------------------------------------- on_nan
NAN_CONFIG = """
model: {{name: mlp, hidden: [16]}}
data: {{source: npz, path: {train}, eval_path: {eval}}}
optimizer: {{name: adam, lr: 0.01}}
train: {{batch_size: 32, steps: 8, log_every: 2, eval_every: 4}}
checkpoint: {{every_steps: 2, every_epochs: null}}
"""


def _row_of(example: int, epoch: int) -> int:
    """The batch (0-based, within the epoch) that holds `example` in the NaN tests' data order."""
    table = epoch_batch_table(128, 32, seed=0, epoch=epoch)
    return int(np.flatnonzero((table == example).any(axis=1))[0])


@pytest.fixture
def nan_data(tmp_path) -> tuple[str, list[int]]:
    """128 training examples (4 steps per epoch), one whose features are finite but so large
    (3e38, near float32's limit) that the forward pass overflows to a non-finite loss; a clean
    eval set. (NaN features themselves are rejected when the data is read.)

    Returns the config text and the (1-based) steps whose batch holds the bad example.
    """
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((8, 4))
    x = rng.standard_normal((128, 8)).astype(np.float32)
    ex = rng.standard_normal((64, 8)).astype(np.float32)
    # The NaN example is in the third batch of the first epoch: steps 1-2 are good.
    bad = int(epoch_batch_table(128, 32, seed=0, epoch=0)[2, 0])
    y = np.argmax(x @ teacher, axis=1)
    x[bad, :] = 3e38
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "eval.npz", x=ex, y=np.argmax(ex @ teacher, axis=1))
    bad_steps = [epoch * 4 + _row_of(bad, epoch) + 1 for epoch in range(2)]
    assert bad_steps[0] == 3
    text = NAN_CONFIG.format(train=tmp_path / "train.npz", eval=tmp_path / "eval.npz")
    return text, bad_steps


def test_on_nan_stop_names_the_step_and_the_last_good_checkpoint(tiny_config, tmp_path, nan_data):
    text, bad_steps = nan_data
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as e:
        train(tiny_config(["train.on_nan=stop"], text=text), run_dir=run_dir, quiet=True)
    assert e.value.exit_code == 3
    message = str(e.value)
    assert message.startswith(f"step {bad_steps[0]}: the loss or the gradients were not finite")
    assert f"{run_dir / 'checkpoints' / '2'} (step 2)" in message
    assert _steps(run_dir) == [2]  # nothing saved from the diverged state
    assert not (run_dir / "summary.json").exists()


def test_on_nan_skip_goes_on_and_counts_the_skipped_steps(tiny_config, tmp_path, nan_data):
    text, bad_steps = nan_data
    run_dir = tmp_path / "run"
    summary = train(tiny_config(["train.on_nan=skip"], text=text), run_dir=run_dir, quiet=True)
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["skipped_steps"] == len(bad_steps) == 2
    trains = [e for e in _events(run_dir) if e["event"] == "train"]
    assert [e["step"] for e in trains] == [2, 4, 6, 8]
    assert [e["skipped"] for e in trains] == [
        sum(step - 2 < s <= step for s in bad_steps) for step in (2, 4, 6, 8)
    ]
    assert all(math.isfinite(e["loss"]) for e in trains)
    assert math.isfinite(summary["final_eval"]["loss"])
    evaluated = evaluate_checkpoint(run_dir)
    assert evaluated["step"] == 8 and evaluated["eval"] == summary["final_eval"]


# --------------------------------------------------------------------------- evaluate_checkpoint
def test_evaluate_checkpoint_reproduces_the_final_eval(ref):
    run_dir, summary = ref
    result = evaluate_checkpoint(run_dir)
    assert result["checkpoint"] == str(run_dir / "checkpoints" / "12") and result["step"] == 12
    assert result["eval"] == summary["final_eval"]
    assert result["eval"]["count"] == 100 and result["devices"] == 8 and result["notes"] == []


def test_evaluate_checkpoint_refuses_a_config_with_another_model(ref):
    run_dir, _ = ref
    with pytest.raises(IncompatibleCheckpoint, match=r"different model .*model\.hidden: \[16\]"):
        evaluate_checkpoint(run_dir / "checkpoints" / "8", _cfg([*REF, "model.hidden=[8]"]))


# ------------------------------------------------------------------------------ PreemptionGuard
def test_preemption_guard_sets_a_flag_and_aborts_on_a_second_sigint():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    aborts: list[str] = []
    with PreemptionGuard(abort_fn=lambda: aborts.append("abort")) as guard:
        assert guard.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested == "SIGTERM" and aborts == []
        os.kill(os.getpid(), signal.SIGTERM)  # another SIGTERM: still only the flag
        assert aborts == []
        os.kill(os.getpid(), signal.SIGINT)
        assert aborts == ["abort"] and guard.requested == "SIGTERM"
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


def test_preemption_guard_first_sigint_only_sets_the_flag():
    before = signal.getsignal(signal.SIGINT)
    aborts: list[str] = []
    with PreemptionGuard(abort_fn=lambda: aborts.append("abort")) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested == "SIGINT" and aborts == []
    assert signal.getsignal(signal.SIGINT) is before


def test_preemption_guard_is_inert_outside_the_main_thread():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen: dict = {}

    def enter() -> None:
        with PreemptionGuard(abort_fn=lambda: None) as guard:
            seen["handlers"] = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            seen["requested"] = guard.requested

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"handlers": before, "requested": None}


def test_resume_after_the_last_checkpoint_but_before_the_summary(ref, tmp_path):
    src, full = ref
    run_dir = _copy(src, tmp_path / "run")
    (run_dir / "summary.json").unlink()  # killed between the final checkpoint and the summary
    summary = train(_cfg(REF), run_dir=run_dir, quiet=True, resume=True, log_fn=lambda m: None)
    assert summary["start_step"] == summary["steps"] == 12
    assert summary["final_eval"] == full["final_eval"]
    assert summary["params_sha256"] == full["params_sha256"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
