"""Out of memory, host or device (issue 16, class 7).

What the sizes say cannot fit is refused before anything is allocated (a located config error,
or exit 5 with the bytes needed and available and the ways out); what still runs out at run
time (XLA's RESOURCE_EXHAUSTED, numpy's MemoryError) stops with one message, exit 5, no
traceback, and the run directory keeps what was written.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from accelctl import checkpoint, config, data, devices, memory, plan
from accelctl.data import sources, tokens
from accelctl.errors import FieldError, OutOfMemory
from accelctl.train import fit
from accelctl.train import job as job_mod
from tests.conftest import PEAK_RSS_SOURCE, ROOT, TINY, assert_user_error, invoke

# XLA's own words (GPU BFC allocator; the buffer report that follows is cut short here).
XLA_OOM = (
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes.\n"
    "BufferAssignment OOM Debugging.\n"
    "BufferAssignment stats:\n"
    "             parameter allocation:    1.53MiB\n"
    "              constant allocation:         0B\n"
    "        maybe_live_out allocation:   32.00GiB\n"
    "     preallocated temp allocation:         0B\n"
    "                 total allocation:   32.00GiB\n"
)


# ------------------------------------------------------------------------ before allocating: host
def test_a_hidden_layer_wider_than_the_schema_allows_is_a_config_error(tmp_path):
    # 10^8 units is past the 2^20 a width may have: refused when the config is read.
    result = invoke(
        "train", "digits_mlp", "--set", "model.hidden=[100000000]", "--run-dir", str(tmp_path)
    )
    assert_user_error(result, "model.hidden[0]", "1048576")


# Runs the CLI in this process and reports its peak resident memory.
RSS_PROBE = PEAK_RSS_SOURCE + textwrap.dedent(
    """
    import sys
    from accelctl.cli import main
    sys.argv = ["accelctl", *sys.argv[1:]]
    try:
        main()
    finally:
        print(f"maxrss_kb={peak_rss_bytes() // 1024}", file=sys.stderr)
    """
)


def test_a_model_too_large_for_any_host_stops_before_its_state_exists(tmp_path):
    """Two hidden layers of 2^20 units: 2^40 parameters, 12 TiB with Adam on each of the 8 CPU
    devices (dp keeps a copy per device). Refused from the abstract state: no GBs allocated,
    no OOM killer, nothing written."""
    run_dir = tmp_path / "run"
    h = 1 << 20
    num_params = (64 * h + h) + (h * h + h) + (h * 10 + 10)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, "train", "digits_mlp", "--quiet",
         "--set", f"model.hidden=[{h},{h}]", "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 5, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err and err.count("stopped:") == 1, err
    assert f"{num_params:,} parameters" in err
    assert "per device" in err and "bytes" in err and "host memory available now" in err
    assert "parallel.strategy: fsdp shards" in err and "(still too much)" in err
    assert "nothing was allocated" in err
    assert elapsed < 30, elapsed
    maxrss_mb = int(re.search(r"maxrss_kb=(\d+)", err).group(1)) / 1024
    assert maxrss_mb < 1500, maxrss_mb
    assert not run_dir.exists()


def test_a_synthetic_set_of_a_billion_rows_is_refused_at_num_train(tmp_path, tiny_file):
    # 10^9 images of 64x64x3 bytes: 12 TB, and 8x that while labelling them; no host has it.
    t0 = time.monotonic()
    result = invoke(
        "train", str(tiny_file), "--run-dir", str(tmp_path),
        "--set", "data.num_train=1000000000", "--set", "data.shape=[64,64,3]",
    )  # fmt: skip
    assert_user_error(result, "data.num_train", "of host memory", "nothing was allocated")
    assert "Lower data.num_train" in result.output
    assert time.monotonic() - t0 < 30


SYNTHETIC_TOKENS = """
model: {name: transformer, num_layers: 1, num_heads: 1, embed_dim: 8, max_len: 8}
data: {source: tokens, kind: synthetic, seq_len: 8, vocab_size: 64, num_train: 40960}
train: {batch_size: 32, steps: 2}
"""


@pytest.mark.parametrize(
    "text, overrides, field",
    [(TINY, ["data.num_train=20000"], "num_train"), (TINY, ["data.num_eval=30000"], "num_eval"),
     (SYNTHETIC_TOKENS, [], "num_train")],
    ids=["images", "images-eval", "tokens"],
)  # fmt: skip
def test_generated_data_is_sized_before_anything_is_generated(monkeypatch, text, overrides, field):
    """With 1 MiB of host memory left, a few MB of synthetic data are refused at the field that
    sets the size, and no random number is drawn (the check comes first)."""
    cfg = config.load_text(text, "tiny.yaml", overrides)
    monkeypatch.setattr(memory.host, "host_available_bytes", lambda: 1 << 20)

    def drawn(*args, **kwargs):
        raise AssertionError("data was generated before the size check")

    monkeypatch.setattr(np.random, "default_rng", drawn)
    with pytest.raises(FieldError) as e:
        data.build(cfg.data)
    assert e.value.path == ("data", field)
    assert "1.0 MiB (1,048,576 bytes) available now" in e.value.message


def test_a_text_file_is_sized_before_it_is_read(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"abcdefgh" * 32768)  # 256 KiB: 1.25 MiB with its int32 token ids
    byte_level = SYNTHETIC_TOKENS.replace("vocab_size: 64, num_train: 40960", "num_train: null")
    cfg = config.load_text(byte_level, "tiny.yaml", ["data.kind=text", f"data.path={text}"])
    monkeypatch.setattr(memory.host, "host_available_bytes", lambda: 1 << 20)
    with pytest.raises(FieldError) as e:
        data.build(cfg.data)
    assert e.value.path == ("data", "path") and "data.kind: bin" in e.value.message


@pytest.mark.parametrize("kind", ["images", "tokens"])
def test_the_size_estimates_match_what_generating_takes(kind):
    """The estimate is the peak host memory of generating the set (numpy's allocations,
    traced) within 10 %: refusals are honest, and nothing that fits is refused."""
    import tracemalloc

    if kind == "images":
        cfg = config.load_text(TINY, "t.yaml", ["data.num_train=5000", "data.shape=[16,16,3]"])
        d = cfg.data
        need = sources.synthetic_bytes(d.num_train + d.num_eval, tuple(d.shape), d.dtype, 4)
    else:
        overrides = ["data.num_train=20000", "data.seq_len=64", "data.vocab_size=50000"]
        cfg = config.load_text(SYNTHETIC_TOKENS, "t.yaml", [*overrides, "model.max_len=64"])
        d = cfg.data
        need = tokens.synthetic_token_bytes(20000 + tokens.SYNTHETIC_EVAL, 64, 50000)
    tracemalloc.start()
    data.build(d)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert 0.9 * peak <= need <= 1.1 * peak, (need, peak)


def test_an_enormous_eval_batch_is_refused_before_evaluation(tmp_path, tiny_file):
    # 2^30 images of 64x64x3 bytes in one batch: 13 TB on the host alone.
    result = invoke(
        "train", str(tiny_file), "--set", "train.eval_batch_size=1073741824",
        "--set", "data.shape=[64,64,3]", "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert_user_error(
        result,
        "train.eval_batch_size",
        "of host memory",
        "an eval batch of 104 holds all 100 eval examples",
    )
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ before running: the devices
# Logits of 4096 sequences x 8 positions x 2^20 tokens: 16 GiB per device of 8, and as much
# again for each copy the loss and its gradient keep; the state itself (~100 MB per device)
# fits the 1 GiB limit below.
GPT = """
model: {name: transformer, num_layers: 1, num_heads: 1, embed_dim: 8, max_len: 8, remat: full}
data: {source: tokens, kind: synthetic, seq_len: 8, vocab_size: 1048576, num_train: 4096,
       num_eval: 64}
optimizer: {name: adam, lr: 0.001}
train: {batch_size: 4096, steps: 2, eval_batch_size: 64}
"""
LIMIT = 1 << 30


def test_batch_times_vocab_too_large_for_the_device_stops_before_the_first_step(
    tmp_path, monkeypatch
):
    """A GPU-like device limit (patched in; the CPU reports none): the compiled step's memory
    analysis says it cannot fit, the error names the bytes, and the change it proposes is one
    `accelctl plan` confirms fits."""
    path = tmp_path / "gpt.yaml"
    path.write_text(GPT)
    monkeypatch.setattr(devices, "memory_limit", lambda device: LIMIT)
    run_dir = tmp_path / "run"
    result = invoke("train", str(path), "--run-dir", str(run_dir), "--quiet")
    assert_user_error(
        result, "the train step needs", f"({LIMIT:,} bytes)", "nothing was run", code=5
    )
    assert result.output.count("stopped:") == 1
    change = re.search(r"with optimizer\.accumulate_steps: (\d+) the step needs", result.output)
    assert change, result.output
    k = int(change.group(1))
    needed = int(re.search(r"the train step needs [\d.]+ GiB \(([\d,]+) bytes\)", result.output)
                 .group(1).replace(",", ""))  # fmt: skip
    assert needed > LIMIT
    planned = plan.plan_config(
        config.load_text(GPT, str(path), [f"optimizer.accumulate_steps={k}"]), memory_limit=LIMIT
    )
    assert planned["fits"] is True and planned["memory"]["need_bytes"] <= LIMIT
    assert not run_dir.exists()

    # With that change the train step fits; evaluating a batch of 4096 does not (checked from
    # the compiled eval step, still before the first step).
    result = invoke(
        "train", str(path), "--run-dir", str(run_dir), "--quiet",
        "--set", f"optimizer.accumulate_steps={k}", "--set", "train.eval_batch_size=null",
    )  # fmt: skip
    assert_user_error(
        result, "evaluation needs", "an eval batch of 4,096", "Lower train.eval_batch_size", code=5
    )
    assert not run_dir.exists()


# ----------------------------------------------------------------------------------- run time
class _FailsAt:
    """A compiled step that raises XLA's out-of-memory error on its `at`-th call."""

    def __init__(self, compiled, at: int, error: BaseException) -> None:
        self.compiled, self.at, self.error, self.calls = compiled, at, error, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.compiled(*args)

    def __getattr__(self, name):
        return getattr(self.compiled, name)


def _fail_step(monkeypatch, which: str, at: int, error: BaseException) -> None:
    real = job_mod.compile_steps

    def compile_steps(*args, **kwargs):
        steps = real(*args, **kwargs)
        return dataclasses.replace(steps, **{which: _FailsAt(getattr(steps, which), at, error)})

    monkeypatch.setattr(job_mod, "compile_steps", compile_steps)


def test_resource_exhausted_mid_run_stops_with_exit_5_and_keeps_the_run(
    tmp_path, tiny_file, monkeypatch
):
    run_dir = tmp_path / "run"
    _fail_step(monkeypatch, "train", 7, jax.errors.JaxRuntimeError(XLA_OOM))
    result = invoke(
        "train", str(tiny_file), "--run-dir", str(run_dir), "--quiet",
        "--set", "checkpoint.every_steps=4", "--set", "checkpoint.every_epochs=null",
    )  # fmt: skip
    assert_user_error(
        result,
        "a device ran out of memory during training",
        "XLA could not allocate 32.0 GiB (34,359,738,368 bytes)",
        "available now" if jax.default_backend() == "cpu" else "offers",
        "optimizer.accumulate_steps",
        "parallel.strategy: fsdp",
        f"The last complete checkpoint is {run_dir / 'checkpoints' / '4'} (step 4)",
        "--resume",
        code=5,
    )
    assert result.output.count("stopped:") == 1
    assert "BufferAssignment" not in result.output  # XLA's report is left out
    # Everything written before it is kept: the checkpoint of step 4 and its metrics.
    assert checkpoint.complete_steps(run_dir / "checkpoints") == [4]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [4]
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").exists()

    # Evaluating that checkpoint runs out too: the eval command says so the same way.
    monkeypatch.undo()
    _fail_step(monkeypatch, "eval", 1, jax.errors.JaxRuntimeError(XLA_OOM))
    result = invoke("eval", "--checkpoint", str(run_dir))
    assert_user_error(
        result, "ran out of memory during evaluation", "a smaller train.eval_batch_size", code=5
    )


def test_fit_reports_running_out_of_memory_as_out_of_memory(monkeypatch):
    _fail_step(monkeypatch, "train", 2, jax.errors.JaxRuntimeError(XLA_OOM))
    cfg = config.load_text(TINY, "tiny.yaml", ["train.steps=4"])
    with pytest.raises(OutOfMemory) as e:
        fit(job_mod.build_job(cfg))
    assert e.value.exit_code == 5 and "34,359,738,368 bytes" in str(e.value)
    assert isinstance(e.value.__cause__, jax.errors.JaxRuntimeError)


def _no_memory(*args, **kwargs):
    np.empty(1 << 62, np.uint8)  # 4 EiB: numpy's real _ArrayMemoryError, nothing allocated


@pytest.mark.parametrize("where", ["load", "batch"])
def test_memory_error_in_the_data_stops_with_exit_5(tmp_path, tiny_file, monkeypatch, where):
    if where == "load":
        monkeypatch.setitem(sources.SOURCES, "synthetic", _no_memory)
    else:  # in the prefetch thread, re-raised in the loop
        real, calls = sources.Split.take, [0]

        def take(self, idx):
            calls[0] += 1
            return _no_memory() if calls[0] == 3 else real(self, idx)

        monkeypatch.setattr(sources.Split, "take", take)
    result = invoke(
        "train", str(tiny_file), "--run-dir", str(tmp_path / "run"), "--quiet",
        "--set", "data.cache=host",
    )  # fmt: skip
    assert_user_error(
        result,
        "the host ran out of memory",
        "numpy could not allocate 4.0 EiB (4,611,686,018,427,387,904 bytes)",
        "available now",
        "data.prefetch",
        code=5,
    )
    assert result.output.count("stopped:") == 1
    if where == "load":  # before anything was written
        assert "while preparing the job" in result.output and "Nothing was written" in result.output
        assert not (tmp_path / "run" / "config.yaml").exists()
    else:
        assert "during training" in result.output and "No checkpoint was written" in result.output


# ------------------------------------------------------------------------- reading XLA's words
@pytest.mark.parametrize(
    "message, said",
    [
        (XLA_OOM, (34359738368, None, None)),
        ("RESOURCE_EXHAUSTED: Out of memory allocating 8589934592 bytes.",
         (8589934592, None, None)),
        ("RESOURCE_EXHAUSTED: Failed to allocate request for 32.00MiB (33554432B) on device "
         "ordinal 0", (33554432, None, None)),
        ("RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 8.00M. "
         "That was not possible. There are 6.43M free.; (0x0x1_HBM0)",
         (8 << 20, int(6.43 * (1 << 20)), None)),
        ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
         "space hbm. Used 49.34G of 32.00G hbm. Exceeded hbm capacity by 17.34G.",
         (int(49.34 * (1 << 30)), None, 32 << 30)),
        ("RESOURCE_EXHAUSTED: Allocation (size=134217728) would exceed memory "
         "(size=67108864) :: #allocation25", (134217728, None, 67108864)),
        ("RESOURCE_EXHAUSTED: Compilation failure: Aborting compilation early because it's "
         "unlikely to have enough memory. Requires 3.84T, has 90.96G available.",
         (int(3.84 * (1 << 40)), int(90.96 * (1 << 30)), None)),
        ("RESOURCE_EXHAUSTED: something else", (None, None, None)),
    ],
)  # fmt: skip
def test_xla_out_of_memory_messages_are_read_for_their_bytes(message, said):
    assert memory.parse_xla_oom(message) == said


def test_only_memory_errors_become_out_of_memory():
    disk_full = jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Error writing local file "/run/checkpoints/4/x": '
        "[os_error_code='28']"
    )
    assert memory.out_of_memory(disk_full) is None  # a full disk is an output error (exit 74)
    assert memory.out_of_memory(ValueError("RESOURCE_EXHAUSTED: Out of memory")) is None
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = jax.errors.JaxRuntimeError(XLA_OOM)
    assert isinstance(memory.out_of_memory(wrapped), OutOfMemory)
