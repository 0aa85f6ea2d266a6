"""Parallel strategies and precisions side by side, each measured by `accelctl bench`.

Every (workload, strategy, precision) runs `accelctl bench CONFIG --json -` in its own process,
so device counts and compile caches do not leak between measurements. Workloads are the built-in
suite's (`accelctl.bench.BUILTIN`) or config files; tp uses the mesh {data: N/2, model: 2}.

    python scripts/bench_strategies.py --cpu-devices 8 --workloads mnist_mlp gpt_tiny \
        --out docs/benchmarks/strategies.md                        # CPU, 8 host devices
    python scripts/bench_strategies.py --strategies dp --precisions fp32 bf16 \
        --workloads mnist_cnn cifar10_resnet configs/gpt_small.yaml --out ...   # one GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_overhead import report_header, write_lines  # noqa: E402  (scripts/ is on sys.path)

from accelctl import compare, config  # noqa: E402
from accelctl.bench import BUILTIN, builtin_config  # noqa: E402
from accelctl.config import Config  # noqa: E402

STRATEGIES = ("dp", "fsdp", "tp", "pmap")


def workload_config(name: str) -> Config:
    """A built-in workload's config, or a config file's."""
    if name in BUILTIN:
        return builtin_config(name)
    return config.load(name)


def measure(name: str, strategy: str, precision: str, args: argparse.Namespace) -> dict:
    """One `accelctl bench` process (compare.measure); its result row, or {"error": ...}."""
    dset = {
        "platform": "cpu" if args.cpu_devices else None,
        "devices": args.cpu_devices,
        "strategy": strategy,
        "model": 2 if strategy == "tp" else 1,
    }
    cfg = workload_config(name)
    return compare.measure(
        cfg, dset, steps=args.steps, warmup=args.warmup, timeout=3600, precision=precision
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mnist_mlp", "gpt_tiny"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--precisions", nargs="+", default=["fp32"])
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON.")
    parser.add_argument("--out", type=Path, default=None, help="Markdown report.")
    args = parser.parse_args()
    if args.cpu_devices:  # so the report's machine line shows the devices the children use
        from accelctl.devices import set_cpu_devices

        set_cpu_devices(args.cpu_devices)

    rows = []
    for name in args.workloads:
        for precision in args.precisions:
            for strategy in args.strategies:
                print(f"{name} {strategy} {precision}", file=sys.stderr, flush=True)
                row = measure(name, strategy, precision, args)
                rows.append(
                    {"name": Path(name).stem, "strategy": strategy, "precision": precision, **row}
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    lines = table(rows)
    print("\n".join(lines))
    if args.out:
        write_lines(args.out, report_header("Parallel strategies and precisions") + lines)


def table(rows: list[dict]) -> list[str]:
    """Markdown table of the rows, with each workload's speed relative to its first row."""
    head = (
        "| workload | strategy | precision | devices | samples/s | tokens/s | vs first row "
        "| step ms p50 | compile s (cold) | memory MB/device | MFU |"
    )
    lines = [head, "|" + " --- |" * 11]
    first: dict[str, float] = {}
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['name']} | {r['strategy']} | {r['precision']} | failed: "
                f"{r['error']} |" + " |" * 7
            )
            continue
        base = first.setdefault(r["name"], r["samples_per_s"])
        tokens = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        lines.append(
            f"| {r['name']} | {r['strategy']} | {r['precision']} | {r['devices']} "
            f"| {r['samples_per_s']:.0f} | {tokens} | {r['samples_per_s'] / base:.2f}x "
            f"| {r['step_time_s']['median'] * 1e3:.2f} | {r['compile_s']['cold']:.2f} "
            f"| {r['memory']['total_bytes'] / 1e6:.1f} | {mfu} |"
        )
    return lines


if __name__ == "__main__":
    main()
