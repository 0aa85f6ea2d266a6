"""Models by name: `model: {name: mlp, ...}` in the config picks a builder from the registry;
`model: {target: pkg.mod:Name, args: {...}}` builds the user's own (`custom.py`).

Every model is a Flax NNX module called as `model(x, train=..., rngs=...)` and returns logits of
shape (batch, num_outputs). Inputs arrive already normalised to float32; the transformer instead
takes integer token ids (batch, T) and returns per-position logits (batch, T, vocab).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flax import nnx

from accelctl.models import custom
from accelctl.models.cnn import CNN
from accelctl.models.mlp import MLP
from accelctl.models.resnet import ResNet
from accelctl.models.transformer import Transformer

if TYPE_CHECKING:
    from accelctl.config import Config

BuildFn = Callable[[Any, tuple[int, ...], int, nnx.Rngs, Any], nnx.Module]
# Models that checkpoint each of their blocks themselves (`model.remat`); the train step wraps
# every other model's whole forward pass instead (`forward_remat`).
REMAT_PER_BLOCK = ("resnet", "transformer")

_REGISTRY: dict[str, BuildFn] = {}


def register(name: str) -> Callable[[BuildFn], BuildFn]:
    """Register a builder `fn(model_cfg, input_shape, num_outputs, rngs, dtype) -> nnx.Module`."""

    def wrap(fn: BuildFn) -> BuildFn:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def names() -> list[str]:
    """Return the registered model names."""
    return sorted(_REGISTRY)


def build(
    cfg: Any,
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    tokens: bool = False,
    obj: Any = None,
) -> nnx.Module:
    """Build the model named by `cfg.name`, or the user's own (`cfg.name == "custom"`).

    Args:
        cfg: the `model` config section (MLPConfig, CNNConfig, ResNetConfig, ...,
            CustomModelConfig).
        input_shape: shape of one example, without the batch dimension.
        num_outputs: number of logits (classes; the vocabulary size for the transformer). Not
            passed to a user's model, whose args state it.
        rngs: parameter initialisation keys.
        dtype: compute dtype of the layers (None: float32); parameters are always float32.
        tokens: the inputs are integer token ids (a user's Linen module is initialised on them).
        obj: a user's model class or factory itself, instead of importing `cfg.target`.
    Returns:
        The initialised NNX module.
    Raises:
        FieldError(model.target / model.args): a user's model that cannot be built.
    """
    # Weights' `out_sharding` metadata holds logical names, not mesh axes: Flax must not try to
    # place them at creation (accelctl places the whole state with its own shardings).
    with nnx.use_eager_sharding(False):
        if cfg.name == "custom":
            return custom.build(cfg, input_shape, rngs=rngs, dtype=dtype, tokens=tokens, obj=obj)
        return _REGISTRY[cfg.name](cfg, input_shape, num_outputs, rngs, dtype)


@register("mlp")
def _build_mlp(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> MLP:
    return MLP(
        input_shape,
        cfg.hidden,
        num_outputs,
        activation=cfg.activation,
        dropout=cfg.dropout,
        dtype=dtype,
        rngs=rngs,
    )


@register("cnn")
def _build_cnn(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> CNN:
    kernels = cfg.kernels if isinstance(cfg.kernels, tuple) else (cfg.kernels,) * len(cfg.channels)
    return CNN(
        input_shape,
        channels=cfg.channels,
        kernels=kernels,
        pool=cfg.pool,
        batch_norm=cfg.batch_norm,
        dense=cfg.dense,
        num_outputs=num_outputs,
        activation=cfg.activation,
        dropout=cfg.dropout,
        dtype=dtype,
        rngs=rngs,
    )


@register("resnet")
def _build_resnet(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> ResNet:
    return ResNet(
        input_shape,
        stage_sizes=cfg.stage_sizes,
        width=cfg.width,
        block=cfg.block,
        stem=cfg.stem,
        zero_init_residual=cfg.zero_init_residual,
        num_outputs=num_outputs,
        activation=cfg.activation,
        remat=cfg.remat,
        dtype=dtype,
        rngs=rngs,
    )


@register("transformer")
def _build_transformer(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> Transformer:
    return Transformer(
        input_shape,
        num_outputs,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        embed_dim=cfg.embed_dim,
        mlp_dim=cfg.mlp_dim,
        max_len=cfg.max_len,
        positions=cfg.positions,
        tie_embeddings=cfg.tie_embeddings,
        dropout=cfg.dropout,
        remat=cfg.remat,
        attention=cfg.attention,
        dtype=dtype,
        rngs=rngs,
    )


def forward_remat(cfg: Any) -> str:
    """The `model.remat` mode the train step applies around the whole model call: the
    configured one for models without blocks of their own (mlp, cnn, a user's model), "none"
    for those that checkpoint per block (REMAT_PER_BLOCK)."""
    return "none" if cfg.name in REMAT_PER_BLOCK else cfg.remat


def check_backend(cfg: Config, device: Any) -> None:
    """Located ConfigErrors for model settings the backend of `device` cannot run, raised when
    the job is built rather than as a crash in the middle of compiling the step.

    Args:
        cfg: the config (`model.remat`, `model.attention`, `precision.compute`).
        device: one device of the mesh (all are of one kind).
    Raises:
        ConfigError: remat offload without a host memory apart from the device's (the CPU);
            attention cudnn off an NVIDIA GPU, in fp32, or with a head size cuDNN's fused
            attention does not take (the conditions jax.nn.dot_product_attention checks).
    """
    platform = device.platform
    if cfg.model.remat == "offload":
        kinds = {m.kind for m in device.addressable_memories()}
        if platform == "cpu" or "pinned_host" not in kinds:
            raise cfg.error_at(
                ("model", "remat"),
                f"offload moves saved activations to pinned host memory, which the {platform} "
                "backend does not have apart from its device memory (GPUs and TPUs do); use "
                "remat: dots or full",
            )
    if getattr(cfg.model, "attention", "auto") != "cudnn":
        return
    capability = getattr(device, "compute_capability", None)
    if platform != "gpu" or capability is None:
        raise cfg.error_at(
            ("model", "attention"),
            f"cuDNN's fused attention runs on NVIDIA GPUs only, and this job runs on "
            f"{device.device_kind} ({platform}); use attention: auto or xla",
        )
    if cfg.precision.compute == "fp32":
        raise cfg.error_at(
            ("model", "attention"),
            "cuDNN's fused attention takes bf16 or fp16 inputs; set precision.compute: bf16 "
            "(or use attention: auto / xla for fp32)",
        )
    head = cfg.model.embed_dim // cfg.model.num_heads
    limit = 256 if tuple(int(p) for p in str(capability).split(".")) >= (9, 0) else 128
    if head % 8 or head > limit:
        raise cfg.error_at(
            ("model", "attention"),
            f"cuDNN's fused attention needs a head size (embed_dim / num_heads = {head}) that is "
            f"a multiple of 8 and at most {limit} on this GPU; change model.embed_dim or "
            "model.num_heads, or use attention: auto / xla",
        )
