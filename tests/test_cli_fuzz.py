"""The command line as a hostile user drives it: every command with generated flags and values.

Property: whatever the arguments, a command ends with exit 0 or a documented code, prints no
Python traceback, says something when it fails, ends within a time bound, and never changes a run
directory that already holds a run.

The default example count suits CI; ACCELCTL_FUZZ_EXAMPLES=N runs N examples per test (e.g.
2000) with random seeds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelctl.train import train
from tests.conftest import TINY, invoke

# Every exit code the README documents (0 success, 1 is a bug and is not among them).
DOCUMENTED = {0, 2, 3, 4, 5, 74, 75, 124, 130}
EXAMPLES = int(os.environ.get("ACCELCTL_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("CI") == "true" or "ACCELCTL_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Small and quick whatever the flags: few steps, no checkpoints unless a flag asks.
QUICK = TINY.replace("steps: 12", "steps: 4")

_ints = st.one_of(
    st.integers(-3, 70), st.sampled_from([0, -1, 2**31, 2**63, 10**30]), st.integers()
)
_words = st.one_of(
    st.sampled_from(["", "-", ".", "..", "/", "/dev/full", "/proc/self/status", "nope", "x" * 300]),
    st.text(min_size=0, max_size=20),
)


def _digest(folder: Path) -> str:
    """Every file's path and bytes, but plot.png: `accelctl plot RUN` draws into the run
    directory by design (documented), which changes nothing of the run."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.name != "plot.png"):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A config file, a finished run (which no command may change) and a scratch folder."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = root / "quick.yaml"
    cfg.write_text(QUICK)
    run = root / "done"
    train(
        __import__("accelctl.config", fromlist=["load"]).load(cfg),
        run_dir=run,
        quiet=True,
        log_fn=lambda m: None,
    )
    shutil.copytree(run, root / "pristine")
    return {"root": root, "cfg": cfg, "run": run, "digest": _digest(run)}


def _value(draw, kind: str, world) -> str:
    if kind == "int":
        return str(draw(_ints))
    if kind == "float":
        return draw(st.sampled_from(["0", "-1", "1e400", "nan", "0.5", "abc", "1e-9"]))
    if kind == "path":
        return draw(
            st.one_of(
                st.sampled_from(
                    [
                        str(world["run"]),
                        str(world["run"] / "checkpoints"),
                        str(world["cfg"]),
                        str(world["root"] / "new"),
                        str(world["run"] / "checkpoints" / "4"),
                    ]
                ),
                _words,
            )
        )
    if kind == "set":
        key = draw(st.sampled_from(
            ["train.steps", "train.batch_size", "optimizer.lr", "model.hidden", "data.num_train",
             "train.seed", "checkpoint.every_steps", "parallel.num_devices", "nope.x", ""]
        ))  # fmt: skip
        return f"{key}={draw(_words) if draw(st.booleans()) else draw(_ints)}"
    if kind == "precision":
        return draw(st.sampled_from(["fp32", "bf16", "fp16", "fp8", ""]))
    return draw(_words)


# Each command: its fixed leading arguments and the flags it takes (name, value kind or None).
COMMANDS = {
    "train": (
        lambda w: [str(w["cfg"])],
        [("--set", "set"), ("--run-dir", "path"), ("--json", "path"), ("--resume", None),
         ("--quiet", None), ("--cpu-devices", "int")],
    ),
    "eval": (
        lambda w: ["--checkpoint", str(w["run"])],
        [("--checkpoint", "path"), ("--set", "set"), ("--json", "path")],
    ),
    "bench": (
        lambda w: [str(w["cfg"]), "--steps", "2", "--warmup", "0"],
        [("--batch-size", "int"), ("--precision", "precision"), ("--steps", "int"),
         ("--warmup", "int"), ("--memory-limit", "float"), ("--find-max-batch", None),
         ("--baseline", "path"), ("--tolerance", "float"), ("--json", "path")],
    ),
    "plot": (lambda w: [str(w["run"])], [("-o", "path"), ("--json", "path")]),
    "env": (lambda w: [], [("--json", "path")]),
    "configs": (lambda w: [], [("--json", "path")]),
    "init": (lambda w: ["gpt_tiny", str(w["root"] / "init.yaml")], [("--force", None)]),
}  # fmt: skip


@st.composite
def command_lines(draw, world):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    lead, flags = COMMANDS[name]
    args = [name, *lead(world)]
    for flag, kind in draw(st.lists(st.sampled_from(flags), max_size=3)):
        args.append(flag)
        if kind is not None:
            args.append(_value(draw, kind, world))
    if name == "train" and "--run-dir" not in args:
        args += ["--run-dir", str(world["root"] / "runs" / f"r{draw(st.integers(0, 10**9))}")]
    if draw(st.booleans()):  # raw junk: an unknown flag or a stray argument
        args.append(draw(st.sampled_from(["--nope", "-z", "extra", "--", "--json"])))
    return args


@FUZZ
@given(data=st.data())
def test_every_command_ends_cleanly_whatever_its_arguments(world, data, monkeypatch):
    # Relative output paths (--json nope, -o x.png) land in the scratch folder, not the checkout.
    monkeypatch.chdir(world["root"])
    args = data.draw(command_lines(world))
    t0 = time.monotonic()
    result = invoke(*args)
    took = time.monotonic() - t0
    shown = f"accelctl {' '.join(args)!r}\n{result.output[-2000:]}"
    assert result.exit_code in DOCUMENTED, shown
    assert "Traceback" not in result.output, shown
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"escaped: {result.exception!r}\n{shown}")
    if result.exit_code != 0:
        assert result.output.strip(), shown  # a failure says something
    assert took < 120, shown
    changed = _digest(world["run"]) != world["digest"]
    if changed:  # put it back, so the next example (and the shrinking) starts from the same run
        shutil.rmtree(world["run"])
        shutil.copytree(world["root"] / "pristine", world["run"])
    assert not changed, f"the finished run was changed by {shown}"
    for extra in (world["root"] / "runs").glob("*"):
        shutil.rmtree(extra, ignore_errors=True)
