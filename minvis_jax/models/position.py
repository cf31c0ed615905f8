"""2D sine position embedding of Mask2Former (normalize=True, scale 2*pi, no -0.5 offset)."""

import math

import numpy as np


def sine_position_embedding(height: int, width: int, num_feats: int,
                            temperature: float = 10000.0) -> np.ndarray:
  """Returns float32 [height, width, 2 * num_feats]: y channels first, then x, sin/cos interleaved.

  Computed in numpy at trace time, so every compiled program holds the same constant: XLA may
  constant-fold jnp.sin with the host's libm in one program and emit its own vectorised sin in
  another (e.g. a program partitioned over devices), which differ by an ulp and, through the
  model, can flip a mask pixel.
  """
  eps, scale = np.float32(1e-6), np.float32(2 * math.pi)
  y = np.arange(1, height + 1, dtype=np.float32)
  x = np.arange(1, width + 1, dtype=np.float32)
  y = y / (y[-1] + eps) * scale
  x = x / (x[-1] + eps) * scale
  dim_t = np.arange(num_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(num_feats))

  def encode(v):  # [N] -> [N, num_feats], (sin, cos) pairs interleaved
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=-1).reshape(v.shape[0], -1)

  pos_y = np.broadcast_to(encode(y)[:, None, :], (height, width, num_feats))
  pos_x = np.broadcast_to(encode(x)[None, :, :], (height, width, num_feats))
  return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)
