"""`tokens` with `kind: bin`: nanoGPT-style flat token files, memory-mapped, windows sampled
from (seed, step); resuming is exact, bad files are located errors, memory does not grow with the
file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from accelctl import checkpoint, config, data
from accelctl.data.tokens_bin import CHECK_TOKENS
from accelctl.train import train
from tests.conftest import ROOT, assert_user_error, invoke

T, VOCAB = 8, 50
CONFIG = """\
model: {{name: transformer, num_layers: 1, num_heads: 2, embed_dim: 16, max_len: {t}}}
data:
  source: tokens
  kind: bin
  path: {path}
  vocab_size: {vocab}
  seq_len: {t}
{extra}optimizer: {{name: adam, lr: 0.03}}
train: {{batch_size: 16, steps: 8, log_every: 1, eval_every: 4}}
checkpoint: {{every_steps: 4, every_epochs: null}}
"""
PATH_LINE = 5


def _corpus(folder: Path, n_train: int = 20_000, n_val: int = 2_000, dtype=np.uint16) -> Path:
    """train.bin / val.bin of a learnable sequence (a counter mod VOCAB with random restarts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", n_train), ("val.bin", n_val)):
        tokens = (np.arange(n) + np.repeat(rng.integers(0, VOCAB, n // 100 + 1), 100)[:n]) % VOCAB
        tokens.astype(dtype).tofile(folder / name)
    return folder


def _config_file(tmp_path: Path, path: Path, *, t: int = T, vocab: int = VOCAB, **extra) -> Path:
    lines = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.format(path=path, t=t, vocab=vocab, extra=lines))
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus") / "shakespeare")


@pytest.fixture(scope="module")
def cfg_file(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _config_file(tmp_path_factory.mktemp("cfg"), corpus)


def _batches(ds: data.Dataset, seed: int, steps: range, **kw) -> list[dict]:
    return list(
        data.train_batches(
            ds.train, 16, seed=seed, start_step=steps.start, num_steps=steps.stop, **kw
        )
    )


# ------------------------------------------------------------------------------------- windows
def test_windows_are_file_slices_shifted_by_one_and_seeded(cfg_file: Path, corpus: Path) -> None:
    ds = data.build(config.load(cfg_file).data)
    tokens = np.fromfile(corpus / "train.bin", np.uint16).astype(np.int32)
    assert ds.tokens and ds.num_classes == VOCAB and ds.input_shape == (T,)
    assert len(ds.train) == len(tokens) // T  # steps per epoch = tokens // (batch * T)
    first = _batches(ds, 0, range(0, 3))
    assert all(b["x"].dtype == np.int32 and b["x"].shape == (16, T) for b in first)
    for step, batch in enumerate(first):
        offsets = ds.train.batch_indices(step, 16, seed=0)  # type: ignore[attr-defined]
        assert ((0 <= offsets) & (offsets <= len(tokens) - T - 1)).all()
        for o, x, y in zip(offsets, batch["x"], batch["y"], strict=True):
            np.testing.assert_array_equal(x, tokens[o : o + T])
            np.testing.assert_array_equal(y, tokens[o + 1 : o + T + 1])
    # The same seed gives the same batches (from any start step); another seed others.
    again = _batches(ds, 0, range(0, 3))
    later = _batches(ds, 0, range(2, 3))
    other = _batches(ds, 1, range(0, 3))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(later[0]["x"], first[2]["x"])
    assert not np.array_equal(first[0]["x"], first[1]["x"])
    assert not np.array_equal(first[0]["x"], other[0]["x"])
    # Each process reads its contiguous part of the same global batch.
    parts = [_batches(ds, 0, range(0, 1), process_index=i, process_count=4)[0] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), first[0]["x"])


def test_eval_is_the_first_non_overlapping_windows_of_val_bin(corpus: Path, tmp_path: Path) -> None:
    ds = data.build(config.load(_config_file(tmp_path, corpus, num_eval=5)).data)
    val = np.fromfile(corpus / "val.bin", np.uint16).astype(np.int32)
    assert len(ds.eval) == 5
    x, y = ds.eval.take(np.arange(5))
    windows = val[: 5 * (T + 1)].reshape(5, T + 1)
    np.testing.assert_array_equal(x, windows[:, :-1])
    np.testing.assert_array_equal(y, windows[:, 1:])
    every = data.build(config.load(_config_file(tmp_path, corpus / "train.bin")).data)
    assert len(every.eval) == len(val) // (T + 1)  # val.bin beside the training file


# ----------------------------------------------------------------------------- train and resume
def _steps(run_dir: Path) -> list[int]:
    return checkpoint.complete_steps(run_dir / "checkpoints")


def _logged(run_dir: Path) -> list[tuple]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("event", "step", "loss", "accuracy")
    return [tuple(e[k] for k in keys) for e in events if e["event"] in ("train", "eval")]


def test_training_learns_and_resume_after_a_stop_is_bit_identical(
    cfg_file: Path, tmp_path: Path
) -> None:
    full = train(config.load(cfg_file), run_dir=tmp_path / "full", quiet=True)
    assert full["data_cache"] == "none"
    losses = [e[2] for e in _logged(tmp_path / "full") if e[0] == "train"]
    assert losses[-1] < 0.8 * losses[0]
    assert _steps(tmp_path / "full") == [4, 8]
    # Stopped after its checkpoint at step 4 (the later one and the summary gone).
    run_dir = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "8")
    (run_dir / "summary.json").unlink()
    resumed = train(config.load(cfg_file), run_dir=run_dir, quiet=True, resume=True)
    assert resumed["start_step"] == 4
    assert resumed["params_sha256"] == full["params_sha256"]
    assert resumed["final_eval"] == full["final_eval"]
    assert _logged(run_dir) == _logged(tmp_path / "full")


# -------------------------------------------------------------------------------------- errors
def _run(cfg: Path, tmp_path: Path, *args: str):
    return invoke("train", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet", *args)


def test_a_token_beyond_the_vocabulary_is_located_at_load_and_mid_run(tmp_path: Path) -> None:
    early = _corpus(tmp_path / "early")
    tokens = np.fromfile(early / "train.bin", np.uint16)
    tokens[123] = VOCAB + 3
    tokens.tofile(early / "train.bin")
    cfg = _config_file(tmp_path, early)
    assert_user_error(
        _run(cfg, tmp_path),
        f"{cfg}:{PATH_LINE}:",
        "train.bin holds token id 53 at token position 123 (byte offset 246)",
        "vocab_size is 50",
    )
    # Past the ids checked when the data set is built: found in the batch that reads it, in
    # the prefetch thread, and still reported at data.path without a traceback.
    late = _corpus(tmp_path / "late", n_train=CHECK_TOKENS + 4_000)
    tokens = np.fromfile(late / "train.bin", np.uint16)
    tokens[CHECK_TOKENS::7] = VOCAB
    tokens.tofile(late / "train.bin")
    cfg = _config_file(tmp_path, late)
    result = _run(cfg, tmp_path, "--set", "train.steps=200")
    assert_user_error(result, f"{cfg}:{PATH_LINE}:", "holds token id 50 at token position")
    position = int(result.output.split("token position ")[1].split()[0])
    assert position >= CHECK_TOKENS and (position - CHECK_TOKENS) % 7 == 0


def test_malformed_files_and_options_are_located(corpus: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    shutil.copytree(corpus, odd)
    with open(odd / "train.bin", "ab") as f:
        f.write(b"\x00")
    cfg = _config_file(tmp_path, odd)
    assert_user_error(_run(cfg, tmp_path), f"{cfg}:{PATH_LINE}:", "not a whole number of 2-byte")
    short = _corpus(tmp_path / "short", n_train=T)
    cfg = _config_file(tmp_path, short)
    assert_user_error(_run(cfg, tmp_path), "holds 8 token(s)", "seq_len + 1 = 9")
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    shutil.copy(corpus / "train.bin", no_val)
    cfg = _config_file(tmp_path, no_val)
    assert_user_error(_run(cfg, tmp_path), f"{cfg}:{PATH_LINE}:", "val.bin does not exist")
    cfg = _config_file(tmp_path, tmp_path / "nowhere")
    assert_user_error(_run(cfg, tmp_path), "nowhere does not exist")
    cfg = _config_file(tmp_path, corpus, cache="device")
    assert_user_error(_run(cfg, tmp_path), f"{cfg}:8:", "use cache: auto")


# -------------------------------------------------------------------------------------- memory
MEMORY_SCRIPT = """
import json, sys
import numpy as np
from accelctl import config, data

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM)
        f.write("5")

cfg = config.load(sys.argv[1])
reset_peak()
rss0, anon0 = status("VmRSS:"), status("RssAnon:")
ds = data.build(cfg.data)
anon = 0
for _ in data.train_batches(ds.train, 64, seed=0, start_step=0, num_steps=50):
    anon = max(anon, status("RssAnon:") - anon0)
for _, _b in zip(range(20), data.eval_batches(ds.eval, 64)):
    anon = max(anon, status("RssAnon:") - anon0)
streamed = {"rss": status("VmRSS:") - rss0, "anon_peak": anon, "peak": status("VmHWM:") - rss0}
# The control: reading the file whole shows up in the same measurement.
reset_peak()
rss0 = status("VmRSS:")
whole = np.fromfile(cfg.data.path + "/train.bin", np.uint16)
print(json.dumps({"streamed": streamed, "whole": status("VmRSS:") - rss0}))
"""


def test_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    size = 128 * 2**20  # bytes: 64 Mi uint16 tokens, ~1000x what the batches below read
    folder = _corpus(tmp_path / "big", n_train=size // 2, n_val=200_000)
    assert (folder / "train.bin").stat().st_size == size
    cfg = _config_file(tmp_path, folder, t=128, vocab=VOCAB)
    script = tmp_path / "measure.py"
    script.write_text(textwrap.dedent(MEMORY_SCRIPT))
    out = subprocess.run(
        [sys.executable, str(script), str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    print(measured)  # shown with -s: the numbers behind the bound
    assert measured["whole"] > 0.9 * size  # the measurement sees a whole read
    # After 50 batches and 20 eval batches: no growth, and no large allocation on the way. (The
    # batch's windows are mapped only while it is read; with large page-cache folios that maps
    # up to a few MB of the file per window for a moment, counted in the peak RSS, not kept.)
    assert measured["streamed"]["rss"] < size / 16
    assert measured["streamed"]["anon_peak"] < size / 16
