"""PyTorch reference for `accelctl bench`: the built-in suite's models, trained the same way.

The same three workloads as `accelctl bench` with no config (shipped configs, synthetic data):
- mnist_mlp: 784 -> Dense 64 relu -> 10, Adam 1e-3;
- mnist_cnn: conv 3x3 32 -> max pool -> conv 3x3 64 -> max pool -> dense 128 (dropout 0.25) ->
  10, Adam 1e-3;
- cifar10_resnet: ResNet-20 (basic blocks 3-3-3, width 16, projection shortcuts, zero-init
  residual batch norm), SGD momentum 0.9 Nesterov, lr 0.1, L2 5e-4, with the same on-device
  random crop (4-pixel padding) + flip and per-channel normalisation as the accelctl config;
and the same measure: a uint8 batch already in memory, cast and scaled inside the step, warm-up
steps, then per-step times with a device sync before the clock stops; samples/s = batch /
median step time. Eager, and `torch.compile` where it works.

    pip install torch   # not an accelctl dependency
    python scripts/bench_torch.py --json torch.json [--accelctl bench.json --out report.md]
    python scripts/bench_torch.py --device cuda --matmul-precision high --json torch.json

`--device cuda` runs on the GPU (synchronising before each clock read). `--matmul-precision
high` lets float32 matmuls use TF32 tensor cores, as XLA's default precision does on NVIDIA GPUs
from Ampere on; PyTorch's own default is `highest` (plain FP32).

With `--accelctl` (an `accelctl bench --json` result from the same machine) the Markdown report
puts both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    sys.exit("scripts/bench_torch.py needs PyTorch: pip install torch")

WORKLOADS = {"mnist_mlp": (1, 28), "mnist_cnn": (1, 28), "cifar10_resnet": (3, 32)}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, momentum=0.1)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, momentum=0.1)
        nn.init.zeros_(self.bn2.weight)  # zero-init residual
        self.proj = None
        if stride != 1 or c_in != c:
            self.proj = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.proj(x) if self.proj is not None else x))


class ResNet20(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        blocks, c_in = [], 16
        for i, c in enumerate((16, 32, 64)):
            for j in range(3):
                blocks.append(BasicBlock(c_in, c, 2 if i > 0 and j == 0 else 1))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def make_model(name: str) -> nn.Module:
    if name == "mnist_mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    if name == "mnist_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Dropout(0.25),
            nn.Linear(128, 10),
        )  # fmt: skip
    return ResNet20()


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "cifar10_resnet":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return torch.optim.Adam(params, lr=1e-3)


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Per-example random crop of the zero-padded image and random horizontal flip (NCHW)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    j = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (i[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (j[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[bi, ci, rows, cols]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def make_step(name: str, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device):
    mean = torch.tensor(CIFAR_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(CIFAR_STD, device=device)[None, :, None, None]

    def step(x_u8: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x_u8.float() / 255.0
        if name == "cifar10_resnet":
            x = (augment(x) - mean) / std
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, mode: str, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    channels, size = WORKLOADS[name]
    model = make_model(name).to(device).train()
    opt = make_optimizer(name, model.parameters())
    step = make_step(name, model, opt, device)
    if mode == "compile":
        step = torch.compile(step)
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x, y)
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "workload": name,
        "mode": mode,
        "batch_size": batch,
        "step_time_median_s": median,
        "samples_per_s": batch / median,
        "warmup_s": first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--matmul-precision",
        choices=["highest", "high"],
        default="highest",
        help="torch.set_float32_matmul_precision: high = TF32 on NVIDIA GPUs (XLA's default)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--accelctl", type=Path, default=None, help="accelctl bench --json result")
    ap.add_argument("--out", type=Path, default=None, help="Markdown report (needs --accelctl)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("scripts/bench_torch.py --device cuda: PyTorch sees no CUDA device")
    rows = []
    for name in args.workloads:
        for mode in args.modes:
            try:
                r = bench(name, mode, args.batch_size, args.steps, args.warmup, device)
            except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a compiler
                r = {"workload": name, "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": name,
        "matmul_precision": args.matmul_precision,
        "results": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.out and args.accelctl:
        write_report(args, result, json.loads(args.accelctl.read_text()))


def write_report(args: argparse.Namespace, torch_result: dict, accel: dict) -> None:
    ours = {
        r["workload"]: r
        for r in accel["results"]
        if r["batch_size"] == args.batch_size and r.get("precision", "fp32") == "fp32"
    }
    lines = [
        "| workload | accelctl samples/s | PyTorch eager | PyTorch compile | "
        "accelctl / eager | accelctl / compile |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.workloads:
        a = ours.get(name, {}).get("samples_per_s")
        t = {r["mode"]: r for r in torch_result["results"] if r["workload"] == name}
        cells = []
        for mode in ("eager", "compile"):
            r = t.get(mode, {})
            cells.append(f"{r['samples_per_s']:.0f}" if "samples_per_s" in r else "failed")
        ratios = []
        for mode in ("eager", "compile"):
            r = t.get(mode, {})
            ratios.append(f"{a / r['samples_per_s']:.2f}x" if a and "samples_per_s" in r else "-")
        shown = f"{a:.0f}" if a else "-"
        lines.append(f"| {name} | {shown} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} |")
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
