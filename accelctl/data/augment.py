"""Image augmentation on the device, inside the jitted train step (no host work per example).

Random crop (zero-pad, then crop back at a random offset) and horizontal flip, drawn per example
from a key, so a run is reproducible and the result does not depend on how the batch is sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment_images(
    x: jax.Array, *, rng: jax.Array, crop_padding: int = 0, flip: bool = False
) -> jax.Array:
    """Randomly crop and/or flip a batch of images.

    Args:
        x: images (B, H, W) or (B, H, W, C), any dtype (uint8 before scaling is cheapest).
        rng: key for this batch (e.g. folded with the step number).
        crop_padding: pad each side by this many zero pixels, then crop (H, W) at a uniformly
            random offset; 0 = no crop.
        flip: mirror each image left-right with probability 1/2.
    Returns:
        Augmented images with the shape, dtype and sharding of `x`.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"augmentation needs images (B, H, W[, C]); got shape {x.shape}")
    b, h, w = x.shape[:3]
    crop_key, flip_key = jax.random.split(rng)
    if crop_padding > 0:
        p = crop_padding
        pad = ((0, 0), (p, p), (p, p)) + ((0, 0),) * (x.ndim - 3)
        padded = jnp.pad(x, pad)
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)
        rest = x.shape[3:]

        def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
            start = (offset[0], offset[1]) + (0,) * len(rest)
            return jax.lax.dynamic_slice(image, start, (h, w, *rest))

        x = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (b,))
        x = jnp.where(mirror.reshape((b,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)
    return x
