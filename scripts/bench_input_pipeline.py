"""Input pipeline: host prefetch of float32 or of uint8 (normalised on device) vs device cache.

Each workload takes its model, optimizer, batch size, augmentation and normalisation from a
shipped config (configs/mnist_mlp.yaml, mnist_cnn.yaml, cifar10_resnet.yaml) and swaps the tfds
data for synthetic data of the same shape and size (MNIST: 60000 x 28x28x1, CIFAR-10: 50000 x
32x32x3), so it runs offline. Every measurement is one `accelctl train` process; the number is
its steady-state `train_samples_per_s` (after the first step, evaluation excluded). Modes run
alternately, `--repeats` times, and medians are reported.

    python scripts/bench_input_pipeline.py --repeats 3 --out docs/benchmarks/input_pipeline.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_overhead import report_header, train_summary, write_lines  # noqa: E402  (scripts/ is on sys.path)

from accelctl.bench import builtin_config  # noqa: E402

WORKLOADS = {
    "mnist_mlp": {"config": "mnist_mlp.yaml", "shape": [28, 28, 1], "n": 60000, "steps": 1500},
    "mnist_cnn": {"config": "mnist_cnn.yaml", "shape": [28, 28, 1], "n": 60000, "steps": 150},
    "cifar10_resnet": {
        "config": "cifar10_resnet.yaml",
        "shape": [32, 32, 3],
        "n": 50000,
        "steps": 30,
    },
}
MODES = {
    "host_f32": {"dtype": "float32", "cache": "host"},
    "host_u8": {"dtype": "uint8", "cache": "host"},
    "device": {"dtype": "uint8", "cache": "device"},
}


def make_config(name: str, mode: str, steps: int, log_every: int) -> dict:
    """Return the workload's shipped config with synthetic data fed the given way."""
    w = WORKLOADS[name]
    cfg = builtin_config(name, num_train=w["n"], dtype=MODES[mode]["dtype"]).to_dict()
    cfg["data"]["cache"] = MODES[mode]["cache"]
    cfg["train"] = {
        **{k: v for k, v in cfg["train"].items() if k not in ("epochs", "eval_every")},
        "steps": steps,
        "eval_every": steps,
        "log_every": log_every,
    }
    cfg["schedule"] = {**cfg.get("schedule", {}), "warmup_steps": 0}
    return cfg


def run_once(name: str, mode: str, steps: int, log_every: int) -> dict:
    config_yaml = yaml.safe_dump(make_config(name, mode, steps, log_every))
    s = train_summary(config_yaml, f"{name}_{mode}")
    assert s["data_cache"] == MODES[mode]["cache"], s["data_cache"]
    return {
        "samples_per_s": s["train_samples_per_s"],
        "input_wait": s["steady_input_wait_fraction"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale the step counts")
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = ap.parse_args()

    rows = []
    for name in args.workloads:
        steps = max(int(WORKLOADS[name]["steps"] * args.steps_scale), 10)
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for rep in range(args.repeats):
            for mode in MODES:
                r = run_once(name, mode, steps, args.log_every)
                runs[mode].append(r)
                print(
                    f"{name} rep {rep} {mode}: {r['samples_per_s']:.0f} samples/s, "
                    f"input wait {r['input_wait']:.1%}",
                    file=sys.stderr,
                    flush=True,
                )
        row = {"workload": name, "steps": steps, "runs": runs}
        for mode in MODES:
            row[mode] = statistics.median(r["samples_per_s"] for r in runs[mode])
            row[f"{mode}_wait"] = statistics.median(r["input_wait"] for r in runs[mode])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    if args.out:
        write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    lines = [
        *report_header("Input pipeline: host prefetch (float32 / uint8) vs device cache"),
        "Model, optimizer, batch, augmentation and normalisation from the named config; data "
        "synthetic of the data set's shape and size. host_f32: float32 batches cut on the host "
        "and prefetched (the usual hand-written pipeline); host_u8: uint8 batches prefetched, "
        "cast and normalised on device (4x fewer bytes); device: the uint8 split cached on the "
        "devices, batches gathered there (`data.cache: device`). samples/s is the steady-state "
        "`train_samples_per_s` of `accelctl train`; input wait is the fraction of steady time "
        f"the loop waited for its next input. Median of {args.repeats} alternating runs, each "
        "its own process.",
        "",
        "| workload | steps | host f32 samples/s | host u8 samples/s | device cache samples/s | "
        "host u8 / device | host f32 / device | input wait f32 / u8 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['steps']} | {r['host_f32']:.0f} | {r['host_u8']:.0f} | "
            f"{r['device']:.0f} | {r['host_u8'] / r['device']:.3f} | "
            f"{r['host_f32'] / r['device']:.3f} | {r['host_f32_wait']:.1%} / "
            f"{r['host_u8_wait']:.1%} |"
        )
    lines += ["", "Individual runs (samples/s):", ""]
    for r in rows:
        parts = []
        for m in MODES:
            values = ", ".join(f"{x['samples_per_s']:.0f}" for x in r["runs"][m])
            parts.append(f"{m} {values}")
        lines.append(f"- {r['workload']}: " + "; ".join(parts))
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
