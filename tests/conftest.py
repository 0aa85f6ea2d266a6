"""Test setup: 8 fake CPU devices, forced before jax is imported anywhere."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Commands enable JAX's persistent compilation cache; keep the tests' entries out of ~/.cache.
os.environ.setdefault(
    "ACCELCTL_COMPILE_CACHE",
    os.path.join(__import__("tempfile").mkdtemp(prefix="accelctl-test-cache-"), "jax"),
)

from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from accelctl import config  # noqa: E402
from accelctl.cli import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Source of `peak_rss_bytes()` for the `python -c` probes that measure a command's memory: the
# peak resident set of the process's own memory (VmHWM). Not ru_maxrss: Linux carries a
# vfork()ing parent's peak into the child's ru_maxrss across exec, so a probe started from a
# large pytest process would report pytest's peak instead of its own.
PEAK_RSS_SOURCE = """
def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
"""

TINY = """
model: {name: mlp, hidden: [16]}
data: {source: synthetic, shape: [4, 4, 1], num_train: 256, num_eval: 100, num_classes: 4}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 32, steps: 12, log_every: 4, eval_every: 6}
"""


@pytest.fixture
def tiny_config():
    """Return a factory: tiny_config(["train.steps=5", ...]) -> validated Config."""

    def make(overrides: Sequence[str] = (), text: str = TINY) -> config.Config:
        return config.load_text(text, "tiny.yaml", overrides)

    return make


# --------------------------------------------------------------------------------- CLI helpers
runner = CliRunner()


def invoke(*args: str) -> Any:
    """Run `accelctl ARGS...` in this process (Typer's CliRunner); returns its Result."""
    return runner.invoke(app, list(args))


def assert_user_error(result: Any, *needles: str, code: int = 2) -> None:
    """A clean input error: exit code 2 (or `code`), no traceback, every needle in the output."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture
def tiny_file(tmp_path):
    """The TINY config written to a file."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path
