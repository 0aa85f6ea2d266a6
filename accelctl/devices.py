"""Devices: discovery (in a child process, or in this one), the host CPU device count (and the
`--cpu-devices auto` rule), memory limits, and the peak FLOP/s and memory bandwidth tables per
device kind. The `accelctl env` report is in envreport.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelctl.config import Config


def cpu_model() -> str:
    """Return the host CPU's model name (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """Return one line naming the CPU, core count, jax version and the visible devices."""
    import jax

    devs = jax.devices()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores visible; jax {jax.__version__}, "
        f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform})"
    )


def set_cpu_devices(n: int) -> None:
    """Split the host CPU into `n` XLA devices; must run before the first JAX computation.

    XLA:CPU runs each convolution on a single thread, so a conv net on a many-core host only
    uses all cores as several data-parallel CPU devices (docs/benchmarks/bench.md). Overrides
    `--xla_force_host_platform_device_count` in XLA_FLAGS. Other backends are unaffected.

    Raises:
        UserError: n < 1, or JAX's backends are already initialised in this process.
    """
    import jax

    from accelctl.errors import UserError

    if n < 1:
        raise UserError("give a count of at least 1", param="cpu_devices", value=n)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise UserError(
            "JAX's backends are already initialised in this process; set the CPU device count "
            "before any JAX computation (e.g. JAX_NUM_CPU_DEVICES)",
            param="cpu_devices",
            value=n,
        ) from None


# ----------------------------------------------------------------------- --cpu-devices auto
# The auto rule, from docs/benchmarks/bench.md (2 cores, 1 vs 2 host devices): XLA:CPU runs each
# convolution on one thread, so conv nets gain from one device per core (CNN 1.7-2.1x, ResNet-20
# 1.3x); an MLP's sub-millisecond step loses more to the per-step all-reduce than it gains (0.5x).
# Models are judged by their parameters: a 4-D (or 5-D) kernel is a 2-D (3-D) convolution's.
AUTO_MAX_DEVICES = 8
CONV_MODELS = ("cnn", "resnet")
XLA_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count[= ](\d+)")


@dataclass(frozen=True)
class CpuDevices:
    """How many XLA devices the host CPU is split into, and why (summary.json's cpu_devices).

    Attributes:
        count: the CPU device count (None: not known before JAX starts, e.g. an accelerator
            backend is the default and the CPU count is JAX's own).
        reason: one sentence saying why.
        apply: whether `apply_cpu_devices` must set it (False: JAX already takes it from
            XLA_FLAGS, JAX_NUM_CPU_DEVICES or this process's jax config, or leaves its default).
    """

    count: int | None
    reason: str
    apply: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "reason": self.reason}


_chosen: CpuDevices | None = None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def accelerator_plugins() -> list[str]:
    """The JAX accelerator plugins installed (found as JAX finds them: the `jax_plugins` entry
    points and namespace package, and libtpu), without importing or initialising any."""
    from importlib import metadata

    found = [ep.name for ep in metadata.entry_points(group="jax_plugins")]
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        import pkgutil

        found += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return sorted(set(found))


def preset_count(xla_flags: str, env: str | None, configured: int) -> CpuDevices | None:
    """A CPU device count the user set outside accelctl (kept as it is), or None.

    Args:
        xla_flags: the XLA_FLAGS variable.
        env: the JAX_NUM_CPU_DEVICES variable, or None.
        configured: `jax.config.jax_num_cpu_devices` (-1: not set).
    """
    m = XLA_DEVICE_COUNT.search(xla_flags)
    if env and configured > 0:
        return CpuDevices(configured, f"JAX_NUM_CPU_DEVICES={env} sets it")
    if configured > 0:
        return CpuDevices(configured, f"this process set jax_num_cpu_devices={configured}")
    if m:
        return CpuDevices(
            int(m.group(1)), f"XLA_FLAGS sets --xla_force_host_platform_device_count={m.group(1)}"
        )
    return None


def accelerator_default(platforms: str | None, plugins: list[str]) -> str | None:
    """Why the default backend is (or may be) an accelerator, known without starting JAX; None
    when it is the CPU.

    Args:
        platforms: JAX's `jax_platforms` setting (JAX_PLATFORMS), or None.
        plugins: `accelerator_plugins()`.
    """
    if platforms:
        first = platforms.split(",")[0].strip()
        return None if first == "cpu" else f"JAX_PLATFORMS={platforms} puts {first} first"
    if plugins:
        return (
            f"an accelerator plugin is installed ({', '.join(plugins)}), so the default backend "
            "is that accelerator where one is present; only a CPU-only JAX is split "
            "automatically (give a count to split the CPU anyway)"
        )
    return None


def choose_cpu_devices(
    requested: int | str, cfg: Config | None = None, *, multi_process: bool = False
) -> CpuDevices:
    """Decide the host CPU device count before JAX's backends start (`--cpu-devices`).

    A count given wins; then one set outside accelctl (XLA_FLAGS'
    `--xla_force_host_platform_device_count`, JAX_NUM_CPU_DEVICES, this process's jax config).
    "auto" applies only when the CPU is the default backend (JAX_PLATFORMS starts with cpu, or no
    accelerator plugin is installed: decided without starting any backend): a model with
    convolutions (cnn, resnet, or the user's NNX model with 4-D/5-D kernels, found by
    `jax.eval_shape`, which allocates and initialises nothing) gets one device per usable core
    (2 to AUTO_MAX_DEVICES), fewer where the batch does not divide; everything else 1.

    Args:
        requested: a count >= 1, or "auto".
        cfg: the config to train or the first to benchmark (auto reads its model and batch).
        multi_process: a multi-process job (auto leaves each process's CPU as JAX has it).
    Returns:
        The decision; `apply_cpu_devices` carries it out.
    Raises:
        UserError: a count below 1, or something other than a count or "auto".
    """
    from accelctl.errors import UserError

    if requested != "auto":
        try:
            n = int(requested)
        except (TypeError, ValueError):
            raise UserError(
                "give a count of at least 1, or auto", param="cpu_devices", value=requested
            ) from None
        if n < 1:
            raise UserError("give a count of at least 1, or auto", param="cpu_devices", value=n)
        return CpuDevices(n, f"asked for {n}", apply=True)
    import jax

    preset = preset_count(
        os.environ.get("XLA_FLAGS", ""),
        os.environ.get("JAX_NUM_CPU_DEVICES"),
        jax.config.jax_num_cpu_devices,
    )
    if preset is not None:
        return preset
    if backends_initialised():
        return CpuDevices(None, "JAX's backends were already started: the count is JAX's")
    accelerator = accelerator_default(jax.config.jax_platforms, accelerator_plugins())
    if accelerator is not None:
        return CpuDevices(None, accelerator)
    if multi_process:
        return CpuDevices(1, "a multi-process job: each process keeps one CPU device")
    if cfg is None:
        return CpuDevices(1, "no config to judge")
    return _auto_rule(cfg)


def choose_cpu_devices_for(requested: int | str, workloads: list[tuple[str, Config]]) -> CpuDevices:
    """`choose_cpu_devices` for several workloads measured in one process (`bench`): the count is
    process-wide, so auto splits the CPU only when every workload's rule agrees, else 1."""
    first = choose_cpu_devices(requested, workloads[0][1] if workloads else None)
    if requested != "auto" or not first.apply or len(workloads) < 2:
        return first
    each = [(name, _auto_rule(cfg)) for name, cfg in workloads]
    counts = {c.count for _, c in each}
    if len(counts) == 1:
        return first
    said = ", ".join(f"{name} {c.count}" for name, c in each)
    return CpuDevices(
        1,
        f"auto: the workloads prefer different counts ({said}) and one process has one count: "
        "one CPU device (benchmark them apart, or give a count)",
        apply=True,
    )


def _auto_rule(cfg: Config) -> CpuDevices:
    cores = min(usable_cores(), AUTO_MAX_DEVICES)
    conv, what = _has_convolutions(cfg)
    if not conv:
        return CpuDevices(
            1, f"auto: {what}; one CPU device (more only pay for convolutions)", apply=True
        )
    if cores < 2:
        return CpuDevices(1, f"auto: {what}, but only one core is usable", apply=True)
    par = cfg.parallel
    if par.num_devices is not None or par.mesh.model > 1:
        return CpuDevices(
            1, f"auto: {what}, but parallel.num_devices/mesh.model choose the devices", apply=True
        )
    batch = cfg.train.batch_size
    eval_batch = cfg.train.eval_batch_size or batch
    k = cfg.optimizer.accumulate_steps
    for n in range(cores, 1, -1):
        if batch % (k * n) == 0 and eval_batch % n == 0:
            fewer = "" if n == cores else f" (the batch does not divide over {cores})"
            return CpuDevices(
                n,
                f"auto: {what}; one CPU device per core, {n} of {usable_cores()}{fewer} (XLA:CPU "
                "runs each convolution on one thread)",
                apply=True,
            )
    return CpuDevices(
        1, f"auto: {what}, but batch {batch} does not divide over 2..{cores} devices", apply=True
    )


def _has_convolutions(cfg: Config) -> tuple[bool, str]:
    """Whether the model convolves, and what it is (for the reason)."""
    name = cfg.model.name
    if name in CONV_MODELS:
        return True, f"a {name} (convolutions)"
    if name != "custom":
        return False, f"a {name} (no convolutions)"
    try:
        shapes = _custom_param_shapes(cfg)
    except Exception as e:  # noqa: BLE001 - the job builder reports a broken model properly
        return False, f"the model {cfg.model.target} could not be inspected ({type(e).__name__})"
    if shapes is None:
        return False, f"the Linen model {cfg.model.target} (parameters known only on data)"
    if any(len(s) in (4, 5) for s in shapes):
        return True, f"the model {cfg.model.target} (convolution kernels)"
    return False, f"the model {cfg.model.target} (no convolution kernels)"


def _custom_param_shapes(cfg: Config) -> list[tuple[int, ...]] | None:
    """Parameter shapes of the user's model, built under `jax.eval_shape` (abstract: nothing
    allocated, no backend started); None for a Linen module without a data shape in the config
    (it is initialised on one example)."""
    import jax
    from flax import nnx

    from accelctl.models import custom

    user = custom.resolve(cfg.model)
    shape: tuple[int, ...] = ()
    if user.kind == "linen":
        d = cfg.data
        if d.source == "synthetic":
            shape = tuple(d.shape)
        elif d.source == "tokens" and getattr(d, "kind", "") == "synthetic":
            shape = (d.seq_len,)
        else:
            return None
    tokens = cfg.data.source == "tokens"

    def params() -> Any:
        with nnx.use_eager_sharding(False):
            model = custom.build(cfg.model, shape, rngs=nnx.Rngs(0), tokens=tokens)
        return nnx.state(model, nnx.Param)

    return [tuple(leaf.shape) for leaf in jax.tree.leaves(jax.eval_shape(params))]


def apply_cpu_devices(choice: CpuDevices) -> None:
    """Carry out a decision of `choose_cpu_devices` (before the first JAX computation) and keep
    it for the run's summary (`cpu_devices_report`).

    Raises:
        UserError: the count cannot be set any more (JAX's backends already started).
    """
    global _chosen
    if choice.apply and choice.count is not None:
        set_cpu_devices(choice.count)
    _chosen = choice


def cpu_devices_report(platform: str) -> dict[str, Any]:
    """summary.json's `cpu_devices`: {count, reason} for the run that just used `platform`.

    Args:
        platform: the run's platform (cpu, gpu, tpu).
    """
    import jax

    try:
        count: int | None = len(jax.devices("cpu"))
    except RuntimeError:  # JAX_PLATFORMS without cpu
        count = None
    if _chosen is None:
        reason = (
            "JAX's own setting (jax_num_cpu_devices, JAX_NUM_CPU_DEVICES or XLA_FLAGS; only the "
            "command line chooses a count)"
        )
    else:
        reason = _chosen.reason
    if platform != "cpu":
        reason = f"the run is on {platform}: the CPU count does not matter ({reason})"
    return {"count": count, "reason": reason}


# Dense peak FLOP/s per device (no structured sparsity), from the vendors' datasheets. "fp32"
# is the TF32 tensor-core rate on NVIDIA GPUs from Ampere on, because XLA's default matmul
# precision lets float32 matmuls use TF32 there; V100 has no TF32 (plain FP32). Matched in
# order, by substring of `device.device_kind`, case-insensitive. JAX's device_kind on NVIDIA GPUs
# is CUDA's device name, e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100
# NVL", "NVIDIA H200" (SXM), "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe".
_HOPPER_SXM = {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("h100 nvl", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.5e12}),
    ("h100", _HOPPER_SXM),  # SXM (HBM3)
    ("h200 nvl", {}),  # the PCIe H200 runs at a lower clock: no datasheet number recorded here
    ("gh200", _HOPPER_SXM),  # Grace Hopper: the SXM H100/H200 chip
    ("h200", _HOPPER_SXM),  # SXM: the H100 SXM's chip with HBM3e
    ("a100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("l40s", {"bf16": 362.05e12, "fp16": 362.05e12, "fp32": 183e12}),
    ("l40", {}),  # L40 (not S): no number recorded here
    ("l4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("a10g", {}),  # AWS's A10G differs from the A10: no number recorded here
    ("a10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    ("v100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("tpu v4", {"bf16": 275e12}),
    ("tpu v5 lite", {"bf16": 197e12}),
    ("tpu v5e", {"bf16": 197e12}),
    ("tpu v5p", {"bf16": 459e12}),
    ("tpu v5", {"bf16": 459e12}),  # v5p reports itself as "TPU v5"
    ("tpu v6", {"bf16": 918e12}),
)


# Peak memory (HBM / GDDR) bandwidth per device in bytes/s, from the vendors' datasheets; None
# where the device_kind string does not tell variants with different numbers apart. Matched in
# order, by substring of `device.device_kind`, case-insensitive; a kind matching nothing is
# unknown too (every CPU).
MEMORY_BANDWIDTH: tuple[tuple[str, float | None], ...] = (
    ("h100 pcie", 2.0e12),
    ("h100 nvl", 3.9e12),
    ("h100 80gb hbm3", 3.35e12),  # SXM5
    ("gh200", None),  # 96 GB HBM3 (4.0 TB/s) or 144 GB HBM3e (4.9 TB/s): not in the name
    ("h100", None),  # other H100 variants
    ("h200", 4.8e12),  # SXM and NVL alike
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100-sxm4-40gb", 1.555e12),
    ("a100-pcie-40gb", 1.555e12),
    ("a100", None),  # other A100 variants
    ("l40s", 864e9),
    ("l40", 864e9),
    ("l4", 300e9),
    ("a10g", None),  # AWS's A10G differs from the A10: no number recorded here
    ("a10", 600e9),
    ("v100s", 1134e9),
    ("v100", 900e9),  # SXM2 and PCIe, 16 and 32 GB
    ("tpu v4", 1.2e12),
    ("tpu v5 lite", 819e9),
    ("tpu v5e", 819e9),
    ("tpu v5p", 2.765e12),
    ("tpu v5", 2.765e12),  # v5p reports itself as "TPU v5"
    ("tpu v6", 1.64e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` in `dtype`, or None when unknown
    (every CPU: there is no honest single number for it)."""
    kind = device_kind.lower()
    for pattern, peaks in PEAK_FLOPS:
        if pattern in kind:
            return peaks.get(dtype)
    return None


def memory_bandwidth(device_kind: str) -> float | None:
    """Peak memory bandwidth of one device of `device_kind` in bytes/s, or None when unknown."""
    kind = device_kind.lower()
    for pattern, bandwidth in MEMORY_BANDWIDTH:
        if pattern in kind:
            return bandwidth
    return None


def memory_limit(device: object) -> int | None:
    """Bytes of memory a device offers to XLA (`memory_stats()["bytes_limit"]`), None on CPU."""
    try:
        stats = device.memory_stats()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def backends_initialised() -> bool:
    """Whether JAX's backends are already initialised in this process (flags set now would
    have no effect).

    A feature check through public API instead of jax's private bridge module: JAX refuses to
    change `jax_num_cpu_devices` once the backends exist (and accepts the unchanged value), so
    try another value and put the old one back.
    """
    import jax

    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", current + 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def discover(timeout: float = 300) -> dict[str, Any]:
    """The `accelctl env --json` report of a child process: backends, device counts and kinds,
    found without initialising (or taking the memory of) any accelerator in this process.

    Raises:
        UserError: the child failed or timed out.
    """
    from accelctl.errors import UserError

    cmd = [sys.executable, "-m", "accelctl", "env", "--json", "-"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"could not list the devices: `accelctl env` took over {timeout:.0f} s"
        ) from None
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        raise UserError(f"could not list the devices: {lines[-1] if lines else out.returncode}")
    return json.loads(out.stdout)
