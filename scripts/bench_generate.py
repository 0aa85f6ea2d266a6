"""Generation speed: the key/value cache vs re-running the whole sequence for every token.

The model is configs/gpt_tiny.yaml's transformer (its dims and vocabulary; random weights). Greedy
decoding of `--new` tokens after a `--prompt`-token prompt, for each batch size:

- cache, fori loop: `accelctl.generate.generate(loop="fori")`: prefill, then every step in one
  jitted `jax.lax.fori_loop` (the default).
- cache, python loop: `generate(loop="python")`: prefill, then a jitted one-step function called
  once per token from Python.
- no cache: the full forward pass (`Transformer.__call__`) over a fixed buffer of prompt + new
  tokens for every new token, inside one jitted `fori_loop` (one compile; causal attention makes
  the padding after the current token irrelevant). Same greedy tokens (checked).

Tokens/s counts generated tokens of all sequences over the wall time of the whole generation
after compiling (prefill included), with `block_until_ready` before the clock stops; the median
(and the best) of `--repeats` runs after one warm-up run.

    python scripts/bench_generate.py --out docs/benchmarks/generate.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accelctl import config, models  # noqa: E402
from accelctl.devices import describe_machine  # noqa: E402
from accelctl.generate import generate  # noqa: E402

VARIANTS = ("cache, fori loop", "cache, python loop", "no cache")


@partial(jax.jit, static_argnames=("graphdef", "start", "steps"))
def _greedy_no_cache(
    state: nnx.State, buf: jax.Array, *, graphdef: nnx.GraphDef, start: int, steps: int
) -> jax.Array:
    """Fill buf[:, start:start + steps] greedily, one full forward pass over buf per token."""
    model = nnx.merge(graphdef, state)

    def body(i: jax.Array, buf: jax.Array) -> jax.Array:
        logits = model(buf, train=False)  # (batch, L, vocab): the whole sequence, every step
        last = jax.lax.dynamic_index_in_dim(logits, start + i - 1, axis=1, keepdims=False)
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf, token[:, None], (0, start + i))

    return jax.lax.fori_loop(0, steps, body, buf)


def run_no_cache(model: nnx.Module, prompt: np.ndarray, new: int) -> tuple[np.ndarray, float]:
    """(ids, seconds) of greedy generation without a cache; the first call compiles."""
    graphdef, state = nnx.split(model)
    b, t = prompt.shape
    buf = np.zeros((b, t + new), np.int32)
    buf[:, :t] = prompt
    t0 = time.perf_counter()
    out = _greedy_no_cache(state, buf, graphdef=graphdef, start=t, steps=new).block_until_ready()
    return np.asarray(out), time.perf_counter() - t0


def measure(model: nnx.Module, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    """{variant: {"tokens_per_s": [...], "compile_s": float}} for one batch size."""
    vocab = model.embed.num_embeddings
    prompt = np.random.default_rng(batch).integers(0, vocab, (batch, prompt_len), np.int32)
    results: dict[str, dict] = {}
    reference = None
    for variant, loop in (("cache, fori loop", "fori"), ("cache, python loop", "python")):
        ids, stats = generate(model, prompt, max_new_tokens=new, loop=loop)
        rates = []
        for _ in range(repeats):
            again, s = generate(model, prompt, max_new_tokens=new, loop=loop)
            np.testing.assert_array_equal(again, ids)
            rates.append(s.tokens_per_s)
        results[variant] = {"tokens_per_s": rates, "compile_s": stats.compile_s}
        reference = ids if reference is None else reference
        np.testing.assert_array_equal(ids, reference)
    t0 = time.perf_counter()
    ids, _ = run_no_cache(model, prompt, new)
    compile_and_run = time.perf_counter() - t0
    np.testing.assert_array_equal(ids, reference)  # the cache changes the speed, not the tokens
    rates = [batch * new / run_no_cache(model, prompt, new)[1] for _ in range(repeats)]
    # Not separated by AOT here: compile ~ the first call minus one run.
    compile_s = compile_and_run - batch * new / statistics.median(rates)
    results["no cache"] = {"tokens_per_s": rates, "compile_s": compile_s}
    return results


def report_header(title: str) -> list[str]:
    """Title, the exact command, machine and date (as every benchmark report starts)."""
    cmd = "python scripts/" + Path(sys.argv[0]).name + " " + " ".join(sys.argv[1:])
    return [
        f"# {title}",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {describe_machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt_tiny.yaml")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new", type=int, default=48, help="new tokens (prompt + new <= max_len)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = ap.parse_args()

    cfg = config.load(args.config)
    m = cfg.model
    model = models.build(cfg.model, (cfg.data.seq_len,), cfg.data.vocab_size, rngs=nnx.Rngs(0))
    dims = (
        f"{m.num_layers} layers, {m.num_heads} heads, width {m.embed_dim}, "
        f"MLP {m.mlp_dim or 4 * m.embed_dim}, max_len {m.max_len}, vocab {cfg.data.vocab_size}, "
        f"{m.positions} positions"
    )
    rows, runs = [], []
    for batch in args.batch:
        res = measure(model, batch, args.prompt, args.new, args.repeats)
        base = statistics.median(res["no cache"]["tokens_per_s"])
        for variant in VARIANTS:
            rates = res[variant]["tokens_per_s"]
            med = statistics.median(rates)
            rows.append(
                f"| {batch} | {variant} | {med:.0f} | {max(rates):.0f} | {1000 * batch / med:.3f} "
                f"| {res[variant]['compile_s']:.2f} | {med / base:.2f} |"
            )
            runs.append(f"- batch {batch}, {variant}: " + ", ".join(f"{r:.0f}" for r in rates))
        print("\n".join(rows[-len(VARIANTS) :]), flush=True)
    lines = report_header("Generation: key/value cache vs full recomputation")
    lines += [
        f"Model: `{args.config.relative_to(ROOT)}`'s transformer ({dims}), random weights, "
        f"float32. Greedy decoding of {args.new} new tokens after a {args.prompt}-token prompt. "
        "Tokens/s: generated tokens of all sequences per second of the whole generation after "
        "compiling (prefill included), median of "
        f"{args.repeats} runs after a warm-up run (and the best run, the least disturbed by other "
        "processes); ms/step: milliseconds per generated position (all sequences together). "
        "'no cache' runs the full forward pass over the prompt + new-token buffer for every "
        "token (one jitted fori_loop); all three give the same tokens.",
        "",
        "| batch | variant | tokens/s (median) | tokens/s (best) | ms/step (median) | compile s "
        "| median vs no cache |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Individual runs (tokens/s):",
        "",
        *runs,
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
