"""`accelctl plot`: figures of runs' metrics.jsonl, from the library and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from accelctl import config
from accelctl.cli import app
from accelctl.errors import UserError
from accelctl.plot import PANELS, make_figure, plot_runs, read_run
from accelctl.train import train
from tests.conftest import TINY

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny runs with different learning rates (one on a schedule), trained once."""
    root = tmp_path_factory.mktemp("runs")
    common = ["train.steps=8", "train.log_every=2", "train.eval_every=4"]
    common += ["checkpoint.enabled=false"]
    variants = {
        "adam-constant": ["optimizer.lr=0.01"],
        "adam-cosine": ["optimizer.lr=0.003", "schedule.name=cosine"],
    }
    out = []
    for name, extra in variants.items():
        cfg = config.load_text(TINY, "tiny.yaml", [*common, *extra])
        train(cfg, run_dir=root / name, quiet=True)
        out.append(root / name)
    return out


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000  # four panels of lines, titles and legends, not an empty canvas


def test_library_plots_two_runs_overlaid(runs, tmp_path):
    out = tmp_path / "both.png"
    result = plot_runs(runs, out)
    assert result["path"] == str(out) and result["panels"] == len(PANELS) == 4
    assert [r["name"] for r in result["runs"]] == ["adam-constant", "adam-cosine"]
    assert [(r["train_events"], r["eval_events"], r["last_step"]) for r in result["runs"]] == [
        (4, 2, 8),
        (4, 2, 8),
    ]
    assert_png(out)

    fig = make_figure([read_run(d) for d in runs])
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == [
        "Loss (train and eval)",
        "Accuracy (train and eval)",
        "Learning rate",
        "Throughput",
    ]
    loss, accuracy, lr, throughput = fig.axes
    assert len(loss.lines) == len(accuracy.lines) == 4  # 2 runs x (train, eval)
    assert len(lr.lines) == len(throughput.lines) == 2
    # Each run in its own colour, the same in every panel, named in the figure legend.
    assert loss.lines[0].get_color() != loss.lines[2].get_color()
    assert lr.lines[1].get_color() == loss.lines[2].get_color()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["adam-constant", "adam-cosine"]
    assert list(loss.lines[0].get_xdata()) == [2, 4, 6, 8]
    assert list(loss.lines[1].get_xdata()) == [4, 8]  # eval
    assert throughput.get_xlabel() == "step" and lr.get_ylabel() == "learning rate"
    assert fig.get_suptitle().startswith("Training metrics")


def test_cli_writes_plot_png_in_the_first_run_dir(runs):
    result = runner.invoke(app, ["plot", *map(str, runs), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"] == str(runs[0] / "plot.png") and report["panels"] == 4
    assert len(report["runs"]) == 2
    assert_png(runs[0] / "plot.png")


def test_cli_output_option(runs, tmp_path):
    out = tmp_path / "one.png"
    result = runner.invoke(app, ["plot", str(runs[1]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout and "adam-cosine" in result.stdout
    assert_png(out)


def test_bad_input_exits_2_naming_the_path(runs, tmp_path):
    missing = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_train = tmp_path / "no-train"
    no_train.mkdir()
    (no_train / "metrics.jsonl").write_text('{"event": "eval", "step": 4, "loss": 1.0}\n')
    cases = [
        (["plot", str(missing)], [str(missing), "does not exist"]),
        (["plot", str(runs[0]), str(empty)], [str(empty), "metrics.jsonl"]),
        (["plot", str(no_train)], [str(no_train / "metrics.jsonl"), "no train events"]),
        (
            ["plot", str(runs[0]), "-o", str(tmp_path / "no-dir" / "x.png")],
            [str(tmp_path / "no-dir"), "does not exist"],
        ),
        (["plot", str(runs[0]), "-o", str(tmp_path / "x.nope")], ["unknown image format"]),
    ]
    for args, needles in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        for needle in needles:
            assert needle in result.output, (needle, result.output)
    assert not (tmp_path / "x.nope").exists()
    with pytest.raises(UserError, match="does not exist"):
        plot_runs([missing])


def test_torn_last_line_is_skipped(runs, tmp_path):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    lines = (runs[0] / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(lines + '{"event": "train", "st')
    assert len(read_run(run_dir).train) == 4


def test_importing_the_cli_does_not_import_matplotlib():
    code = "import sys; from accelctl.cli import app; assert 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
