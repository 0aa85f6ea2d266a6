"""Use a trained run: class predictions for a classifier (`accelctl predict`), and text or token
continuations from a transformer (`accelctl generate`).

Both restore the run's parameters and model state alone (`export.restore_weights`: a partial
restore onto the run's own mesh and strategy). `predict` feeds its input as evaluation feeds the
eval split: batches from `data.eval_batches` (the last one padded), placed by the same put
function (split along the `data` axis over every device), through a jitted forward pass that
scales the inputs exactly as the train and eval steps do (`train.step._forward`: uint8 values
times the data's x_scale, then data.mean/std). Its class of a row is the arg-max of the logits,
as eval's accuracy counts it.
"""

from __future__ import annotations

import csv
import io
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accelctl.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OUT_SUFFIXES = (".npz", ".csv")
_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> Pillow mode


@dataclass(frozen=True)
class Inputs:
    """Rows to predict: x (N, *input_shape) in the training data's dtype, labels y (N,) or
    None, and the image file of each row (an image folder) or None."""

    x: np.ndarray
    y: np.ndarray | None
    files: list[str] | None


# ------------------------------------------------------------------------------------- inputs
def read_inputs(
    path: Path,
    *,
    input_shape: tuple[int, ...],
    x_dtype: np.dtype[Any],
    num_classes: int,
    x_key: str = "x",
    y_key: str = "y",
) -> Inputs:
    """Read an .npz of inputs (labels optional) or a folder of PNG/JPEG images.

    Args:
        path: the .npz file or the image folder.
        input_shape: one example as the model reads it, e.g. (28, 28, 1).
        x_dtype: the training inputs' host dtype: integer inputs (e.g. uint8 pixels) are scaled
            on the device as the training data was, so the rows must be integers too.
        num_classes: labels must lie in 0..num_classes - 1.
        x_key, y_key: the npz members of inputs and labels (the run's data.x_key / y_key).
    Returns:
        Inputs, x cast to `x_dtype`.
    Raises:
        UserError: a missing or malformed input, shapes or dtypes that differ from the training
            data's (naming the file and both shapes), labels out of range.
    """
    if not path.exists():
        raise UserError(f"{path} does not exist; give an .npz file or a folder of images")
    if path.is_dir():
        x, files = _read_images(path, input_shape, x_dtype)
        return Inputs(x, None, files)
    x, y = _read_npz(path, x_key, y_key)
    if x.shape[1:] != input_shape and x.shape[1:] + (1,) == input_shape:
        x = x[..., None]  # grayscale (N, H, W) for a model of (H, W, 1) images
    if x.shape[1:] != input_shape:
        raise UserError(
            f"{path}: {x_key} has rows of shape {x.shape[1:]}, the model reads {input_shape} "
            f"(the training data's); give {x_key} of shape (N, {', '.join(map(str, input_shape))})"
        )
    x = _as_training_dtype(x, x_dtype, f"{path}: {x_key}")
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(
                f"{path}: {y_key} must be integer class labels of shape ({len(x)},); got "
                f"{y.dtype} of shape {y.shape}"
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise UserError(
                f"{path}: {y_key} holds labels {int(y.min())}..{int(y.max())}; the model has "
                f"classes 0..{num_classes - 1}"
            )
        y = y.astype(np.int32)
    return Inputs(x, y, None)


def _read_npz(path: Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if x_key not in z.files:
                raise UserError(
                    f"{path} has no array {x_key!r} (it has {', '.join(z.files) or 'none'}); "
                    "store the inputs under the key the run's data.x_key names"
                )
            x = np.asarray(z[x_key])
            y = np.asarray(z[y_key]) if y_key in z.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable .npz of arrays ({why})") from None
    if x.ndim == 0 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise UserError(f"{path}: {x_key} is {x.dtype} of shape {x.shape}, not rows of numbers")
    if len(x) == 0:
        raise UserError(f"{path}: {x_key} holds no rows")
    return x, y


def _as_training_dtype(x: np.ndarray, x_dtype: np.dtype[Any], what: str) -> np.ndarray:
    """x in the training inputs' dtype, refusing what would be scaled differently."""
    want = np.dtype(x_dtype)
    if np.issubdtype(want, np.integer):
        if not np.issubdtype(x.dtype, np.integer):
            raise UserError(
                f"{what} is {x.dtype}, but the run was trained on {want} inputs, which are "
                "scaled on the device (uint8 pixels by 1/255); give the raw integer values as the "
                "training data had them"
            )
        info = np.iinfo(want)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise UserError(
                f"{what} holds values {x.min()}..{x.max()}, outside {want} ({info.min}.."
                f"{info.max}) of the training data"
            )
    return x.astype(want, copy=False)


def _read_images(
    folder: Path, input_shape: tuple[int, ...], x_dtype: np.dtype[Any]
) -> tuple[np.ndarray, list[str]]:
    """Every PNG/JPEG of `folder` (sorted by name) as uint8 rows of `input_shape`."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UserError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    channels = 1 if len(input_shape) == 2 else (input_shape[-1] if len(input_shape) == 3 else 0)
    if channels not in _IMAGE_MODES:
        raise UserError(
            f"the model reads inputs of shape {input_shape}, not images (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4); give an .npz instead"
        )
    if np.dtype(x_dtype) != np.uint8:
        raise UserError(
            f"the run was trained on {np.dtype(x_dtype)} inputs, not uint8 pixels: images would "
            "not be scaled as its training data was; give an .npz of inputs like the training data"
        )
    h, w = input_shape[:2]
    rows = []
    for p in files:
        try:
            with Image.open(p) as img:
                if img.size != (w, h):
                    raise UserError(
                        f"{p}: the image is {img.size[1]}x{img.size[0]} (HxW); the model reads "
                        f"{h}x{w} images (input shape {input_shape}). Resize it first"
                    )
                arr = np.asarray(img.convert(_IMAGE_MODES[channels]), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"{p} is not a readable image ({e})") from None
        rows.append(arr.reshape(input_shape))
    return np.stack(rows), [p.name for p in files]


# ------------------------------------------------------------------------------------ predict
def _check_out(out: Path | None) -> None:
    from accelctl.outputs import check_output_file

    if out is None:
        return
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(
            "name an .npz or a .csv file (the suffix picks the format); got "
            f"{out.suffix or 'no suffix'}",
            param="out",
            value=out,
        )
    check_output_file(out, param="out")


def _probs_fn(rw: Any) -> Any:
    """jit((params, model_state, x) -> (pred (B,) int32, probs (B, C) float32)) for the run's
    classifier, inputs scaled as in training, batch split along `data`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from accelctl import parallel
    from accelctl.config.model import CustomModelConfig
    from accelctl.models import custom
    from accelctl.train.step import StepConfig, _forward

    spec, cfg, ds = rw.spec, rw.cfg, rw.dataset
    call_rngs = True
    if isinstance(cfg.model, CustomModelConfig):
        abstract = nnx.merge(spec.graphdef, spec.abstract.params, spec.abstract.model_state)
        call_rngs = custom.call_takes_rngs(abstract)
    sc = StepConfig(
        graphdef=spec.graphdef,
        optimizer=None,  # type: ignore[arg-type] - a forward pass updates nothing
        loss=cfg.train.loss,
        label_smoothing=0.0,
        x_scale=ds.x_scale,
        x_mean=cfg.data.mean,
        x_std=cfg.data.std,
        call_rngs=call_rngs,
    )

    def predict_step(params: Any, model_state: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = _forward(sc, params, model_state, x, train=False)
        logits = logits.astype(jnp.float32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.softmax(logits, axis=-1)

    batch = parallel.batch_sharding(rw.mesh)
    sh = spec.shardings
    return jax.jit(
        predict_step,
        in_shardings=(sh.params, sh.model_state, batch),
        out_shardings=(batch, batch),
    )


def run_predictions(rw: Any, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred (N,) int32, probs (N, C) float32) of every row of `x`, in order.

    Batches of `batch_size` rows (the last padded) split over the devices, as evaluation feeds
    its split; with several processes each reads its share and the results are gathered.
    """
    import jax

    from accelctl import data, parallel
    from accelctl.distributed import host_value

    step_fn = _probs_fn(rw)
    split = data.Split(x, np.zeros(len(x), np.int32))
    batches = data.eval_batches(
        split, batch_size, process_index=jax.process_index(), process_count=jax.process_count()
    )
    put = data.make_put_fn(parallel.batch_sharding(rw.mesh))
    preds, probs = [], []
    with data.Prefetcher(batches, put, depth=2, name="accelctl-predict") as it:
        for start, batch in zip(range(0, len(x), batch_size), it, strict=True):
            pred, prob = host_value(step_fn(rw.params, rw.model_state, batch["x"]))
            rows = min(batch_size, len(x) - start)  # the padding of the last batch is dropped
            preds.append(pred[:rows])
            probs.append(prob[:rows])
    return np.concatenate(preds), np.concatenate(probs)


def _write_predictions(out: Path, inputs: Inputs, pred: np.ndarray, probs: np.ndarray) -> None:
    """An .npz (pred, probs, y, files) or a .csv (one line per row), through a temporary file."""
    from accelctl.outputs import write_result

    if out.suffix.lower() == ".csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        head = ["row"] + (["file"] if inputs.files else []) + ["pred"]
        head += (["y"] if inputs.y is not None else []) + [f"p{c}" for c in range(probs.shape[1])]
        writer.writerow(head)
        for i in range(len(pred)):
            line: list[Any] = [i] + ([inputs.files[i]] if inputs.files else []) + [int(pred[i])]
            line += [int(inputs.y[i])] if inputs.y is not None else []
            writer.writerow(line + [f"{p:.6g}" for p in probs[i]])
        write_result(out, text.getvalue(), param="out")
        return
    arrays: dict[str, np.ndarray] = {"pred": pred, "probs": probs}
    if inputs.y is not None:
        arrays["y"] = inputs.y
    if inputs.files:
        arrays["files"] = np.array(inputs.files)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except OSError as e:
        from accelctl.errors import OutputError

        raise OutputError(
            f"could not write the predictions: {e.strerror or e}", param="out", value=out
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def predict(
    run: Path,
    inputs: Path,
    *,
    out: Path | None = None,
    batch_size: int | None = None,
    step: int | None = None,
    parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict the class of every row of an .npz or every image of a folder with a trained
    classifier.

    Args:
        run: a run directory, its checkpoints/ folder or a step folder.
        inputs: an .npz with the inputs under the run's data.x_key (labels under data.y_key
            optional), or a folder of PNG/JPEG images of exactly the model's input size.
        out: write the predictions here: .npz (pred, probs, y when given, files for images) or
            .csv (one line per row); checked before anything is read. None: no file.
        batch_size: rows per batch over all devices (default the run's eval batch size); a
            multiple of the data-axis devices.
        step: the checkpoint step (None: the newest good one).
        parallel: a `parallel` section to restore with instead of the run's own.
    Returns:
        {"checkpoint", "step", "rows", "classes" (rows per predicted class, 0..C-1),
        "accuracy" (None without labels), "out", "seconds", "rows_per_s", "devices", "notes"}.
    Raises:
        UserError: a token model (use generation), bad inputs, a bad batch size or output path.
    """
    import jax

    t0 = time.perf_counter()
    _check_out(out)
    from accelctl.export import restore_weights

    rw = restore_weights(run, step=step, parallel=parallel)
    ds, cfg = rw.dataset, rw.cfg
    if ds.tokens:
        raise UserError(
            f"{run} trained a {cfg.model.name} model on token sequences; predict classifies "
            "inputs. Continue token sequences with `accelctl generate` instead"
        )
    batch = batch_size or cfg.train.eval_batch_size or cfg.train.batch_size
    parts = rw.mesh.shape["data"] * jax.process_count()
    if batch % rw.mesh.shape["data"] or batch % jax.process_count():
        raise UserError(
            f"must divide over the {rw.mesh.shape['data']} devices of the data axis "
            f"({jax.process_count()} process(es)); use a multiple of {parts}",
            param="batch_size",
            value=batch,
        )
    rows = read_inputs(
        Path(inputs),
        input_shape=ds.input_shape,
        x_dtype=ds.train.x_dtype,
        num_classes=ds.num_classes,
        x_key=getattr(cfg.data, "x_key", "x"),
        y_key=getattr(cfg.data, "y_key", "y"),
    )
    t1 = time.perf_counter()
    pred, probs = run_predictions(rw, rows.x, batch)
    seconds = time.perf_counter() - t1
    if out is not None and jax.process_index() == 0:
        _write_predictions(Path(out), rows, pred, probs)
    accuracy = None if rows.y is None else float(np.mean(pred == rows.y)) if len(pred) else 0.0
    return {
        "checkpoint": str(rw.checkpoint),
        "step": rw.step,
        "rows": int(len(pred)),
        "classes": np.bincount(pred, minlength=ds.num_classes).tolist(),
        "accuracy": accuracy,
        "out": None if out is None else str(out),
        "seconds": time.perf_counter() - t0,
        "rows_per_s": len(pred) / max(seconds, 1e-12),
        "devices": int(rw.mesh.devices.size),
        "notes": rw.notes,
    }


# ----------------------------------------------------------------------------------- generate
def parse_prompt(prompt: str, *, byte_level: bool, vocab_size: int) -> np.ndarray:
    """Token ids (T,) of a prompt: its UTF-8 bytes for a byte-level model (vocabulary 256),
    else space-separated token ids.

    Raises:
        UserError (param prompt): empty, not ids, or ids/bytes outside the vocabulary.
    """
    from accelctl.generate import encode_text

    if byte_level:
        ids = encode_text(prompt, vocab_size)
    else:
        try:
            ids = np.array([int(t) for t in prompt.split()], np.int64)
        except ValueError:
            raise UserError(
                f"this model reads token ids 0..{vocab_size - 1}, not text (its vocabulary is "
                "not the 256 bytes); give them space-separated, e.g. '3 17 4'",
                param="prompt",
            ) from None
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise UserError(
                f"token ids must lie in 0..{vocab_size - 1} (the model's vocabulary); got "
                f"{int(ids.min())}..{int(ids.max())}",
                param="prompt",
            )
    if ids.size == 0:
        raise UserError("give at least one token to continue", param="prompt")
    return ids.astype(np.int32)


def generate_from_run(
    run: Path,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    step: int | None = None,
    parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Continue a prompt with a trained transformer, using its key/value cache.

    Args:
        run: a run directory, its checkpoints/ folder or a step folder of a transformer run.
        prompt: text for a byte-level model (vocabulary 256: `data.kind: text`, or 256 tokens),
            else space-separated token ids.
        max_new_tokens: tokens to generate (prompt + new tokens <= model.max_len).
        temperature: 0: greedy (arg-max); else the softmax temperature.
        top_k: sample among the k most likely tokens (None: all).
        seed: sampling seed (the same seed gives the same tokens).
        step: the checkpoint step (None: the newest good one).
        parallel: a `parallel` section to restore with instead of the run's own.
    Returns:
        {"checkpoint", "step", "byte_level", "prompt_ids", "new_ids", "text" (the new tokens
        decoded, byte-level models; else None), "tokens_per_s" (compile excluded),
        "compile_s", "seconds", "temperature", "top_k", "seed", "devices", "notes"}.
    Raises:
        UserError: not a transformer run, a bad prompt, too many tokens for max_len, a bad
            temperature or top_k.
    """
    from flax import nnx

    from accelctl.export import restore_weights
    from accelctl.generate import decode_text, generate

    rw = restore_weights(run, step=step, parallel=parallel)
    name = rw.cfg.model.name
    if name != "transformer":
        what = "the user's own model" if name == "custom" else f"a {name} model"
        hint = "" if rw.dataset.tokens else "; classify its inputs with `accelctl predict`"
        raise UserError(
            f"{run} trained {what}; generation needs accelctl's transformer model (its "
            f"key/value cache){hint}"
        )
    vocab = rw.dataset.num_classes
    byte_level = vocab == 256
    ids = parse_prompt(prompt, byte_level=byte_level, vocab_size=vocab)
    model = nnx.merge(rw.spec.graphdef, rw.params, rw.model_state)
    out, stats = generate(
        model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed
    )
    new = np.asarray(out[len(ids) :])
    return {
        "checkpoint": str(rw.checkpoint),
        "step": rw.step,
        "byte_level": byte_level,
        "prompt_ids": ids.tolist(),
        "new_ids": new.tolist(),
        "text": decode_text(new) if byte_level else None,
        "tokens_per_s": stats.tokens_per_s,
        "compile_s": stats.compile_s,
        "seconds": stats.prefill_s + stats.decode_s,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
        "devices": int(rw.mesh.devices.size),
        "notes": rw.notes,
    }
