"""`accelctl launch`: N local `accelctl train` processes joined through `jax.distributed`.

Process i gets ACCELCTL_COORDINATOR (a free loopback port), ACCELCTL_NUM_PROCESSES and
ACCELCTL_PROCESS_ID, and either K host CPU devices (`--cpu-devices K`, gloo collectives) or K GPUs
of its own (CUDA_VISIBLE_DEVICES, NCCL). Their output is streamed line by line with a `[i]`
prefix. When one exits with an error the others are stopped (SIGTERM, then SIGKILL after a
grace period) and launch exits with the failed process's code; a signal to launch is passed on
to every process (they agree on a step, checkpoint and exit 75).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from accelctl.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from accelctl.errors import Preempted, UserError

GRACE_S = 10.0
PREEMPTED = Preempted.exit_code
# Set for the processes `accelctl launch` starts: they leave "how to continue" to launch.
ENV_LAUNCHED = "ACCELCTL_LAUNCHED"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exit_code(rc: int) -> int:
    """A shell-style exit code: 128 + N for a process killed by signal N."""
    return 128 - rc if rc < 0 else rc


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def choose_platform(platform: str) -> tuple[str, int]:
    """Resolve `--platform auto|cpu|gpu` to (cpu|gpu, visible GPUs), asking a child process
    (`devices.discover`) so this one never takes GPU memory.

    Raises:
        UserError: gpu asked for but none is visible.
    """
    if platform == "cpu":
        return "cpu", 0
    from accelctl.devices import discover

    gpus = discover().get("backends", {}).get("gpu", {}).get("devices", 0)
    if platform == "gpu" and not gpus:
        raise UserError("no GPU is visible (see `accelctl env`)", param="platform", value="gpu")
    return ("gpu" if gpus else "cpu"), gpus


def process_envs(
    num_processes: int, devices_per_process: int, platform: str, port: int, gpus: int = 0
) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, extra train arguments) of each process.

    Raises:
        UserError: more GPUs asked for than there are.
    """
    if platform == "gpu" and num_processes * devices_per_process > gpus:
        raise UserError(
            f"{num_processes} processes x {devices_per_process} GPUs each ({{num_processes}} x "
            f"{{devices_per_process}}) needs {num_processes * devices_per_process} GPUs; {gpus} "
            "are visible"
        )
    out = []
    for i in range(num_processes):
        env = dict(os.environ)
        env.update(
            {
                ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(i),
                ENV_LAUNCHED: "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if platform == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            extra = ["--cpu-devices", str(devices_per_process)]
        else:
            ids = range(i * devices_per_process, (i + 1) * devices_per_process)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
            extra = []
        out.append((env, extra))
    return out


# Lines the collective libraries print on every start, which say nothing to a user (gloo's
# connection log on the CPU backend; absl's note before its logging is set up).
_CHATTER = ("[Gloo] ", "WARNING: All log messages before absl::InitializeLog()")


def _stream(i: int, pipe: IO[str], out: IO[str], lock: threading.Lock) -> None:
    for line in pipe:
        if line.lstrip().startswith(_CHATTER):
            continue
        with lock:
            out.write(f"[{i}] {line}" if line.endswith("\n") else f"[{i}] {line}\n")
            out.flush()


def run_processes(
    train_args: Sequence[str],
    envs: list[tuple[dict[str, str], list[str]]],
    *,
    out: IO[str] = sys.stdout,
    grace_s: float = GRACE_S,
) -> int:
    """Start one `accelctl train` per (env, extra args), stream their output, supervise them.

    Returns:
        0 when all succeeded; else the exit code of the first process that failed.
    """
    lock = threading.Lock()
    procs: list[subprocess.Popen[str]] = []
    threads = []
    for i, (env, extra) in enumerate(envs):
        cmd = [sys.executable, "-m", "accelctl", "train", *train_args, *extra]
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        procs.append(p)
        assert p.stdout is not None
        t = threading.Thread(target=_stream, args=(i, p.stdout, out, lock), daemon=True)
        t.start()
        threads.append(t)
        with lock:
            out.write(f"[launch] process {i}: pid {p.pid}\n")
            out.flush()

    def say(text: str) -> None:
        with lock:
            out.write(f"[launch] {text}\n")
            out.flush()

    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    failed: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                rc = p.poll()
                # 75: this process was preempted and checkpointed; the others stop at the same
                # step on their own (they agree on it), so it is no failure to act on.
                if rc not in (None, 0, PREEMPTED) and failed is None and not forwarded:
                    failed = (i, rc)
                    others = [q for q in procs if q.poll() is None]
                    say(
                        f"process {i} (pid {p.pid}) {describe_exit(rc)}; stopping the other "
                        f"{len(others)} process(es)"
                    )
                    _stop(others, grace_s)
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in threads:
        t.join(timeout=5)
    if failed is not None:
        return exit_code(failed[1])
    codes = [exit_code(p.returncode) for p in procs]
    if codes and all(c == PREEMPTED for c in codes):
        return PREEMPTED  # the caller says how to continue
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        i, c = bad[0]
        say(f"process {i} {describe_exit(procs[i].returncode)}")
        return c
    return 0


def _stop(procs: list[subprocess.Popen[str]], grace_s: float) -> None:
    """SIGTERM, then SIGKILL whatever is still running after `grace_s`."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
