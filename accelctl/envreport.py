"""`accelctl env`: a paste-ready report of this machine's JAX setup — versions, the CUDA plugin
and libraries, backends and devices, relevant variables — and the common traps it shows."""

from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Any

from accelctl.devices import backends_initialised, cpu_model, memory_limit

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


def _cuda_plugin() -> tuple[str | None, dict[str, int]]:
    """The jax CUDA plugin that loads (jax_cuda13_plugin / jax_cuda12_plugin) and the CUDA
    library versions it reports (e.g. {"cuda_runtime": 13000, "cudnn": 91400, ...})."""
    for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"):
        try:
            versions = importlib.import_module(f"{name}._versions")
        except ImportError:
            continue
        out = {}
        for attr in sorted(dir(versions)):
            if not attr.endswith("_get_version"):
                continue
            try:
                out[attr[: -len("_get_version")]] = int(getattr(versions, attr)())
            except Exception:  # noqa: BLE001 - a library that cannot load is reported absent
                continue
        return name, out
    return None, {}


def _cuda_version(v: int) -> str:
    """CUDA's version code as text: 13000 -> "13.0", 12080 -> "12.8"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _cudnn_version(v: int) -> str:
    """cuDNN's version code as text: 91400 -> "9.14.0" (cuDNN 9: M*10000 + m*100 + p);
    8907 -> "8.9.7" (cuDNN 8: M*1000 + m*100 + p)."""
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def cuda_summary(
    plugin: str | None, libraries: dict[str, int], packages: dict[str, str]
) -> dict[str, Any]:
    """Which CUDA plugin loads and the versions of what it runs on, readable.

    Args:
        plugin: the plugin module (jax_cuda13_plugin / jax_cuda12_plugin), or None.
        libraries: the plugin's `_versions` codes (`cuda_libraries`).
        packages: installed package versions (`packages`).
    Returns:
        {"plugin", "plugin_version", "cuda", "driver", "cudnn", "nccl", "nccl_from"}; None where
        unknown. The plugin reports no NCCL version: it is the NVIDIA NCCL package's that the
        plugin's CUDA major needs (nvidia-nccl-cu13 / -cu12).
    """
    major = "13" if plugin == "jax_cuda13_plugin" else "12" if plugin else None
    nccl_pkg = f"nvidia-nccl-cu{major}" if major else None
    lib = libraries.get
    return {
        "plugin": plugin,
        "plugin_version": packages.get(f"jax-cuda{major}-plugin") if major else None,
        "cuda": _cuda_version(lib("cuda_runtime")) if lib("cuda_runtime") else None,
        "driver": _cuda_version(lib("cuda_driver")) if lib("cuda_driver") else None,
        "cudnn": _cudnn_version(lib("cudnn")) if lib("cudnn") else None,
        "nccl": packages.get(nccl_pkg) if nccl_pkg else None,
        "nccl_from": f"the {nccl_pkg} package" if nccl_pkg and nccl_pkg in packages else None,
    }


def env_report() -> dict[str, Any]:
    """Everything a bug report about devices needs: versions, backends, devices, variables, traps.

    Initialises every JAX backend that is installed (so call it in a process of its own when
    another one must own the GPU memory).

    Returns:
        {"python", "platform", "packages", "cuda_libraries", "backends_initialised_before",
        "default_backend", "backends": {name: {"devices", "kind", "memory_bytes"} or
        {"error"}}, "process_count", "process_index", "environment", "warnings": [str],
        "cuda": `cuda_summary`'s readable plugin, CUDA, driver, cuDNN and NCCL versions}.
    """
    import jax

    initialised_before = backends_initialised()
    packages = {name: v for name in PACKAGES if (v := _installed(name)) is not None}
    plugin, cuda_libs = _cuda_plugin()
    backends: dict[str, dict[str, Any]] = {}
    plugins = {"gpu": [p for p in packages if p.startswith("jax-cuda")], "tpu": ["libtpu"]}
    for name in PLATFORMS:
        if name in plugins and not any(p in packages for p in plugins[name]):
            hint = _install_hint("cuda13") if name == "gpu" else "pip install libtpu"
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
        "cuda_plugin": plugin,
        "cuda_libraries": cuda_libs,
        "cuda": cuda_summary(plugin, cuda_libs, packages),
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
    if report.get("cuda_plugin"):
        c = report.get("cuda") or {}
        parts = [
            f"CUDA {c['cuda']}" if c.get("cuda") else None,
            f"driver {c['driver']}" if c.get("driver") else None,
            f"cuDNN {c['cudnn']}" if c.get("cudnn") else None,
            f"NCCL {c['nccl']} ({c['nccl_from']})" if c.get("nccl") else "NCCL not found",
        ]
        version = f" {c['plugin_version']}" if c.get("plugin_version") else ""
        lines.append(
            f"cuda plugin: {report['cuda_plugin']}{version}: " + ", ".join(p for p in parts if p)
        )
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


def _install_hint(extra: str) -> str:
    """How to add an extra, for the way accelctl was installed (a checkout or a wheel)."""
    from accelctl.installation import pip_install_hint

    return pip_install_hint(extra)
