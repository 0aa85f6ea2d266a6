"""`accelctl eval`: evaluate a saved checkpoint on the eval split of its (or a given) config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelctl import checkpoint, config
from accelctl.checkpoint import IncompatibleCheckpoint
from accelctl.config import Config
from accelctl.memory import stop_on_out_of_memory
from accelctl.train.resume import config_changes


def evaluate_checkpoint(
    path: Path, cfg: Config | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Restore a checkpoint and run the eval split through the eval step.

    Args:
        path: a run directory, its `checkpoints/` folder (newest good checkpoint) or a step
            folder `checkpoints/<step>`.
        cfg: the config to build model and data from; None = the one stored in the checkpoint
            (with `overrides` applied, e.g. `data.eval_split=test`).
        overrides: `--set` strings, only used when cfg is None.
    Returns:
        {"checkpoint", "step", "eval": {"loss", "accuracy", "count"}, "devices", "notes"}.
    Raises:
        UserError: nothing checkpoint-like at `path`, unreadable checkpoints, or a config whose
            model differs from the checkpoint's.
        OutOfMemory: the parameters or an eval batch do not fit the devices or the host
            (refused before allocating where the sizes say so, else when XLA or numpy fails).
    """
    from accelctl.train.job import build_job
    from accelctl.train.loop import evaluate

    directory, step = checkpoint.find_checkpoint(path)
    if cfg is None:
        meta = checkpoint.read_meta(directory, step)
        where = f"{directory}/{meta.get('step', '?')}/meta:config"
        cfg = config.from_dict(meta["config"], where, overrides)

    def same_model(meta: dict[str, Any], where: Path) -> None:
        _, refused = config_changes(meta["config"], cfg.to_dict())
        model = [line for line in refused if line.startswith("model.")]
        if model:
            raise IncompatibleCheckpoint(
                f"checkpoint {where} holds a different model than the config: "
                f"{'; '.join(model)}; leave out the config to use the checkpoint's own"
            )

    with stop_on_out_of_memory():
        # Nothing of the train state is allocated: only params and model state are restored.
        job = build_job(cfg, compile_train=False)
        restored = checkpoint.restore(
            directory, job.state.eval_target(), step=step, check_meta_fn=same_model, partial=True
        )
        metrics = evaluate(job, restored.state["params"], restored.state["model_state"])
    metrics.pop("_sums")
    return {
        "checkpoint": str(restored.path),
        "step": restored.step,
        "eval": metrics,
        "devices": int(job.mesh.devices.size),
        "notes": restored.notes,
    }
