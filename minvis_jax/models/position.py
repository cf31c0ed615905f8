"""2D sine position embedding of Mask2Former (normalize=True, scale 2*pi, no -0.5 offset)."""

import math

import jax.numpy as jnp


def sine_position_embedding(height: int, width: int, num_feats: int,
                            temperature: float = 10000.0) -> jnp.ndarray:
  """Returns [height, width, 2 * num_feats]: y channels first, then x, sin/cos interleaved."""
  eps, scale = 1e-6, 2 * math.pi
  y = jnp.arange(1, height + 1, dtype=jnp.float32)
  x = jnp.arange(1, width + 1, dtype=jnp.float32)
  y = y / (y[-1] + eps) * scale
  x = x / (x[-1] + eps) * scale
  dim_t = jnp.arange(num_feats, dtype=jnp.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_feats)

  def encode(v):  # [N] -> [N, num_feats], (sin, cos) pairs interleaved
    p = v[:, None] / dim_t
    return jnp.stack([jnp.sin(p[:, 0::2]), jnp.cos(p[:, 1::2])], axis=-1).reshape(v.shape[0], -1)

  pos_y = jnp.broadcast_to(encode(y)[:, None, :], (height, width, num_feats))
  pos_x = jnp.broadcast_to(encode(x)[None, :, :], (height, width, num_feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1)
