"""`accelctl generate RUN --prompt TEXT`: continue a prompt with a trained transformer."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json
from accelctl.cli.export import RunArg


def generate_command(
    run: RunArg,
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt",
            "-p",
            help="Text for a byte-level model (vocabulary 256, e.g. data.kind: text); else "
            "space-separated token ids.",
            show_default=False,
            metavar="TEXT",
        ),
    ],
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.", metavar="N")
    ] = 32,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", min=0.0, help="0: greedy (arg-max); else sample.", metavar="T"
        ),
    ] = 0.0,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k", min=1, help="Sample among the k most likely tokens only.", metavar="K"
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Sampling seed.", metavar="S")] = 0,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Generate with the model's key/value cache; prints the prompt and its continuation.

    Tokens/s (compile excluded) goes to stderr, so stdout holds the text alone.
    """

    def go() -> dict[str, Any]:
        from accelctl import compile_cache
        from accelctl.predict import generate_from_run

        compile_cache.enable()
        return generate_from_run(
            run,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )

    result = run_guarded(go, debug=debug)
    for note in result["notes"]:
        print(f"accelctl: {note}", file=sys.stderr)
    if write_json(result, json_out):
        return
    if result["byte_level"]:
        print(prompt + result["text"])
    else:
        print(" ".join(map(str, result["prompt_ids"] + result["new_ids"])))
    print(
        f"accelctl: {len(result['new_ids'])} new tokens at {result['tokens_per_s']:.1f} tokens/s "
        f"(compile {result['compile_s']:.2f} s, step {result['step']} of {result['checkpoint']})",
        file=sys.stderr,
    )
