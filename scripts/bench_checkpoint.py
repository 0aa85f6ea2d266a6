"""What checkpointing costs a training run: none vs async vs synchronous orbax writes.

Each workload takes model, optimizer and batch from a shipped config and trains on synthetic
data of the data set's shape (offline), writing a checkpoint every `--every` steps. Every
measurement is one `accelctl train` process; modes run alternately, `--repeats` times, and
medians are reported: wall time of the run, steady-state samples/s (checkpoint waits excluded),
and how long the loop was blocked per checkpoint (`checkpoint_time_s / checkpoints_saved`).

    python scripts/bench_checkpoint.py --repeats 3 --out docs/benchmarks/checkpoint.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_input_pipeline import make_config  # noqa: E402  (scripts/ on sys.path)
from bench_overhead import report_header, train_summary, write_lines  # noqa: E402

MODES = {
    "none": {"enabled": False},
    "async": {"enabled": True, "async": True},
    "sync": {"enabled": True, "async": False},
}


def run_once(name: str, mode: str, steps: int, every: int) -> dict:
    cfg = make_config(name, "device", steps, log_every=50)
    cfg["checkpoint"] = {**MODES[mode], "every_steps": every, "every_epochs": None, "keep": 2}
    s = train_summary(yaml.safe_dump(cfg), f"{name}-{mode}")
    saves = s["checkpoints_saved"]
    return {
        "wall_s": s["wall_time_s"],
        "samples_per_s": s["train_samples_per_s"],
        "block_s": s["checkpoint_time_s"] / saves if saves else 0.0,
        "saves": saves,
        "params": s["num_params"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["mnist_cnn", "cifar10_resnet"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = ap.parse_args()
    rows = []
    for name in args.workloads:
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for rep in range(args.repeats):
            for mode in MODES:
                r = run_once(name, mode, args.steps, args.every)
                runs[mode].append(r)
                print(f"{name} rep {rep} {mode}: {r}", file=sys.stderr, flush=True)
        med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
        rows.append((name, med))
    if args.out:
        write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list) -> None:
    lines = [
        *report_header("Checkpoint cost: none vs async vs synchronous writes"),
        f"{args.steps} steps, a checkpoint every {args.every} steps (plus the last step), the "
        "split cached on the device, synthetic data of the data set's shape. wall: the whole "
        "run (compile, evaluation and checkpoints included); samples/s: steady state with "
        "evaluation and checkpoint waits excluded; blocked/ckpt: what the loop waited per "
        "checkpoint (async: the copy off the devices; sync: the whole write). Medians of "
        f"{args.repeats} alternating runs, each its own process.",
        "",
        "| workload | params | mode | checkpoints | wall s | samples/s | blocked ms/ckpt |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, med in rows:
        for mode, r in med.items():
            lines.append(
                f"| {name} | {r['params']:.0f} | {mode} | {r['saves']:.0f} | {r['wall_s']:.2f} | "
                f"{r['samples_per_s']:.0f} | {r['block_s'] * 1000:.1f} |"
            )
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
