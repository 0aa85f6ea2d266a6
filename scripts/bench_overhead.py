"""Loop overhead: `accelctl train` vs a minimal hand-written `jax.jit` loop, same model and data.

Both train the same Flax NNX model with the same optax Adam on synthetic MNIST-shaped uint8 data
(28x28x1, normalised on device). The hand-written loop has every batch already on the device
before its clock starts; `accelctl train` feeds batches from the host through its prefetch thread,
logs every `--log-every` steps and evaluates at the end. Each measurement runs in its own
subprocess, alternating the two, and the medians are reported.

    python scripts/bench_overhead.py --repeats 3 --out docs/benchmarks/overhead.md

`--before DIR` also times `accelctl train` from another checkout (e.g. `git worktree add DIR
HEAD~1`), interleaved with this one in the same run: a before/after comparison of the loop.
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
sys.path.insert(0, str(ROOT))

from accelctl.devices import describe_machine  # noqa: E402

WORKLOADS = {
    # A step of a fraction of a millisecond: the loop's own host work shows here first.
    "tiny_mlp": {
        "model": {"name": "mlp", "hidden": [32], "activation": "relu"},
        "title": "MLP 784-32-10",
        "steps": 6000,
    },
    "mlp": {
        "model": {"name": "mlp", "hidden": [512, 512], "activation": "relu"},
        "title": "MLP 784-512-512-10",
        "steps": 1500,
    },
    "cnn": {
        "model": {
            "name": "cnn",
            "channels": [32, 64],
            "kernels": 3,
            "pool": "max",
            "dense": [256],
            "activation": "relu",
        },
        "title": "CNN conv32-conv64-dense256",
        "steps": 150,
    },
}


def config_text(name: str, steps: int, batch: int, log_every: int) -> str:
    w = WORKLOADS[name]
    cfg = {
        "model": w["model"],
        "data": {
            "source": "synthetic",
            "shape": [28, 28, 1],
            "num_classes": 10,
            "num_train": 60000,
            "num_eval": 1024,
            "dtype": "uint8",
            "cache": "host",  # this benchmark measures the host-fed loop
        },
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"batch_size": batch, "steps": steps, "log_every": log_every, "eval_every": steps},
    }
    return json.dumps(cfg)  # JSON is YAML


def report_header(title: str) -> list[str]:
    """The first lines of every benchmark report: title, the exact command, machine, date."""
    cmd = "python scripts/" + Path(sys.argv[0]).name + " " + " ".join(sys.argv[1:])
    return [
        f"# {title}",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {describe_machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
    ]


def write_lines(path: Path, lines: list[str]) -> None:
    """Write a report (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def train_summary(config_yaml: str, name: str, tree: Path | None = None) -> dict:
    """Run `accelctl train` on a config (YAML text) in its own process; return summary.json.

    `tree`: run the accelctl of that checkout instead of this one.
    """
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / f"{name}.yaml"
        cfg.write_text(config_yaml)
        out = subprocess.run(
            [sys.executable, "-m", "accelctl", "train", str(cfg), "--quiet", "--json", "-"]
            + ["--run-dir", str(Path(tmp) / "run")],
            capture_output=True,
            text=True,
            check=True,
            cwd=tree or ROOT,
            env=env,
        )
    return json.loads(out.stdout)


def run_accelctl(
    name: str, steps: int, batch: int, log_every: int, tree: Path | None = None
) -> dict:
    s = train_summary(config_text(name, steps, batch, log_every), f"bench_{name}", tree)
    return {
        "samples_per_s": s["train_samples_per_s"],
        "input_wait": s["input_wait_fraction"],
        "device_kind": s["device_kind"],
        "devices": s["devices"],
    }


def handwritten(name: str, steps: int, batch: int) -> dict:
    """The reference: what a careful user writes by hand, data pre-placed on the device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from accelctl import config, data, models

    cfg = config.load_text(config_text(name, steps, batch, 100))
    ds = data.build(cfg.data)
    model = models.build(cfg.model, ds.input_shape, 10, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            logits = m(x.astype(jnp.float32) / 255.0, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    n_batches = min(steps, len(ds.train) // batch)
    xs = [jax.device_put(ds.train.x[i * batch : (i + 1) * batch]) for i in range(n_batches)]
    ys = [jax.device_put(ds.train.y[i * batch : (i + 1) * batch]) for i in range(n_batches)]
    params, opt_state, loss = step(params, opt_state, xs[0], ys[0])  # compile + warm-up
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for i in range(1, steps):
        params, opt_state, loss = step(params, opt_state, xs[i % n_batches], ys[i % n_batches])
    jax.block_until_ready((params, loss))
    dt = time.perf_counter() - t0
    assert np.isfinite(float(loss))
    return {"samples_per_s": (steps - 1) * batch / dt}


def accelctl_step(name: str, steps: int, batch: int) -> dict:
    """accelctl's compiled train step alone, fed pre-placed batches like the hand-written loop.

    Separates the cost of the step itself from the cost of the host input pipeline.
    """
    import jax

    from accelctl import config, data
    from accelctl.train.job import build_job

    job = build_job(config.load_text(config_text(name, steps, batch, 100)))
    n_batches = min(steps, job.sizes.steps_per_epoch)
    host = data.train_batches(job.dataset.train, batch, seed=0, start_step=0, num_steps=n_batches)
    dev = [job.feed.put_fn(b) for b in host]
    train_step = job.steps.train
    state, _ = train_step(job.state.init(), dev[0])
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(1, steps):
        state, _ = train_step(state, dev[i % n_batches])
    jax.block_until_ready(state)
    return {"samples_per_s": (steps - 1) * batch / (time.perf_counter() - t0)}


def child(mode: str, name: str, steps: int, batch: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, f"--{mode}", name, "--steps", str(steps), "--batch", str(batch)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale the step counts")
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    ap.add_argument(
        "--before", type=Path, default=None, help="another checkout to time alongside this one"
    )
    ap.add_argument("--handwritten", help=argparse.SUPPRESS)  # child-process mode
    ap.add_argument("--accelctl-step", help=argparse.SUPPRESS)  # child-process mode
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.handwritten:
        print(json.dumps(handwritten(args.handwritten, args.steps, args.batch)))
        return
    if args.accelctl_step:
        print(json.dumps(accelctl_step(args.accelctl_step, args.steps, args.batch)))
        return

    rows = []
    for name in args.workloads:
        steps = max(int(WORKLOADS[name]["steps"] * args.steps_scale), 10)
        acc, ref, bare, waits, before = [], [], [], [], []
        for rep in range(args.repeats):
            # Before and after alternate which runs first, so a drift of the machine's speed
            # within a repetition does not favour one of them.
            if args.before is not None and rep % 2 == 0:
                before.append(
                    run_accelctl(name, steps, args.batch, args.log_every, args.before)[
                        "samples_per_s"
                    ]
                )
            a = run_accelctl(name, steps, args.batch, args.log_every)
            if args.before is not None and rep % 2 == 1:
                before.append(
                    run_accelctl(name, steps, args.batch, args.log_every, args.before)[
                        "samples_per_s"
                    ]
                )
            h = child("handwritten", name, steps, args.batch)
            b = child("accelctl-step", name, steps, args.batch)
            acc.append(a["samples_per_s"])
            ref.append(h["samples_per_s"])
            bare.append(b["samples_per_s"])
            waits.append(a["input_wait"])
            print(
                f"{name} rep {rep}: accelctl {a['samples_per_s']:.0f} samples/s, "
                f"hand-written {h['samples_per_s']:.0f}, accelctl step alone "
                f"{b['samples_per_s']:.0f}",
                file=sys.stderr,
            )
        row = {
            "workload": WORKLOADS[name]["title"],
            "steps": steps,
            "accelctl": statistics.median(acc),
            "handwritten": statistics.median(ref),
            "input_wait": statistics.median(waits),
            "runs_accelctl": acc,
            "runs_handwritten": ref,
            "step_alone": statistics.median(bare),
            "runs_step_alone": bare,
        }
        row["ratio"] = row["accelctl"] / row["handwritten"]
        if before:
            row["before"] = statistics.median(before)
            row["runs_before"] = before
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.out:
        write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    lines = [
        *report_header("Loop overhead: `accelctl train` vs a hand-written `jax.jit` loop"),
        f"Global batch {args.batch}, Adam lr 1e-3, synthetic uint8 28x28x1 data (60000 "
        "examples), fp32. accelctl: steady-state `train_samples_per_s` from `summary.json` "
        "(after the first step, evaluation excluded), batches fed from the host by the prefetch "
        f"thread, metrics read every {args.log_every} steps. Hand-written: the same model and "
        "optimizer in a plain `jax.jit` step with donated params/opt state and all batches "
        "already on the device. 'Step alone': accelctl's compiled step (from `build_job`) timed "
        "the same way as the hand-written loop, on pre-placed batches, which separates the step "
        "from the host input pipeline. Median of "
        f"{args.repeats} alternating runs, each in its own process.",
        "",
        "| workload | steps | accelctl train samples/s | hand-written samples/s | ratio | "
        "accelctl input wait | accelctl step alone samples/s | step alone / hand-written |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['steps']} | {r['accelctl']:.0f} | {r['handwritten']:.0f} | "
            f"{r['ratio']:.3f} | {r['input_wait']:.1%} | {r['step_alone']:.0f} | "
            f"{r['step_alone'] / r['handwritten']:.3f} |"
        )
    if any("before" in r for r in rows):
        lines += [
            "",
            f"Before/after, same run: `accelctl train` of the checkout in `{args.before}` "
            "(before) and of this one (after), alternating with the runs above.",
            "",
            "| workload | before samples/s | after samples/s | after / before |",
            "| --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r['workload']} | {r['before']:.0f} | {r['accelctl']:.0f} | "
                f"{r['accelctl'] / r['before']:.3f} |"
            )
    lines += ["", "Individual runs (samples/s):", ""]
    for r in rows:
        lines.append(
            f"- {r['workload']}: accelctl {', '.join(f'{v:.0f}' for v in r['runs_accelctl'])}; "
            f"hand-written {', '.join(f'{v:.0f}' for v in r['runs_handwritten'])}; "
            f"step alone {', '.join(f'{v:.0f}' for v in r['runs_step_alone'])}"
            + (
                f"; before {', '.join(f'{v:.0f}' for v in r['runs_before'])}"
                if "before" in r
                else ""
            )
        )
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
