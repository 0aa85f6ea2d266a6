"""The user's own model (`model.target`) and loss (`train.loss` as an import path): trained like a
built-in model on every strategy and device count, resumed bit-identically, and every way of
getting it wrong reported at its config line without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from accelctl import config, data
from accelctl.models import custom
from accelctl.train import train
from accelctl.train.job import build_job
from tests.conftest import ROOT, assert_user_error, invoke

# The user's project: one file, imported by its path (never on sys.path). Tiny on purpose.
NETS = '''
import jax.numpy as jnp
import optax
from flax import nnx
from flax import linen as nn
from flax import nnx

init = nnx.initializers.lecun_normal()


class Net(nnx.Module):
    """Named axes (tp), batch norm (model state), dropout (the per-step rngs)."""

    def __init__(self, features: int, hidden: int, classes: int, *, rngs, dtype=None):
        # No bias before the batch norm: its gradient is 0 up to rounding, which Adam would
        # scale up to full-size steps that differ with the device count.
        self.l1 = nnx.Linear(features, hidden, use_bias=False, dtype=dtype, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
        self.norm = nnx.BatchNorm(hidden, momentum=0.5, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.2)
        self.l2 = nnx.Linear(hidden, classes, dtype=dtype, rngs=rngs,
                             kernel_metadata={"out_sharding": ("mlp", "embed")})

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        x = self.l1(x.reshape(x.shape[0], -1))
        x = nnx.relu(self.norm(x, use_running_average=not train))
        return self.l2(self.drop(x, deterministic=not train, rngs=rngs))


class Plain(nnx.Module):
    """No axis names; its __call__ takes no rngs (accelctl must not pass them)."""

    def __init__(self, features: int, classes: int, *, rngs):
        self.l = nnx.Linear(features, classes, rngs=rngs)

    def __call__(self, x, *, train: bool):
        return self.l(x.reshape(x.shape[0], -1))


def make_plain(features: int, classes: int, *, rngs):
    return Plain(features, classes, rngs=rngs)


class LNet(nn.Module):
    """An existing-style Linen module: BatchNorm and Dropout switched by `train`."""

    hidden: int
    classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.hidden, use_bias=False)(x.reshape((x.shape[0], -1)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class Tokens(nnx.Module):
    def __init__(self, vocab: int, width: int, *, rngs, per_position: bool = True):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.out = nnx.Linear(width, vocab, rngs=rngs)
        self.per_position = per_position

    def __call__(self, x, *, train: bool):
        h = self.embed(x)
        return self.out(h if self.per_position else h.mean(axis=1))


class PerPosition(nnx.Module):
    def __init__(self, classes: int, *, rngs):
        self.l = nnx.Linear(1, classes, rngs=rngs)

    def __call__(self, x, *, train: bool):
        return self.l(x.reshape(x.shape[0], -1, 1))


class NoTrain(nnx.Module):
    def __init__(self, features: int, classes: int, *, rngs):
        self.l = nnx.Linear(features, classes, rngs=rngs)

    def __call__(self, x):
        return self.l(x.reshape(x.shape[0], -1))


class StoredRngs(nnx.Module):
    def __init__(self, features: int, classes: int, *, rngs):
        self.l = nnx.Linear(features, classes, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, *, train: bool):
        return self.drop(self.l(x.reshape(x.shape[0], -1)), deterministic=not train)


class Raises(nnx.Module):
    def __init__(self, width: int, *, rngs):
        if width < 4:
            raise ValueError(f"width must be at least 4, got {width}")


class NotAModel:
    pass


class Outer:
    class Inner(nnx.Module):
        def __init__(self, features: int, classes: int, *, rngs):
            self.l = nnx.Linear(features, classes, rngs=rngs)

        def __call__(self, x, *, train: bool):
            return self.l(x.reshape(x.shape[0], -1))


def returns_int(*, rngs):
    return 3


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def mean_loss(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def one_arg(logits):
    return logits


not_callable = 3
'''

DATA = "data: {source: synthetic, shape: [4, 4, 1], num_train: 256, num_eval: 96, num_classes: 4}"
NET = "model: {target: ./nets.py:Net, args: {features: 16, hidden: 16, classes: 4}}"
LINEN = "model: {target: ./nets.py:LNet, args: {hidden: 16, classes: 4}}"
TRAIN = "train: {batch_size: 32, steps: 40, log_every: 4, eval_every: 20}"
OPTIMIZER = "optimizer: {name: adam, lr: 0.01}"


def _text(*lines: str) -> str:
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the user's nets.py (not on sys.path); configs are written next to it."""
    path = tmp_path_factory.mktemp("project")
    (path / "nets.py").write_text(NETS)
    # A file importing its neighbour: the folder of a file target is not on sys.path.
    (path / "uses_helpers.py").write_text("import helpers\n")
    (path / "helpers.py").write_text("WIDTH = 4\n")
    return path


def _write(project: Path, name: str, text: str) -> Path:
    path = project / name
    path.write_text(text)
    return path


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"]) for e in map(json.loads, lines) if e["event"] == "train"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelctl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# ------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("model", [NET, LINEN], ids=["nnx", "linen"])
def test_a_model_file_trains_in_a_fresh_process(project: Path, tmp_path: Path, model: str) -> None:
    cfg = _write(project, f"fresh_{len(model)}.yaml", _text(model, DATA, OPTIMIZER, TRAIN))
    # Run from another folder: the file is found through the config's folder, not the cwd.
    done = _cli(
        "train",
        str(cfg),
        "--run-dir",
        str(tmp_path / "run"),
        "--quiet",
        "--json",
        "-",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 40 and summary["devices"] == 8
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert losses[-1] < losses[0]
    assert summary["final_eval"]["accuracy"] > 0.5  # 4 classes: chance is 0.25


def test_one_and_eight_devices_give_the_same_losses(project: Path, tmp_path: Path) -> None:
    path = _write(project, "equiv.yaml", _text(NET, DATA, OPTIMIZER, TRAIN))
    over = ["train.log_every=1", "train.steps=6", "data.dtype=float32"]
    one = train(
        config.load(path, [*over, "parallel.num_devices=1"]), run_dir=tmp_path / "1", quiet=True
    )
    eight = train(config.load(path, over), run_dir=tmp_path / "8", quiet=True)
    assert one["devices"] == 1 and eight["devices"] == 8
    l1, l8 = _losses(tmp_path / "1"), _losses(tmp_path / "8")
    assert [s for s, _ in l1] == list(range(1, 7)) == [s for s, _ in l8]
    np.testing.assert_allclose([v for _, v in l1], [v for _, v in l8], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(
        one["final_eval"]["loss"], eight["final_eval"]["loss"], rtol=2e-5, atol=2e-6
    )


def _shard_shapes(leaf: jax.Array) -> set[tuple[int, ...]]:
    return {s.data.shape for s in leaf.addressable_shards}


def test_fsdp_shards_the_parameters_of_a_user_model(project: Path) -> None:
    path = _write(project, "fsdp.yaml", _text(NET, DATA, OPTIMIZER, TRAIN))
    job = build_job(config.load(path, ["parallel.strategy=fsdp"]), compile_train=False)
    params = job.state.init().params
    kernel = params["l1"]["kernel"][...]  # (16, 16): split 8 ways along its first axis
    assert kernel.sharding.spec == P("data", None) and _shard_shapes(kernel) == {(2, 16)}
    assert _shard_shapes(params["l2"]["kernel"][...]) == {(2, 4)}


def test_tp_splits_the_axes_a_user_model_names(project: Path) -> None:
    path = _write(project, "tp.yaml", _text(NET, DATA, OPTIMIZER, TRAIN))
    job = build_job(
        config.load(path, ["parallel.strategy=tp", "parallel.mesh.model=2"]), compile_train=False
    )
    params = job.state.init().params
    l1, l2 = params["l1"]["kernel"][...], params["l2"]["kernel"][...]
    # nnx.with_partitioning ("embed", "mlp") and kernel_metadata ("mlp", "embed").
    assert l1.sharding.spec == P(None, "model") and _shard_shapes(l1) == {(16, 8)}
    assert l2.sharding.spec == P("model", None) and _shard_shapes(l2) == {(8, 4)}


def test_tp_refuses_a_user_model_without_axis_names(project: Path, tmp_path: Path) -> None:
    model = "model: {target: ./nets.py:Plain, args: {features: 16, classes: 4}}"
    text = _text(model, DATA, TRAIN, "parallel: {strategy: tp, mesh: {model: 2}}")
    path = _write(project, "tp_plain.yaml", text)
    result = invoke("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert_user_error(result, "tp_plain.yaml:4:", "parallel.strategy", "with_partitioning")


def test_linen_batch_stats_train_and_evaluation_uses_the_running_averages(project: Path) -> None:
    path = _write(project, "linen.yaml", _text(LINEN, DATA, OPTIMIZER, TRAIN))
    job = build_job(config.load(path, ["data.cache=host", "data.dtype=float32"]))
    state = job.state.init()
    before = nnx.to_pure_dict(jax.device_get(state.model_state))
    host = next(data.train_batches(job.dataset.train, 32, seed=0, start_step=0, num_steps=1))
    state, _ = job.steps.train(state, job.feed.put_fn(host))
    params = nnx.to_pure_dict(jax.device_get(state.params))
    stats = nnx.to_pure_dict(jax.device_get(state.model_state))
    assert set(stats) == {"BatchNorm_0"} and set(params) == {"Dense_0", "Dense_1", "BatchNorm_0"}
    assert not np.allclose(before["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"])

    batch = next(data.eval_batches(job.dataset.eval, 96))
    sums = job.steps.eval(
        state.params, state.model_state, job.feed.put_fn(batch), job.steps.zero_eval_sums()
    )
    module = custom.import_target(str(project / "nets.py") + ":LNet", ("model", "target"))(16, 4)

    def loss_sum(use_running_average: bool) -> float:
        variables = {"params": params, "batch_stats": stats}
        if use_running_average:
            logits = module.apply(variables, batch["x"], train=False)
        else:  # batch statistics, dropout off: what evaluation must not do
            logits, _ = module.apply(
                variables,
                batch["x"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )
        y = batch["y"]
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).sum())

    np.testing.assert_allclose(float(sums["loss_sum"]), loss_sum(True), rtol=1e-5)
    assert not np.isclose(float(sums["loss_sum"]), loss_sum(False), rtol=1e-3)


def test_a_model_object_replaces_the_import(project: Path) -> None:
    """The Python API hands the class itself: the target is then never imported."""
    nets = custom.import_target(str(project / "nets.py") + ":Outer.Inner", ("model", "target"))
    model = "model: {target: not_installed.anywhere:Inner, args: {features: 16, classes: 4}}"
    cfg = config.load(_write(project, "obj.yaml", _text(model, DATA, TRAIN)))
    job = build_job(cfg, model=nets, compile_train=False)
    assert job.state.num_params == 16 * 4 + 4


def test_token_data_with_a_per_position_user_model(project: Path, tmp_path: Path) -> None:
    model = "model: {target: ./nets.py:Tokens, args: {vocab: 11, width: 8}}"
    tokens = "data: {source: tokens, seq_len: 8, vocab_size: 11}"
    path = _write(project, "tokens.yaml", _text(model, tokens, "train: {batch_size: 16, steps: 3}"))
    summary = train(config.load(path), run_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 3 and summary["final_eval"]["count"] > 0
    result = invoke(
        "train",
        str(path),
        "--set",
        "model.args.per_position=false",
        "--run-dir",
        str(tmp_path / "bad"),
    )
    assert_user_error(result, "model.args", "returned logits (2, 11)", "per-position logits")


# ------------------------------------------------------------------------------------- the loss
def test_a_user_loss_equal_to_cross_entropy_gives_the_built_in_losses(
    project: Path, tmp_path: Path
) -> None:
    # A factory whose model's __call__ takes no rngs.
    model = "model: {target: ./nets.py:make_plain, args: {features: 16, classes: 4}}"
    path = _write(project, "loss.yaml", _text(model, DATA, OPTIMIZER, TRAIN))
    over = ["train.log_every=1", "train.steps=6"]
    ref = train(config.load(path, over), run_dir=tmp_path / "ref", quiet=True)
    own = train(
        config.load(path, [*over, "train.loss=./nets.py:xent"]),
        run_dir=tmp_path / "own",
        quiet=True,
    )
    ref_losses, own_losses = _losses(tmp_path / "ref"), _losses(tmp_path / "own")
    assert len(own_losses) == 6
    np.testing.assert_allclose(own_losses, ref_losses, rtol=1e-6, atol=1e-7)
    assert own["final_eval"]["accuracy"] == ref["final_eval"]["accuracy"]
    np.testing.assert_allclose(own["final_eval"]["loss"], ref["final_eval"]["loss"], rtol=1e-6)


# ----------------------------------------------------------------------------------- the errors
PLAIN_ARGS = "args: {features: 16, classes: 4}"
ERRORS = {
    "module not found": (
        "model: {target: no_such_pkg.nets:Net}",
        [],
        ["model.target", "no module named 'no_such_pkg'", "PYTHONPATH", "path/to/nets.py:Name"],
    ),
    "file not found": ("model: {target: ./nope.py:Net}", [], ["nope.py does not exist"]),
    "file imports its neighbour": (
        "model: {target: ./uses_helpers.py:Net}",
        [],
        ["No module named 'helpers'", "helpers sits next to uses_helpers.py", "PYTHONPATH="],
    ),
    "name not found": (
        "model: {target: ./nets.py:Nett}",
        [],
        ["model.target", "has no name 'Nett'", "did you mean 'Net'"],
    ),
    "dotted name not found": (
        "model: {target: ./nets.py:Outer.Iner}",
        [],
        ["has no name 'Iner'", "did you mean 'Inner'"],
    ),
    "not a module class": (
        "model: {target: ./nets.py:NotAModel}",
        [],
        ["NotAModel is the class NotAModel, which is not a Flax module", "nnx.Module subclass"],
    ),
    "not callable": (
        "model: {target: ./nets.py:not_callable}",
        [],
        ["object of type int, not callable"],
    ),
    "factory returns no module": (
        "model: {target: ./nets.py:returns_int}",
        [],
        ["returns_int() returned an object of type int, not an nnx.Module"],
    ),
    "unknown arg": (
        "model: {target: ./nets.py:Net, args: {features: 16, hiden: 16, classes: 4}}",
        [],
        ["model.args.hiden", "no parameter 'hiden'", "did you mean 'hidden'"],
    ),
    "missing arg": (
        "model: {target: ./nets.py:Net, args: {features: 16}}",
        [],
        ["model.args", "needs hidden, classes"],
    ),
    "arg set by accelctl": (
        "model: {target: ./nets.py:Net, args: {features: 16, hidden: 8, classes: 4, dtype: x}}",
        [],
        ["model.args.dtype", "set by accelctl"],
    ),
    "callable raises": (
        "model: {target: ./nets.py:Raises, args: {width: 2}}",
        [],
        ["raised while being built", "ValueError: width must be at least 4, got 2", "nets.py:"],
    ),
    "wrong logits": (
        "model: {target: ./nets.py:Plain, args: {features: 16, classes: 7}}",
        [],
        ["model.args", "logits (2, 7) for 4 classes"],
    ),
    "per-position logits": (
        "model: {target: ./nets.py:PerPosition, args: {classes: 4}}",
        [],
        ["per-position logits (2, 16, 4) for class labels"],
    ),
    "forward fails": (
        "model: {target: ./nets.py:Plain, args: {features: 15, classes: 4}}",
        [],
        ["failed on a batch of shape (2, 4, 4, 1) float32", "TypeError", "nets.py:"],
    ),
    "no train parameter": (
        f"model: {{target: ./nets.py:NoTrain, {PLAIN_ARGS}}}",
        [],
        ["model.target", "has no `train` parameter", "train: bool"],
    ),
    "stored rng stream": (
        f"model: {{target: ./nets.py:StoredRngs, {PLAIN_ARGS}}}",
        [],
        ["keeps rng streams in the model (drop/rngs)", "rngs: nnx.Rngs | None = None"],
    ),
    "loss not found": (
        f"model: {{target: ./nets.py:Plain, {PLAIN_ARGS}}}",
        ["train.loss=./nets.py:xnt"],
        ["train.loss", "did you mean 'xent'"],
    ),
    "loss not callable": (
        f"model: {{target: ./nets.py:Plain, {PLAIN_ARGS}}}",
        ["train.loss=./nets.py:not_callable"],
        ["train.loss", "not a function"],
    ),
    "loss signature": (
        f"model: {{target: ./nets.py:Plain, {PLAIN_ARGS}}}",
        ["train.loss=./nets.py:one_arg"],
        ["train.loss", "cannot be called as fn(logits, targets)"],
    ),
    "loss not per example": (
        f"model: {{target: ./nets.py:Plain, {PLAIN_ARGS}}}",
        ["train.loss=./nets.py:mean_loss"],
        ["train.loss", "mean_loss returned () for logits (2, 4)", "shape (2,)"],
    ),
    "label smoothing with a user loss": (
        f"model: {{target: ./nets.py:Plain, {PLAIN_ARGS}}}",
        ["train.loss=./nets.py:xent", "train.label_smoothing=0.1"],
        ["train.label_smoothing", "built-in cross_entropy only"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_bad_user_model_or_loss_is_a_located_error(
    case: str, project: Path, tmp_path: Path
) -> None:
    model, overrides, needles = ERRORS[case]
    train_line = "train: {batch_size: 32, steps: 2, loss: cross_entropy}"
    path = _write(project, "bad.yaml", _text(model, DATA, train_line))
    sets = [a for o in overrides for a in ("--set", o)]
    run_dir = tmp_path / "run"
    result = invoke("train", str(path), "--run-dir", str(run_dir), *sets)
    # Located: a --set value at the override, the rest at the file's line and column.
    where = "--set train." if overrides else "bad.yaml:1:"
    assert_user_error(result, where, *needles)
    assert not run_dir.exists()  # refused before anything was compiled or written


# ----------------------------------------------------------------------------------- the resume
RESUME = _text(
    "model: {target: ./nets.py:Net, args: {features: 16, hidden: 16, classes: 4}}",
    DATA,
    OPTIMIZER,
    "schedule: {name: cosine, warmup_steps: 10}",
    "train: {batch_size: 32, steps: 300, log_every: 7, eval_every: 50}",
    "checkpoint: {every_steps: 5, every_epochs: null, keep: 3}",
)


@pytest.mark.slow  # about 20 s on 2 cores: a reference run and two processes
def test_sigkill_then_resume_is_bit_identical(project: Path, tmp_path: Path) -> None:
    path = _write(project, "resume.yaml", RESUME)
    ref = train(
        config.load(path, ["checkpoint.enabled=false"]), run_dir=tmp_path / "ref", quiet=True
    )
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelctl", "train", str(path), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        [*cmd, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    ckpt, deadline = run_dir / "checkpoints", time.monotonic() + 120
    while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        assert proc.poll() is None, f"ended before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    done = _cli(
        "train",
        str(path),
        "--run-dir",
        str(run_dir),
        "--quiet",
        "--resume",
        "--json",
        "-",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert 5 <= summary["start_step"] < 300 and summary["steps"] == 300
    assert summary["params_sha256"] == ref["params_sha256"]
    assert summary["final_eval"] == ref["final_eval"]


# --------------------------------------------------------------------------------- the examples
@pytest.mark.parametrize("example", ["own_nnx_model", "linen_model"])
def test_the_examples_learn_the_digits(example: str, tmp_path: Path) -> None:
    # 80 of the examples' 200 steps (the cosine schedule follows): about 0.97 and 0.94; the full
    # runs reach about 0.98.
    cfg = config.load(ROOT / "examples" / example / "config.yaml", ["train.steps=80"])
    summary = train(cfg, run_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 80
    assert summary["final_eval"]["accuracy"] > 0.9, summary["final_eval"]
