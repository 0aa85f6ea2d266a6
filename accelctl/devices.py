"""Device and machine discovery shared by benchmarks and reports; peak FLOP/s per device kind."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


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
        raise UserError(f"--cpu-devices {n}: give a count of at least 1")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise UserError(
            f"--cpu-devices {n}: JAX's backends are already initialised in this process; set "
            "the CPU device count before any JAX computation (e.g. JAX_NUM_CPU_DEVICES)"
        ) from None


# Dense peak FLOP/s per device (no structured sparsity), from the vendors' datasheets. "fp32"
# is the TF32 tensor-core rate on NVIDIA GPUs from Ampere on, because XLA's default matmul
# precision lets float32 matmuls use TF32 there; V100 has no TF32 (plain FP32). Matched in
# order, by substring of `device.device_kind`, case-insensitive.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("h100 nvl", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.5e12}),
    ("h100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),  # SXM (HBM3)
    ("h200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),
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


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` in `dtype`, or None when unknown
    (every CPU: there is no honest single number for it)."""
    kind = device_kind.lower()
    for pattern, peaks in PEAK_FLOPS:
        if pattern in kind:
            return peaks.get(dtype)
    return None


def memory_limit(device: object) -> int | None:
    """Bytes of memory a device offers to XLA (`memory_stats()["bytes_limit"]`), None on CPU."""
    try:
        stats = device.memory_stats()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ------------------------------------------------------------------------------------ env report
ENV_PREFIXES = ("JAX_", "XLA_", "CUDA_", "NCCL_", "ACCELCTL_", "TPU_", "TFDS_")
ENV_NAMES = ("TF_FORCE_GPU_ALLOW_GROWTH", "TF_CPP_MIN_LOG_LEVEL", "LD_LIBRARY_PATH")
PACKAGES = (
    "accelctl",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "numpy",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "libtpu",
    "nvidia-cuda-runtime-cu12",
    "nvidia-cudnn-cu12",
    "nvidia-nccl-cu12",
    "nvidia-cuda-runtime",
    "nvidia-cudnn-cu13",
    "nvidia-nccl-cu13",
    "tensorflow",
    "tensorflow-cpu",
)
PLATFORMS = ("cpu", "gpu", "tpu")


def _installed(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cuda_libraries() -> dict[str, int]:
    """CUDA library versions as jaxlib's CUDA plugin reports them (empty without one)."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    if cuda_versions is None:
        return {}
    out = {}
    for name in ("cuda_runtime", "cuda_driver", "cudnn", "cublas", "cufft", "cusolver"):
        fn = getattr(cuda_versions, f"{name}_get_version", None)
        try:
            out[name] = int(fn()) if fn is not None else None
        except Exception:  # noqa: BLE001 - a library that is not loadable is reported as absent
            out[name] = None
    return {k: v for k, v in out.items() if v is not None}


def env_report() -> dict[str, Any]:
    """Everything a bug report about devices needs: versions, backends, devices, variables, traps.

    Initialises every JAX backend that is installed (so call it in a process of its own when
    another one must own the GPU memory).

    Returns:
        {"python", "platform", "packages", "cuda_libraries", "backends_initialised_before",
        "default_backend", "backends": {name: {"devices", "kind", "memory_bytes"} or
        {"error"}}, "process_count", "process_index", "environment", "warnings": [str]}.
    """
    import jax
    from jax._src import xla_bridge

    initialised_before = bool(xla_bridge.backends_are_initialized())
    packages = {name: v for name in PACKAGES if (v := _installed(name)) is not None}
    backends: dict[str, dict[str, Any]] = {}
    plugins = {"gpu": [p for p in packages if p.startswith("jax-cuda")], "tpu": ["libtpu"]}
    for name in PLATFORMS:
        if name in plugins and not any(p in packages for p in plugins[name]):
            hint = "pip install -e '.[cuda12]'" if name == "gpu" else "pip install libtpu"
            backends[name] = {"error": f"no jax plugin installed ({hint})"}
            continue
        try:
            devs = jax.devices(name)
        except RuntimeError as e:  # not installed or no device: say which
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            backends[name] = {"error": message}
            continue
        backends[name] = {
            "devices": len(devs),
            "kind": devs[0].device_kind,
            "memory_bytes": memory_limit(devs[0]),
        }
    env = {
        k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES
    }
    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores visible",
        "packages": packages,
        "cuda_libraries": _cuda_libraries(),
        "backends_initialised_before": initialised_before,
        "default_backend": jax.default_backend(),
        "backends": backends,
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "environment": env,
    }
    report["warnings"] = env_warnings(report)
    return report


def env_warnings(report: dict[str, Any]) -> list[str]:
    """The common traps visible in an env report, each with what to do about it."""
    out = []
    pkgs, env, backends = report["packages"], report["environment"], report["backends"]
    gpu_jax = [p for p in pkgs if p.startswith("jax-cuda")]
    has_gpu = "devices" in backends.get("gpu", {})
    if gpu_jax and not has_gpu:
        why = backends.get("gpu", {}).get("error", "")
        out.append(
            f"GPU jax is installed ({', '.join(gpu_jax)}) but no GPU is visible ({why}); check "
            "the driver (nvidia-smi), CUDA_VISIBLE_DEVICES and JAX_PLATFORMS"
        )
    if env.get("JAX_PLATFORMS") and has_gpu is False and gpu_jax:
        out.append(f"JAX_PLATFORMS={env['JAX_PLATFORMS']} restricts jax to those backends")
    if report["backends_initialised_before"]:
        out.append(
            "JAX's backends were already initialised before this report: flags set afterwards "
            "(XLA_FLAGS, jax_num_cpu_devices, memory settings) have no effect in this process"
        )
    if "tensorflow" in pkgs and has_gpu:
        out.append(
            "the GPU build of TensorFlow is installed beside GPU jax: importing it (tfds "
            "preparation does) can grab GPU memory; install tensorflow-cpu instead, or set "
            "TF_FORCE_GPU_ALLOW_GROWTH=true"
        )
    if has_gpu and "XLA_PYTHON_CLIENT_PREALLOCATE" not in env:
        out.append(
            "JAX preallocates 75% of each GPU's memory at start-up (XLA_PYTHON_CLIENT_PREALLOCATE "
            "is unset): other processes on the same GPU will run out of memory; set it to false "
            "or lower XLA_PYTHON_CLIENT_MEM_FRACTION to share a GPU"
        )
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags and has_gpu:
        out.append(
            "XLA_FLAGS sets --xla_force_host_platform_device_count: it only splits the CPU "
            "backend, not the GPUs"
        )
    return out


def format_env_report(report: dict[str, Any]) -> str:
    """The report as paste-ready plain text."""
    lines = [
        f"python {report['python']} on {report['platform']}",
        f"cpu: {report['cpu']}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in report["packages"].items()),
    ]
    if report["cuda_libraries"]:
        libs = ", ".join(f"{k} {v}" for k, v in report["cuda_libraries"].items())
        lines.append(f"cuda libraries: {libs}")
    lines.append(f"default backend: {report['default_backend']}")
    for name, b in report["backends"].items():
        if "error" in b:
            lines.append(f"  {name}: not available ({b['error']})")
        else:
            mem = f", {b['memory_bytes'] / 2**30:.1f} GiB each" if b["memory_bytes"] else ""
            lines.append(f"  {name}: {b['devices']} x {b['kind']}{mem}")
    lines.append(f"processes: {report['process_count']} (this is {report['process_index']})")
    lines.append("environment:" + ("" if report["environment"] else " (no JAX/XLA/CUDA variables)"))
    lines += [f"  {k}={v}" for k, v in report["environment"].items()]
    lines += [f"warning: {w}" for w in report["warnings"]] or ["warnings: none"]
    return "\n".join(lines)
