from pathlib import Path

import pytest

from accelctl import config
from accelctl.config import ConfigError, load_text

ROOT = Path(__file__).resolve().parents[1]


def error(text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_text(text, "c.yaml", overrides)
    return str(e.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config.load(path)
    again = load_text(cfg.to_yaml(), "resolved.yaml")  # the resolved config round-trips
    assert again.model_dump() == cfg.model_dump()


def test_defaults_and_seeds_mnist_model():
    cfg = load_text("model: {name: mlp, hidden: [64], activation: relu}")
    assert cfg.model.hidden == (64,) and cfg.data.source == "digits"
    assert cfg.train.batch_size == 128 and cfg.parallel.strategy == "dp"


def test_unknown_key_suggests_nearest_with_line():
    msg = error("model:\n  name: mlp\n  hiden: [3]\n")
    assert "c.yaml:3:3" in msg and "model.hiden" in msg and "Did you mean 'hidden'" in msg


def test_unknown_section_suggests():
    msg = error("trian: {}\n")
    assert "c.yaml:1:1" in msg and "Did you mean 'train'" in msg


def test_invalid_value_names_field_and_line():
    msg = error("train:\n  batch_size: abc\n")
    assert "c.yaml:2:15" in msg and "train.batch_size" in msg


def test_negative_and_cross_field_errors():
    assert "train.batch_size" in error("train: {batch_size: -4}")
    assert "either epochs or steps" in error("train: {epochs: 2, steps: 3}")
    assert "nesterov" in error("optimizer: {name: adam, nesterov: true}")
    assert "piecewise" in error("schedule: {name: piecewise, boundaries: [5]}")
    assert "kernels" in error("model: {name: cnn, channels: [4], kernels: [3, 3]}")


def test_union_tag_errors():
    msg = error("model:\n  name: mlpp\n")
    assert "c.yaml:2:9" in msg and "model.name" in msg and "did you mean 'mlp'" in msg
    assert "choose one of mlp, cnn" in error("model: {hidden: [3]}")
    assert "data.path" in error("data: {source: npz}")  # required by the npz source


def test_duplicate_key_is_an_error():
    msg = error("train:\n  batch_size: 8\n  batch_size: 16\n")
    assert "c.yaml:3:3" in msg and "duplicate key" in msg and "line 2" in msg


def test_yaml_syntax_error_has_position():
    msg = error("model: [1, 2\n")
    assert msg.startswith("c.yaml:") and "YAML error" in msg


@pytest.mark.parametrize(
    "text", ["x: !!python/object/apply:os.system [echo hi]", "x: !!python/name:os.system"]
)
def test_python_tags_never_execute(text):
    assert "c.yaml:1:4" in error(text)


def test_top_level_must_be_mapping():
    assert "mapping" in error("- 1\n- 2\n")


def test_overrides_parse_yaml_scalars_and_validate():
    cfg = load_text(
        "optimizer: {lr: 0.1}",
        "c.yaml",
        ["optimizer.lr=3e-4", "model.hidden=[32, 16]", "train.eval_every=null", "model.name=mlp"],
    )
    assert (
        cfg.optimizer.lr == 3e-4 and cfg.model.hidden == (32, 16) and cfg.train.eval_every is None
    )
    msg = error("", ["optimizer.lr=abc"])
    assert "--set optimizer.lr=abc" in msg and "optimizer.lr" in msg
    msg = error("", ["optimizer.lrr=1"])
    assert "--set optimizer.lrr=1" in msg and "Did you mean 'lr'" in msg
    assert "KEY=VALUE" in error("", ["optimizer.lr"])
    assert "is a value, not a section" in error("", ["optimizer.lr=1", "optimizer.lr.x=2"])


def test_error_at_points_to_the_line():
    cfg = load_text("train:\n  batch_size: 12\n", "c.yaml")
    assert str(cfg.error_at(("train", "batch_size"), "bad")) == "c.yaml:2:15: train.batch_size: bad"


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("/nonexistent/x.yaml")


def test_config_is_frozen():
    cfg = load_text("")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        cfg.train.batch_size = 3  # type: ignore[misc]


def test_steps_config_round_trips():
    cfg = load_text("train: {steps: 5}")
    assert cfg.train.steps == 5 and cfg.train.epochs is None
    assert load_text(cfg.to_yaml()).model_dump() == cfg.model_dump()
    assert load_text("").train.epochs == 10
