import re
import time
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


# ------------------------------------------------------------- hostile or broken YAML, bad numbers
def timed_error(text: str, overrides=(), limit_s: float = 1.0) -> str:
    start = time.perf_counter()
    msg = error(text, overrides)
    assert time.perf_counter() - start < limit_s, msg
    return msg


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x9b", "\ufffe", "\ud800"])
def test_control_character_is_located(char):
    msg = timed_error(f"train:\n  seed: 1{char}\n")
    assert msg.startswith("c.yaml:2:10:") and f"U+{ord(char):04X}" in msg
    assert char not in msg  # escaped, so the terminal does not act on it


def test_tab_newline_and_cr_are_fine():
    assert load_text("train:\r\n  seed: 1 # a\tcomment\r\n").train.seed == 1


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: *a}\n", "a: &a {<<: *a}\n"])
def test_self_referencing_alias_is_a_cycle_error(text):
    msg = timed_error(text)
    assert msg.startswith("c.yaml:1:") and "*a is inside its own anchor &a" in msg


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_deep_nesting_is_refused_before_the_parser_recurses(opening, closing):
    for levels in (500, 5000):  # libyaml (if used) scans runs of over 1000 ahead and stops
        msg = timed_error("x: " + opening * levels + "1" + closing * levels)
        assert msg.startswith("c.yaml:1:") and "nested more than 64" in msg
    # The root mapping is level 1: 63 lists under it are the most allowed.
    assert "nested more than 64" in timed_error("x: " + "[" * 64 + "]" * 64)
    assert "c.yaml:1:1: x: unknown field" in timed_error("x: " + "[" * 63 + "]" * 63)


def test_aliases_cannot_nest_deeper_than_the_limit():
    chain = ["a0: &a0 " + "[" * 30 + "]" * 30]
    chain += [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 3)]  # a2 is 32 levels high
    chain.append("a9: " + "[" * 40 + "*a2" + "]" * 40)  # each line alone is under 64
    msg = timed_error("\n".join(chain))
    assert msg.startswith("c.yaml:4:") and "nested more than 64" in msg


def test_alias_bomb_fails_fast():
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    msg = timed_error("\n".join(lines), limit_s=0.5)  # 9**10 values if expanded
    assert re.match(r"c\.yaml:\d+:\d+: the config grows to more than 20,000 values", msg)
    merges = ["m0: &m0 {x: 1}"]
    merges += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], y{i}: 1}}" for i in range(1, 40)]
    assert "more than 20,000 values" in timed_error("\n".join(merges), limit_s=0.5)


def test_merge_keys_are_overridden_by_explicit_keys():
    cfg = load_text("train: {<<: {seed: 3, batch_size: 8}, batch_size: 16}")
    assert (cfg.train.seed, cfg.train.batch_size) == (3, 16)
    assert "takes a mapping" in error("train: {<<: 3}")


def test_oversized_text_and_file(tmp_path):
    huge = "# " + "x" * (1 << 20)
    assert "at most 1,048,576" in timed_error(huge)
    path = tmp_path / "big.yaml"
    path.write_text(huge)
    with pytest.raises(ConfigError, match=r"big\.yaml: the file is larger than 1,048,576 bytes"):
        config.load(path)


def test_file_that_is_not_utf8_is_located(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml:2:16: the file is not UTF-8 text"):
        config.load(path)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrain: {seed: 4}\n")
    assert config.load(bom).train.seed == 4


def test_path_with_nul_is_a_config_error():
    with pytest.raises(ConfigError, match="NUL"):
        config.load("a\x00b.yaml")


@pytest.mark.parametrize(
    "text", ["train: {seed: " + "9" * 5000 + "}", "train: {seed: 0x" + "f" * 200 + "}"]
)
def test_numbers_with_thousands_of_digits(text):
    msg = timed_error(text)
    assert msg.startswith("c.yaml:1:15: train.seed: a number") and "at most 100" in msg


@pytest.mark.parametrize(
    "text, kind",
    [
        ("x: !!int ''", "int"),
        ("x: !!bool maybe", "bool"),
        ("x: 2001-13-45", "timestamp"),
        ("x: 0x_", "int"),
        ("x: !!float abc", "float"),
        ("x: !!timestamp abc", "timestamp"),
    ],
)
def test_scalars_pyyaml_cannot_construct_are_located(text, kind):
    assert re.match(rf"c\.yaml:1:4: x: '.*' is not a valid {kind}", timed_error(text))


@pytest.mark.parametrize(
    "text", ["? [a]\n: 1\n", "{? {a: 1} : 2}", "null: 1", "2001-01-01: 1", "x: !!binary 'abc'"]
)
def test_keys_and_tags_that_are_not_plain_are_located(text):
    assert re.match(r"c\.yaml:1:\d+: ", timed_error(text))


def test_duplicate_anchor_undefined_alias_and_second_document():
    assert "c.yaml:2:4: the anchor &a is defined again" in error("a: &a 1\nb: &a 2\n")
    assert "c.yaml:1:4: the alias *b has no anchor" in error("a: *b\n")
    assert "c.yaml:2:1: a second YAML document" in error("a: 1\n---\nb: 2\n")


@pytest.mark.parametrize(
    "item",
    [
        "train.seed=" + "9" * 5000,
        "model.hidden=" + "[" * 5000,
        "model.hidden=" + "[" * 100 + "]" * 100,
        "data.mean={" * 3000,
        "train.seed=1\x00",
        "train.seed=&a [*a]",
        "." * 100 + "=1",
        ".".join(["a"] * 100) + "=1",
    ],
)
def test_bad_set_values_name_the_item(item):
    msg = timed_error("", [item])
    assert "--set " + item[:10] in msg and "\x00" not in msg
    assert len(msg) < 600  # a huge item is cut, not echoed whole


def test_long_lists_of_errors_are_cut():
    msg = error("model: {name: mlp, hidden: [" + ", ".join(["a"] * 500) + "]}")
    assert msg.count("model.hidden[") == 20 and "... and 480 more" in msg


@pytest.mark.parametrize(
    "text, field, words",
    [
        ("train: {seed: -1}", "train.seed", "greater than or equal to 0"),
        ("train: {seed: 18446744073709551616}", "train.seed", "less than or equal to 4294967295"),
        ("train: {seed: 4294967296}", "train.seed", "less than or equal to 4294967295"),
        ("data: {source: digits, split_seed: -1}", "data.split_seed", "greater than or equal"),
        ("data: {source: synthetic, seed: 9223372036854775808}", "data.seed", "less than"),
        ("data: {source: tokens, seed: -5}", "data.seed", "greater than"),
        ("train: {steps: 2147483648}", "train.steps", "less than or equal to 2147483647"),
        ("train: {batch_size: 2147483648}", "train.batch_size", "less than or equal"),
        ("train: {epochs: 0}", "train.epochs", "greater than or equal to 1"),
        ("schedule: {warmup_steps: 2147483648}", "schedule.warmup_steps", "less than"),
        ("schedule: {name: step, step_every: 2147483648}", "schedule.step_every", "less than"),
        ("data: {source: tokens, vocab_size: 16777217}", "data.vocab_size", "less than"),
        ("model: {name: transformer, max_len: 1048577}", "model.max_len", "less than"),
        ("model: {name: mlp, hidden: [1048577]}", "model.hidden[0]", "less than"),
        ("data: {source: synthetic, shape: [2000000]}", "data.shape[0]", "less than"),
        ("data: {source: synthetic, shape: [65536, 65536]}", "data", "at most 2^31-1"),
        ("parallel: {mesh: {data: -2}}", "parallel.mesh.data", "greater than or equal to -1"),
        ("precision: {growth_interval: 2147483648}", "precision.growth_interval", "less than"),
        ("precision: {loss_scale: 1.0e+300}", "precision.loss_scale", "less than"),
        ("optimizer: {lr: .inf}", "optimizer.lr", "finite number"),
        ("optimizer: {lr: .nan}", "optimizer.lr", "finite number"),
        ("optimizer: {weight_decay: .inf}", "optimizer.weight_decay", "finite number"),
        ("schedule: {end_factor: .inf}", "schedule.end_factor", "finite number"),
        ("data: {source: digits, mean: [-.inf], std: [1]}", "data.mean[0]", "finite number"),
        ("checkpoint: {keep: 2147483648}", "checkpoint.keep", "less than"),
        ('output: {name: "run\\0"}', "output.name", "control character U+0000"),
    ],
)
def test_numbers_and_names_out_of_range(text, field, words):
    msg = error(text)
    assert re.search(rf"c\.yaml:1:\d+: {re.escape(field)}: .*{re.escape(words)}", msg), msg


@pytest.mark.parametrize(
    "text",
    [
        "train: {seed: 4294967295, steps: 2147483647, batch_size: 2147483647}",
        "data: {source: tokens, vocab_size: 16777216, seq_len: 1048576}",
        "model: {name: transformer, max_len: 1048576}\ndata: {source: tokens}",
        "parallel: {mesh: {data: 1048576}}",
    ],
)
def test_range_boundaries_are_accepted(text):
    load_text(text)
