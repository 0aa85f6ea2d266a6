"""Flat weight names, filling a state from a flat dict (strict, include/exclude, dtypes), the
safetensors / npz files and their errors, and the digest."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from accelctl import weights
from accelctl.errors import UserError
from accelctl.models.transformer import Transformer
from accelctl.train.state import digest

BF16 = np.dtype(ml_dtypes.bfloat16)


class _Net(nnx.Module):
    """Eleven layers (so list index 10 sorts after 9), a BatchNorm and an nnx.Rngs."""

    def __init__(self, rngs: nnx.Rngs, out: int = 3) -> None:
        self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(11)])
        self.bn = nnx.BatchNorm(2, rngs=rngs)
        self.head = nnx.Linear(2, out, rngs=rngs)
        self.rngs = nnx.Rngs(3)


def _net(seed: int = 0, out: int = 3) -> _Net:
    net = _Net(nnx.Rngs(seed), out)
    # Non-trivial statistics, so a test notices when they are not carried.
    net.bn.mean.set_value(jnp.arange(2.0) + seed)
    return net


def _abstract(out: int = 3) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: _net(out=out)))


def _assert_flat_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


# ------------------------------------------------------------------------------------- names
def test_transformer_names_follow_the_module_paths() -> None:
    model = Transformer(
        (4,), 7, num_layers=1, num_heads=2, embed_dim=8, max_len=4, rngs=nnx.Rngs(0)
    )
    flat = weights.flatten_state(nnx.state(model))
    block = [
        f"blocks.0.{m}.{p}"
        for m, ps in {
            "attn.key": ("bias", "kernel"),
            "attn.out": ("bias", "kernel"),
            "attn.query": ("bias", "kernel"),
            "attn.value": ("bias", "kernel"),
            "ln1": ("bias", "scale"),
            "ln2": ("bias", "scale"),
            "mlp_in": ("bias", "kernel"),
            "mlp_out": ("bias", "kernel"),
        }.items()
        for p in ps
    ]
    assert list(flat) == [
        *block,
        "embed.embedding",
        "ln_f.bias",
        "ln_f.scale",
        "pos_embed.embedding",
    ]
    assert flat["blocks.0.attn.query.kernel"].shape == (8, 8)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in flat.values())


def test_names_cover_model_state_skip_rng_state_and_keep_tree_order() -> None:
    net = _net()
    flat = weights.flatten_state(nnx.state(net))
    assert "bn.mean" in flat and "bn.var" in flat and "bn.scale" in flat
    assert not any(n.startswith("rngs.") for n in flat)
    layers = [n for n in flat if n.startswith("layers.")]
    assert layers[-4:] == ["layers.9.bias", "layers.9.kernel", "layers.10.bias", "layers.10.kernel"]
    np.testing.assert_array_equal(flat["bn.mean"], [0.0, 1.0])


def test_digest_flat_equals_the_run_digest_in_any_dict_order() -> None:
    net = _net()
    _, params, rest = nnx.split(net, nnx.Param, ...)
    p, r = weights.flatten_state(params), weights.flatten_state(rest)
    assert weights.digest_flat(p) == digest(params)
    # params_sha256 of a run: digest((params, model_state)); the RNG state is not a weight.
    _, params, bn, _ = nnx.split(net, nnx.Param, nnx.BatchStat, ...)
    assert weights.digest_flat(p, r) == digest((params, bn))
    shuffled = dict(reversed(list(p.items())))
    assert weights.digest_flat(shuffled) == weights.digest_flat(p)
    p["head.bias"] = p["head.bias"] + 1
    assert weights.digest_flat(p) != digest(params)


# ---------------------------------------------------------------------------- unflatten_into
def test_round_trip_into_an_abstract_state_is_bit_exact() -> None:
    src = nnx.state(_net(seed=1))
    flat = weights.flatten_state(src)
    state, report = weights.unflatten_into(_abstract(), flat)
    assert sorted(report.loaded) == sorted(flat) and not report.kept and not report.cast
    _assert_flat_equal(weights.flatten_state(state), flat)
    # Variable types survive, so the state splits into params and model state as before.
    types = {tuple(p): type(v) for p, v in nnx.to_flat_state(state)}
    assert types[("bn", "mean")] is nnx.BatchStat and types[("head", "kernel")] is nnx.Param
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: _net())), state)
    y = model.head(jnp.ones((1, 2)))
    np.testing.assert_array_equal(y, _net(seed=1).head(jnp.ones((1, 2))))


def test_strict_lists_every_problem_in_one_error() -> None:
    flat = weights.flatten_state(nnx.state(_net()))
    del flat["layers.3.bias"], flat["bn.var"]
    flat["layers.5.kernel"] = np.zeros((3, 2), np.float32)
    flat["head.kernel"] = flat["head.kernel"].astype(np.int32)
    flat["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(UserError) as e:
        weights.unflatten_into(_abstract(), flat)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "5 problems" in msg
    assert "layers.3.bias: missing" in msg and "bn.var: missing" in msg
    assert "layers.5.kernel: shape (3, 2) in the file, (2, 2) in the model" in msg
    assert "head.kernel: dtype int32 in the file, float32 in the model" in msg
    assert "extra.weight: in the file but not in the model" in msg


def test_exclude_keeps_fresh_values_and_needs_nothing_from_the_file() -> None:
    # Fine-tuning on another number of classes: the head has another shape and is excluded.
    flat = weights.flatten_state(nnx.state(_net(seed=1, out=3)))
    fresh = nnx.state(_net(seed=2, out=5))
    state, report = weights.unflatten_into(fresh, flat, exclude=["head.*"])
    got = weights.flatten_state(state)
    assert sorted(report.kept) == ["head.bias", "head.kernel"]
    assert sorted(report.ignored) == ["head.bias", "head.kernel"]
    np.testing.assert_array_equal(got["head.kernel"], weights.flatten_state(fresh)["head.kernel"])
    np.testing.assert_array_equal(got["layers.0.kernel"], flat["layers.0.kernel"])
    # An excluded name also need not be in the file at all.
    del flat["head.kernel"], flat["head.bias"]
    weights.unflatten_into(fresh, flat, exclude=["head.*"])


def test_include_loads_only_the_matching_names() -> None:
    flat = weights.flatten_state(nnx.state(_net(seed=1)))
    fresh = nnx.state(_net(seed=2))
    state, report = weights.unflatten_into(fresh, flat, include=["bn.mean", "layers.1?.*"])
    assert report.loaded == ["bn.mean", "layers.10.bias", "layers.10.kernel"]
    assert "layers.0.bias" in report.kept and "layers.0.bias" in report.ignored
    got = weights.flatten_state(state)
    np.testing.assert_array_equal(got["bn.mean"], flat["bn.mean"])
    np.testing.assert_array_equal(got["bn.var"], weights.flatten_state(fresh)["bn.var"])


def test_include_with_a_missing_selected_name_is_refused_when_strict() -> None:
    flat = weights.flatten_state(nnx.state(_net(seed=1)))
    with pytest.raises(UserError, match="bn.var: missing"):
        weights.unflatten_into(nnx.state(_net()), {"bn.mean": flat["bn.mean"]}, include=["bn.*"])


def test_a_pattern_that_matches_nothing_is_an_error_when_strict() -> None:
    flat = weights.flatten_state(nnx.state(_net()))
    with pytest.raises(UserError, match="pattern 'heads.\\*' matches no array name"):
        weights.unflatten_into(nnx.state(_net()), flat, exclude=["heads.*"])


def test_not_strict_keeps_missing_and_ignores_unknown() -> None:
    flat = weights.flatten_state(nnx.state(_net(seed=1)))
    del flat["bn.var"]
    flat["other"] = np.zeros(2, np.float32)
    fresh = nnx.state(_net(seed=2))
    state, report = weights.unflatten_into(fresh, flat, strict=False)
    assert report.kept == ["bn.var"] and report.ignored == ["other"]
    assert "kept 1" in report.summary() and "ignored 1" in report.summary()
    # Shapes must still fit: a wrong shape is never silently skipped.
    flat["bn.mean"] = np.zeros(3, np.float32)
    with pytest.raises(UserError, match=r"bn.mean: shape \(3,\)"):
        weights.unflatten_into(fresh, flat, strict=False)


def test_an_abstract_leaf_that_gets_no_value_is_an_error() -> None:
    flat = weights.flatten_state(nnx.state(_net()))
    with pytest.raises(UserError, match="head.bias: not selected .* no initial value"):
        weights.unflatten_into(_abstract(), flat, exclude=["head.*"])


def test_bf16_file_into_fp32_state_is_cast_and_reported() -> None:
    flat = weights.cast_flat(weights.flatten_state(nnx.state(_net(seed=1))), "bf16")
    assert {a.dtype for a in flat.values()} == {BF16}
    state, report = weights.unflatten_into(_abstract(), flat)
    got = weights.flatten_state(state)
    assert {a.dtype for a in got.values()} == {np.dtype(np.float32)}
    assert len(report.cast) == len(flat) and report.cast[0][1:] == ("bfloat16", "float32")
    assert f"cast {len(flat)} bfloat16 -> float32" in report.summary()
    np.testing.assert_array_equal(got["head.kernel"], flat["head.kernel"].astype(np.float32))


# ------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_save_load_round_trip(tmp_path: Path, fmt: str, dtype: str | None) -> None:
    flat = weights.flatten_state(nnx.state(_net(seed=1)))
    flat["steps"] = np.arange(3, dtype=np.int32)  # integers are never converted
    path = tmp_path / f"w.{fmt}"
    meta = {"sha256": weights.digest_flat(flat), "run": "runs/x"}
    weights.save(path, flat, metadata=meta, format=fmt, dtype=dtype)
    got, got_meta = weights.load(path)
    want = weights.cast_flat(flat, dtype)
    assert got_meta == meta | {"arrays_sha256": weights.digest_flat(want)}
    assert (got_meta["arrays_sha256"] == meta["sha256"]) == (dtype is None)
    assert got["steps"].dtype == np.int32
    assert got["head.kernel"].dtype == (BF16 if dtype else np.float32)
    _assert_flat_equal({n: got[n] for n in want}, want)
    assert set(got) == set(want)
    assert not list(tmp_path.glob(".*tmp*"))


def test_safetensors_file_is_standard(tmp_path: Path) -> None:
    """The header is plain safetensors: other tools read the dtypes, shapes and metadata."""
    flat = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, BF16)}
    path = tmp_path / "w.safetensors"
    weights.save(path, flat, metadata={"k": "v"}, header={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["a"]["dtype"] == "F32" and header["a"]["shape"] == [2, 3]
    assert header["b"]["dtype"] == "BF16"
    digest = weights.digest_flat(flat)
    assert header["__metadata__"] == {
        "format": "pt",
        "accelctl": json.dumps({"arrays_sha256": digest, "k": "v"}),
    }
    assert weights.load(path)[1] == {"format": "pt", "k": "v", "arrays_sha256": digest}


def test_unknown_format_and_dtype_are_user_errors(tmp_path: Path) -> None:
    flat = {"a": np.ones(2, np.float32)}
    with pytest.raises(UserError, match="unknown format 'h5'"):
        weights.save(tmp_path / "x", flat, metadata={}, format="h5")
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        weights.save(tmp_path / "x", flat, metadata={}, dtype="fp8")
    with pytest.raises(UserError, match="cannot write"):
        weights.save(tmp_path / "no" / "dir" / "x", flat, metadata={})


def _safetensors_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "good.safetensors"
    weights.save(path, {"a": np.arange(64, dtype=np.float32)}, metadata={})
    return path.read_bytes()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "0 bytes long: too short"),
        (b"hello world, not weights", "neither safetensors"),
        (struct.pack("<Q", 50) + b'{"a": 1}', "truncated: its safetensors header needs 50 bytes"),
        (struct.pack("<Q", 8) + b"not json", "the header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", "header that is not a JSON object"),
        ("cut", "truncated: its arrays need"),
        ("bad_dtype", "not valid safetensors"),
        ("flipped", "corrupt: its arrays do not match the digest"),
        (struct.pack("<Q", 16) + b'{"a": {"x": 1}} ', "without valid data_offsets"),
        (b"PK\x03\x04 a broken zip", "damaged npz"),
    ],
)
def test_malformed_files_are_user_errors(tmp_path: Path, content, needle: str) -> None:
    if content == "cut":
        content = _safetensors_bytes(tmp_path)[:-10]
    elif content == "bad_dtype":
        content = _safetensors_bytes(tmp_path).replace(b'"F32"', b'"X32"')
    elif content == "flipped":  # one bit of the last array value
        raw = bytearray(_safetensors_bytes(tmp_path))
        raw[-1] ^= 1
        content = bytes(raw)
    path = tmp_path / "w.bin"
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle) as e:
        weights.load(path)
    assert str(path) in str(e.value)


def test_missing_file_and_non_array_npz_member(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        weights.load(tmp_path / "nope.safetensors")
    path = tmp_path / "obj.npz"
    np.savez(path, a=np.ones(2), o=np.array([{"x": 1}], dtype=object))
    with pytest.raises(UserError, match="not a numeric array"):
        weights.load(path)
    path = tmp_path / "str.npz"
    np.savez(path, a=np.ones(2), s=np.array(["text"]))
    with pytest.raises(UserError, match="member 's' of dtype <U4"):
        weights.load(path)


def test_npz_without_metadata_loads(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones((2, 2), np.float32))
    flat, meta = weights.load(path)
    assert meta == {} and flat["w"].shape == (2, 2)
    assert zipfile.is_zipfile(path)


def test_loaded_file_fills_the_state_sharded_later(tmp_path: Path) -> None:
    """The filled state is host arrays: the caller places them, e.g. replicated on a mesh."""
    flat = weights.flatten_state(nnx.state(_net(seed=1)))
    weights.save(tmp_path / "w.safetensors", flat, metadata={})
    state, _ = weights.unflatten_into(_abstract(), weights.load(tmp_path / "w.safetensors")[0])
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # The RNG state of the abstract target stays abstract: it is not a weight.
    weights_only = nnx.filter_state(state, nnx.Not(nnx.RngState))
    placed = jax.device_put(weights_only, replicated)
    assert weights.digest_flat(weights.flatten_state(placed)) == weights.digest_flat(flat)
