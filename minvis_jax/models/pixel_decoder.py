"""MSDeformAttn pixel decoder: deformable encoder over res3..res5, FPN level at stride 4."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from minvis_jax import ops
from minvis_jax.models.conv import Conv
from minvis_jax.models.conv import Dense
from minvis_jax.models.deform_attn import MSDeformAttn
from minvis_jax.models.position import sine_position_embedding


def reference_points(spatial_shapes) -> jnp.ndarray:
  """Pixel centres of every level, normalised, concatenated: [sum(H*W), 2] as (x, y)."""
  refs = []
  for h, w in spatial_shapes:
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing='ij')
    refs.append(jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1))
  return jnp.concatenate(refs, axis=0)


class EncoderLayer(nn.Module):
  """Post-norm deformable self-attention + FFN (ReLU)."""
  dim: int
  heads: int
  levels: int
  points: int
  ffn_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, pos, reference, spatial_shapes):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = MSDeformAttn(self.dim, self.heads, self.levels, self.points, self.dtype,
                        name='self_attn')(h + pos, reference, h, spatial_shapes)
    h = ln('self_attn_norm')(h + attn)
    y = Dense(self.ffn_dim, dtype=self.dtype, name='fc1')(h)
    y = Dense(self.dim, dtype=self.dtype, name='fc2')(nn.relu(y))
    return ln('final_norm')(h + y)


class PixelDecoder(nn.Module):
  """features {'res2'..'res5'} -> (mask_features [B, H/4, W/4, mask_dim],
  multi-scale features [3 x [B, h_l, w_l, C]] at strides 32, 16, 8)."""
  dim: int = 256
  mask_dim: int = 256
  layers: int = 6
  heads: int = 8
  points: int = 4
  ffn_dim: int = 1024
  levels: int = 3
  dtype: Any = jnp.float32
  remat: bool = False                # recompute each encoder layer in the backward pass

  @nn.compact
  def __call__(self, features):
    conv = lambda n, k, name, bias=True: Conv(n, k, use_bias=bias, dtype=self.dtype, name=name)
    gn = lambda name: nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype, name=name)
    names = ['res5', 'res4', 'res3'][:self.levels]
    level_embed = self.param('level_embed', nn.initializers.normal(1.0), (self.levels, self.dim))
    srcs, pos, shapes = [], [], []
    for lvl, name in enumerate(names):
      x = gn(f'input_proj_norm_{lvl}')(conv(self.dim, 1, f'input_proj_{lvl}')(features[name]))
      b, h, w, _ = x.shape
      shapes.append((h, w))
      srcs.append(x.reshape(b, h * w, self.dim))
      p = sine_position_embedding(h, w, self.dim // 2).reshape(h * w, self.dim)
      pos.append(p + level_embed[lvl])
    h = jnp.concatenate(srcs, axis=1)
    pos = jnp.concatenate(pos, axis=0)[None].astype(h.dtype)
    ref = reference_points(shapes)
    # The level shapes (argument 4, counting self) are static Python ints under the remat.
    layer = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
    for i in range(self.layers):
      h = layer(self.dim, self.heads, self.levels, self.points, self.ffn_dim, self.dtype,
                name=f'encoder_layer_{i}')(h, pos, ref, tuple(shapes))
    outs, start = [], 0
    for hh, ww in shapes:
      outs.append(h[:, start:start + hh * ww].reshape(h.shape[0], hh, ww, self.dim))
      start += hh * ww
    # FPN level at stride 4: lateral res2 + upsampled stride-8 output.
    lateral = gn('lateral_norm')(conv(self.dim, 1, 'lateral', bias=False)(features['res2']))
    y = lateral + ops.resize_bilinear(outs[-1], lateral.shape[1], lateral.shape[2])
    y = nn.relu(gn('output_norm')(conv(self.dim, 3, 'output', bias=False)(y)))
    mask_features = conv(self.mask_dim, 1, 'mask_projection')(y)
    return mask_features, outs
