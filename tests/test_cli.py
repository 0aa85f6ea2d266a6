"""The `accelctl` command line: end-to-end runs and bad input (exit 2, no traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import TINY, assert_user_error, invoke

ROOT = Path(__file__).resolve().parents[1]


def test_train_synthetic_end_to_end(tiny_file, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(
        "train",
        str(tiny_file),
        "--run-dir",
        str(run_dir),
        "--quiet",
        "--json",
        str(tmp_path / "s.json"),
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in run_dir.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
        "tensorboard",
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "s.json").read_text())
    for key in ("steps", "train_samples_per_s", "devices", "wall_time_s", "input_wait_fraction"):
        assert key in summary
    assert summary["steps"] == 12 and summary["devices"] == 8
    assert set(summary["final_eval"]) >= {"accuracy", "loss"}
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [4, 8, 12]
    assert [e["step"] for e in events if e["event"] == "eval"] == [6, 12]
    resolved = (run_dir / "config.yaml").read_text()
    assert "source: synthetic" in resolved and "batch_size: 32" in resolved


def test_train_digits_with_overrides_and_json_stdout(tmp_path):
    result = invoke(
        "train",
        str(ROOT / "configs" / "digits_mlp.yaml"),
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        "train.epochs=2",
        "--set",
        "train.log_every=10",
        "--json",
        "-",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and 0.0 <= summary["final_eval"]["accuracy"] <= 1.0
    assert "epochs: 2" in (tmp_path / "r" / "config.yaml").read_text()


def test_existing_run_dir_is_not_overwritten(tiny_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("precious\n")
    assert_user_error(invoke("train", str(tiny_file), "--run-dir", str(run_dir)), "already holds")
    assert (run_dir / "metrics.jsonl").read_text() == "precious\n"


def test_missing_config_file(tmp_path):
    assert_user_error(invoke("train", str(tmp_path / "nope.yaml")), "config file not found")


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: mlp\n  hidden: [1, 2\n")
    assert_user_error(invoke("train", str(path)), "bad.yaml:", "YAML error")


def test_unknown_field_with_suggestion(tiny_file):
    assert_user_error(
        invoke("train", str(tiny_file), "--set", "optimizer.lrate=1"),
        "optimizer.lrate",
        "Did you mean 'lr'",
    )


def test_invalid_field_value_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: many\n")
    assert_user_error(invoke("train", str(path)), "bad.yaml:2:15", "train.batch_size")


def test_batch_not_divisible_by_devices(tiny_file, tmp_path):
    result = invoke(
        "train", str(tiny_file), "--set", "train.batch_size=12", "--run-dir", str(tmp_path / "r")
    )
    assert_user_error(result, "train.batch_size", "8 devices", "--set train.batch_size=12")
    assert not (tmp_path / "r").exists()  # nothing written for a bad config


def test_batch_size_error_points_at_the_file_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(TINY.replace("batch_size: 32", "batch_size: 20"))
    assert_user_error(invoke("train", str(path)), "c.yaml:5:", "train.batch_size", "multiple of 8")


def test_bad_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip file")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{source: npz, path: {tmp_path / 'bad.npz'}}}\n")
    assert_user_error(invoke("train", str(cfg)), "data.path", "not a readable .npz")
    np.savez(tmp_path / "keys.npz", images=np.zeros((10, 4), np.uint8), y=np.zeros(10, np.int32))
    cfg.write_text(f"data: {{source: npz, path: {tmp_path / 'keys.npz'}}}\n")
    assert_user_error(invoke("train", str(cfg)), "no array 'x'", "images")


def test_npz_trains(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", x=rng.integers(0, 255, (200, 6, 6), np.uint8), y=rng.integers(0, 3, 200)
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{name: cnn, channels: [4], dense: [8]}}\n"
        f"data: {{source: npz, path: {tmp_path / 'd.npz'}}}\n"
        "train: {batch_size: 16, steps: 4, log_every: 2}\n"
    )
    result = invoke("train", str(cfg), "--run-dir", str(tmp_path / "r"), "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["final_eval"]["count"] == 40


def test_debug_shows_traceback(tmp_path):
    result = invoke("train", str(tmp_path / "nope.yaml"), "--debug")
    assert result.exit_code != 0 and result.exception is not None


def test_plain_progress_lines_when_not_a_tty(tiny_file, tmp_path):
    result = invoke("train", str(tiny_file), "--run-dir", str(tmp_path / "r"))
    assert result.exit_code == 0
    assert "train step 12/12" in result.output and "\x1b[" not in result.stderr


def run_cli(*args: str, **kw):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=kw.get("cwd", ROOT),
        timeout=300,
    )


def test_help_does_not_import_jax():
    code = "import sys; from accelctl.cli import app; assert 'jax' not in sys.modules, 'jax'"
    assert run_cli("-c", code).returncode == 0
    result = run_cli("-m", "accelctl", "--help")
    assert result.returncode == 0 and "train" in result.stdout


def test_python_m_accelctl_train_subprocess(tiny_file, tmp_path):
    # --cpu-devices overrides the 8 host devices XLA_FLAGS asks for.
    args = ("-m", "accelctl", "train", str(tiny_file), "--run-dir", str(tmp_path / "r"))
    result = run_cli(*args, "--cpu-devices", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["devices"] == 2
    bad = run_cli("-m", "accelctl", "train", str(tiny_file), "--set", "train.batch_size=12")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "batch_size" in bad.stderr


def test_eval_command_reproduces_the_final_eval(tiny_file, tmp_path):
    run_dir = tmp_path / "run"
    assert invoke("train", str(tiny_file), "--run-dir", str(run_dir), "--quiet").exit_code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    result = invoke("eval", "--checkpoint", str(run_dir), "--json", "-")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["step"] == summary["steps"] == 12
    assert out["eval"] == summary["final_eval"]
    # With the config named explicitly and a step folder, the same numbers.
    step_dir = run_dir / "checkpoints" / "12"
    result = invoke("eval", "--checkpoint", str(step_dir), str(tiny_file), "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eval"] == summary["final_eval"]
    table = invoke("eval", "--checkpoint", str(run_dir))
    assert table.exit_code == 0 and "eval accuracy" in table.output


def test_eval_and_resume_input_errors(tiny_file, tmp_path):
    assert_user_error(invoke("eval", "--checkpoint", str(tmp_path / "nope")), "does not exist")
    assert_user_error(invoke("eval", "--checkpoint", str(tmp_path)), "not a run directory")
    assert_user_error(invoke("train", str(tiny_file), "--resume"), "--resume needs --run-dir")
    empty = tmp_path / "empty"
    assert_user_error(
        invoke("train", str(tiny_file), "--run-dir", str(empty), "--resume"),
        "holds no run to continue",
    )
    run_dir = tmp_path / "run"
    assert invoke("train", str(tiny_file), "--run-dir", str(run_dir), "-q").exit_code == 0
    before = (run_dir / "metrics.jsonl").read_text()
    result = invoke(
        "train", str(tiny_file), "--run-dir", str(run_dir), "--resume", "--set", "model.hidden=[8]"
    )
    assert_user_error(result, "model.hidden: [16] -> [8]", "config.yaml")
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing written was lost
    # A model the checkpoint does not hold cannot be evaluated either.
    result = invoke(
        "eval", "--checkpoint", str(run_dir), str(tiny_file), "--set", "model.hidden=[8]"
    )
    assert_user_error(result, "model.hidden")


def test_resume_of_a_finished_run_is_a_no_op(tiny_file, tmp_path):
    run_dir = tmp_path / "run"
    assert invoke("train", str(tiny_file), "--run-dir", str(run_dir), "-q").exit_code == 0
    summary = (run_dir / "summary.json").read_text()
    result = invoke("train", str(tiny_file), "--run-dir", str(run_dir), "--resume", "-q")
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output
    assert (run_dir / "summary.json").read_text() == summary


def test_every_help_names_its_values_plainly():
    """Flags show no `<bool>`, values no raw Python types (`<list[str]>`, `<int range>`)."""
    import re

    from accelctl.cli import app

    commands = [c.name for c in app.registered_commands] + ["data ls", "data prepare"]
    for command in commands:
        result = invoke(*command.split(), "--help")
        assert result.exit_code == 0, (command, result.output)
        options = result.output.split("Options:")[-1]
        bad = re.findall(r"^\s+-[^\n]*?<(?:bool|str|int|float|list|path)[^>]*>", options, re.M)
        assert not bad, (command, bad)
