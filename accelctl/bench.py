"""The timing harness behind `accelctl bench`: honest numbers for one training step.

For each workload (a config, at each batch size and precision asked for) it measures, in this
order and in one process:
- compile time of the train step, cold (a fresh persistent-cache folder) and warm (in-memory
  caches cleared, the executable loaded from that folder);
- the bare jitted step on one device-resident batch: per-step times with `block_until_ready`
  before the clock stops (median, p90), and the pipelined rate of many steps with one sync;
- FLOPs per step from XLA's cost analysis (`flops_per_step`, what the compiled program runs,
  recomputation included) and, for the transformer, the analytic model FLOPs
  (`model_flops_per_step`: 6 N tokens + causal attention, as PaLM and MaxText count them; see
  `models.transformer.training_flops`); achieved FLOP/s, and MFU against `devices.peak_flops`
  from the model FLOPs where there are some and XLA's otherwise (`mfu_flops` says which; None
  where no peak is known, e.g. on CPU);
- device memory from the compiled step's memory analysis (`plan.compiled_memory`), and which
  attention kernel the compiled step uses (cuDNN's fused one or XLA's);
- host-to-device bandwidth of the workload's batch;
- the real training loop (prefetch thread, host-fed batches) over the same number of steps:
  its samples/s, input-wait fraction, and its throughput relative to the bare step;
- with a profile folder: a jax.profiler trace of a repeat of the bare-step window (the timed
  window itself stays free of the profiler's overhead) and its most expensive device
  operations (`accelctl.profile`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from accelctl import config as config_mod
from accelctl.config import Config
from accelctl.errors import UserError
from accelctl.max_batch import find_max_batch
from accelctl.plan import compiled_memory

SCHEMA = "accelctl.bench/1"
LOOP_SECONDS = 2.0
# The built-in suite: shipped configs (accelctl/configs/), their tfds data swapped for synthetic
# data of the same shape (so it runs offline and measures the step, not a data set).
# The GPT workload's config already uses synthetic tokens; gpt_small is the GPU one.
BUILTIN = {
    "mnist_mlp": ("mnist_mlp", [28, 28, 1]),
    "mnist_cnn": ("mnist_cnn", [28, 28, 1]),
    "cifar10_resnet": ("cifar10_resnet", [32, 32, 3]),
    "gpt_tiny": ("gpt_tiny", None),
}

Workload = tuple[str, Config]


def builtin_config(name: str, *, num_train: int = 60000, dtype: str = "uint8") -> Config:
    """A built-in workload: the shipped config with synthetic data of the real set's shape.

    Args:
        name: a key of BUILTIN.
        num_train: synthetic training examples (the real set's size by default).
        dtype: uint8 (as tfds images arrive) or float32.
    """
    file, shape = BUILTIN[name]
    cfg = config_mod.load(file)
    if shape is None:
        return cfg
    kept = {
        k: v
        for k, v in cfg.to_dict()["data"].items()
        if k in ("augment", "mean", "std", "prefetch")
    }
    data = {
        "source": "synthetic",
        "shape": shape,
        "num_classes": 10,
        "num_train": num_train,
        "num_eval": 512,
        "dtype": dtype,
        **kept,
    }
    return config_mod.replace(cfg, {"data": data}, merge=False)


def _workload_config(cfg: Config, *, batch: int | None, precision: str, steps: int) -> Config:
    batch = batch or cfg.train.batch_size
    data: dict[str, Any] = {"cache": "host"}  # the loop measurement is the host-fed pipeline
    synthetic_tokens = cfg.data.source == "tokens" and getattr(cfg.data, "kind", "") != "text"
    if cfg.data.source == "synthetic" or synthetic_tokens:
        # Enough examples for the steps without repeating an epoch too often; small to set up.
        have = getattr(cfg.data, "num_train", None) or 60000
        data["num_train"] = min(int(have), max(batch * 16, 1024))
    # One evaluation at the end (excluded from the loop's rate) and one log read per interval.
    return config_mod.replace(
        cfg,
        {
            "train": {
                "batch_size": batch,
                "epochs": None,
                "steps": steps,
                "eval_every": steps,
                "log_every": max(steps // 4, 1),
            },
            "precision.compute": precision,
            "checkpoint": {"enabled": False},
            "data": data,
        },
    )


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _time_compile(job: Any) -> float:
    """Warm compile: drop the in-memory executables, lower again, load from the disk cache."""
    import jax

    jax.clear_caches()
    t0 = time.perf_counter()
    job.steps.train_jit.lower(job.state.abstract, job.feed.abstract_input).compile()
    return time.perf_counter() - t0


def _long_enough(steps: int, step_s: float) -> int:
    """At least `steps`, and enough steps of `step_s` to last about LOOP_SECONDS."""
    return int(min(max(steps, LOOP_SECONDS / max(step_s, 1e-6)), 20000))


def _bare_step(job: Any, batch: Any, *, steps: int, warmup: int) -> dict[str, float]:
    import jax

    from accelctl.train.loop import bound_in_flight

    state, train_step = job.state.init(), job.steps.train
    for _ in range(warmup):
        state, _ = train_step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, _ = train_step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    # Dispatched back to back with one sync at the end, in three windows of together about
    # LOOP_SECONDS (median of the three): the rate the training loop can at best reach.
    n = _long_enough(steps, statistics.median(times))
    windows = []
    for _ in range(3):
        in_flight: deque[Any] = deque()
        t0 = time.perf_counter()
        for _ in range(max(n // 3, 1)):
            state, out = train_step(state, batch)
            bound_in_flight(in_flight, out)  # as the training loop does
        jax.block_until_ready(state)
        windows.append((time.perf_counter() - t0) / max(n // 3, 1))
    pipelined = statistics.median(windows)
    return {
        "median": statistics.median(times),
        "p90": _percentile(times, 90),
        "min": min(times),
        "mean": statistics.fmean(times),
        "pipelined": pipelined,
        "pipelined_steps": n,
        "windows": windows,
    }


def _profile_bare(job: Any, batch: Any, *, steps: int, log_dir: Path) -> dict[str, Any]:
    """Trace `steps` bare steps, each synced as in the timed window, into `log_dir`.

    Returns:
        `accelctl.profile.summarize`'s dict (no input pipeline: input_wait_fraction None).
    """
    import jax

    from accelctl import profile

    state, train_step = job.state.init(), job.steps.train
    state, _ = train_step(state, batch)  # the first call's work stays out of the trace
    jax.block_until_ready(state)
    profile.start_trace(log_dir)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            state, _ = train_step(state, batch)
            jax.block_until_ready(state)
        wall = time.perf_counter() - t0
    finally:
        profile.stop_trace()
    return profile.summarize(log_dir, steps=(1, steps), wall_s=wall, input_wait_s=None)


def _h2d(job: Any, host_batch: dict[str, np.ndarray], repeats: int = 10) -> dict[str, float]:
    import jax

    nbytes = sum(int(v.nbytes) for v in host_batch.values())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(job.feed.put_fn(host_batch))
        times.append(time.perf_counter() - t0)
    return {"bytes": nbytes, "bytes_per_s": nbytes / statistics.median(times)}


def _memory(compiled: Any, device: Any) -> dict[str, int | None]:
    """The compiled step's memory per device, read as `accelctl plan` reads it, and the device's
    measured peak so far (`peak_bytes_in_use` of its memory stats; None where the backend keeps
    none, e.g. the CPU). The peak is the process's: JAX cannot reset it, so it is this
    workload's own only when the workload is the first (or only) one benchmarked."""
    out = compiled_memory(compiled, device)
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = {}
    peak = stats.get("peak_bytes_in_use")
    out["peak_bytes_in_use"] = int(peak) if peak is not None else None
    return out


def bench_workload(
    name: str, cfg: Config, *, steps: int, warmup: int, profile_dir: Path | None = None
) -> dict[str, Any]:
    """Measure one workload (see the module docstring). Returns one result row of the schema.

    Args:
        name, cfg: the workload.
        steps, warmup: timed and untimed steps.
        profile_dir: trace a repeat of the bare-step window into this folder (row field
            `profile`); None = no trace (the field is None).
    """
    from accelctl import data
    from accelctl.devices import peak_flops
    from accelctl.plan import attention_kernel, model_flops
    from accelctl.train import fit
    from accelctl.train.job import build_job

    job = build_job(cfg)  # compiles the train step: the cold compile (fresh cache folder)
    cold = job.steps.compile_time_s
    warm = _time_compile(job)
    batch_size = job.sizes.batch
    host_batch = next(
        data.train_batches(job.dataset.train, batch_size, seed=0, start_step=0, num_steps=1)
    )
    batch = job.feed.train_put_fn(host_batch)
    bare = _bare_step(job, batch, steps=steps, warmup=warmup)
    memory = _memory(job.steps.train, job.mesh.devices.flat[0])  # the peak of the bare steps
    traced = (
        _profile_bare(job, batch, steps=steps, log_dir=profile_dir)
        if profile_dir is not None
        else None
    )
    devices = int(job.mesh.devices.size)
    device = job.mesh.devices.flat[0]
    tokens = job.dataset.input_shape[0] if job.dataset.tokens else None
    per_device = float((job.steps.train.cost_analysis() or {}).get("flops", 0.0))
    flops = per_device * devices  # the partitioned program's count, times its copies
    flops_per_s = flops / bare["median"] if flops else None
    analytic = model_flops(cfg, job.dataset, batch_size)
    # MFU counts the model's FLOPs where they are known (recomputation under remat and XLA's
    # element-wise work are not useful FLOPs), XLA's count otherwise.
    mfu_flops = analytic or flops
    peak = peak_flops(device.device_kind, cfg.precision.compute)
    h2d = _h2d(job, host_batch)

    # The real loop on a fresh state (prefetch thread, host batches, metric reads), for at
    # least the timed steps and about LOOP_SECONDS, so tiny steps are not timed over a blink.
    n = warmup + bare["pipelined_steps"]
    loop = fit(
        build_job(
            config_mod.replace(
                cfg, {"train": {"steps": n, "eval_every": n, "log_every": max(n // 4, 1)}}
            )
        )
    )
    bare_rate = batch_size / bare["pipelined"]
    return {
        "workload": name,
        "batch_size": batch_size,
        "precision": cfg.precision.compute,
        "strategy": job.state.strategy,
        "devices": devices,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "num_params": job.state.num_params,
        "steps": steps,
        "warmup": warmup,
        "compile_s": {"cold": cold, "warm": warm},
        "step_time_s": {k: bare[k] for k in ("median", "p90", "min", "mean")},
        "samples_per_s": batch_size / bare["median"],
        # Language models: positions predicted per second (samples/s x sequence length).
        "tokens_per_s": batch_size * tokens / bare["median"] if tokens else None,
        "tokens_per_s_per_device": batch_size * tokens / bare["median"] / devices
        if tokens
        else None,
        "pipelined_samples_per_s": bare_rate,
        # The repeated windows behind that median: their spread is this machine's noise.
        "pipelined_windows_samples_per_s": [batch_size / w for w in bare["windows"]],
        "flops_per_step": flops or None,
        "model_flops_per_step": analytic,
        "flops_per_s": flops_per_s,
        "peak_flops_per_s": peak * devices if peak else None,
        "mfu": mfu_flops / bare["median"] / (peak * devices) if (peak and mfu_flops) else None,
        "mfu_flops": ("model" if analytic else "xla") if mfu_flops else None,
        "attention_kernel": attention_kernel(job.steps.train, cfg),
        "memory": memory,
        "h2d": h2d,
        "loop": {
            "steps": n,
            "samples_per_s": loop["train_samples_per_s"],
            "input_wait_fraction": loop["steady_input_wait_fraction"],
            "vs_bare_step": loop["train_samples_per_s"] / bare_rate,
        },
        "profile": traced,
    }


def find_max_batches(
    workloads: list[Workload], *, memory_limit: int | None = None
) -> dict[str, Any]:
    """`max_batch.find_max_batch` for every (name, config) workload (`bench --find-max-batch`)."""
    results = []
    for name, cfg in workloads:
        results.append({"workload": name, **find_max_batch(cfg, memory_limit=memory_limit)})
    return {"schema": SCHEMA, "find_max_batch": results}


def load_baseline(path: Path) -> dict[str, Any]:
    """Read a previous `bench --json` result to compare against.

    Raises:
        UserError (param "baseline"): unreadable, not JSON, or rows lacking what `compare` reads.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read it as JSON ({e})", param="baseline", value=path) from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise UserError(
            "not an `accelctl bench --json` result (no 'results' list)",
            param="baseline",
            value=path,
        )
    keys = ("workload", "batch_size", "precision", "devices", "samples_per_s")
    for i, row in enumerate(data["results"]):
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if not missing and not (
            isinstance(row["samples_per_s"], int | float) and row["samples_per_s"] > 0
        ):
            missing = ["a positive samples_per_s"]
        if missing:
            raise UserError(
                f"results[{i}] lacks {', '.join(missing)}; use a file written by "
                "`accelctl bench --json`",
                param="baseline",
                value=path,
            )
    return data


def _rate_and_noise(row: dict[str, Any]) -> tuple[float, float | None]:
    """A row's compared rate (the median of its pipelined windows when it has them, else of its
    synced steps) and its noise (the windows' spread over their median, percent), if known."""
    windows = row.get("pipelined_windows_samples_per_s")
    if isinstance(windows, list) and len(windows) > 1 and row.get("pipelined_samples_per_s"):
        median = float(row["pipelined_samples_per_s"])
        return median, 100.0 * (max(windows) - min(windows)) / median
    return float(row["samples_per_s"]), None


def compare(
    results: list[dict[str, Any]], baseline: dict[str, Any], tolerance_pct: float
) -> list[dict[str, Any]]:
    """Rows whose throughput fell more than `tolerance_pct` below the baseline's same row.

    Each side is the median of its repeated pipelined windows where both rows have them (else
    the median synced step), and each side's noise — how far its own windows spread — is
    stated, so a drop can be read against what this machine varies by anyway.
    Rows match on (workload, batch_size, precision, devices); rows without a match are skipped.
    """

    def key(r: dict[str, Any]) -> tuple:
        return (r["workload"], r["batch_size"], r["precision"], r["devices"])

    before = {key(r): r for r in baseline.get("results", [])}
    out = []
    for r in results:
        b = before.get(key(r))
        if b is None:
            continue
        now, noise_now = _rate_and_noise(r)
        then, noise_then = _rate_and_noise(b)
        if noise_now is None or noise_then is None:  # compare like with like
            now, then = float(r["samples_per_s"]), float(b["samples_per_s"])
        ratio = now / then
        noises = [n for n in (noise_now, noise_then) if n is not None]
        out.append(
            {
                "workload": r["workload"],
                "batch_size": r["batch_size"],
                "precision": r["precision"],
                "samples_per_s": now,
                "baseline_samples_per_s": then,
                "ratio": ratio,
                "drop_pct": 100.0 * (1.0 - ratio),
                "noise_pct": max(noises) if noises else None,
                "regressed": ratio < 1.0 - tolerance_pct / 100.0,
            }
        )
    return out


def run_bench(
    workloads: list[Workload],
    *,
    batch_sizes: list[int] | None = None,
    precisions: list[str] | None = None,
    steps: int = 50,
    warmup: int = 5,
    progress_fn: Any = None,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Benchmark every workload at every batch size and precision (the `bench` command).

    Args:
        workloads: (name, config) pairs; see `builtin_config`.
        batch_sizes: global batch sizes; None = each config's own.
        precisions: compute dtypes; None = ["fp32"].
        steps, warmup: timed steps and untimed warm-up steps.
        progress_fn: called with a line of text before each measurement.
        profile_dir: trace each row's bare-step window into
            `<profile_dir>/<workload>-b<batch>-<precision>/` (see `bench_workload`).
    Returns:
        {"schema", "machine", "jax_version", "cpu_devices", "compile_cache", "results": [row,
        ...]}.
    """
    import jax

    from accelctl import compile_cache
    from accelctl.devices import cpu_devices_report, describe_machine

    # A fresh cache folder: the first compile of each step is cold, the second one warm.
    cache_dir = Path(tempfile.mkdtemp(prefix="accelctl-bench-cache-"))
    compile_cache.enable(cache_dir)
    rows = []
    for name, base in workloads:
        for batch in batch_sizes or [None]:
            for precision in precisions or ["fp32"]:
                cfg = _workload_config(base, batch=batch, precision=precision, steps=warmup + steps)
                if progress_fn:
                    progress_fn(f"{name}: batch {cfg.train.batch_size}, {precision}")
                traced = (
                    profile_dir / f"{name}-b{cfg.train.batch_size}-{precision}"
                    if profile_dir is not None
                    else None
                )
                rows.append(
                    bench_workload(name, cfg, steps=steps, warmup=warmup, profile_dir=traced)
                )
    return {
        "schema": SCHEMA,
        "machine": describe_machine(),
        "jax_version": jax.__version__,
        "cpu_devices": cpu_devices_report(jax.default_backend()),
        "compile_cache": str(cache_dir),
        "results": rows,
    }
