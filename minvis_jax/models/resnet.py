"""ResNet backbone in the detectron2/torchvision layout with frozen BatchNorm (NHWC)."""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from minvis_jax.models.conv import conv2d, max_pool_3x3_s2

BN_EPS = 1e-5

# Bottleneck blocks per stage res2..res5 of the detectron2 / torchvision ResNets; both use a 64-wide
# stem and outputs (256, 512, 1024, 2048) (bottleneck = width // 4).
VARIANTS = {
    50: dict(depths=(3, 4, 6, 3), stem_width=64, widths=(256, 512, 1024, 2048)),
    101: dict(depths=(3, 4, 23, 3), stem_width=64, widths=(256, 512, 1024, 2048)),
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """The fields of `ResNet` (hashable: part of the model's static configuration)."""
  depths: tuple[int, ...]            # bottleneck blocks per stage res2..res5
  stem_width: int                    # channels of the 7x7/2 stem
  widths: tuple[int, ...]            # output channels of res2..res5


class ConvBN(nn.Module):
  """Bias-free conv followed by frozen BatchNorm; optional ReLU.

  The kernel is a trainable 'params' leaf; the BN scale/bias/mean/var live in the 'frozen'
  collection so the optimizer never sees them (detectron2 FrozenBatchNorm2d semantics).
  """
  features: int
  kernel_size: int
  stride: int = 1
  relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, Cin] -> [B, H/stride, W/stride, features]."""
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    scale = self.variable('frozen', 'scale', jnp.ones, (self.features,), jnp.float32).value
    bias = self.variable('frozen', 'bias', jnp.zeros, (self.features,), jnp.float32).value
    mean = self.variable('frozen', 'mean', jnp.zeros, (self.features,), jnp.float32).value
    var = self.variable('frozen', 'var', jnp.ones, (self.features,), jnp.float32).value
    # Explicit symmetric padding: 'SAME' would pad asymmetrically on stride 2, unlike torch.
    pad = (k - 1) // 2
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad)
    # Fold the frozen statistics into one affine transform, computed in float32.
    mul = scale * jax.lax.rsqrt(var + BN_EPS)
    add = bias - mean * mul
    y = y * mul.astype(self.dtype) + add.astype(self.dtype)
    return nn.relu(y) if self.relu else y


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here) -> 1x1 bottleneck with a projection shortcut when shapes change."""
  features: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, Cin] -> [B, H/stride, W/stride, features]."""
    mid = self.features // 4
    y = ConvBN(mid, 1, dtype=self.dtype, name='conv1')(x)
    y = ConvBN(mid, 3, self.stride, dtype=self.dtype, name='conv2')(y)
    y = ConvBN(self.features, 1, relu=False, dtype=self.dtype, name='conv3')(y)
    if x.shape[-1] != self.features or self.stride != 1:
      x = ConvBN(self.features, 1, self.stride, relu=False, dtype=self.dtype, name='shortcut')(x)
    return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
  """ResNet returning {'res2'..'res5'} at strides 4, 8, 16, 32.

  Variables: 'params' {stem, res{s}_{b}/{conv1,conv2,conv3,shortcut}} kernels and 'frozen' BN.
  """
  depths: Sequence[int]
  stem_width: int
  widths: Sequence[int]
  dtype: Any = jnp.float32
  remat: bool = False                # recompute each bottleneck in the backward pass

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """images [B, H, W, 3] -> {'res2': [B, H/4, W/4, c2], ..., 'res5': [B, H/32, W/32, c5]}."""
    del train  # Frozen BN and no dropout: train and eval compute the same thing.
    x = ConvBN(self.stem_width, 7, 2, dtype=self.dtype, name='stem')(images)
    x = max_pool_3x3_s2(x)
    block = nn.remat(Bottleneck) if self.remat else Bottleneck
    outputs = {}
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      stage = i + 2
      for b in range(depth):
        stride = 2 if (b == 0 and stage > 2) else 1
        x = block(width, stride, dtype=self.dtype, name=f'res{stage}_{b}')(x)
      outputs[f'res{stage}'] = x
    return outputs
