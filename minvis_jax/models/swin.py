"""Swin Transformer backbone with detectron2 (D2SwinTransformer) semantics, NHWC outputs."""

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-5
LayerNorm = functools.partial(nn.LayerNorm, epsilon=LN_EPS)
# torch.nn.GELU is the exact erf form; flax defaults to the tanh approximation.
gelu = functools.partial(nn.gelu, approximate=False)
# torch trunc_normal_(std=.02) for linears and the bias table (moot once weights are imported).
trunc_normal = nn.initializers.truncated_normal(0.02)

# Swin-T/S/B/L as detectron2 builds them: window 7 for T/S, 12 for B/L (their 384 pretraining).
VARIANTS = {
    'T': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'S': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'B': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    'L': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """The fields of `Swin` (hashable: part of the model's static configuration)."""
  embed_dim: int                     # D: channels of res2; stage i has D * 2**i
  depths: tuple[int, ...]            # blocks per stage
  num_heads: tuple[int, ...]         # attention heads per stage
  window_size: int
  patch_size: int
  mlp_ratio: float
  drop_path_rate: float              # stochastic depth, linear over the blocks up to this rate


def relative_position_index(window: int) -> np.ndarray:
  """[window**2, window**2] int index into the [(2w-1)**2, heads] relative position bias table."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'))
  coords = coords.reshape(2, -1)                        # [2, N] (row, col) per token
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], shifted to >= 0
  return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B, H, W, C] -> [B * nW, window * window, C] (windows row-major over the image)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, b: int, h: int, w: int) -> jax.Array:
  """[B * nW, window * window, C] -> [B, H, W, C]; inverse of window_partition."""
  c = windows.shape[-1]
  x = windows.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
  """[nW, N, N] additive mask (0 or -100) keeping attention within each region of a shifted window.

  h, w are already multiples of the window. Regions follow the Swin labelling of the cyclically
  shifted image: tokens rolled in from the other border must not attend to their new neighbours.
  """
  labels = np.zeros((h, w), np.float32)
  cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  count = 0
  for hs in cuts:
    for ws in cuts:
      labels[hs, ws] = count
      count += 1
  lw = labels.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
  lw = lw.reshape(-1, window * window)                 # [nW, N], same order as window_partition
  diff = lw[:, None, :] - lw[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


class DropPath(nn.Module):
  """Stochastic depth: drops whole residual branches per sample when training (rng 'dropout')."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows, with a learned relative position bias."""
  dim: int
  num_heads: int
  window: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x [B*nW, N, C], mask [nW, N, N] additive or None -> [B*nW, N, C]."""
    bw, n, c = x.shape
    hd = c // self.num_heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal)
    qkv = dense(3 * c, name='qkv')(x).reshape(bw, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]      # [B*nW, N, heads, hd]
    q = q * (hd ** -0.5)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    table = self.param('relative_position_bias_table', trunc_normal,
                       ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32)
    bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, self.num_heads)
    logits = logits + bias.transpose(2, 0, 1)[None]
    if mask is not None:
      nw = mask.shape[0]
      logits = logits.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
      logits = logits.reshape(bw, self.num_heads, n, n)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(bw, n, c)
    return dense(c, name='proj')(out)


class SwinBlock(nn.Module):
  """Pre-norm (shifted) window attention + MLP block; pads H, W up to a multiple of the window."""
  dim: int
  num_heads: int
  window: int
  shift: int
  mlp_ratio: float
  drop_path: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    """x [B, H, W, C], mask [nW, N, N] for the padded size (shifted blocks) -> [B, H, W, C]."""
    b, h, w, c = x.shape
    ws = self.window
    y = LayerNorm(dtype=self.dtype, name='norm1')(x)
    # Pad after the norm (padded tokens are zeros), right/bottom, as detectron2 does.
    ph, pw = (-h) % ws, (-w) % ws
    y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
    y = window_partition(y, ws)
    y = WindowAttention(c, self.num_heads, ws, dtype=self.dtype, name='attn')(
        y, mask if self.shift else None)
    y = window_reverse(y, ws, b, hp, wp)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    y = y[:, :h, :w]
    drop = DropPath(self.drop_path)
    x = x + drop(y, train)
    y = LayerNorm(dtype=self.dtype, name='norm2')(x)
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal)
    y = dense(int(c * self.mlp_ratio), name='fc1')(y)
    y = dense(c, name='fc2')(gelu(y))
    return x + drop(y, train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concat -> LayerNorm(4C) -> Linear(4C, 2C, no bias): halves H and W."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
    c = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
    # Order (row, col) = (0,0), (1,0), (0,1), (1,1) matches the torch reference's channel layout.
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = LayerNorm(dtype=self.dtype, name='norm')(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, kernel_init=trunc_normal,
                    name='reduction')(x)


class SwinStage(nn.Module):
  """`depth` blocks alternating regular / shifted windows; returns (stage output, downsampled)."""
  dim: int
  depth: int
  num_heads: int
  window: int
  mlp_ratio: float
  drop_paths: Sequence[float]
  downsample: bool
  dtype: Any = jnp.float32
  remat: bool = False                # recompute each block in the backward pass

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    """x [B, H, W, C] -> ([B, H, W, C], [B, H/2, W/2, 2C] or None)."""
    ws, shift = self.window, self.window // 2
    hp, wp = -(-x.shape[1] // ws) * ws, -(-x.shape[2] // ws) * ws
    # detectron2 keeps the shift at every stage, even when the map is not larger than the window.
    mask = jnp.asarray(shifted_window_mask(hp, wp, ws, shift)) if shift else None
    # `train` (argument 3, counting self) is a Python bool: static under the remat.
    block = nn.remat(SwinBlock, static_argnums=(3,)) if self.remat else SwinBlock
    for j in range(self.depth):
      x = block(self.dim, self.num_heads, ws, 0 if j % 2 == 0 else shift, self.mlp_ratio,
                self.drop_paths[j], dtype=self.dtype, name=f'blocks_{j}')(x, mask, train)
    down = PatchMerging(dtype=self.dtype, name='downsample')(x) if self.downsample else None
    return x, down


class PatchEmbed(nn.Module):
  """Non-overlapping p x p conv with bias, then LayerNorm (Swin's patch_norm=True)."""
  features: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, H/p, W/p, features]."""
    x = nn.Conv(self.features, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding='VALID', dtype=self.dtype, name='proj')(x)
    return LayerNorm(dtype=self.dtype, name='norm')(x)


class Swin(nn.Module):
  """Swin-T/S/B/L returning LayerNorm-ed {'res2'..'res5'} at strides 4, 8, 16, 32.

  Variables ('params' only): patch_embed/{proj,norm}, layers_{i}/blocks_{j}/{norm1, attn/{qkv,
  proj, relative_position_bias_table}, norm2, fc1, fc2}, layers_{i}/downsample/{norm, reduction},
  norm{i}.
  """
  embed_dim: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int
  patch_size: int
  mlp_ratio: float
  drop_path_rate: float
  dtype: Any = jnp.float32
  remat: bool = False                # recompute each block in the backward pass

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """images [B, H, W, 3] -> {'res2': [B, H/4, W/4, D], ..., 'res5': [B, H/32, W/32, 8D]}."""
    p = self.patch_size
    x = images.astype(self.dtype)
    x = jnp.pad(x, ((0, 0), (0, (-x.shape[1]) % p), (0, (-x.shape[2]) % p), (0, 0)))
    x = PatchEmbed(self.embed_dim, p, self.dtype, name='patch_embed')(x)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    outputs, start = {}, 0
    for i, depth in enumerate(self.depths):
      dim = self.embed_dim * 2 ** i
      out, x = SwinStage(dim, depth, self.num_heads[i], self.window_size, self.mlp_ratio,
                         rates[start:start + depth], downsample=i < len(self.depths) - 1,
                         dtype=self.dtype, remat=self.remat, name=f'layers_{i}')(x, train)
      start += depth
      outputs[f'res{i + 2}'] = LayerNorm(dtype=self.dtype, name=f'norm{i}')(out)
    return outputs
