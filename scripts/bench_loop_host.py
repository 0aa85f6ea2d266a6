"""The training loop's own host cost per step: `Loop.run` with every hook installed, fed by the
device-cached data feed, around a train step replaced by a function that returns at once.

What is left is the Python work of one iteration (the feed, the in-flight bound, the hooks'
cadence checks, metric reads every `log_every` steps): the part of the hot path that accelctl
adds beside the compiled step.

    python scripts/bench_loop_host.py --steps 20000 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = """
model: {{name: mlp, hidden: [8]}}
data: {{source: synthetic, shape: [4], num_train: 4096, num_eval: 64, num_classes: 4,
       dtype: float32, cache: device}}
train: {{batch_size: 32, steps: {steps}, log_every: 100, eval_every: 1000000000}}
checkpoint: {{enabled: false}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import jax.numpy as jnp

    from accelctl import config
    from accelctl.metrics import NullWriter
    from accelctl.train.hooks import add_standard_hooks
    from accelctl.train.job import build_job
    from accelctl.train.loop import Loop
    from accelctl.train.preempt import PreemptionGuard

    job = build_job(config.load_text(CONFIG.format(steps=args.steps), "host.yaml"))
    out = jnp.zeros(())

    def instant_step(state, batch):
        return state, out

    job = dataclasses.replace(job, steps=dataclasses.replace(job.steps, train=instant_step))
    per_step = []
    for _ in range(args.repeats):
        loop = Loop(job, job.state.init(), NullWriter())
        with PreemptionGuard() as guard:
            add_standard_hooks(loop, checkpointer=None, guard=guard)
            loop.run()
        per_step.append((loop.end - loop.wall0) / args.steps * 1e6)
    print(
        f"loop host cost: {statistics.median(per_step):.2f} us/step (median of "
        f"{args.repeats}: {', '.join(f'{v:.2f}' for v in per_step)})"
    )


if __name__ == "__main__":
    main()
