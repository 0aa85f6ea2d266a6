"""A plain (non-editable) install works as well as a checkout: build the wheel, install it into a
fresh virtual environment, and run `accelctl` from another folder, where no `configs/` exists.

The fresh environment gets the wheel alone (`--no-deps`); its dependencies (jax, flax, ...) come
from this environment's site-packages through a path entry, so the test needs no network. Only
accelctl itself is taken from the wheel: the test checks that the imported package lives in the
new environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _copy_source(dest: Path) -> Path:
    """The project's files as a clean checkout has them (no venv, runs or build output)."""
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "venv",
        "runs",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".*cache",
        ".whl",
    )
    shutil.copytree(ROOT, dest, symlinks=True, ignore=ignore)
    return dest


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with accelctl installed from its wheel; returns the venv's bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp / "src")
    dist = tmp / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ]
    )
    (wheel,) = dist.glob("accelctl-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bindir = env_dir / "bin"
    _run(
        [
            str(bindir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )
    site = Path(
        _run(
            [
                str(bindir / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ]
        ).stdout.strip()
    )
    # This environment's packages (not its .pth files: an editable accelctl there stays out).
    (site / "accelctl_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return bindir


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_the_wheel_ships_the_built_in_configs_and_trains_from_another_folder(installed, tmp_path):
    where = tmp_path / "elsewhere"
    where.mkdir()
    py = str(installed / "python")
    origin = _run([py, "-c", "import accelctl; print(accelctl.__file__)"], cwd=where, env=_env())
    assert str(installed.parent) in origin.stdout, "accelctl was not imported from the wheel"
    listed = _run([str(installed / "accelctl"), "configs"], cwd=where, env=_env())
    assert "digits_mlp" in listed.stdout and "gpt_small" in listed.stdout
    run = _run(
        [
            str(installed / "accelctl"),
            "train",
            "digits_mlp",
            "--run-dir",
            "run",
            "--quiet",
            "--set",
            "train.epochs=2",
            "--json",
            "-",
        ],
        cwd=where,
        env=_env(),
    )
    assert '"status": "completed"' in run.stdout
    assert (where / "run" / "summary.json").is_file()
    _run([str(installed / "accelctl"), "init", "gpt_tiny"], cwd=where, env=_env())
    assert (where / "gpt_tiny.yaml").read_text().startswith("# A tiny GPT")


def test_the_wheel_runs_the_built_in_bench_suite(installed, tmp_path):
    out = _run(
        [str(installed / "accelctl"), "bench", "--steps", "2", "--warmup", "0", "--json", "-"],
        cwd=tmp_path,
        env=_env(),
    )
    assert {"mnist_mlp", "mnist_cnn", "cifar10_resnet", "gpt_tiny"} <= {
        line.split('"')[3] for line in out.stdout.splitlines() if '"workload":' in line
    }
