"""`data: {source: python}`: the user's loader by import path, returning arrays or a random-access
source; the PNG-folder example trains from its own config."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from accelctl import config
from accelctl.data.random_access import PROBE_ROWS
from accelctl.errors import FieldError
from accelctl.train import train
from tests.conftest import ROOT, assert_user_error, invoke

# A module target (imported by name from a folder put on sys.path): the sources count their reads.
LOADER = '''
import threading

import numpy as np

N, CLASSES = 1024, 4
_rng = np.random.default_rng(0)
X = _rng.integers(0, 256, size=(N, 4, 4, 1), dtype=np.uint8)
_teacher = _rng.standard_normal((16, CLASSES))
Y = np.argmax((X.reshape(N, -1) / 255.0 - 0.5) @ _teacher, axis=1)
LAST = {}


class Rows:
    """Only __len__ and __getitem__; counts the rows read."""

    def __init__(self, x, y, dicts=False):
        self.x, self.y, self.dicts = x, y, dicts
        self.calls = 0
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.y)

    def row(self, i):
        if self.dicts:
            return {"image": self.x[i], "label": int(self.y[i]), "id": i}
        return self.x[i], self.y[i]

    def __getitem__(self, i):
        with self._lock:
            self.calls += 1
        return self.row(i)


class Batched(Rows):
    """With __getitems__ too (the tfds / ArrayRecord / Grain protocol): batched reads."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.batched_rows = 0

    def __getitems__(self, keys):
        with self._lock:
            self.batched_rows += len(keys)
        return [self.row(i) for i in keys]


def _keep(name, source):
    LAST[name] = source
    return source


def arrays():
    return {"train": (X, Y)}


def rows():
    return {"train": _keep("rows", Rows(X, Y))}


def batched():
    return {"train": _keep("batched", Batched(X, Y))}


def dict_rows():
    return {"train": _keep("dict_rows", Rows(X, Y, dicts=True))}


def rows_with_eval_arrays(size=N):
    return {"train": _keep("train_only", Rows(X[:size], Y[:size])), "eval": (X[:64], Y[:64])}


def a_list():
    return [X, Y]


def no_train():
    return {"eval": (X, Y)}


def mismatched():
    return {"train": (X, Y[:-1])}


def nan_in_first_batch():
    x = X.astype(np.float32)
    x[3, 1, 2, 0] = np.nan
    return {"train": Rows(x, Y)}


def label_too_large():
    y = Y.copy()
    y[5] = 7
    return {"train": Rows(X, y)}


class _Ragged(Rows):
    def row(self, i):
        x, y = super().row(i)
        return (x[:3] if i == 900 else x), y


def later_row_of_another_shape():
    return {"train": _Ragged(X, Y)}


def needs_root(root, size=8):
    return {"train": (X[:size], Y[:size])}


def broken():
    raise RuntimeError("the disk is on fire")


not_callable = 42
'''

# Multi-line so every field has its own line: errors must point at it.
CONFIG = """\
model: {{name: mlp, hidden: [16]}}
data:
  source: python
  target: {target}
  cache: {cache}
{extra}optimizer: {{name: adam, lr: 0.01}}
train: {{batch_size: 32, steps: {steps}, log_every: 1, eval_every: null}}
checkpoint: {{enabled: false}}
"""
TARGET_LINE = 4


@pytest.fixture(scope="module")
def loader_module(tmp_path_factory: pytest.TempPathFactory):
    """`accelctl_test_loader`, importable by name for this module's tests."""
    folder = tmp_path_factory.mktemp("loader")
    (folder / "accelctl_test_loader.py").write_text(LOADER)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        import accelctl_test_loader

        yield accelctl_test_loader
    sys.modules.pop("accelctl_test_loader", None)


def _write(tmp_path: Path, target: str, *, cache: str = "none", steps: int = 4, **data) -> Path:
    extra = "".join(f"  {k}: {v}\n" for k, v in data.items())
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(target=target, cache=cache, steps=steps, extra=extra))
    return path


def _losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def _train(path: Path, run_dir: Path) -> dict:
    return train(config.load(path), run_dir=run_dir, quiet=True, log_fn=lambda m: None)


@pytest.fixture(scope="module")
def reference(loader_module, tmp_path_factory) -> tuple[dict, list[float]]:
    """The in-memory arrays, held out and cached on the devices (cache: auto)."""
    folder = tmp_path_factory.mktemp("ref")
    summary = _train(_write(folder, "accelctl_test_loader:arrays", cache="auto"), folder / "run")
    return summary, _losses(folder / "run")


# --------------------------------------------------------------------------------- it trains
@pytest.mark.parametrize(
    ("fn", "extra"),
    [("rows", {}), ("batched", {}), ("dict_rows", {"x_key": "image", "y_key": "label"})],
)
def test_random_access_sources_train_like_the_same_arrays(
    loader_module, reference, tmp_path, fn, extra
):
    ref, ref_losses = reference
    path = _write(tmp_path, f"accelctl_test_loader:{fn}", num_classes=4, **extra)
    got = _train(path, tmp_path / "run")
    assert ref["data_cache"] == "device" and got["data_cache"] == "none"
    # The same held-out rows, the same batches: the same numbers on both paths.
    assert len(ref_losses) == 4
    assert _losses(tmp_path / "run") == pytest.approx(ref_losses, rel=1e-6)
    assert got["final_eval"] == pytest.approx(ref["final_eval"], rel=1e-6)
    source = loader_module.LAST[fn]
    if fn == "batched":  # read through __getitems__ only
        assert source.calls == 0 and source.batched_rows > 0


def test_a_random_access_source_is_read_a_batch_at_a_time(loader_module, tmp_path):
    steps = 3
    _train(
        _write(tmp_path, "accelctl_test_loader:rows_with_eval_arrays", num_classes=4, steps=steps),
        tmp_path / "run",
    )
    source = loader_module.LAST["train_only"]
    # Its first rows are checked when the data set is built; then only the steps' batches.
    assert source.calls == PROBE_ROWS + steps * 32 < len(source)


def test_cache_auto_reads_a_fitting_random_access_source_once(loader_module, tmp_path):
    path = _write(
        tmp_path, "accelctl_test_loader:rows_with_eval_arrays", cache="auto", num_classes=4
    )
    summary = _train(path, tmp_path / "run")
    assert summary["data_cache"] == "device"
    assert loader_module.LAST["train_only"].calls == PROBE_ROWS + 1024


# ----------------------------------------------------------------------------------- errors
FILE_LOADER = """
def load_data(root):
    return {}
"""


def _run(path: Path, tmp_path: Path):
    return invoke("train", str(path), "--run-dir", str(tmp_path / "run"), "--quiet")


def _at(path: Path, line: int) -> str:
    return f"{path}:{line}:"


@pytest.mark.parametrize(
    ("fn", "needles"),
    [
        ("a_list", ["returned a list", '{"train": TRAIN, "eval": EVAL}']),
        ("no_train", ["returned a dict with keys 'eval'"]),
        ("mismatched", ["x has 1024 rows but y has 1023"]),
        ("nan_in_first_batch", ["row 3", "position (1, 2, 0)", "nan"]),
        ("label_too_large", ["row 5", "label 7", "0 .. 3"]),
        ("broken", ["raised RuntimeError: the disk is on fire"]),
        ("not_callable", ["is a int, not callable"]),
        ("arrayz", ["has no name 'arrayz'", "did you mean 'arrays'"]),
        # Found mid-run, in the prefetch thread: still located, still no traceback.
        ("later_row_of_another_shape", ["row 900", "shape (3, 4, 1)", "row 0 has (4, 4, 1)"]),
    ],
)
def test_loader_errors_point_at_the_target(loader_module, tmp_path, fn, needles):
    path = _write(tmp_path, f"accelctl_test_loader:{fn}", num_classes=4, steps=40)
    assert_user_error(_run(path, tmp_path), _at(path, TARGET_LINE), *needles)


def test_a_module_that_does_not_exist_gets_path_advice(tmp_path):
    path = _write(tmp_path, "no_such_pkg_xyz.loaders:load", num_classes=4)
    assert_user_error(
        _run(path, tmp_path),
        _at(path, TARGET_LINE),
        "no module named 'no_such_pkg_xyz'",
        "PYTHONPATH",
    )


def test_file_targets_missing_file_name_and_args(tmp_path):
    (tmp_path / "loader.py").write_text(FILE_LOADER)
    missing = _write(tmp_path, "./gone.py:load_data")
    assert_user_error(_run(missing, tmp_path), _at(missing, TARGET_LINE), "gone.py does not exist")
    typo = _write(tmp_path, "./loader.py:load_dta")
    assert_user_error(_run(typo, tmp_path), _at(typo, TARGET_LINE), "did you mean 'load_data'")
    # An argument the loader does not take is located at its own key, with the closest name.
    wrong_arg = _write(tmp_path, "./loader.py:load_data", args="\n    rot: /data")
    assert_user_error(
        _run(wrong_arg, tmp_path), _at(wrong_arg, 7), "takes no argument 'rot'", "'root'"
    )
    no_arg = _write(tmp_path, "./loader.py:load_data")
    assert_user_error(_run(no_arg, tmp_path), "needs 'root'", "args: {root: ...}")


def test_random_access_needs_num_classes(loader_module, tmp_path):
    path = _write(tmp_path, "accelctl_test_loader:rows")
    result = _run(path, tmp_path)
    assert_user_error(result, str(path), "data.num_classes", "cannot be inferred")
    assert re.search(rf"{re.escape(str(path))}:\d+:\d+", result.output), result.output


def test_dict_rows_without_the_key_name_the_keys_they_have(loader_module, tmp_path):
    path = _write(tmp_path, "accelctl_test_loader:dict_rows", num_classes=4, x_key="pixels")
    assert_user_error(_run(path, tmp_path), _at(path, 7), "no key 'pixels'", "'image'")


# ------------------------------------------------------------------------------ the PNG example
def test_png_folder_example_trains_from_its_config(tmp_path):
    example = ROOT / "examples" / "png_folder"
    sys.path.insert(0, str(example))
    try:
        from make_pngs import write_pngs
    finally:
        sys.path.remove(str(example))
    counts = write_pngs(tmp_path / "pngs")
    assert counts["train"] + counts["test"] == 1797
    summary_file = tmp_path / "summary.json"
    result = invoke(
        "train",
        str(example / "config.yaml"),
        "--set",
        f"data.args.root={tmp_path / 'pngs'}",
        "--set",
        "train.steps=60",
        "--run-dir",
        str(tmp_path / "run"),
        "--quiet",
        "--json",
        str(summary_file),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(summary_file.read_text())
    assert summary["data_cache"] == "none"
    assert summary["final_eval"]["count"] == counts["test"]
    assert summary["final_eval"]["accuracy"] > 0.7  # 10 classes: chance is 0.1
    losses = _losses(tmp_path / "run")
    assert losses[-1] < 0.5 * losses[0]


def test_loader_checks_run_before_the_model_is_built(loader_module, tmp_path):
    """Arrays are checked whole: a label beyond the given class count is named by its row."""
    path = _write(tmp_path, "accelctl_test_loader:arrays", num_classes=3)
    ys = np.asarray(loader_module.Y)
    row = int(np.flatnonzero(ys >= 3)[0])
    assert_user_error(_run(path, tmp_path), _at(path, TARGET_LINE), f"at row {row}", "0 .. 2")


def test_loader_source_is_shown_in_the_error_of_a_raising_file_loader(tmp_path):
    (tmp_path / "bad.py").write_text(
        textwrap.dedent(
            """
            def load():
                return {"train": open("/nonexistent/folder/x.npz")}
            """
        )
    )
    path = _write(tmp_path, "./bad.py:load")
    assert_user_error(_run(path, tmp_path), _at(path, TARGET_LINE), "FileNotFoundError", "bad.py:3")


def test_the_python_api_passes_the_loader_or_its_result_itself(loader_module):
    """`accelctl.train(..., data=...)`: the loader (called with data.args) or its return value."""
    from accelctl import data

    cfg = config.load_text(
        "data: {source: python, target: 'nowhere:loader', args: {size: 40}, num_classes: 4}",
        "api.yaml",
    )
    x, y = loader_module.X[:40], loader_module.Y[:40]
    # The target `nowhere:loader` is never imported when an object is given.
    called = data.build(cfg.data, obj=lambda size: {"train": (x[:size], y[:size])})
    given = data.build(cfg.data, obj={"train": loader_module.Rows(x, y)})
    assert len(called.train) + len(called.eval) == 40 == len(given.train) + len(given.eval)
    # The same seeded hold-out of the same rows, whether arrays or a random-access source.
    first = np.arange(5)
    np.testing.assert_array_equal(called.train.take(first)[0], given.train.take(first)[0])
    with pytest.raises(FieldError, match="takes no argument 'size'"):
        data.build(cfg.data, obj=lambda: {"train": (x, y)})
