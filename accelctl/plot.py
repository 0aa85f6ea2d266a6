"""Figures of training runs from their `metrics.jsonl`: loss, accuracy, learning rate, throughput.

matplotlib is imported only when a figure is drawn, and only its object-oriented API with the Agg
canvas is used: no pyplot, no display, no global backend switch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelctl.errors import UserError

METRICS_FILE = "metrics.jsonl"
DEFAULT_NAME = "plot.png"

# (title, event field, y label, event kinds drawn): one panel each, in reading order.
PANELS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("Loss", "loss", "loss", ("train", "eval")),
    ("Accuracy", "accuracy", "accuracy", ("train", "eval")),
    ("Learning rate", "lr", "learning rate", ("train",)),
    ("Throughput", "samples_per_s", "samples / s", ("train",)),
)
_STYLE: dict[str, dict[str, Any]] = {
    "train": {"linestyle": "-"},
    "eval": {"linestyle": "--", "marker": "o", "markersize": 4},
}


@dataclass(frozen=True)
class RunMetrics:
    """The train and eval events of one run directory, in logged order."""

    name: str
    path: Path
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    schedule: tuple[list[int], list[float]] | None = None  # lr at every step, when known


def read_run(run_dir: Path, name: str | None = None) -> RunMetrics:
    """Read a run directory's metrics.jsonl.

    A torn last line (a killed run) and events other than train/eval are skipped.

    Raises:
        UserError: the folder or its metrics.jsonl is missing, or it holds no train event.
    """
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise UserError(
            f"{run_dir} {what}; give the run directory of an `accelctl train` run (the folder "
            f"that holds {METRICS_FILE})"
        )
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(
            f"{run_dir} holds no {METRICS_FILE} ({path} is missing); is it the run directory of "
            "an `accelctl train` run?"
        )
    events: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for line in raw.splitlines():
        try:
            event = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue  # a torn last line of a killed run, or damaged bytes
        if (
            isinstance(event, dict)
            and event.get("event") in events
            and _number(event.get("step")) is not None
        ):
            events[event["event"]].append(event)
    if not events["train"]:
        raise UserError(
            f"{path} holds no train events yet: there is nothing to plot (a run logs one every "
            "train.log_every steps)"
        )
    run = RunMetrics(name or run_dir.name, run_dir, events["train"], events["eval"])
    return dataclasses.replace(run, schedule=_schedule(run_dir, run.train))


def _schedule(run_dir: Path, train: list[dict[str, Any]]) -> tuple[list[int], list[float]] | None:
    """The learning rate at every step, from the run's config.yaml (logged points are one per
    log interval, which hides a warm-up); None when it cannot be known: no readable config, or
    ReduceLROnPlateau, whose scale depends on the losses (its logged points are drawn)."""
    from accelctl import config, optim
    from accelctl.errors import UserError

    try:
        cfg = config.load(run_dir / "config.yaml")
    except UserError:
        return None
    if cfg.schedule.name == "plateau":
        return None
    total = 0
    try:
        total = int(json.loads((run_dir / "summary.json").read_text())["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        total = max((int(e["step"]) for e in train), default=0)
    if total <= 0:
        return None
    import numpy as np

    fn = optim.make_schedule(cfg.schedule, cfg.optimizer.lr, total)
    steps = np.unique(np.linspace(1, total, num=min(total, 2000)).astype(int))
    # The step-s update uses lr(s - 1), as the logged lr does (train/step.py take_sums).
    # A constant schedule returns one number whatever its input: broadcast it to every step.
    values = [float(v) for v in np.broadcast_to(np.asarray(fn(steps - 1)), steps.shape)]
    return [int(x) for x in steps], values


def _points(events: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one field; missing and NaN values (e.g. no rate yet) left out."""
    steps: list[int] = []
    values: list[float] = []
    for event in events:
        value = _number(event.get(key))
        if value is not None:
            steps.append(int(event["step"]))
            values.append(value)
    return steps, values


def _number(value: Any) -> float | None:
    """A finite real number as float, else None (a hand-edited or damaged log may hold text,
    booleans, NaN or numbers too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and abs(value) < 1e300 else None


def make_figure(runs: Sequence[RunMetrics]) -> Any:
    """Draw the runs overlaid (one colour each) on a 2x2 grid of PANELS, x axis = step.

    Returns:
        A matplotlib `Figure` on an Agg canvas, one axes per panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).flat
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, key, ylabel, kinds) in zip(axes, PANELS, strict=True):
        for run, colour in zip(runs, colours, strict=True):
            if key == "lr" and run.schedule is not None:
                ax.plot(*run.schedule, color=colour, **_STYLE["train"])
                continue
            for kind in kinds:
                steps, values = _points(getattr(run, kind), key)
                ax.plot(steps, values, color=colour, **_STYLE[kind])
        ax.set_title(title + (" (train and eval)" if len(kinds) > 1 else ""))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(kinds) > 1:
            styles = [Line2D([], [], color="0.3", **_STYLE[kind]) for kind in kinds]
            ax.legend(styles, kinds, loc="best", fontsize="small")
    for ax in fig.axes[-2:]:
        ax.set_xlabel("step")
    handles = [Line2D([], [], color=c, linewidth=2) for c in colours]
    fig.legend(handles, [r.name for r in runs], loc="outside lower center", ncols=min(len(runs), 4))
    fig.suptitle("Training metrics: " + ", ".join(r.name for r in runs[:4]))
    return fig


def image_formats() -> list[str]:
    """The file suffixes matplotlib's Agg canvas writes (png, pdf, svg, jpg with Pillow, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())


def plot_runs(run_dirs: Sequence[Path], output: Path | None = None) -> dict[str, Any]:
    """Read runs' metrics.jsonl and write one figure comparing them.

    Args:
        run_dirs: run directories of `accelctl train` (at least one).
        output: image to write (format from its suffix: png, pdf, svg, ...); default:
            plot.png in the first run directory.
    Returns:
        {"path": the image written, "panels": number of panels, "runs": [{"name", "run_dir",
        "train_events", "eval_events", "last_step"}]}.
    Raises:
        UserError: a run directory is unusable, or the output cannot be written there.
    """
    if not run_dirs:
        raise UserError("no run directory given; name at least one")
    names = [Path(d).name for d in run_dirs]
    # Runs of the same folder name in different places are told apart by their whole path.
    runs = [
        read_run(Path(d), name=str(d) if names.count(n) > 1 else n)
        for d, n in zip(run_dirs, names, strict=True)
    ]
    out = Path(output) if output is not None else runs[0].path / DEFAULT_NAME
    formats = image_formats()
    if out.suffix.lstrip(".").lower() not in formats:
        raise UserError(
            f"unknown image format {out.suffix or '(no suffix)'}; use one of "
            + ", ".join(f".{f}" for f in formats),
            param="output",
            value=out,
        )
    from accelctl.outputs import check_output_file

    check_output_file(out, param="output")
    fig = make_figure(runs)
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write the image ({e})", param="output", value=out) from None
    return {
        "path": str(out),
        "panels": len(fig.axes),
        "runs": [
            {
                "name": r.name,
                "run_dir": str(r.path),
                "train_events": len(r.train),
                "eval_events": len(r.eval),
                "last_step": r.train[-1]["step"],
            }
            for r in runs
        ],
    }
