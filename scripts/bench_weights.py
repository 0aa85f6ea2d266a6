"""Weights in and out at GPT-2 small scale: `accelctl export` and `model.init_from` timed.

The model is configs/gpt_small.yaml's transformer (124M parameters; vocabulary 50257, 1024
positions) with random weights: the train state is initialised (`StateSpec.init`, no data is
generated: the data set is described by its shapes) and written as a checkpoint (not timed as
part of an export). Then, `--repeats` times each, in this one process:

- export fp32 / bf16: `accelctl.export.export(run, FILE)`, everything `accelctl export` does:
  read the config, describe the model, restore parameters and model state from the checkpoint
  (partial restore), gather them to the host, name them, write the safetensors file.
- restore + gather: the first part of an export: config, model, partial restore, host copies
  by name and the parameters' digest (params_sha256).
- write only: `weights.save` of the host arrays already named (the file part of the export,
  with the digest of what it writes).
- init_from fp32 / bf16: `init_from.initial_state(job)` for a job whose `model.init_from` is
  that file: read and check the file, match the names, place every array with the run's
  sharding, build the train state (optimizer state from the loaded parameters).

Each time is wall clock with the result ready (`block_until_ready` for the state), the median
and the fastest of the repeats are reported. The file is read back from the page cache (it was
just written): the times are CPU and memory bound, not disk bound.

    python scripts/bench_weights.py --out docs/benchmarks/weights.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelctl import config, weights  # noqa: E402
from accelctl.checkpoint import Checkpointer  # noqa: E402
from accelctl.devices import describe_machine  # noqa: E402
from accelctl.export import export, host_weights, restore_weights  # noqa: E402
from accelctl.plan import describe_data  # noqa: E402
from accelctl.train.init_from import initial_state  # noqa: E402
from accelctl.train.job import build_job  # noqa: E402


def report_header(title: str) -> list[str]:
    """Title, the exact command, machine and date (as every benchmark report starts)."""
    cmd = "python scripts/" + Path(sys.argv[0]).name + " " + " ".join(sys.argv[1:])
    return [
        f"# {title}",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {describe_machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
    ]


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall seconds of `repeats` calls of fn (its result made ready), and the last result."""
    seconds, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - t0)
    return seconds, out


def make_checkpoint(cfg: config.Config, run: Path) -> tuple[Any, float]:
    """A run directory holding one checkpoint (step 0) of a randomly initialised state."""
    job = build_job(cfg, compile_train=False, dataset=describe_data(cfg)[0])
    t0 = time.perf_counter()
    state = jax.block_until_ready(job.state.init())
    init_s = time.perf_counter() - t0
    (run / "checkpoints").mkdir(parents=True)
    ckpt = Checkpointer(
        run / "checkpoints", cfg.checkpoint, steps_per_epoch=1, total_steps=job.sizes.total_steps
    )
    ckpt.save(0, state, {"step": 0, "config": cfg.to_dict()})
    ckpt.close()
    return job, init_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "accelctl" / "configs" / "gpt_small.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = ap.parse_args()

    base = config.load(args.config)
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        job, init_s = make_checkpoint(base, run)
        n = job.state.num_params
        print(f"{n:,} parameters; random init {init_s:.2f} s", flush=True)
        sizes: dict[str, int] = {}
        results: dict[str, list[float]] = {}
        for dtype in ("fp32", "bf16"):
            file = Path(tmp) / f"w-{dtype}.safetensors"
            results[f"export {dtype}"], _ = timed(
                lambda f=file, d=dtype: export(run, f, dtype=d), args.repeats
            )
            sizes[dtype] = file.stat().st_size
        results["restore + gather"], (params, model_state, _) = timed(
            lambda: host_weights(restore_weights(run)), args.repeats
        )
        flat = {**params, **model_state}
        plain = Path(tmp) / "plain.safetensors"
        results["write only (fp32)"], _ = timed(
            lambda f=flat: weights.save(plain, f, metadata={}), args.repeats
        )
        del params, model_state, flat
        for dtype in ("fp32", "bf16"):
            file = Path(tmp) / f"w-{dtype}.safetensors"
            cfg = config.replace(base, {"model.init_from": str(file)})
            job = build_job(cfg, compile_train=False, dataset=describe_data(cfg)[0])
            results[f"init_from {dtype}"], state = timed(
                lambda j=job: initial_state(j), args.repeats
            )
            del state
        for name, secs in results.items():
            med = statistics.median(secs)
            gb = sizes["bf16" if "bf16" in name else "fp32"] / 1e9
            rows.append(f"| {name} | {med:.2f} | {min(secs):.2f} | {gb / med:.2f} |")
            print(rows[-1], flush=True)
    m = base.model
    lines = report_header("Weights in and out: export and init_from at GPT-2 small scale")
    lines += [
        f"Model: `{args.config.relative_to(ROOT)}`'s transformer ({m.num_layers} layers, width "
        f"{m.embed_dim}, vocab {base.data.vocab_size}, max_len {m.max_len}): {n:,} parameters, "
        f"random weights (initialising the train state took {init_s:.2f} s). Files: fp32 "
        f"{sizes['fp32'] / 1e6:.0f} MB, bf16 {sizes['bf16'] / 1e6:.0f} MB (safetensors). "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), strategy "
        f"{base.parallel.strategy}. Seconds of wall clock per operation, median and fastest "
        f"of {args.repeats}; GB/s = file size / median. See the script's docstring for what each "
        "row includes.",
        "",
        "| operation | s (median) | s (fastest) | file GB/s |",
        "| --- | --- | --- | --- |",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
