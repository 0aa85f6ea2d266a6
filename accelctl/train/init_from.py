"""A fresh run's first state: the random initialisation, or saved weights (`model.init_from`).

`initial_state(job)` is what a fresh run starts from. Without `model.init_from` it is
`job.state.init()`. With it, the weights are read on the host (a file written by `accelctl
export`, a run's checkpoint, or GPT-2 in the Hugging Face layout), matched to the model by name
(`weights.unflatten_into`: strict by default, include/exclude patterns), and every problem is
reported in one error located at `model.init_from` before anything is compiled or written.

Placement: each loaded array goes straight to its final sharding
(`jax.make_array_from_callback`: under fsdp every device receives only its shard, and no device
ever holds the whole array), and one jitted function builds the train state around them with the
run's own `out_shardings`: the weights the source does not provide (excluded, or missing with
`strict: false`) come from the run's random initialisation (`StateSpec.init_fn`, traced inline;
XLA drops the initialisers of the loaded ones), and the optimizer state is initialised from the
loaded parameters. The loaded buffers are donated, so the state holds no second copy of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from accelctl import optim, weights, weights_hf
from accelctl.errors import UserError
from accelctl.train.job import Job
from accelctl.train.state import TrainState

FIELD = ("model", "init_from")
HF_FILE, HF_CONFIG = "model.safetensors", "config.json"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class _Fresh:
    """A leaf that the run's random initialisation fills (not loaded from the source)."""

    shape: tuple[int, ...]
    dtype: Any


def initial_state(job: Job, *, log_fn: Callable[[str], None] | None = None) -> TrainState:
    """The state a fresh run starts from: `job.state.init()`, or `model.init_from`'s weights.

    Args:
        job: the built job (its abstract state and shardings).
        log_fn: receives one line saying what was loaded from where (None: silent).
    Returns:
        The TrainState at step 0, every array with the run's sharding.
    Raises:
        ConfigError (exit 2), located at model.init_from: the source is missing or unreadable,
            or its weights do not fit the model (every missing, unexpected and wrongly-shaped
            array listed at once).
    """
    init = getattr(job.cfg.model, "init_from", None)
    if init is None:
        return job.state.init()
    try:
        flat, origin = read_weights(job)
        filled, report = weights.unflatten_into(
            _fresh_target(job),
            flat,
            include=init.include,
            exclude=init.exclude,
            strict=init.strict,
        )
    except UserError as e:
        raise job.cfg.error_at(FIELD, e.render()) from None
    del flat
    state = place(job, filled)
    if log_fn is not None:
        fresh = ""
        if report.kept:
            more = ", ..." if len(report.kept) > 6 else ""
            fresh = f" (freshly initialised: {', '.join(report.kept[:6])}{more})"
        log_fn(f"model.init_from: {report.summary()}{fresh} from {origin}")
    return state


# ---------------------------------------------------------------------------------- reading
def read_weights(job: Job) -> tuple[dict[str, np.ndarray], str]:
    """The host arrays of `model.init_from` by accelctl name, and where they came from.

    Raises:
        UserError: a missing path, a file of another format than `format` says, an unreadable
            or damaged file or checkpoint, GPT-2 weights for a model that is not GPT-2's.
    """
    init = job.cfg.model.init_from
    path, fmt = Path(init.path), init.format
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if fmt == "auto":
        fmt = _detect(path)
    if fmt == "checkpoint":
        return _read_checkpoint(path)
    if fmt == "hf_gpt2":
        return _read_hf_gpt2(job, path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; format {fmt} reads a file (or use format: auto)")
    actual = "npz" if _head(path) == _ZIP_MAGIC else "safetensors"
    if actual != fmt:
        raise UserError(f"{path} is not {fmt} but {actual}; set format: {actual} (or auto)")
    flat, meta = weights.load(path)
    if fmt == "safetensors" and init.format == "auto" and _is_hf_gpt2(flat):
        return _read_hf_gpt2(job, path, flat)
    return flat, _describe_file(path, meta)


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _detect(path: Path) -> str:
    if path.is_dir():
        hf = (path / HF_FILE).is_file() and (path / HF_CONFIG).is_file()
        return "hf_gpt2" if hf else "checkpoint"
    return "npz" if _head(path) == _ZIP_MAGIC else "safetensors"


def _is_hf_gpt2(flat: dict[str, Any]) -> bool:
    return "wte.weight" in flat or "transformer.wte.weight" in flat


def _describe_file(path: Path, meta: dict[str, str]) -> str:
    if "step" in meta and "checkpoint" in meta:
        return f"{path} (exported from {meta['checkpoint']}, step {meta['step']})"
    return str(path)


def _read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """A run's newest good checkpoint (or a step folder), restored split over every device
    (a partial restore: parameters and model state) and gathered to the host."""
    from accelctl.export import GATHER_PARALLEL, host_weights, restore_weights

    rw = restore_weights(path, parallel=GATHER_PARALLEL)
    params, model_state, _ = host_weights(rw)
    return {**params, **model_state}, f"checkpoint {rw.checkpoint} (step {rw.step})"


def _read_hf_gpt2(
    job: Job, path: Path, hf: dict[str, Any] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """GPT-2 weights in the HF layout (a model.safetensors, or a folder with it), checked
    against the model's architecture and, when a config.json lies beside them, its dims."""
    m = job.cfg.model
    if m.name != "transformer":
        raise UserError(
            f"GPT-2 weights (hf_gpt2) fit model.name: transformer; this model is {m.name}"
        )
    if m.positions != "learned" or not m.tie_embeddings:
        raise UserError(
            "GPT-2 weights (hf_gpt2) fit a transformer with positions: learned and "
            f"tie_embeddings: true; this one has positions: {m.positions}, tie_embeddings: "
            f"{str(m.tie_embeddings).lower()}"
        )
    file = path / HF_FILE if path.is_dir() else path
    if hf is None:
        if not file.is_file():
            raise UserError(f"{path} holds no {HF_FILE}")
        hf, _ = weights.load(file)
    config_file = file.parent / HF_CONFIG
    if config_file.is_file():
        _check_hf_dims(job, config_file)
    return weights_hf.from_hf_gpt2(hf), f"{file} (GPT-2, Hugging Face layout)"


def _check_hf_dims(job: Job, config_file: Path) -> None:
    """Raise UserError listing every dimension of a GPT-2 config.json that differs from the
    model's (the head count, which no array shape shows, included)."""
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {config_file}: {e}") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_file} is not a JSON object")
    dims = weights_hf.read_hf_gpt2_config(hf_config)
    m = job.cfg.model
    ours = {
        "vocab_size": job.dataset.num_classes,
        "max_len": m.max_len,
        "embed_dim": m.embed_dim,
        "num_layers": m.num_layers,
        "num_heads": m.num_heads,
        "mlp_dim": m.mlp_dim or 4 * m.embed_dim,
    }
    theirs = {**dims, "mlp_dim": dims["mlp_dim"] or 4 * int(dims["embed_dim"] or 0)}
    where = {"vocab_size": "data.vocab_size"}
    problems = [
        f"{key}: {theirs[key]} in {config_file.name}, {ours[key]} in the config "
        f"({where.get(key, 'model.' + key)})"
        for key in ours
        if theirs[key] != ours[key]
    ]
    if problems:
        raise UserError(
            f"the GPT-2 in {config_file.parent} has other dimensions than the model:\n  "
            + "\n  ".join(problems)
            + "\nSet the model's dimensions (and data.vocab_size) to the checkpoint's."
        )


# ---------------------------------------------------------------------------------- placing
def _fresh_target(job: Job) -> nnx.State:
    """The model's weights (parameters and model state together, by their module paths), each
    leaf a _Fresh marker: what `unflatten_into` does not fill stays a marker."""
    a = job.state.abstract
    return nnx.from_flat_state(
        [
            (path, var.replace(_Fresh(tuple(var.get_value().shape), var.get_value().dtype)))
            for part in (a.params, a.model_state)
            for path, var in nnx.to_flat_state(part)
        ]
    )


def _with_given(state: nnx.State, given: dict[tuple[Any, ...], jax.Array]) -> nnx.State:
    """`state` with the leaves at the paths of `given` replaced."""
    return nnx.from_flat_state(
        [
            (path, var.replace(given[tuple(path)]) if tuple(path) in given else var)
            for path, var in nnx.to_flat_state(state)
        ]
    )


def place(job: Job, filled: nnx.State) -> TrainState:
    """Place the loaded host arrays of `filled` with the run's shardings and build the train
    state around them (see the module docstring).

    Args:
        job: the built job.
        filled: from `unflatten_into(_fresh_target(job), ...)`: numpy arrays where loaded,
            _Fresh markers elsewhere.
    Returns:
        The TrainState at step 0 with `job.state.shardings`.
    """
    spec = job.state
    sharding_of = {
        tuple(path): var.get_value().sharding
        for part in (spec.abstract.params, spec.abstract.model_state)
        for path, var in nnx.to_flat_state(part)
    }
    paths, arrays = [], []
    for path, var in nnx.to_flat_state(filled):
        value = var.get_value()
        if not isinstance(value, np.ndarray):
            continue
        key = tuple(path)
        arrays.append(
            jax.make_array_from_callback(
                value.shape, sharding_of[key], lambda index, a=value: np.asarray(a[index])
            )
        )
        paths.append(key)
    opt = optim.build(job.cfg.optimizer, job.cfg.schedule, job.sizes.total_steps)

    def start(loaded: list[jax.Array]) -> TrainState:
        fresh = spec.init_fn()  # traced inline: only what is not loaded survives compilation
        given = dict(zip(paths, loaded, strict=True))
        params = _with_given(fresh.params, given)
        model_state = _with_given(fresh.model_state, given)
        return fresh.replace(
            params=params,
            model_state=model_state,
            opt_state=opt.tx.init(params),
            plateau=opt.plateau.init(params) if opt.plateau is not None else None,
        )

    shardings = [sharding_of[p] for p in paths]
    build = jax.jit(
        start, in_shardings=(shardings,), out_shardings=spec.shardings, donate_argnums=0
    )
    return build(arrays)
