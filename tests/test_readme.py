"""Every command the README and the built-in configs' comments show runs as written.

The README's ```bash blocks are run in order, in a scratch folder that holds the checkout's
`configs/`, `examples/` and `README.md` (so relative paths resolve as in the checkout), with the
`accelctl` of this environment on PATH and the CPU backend. A block preceded by
`<!-- not run by the README test: REASON -->` (the install itself) is skipped, and the test
fails if a block is skipped without a reason. Commands in config comments run the same way;
`accelctl data prepare` needs the internet and TensorFlow, which this machine lacks, so for it
the test checks that it fails with exit 2 and says why, fast.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _bash_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(the two lines before the block, the block's lines) of every ```bash block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            body = []
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                body.append(lines[j])
                j += 1
            blocks.append(("\n".join(lines[max(i - 2, 0) : i]), body))
            i = j
        i += 1
    return blocks


def readme_commands() -> list[str]:
    commands = []
    for before, body in _bash_blocks((ROOT / "README.md").read_text()):
        if "<!-- test-command -->" in before:
            continue  # the test command: CI runs it (it runs this test)
        if "<!-- not run by the README test" in before:
            assert re.search(r"not run by the README test: \S", before), "give the reason"
            continue
        commands += [line for line in body if line.strip()]
    return commands


def readme_chains() -> list[list[str]]:
    """The README's commands in groups that share nothing on disk, each in README order: a
    group is the commands of one ```bash block, joined with every other block that uses one of
    its `runs/NAME` folders (the resume continues the first block's run). The groups run as
    separate tests, so pytest-xdist spreads them over the workers."""
    blocks = []
    for before, body in _bash_blocks((ROOT / "README.md").read_text()):
        if "<!-- test-command -->" in before or "<!-- not run by the README test" in before:
            continue
        lines = [line for line in body if line.strip()]
        if lines:
            blocks.append((set(re.findall(r"runs/[\w.-]+", " ".join(lines))), lines))
    chains: list[tuple[set[str], list[str]]] = []
    for runs, lines in blocks:
        joined = [c for c in chains if c[0] & runs]
        for c in joined:
            chains.remove(c)
        merged = (runs.union(*(c[0] for c in joined)), [x for c in joined for x in c[1]] + lines)
        chains.append(merged)
    return [lines for _, lines in chains]


def config_comment_commands() -> list[str]:
    out = []
    for path in sorted((ROOT / "accelctl" / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            comment = line.partition("#")[2]
            m = re.search(r"(accelctl \S.*?)(?:\s*\(|$)", comment)
            if m and line.lstrip().startswith("#"):
                out.append(m.group(1).strip().rstrip(".`"))
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(ROOT / "accelctl" / "configs")
    shutil.copytree(ROOT / "examples", root / "examples")
    shutil.copy(ROOT / "README.md", root / "README.md")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "COLUMNS": "100"})
    return root, env


def _run(command: str, scratch: tuple[Path, dict[str, str]]) -> subprocess.CompletedProcess:
    root, env = scratch
    return subprocess.run(
        ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_readme_shows_commands():
    commands = readme_commands()
    assert len(commands) >= 8 and all(c.startswith(("accelctl ", "python ")) for c in commands), (
        commands
    )


def test_the_chains_hold_every_command_in_order():
    chains = readme_chains()
    assert sorted(c for chain in chains for c in chain) == sorted(readme_commands())
    position = {c: i for i, c in enumerate(readme_commands())}
    assert all(
        [position[c] for c in chain] == sorted(position[c] for c in chain) for chain in chains
    )
    resume = next(chain for chain in chains if any("--resume" in c for c in chain))
    assert resume[0].startswith("accelctl train digits_mlp --run-dir runs/digits ")


@pytest.mark.parametrize(
    "chain", readme_chains(), ids=lambda chain: re.sub(r"\W+", "-", chain[0])[:40].strip("-")
)
def test_every_readme_command_runs_as_written(chain, scratch):
    for command in chain:
        out = _run(command, scratch)
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr, command


def test_every_command_in_the_config_comments_runs_as_written(scratch):
    commands = config_comment_commands()
    assert commands, "the configs' comments show no command"
    for command in commands:
        out = _run(command, scratch)
        if command.startswith("accelctl data prepare"):
            # Offline and without TensorFlow here: it must say so at once, not fail obscurely.
            assert out.returncode == 2, f"{command}\n{out.stderr[-2000:]}"
            assert "TensorFlow" in out.stderr or "reaches none" in out.stderr, out.stderr
            continue
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
