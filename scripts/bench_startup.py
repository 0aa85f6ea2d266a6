"""Start-up: how long until accelctl does something, cold and warm.

Measures, each in a fresh process and median of `--repeats` rounds:
- `accelctl --help` (imports the CLI only: no jax);
- `accelctl train digits_mlp` for one step, with an empty persistent compilation cache (cold)
  and again with the cache it filled (warm): the process's wall time and its parts from
  summary.json (`time_s`: startup = interpreter + imports + config, setup = data + state,
  compile, train, eval, checkpoint, other).

    python scripts/bench_startup.py --repeats 3 --out docs/benchmarks/startup.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_overhead import report_header, write_lines  # noqa: E402


def _run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "accelctl", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return time.perf_counter() - t0, out.stdout


def first_step(cache: Path, run_dir: Path) -> dict:
    env = {
        **os.environ,
        "ACCELCTL_COMPILE_CACHE": str(cache),
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
    }
    wall, out = _run(
        [
            "train",
            "digits_mlp",
            "--run-dir",
            str(run_dir),
            "--set",
            "train.epochs=null",
            "--set",
            "train.steps=1",
            "--set",
            "train.eval_every=1",
            "--quiet",
            "--json",
            "-",
        ],
        env,
    )
    summary = json.loads(out)
    return {"wall": wall, **summary["time_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    helps, cold, warm = [], [], []
    for _ in range(args.repeats):
        helps.append(_run(["--help"], dict(os.environ))[0])
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            cold.append(first_step(cache, Path(tmp) / "a"))
            warm.append(first_step(cache, Path(tmp) / "b"))
    parts = ["wall", "startup", "setup", "compile", "train", "eval", "checkpoint", "other"]

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    lines = [
        *report_header("Start-up: time to the first step, cold and warm"),
        f"Median of {args.repeats} rounds, each command in its own process, 1 CPU device. "
        "`train` = `accelctl train digits_mlp --set train.epochs=null --set train.steps=1` "
        "(one step, one evaluation, one checkpoint); cold: an empty persistent compilation "
        "cache (`ACCELCTL_COMPILE_CACHE`), warm: the cache the cold run filled. The parts are "
        "summary.json's `time_s`.",
        "",
        f"`accelctl --help`: {statistics.median(helps):.2f} s",
        "",
        "| seconds | " + " | ".join(parts) + " |",
        "| --- | " + " | ".join("---" for _ in parts) + " |",
        "| cold | " + " | ".join(f"{med(cold, p):.2f}" for p in parts) + " |",
        "| warm | " + " | ".join(f"{med(warm, p):.2f}" for p in parts) + " |",
    ]
    print("\n".join(lines))
    if args.out:
        write_lines(args.out, lines)


if __name__ == "__main__":
    main()
