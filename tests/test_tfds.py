"""tensorflow-datasets source, offline: mocked registered sets, a real tiny ArrayRecord set, CLI.

Nothing here touches the network or needs TensorFlow. Registered data sets (mnist, cifar10, ...)
are read through `tfds.testing.mock_data` (random examples of the real layout); real files come
from `tests.tiny_tfds_builder`, prepared once per session as ArrayRecord.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
import tensorflow_datasets.testing.mocking as tfds_mocking
from typer.testing import CliRunner

from accelctl import config
from accelctl.cli import app
from accelctl.data import epoch_batch_table, eval_batches, tfds_source, train_batches
from accelctl.data.tfds_source import TfdsSplit, load
from accelctl.errors import UserError
from accelctl.train import train
from tests import tiny_tfds_builder as tiny
from tests.conftest import assert_user_error

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
MOCK_EXAMPLES = 64  # per split under mock_data


def tfds_config(data: str, *overrides: str, batch_size: int = 16, steps: int = 6) -> config.Config:
    """A tiny training config whose data section is `{source: tfds, <data>}`."""
    text = f"""
model: {{name: mlp, hidden: [8]}}
data: {{source: tfds, {data}}}
optimizer: {{name: adam, lr: 0.01}}
train: {{batch_size: {batch_size}, steps: {steps}, log_every: 1, eval_every: {steps}}}
"""
    return config.load_text(text, "tiny.yaml", list(overrides))


def losses(run_dir: Path) -> np.ndarray:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return np.array([e["loss"] for e in map(json.loads, lines) if e["event"] == "train"])


def rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Each example as one hashable value (image bytes + label), for set comparisons."""
    return sorted(xi.tobytes() + int(yi).to_bytes(4, "little") for xi, yi in zip(x, y, strict=True))


# ------------------------------------------------------------------------ mocked registered sets
@pytest.fixture
def mock_tfds(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Mock every registered builder's `as_data_source` with MOCK_EXAMPLES random examples.

    Works around a bug in tfds 4.9.10's `tfds.testing.mock_data`: it sets the mocked source's
    `__getitems__` as a plain instance attribute `functools.partial(_getitems, generator=...)`,
    so `source.__getitems__(keys)` calls `_getitems(keys, generator=...)` without `self` and
    fails with "_getitems() missing 1 required positional argument: 'record_keys'". The partial
    looks `_getitems` up when `mock_as_data_source` runs, so replacing the module attribute first
    is enough; `self` is only used with serialized=True, so None stands in for it.
    """
    original = tfds_mocking._getitems

    def getitems(*args: Any, generator: Any, serialized: bool = False) -> Any:
        if len(args) == 1:  # called as __getitems__(record_keys): no self
            args = (None, *args)
        return original(*args, generator=generator, serialized=serialized)

    monkeypatch.setattr(tfds_mocking, "_getitems", getitems)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


REGISTERED = [
    ("mnist", (28, 28, 1), 10),
    ("fashion_mnist", (28, 28, 1), 10),
    ("kmnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
    ("svhn_cropped", (32, 32, 3), 10),
]


@pytest.mark.parametrize(("name", "shape", "num_classes"), REGISTERED)
def test_registered_sets_load_with_their_layout_and_batch(
    mock_tfds: Any, tmp_path: Path, name: str, shape: tuple[int, ...], num_classes: int
) -> None:
    ds = load(tfds_config(f"name: {name}, data_dir: {tmp_path}").data)
    assert ds.name == name and ds.num_classes == num_classes and ds.input_shape == shape
    assert ds.x_scale == pytest.approx(1 / 255)
    for split in (ds.train, ds.eval):
        assert isinstance(split, TfdsSplit)
        assert len(split) == MOCK_EXAMPLES
        assert split.example_shape == shape and split.x_dtype == np.uint8
        x, y = split.take(np.array([3, 0, 63, 3]))
        assert x.shape == (4, *shape) and x.dtype == np.uint8
        assert y.dtype == np.int32 and ((0 <= y) & (y < num_classes)).all()
        np.testing.assert_array_equal(x[0], x[3])  # the same example twice
    batches = list(train_batches(ds.train, 16, seed=0, start_step=0, num_steps=5))
    assert len(batches) == 5  # 4 steps per epoch: crosses an epoch boundary
    for b in batches:
        assert b["x"].shape == (16, *shape) and b["x"].dtype == np.uint8
        assert b["y"].shape == (16,) and b["y"].dtype == np.int32
    evals = list(eval_batches(ds.eval, 24))
    assert [int(b["mask"].sum()) for b in evals] == [24, 24, 16]
    assert all(b["x"].shape == (24, *shape) for b in evals)


def test_process_slices_make_up_the_global_batch_and_shuffle_is_seeded(
    mock_tfds: Any, tmp_path: Path
) -> None:
    split = load(tfds_config(f"name: mnist, data_dir: {tmp_path}").data).train
    kw: dict[str, Any] = {"start_step": 0, "num_steps": 6}  # 4 steps per epoch
    single = list(train_batches(split, 16, seed=3, **kw))
    parts = [
        list(train_batches(split, 16, seed=3, process_index=p, process_count=2, **kw))
        for p in range(2)
    ]
    for step, (whole, p0, p1) in enumerate(zip(single, *parts, strict=True)):
        assert p0["x"].shape == p1["x"].shape == (8, 28, 28, 1)
        x = np.concatenate([p0["x"], p1["x"]])
        y = np.concatenate([p0["y"], p1["y"]])
        # The same examples in the same order as one process reads them.
        np.testing.assert_array_equal(x, whole["x"])
        np.testing.assert_array_equal(y, whole["y"])
        epoch, i = divmod(step, 4)
        table = epoch_batch_table(len(split), 16, seed=3, epoch=epoch)
        ex, ey = split.take(table[i])
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    again = list(train_batches(split, 16, seed=3, **kw))
    for a, b in zip(single, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    other = next(train_batches(split, 16, seed=4, **kw))
    assert rows(other["x"], other["y"]) != rows(single[0]["x"], single[0]["y"])


def test_mnist_trains_with_every_cache_mode_and_the_same_losses(
    mock_tfds: Any, tmp_path: Path
) -> None:
    results = {}
    for cache in ("device", "host", "none"):
        cfg = tfds_config(f"name: mnist, data_dir: {tmp_path}, cache: {cache}")
        summary = train(cfg, run_dir=tmp_path / cache, quiet=True)
        assert summary["data_cache"] == cache and summary["steps"] == 6
        results[cache] = losses(tmp_path / cache), summary["final_eval"]["loss"]
    assert len(results["device"][0]) == 6 and np.isfinite(results["device"][0]).all()
    for cache in ("host", "none"):
        np.testing.assert_allclose(results[cache][0], results["device"][0], rtol=1e-6)
        np.testing.assert_allclose(results[cache][1], results["device"][1], rtol=1e-6)


# -------------------------------------------------------------------------- a real prepared set
@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tfds data dir holding tiny_images, prepared for real as ArrayRecord (once)."""
    root = tmp_path_factory.mktemp("tfds")
    version_dir = tiny.prepare(root)
    assert version_dir == root / tiny.NAME / tiny.VERSION
    return root


def tiny_data(tiny_dir: Path, extra: str = "") -> str:
    return f"name: {tiny.NAME}, data_dir: {tiny_dir}" + (f", {extra}" if extra else "")


def test_load_reads_the_stored_examples_exactly(tiny_dir: Path) -> None:
    ds = load(tfds_config(tiny_data(tiny_dir)).data)
    assert ds.num_classes == tiny.NUM_CLASSES and ds.input_shape == tiny.IMAGE_SHAPE
    assert ds.x_scale == pytest.approx(1 / 255)
    for split, name in ((ds.train, "train"), (ds.eval, "test")):
        x, y = tiny.examples(name)
        assert len(split) == len(y)
        assert split.nbytes == x.nbytes + 4 * len(y)
        loaded = split.load(chunk=64)  # several chunks, the last one partial
        np.testing.assert_array_equal(loaded.x, x)
        np.testing.assert_array_equal(loaded.y, y)
        assert loaded.y.dtype == np.int32
        tx, ty = split.take(np.arange(len(y)))
        np.testing.assert_array_equal(tx, loaded.x)
        np.testing.assert_array_equal(ty, loaded.y)


@pytest.mark.parametrize("threads", [1, 4])
def test_take_returns_rows_in_the_requested_order(tiny_dir: Path, threads: int) -> None:
    split = load(tfds_config(tiny_data(tiny_dir, f"read_threads: {threads}")).data).train
    x, y = tiny.examples("train")
    for idx in (
        np.random.default_rng(7).permutation(len(y)),  # 200 keys: 4 threads split the read
        np.array([199, 0, 5, 5, 42]),
        np.array([], np.int64),
    ):
        tx, ty = split.take(idx)
        np.testing.assert_array_equal(tx, x[idx])
        np.testing.assert_array_equal(ty, y[idx])
    assert (split._pool is not None) == (threads > 1)  # the threaded path really ran


def test_split_slicing_selects_part_of_a_split(tiny_dir: Path) -> None:
    data = tiny_data(tiny_dir, "train_split: 'train[:50%]', eval_split: 'train[50%:]'")
    ds = load(tfds_config(data).data)
    x, y = tiny.examples("train")
    assert len(ds.train) == len(ds.eval) == 100
    np.testing.assert_array_equal(ds.train.load().x, x[:100])
    np.testing.assert_array_equal(ds.eval.load().y, y[100:])


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ("train_split: validation", ["data.train_split", "'validation'"]),
        ("eval_split: dev", ["data.eval_split", "'dev'"]),
        ("image_key: img", ["data.image_key", "'img'", "image, label"]),
        ("label_key: class", ["data.label_key", "'class'", "image, label"]),
    ],
)
def test_bad_split_or_feature_names_are_user_errors(
    tiny_dir: Path, extra: str, needles: list[str]
) -> None:
    with pytest.raises(UserError) as e:
        load(tfds_config(tiny_data(tiny_dir, extra)).data)
    for needle in needles:
        assert needle in str(e.value)


def test_streamed_reads_train_like_the_device_cache_and_resume_without_replay(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # 200 examples at batch 16: 12 steps per epoch, so 14 steps cross an epoch boundary.
    got = {}
    for cache in ("device", "none"):
        cfg = tfds_config(tiny_data(tiny_dir, f"cache: {cache}"), steps=14)
        summary = train(cfg, run_dir=tmp_path / cache, quiet=True)
        assert summary["data_cache"] == cache and summary["steps_per_epoch"] == 12
        got[cache] = losses(tmp_path / cache), summary["final_eval"]["loss"]
    assert len(got["none"][0]) == 14
    np.testing.assert_allclose(got["none"][0], got["device"][0], rtol=1e-6)
    np.testing.assert_allclose(got["none"][1], got["device"][1], rtol=1e-6)

    # Starting at any step gives the batches an uninterrupted run would have read there.
    split = load(tfds_config(tiny_data(tiny_dir)).data).train
    full = list(train_batches(split, 16, seed=0, start_step=0, num_steps=14))
    resumed = list(train_batches(split, 16, seed=0, start_step=11, num_steps=14))
    for a, b in zip(full[11:], resumed, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


def test_train_reads_prepared_files_in_a_fresh_process(tiny_dir: Path, tmp_path: Path) -> None:
    """The subprocess never imports the builder class: tfds reads dataset_info.json alone."""
    cfg = tmp_path / "tiny_tfds.yaml"
    cfg.write_text(
        "model: {name: mlp, hidden: [8]}\n"
        f"data: {{source: tfds, {tiny_data(tiny_dir, 'cache: none')}}}\n"
        "train: {batch_size: 16, steps: 3, log_every: 1, eval_every: 3}\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "accelctl", "train", str(cfg), "--run-dir", str(run_dir)]
        + ["--json", "-", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["data_cache"] == "none" and summary["steps"] == 3
    assert len(losses(run_dir)) == 3


# ------------------------------------------------------------------------------------- the CLI
def test_data_ls_lists_prepared_sets(tiny_dir: Path) -> None:
    result = runner.invoke(app, ["data", "ls", "--data-dir", str(tiny_dir), "--json", "-"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["data_dir"] == str(tiny_dir)
    [entry] = listing["datasets"]
    assert entry["name"] == tiny.NAME and entry["version"] == tiny.VERSION
    assert entry["config"] is None
    assert entry["splits"] == {"train": 200, "test": 12}
    assert entry["file_format"] == "array_record" and entry["random_access"] is True
    assert entry["bytes"] > 0 and entry["path"] == str(tiny_dir / tiny.NAME / tiny.VERSION)

    table = runner.invoke(app, ["data", "ls", "--data-dir", str(tiny_dir)])
    assert table.exit_code == 0, table.output
    assert tiny.NAME in table.output and "array_record" in table.output


def test_data_ls_of_an_empty_dir_says_how_to_prepare(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "ls", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "No prepared data sets" in result.output
    assert f"accelctl data prepare mnist --data-dir {tmp_path}" in result.output
    listing = runner.invoke(app, ["data", "ls", "--data-dir", str(tmp_path), "--json", "-"])
    assert json.loads(listing.stdout) == {"data_dir": str(tmp_path), "datasets": []}


def test_data_prepare_of_a_prepared_set_reports_it(tiny_dir: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", tiny.NAME, "--data-dir", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    assert "already prepared" in result.output and "train: 200, test: 12" in result.output
    result = runner.invoke(
        app, ["data", "prepare", tiny.NAME, "--data-dir", str(tiny_dir), "--json", "-"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["already_prepared"] is True and out["splits"] == {"train": 200, "test": 12}
    assert out["name"] == tiny.NAME and out["data_dir"] == str(tiny_dir)
    assert out["path"] == str(tiny_dir / tiny.NAME / tiny.VERSION)


def test_training_on_an_unprepared_set_exits_2_with_the_prepare_command(tmp_path: Path) -> None:
    data_dir = tmp_path / "empty_tfds"
    data_dir.mkdir()
    cfg = tmp_path / "mnist.yaml"
    cfg.write_text(f"data: {{source: tfds, name: mnist, data_dir: {data_dir}}}\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "accelctl", "train", str(cfg), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in ("mnist", str(data_dir), f"accelctl data prepare mnist --data-dir {data_dir}"):
        assert needle in proc.stderr, proc.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir())
    assert not any(data_dir.iterdir())  # opening it wrote nothing either


@pytest.fixture
def failing_download(monkeypatch: pytest.MonkeyPatch) -> Any:
    """failing_download(exc): make every builder's download_and_prepare raise `exc` (no network).

    Returns the list of builders it was called on.
    """
    calls: list[Any] = []

    def install(exc: BaseException) -> list[Any]:
        def download_and_prepare(self: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(self)
            raise exc

        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
        # Past prepare()'s own checks (TensorFlow importable, a download host reachable), so the
        # download itself is what fails.
        real_find_spec = tfds_source.importlib.util.find_spec
        monkeypatch.setattr(
            tfds_source.importlib.util,
            "find_spec",
            lambda name, *a: object() if name == "tensorflow" else real_find_spec(name, *a),
        )
        monkeypatch.setattr(tfds_source, "_unreachable", lambda: None)
        return calls

    return install


def test_offline_prepare_advises_copying_a_prepared_folder(
    failing_download: Any, tmp_path: Path
) -> None:
    calls = failing_download(
        requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='storage.googleapis.com', port=443): Max retries exceeded "
            "with url: /tfds-data/datasets/mnist (Caused by NameResolutionError: Failed to "
            "resolve 'storage.googleapis.com' ([Errno -2] Name or service not known))"
        )
    )
    result = runner.invoke(app, ["data", "prepare", "mnist", "--data-dir", str(tmp_path)])
    assert len(calls) == 1
    assert_user_error(
        result,
        "could not download and prepare mnist",
        str(tmp_path),
        "ConnectionError",
        "If this machine is offline",
        f"copy DIR/mnist into {tmp_path}",
    )


def test_prepare_without_tensorflow_advises_the_tfds_extra(
    failing_download: Any, tmp_path: Path
) -> None:
    calls = failing_download(ModuleNotFoundError("No module named 'tensorflow'"))
    result = runner.invoke(app, ["data", "prepare", "mnist", "--data-dir", str(tmp_path)])
    assert len(calls) == 1
    assert_user_error(result, "preparing mnist", "pip install -e", "[tfds]", "tensorflow")


def test_prepare_checks_tensorflow_and_the_network_before_creating_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import time

    data_dir = tmp_path / "tfds"
    # This machine has no TensorFlow: said at once, before tfds prints or writes anything.
    assert tfds_source.importlib.util.find_spec("tensorflow") is None
    result = runner.invoke(app, ["data", "prepare", "mnist", "--data-dir", str(data_dir)])
    assert_user_error(result, "needs TensorFlow", "[tfds]", "If this machine is offline")
    assert "Downloading" not in result.output and not data_dir.exists()
    # With TensorFlow but no network: a few seconds, not minutes of retries.
    real_find_spec = tfds_source.importlib.util.find_spec
    monkeypatch.setattr(
        tfds_source.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "tensorflow" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(tfds_source, "_PROBE_HOSTS", ("127.0.0.1",))  # port 443: nothing there
    t0 = time.monotonic()
    result = runner.invoke(app, ["data", "prepare", "mnist", "--data-dir", str(data_dir)])
    assert time.monotonic() - t0 < 20
    assert_user_error(result, "reaches none of the hosts", "127.0.0.1:443", "copy DIR/mnist")
    assert not data_dir.exists() or not any(data_dir.iterdir())


def test_a_failed_preparation_removes_what_it_created(
    failing_download: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "tfds"
    (data_dir / "downloads").mkdir(parents=True)
    (data_dir / "downloads" / "kept.txt").write_text("was here before")

    def partial(self: Any, *args: Any, **kwargs: Any) -> None:
        (data_dir / "downloads" / "mnist.tmp.123").write_bytes(b"half a download")
        (data_dir / "mnist" / "3.0.1").mkdir(parents=True)
        raise OSError("connection reset")

    failing_download(OSError("unused"))
    tfds.core.DatasetBuilder.download_and_prepare = partial  # restored by monkeypatch
    result = runner.invoke(app, ["data", "prepare", "mnist", "--data-dir", str(data_dir)])
    assert_user_error(result, "could not download and prepare mnist")
    assert sorted(p.name for p in data_dir.rglob("*")) == ["downloads", "kept.txt"]


def test_unknown_data_set_name_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load(tfds_config(f"name: mnsit, data_dir: {tmp_path}").data)
    assert "'mnsit'" in str(e.value) and "Did you mean mnist" in str(e.value)


def test_prepare_of_an_unknown_name_exits_2_with_a_suggestion(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["data", "prepare", "mnsit", "--data-dir", str(tmp_path)], catch_exceptions=False
    )
    assert_user_error(result, "mnsit", "Did you mean mnist")


# ------------------------------------------------------------------------- the shipped configs
@pytest.mark.parametrize(
    "name", ["mnist_mlp", "mnist_cnn", "fashion_mnist_cnn", "cifar10_resnet"], ids=str
)
def test_shipped_tfds_configs_train_on_mocked_data(
    mock_tfds: Any, tmp_path: Path, name: str
) -> None:
    # The real model, optimizer, augmentation and normalisation; only the size of the run shrinks.
    cfg = config.load(
        ROOT / "configs" / f"{name}.yaml",
        ["train.epochs=null", "train.steps=2", "train.batch_size=16"]
        + ["train.log_every=1", "train.eval_every=2"],
    )
    assert cfg.data.source == "tfds"
    summary = train(cfg, run_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 2 and summary["final_eval"]["count"] == MOCK_EXAMPLES
    assert np.isfinite(losses(tmp_path / "run")).all()


def test_data_errors_point_at_the_config_line(tmp_path: Path) -> None:
    from accelctl.train.job import build_job

    cfg = tfds_config(f"name: mnist, data_dir: {tmp_path}")
    with pytest.raises(config.ConfigError) as e:
        build_job(cfg)
    # tiny.yaml line 3 holds the data section; the message names the field and the fix.
    assert str(e.value).startswith("tiny.yaml:3:") and "data.name:" in str(e.value)
    assert f"accelctl data prepare mnist --data-dir {tmp_path}" in str(e.value)
