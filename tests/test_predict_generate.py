"""Using a trained run: `accelctl predict` (npz and image-folder inputs, against eval and a direct
forward pass) and `accelctl generate` (the KV-cache path against step-by-step arg-max without a
cache, on 8 and 1 devices, seeded sampling), and their input errors."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from accelctl import config, data
from accelctl.errors import UserError
from accelctl.export import restore_weights
from accelctl.predict import generate_from_run, parse_prompt
from accelctl.train import train
from accelctl.train.checkpoint_eval import evaluate_checkpoint
from tests.conftest import TINY, assert_user_error, invoke

# 100 eval rows: batches of 32 leave a padded last batch.
CLASSIFIER = TINY.replace("steps: 12", "steps: 8")
# gpt_tiny's model (2 layers, 4 heads, width 64, 64 positions, 256 byte tokens), briefly trained.
GPT_TINY = ["train.steps=20", "train.eval_every=20", "data.num_train=640", "data.num_eval=32"]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    cfg = config.load_text(CLASSIFIER, "tiny.yaml")
    classifier = train(cfg, run_dir=root / "mlp", quiet=True, log_fn=quiet)
    gpt = train(config.load("gpt_tiny", GPT_TINY), run_dir=root / "gpt", quiet=True, log_fn=quiet)
    ds = data.build(cfg.data)
    np.savez(root / "eval.npz", x=ds.eval.x, y=ds.eval.y)
    return {"root": root, "classifier": classifier, "gpt": gpt, "eval": ds.eval}


def json_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------ predict
def test_predict_equals_eval_and_a_direct_forward_pass(runs, tmp_path):
    run, split = runs["root"] / "mlp", runs["eval"]
    out = tmp_path / "pred.npz"
    report = json_of(
        invoke("predict", str(run), str(runs["root"] / "eval.npz"), "-o", str(out), "--json", "-")
    )
    evaluated = evaluate_checkpoint(run)["eval"]
    assert report["rows"] == evaluated["count"] == 100
    assert (
        report["accuracy"] == evaluated["accuracy"] == runs["classifier"]["final_eval"]["accuracy"]
    )
    assert sum(report["classes"]) == 100 and len(report["classes"]) == 4
    saved = np.load(out)
    pred, probs = saved["pred"], saved["probs"]
    np.testing.assert_array_equal(saved["y"], split.y)
    assert probs.shape == (100, 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The forward pass by hand: uint8 pixels scaled by 1/255, as the training data was.
    rw = restore_weights(run)
    model = nnx.merge(rw.spec.graphdef, rw.params, rw.model_state)
    logits = model(jnp.asarray(split.x, jnp.float32) * jnp.float32(1 / 255), train=False)
    np.testing.assert_array_equal(pred, np.argmax(logits, axis=-1))
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, axis=-1), rtol=1e-5, atol=1e-6)
    assert report["accuracy"] == float(np.mean(pred == split.y))
    # Another batch size (another padding), and the CSV form.
    csv_out = tmp_path / "pred.csv"
    again = json_of(
        invoke(
            "predict",
            str(run),
            str(runs["root"] / "eval.npz"),
            "-o",
            str(csv_out),
            "--batch-size",
            "8",
            "--json",
            "-",
        )
    )
    assert again["accuracy"] == report["accuracy"]
    rows = list(csv.DictReader(csv_out.open()))
    assert list(rows[0]) == ["row", "pred", "y", "p0", "p1", "p2", "p3"]
    np.testing.assert_array_equal([int(r["pred"]) for r in rows], pred)
    table = invoke("predict", str(run), str(runs["root"] / "eval.npz"))
    assert table.exit_code == 0 and "accuracy" in table.stdout and "predicted" in table.stdout


def test_predict_reads_a_folder_of_images(runs, tmp_path):
    split = runs["eval"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(split.x[i, :, :, 0], mode="L").save(folder / f"img{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "images.csv"
    report = json_of(
        invoke("predict", str(runs["root"] / "mlp"), str(folder), "-o", str(out), "--json", "-")
    )
    assert report["rows"] == 10 and report["accuracy"] is None
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [f"img{i:02d}.png" for i in range(10)]
    npz = tmp_path / "ten.npz"
    np.savez(npz, x=split.x[:10])
    ten = tmp_path / "ten_pred.npz"
    json_of(invoke("predict", str(runs["root"] / "mlp"), str(npz), "-o", str(ten), "--json", "-"))
    np.testing.assert_array_equal([int(r["pred"]) for r in rows], np.load(ten)["pred"])
    # An RGB image is converted to the model's single channel; a wrong size is refused.
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "rgb.png")
    assert (
        json_of(invoke("predict", str(runs["root"] / "mlp"), str(folder), "--json", "-"))["rows"]
        == 11
    )
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(folder / "big.png")
    assert_user_error(
        invoke("predict", str(runs["root"] / "mlp"), str(folder)),
        "big.png: the image is 5x4 (HxW); the model reads 4x4 images (input shape (4, 4, 1))",
    )


def test_predict_input_errors(runs, tmp_path):
    run = str(runs["root"] / "mlp")
    good = str(runs["root"] / "eval.npz")

    def predict(*args: str):
        return invoke("predict", *args)

    assert_user_error(predict(str(tmp_path / "nope"), good), "nope: does not exist")
    assert_user_error(predict(run, str(tmp_path / "none.npz")), "none.npz does not exist")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert_user_error(predict(run, str(tmp_path / "junk.npz")), "junk.npz is not a readable .npz")
    np.savez(tmp_path / "shape.npz", x=np.zeros((3, 5, 5, 1), np.uint8))
    assert_user_error(
        predict(run, str(tmp_path / "shape.npz")),
        "x has rows of shape (5, 5, 1), the model reads (4, 4, 1)",
    )
    np.savez(tmp_path / "nox.npz", inputs=np.zeros((3, 4, 4, 1), np.uint8))
    assert_user_error(predict(run, str(tmp_path / "nox.npz")), "has no array 'x' (it has inputs)")
    np.savez(tmp_path / "float.npz", x=np.zeros((3, 4, 4, 1), np.float32))
    assert_user_error(predict(run, str(tmp_path / "float.npz")), "trained on uint8 inputs")
    np.savez(tmp_path / "labels.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1, 9]))
    assert_user_error(
        predict(run, str(tmp_path / "labels.npz")), "labels 0..9; the model has classes 0..3"
    )
    assert_user_error(predict(run, good, "-o", str(tmp_path)), "--out", "name an .npz or a .csv")
    assert_user_error(
        predict(run, good, "-o", str(tmp_path / "no" / "p.npz")), "--out", "does not exist"
    )
    assert_user_error(predict(run, good, "--batch-size", "12"), "--batch-size 12:", "multiple of 8")
    assert_user_error(
        predict(str(runs["root"] / "gpt"), good), "on token sequences", "accelctl generate"
    )


# ----------------------------------------------------------------------------------- generate
@partial(jax.jit, static_argnames=("graphdef", "start", "steps"))
def _greedy_without_cache(state, buf, *, graphdef, start: int, steps: int):
    """Arg-max continuation by full forward passes over a fixed buffer (causal attention: the
    zeros after the current token change nothing before it)."""
    model = nnx.merge(graphdef, state)

    def body(i, buf):
        logits = model(buf, train=False)
        last = jax.lax.dynamic_index_in_dim(logits, start + i - 1, axis=1, keepdims=False)
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf, token[:, None], (0, start + i))

    return jax.lax.fori_loop(0, steps, body, buf)


def test_generate_greedy_equals_argmax_without_cache_on_8_and_1_devices(runs):
    run = runs["root"] / "gpt"
    report = json_of(
        invoke("generate", str(run), "--prompt", "hello", "--max-new-tokens", "8", "--json", "-")
    )
    assert report["byte_level"] and report["prompt_ids"] == list(b"hello")
    assert len(report["new_ids"]) == 8 and report["tokens_per_s"] > 0 and report["devices"] == 8
    assert report["text"] == bytes(report["new_ids"]).decode("utf-8", errors="replace")
    rw = restore_weights(run)
    graphdef, state = nnx.split(nnx.merge(rw.spec.graphdef, rw.params, rw.model_state))
    buf = np.zeros((1, 13), np.int32)
    buf[0, :5] = list(b"hello")
    want = np.asarray(_greedy_without_cache(state, buf, graphdef=graphdef, start=5, steps=8))
    assert report["new_ids"] == want[0, 5:].tolist()
    one = {"strategy": "dp", "mesh": {"data": -1, "model": 1}, "num_devices": 1}
    alone = generate_from_run(run, "hello", max_new_tokens=8, parallel=one)
    assert alone["devices"] == 1 and alone["new_ids"] == report["new_ids"]
    printed = invoke("generate", str(run), "-p", "hello", "-n", "8")
    assert printed.exit_code == 0 and printed.stdout == "hello" + report["text"] + "\n"


def test_generate_samples_deterministically_per_seed(runs):
    run = str(runs["root"] / "gpt")

    def sample(seed: str) -> list[int]:
        args = ("--temperature", "1.0", "--top-k", "20", "--seed", seed, "-n", "8", "--json", "-")
        return json_of(invoke("generate", run, "-p", "hi", *args))["new_ids"]

    first = sample("3")
    assert sample("3") == first
    assert sample("4") != first


def test_generate_input_errors(runs):
    run = str(runs["root"] / "gpt")
    assert_user_error(
        invoke("generate", run, "-p", "hello", "-n", "60"),
        "--max-new-tokens 60:",
        "exceed the model's max_len 64",
    )
    assert_user_error(invoke("generate", run, "-p", ""), "--prompt:", "at least one token")
    assert_user_error(invoke("generate", str(runs["root"] / "nope"), "-p", "a"), "does not exist")
    assert_user_error(
        invoke("generate", str(runs["root"] / "mlp"), "-p", "a"),
        "trained a mlp model; generation needs accelctl's transformer",
        "accelctl predict",
    )
    # Models over other vocabularies than the 256 bytes read space-separated token ids.
    np.testing.assert_array_equal(
        parse_prompt("3 17 4", byte_level=False, vocab_size=50), [3, 17, 4]
    )
    with pytest.raises(
        UserError, match=r"token ids must lie in 0..49 \(the model's vocabulary\); got 3..99"
    ) as e:
        parse_prompt("3 99", byte_level=False, vocab_size=50)
    assert e.value.param == "prompt"
    with pytest.raises(UserError, match="not text"):
        parse_prompt("hello", byte_level=False, vocab_size=50)
    with pytest.raises(UserError, match=r"bytes \[195, 169\]|bytes \[169, 195\]"):
        parse_prompt("é", byte_level=True, vocab_size=128)


def test_nothing_of_a_run_is_changed_by_using_it(runs, tmp_path):
    """export / predict / generate read a run; its folder stays as it was."""

    def files(folder: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    before = files(runs["root"] / "mlp")
    json_of(
        invoke(
            "export",
            str(runs["root"] / "mlp"),
            "-o",
            str(tmp_path / "w.safetensors"),
            "--json",
            "-",
        )
    )
    json_of(
        invoke("predict", str(runs["root"] / "mlp"), str(runs["root"] / "eval.npz"), "--json", "-")
    )
    assert files(runs["root"] / "mlp") == before
