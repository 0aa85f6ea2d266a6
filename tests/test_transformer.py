"""The GPT-style transformer and the `tokens` data source: shapes, causality, parameter counts,
axis metadata, compute dtype, the synthetic and text token sets, and short training runs.

One tiny model shape (2 layers, 2 heads, width 16, vocab 11, T 8) is shared on purpose: every
new shape costs eager compiles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from accelctl import config, data, models
from accelctl.config import ConfigError
from accelctl.errors import FieldError
from accelctl.models.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
VOCAB, T, BATCH, WIDTH = 11, 8, 2, 16


def _tiny(seed: int = 0, **kw) -> Transformer:
    args = {"num_layers": 2, "num_heads": 2, "embed_dim": WIDTH, "max_len": T, **kw}
    return Transformer((T,), VOCAB, **args, rngs=nnx.Rngs(seed))


def _tokens(seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (BATCH, T), 0, VOCAB, jnp.int32)


def _params(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _num_params(model: nnx.Module) -> int:
    return sum(math.prod(v.shape) for _, v in _params(model))


# ----------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_logits_shape_and_causality(positions: str) -> None:
    model = _tiny(positions=positions)
    x = _tokens()
    logits = model(x, train=False)
    assert logits.shape == (BATCH, T, VOCAB) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    t = 5
    changed = model(x.at[:, t].set((x[:, t] + 1) % VOCAB), train=False)
    # Positions before t cannot see token t; position t itself must.
    np.testing.assert_array_equal(np.asarray(changed[:, :t]), np.asarray(logits[:, :t]))
    assert not np.allclose(np.asarray(changed[:, t]), np.asarray(logits[:, t]))


def test_rotary_and_learned_positions_differ_only_in_the_position_table() -> None:
    learned, rotary = _tiny(positions="learned"), _tiny(positions="rotary")
    assert _num_params(learned) - _num_params(rotary) == T * WIDTH
    assert "pos_embed" not in {path[0] for path, _ in _params(rotary)}
    # Rotary attention sees order: swapping two tokens changes the logits after them.
    x = _tokens()
    swapped = x.at[:, 0].set(x[:, 1]).at[:, 1].set(x[:, 0])
    assert not np.allclose(rotary(x, train=False)[:, -1], rotary(swapped, train=False)[:, -1])


def test_tied_and_untied_parameter_counts() -> None:
    def count(tie: bool) -> int:
        return _num_params(nnx.eval_shape(lambda: _tiny(tie_embeddings=tie)))

    assert count(False) - count(True) == VOCAB * WIDTH


def test_gpt_small_config_has_gpt2_small_parameter_count() -> None:
    cfg = config.load(ROOT / "configs" / "gpt_small.yaml")
    assert (cfg.data.seq_len, cfg.data.vocab_size) == (1024, 50257)
    assert cfg.model.tie_embeddings and cfg.model.num_layers == 12
    # Abstract init: shapes only, nothing is allocated or computed.
    model = nnx.eval_shape(
        lambda: models.build(cfg.model, (cfg.data.seq_len,), cfg.data.vocab_size, rngs=nnx.Rngs(0))
    )
    assert 123e6 <= _num_params(model) <= 125e6  # GPT-2 small: 124,439,808


def test_every_param_names_its_axes() -> None:
    model = nnx.eval_shape(lambda: _tiny(tie_embeddings=False))
    params = _params(model)
    for path, var in params:
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
    by_name = {"/".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in params}
    assert by_name["blocks/0/attn/query/kernel"] == ("embed", "heads")
    assert by_name["blocks/0/attn/out/kernel"] == ("heads", "embed")
    assert by_name["blocks/1/mlp_out/kernel"] == ("mlp", "embed")
    assert by_name["embed/embedding"] == ("vocab", "embed")
    assert by_name["head/kernel"] == ("embed", "vocab")


def test_bf16_compute_keeps_float32_params() -> None:
    model = _tiny(dtype=jnp.bfloat16)
    assert model(_tokens(), train=False).dtype == jnp.bfloat16
    assert {v.dtype for _, v in _params(model)} == {jnp.dtype(jnp.float32)}


def test_dropout_only_in_training() -> None:
    model, x = _tiny(dropout=0.5), _tokens()
    rngs = nnx.Rngs(dropout=1)
    np.testing.assert_array_equal(model(x, train=False), model(x, train=False))
    assert not np.allclose(model(x, train=True, rngs=rngs), model(x, train=False))


def test_sequence_longer_than_max_len_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sequence length 16 .* max_len 8"):
        Transformer(
            (16,), VOCAB, num_layers=1, num_heads=2, embed_dim=WIDTH, max_len=8, rngs=nnx.Rngs(0)
        )


def test_config_rejects_heads_that_do_not_divide_width() -> None:
    with pytest.raises(ConfigError, match="embed_dim 30 is not divisible by num_heads 4"):
        config.load_text("model: {name: transformer, embed_dim: 30, num_heads: 4}", "x.yaml")


def test_config_defaults() -> None:
    cfg = config.load_text("model: {name: transformer}\ndata: {source: tokens}", "x.yaml")
    assert cfg.model.mlp_dim is None and cfg.model.positions == "learned"
    assert (cfg.data.kind, cfg.data.seq_len, cfg.data.vocab_size) == ("synthetic", 128, 256)


# ------------------------------------------------------------------------------------------ data
def _data_cfg(text: str):
    return config.load_text(f"data: {text}", "x.yaml").data


def test_synthetic_tokens_shapes_shift_and_seed() -> None:
    cfg = _data_cfg("{source: tokens, seq_len: 12, vocab_size: 20, num_train: 64, num_eval: 16}")
    ds = data.build(cfg)
    assert ds.tokens and ds.num_classes == 20 and ds.x_scale is None
    assert ds.input_shape == (12,)
    for split, n in ((ds.train, 64), (ds.eval, 16)):
        assert split.x.shape == split.y.shape == (n, 12)
        assert split.x.dtype == split.y.dtype == np.int32
        np.testing.assert_array_equal(split.x[:, 1:], split.y[:, :-1])
        assert 0 <= split.x.min() and split.y.max() < 20
    again = data.build(cfg)
    np.testing.assert_array_equal(again.train.x, ds.train.x)
    # Learnable: each token is followed by only a few others (a peaked Markov chain).
    pairs = np.stack([ds.train.x.ravel(), ds.train.y.ravel()], axis=1)
    assert len(np.unique(pairs, axis=0)) <= 20 * 4


def test_synthetic_tokens_default_sizes() -> None:
    ds = data.build(_data_cfg("{source: tokens, seq_len: 4}"))
    assert (len(ds.train), len(ds.eval), ds.num_classes) == (4096, 256, 256)


def test_text_tokens_split_by_position(tmp_path) -> None:
    raw = bytes(range(256)) * 4  # 1024 distinct (position-identifying) byte pairs
    path = tmp_path / "t.txt"
    path.write_bytes(raw)
    cfg = _data_cfg(f"{{source: tokens, kind: text, path: '{path}', seq_len: 7}}")
    ds = data.build(cfg)
    assert ds.tokens and ds.num_classes == 256 and ds.name == "t"
    n_eval = round(len(raw) * 0.1)
    assert (len(ds.train), len(ds.eval)) == ((1024 - n_eval) // 8, n_eval // 8)
    for split in (ds.train, ds.eval):
        assert split.x.dtype == split.y.dtype == np.int32 and split.x.shape[1] == 7
        np.testing.assert_array_equal(split.x[:, 1:], split.y[:, :-1])
    # Windows are consecutive, non-overlapping slices of seq_len + 1 bytes.
    first = np.frombuffer(raw, np.uint8)[:8]
    np.testing.assert_array_equal(ds.train.x[0], first[:7])
    np.testing.assert_array_equal(ds.train.y[0], first[1:])
    # Eval windows come from the last 10% of the file only.
    eval_bytes = np.concatenate([ds.eval.x[:, :1], ds.eval.y], axis=1).ravel()
    tail = np.frombuffer(raw[len(raw) - n_eval :], np.uint8)
    np.testing.assert_array_equal(eval_bytes, tail[: len(eval_bytes)])
    train_bytes = np.concatenate([ds.train.x[:, :1], ds.train.y], axis=1).ravel()
    assert len(train_bytes) <= len(raw) - n_eval


def test_text_tokens_errors(tmp_path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FieldError, match="nope.txt does not exist") as e:
        data.build(_data_cfg(f"{{source: tokens, kind: text, path: '{missing}'}}"))
    assert e.value.path == ("data", "path")
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 100)
    with pytest.raises(FieldError, match="100 bytes: too short") as e:
        data.build(_data_cfg(f"{{source: tokens, kind: text, path: '{short}', seq_len: 16}}"))
    assert e.value.path == ("data", "path")
    with pytest.raises(ConfigError, match="kind: text needs path"):
        _data_cfg("{source: tokens, kind: text}")
    with pytest.raises(ConfigError, match="vocabulary is 256"):
        _data_cfg(f"{{source: tokens, kind: text, path: '{short}', vocab_size: 100}}")


def test_missing_text_file_is_a_located_cli_error(tmp_path) -> None:
    from typer.testing import CliRunner

    from accelctl.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {name: transformer, num_layers: 1, num_heads: 2, embed_dim: 16, max_len: 8}\n"
        f"data: {{source: tokens, kind: text, path: '{tmp_path / 'gone.txt'}', seq_len: 8}}\n"
    )
    result = CliRunner().invoke(app, ["train", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "data.path" in result.output and "gone.txt does not exist" in result.output


# ------------------------------------------------------------------------------------- training
_RUN = """
model: {{name: transformer, num_layers: 2, num_heads: 2, embed_dim: 32, max_len: 16}}
data: {data}
optimizer: {{name: adam, lr: 0.01}}
train: {{batch_size: 32, steps: 40, log_every: 10, eval_every: 40}}
checkpoint: {{enabled: false}}
"""


def _train(tmp_path: Path, data_text: str) -> tuple[float, float]:
    from accelctl.train import train

    cfg = config.load_text(_RUN.format(data=data_text), "run.yaml")
    run_dir = tmp_path / "run"
    train(cfg, run_dir=run_dir, quiet=True)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_train = next(e["loss"] for e in events if e["event"] == "train")
    final_eval = [e for e in events if e["event"] == "eval"][-1]
    assert final_eval["count"] > 0
    return first_train, final_eval["loss"]


def test_trains_on_synthetic_tokens(tmp_path) -> None:
    first, final = _train(
        tmp_path,
        "{source: tokens, seq_len: 16, vocab_size: 32, num_train: 512, num_eval: 48}",
    )
    assert final < math.log(32) and final < first


def test_trains_on_text(tmp_path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    first, final = _train(tmp_path, f"{{source: tokens, kind: text, path: '{path}', seq_len: 16}}")
    assert final < math.log(256) and final < first


def test_gpt_configs_load() -> None:
    tiny = config.load(ROOT / "configs" / "gpt_tiny.yaml")
    small = config.load(ROOT / "configs" / "gpt_small.yaml")
    for cfg in (tiny, small):
        assert cfg.model.name == "transformer" and cfg.data.source == "tokens"
        assert cfg.data.seq_len <= cfg.model.max_len
        assert cfg.train.batch_size % 8 == 0


@pytest.mark.parametrize(
    ("model", "data_text", "needle"),
    [
        ("{name: mlp}", "{source: tokens, seq_len: 8, vocab_size: 11}", "model.name"),
        ("{name: transformer, num_heads: 2, embed_dim: 16}", "{source: synthetic}", "data.source"),
        (
            "{name: transformer, num_heads: 2, embed_dim: 16, max_len: 8}",
            "{source: tokens, seq_len: 16}",
            "data.seq_len",
        ),
    ],
)
def test_model_and_data_mismatches_are_located_config_errors(model, data_text, needle) -> None:
    from accelctl.train.job import build_job

    cfg = config.load_text(f"model: {model}\ndata: {data_text}\n", "m.yaml")
    with pytest.raises(ConfigError, match=needle):
        build_job(cfg)


# ----------------------------------------------------------------------------------- strategies
_STRATEGY_RUN = """
model: {name: transformer, num_layers: 2, num_heads: 2, embed_dim: 16, max_len: 8}
data: {source: tokens, seq_len: 8, vocab_size: 11, num_train: 256, num_eval: 32}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 16, steps: 6, log_every: 1, eval_every: null}
checkpoint: {enabled: false}
"""


def _strategy_losses(tmp_path: Path, overrides: list[str]) -> tuple[dict, list[float]]:
    from accelctl.train import train

    cfg = config.load_text(_STRATEGY_RUN, "s.yaml", overrides)
    summary = train(cfg, run_dir=tmp_path, quiet=True)
    events = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    return summary, [e["loss"] for e in events if e["event"] == "train"]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory) -> list[float]:
    _, ref = _strategy_losses(tmp_path_factory.mktemp("one"), ["parallel.num_devices=1"])
    assert ref[-1] < ref[0]
    return ref


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("dp", []),
        ("fsdp", ["parallel.strategy=fsdp"]),
        ("tp", ["parallel.strategy=tp", "parallel.mesh={data: 4, model: 2}"]),
        ("pmap", ["parallel.strategy=pmap"]),
    ],
)
def test_transformer_trains_alike_under_every_strategy(
    strategy, extra, one_device_losses, tmp_path
) -> None:
    summary, got = _strategy_losses(tmp_path, extra)
    assert summary["strategy"] == strategy and summary["devices"] == 8
    np.testing.assert_allclose(got, one_device_losses, rtol=5e-5, atol=5e-6)


# --- remat and the attention kernel --------------------------------------------------------------

_REMAT_RUN = """
model: {name: transformer, num_layers: 2, num_heads: 2, embed_dim: 16, max_len: 8, dropout: 0.1}
data: {source: tokens, seq_len: 8, vocab_size: 11, num_train: 256, num_eval: 32, cache: host}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 32, steps: 3}
"""


def test_remat_keeps_the_losses() -> None:
    from tests.test_models import remat_losses

    plain = remat_losses(_REMAT_RUN, "none")
    for mode in ("full", "dots"):
        np.testing.assert_allclose(remat_losses(_REMAT_RUN, mode), plain, rtol=1e-6, atol=1e-6)


def test_remat_saves_less_for_the_backward_pass() -> None:
    """What the backward pass keeps (the residuals of jax.vjp, the leaves of the function it
    returns): per-block full remat keeps little more than each block's input, dots keeps the
    matmul outputs too. This is what remat changes, on any backend.

    The compiled temporaries are not compared here (the ResNet's are, in test_models.py): XLA:CPU
    recomputes a transformer block's activations as early as the originals, so its compiled
    temporaries do not shrink under remat (with jax 0.10 only its memory-optimised scheduler
    showed it, with jax 0.11 not even that); GPU schedulers are memory-aware, and
    scripts/gpu_check.sh plans gpt_small with remat none and dots on the GPU."""
    saved = {}
    x = jax.random.randint(jax.random.key(0), (8, 64), 0, VOCAB, jnp.int32)
    for mode in ("none", "full", "dots"):
        model = Transformer(
            (64,), VOCAB, num_layers=4, num_heads=2, embed_dim=32, max_len=64, remat=mode,
            rngs=nnx.Rngs(0),
        )  # fmt: skip
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p, graphdef=graphdef, rest=rest):
            return jnp.sum(nnx.merge(graphdef, p, rest)(x, train=False))

        _, backward = jax.vjp(f, params)
        params_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
        saved[mode] = sum(a.nbytes for a in jax.tree.leaves(backward)) - params_bytes
    assert saved["full"] < 0.1 * saved["none"], saved
    assert saved["full"] < saved["dots"] < 0.5 * saved["none"], saved


def test_attention_xla_and_auto_give_the_same_logits() -> None:
    x = _tokens()
    auto, xla = _tiny(), _tiny(attention="xla")
    assert auto.blocks[0].attn.implementation is None
    assert xla.blocks[0].attn.implementation == "xla"
    np.testing.assert_array_equal(auto(x, train=False), xla(x, train=False))
    with pytest.raises(ValueError, match="unknown attention"):
        _tiny(attention="flash")
    with pytest.raises(ValueError, match="unknown remat"):
        _tiny(remat="sometimes")


def test_cudnn_attention_on_cpu_is_a_located_config_error(tmp_path) -> None:
    from accelctl.train.job import build_job

    path = tmp_path / "gpt.yaml"
    path.write_text(_REMAT_RUN.replace("dropout: 0.1}", "dropout: 0.1, attention: cudnn}"))
    cfg = config.load(path)
    assert cfg.model.attention == "cudnn"
    with pytest.raises(ConfigError, match="NVIDIA GPUs only") as e:
        build_job(cfg, compile_train=False)
    assert f"{path}:2:" in str(e.value) and "model.attention" in str(e.value)
    assert config.load_text(_REMAT_RUN, "g.yaml").model.attention == "auto"
