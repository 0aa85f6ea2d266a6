"""The user's own model, named by an import path instead of a built-in name.

```yaml
model:
  target: ./nets.py:Net          # a file (relative to the config's folder) or package.module:Net
  args: {hidden: 64, num_classes: 10}
```

The call contract
-----------------
`Name` is a Flax NNX `nnx.Module` subclass, a function returning an `nnx.Module`, or a
`flax.linen.Module` subclass. accelctl treats it exactly like a built-in model:

- **Construction**: `Name(**args, rngs=nnx.Rngs(key))`, plus `dtype=` (the compute dtype from
  `precision.compute`) and `param_dtype=float32` when its signature names them. accelctl does
  not pass the input shape or the class count: state them in `args`. `args` are checked against
  the signature before the call.
- **Call**: `model(x, train=True|False, rngs=nnx.Rngs(dropout=key))` returns logits. `train` is
  required; `rngs` is passed only when `__call__` has an `rngs` parameter (a fresh key every step,
  derived from `train.seed` and the step, so runs and resumes are reproducible; it is None when
  evaluating). `x` is (batch, *example_shape) float32, already scaled and normalised
  (`data.mean`/`data.std`); token data gives int32 ids (batch, T).
- **Output**: logits (batch, num_classes) for class labels; (batch, T, vocab) per-position
  logits for token data. This is checked on an abstract batch before anything is compiled.
- **State**: variables other than `nnx.Param` (e.g. `nnx.BatchNorm`'s statistics) are model
  state: updated by training steps, used as they are by evaluation, checkpointed and averaged
  over devices under pmap, like the built-in models'.
- **Tensor parallelism** (`parallel.strategy: tp`): name the axes of your weights with logical
  names, `nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))` as a
  `kernel_init`, or `kernel_metadata={"out_sharding": ("embed", "mlp")}`. "mlp" and "heads" are
  split over the model axis, "embed" and "vocab" stay whole; "model" names the mesh axis
  directly. Models are built inside `nnx.use_eager_sharding(False)`, so the names need no mesh.
- **Linen**: a `flax.linen.Module` class whose `__call__(self, x, train: bool = False)` uses
  `nn.Dropout(deterministic=not train)` / `nn.BatchNorm(use_running_average=not train)` works
  unchanged: it is wrapped with `nnx.bridge.ToNNX`, initialised on one example with
  `train=False`, then called with `train=train`, the dropout rng, and `batch_stats` mutable
  while training. Its parameters keep Linen's names (`Dense_0/kernel`).

A minimal model (`model: {target: ./nets.py:Net, args: {hidden: 64, num_classes: 10}}` on the
8x8 digits):

```python
from flax import nnx

init = nnx.initializers.lecun_normal()


class Net(nnx.Module):
    def __init__(self, hidden: int, num_classes: int, *, rngs: nnx.Rngs, dtype=None):
        self.l1 = nnx.Linear(64, hidden, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                             dtype=dtype, rngs=rngs)
        self.l2 = nnx.Linear(hidden, num_classes, kernel_init=nnx.with_partitioning(
                             init, ("mlp", "embed")), dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(0.1)

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        x = nnx.relu(self.l1(x.reshape(x.shape[0], -1)))
        return self.l2(self.dropout(x, deterministic=not train, rngs=rngs))
```

A file target is imported by its path (once per process), not through `sys.path`, so a file next
to the config needs no PYTHONPATH; what it imports itself must be importable as usual.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx
from flax.nnx import bridge

from accelctl.errors import FieldError
from accelctl.imports import describe_error, import_target

TARGET = ("model", "target")
ARGS = ("model", "args")
# What accelctl passes itself; the user's args must not set them.
_PASSED = ("rngs", "dtype", "param_dtype")
_ACCEPTED = (
    "Name must be a flax.nnx.Module subclass, a function returning an nnx.Module, or a "
    "flax.linen.Module subclass"
)


# ------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class UserModel:
    """The user's model callable, checked against its args, before anything is built.

    Attributes:
        fn: the class or factory.
        kind: "nnx" (an nnx.Module subclass), "factory" or "linen" (a linen.Module subclass).
        label: how messages name it, e.g. `nets.py:Net`.
        args: the config's keyword arguments.
        extra: what the signature accepts of dtype= / param_dtype= (rngs= for nnx and factories).
    """

    fn: Any
    kind: str
    label: str
    args: dict[str, Any]
    extra: tuple[str, ...]


def resolve(cfg: Any, *, obj: Any = None) -> UserModel:
    """Import the target (or take `obj`) and check what it is and its args against its signature.

    Args:
        cfg: the CustomModelConfig (`target`, `args`).
        obj: the class or factory itself (the Python API); None imports `cfg.target`.
    Returns:
        The UserModel; nothing is built yet.
    Raises:
        FieldError(model.target / model.args): see `import_target`; not a class or factory that
            accelctl can build; an unknown or a missing argument.
    """
    label = describe(cfg, obj)
    if obj is None:
        obj = import_target(cfg.target, TARGET)
    if isinstance(obj, type) and issubclass(obj, nnx.Module):
        kind, sig = "nnx", _signature(obj.__init__, drop_first=True)
        _check_call(obj, label, linen_module=False)
    elif isinstance(obj, type) and issubclass(obj, linen.Module):
        kind, sig = "linen", _signature(obj.__init__, drop_first=True)
        _check_call(obj, label, linen_module=True)
    elif isinstance(obj, nnx.Module | linen.Module):
        raise FieldError(
            TARGET,
            f"{label} is a {type(obj).__name__} instance, not a class; name the class (or a "
            "function that builds the model): accelctl builds it with rngs and the args",
        )
    elif isinstance(obj, type):
        raise FieldError(
            TARGET,
            f"{label} is the class {_type_name(obj)}, which is not a Flax module. {_ACCEPTED}",
        )
    elif callable(obj):
        kind, sig = "factory", _signature(obj, drop_first=False)
    else:
        raise FieldError(
            TARGET,
            f"{label} is an object of type {_type_name(type(obj))}, not callable. {_ACCEPTED}",
        )
    passed = () if kind == "linen" else ("rngs",)
    extra = _check_args(sig, cfg.args, label, passed=passed)
    if kind != "linen" and sig is not None and "rngs" not in extra:
        raise FieldError(
            TARGET,
            f"{label}() takes no rngs parameter; accelctl passes rngs=nnx.Rngs(key) to initialise "
            "the parameters: add a keyword parameter `rngs: nnx.Rngs` and hand it to the layers",
        )
    return UserModel(obj, kind, label, dict(cfg.args), extra)


def build(
    cfg: Any,
    input_shape: tuple[int, ...],
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    tokens: bool = False,
    obj: Any = None,
) -> nnx.Module:
    """Build the user's model from the CustomModelConfig (`models.build` calls this).

    Args:
        cfg: the CustomModelConfig.
        input_shape: shape of one example (a Linen module is initialised on one such example).
        rngs: parameter initialisation keys (its `params` stream seeds the model).
        dtype: compute dtype (None: float32), passed as dtype= when the callable accepts it.
        tokens: inputs are int32 token ids (the Linen sample input's dtype).
        obj: the class or factory itself instead of importing `cfg.target`.
    Returns:
        The initialised NNX module (a Linen module wrapped in `LinenModel`).
    Raises:
        FieldError(model.target / model.args): see `resolve`; the callable raised; a factory
            returned something other than an nnx.Module; its `__call__` has no `train`.
    """
    user = resolve(cfg, obj=obj)
    # One plain stream, like the nnx.Rngs(0) of the user's own scripts: layers take `params` and
    # an nnx.Dropout(rate, rngs=rngs) its own stream from it, both falling back to `default`.
    own_rngs = nnx.Rngs(rngs.params())
    kwargs = dict(user.args)
    if "dtype" in user.extra:
        kwargs["dtype"] = dtype if dtype is not None else jnp.float32
    if "param_dtype" in user.extra:
        kwargs["param_dtype"] = jnp.float32
    if user.kind != "linen":
        kwargs["rngs"] = own_rngs
    try:
        model = user.fn(**kwargs)
    except FieldError:
        raise
    except Exception as e:
        raise FieldError(
            _args_or_target(cfg), f"{user.label}(...) raised while being built: {describe_error(e)}"
        ) from None
    if user.kind == "linen":
        sample = jnp.zeros((1, *input_shape), jnp.int32 if tokens else jnp.float32)
        try:
            return LinenModel.create(model, sample, own_rngs)
        except Exception as e:
            raise FieldError(
                _args_or_target(cfg),
                f"initialising the linen module {user.label} on one example of shape "
                f"{tuple(input_shape)} failed: {describe_error(e)}",
            ) from None
    if isinstance(model, linen.Module):
        raise FieldError(
            TARGET,
            f"{user.label}() returned a flax.linen module; name its class as the target instead "
            "(accelctl wraps Linen classes itself)",
        )
    if not isinstance(model, nnx.Module):
        raise FieldError(
            TARGET,
            f"{user.label}() returned an object of type {_type_name(type(model))}, not an "
            f"nnx.Module. {_ACCEPTED}",
        )
    _check_call(type(model), user.label, linen_module=False)
    _drop_rng_streams(model, user.label)
    return model


# Flax layers that keep an rng stream only as a fallback for the rngs= of their own call.
_FALLBACK_STREAMS = (nnx.Dropout, nnx.MultiHeadAttention)


def _drop_rng_streams(model: nnx.Module, label: str) -> None:
    """Remove the rng streams a model keeps (e.g. `nnx.Dropout(rate, rngs=rngs)`), or refuse it.

    accelctl hands the model a fresh dropout key every step (`rngs=`, from train.seed and the
    step), so runs and resumes are reproducible; a stream kept in the model would instead be
    state holding PRNG-key arrays, which the checkpoints and the parameter digest do not take.
    Flax's layers fall back to their stream only when their call gets no rngs, so theirs are
    removed when the model's `__call__` takes rngs; any other stream is an error.
    """
    takes_rngs = call_takes_rngs(model)
    if takes_rngs:
        for _, node in nnx.iter_graph(model):
            if isinstance(node, _FALLBACK_STREAMS) and isinstance(node.rngs, nnx.RngStream):
                node.rngs = nnx.data(None)
    kept = [
        "/".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.RngStream | nnx.Rngs)
    ]
    if not kept:
        return
    if not takes_rngs:
        raise FieldError(
            TARGET,
            f"{label} keeps rng streams in the model ({', '.join(kept[:4])}), e.g. from "
            "nnx.Dropout(rate, rngs=rngs), and its __call__ takes no rngs. accelctl passes a "
            "fresh key every step instead: give __call__ a parameter `rngs: nnx.Rngs | None = "
            "None` and pass it on (self.dropout(x, deterministic=not train, rngs=rngs))",
        )
    raise FieldError(
        TARGET,
        f"{label} keeps rng streams in the model ({', '.join(kept[:4])}); accelctl passes a fresh "
        "key every step as model(x, train=..., rngs=rngs): draw from that rngs in __call__ "
        "instead of storing an nnx.Rngs on the module",
    )


def call_takes_rngs(model: nnx.Module) -> bool:
    """Whether the model's `__call__` accepts `rngs=` (the steps pass it only then)."""
    sig = _signature(type(model).__call__, drop_first=True)
    return sig is None or _accepts(sig, "rngs")


class LinenModel(bridge.ToNNX):
    """A flax.linen module behind accelctl's call contract `model(x, *, train, rngs=None)`.

    A subclass of ToNNX rather than a module holding one, so the parameters keep Linen's own
    paths (`Conv_0/kernel`, not `linen/Conv_0/kernel`): they become the exported weights' names.
    """

    @classmethod
    def create(cls, module: linen.Module, sample: jax.Array, rngs: nnx.Rngs) -> LinenModel:
        """Wrap `module` and initialise it on `sample` (batch of one) with train=False, as a
        Linen `init` is usually written."""
        model = cls(module)
        bridge.lazy_init(model, sample, train=False, rngs=rngs)
        return model

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits; in training `batch_stats` are updated and `rngs` feed `nn.Dropout`."""
        # ToNNX turns every stream of `rngs` into a Linen rng collection ("dropout").
        mutable = ["batch_stats"] if train else False
        # The bridge stores updated statistics as new variables: created like the originals
        # (no eager sharding, see models.build), or the state's tree would change its metadata.
        with nnx.use_eager_sharding(False):
            return super().__call__(x, train=train, rngs=rngs, mutable=mutable)


# ---------------------------------------------------------------------------------------- checks
def check_logits(
    logits: Any,
    *,
    num_classes: int,
    tokens: bool,
    input_shape: tuple[int, ...],
    cfg: Any,
    obj: Any = None,
) -> None:
    """Raise FieldError unless logits of a batch of 2 have the shape the data needs.

    Args:
        logits: the abstract logits (ShapeDtypeStruct) of a (2, *input_shape) batch.
        num_classes: classes, or the vocabulary size for token data.
        tokens: token data (per-position logits (2, T, vocab) expected).
        input_shape: one example's shape (T for token data).
        cfg: the CustomModelConfig (errors point at args when there are any).
        obj: the model's class or factory when given as an object (names it in messages).
    """
    shape = tuple(getattr(logits, "shape", ()))
    label = describe(cfg, obj)
    if not hasattr(logits, "shape"):
        raise FieldError(
            TARGET,
            f"{label} returned an object of type {_type_name(type(logits))}; it must return the "
            "logits, one array",
        )
    if tokens:
        want = (2, input_shape[0], num_classes)
        if shape != want:
            raise FieldError(
                _args_or_target(cfg),
                f"{label} returned logits {shape} for a batch of 2 token sequences of length "
                f"{input_shape[0]}; token data needs per-position logits {want} (batch, T, vocab)",
            )
        return
    want = (2, num_classes)
    if shape == want:
        return
    if len(shape) == 3:
        what = f"per-position logits {shape} for class labels"
    else:
        what = f"logits {shape} for {num_classes} classes"
    raise FieldError(
        _args_or_target(cfg),
        f"{label} returned {what} on a batch of 2 examples of shape {tuple(input_shape)}; it must "
        f"return {want} (batch, num_classes)"
        + (": check the class count and the input size in model.args" if cfg.args else ""),
    )


def forward_failed(
    cfg: Any, e: BaseException, x_shape: tuple[int, ...], dtype: str, obj: Any = None
) -> FieldError:
    """The error for a model whose forward pass raised on a batch of the data's shape."""
    return FieldError(
        _args_or_target(cfg),
        f"{describe(cfg, obj)} failed on a batch of shape {x_shape} {dtype}: {describe_error(e)}",
    )


def _check_call(cls: type, label: str, *, linen_module: bool) -> None:
    sig = _signature(cls.__call__, drop_first=True)
    if sig is None or _accepts(sig, "train"):
        return
    example = (
        "def __call__(self, x, train: bool = False)"
        if linen_module
        else "def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None)"
    )
    raise FieldError(
        TARGET,
        f"{label}.__call__{sig} has no `train` parameter; accelctl calls model(x, train=True) "
        f"while training and train=False to evaluate (dropout off, batch-norm running "
        f"statistics): write `{example}`",
    )


def _check_args(
    sig: inspect.Signature | None, args: dict[str, Any], label: str, *, passed: tuple[str, ...]
) -> tuple[str, ...]:
    """Check the config's args against the signature; return which of _PASSED it accepts."""
    if sig is None:  # no signature to check against (e.g. a builtin): trust the user
        return passed
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = tuple(n for n in _PASSED if n in params or (var_kw and n in passed))
    by_name = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [n for n in by_name if n not in _PASSED and n not in ("parent", "name")]
    for key in args:
        if key in _PASSED and key in accepted:
            why = "from precision.compute" if key != "rngs" else "(from train.seed)"
            raise FieldError(
                (*ARGS, key), f"{key} is set by accelctl {why}; remove it from model.args"
            )
        if key not in params and not var_kw:
            close = difflib.get_close_matches(key, names, n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise FieldError(
                (*ARGS, key),
                f"{label}() has no parameter {key!r}{hint}; its parameters: "
                f"{', '.join(names) or 'none besides ' + ', '.join(accepted)}",
            )
    missing = [
        n
        for n in by_name
        if params[n].default is inspect.Parameter.empty
        and n not in args
        and n not in _PASSED
        and params[n].kind is not inspect.Parameter.POSITIONAL_ONLY
    ]
    positional = [n for n in by_name if params[n].kind is inspect.Parameter.POSITIONAL_ONLY]
    if positional and params[positional[0]].default is inspect.Parameter.empty:
        raise FieldError(
            TARGET,
            f"{label}() takes {', '.join(positional)} as positional-only; accelctl passes args "
            "by name: make them ordinary parameters",
        )
    if missing:
        raise FieldError(
            ARGS,
            f"{label}() needs {', '.join(missing)}, missing from model.args; add "
            + ", ".join(f"{n}: ..." for n in missing),
        )
    return accepted


def _signature(fn: Any, *, drop_first: bool) -> inspect.Signature | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if drop_first:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def _accepts(sig: inspect.Signature, name: str) -> bool:
    return name in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _args_or_target(cfg: Any) -> tuple[str, ...]:
    # Sizes that do not fit the data are fixed in args, when there are any.
    return ARGS if getattr(cfg, "args", None) else TARGET


def describe(cfg: Any, obj: Any = None) -> str:
    """How messages name the user's model: `nets.py:Net`, or the object's own name."""
    if obj is not None:
        return getattr(obj, "__qualname__", None) or type(obj).__name__
    module, _, attr = cfg.target.rpartition(":")
    return f"{Path(module).name if module.endswith('.py') else module}:{attr}"


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", "")
    # A file target's module has a generated name (see _import_file) that means nothing to the user.
    if module in ("builtins", "") or module.startswith("accelctl_user."):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"
