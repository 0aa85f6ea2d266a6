"""Weights out and in: `accelctl export` (safetensors / npz / hf_gpt2, fp32 / bf16) and
`model.init_from` (bit-exact round trips on dp and fsdp, fsdp placement, strict errors,
fine-tuning a new head, GPT-2 in the Hugging Face layout), also across two processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from accelctl import config, weights, weights_hf
from accelctl.config import ConfigError
from accelctl.distributed import host_value
from accelctl.export import export
from accelctl.train import fit, train
from accelctl.train.init_from import initial_state
from accelctl.train.job import build_job
from accelctl.train.state import digest
from tests.conftest import assert_user_error, invoke
from tests.test_weights_hf import (
    HEADS,
    LAYERS,
    N_POS,
    VOCAB,
    E,
    _ids,
    _random_hf,
    numpy_gpt2_logits,
)
from tests.test_weights_hf import T as HF_T

# A CNN with batch norm: parameters and model state (running statistics) both travel.
CNN = """
model: {{name: cnn, channels: [8], dense: [16], batch_norm: true{init}}}
data: {{source: synthetic, shape: [8, 8, 1], num_train: 128, num_eval: 32, num_classes: {classes}}}
optimizer: {{name: adam, lr: 0.01}}
parallel: {{strategy: {strategy}}}
train: {{batch_size: 32, steps: {steps}, log_every: 2, seed: {seed}}}
"""


def cnn_config(
    init: str = "",
    *,
    strategy: str = "dp",
    classes: int = 4,
    steps: int = 4,
    seed: int = 0,
    folder: Path | None = None,
) -> config.Config:
    text = CNN.format(
        init=f", init_from: {init}" if init else "",
        strategy=strategy,
        classes=classes,
        steps=steps,
        seed=seed,
    )
    name = str(folder / "cnn.yaml") if folder else "cnn.yaml"
    return config.load_text(text, name)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished CNN runs: dp (seed 0) and fsdp (seed 1), and the dp run exported."""
    root = tmp_path_factory.mktemp("export")
    dp = train(cnn_config(), run_dir=root / "dp", quiet=True, log_fn=quiet)
    fsdp = train(
        cnn_config(strategy="fsdp", seed=1), run_dir=root / "fsdp", quiet=True, log_fn=quiet
    )
    file = root / "dp.safetensors"
    result = export(root / "dp", file)
    return {"root": root, "dp": dp, "fsdp": fsdp, "file": file, "export": result}


def start_digest(state) -> str:
    return digest(host_value((state.params, state.model_state)))


# ------------------------------------------------------------------------------------- export
def test_export_carries_the_runs_digest_config_and_step(runs):
    result, file = runs["export"], runs["file"]
    assert result["params_sha256"] == runs["dp"]["params_sha256"]
    assert result["step"] == 4 and result["format"] == "safetensors"
    flat, meta = weights.load(file)
    assert meta["params_sha256"] == runs["dp"]["params_sha256"]
    assert meta["step"] == "4" and meta["layout"] == "accelctl" and meta["dtype"] == "fp32"
    assert json.loads(meta["config"])["model"]["channels"] == [8]
    assert meta["checkpoint"].endswith("checkpoints/4")
    # Parameters and the batch-norm statistics, by module path.
    assert {"convs.0.kernel", "head.kernel", "norms.0.mean", "norms.0.var"} <= set(flat)
    params = {n: a for n, a in flat.items() if not n.endswith((".mean", ".var"))}
    stats = {n: a for n, a in flat.items() if n.endswith((".mean", ".var"))}
    assert weights.digest_flat(params, stats) == runs["dp"]["params_sha256"]


def test_names_are_stable_across_runs_and_strategies(runs, tmp_path):
    other = export(runs["root"] / "fsdp", tmp_path / "fsdp.npz")
    assert other["format"] == "npz"  # picked by the suffix
    a, _ = weights.load(runs["file"])
    b, meta = weights.load(tmp_path / "fsdp.npz")
    assert sorted(a) == sorted(b)
    assert all(a[n].shape == b[n].shape and a[n].dtype == b[n].dtype for n in a)
    assert not np.array_equal(a["head.kernel"], b["head.kernel"])  # another seed
    assert meta["params_sha256"] == runs["fsdp"]["params_sha256"]


def test_bf16_export_is_close_and_smaller(runs, tmp_path):
    result = export(runs["root"] / "dp", tmp_path / "w16.safetensors", dtype="bf16")
    fp32, _ = weights.load(runs["file"])
    bf16, meta = weights.load(tmp_path / "w16.safetensors")
    assert meta["dtype"] == "bf16" and meta["params_sha256"] == runs["dp"]["params_sha256"]
    assert all(a.dtype == jnp.bfloat16 for a in bf16.values())
    for name, a in fp32.items():
        np.testing.assert_allclose(bf16[name].astype(np.float32), a, rtol=1e-2, atol=1e-3)
    values = sum(a.size for a in fp32.values())
    # Two bytes less per value (the header, with the config, is the same size).
    assert runs["export"]["bytes"] - result["bytes"] >= 0.99 * 2 * values


@pytest.mark.parametrize("strategy", ["dp", "fsdp"])
def test_init_from_the_export_is_bit_exact(runs, strategy):
    job = build_job(cnn_config(str(runs["file"]), strategy=strategy), compile_train=False)
    lines: list[str] = []
    state = initial_state(job, log_fn=lines.append)
    assert start_digest(state) == runs["dp"]["params_sha256"]
    assert int(state.step) == 0
    assert "loaded 9 arrays, kept 0, ignored 0" in lines[0] and "step 4" in lines[0]
    # The optimizer starts fresh: Adam's moments are zero, its count 0.
    moments = jax.tree.leaves(host_value(state.opt_state))
    assert all(not np.any(m) for m in moments)


def test_init_from_places_only_shards_under_fsdp(runs):
    job = build_job(cnn_config(str(runs["file"]), strategy="fsdp"), compile_train=False)
    state = initial_state(job)
    split = 0
    for leaf in jax.tree.leaves(state.params):
        shard = leaf.sharding.shard_shape(leaf.shape)
        assert all(s.data.shape == shard for s in leaf.addressable_shards)
        split += shard != leaf.shape
    kernel = state.params["dense"][0]["kernel"].get_value()
    assert kernel.shape == (128, 16)
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 16)}
    assert split >= 2  # the dense kernels at least; small biases may stay whole


def test_init_from_a_run_directory_and_a_step_folder(runs):
    for source in (runs["root"] / "dp", runs["root"] / "dp" / "checkpoints" / "4"):
        job = build_job(cnn_config(str(source), strategy="fsdp"), compile_train=False)
        assert start_digest(initial_state(job)) == runs["dp"]["params_sha256"]


def _edited_file(runs, tmp_path: Path, edit: str) -> Path:
    flat, _ = weights.load(runs["file"])
    if edit == "missing":
        del flat["dense.0.bias"]
    elif edit == "extra":
        flat["extra.kernel"] = np.zeros((2, 2), np.float32)
    else:
        flat["head.kernel"] = np.zeros((16, 5), np.float32)
    path = tmp_path / f"{edit}.safetensors"
    weights.save(path, flat, metadata={})
    return path


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("missing", "dense.0.bias: missing from the file (model shape (16,))"),
        ("extra", "extra.kernel: in the file but not in the model"),
        ("shape", "head.kernel: shape (16, 5) in the file, (16, 4) in the model"),
    ],
)
def test_strict_loading_names_each_problem_at_model_init_from(runs, tmp_path, edit, needle):
    path = _edited_file(runs, tmp_path, edit)
    job = build_job(cnn_config(str(path), folder=tmp_path), compile_train=False)
    with pytest.raises(ConfigError) as e:
        initial_state(job)
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'cnn.yaml'}:2:") and "model.init_from:" in msg
    assert "(1 problems)" in msg and needle in msg


def test_train_refuses_mismatched_weights_before_writing_anything(runs, tmp_path):
    flat, _ = weights.load(runs["file"])
    del flat["dense.0.bias"]
    flat["extra.kernel"] = np.zeros((2, 2), np.float32)
    flat["head.kernel"] = np.zeros((16, 5), np.float32)
    weights.save(tmp_path / "bad.npz", flat, metadata={}, format="npz")
    cfg = tmp_path / "cnn.yaml"
    cfg.write_text(
        CNN.format(init=", init_from: bad.npz", strategy="dp", classes=4, steps=4, seed=0)
    )
    result = invoke("train", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert_user_error(
        result,
        "cnn.yaml:2:",
        "model.init_from: the weights do not fit the model (3 problems)",
        "dense.0.bias: missing",
        "extra.kernel: in the file but not in the model",
        "head.kernel: shape (16, 5)",
    )
    assert not (tmp_path / "run").exists()
    missing = invoke("train", str(cfg), "--set", "model.init_from=nope.safetensors")
    assert_user_error(missing, "model.init_from:", "nope.safetensors does not exist")


def test_exclude_trains_a_new_head_from_scratch(runs):
    """Fine-tuning on 6 classes: the head is the run's own initialisation, the rest the file's."""
    init = f"{{path: {runs['file']}, exclude: [head.*]}}"
    job = build_job(cnn_config(init, classes=6, steps=3), compile_train=False)
    lines: list[str] = []
    got = weights.flatten_state(host_value(initial_state(job, log_fn=lines.append).params))
    fresh = weights.flatten_state(host_value(job.state.init().params))
    flat, _ = weights.load(runs["file"])
    for name, value in got.items():
        want = fresh[name] if name.startswith("head.") else flat[name]
        np.testing.assert_array_equal(value, want, err_msg=name)
    assert got["head.kernel"].shape == (16, 6)
    assert "kept 2" in lines[0] and "freshly initialised: head.bias, head.kernel" in lines[0]
    summary = fit(build_job(cnn_config(init, classes=6, steps=3)))
    assert summary["steps"] == 3 and np.isfinite(summary["final_eval"]["loss"])


def test_a_fresh_run_starts_from_the_weights_and_a_resumed_one_ignores_them(runs, tmp_path):
    lines: list[str] = []
    cfg = cnn_config(str(runs["file"]), steps=2)
    train(cfg, run_dir=tmp_path / "run", quiet=True, log_fn=lines.append)
    assert any(line.startswith("model.init_from: loaded 9 arrays") for line in lines)
    stored = config.load(tmp_path / "run" / "config.yaml")
    assert stored.model.init_from.path == str(runs["file"])
    lines.clear()
    longer = cnn_config(str(runs["file"]), steps=3)
    summary = train(longer, run_dir=tmp_path / "run", resume=True, quiet=True, log_fn=lines.append)
    assert summary["steps"] == 3 and summary["start_step"] == 2
    assert "model.init_from is ignored: a resumed run continues from its own checkpoint" in lines
    assert not any(line.startswith("model.init_from: loaded") for line in lines)


# -------------------------------------------------------------------------------------- CLI
def test_export_command_and_its_input_errors(runs, tmp_path):
    out = tmp_path / "w.npz"
    result = invoke("export", str(runs["root"] / "dp"), "--out", str(out), "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params_sha256"] == runs["dp"]["params_sha256"] and report["format"] == "npz"
    assert weights.load(out)[1]["params_sha256"] == runs["dp"]["params_sha256"]
    table = invoke("export", str(runs["root"] / "dp"), "-o", str(tmp_path / "t.safetensors"))
    assert table.exit_code == 0 and "params_sha256" in table.stdout

    def run(*args: str):
        return invoke("export", *args)

    assert_user_error(run(str(tmp_path / "nope"), "-o", str(out)), "nope: does not exist")
    assert_user_error(
        run(str(runs["root"] / "dp"), "-o", str(tmp_path / "no" / "w.npz")),
        "--out",
        "does not exist; create it first",
    )
    assert_user_error(run(str(runs["root"] / "dp"), "-o", str(tmp_path)), "--out", "is a folder")
    assert_user_error(
        run(str(runs["root"] / "dp"), "-o", str(out), "--step", "3"),
        "has no complete checkpoint for step 3; it has 4",
    )
    step_dir = runs["root"] / "dp" / "checkpoints" / "4"
    assert_user_error(run(str(step_dir), "-o", str(out), "--step", "2"), "--step 2:")
    assert_user_error(
        run(str(runs["root"] / "dp"), "-o", str(out), "--format", "hf_gpt2"),
        "--format hf_gpt2:",
        "GPT-2 transformers; this run trained a cnn model",
    )


# ---------------------------------------------------------------------------------- GPT-2
GPT = """
model: {{name: transformer, num_layers: 2, num_heads: 4, embed_dim: 32, max_len: 16{extra}}}
data: {{source: tokens, kind: synthetic, seq_len: 12, vocab_size: 50, num_train: 64, num_eval: 16}}
optimizer: {{name: adam, lr: 0.01}}
train: {{batch_size: 16, steps: 1}}
parallel: {{num_devices: 1}}
"""


def saved_run(cfg: config.Config, run: Path) -> str:
    """A run directory with one checkpoint (step 0) of `cfg`'s initialised state (no training:
    nothing to compile); returns the state's params_sha256."""
    from accelctl.checkpoint import Checkpointer

    job = build_job(cfg, compile_train=False)
    state = job.state.init()
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint, steps_per_epoch=1, total_steps=1)
    ckpt.save(0, state, {"step": 0, "config": cfg.to_dict()})
    ckpt.close()
    return start_digest(state)


def test_hf_gpt2_export_of_tied_learned_transformers_only(tmp_path):
    tied = tmp_path / "tied"
    sha = saved_run(config.load_text(GPT.format(extra="")), tied)
    out = tmp_path / "hf" / "model.safetensors"
    out.parent.mkdir()
    result = export(tied, out, format="hf_gpt2")
    assert result["params_sha256"] == sha
    assert result["config_json"] == str(out.parent / "config.json")
    hf, meta = weights.load(out)
    assert meta["format"] == "pt" and meta["layout"] == "hf_gpt2"
    assert "wte.weight" in hf and "h.1.attn.c_attn.weight" in hf and "lm_head.weight" not in hf
    # from_hf_gpt2 gives back the run's parameters bit for bit (as accelctl's own export has them).
    export(tied, tmp_path / "plain.safetensors")
    ours, _ = weights.load(tmp_path / "plain.safetensors")
    back = weights_hf.from_hf_gpt2(hf)
    assert sorted(back) == sorted(ours)
    for name, value in ours.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    dims = weights_hf.read_hf_gpt2_config(json.loads((out.parent / "config.json").read_text()))
    assert dims == {
        "vocab_size": 50,
        "max_len": 16,
        "embed_dim": 32,
        "num_layers": 2,
        "num_heads": 4,
        "mlp_dim": None,
    }
    # The folder is recognised as GPT-2's layout (format auto) and starts a run bit-exactly.
    cfg = config.load_text(GPT.format(extra=f", init_from: {out.parent}"))
    assert start_digest(initial_state(build_job(cfg, compile_train=False))) == sha

    for extra, needle in (
        (", positions: rotary", "rotary positions"),
        (", tie_embeddings: false", "untied"),
    ):
        run = tmp_path / extra.split(":")[0].strip(", ")
        saved_run(config.load_text(GPT.format(extra=extra)), run)
        target = tmp_path / "r.safetensors"
        failed = invoke("export", str(run), "-o", str(target), "--format", "hf_gpt2")
        assert_user_error(failed, "--format hf_gpt2:", needle)
        assert not target.exists()


def _hf_folder(tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "gpt2"
    folder.mkdir(exist_ok=True)
    hf = _random_hf()
    weights.save(
        folder / "model.safetensors", hf, metadata={}, header=weights_hf.SAFETENSORS_HEADER
    )
    hf_config = weights_hf.hf_gpt2_config(
        vocab_size=VOCAB, max_len=N_POS, embed_dim=E, num_layers=LAYERS, num_heads=HEADS
    )
    (folder / "config.json").write_text(json.dumps(hf_config | config_changes))
    return folder


def test_init_from_hf_gpt2_gives_the_reference_logits(tmp_path):
    folder = _hf_folder(tmp_path)
    cfg = config.load_text(
        GPT.format(extra=f", init_from: {{path: {folder}, format: hf_gpt2}}").replace(
            "seq_len: 12", f"seq_len: {HF_T}"
        )
    )
    job = build_job(cfg, compile_train=False)
    state = initial_state(job)
    model = nnx.merge(job.state.graphdef, state.params, state.model_state)
    ids = _ids()
    got = np.asarray(model(jnp.asarray(ids), train=False))
    np.testing.assert_allclose(
        got, numpy_gpt2_logits(_random_hf(), ids, HEADS), rtol=1e-4, atol=1e-4
    )


def test_hf_gpt2_dims_and_architecture_are_checked(tmp_path):
    folder = _hf_folder(tmp_path, n_head=2)
    cfg = config.load_text(GPT.format(extra=f", init_from: {folder}"), "gpt.yaml")
    with pytest.raises(ConfigError, match=r"num_heads: 2 in config.json, 4 in the config"):
        initial_state(build_job(cfg, compile_train=False))
    cfg = config.load_text(
        GPT.format(extra=f", tie_embeddings: false, init_from: {folder / 'model.safetensors'}"),
        "gpt.yaml",
    )
    with pytest.raises(ConfigError, match="tie_embeddings: false") as e:
        initial_state(build_job(cfg, compile_train=False))
    assert str(e.value).startswith("gpt.yaml:2:")


# -------------------------------------------------------------------------- two processes
@pytest.mark.slow  # two 2-process jobs: 15-21 s on 2 cores
def test_two_processes_export_and_start_from_the_same_weights(runs, tmp_path):
    """A 2-process fsdp run starts bit-exactly from an export: its one update is exactly zero
    (the learning-rate warmup starts at 0), so its final parameters are the file's (the
    batch-norm statistics move: a train step updates them). Exported by two processes, which
    gather the shards of both, the file holds them and the run's digest."""
    from accelctl import launch
    from tests.test_multihost import LAUNCH_2X2, accelctl, child_env

    cfg = tmp_path / "cnn.yaml"
    text = CNN.format(
        init=f", init_from: {runs['file']}", strategy="fsdp", classes=4, steps=1, seed=0
    )
    cfg.write_text(text + "schedule: {warmup_steps: 2}\n")
    job = accelctl(*LAUNCH_2X2, str(cfg), "--run-dir", str(tmp_path / "two"))
    assert job.returncode == 0, job.stdout[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["processes"], summary["devices"], summary["strategy"]) == (2, 4, "fsdp")
    assert "model.init_from: loaded 9 arrays" in job.stdout

    out = tmp_path / "two.safetensors"
    procs = []
    for env, extra in launch.process_envs(2, 2, "cpu", launch.free_port()):
        devices = f"--xla_force_host_platform_device_count={extra[1]}"
        cmd = [sys.executable, "-m", "accelctl", "export", str(tmp_path / "two"), "-o", str(out)]
        procs.append(
            subprocess.Popen(
                [*cmd, "--json", "-"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**child_env(), **env, "XLA_FLAGS": devices},
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # gloo (the CPU collectives) prints its connections to stdout from C++.
    stdout = [
        "".join(line for line in o.splitlines(True) if not line.startswith(launch._CHATTER))
        for o, _ in outputs
    ]
    assert json.loads(stdout[0])["params_sha256"] == summary["params_sha256"]
    assert stdout[1] == ""  # process 1 gathers, but neither writes nor reports
    got, meta = weights.load(out)
    assert meta["params_sha256"] == summary["params_sha256"]
    start, _ = weights.load(runs["file"])
    assert sorted(got) == sorted(start)
    for name, value in start.items():
        if not name.startswith("norms."):
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert not np.array_equal(got["norms.0.mean"], start["norms.0.mean"])
