"""Joining a multi-process job on JAX's own runtime (`jax.distributed`), before any JAX call.

A process learns its place from flags (`--coordinator HOST:PORT --num-processes N
--process-id I`), from ACCELCTL_COORDINATOR / ACCELCTL_NUM_PROCESSES / ACCELCTL_PROCESS_ID (what
`accelctl launch` sets), or from a cluster environment JAX detects itself (SLURM, Open MPI).
Collectives run over NCCL between GPUs and over gloo on the CPU backend.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from accelctl.errors import UserError

ENV_COORDINATOR = "ACCELCTL_COORDINATOR"
ENV_NUM_PROCESSES = "ACCELCTL_NUM_PROCESSES"
ENV_PROCESS_ID = "ACCELCTL_PROCESS_ID"
# Cluster environments jax.distributed.initialize() detects without arguments, by the variable
# that says how many tasks the job has.
CLUSTER_SIZE_VARS = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}
EXIT_NOT_JOINED = 2  # like any other bad input: nothing ran, nothing was written
JAX_DEADLINE_MARGIN_S = 30  # JAX's own join deadline, after ours


@dataclass(frozen=True)
class ProcessSpec:
    """Where this process sits in the job; all None = let JAX detect the cluster."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    source: str  # "flags", "environment" or the detected cluster's name


def _int_from(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not a whole number") from None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: dict[str, str] | None = None,
) -> ProcessSpec | None:
    """The process's place in a multi-process job, or None for a single-process run.

    Flags win over ACCELCTL_* variables, which win over a detected cluster (SLURM, Open MPI with
    more than one task).

    Raises:
        UserError: an incomplete or inconsistent set of flags/variables.
    """
    env = os.environ if environ is None else environ
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given):
        source = "flags"
    else:
        coordinator = env.get(ENV_COORDINATOR)
        n, i = env.get(ENV_NUM_PROCESSES), env.get(ENV_PROCESS_ID)
        num_processes = _int_from(n, ENV_NUM_PROCESSES) if n is not None else None
        process_id = _int_from(i, ENV_PROCESS_ID) if i is not None else None
        source = "environment"
    values = (coordinator, num_processes, process_id)
    if all(v is None for v in values):
        for cluster, var in CLUSTER_SIZE_VARS.items():
            if _int_from(env.get(var, "1"), var) > 1:
                return ProcessSpec(None, None, None, cluster)
        return None
    names = ("--coordinator", "--num-processes", "--process-id")
    if source == "environment":
        names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    missing = [name for name, v in zip(names, values, strict=True) if v is None]
    if missing:
        raise UserError(
            f"a multi-process run needs all of {', '.join(names)}; missing {', '.join(missing)}"
        )
    assert coordinator is not None and num_processes is not None and process_id is not None
    if ":" not in coordinator:
        raise UserError(f"{names[0]} {coordinator!r}: give HOST:PORT, e.g. 10.0.0.1:8476")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(
            f"{names[2]} {process_id} must be in 0..{num_processes - 1} ({names[1]} "
            f"{num_processes})"
        )
    return ProcessSpec(coordinator, num_processes, process_id, source)


def initialize(spec: ProcessSpec, *, timeout_s: int = 300, heartbeat_s: int = 100) -> None:
    """Join the job described by `spec`; must run before any JAX computation.

    Args:
        spec: from `resolve`.
        timeout_s: how long to wait for every process to reach the coordinator.
        heartbeat_s: a process silent this long (dead or hung) fails the others.
    Raises:
        UserError: backends already initialised, or the coordinator not reached in time.
    """
    import jax

    from accelctl.devices import backends_initialised

    if backends_initialised():
        raise UserError(
            "jax.distributed must be initialised before any JAX computation, but this process "
            "has already started JAX's backends"
        )
    # CPU collectives across processes; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"coordinator {spec.coordinator}" if spec.coordinator else f"{spec.source} job"
    me = (
        f"process {spec.process_id} of {spec.num_processes}"
        if spec.process_id is not None
        else "this process"
    )
    advice = (
        "Check that the coordinator process (process 0) is running, that HOST:PORT is reachable "
        "from here, and that every process was given the same --num-processes"
    )
    # When the coordinator cannot be reached, JAX's C++ client aborts the whole process (no
    # Python exception) once its own deadline passes. A watchdog with a shorter deadline says
    # what happened instead and exits with the bad-input code; nothing has been written yet.
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(timeout_s):
            sys.stderr.write(
                f"error: {me} could not join the {where} within {timeout_s} s "
                f"(--dist-timeout). {advice}.\n"
            )
            sys.stderr.flush()
            os._exit(EXIT_NOT_JOINED)

    threading.Thread(target=watchdog, name="accelctl-join-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            spec.coordinator,
            spec.num_processes,
            spec.process_id,
            initialization_timeout=timeout_s + JAX_DEADLINE_MARGIN_S,
            heartbeat_timeout_seconds=heartbeat_s,
        )
    except Exception as e:  # noqa: BLE001 - XLA raises several types; all mean "not joined"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{me} could not join the {where}: {first}. {advice}") from None
    finally:
        joined.set()


def host_value(tree: Any) -> Any:
    """Copy a pytree of jax.Arrays to host numpy arrays, on any number of processes.

    Fully replicated or fully addressable arrays are read directly; arrays sharded across
    processes (fsdp) are gathered from every process first (a collective: every process must
    call this at the same point).
    """
    import jax
    from jax.experimental import multihost_utils

    def get(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a collective when multi-process)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
    return bool(np.asarray(flags).any())
