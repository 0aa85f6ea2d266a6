"""Weights out of a run (`accelctl export`): a checkpoint's parameters and model state as one file.

`restore_weights` reads what inference needs from a run or checkpoint: the run's config (stored in
the checkpoint), its data described by shapes (nothing generated), the model's abstract state, and
the parameters and model state restored straight onto the devices with a partial restore (the
optimizer state is never read). `export` gathers them to the host (from every process when they
are split across processes), names them by their module paths (`accelctl.weights`) and writes one
safetensors or npz file, or GPT-2's Hugging Face layout with its config.json. The file carries the
run's resolved config, the step and `params_sha256` (for an fp32 export of the run's last
checkpoint, the `params_sha256` of its summary.json). Only process 0 writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelctl.errors import UserError

FORMATS = ("safetensors", "npz", "hf_gpt2")
# The mesh weights are restored onto for export and init_from: every device, each array split
# along its largest dimension that divides (any device count works; no device holds a replica).
GATHER_PARALLEL = {"strategy": "fsdp", "mesh": {"data": -1, "model": 1}, "num_devices": None}


@dataclass(frozen=True)
class RunWeights:
    """A run's parameters and model state, restored onto this process's devices.

    Attributes:
        cfg: the run's resolved config, from the checkpoint (parallel section as asked).
        dataset: the run's data as the model sees it (shapes; `plan.describe_data`).
        mesh: the devices the arrays live on.
        spec: the abstract state (graphdef, shardings) of the run's model on `mesh`.
        params: nnx.State of nnx.Param device arrays, with `spec.shardings.params`.
        model_state: nnx.State of the other model variables (e.g. BatchNorm statistics).
        step: the checkpoint's step.
        checkpoint: the checkpoint folder restored.
        notes: checkpoints skipped on the way (incomplete or unreadable ones).
    """

    cfg: Any
    dataset: Any
    mesh: Any
    spec: Any
    params: Any
    model_state: Any
    step: int
    checkpoint: Path
    notes: list[str] = field(default_factory=list)


def find_run(path: Path, step: int | None = None) -> tuple[Path, int | None]:
    """The checkpoints folder and step a user means by `path` (and `step`).

    Args:
        path: a run directory, its checkpoints/ folder or a step folder checkpoints/<step>.
        step: a step to pick (None: the step folder's, else the newest good checkpoint).
    Returns:
        (checkpoints folder, step or None).
    Raises:
        UserError: nothing checkpoint-like at `path`, or a step folder and another `step`.
    """
    from accelctl import checkpoint

    try:
        directory, found = checkpoint.find_checkpoint(path)
    except UserError as e:
        raise UserError(f"{path}: {e.message}") from None
    if step is not None and found is not None and step != found:
        raise UserError(
            f"{path} is the checkpoint of step {found}; name the run directory to pick another "
            "step, or leave the step out",
            param="step",
            value=step,
        )
    if step is not None and step not in checkpoint.complete_steps(directory):
        steps = ", ".join(map(str, checkpoint.complete_steps(directory))) or "none"
        raise UserError(
            f"{directory} has no complete checkpoint for step {step}; it has {steps}",
            param="step",
            value=step,
        )
    return directory, step if step is not None else found


def restore_weights(
    path: Path, *, step: int | None = None, parallel: dict[str, Any] | None = None
) -> RunWeights:
    """Restore the parameters and model state of a run's checkpoint onto the devices.

    Args:
        path: a run directory, its checkpoints/ folder (newest good checkpoint) or a step folder.
        step: restore this step (None: the step folder's, or the newest good one).
        parallel: a `parallel` config section to restore with instead of the run's own (e.g.
            GATHER_PARALLEL); None keeps the run's mesh and strategy.
    Returns:
        The RunWeights.
    Raises:
        UserError: no checkpoint at `path`, unreadable checkpoints, a config or data that can no
            longer be built (e.g. its data file was moved; located in the checkpoint's config).
    """
    from accelctl import checkpoint, config
    from accelctl import parallel as parallel_mod

    directory, step = find_run(Path(path), step)
    meta = checkpoint.read_meta(directory, step)
    where = f"{directory}/{meta.get('step', '?')}/meta:config"
    cfg = config.from_dict(meta["config"], where)
    if parallel is not None:
        cfg = config.replace(cfg, {"parallel": parallel}, merge=False)
    dataset = describe_run_data(cfg)
    mesh = parallel_mod.make_mesh(cfg)
    spec = make_weights_spec(cfg, dataset, mesh)
    restored = checkpoint.restore(directory, spec.eval_target(), step=step, partial=True)
    return RunWeights(
        cfg=cfg,
        dataset=dataset,
        mesh=mesh,
        spec=spec,
        params=restored.state["params"],
        model_state=restored.state["model_state"],
        step=restored.step,
        checkpoint=restored.path,
        notes=restored.notes,
    )


def describe_run_data(cfg: Any) -> Any:
    """A run's data set as its model sees it, generating nothing where the config says its
    shapes (`plan.describe_data`); files and loaders are opened on the host.

    Raises:
        ConfigError: the data cannot be opened any more (located at its field).
    """
    from accelctl.plan import describe_data

    return describe_data(cfg)[0]


def make_weights_spec(cfg: Any, dataset: Any, mesh: Any) -> Any:
    """The abstract train state of a run's model on `mesh` (nothing allocated, nothing
    compiled): its eval target is what a partial restore fills.

    Args:
        cfg: the run's config (model, precision, parallel.strategy, train.seed).
        dataset: its data set (shapes, classes, token inputs).
        mesh: the devices.
    Returns:
        `accelctl.train.state.StateSpec`.
    """
    from accelctl import optim
    from accelctl.train.job import make_model_fn
    from accelctl.train.state import make_state_spec

    # The schedule's length plays no part in the state's shapes.
    opt = optim.build(cfg.optimizer, cfg.schedule, 1)
    return make_state_spec(cfg, mesh, make_model_fn(cfg, dataset), opt)


def host_weights(rw: RunWeights) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The restored weights as host arrays by name (a collective with several processes).

    Returns:
        (params, model_state, params_sha256): {name: np.ndarray} of each, and the digest that a
        run's summary.json reports for the same arrays (`accelctl.train.state.digest`).
    """
    from accelctl import weights
    from accelctl.distributed import host_value
    from accelctl.train.state import digest

    params, model_state = host_value((rw.params, rw.model_state))
    sha = digest((params, model_state))
    return weights.flatten_state(params), weights.flatten_state(model_state), sha


def _check_request(out: Path, format: str, dtype: str) -> Path | None:  # noqa: A002
    """Refuse a bad format, dtype or output path before anything is read; return the path of
    the config.json an hf_gpt2 export writes beside `out`."""
    from accelctl import weights
    from accelctl.outputs import check_output_file

    if format not in FORMATS:
        raise UserError(f"use one of {', '.join(FORMATS)}", param="format", value=format)
    if dtype not in weights.DTYPES:
        raise UserError(f"use one of {', '.join(weights.DTYPES)}", param="dtype", value=dtype)
    check_output_file(out, param="out")
    if format != "hf_gpt2":
        return None
    config_json = out.parent / "config.json"
    if out.name == "config.json":
        raise UserError(
            "hf_gpt2 writes config.json beside the weights; name the weights file otherwise "
            "(model.safetensors, as Hugging Face does)",
            param="out",
            value=out,
        )
    check_output_file(config_json, param="out")
    return config_json


def _hf_gpt2(rw: RunWeights, flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF-named arrays, config.json) of a transformer run; UserError for other models."""
    from accelctl import weights_hf

    m = rw.cfg.model
    if m.name != "transformer":
        raise UserError(
            f"hf_gpt2 holds GPT-2 transformers; this run trained a {m.name} model. Export it as "
            "safetensors or npz",
            param="format",
            value="hf_gpt2",
        )
    try:
        hf = weights_hf.to_hf_gpt2(flat, m.num_layers)
    except UserError as e:
        raise UserError(e.message, param="format", value="hf_gpt2") from None
    hf_config = weights_hf.hf_gpt2_config(
        vocab_size=rw.dataset.num_classes,
        max_len=m.max_len,
        embed_dim=m.embed_dim,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
    )
    return hf, hf_config


def export(
    path: Path,
    out: Path,
    *,
    step: int | None = None,
    format: str | None = None,  # noqa: A002 - the word users know
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Write the weights of a run's checkpoint to one file with stable names and metadata.

    With several processes (jax.distributed), every process must call this: arrays split
    across processes are gathered, and process 0 writes.

    Args:
        path: a run directory, its checkpoints/ folder or a step folder checkpoints/<step>.
        out: the file to write (replaced if it exists); checked before anything is read.
        step: export this step (None: the step folder's, or the newest good checkpoint).
        format: safetensors, npz, or hf_gpt2 (GPT-2's Hugging Face names in a safetensors file,
            and config.json beside it; transformers with learned positions and tied embeddings).
            None: npz for an `out` ending in .npz, else safetensors.
        dtype: fp32 or bf16 (floating arrays converted; integer arrays never are).
    Returns:
        {"checkpoint", "step", "out", "format", "dtype", "arrays", "num_params", "bytes",
        "params_sha256", "config_json", "seconds", "notes"}; "bytes" is None on processes
        other than 0. The file's metadata: config (JSON), step, params_sha256, checkpoint,
        layout (accelctl or hf_gpt2), dtype, accelctl_version, and arrays_sha256.
    Raises:
        UserError: a bad format, dtype or output path (param out/format/dtype), no checkpoint
            at `path`, a model hf_gpt2 cannot hold.
    """
    import jax

    from accelctl import __version__, weights, weights_hf
    from accelctl.outputs import write_result

    t0 = time.perf_counter()
    out = Path(out)
    if format is None:
        format = "npz" if out.suffix.lower() == ".npz" else "safetensors"  # noqa: A001
    config_json = _check_request(out, format, dtype)
    rw = restore_weights(path, step=step, parallel=GATHER_PARALLEL)
    params, model_state, sha = host_weights(rw)
    flat, hf_config = {**params, **model_state}, None
    if format == "hf_gpt2":  # accelctl's transformer keeps no model state
        flat, hf_config = _hf_gpt2(rw, params)
    metadata = {
        "config": json.dumps(rw.cfg.to_dict(), sort_keys=True),
        "step": str(rw.step),
        "params_sha256": sha,
        "checkpoint": str(rw.checkpoint),
        "layout": "hf_gpt2" if format == "hf_gpt2" else "accelctl",
        "dtype": dtype,
        "accelctl_version": __version__,
    }
    size = None
    if jax.process_index() == 0:
        header = weights_hf.SAFETENSORS_HEADER if format == "hf_gpt2" else None
        file_format = "npz" if format == "npz" else "safetensors"
        weights.save(out, flat, metadata=metadata, format=file_format, dtype=dtype, header=header)
        if config_json is not None:
            write_result(config_json, json.dumps(hf_config, indent=2) + "\n", param="out")
        size = out.stat().st_size
    return {
        "checkpoint": str(rw.checkpoint),
        "step": rw.step,
        "out": str(out),
        "format": format,
        "dtype": dtype,
        "arrays": len(flat),
        "num_params": rw.spec.num_params,
        "bytes": size,
        "params_sha256": sha,
        "config_json": None if config_json is None else str(config_json),
        "seconds": time.perf_counter() - t0,
        "notes": rw.notes,
    }
