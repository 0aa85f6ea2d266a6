"""TrainState: everything a step reads and writes, as one pytree of device arrays, and its
abstract description.

The state is described before it exists (`make_state_spec`: `jax.eval_shape` + shardings); the
caller then either initialises it (`StateSpec.init`) or restores a checkpoint into that abstract
target, never both, so a resume holds one copy of the state at its peak. Evaluation restores only
the parameters and the model state (`StateSpec.eval_target`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from accelctl import parallel, precision
from accelctl.config import Config
from accelctl.optim import Optimizer

# Running sums since the last metric read; summed on device so the host reads them rarely.
SUM_KEYS = ("loss_sum", "correct", "count")
# Train sums also count the steps whose update was skipped: non-finite loss or gradients
# ("skipped", train.on_nan decides), and fp16 gradient overflows ("overflow", loss scaling), and
# sum the global gradient norm of the applied updates ("grad_norm").
TRAIN_SUM_KEYS = (*SUM_KEYS, "skipped", "overflow", "grad_norm")


@struct.dataclass
class TrainState:
    """Model parameters, the rest of the model state, optimizer state and bookkeeping.

    Attributes:
        step: int32 scalar, optimizer updates done.
        params: nnx.State of nnx.Param leaves (what the optimizer updates).
        model_state: nnx.State of the other variables (e.g. BatchNorm statistics).
        opt_state: optax state for `params`.
        rng: base PRNG key; step s uses fold_in(rng, s) for dropout.
        plateau: ReduceLROnPlateau state (optax.contrib) or None.
        sums: float32 scalars (TRAIN_SUM_KEYS) since the last read.
        skipped: int32 scalar, steps whose update was skipped (non-finite) in the whole run.
        first_skipped: int32 scalar, the first such step (1-based, as logged), -1 if none.
        loss_scale: precision.LossScale for fp16 compute, else None.
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: Any
    rng: jax.Array
    plateau: Any
    sums: dict[str, jax.Array]
    skipped: jax.Array
    first_skipped: jax.Array
    loss_scale: Any = None


def zero_sums(keys: tuple[str, ...] = SUM_KEYS) -> dict[str, jax.Array]:
    """Fresh metric sums (call inside jit so no host transfer is needed)."""
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def digest(host_tree: Any) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in tree order (host arrays).

    Two runs that end with bit-identical parameters have the same digest.
    """
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(host_tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class StateSpec:
    """The train state before it exists: structure, shapes, dtypes and shardings.

    Attributes:
        graphdef: the model's NNX graph definition (the parameters live in the state).
        abstract: TrainState of ShapeDtypeStructs carrying their shardings: a restore target and
            what the steps are compiled for.
        shardings: TrainState of NamedShardings (the steps' in/out shardings).
        strategy, strategy_reason: parallel.strategy with auto resolved, and why.
        num_params: parameter count.
        init_fn: () -> TrainState, jitted with `out_shardings`: every array is created directly
            with its final sharding.
    """

    graphdef: nnx.GraphDef[Any]
    abstract: TrainState
    shardings: TrainState
    strategy: str
    strategy_reason: str
    num_params: int
    init_fn: Callable[[], TrainState]

    def init(self) -> TrainState:
        """A freshly initialised state (parameters from `train.seed`)."""
        return self.init_fn()

    def eval_target(self) -> dict[str, Any]:
        """What an evaluation restores: the abstract params and model state alone (a partial
        restore never reads or allocates the optimizer state)."""
        return {"params": self.abstract.params, "model_state": self.abstract.model_state}


def make_state_spec(
    cfg: Config,
    mesh: Mesh,
    make_model_fn: Callable[[jax.Array], nnx.Module],
    opt: Optimizer,
) -> StateSpec:
    """Describe the train state abstractly and choose its shardings (nothing is allocated).

    Args:
        cfg: the config (`train.seed`, `precision`, `parallel.strategy`).
        mesh: the device mesh.
        make_model_fn: param_key -> initialised NNX model (called inside jit / eval_shape only).
        opt: the optimizer (its state is part of the train state).
    Returns:
        The StateSpec.
    """
    abstract_model = nnx.eval_shape(lambda: make_model_fn(jax.random.key(0)))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

    def init() -> TrainState:
        param_key, dropout_key = jax.random.split(jax.random.key(cfg.train.seed))
        _, params, model_state = nnx.split(make_model_fn(param_key), nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=opt.tx.init(params),
            rng=dropout_key,
            plateau=opt.plateau.init(params) if opt.plateau is not None else None,
            sums=zero_sums(TRAIN_SUM_KEYS),
            skipped=jnp.zeros((), jnp.int32),
            first_skipped=jnp.full((), -1, jnp.int32),
            loss_scale=precision.init_loss_scale(cfg.precision),
        )

    shapes = jax.eval_shape(init)
    strategy, reason = parallel.resolve_strategy(cfg, mesh, shapes)
    if strategy == "tp":
        parallel.check_tp_names(cfg, mesh, shapes.params)
    shardings = parallel.state_shardings(mesh, shapes, strategy)
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings
    )
    return StateSpec(
        graphdef=graphdef,
        abstract=abstract,
        shardings=shardings,
        strategy=strategy,
        strategy_reason=reason,
        num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.params)),
        init_fn=jax.jit(init, out_shardings=shardings),
    )
