"""Masked-attention transformer decoder of Mask2Former with its class and mask heads."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from minvis_jax import ops
from minvis_jax.models.conv import Dense
from minvis_jax.models.position import sine_position_embedding


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections; mask True = attend."""
  dim: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, mask=None):
    """q [B, Lq, C], k/v [B, Lk, C], mask [B, Lq, Lk] bool or None -> [B, Lq, C]."""
    d = self.dim // self.heads
    split = lambda x, name: Dense(self.dim, dtype=self.dtype, name=name)(x).reshape(
        x.shape[0], x.shape[1], self.heads, d)
    q, k, v = split(q, 'q_proj'), split(k, 'k_proj'), split(v, 'v_proj')
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * (d ** -0.5)
    if mask is not None:
      logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(q.shape[0], q.shape[1], self.dim)
    return Dense(self.dim, dtype=self.dtype, name='out_proj')(out)


class DecoderLayer(nn.Module):
  """Post-norm: masked cross-attention, self-attention, FFN; each + residual + LayerNorm."""
  dim: int
  heads: int
  ffn_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, query_pos, memory, memory_pos, mask):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    y = Attention(self.dim, self.heads, self.dtype, name='cross_attn')(
        x + query_pos, memory + memory_pos, memory, mask)
    x = ln('cross_attn_norm')(x + y)
    y = Attention(self.dim, self.heads, self.dtype, name='self_attn')(
        x + query_pos, x + query_pos, x)
    x = ln('self_attn_norm')(x + y)
    y = Dense(self.ffn_dim, dtype=self.dtype, name='fc1')(x)
    y = Dense(self.dim, dtype=self.dtype, name='fc2')(nn.relu(y))
    return ln('final_norm')(x + y)


class TransformerDecoder(nn.Module):
  """Queries attend to the multi-scale features, masked by their previous mask prediction.

  Returns a list of `layers + 1` prediction sets (earliest first), each
  {'pred_logits' [B, Q, K+1], 'pred_masks' [B, Q, H/4, W/4]}, and the last normalised
  query states [B, Q, C] (the MinVIS tracking embeddings).
  """
  num_classes: int
  num_queries: int = 100
  dim: int = 256
  heads: int = 8
  ffn_dim: int = 2048
  layers: int = 9
  mask_dim: int = 256
  dtype: Any = jnp.float32
  remat: bool = False                # recompute each masked-attention layer in the backward pass

  @nn.compact
  def __call__(self, features, mask_features):
    b = mask_features.shape[0]
    levels = len(features)
    init = nn.initializers.normal(1.0)
    query_feat = self.param('query_feat', init, (self.num_queries, self.dim))
    query_pos = self.param('query_pos', init, (self.num_queries, self.dim))
    level_embed = self.param('level_embed', init, (levels, self.dim))
    memory, memory_pos, sizes = [], [], []
    for lvl, f in enumerate(features):
      _, h, w, _ = f.shape
      sizes.append((h, w))
      memory.append(f.reshape(b, h * w, self.dim) + level_embed[lvl].astype(f.dtype))
      memory_pos.append(sine_position_embedding(h, w, self.dim // 2).reshape(1, h * w, self.dim))

    decoder_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='decoder_norm')
    class_embed = nn.Dense(self.num_classes + 1, dtype=self.dtype, name='class_embed')
    mask_mlp = [nn.Dense(d, dtype=self.dtype, name=f'mask_embed_{i}')
                for i, d in enumerate((self.dim, self.dim, self.mask_dim))]

    def predict(x, target_size):
      z = decoder_norm(x)
      e = z
      for i, layer in enumerate(mask_mlp):
        e = layer(e)
        e = nn.relu(e) if i < len(mask_mlp) - 1 else e
      # Channels last, [B, h, w, Q]: the layout the resize below and the criterion's point
      # sampling read; the [B, Q, h, w] output is its transpose, which XLA cancels against theirs.
      masks = jnp.einsum('bqc,bhwc->bhwq', e, mask_features).astype(jnp.float32)
      # Attention mask for the next layer: True = attend where sigmoid >= 0.5; a query blocked
      # everywhere attends everywhere.
      small = ops.resize_bilinear(masks, *target_size)
      attend = (small >= 0.0).reshape(b, -1, self.num_queries).transpose(0, 2, 1)
      attend = attend | ~jnp.any(attend, axis=-1, keepdims=True)
      pred = {'pred_logits': class_embed(z).astype(jnp.float32),
              'pred_masks': masks.transpose(0, 3, 1, 2)}
      return pred, jax.lax.stop_gradient(attend), z

    x = jnp.broadcast_to(query_feat.astype(self.dtype), (b, self.num_queries, self.dim))
    qpos = jnp.broadcast_to(query_pos.astype(self.dtype), (b, self.num_queries, self.dim))
    pred, mask, z = predict(x, sizes[0])
    preds = [pred]
    layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    for i in range(self.layers):
      lvl = i % levels
      x = layer(self.dim, self.heads, self.ffn_dim, self.dtype, name=f'layer_{i}')(
          x, qpos, memory[lvl], memory_pos[lvl].astype(x.dtype), mask)
      pred, mask, z = predict(x, sizes[(i + 1) % levels])
      preds.append(pred)
    return preds, z.astype(jnp.float32)
