"""2-D convolution (NHWC, HWIO) with the gradients XLA:CPU computes fast, and a flax module for it.

XLA:CPU computes the kernel gradient of a convolution as another convolution (batch and feature dims
swapped), which is very slow on CPU: for a 1x1 conv on [2, 96, 96, 256] it took 10x the forward. So:
1x1 convs are plain matmuls (forward and both gradients are GEMMs; the kernel gradient transposes
the narrower operand, materialised first: R50 backbone forward+backward 1.70 -> 1.27 s at 384x384,
batch 2), and larger kernels keep XLA's convolution for the forward and the input gradient but get
their kernel gradient as one GEMM per kernel tap (sum over pixels of shifted input x output
gradient; 3x3 on [2, 96, 96, 256]: 218 -> 161 ms, XLA's own 515 ms). Same numbers as
`lax.conv_general_dilated` up to float rounding. Only measured on CPU: on GPU/TPU these forms are
still GEMMs, but not yet timed against XLA's own convolution gradients there.

`Dense` is `nn.Dense` through the same 1x1 GEMMs: in the pixel decoder's token layers ([2, 3024,
C] at 384x384) its gradients took 2.10 s of forward+backward against 2.28 with `nn.Dense`
(identical gradients); the R50 train step 4.47 vs 4.58 s in one process.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _xla_conv(x, kernel, stride, pad):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_kxk(x, kernel, stride, pad):
  return _xla_conv(x, kernel, stride, pad)


def _conv_kxk_fwd(x, kernel, stride, pad):
  return _xla_conv(x, kernel, stride, pad), (x, kernel)


def _conv_kxk_bwd(stride, pad, res, dy):
  x, kernel = res
  # Both materialised first: fused into the transposes and tap slices below, their producers (the
  # FPN's upsample-and-add, a norm's gradient) were recomputed at strided reads, once per tap
  # (~0.5 s of the pixel decoder's output conv in the train step).
  x, dy = jax.lax.optimization_barrier((x, dy))
  _, input_vjp = jax.vjp(lambda a: _xla_conv(a, kernel, stride, pad), x)
  (dx,) = input_vjp(dy)
  kh, kw, cin, cout = kernel.shape
  h, w = dy.shape[1:3]
  # Each tap's GEMM contracts over pixels: the output gradient is transposed (channels first) once
  # and multiplies each tap's shifted input slice, channels last as it is.
  dy_t = jax.lax.optimization_barrier(dy.reshape(-1, cout).T)                       # [Cout, BHW]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  taps = [jnp.dot(dy_t, xp[:, i:i + stride * (h - 1) + 1:stride,
                           j:j + stride * (w - 1) + 1:stride].reshape(-1, cin),
                  preferred_element_type=jnp.float32)                               # [Cout, Cin]
          for i in range(kh) for j in range(kw)]
  dkernel = jnp.stack(taps).transpose(0, 2, 1).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dkernel


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


@jax.custom_vjp
def _pointwise(x, kernel):
  """x [..., Cin] @ kernel [Cin, Cout]: a 1x1 convolution."""
  return jnp.einsum('...c,cd->...d', x, kernel)


def _pointwise_fwd(x, kernel):
  return _pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(res, dy):
  x, kernel = res
  cin, cout = kernel.shape
  dx = jnp.einsum('...d,cd->...c', dy, kernel)
  # The kernel gradient contracts over pixels, so one operand is transposed (channels first) for
  # the GEMM. Left to XLA, it transposed the wider one with the elementwise gradient (ReLU mask, BN
  # scale) fused in, recomputed at a strided read per element: ~80 ms for [2, 96, 96, 256], twice
  # per block. Transposing the narrower one, materialised first, is a plain copy.
  x2, dy2 = x.reshape(-1, cin), dy.reshape(-1, cout)
  if cin <= cout:
    dkernel = jnp.dot(jax.lax.optimization_barrier(x2).T, dy2,
                      preferred_element_type=jnp.float32)
  else:
    dkernel = jnp.dot(jax.lax.optimization_barrier(dy2).T, x2,
                      preferred_element_type=jnp.float32).T
  return dx, dkernel.astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, pad: int = 0) -> jax.Array:
  """x [B, H, W, Cin], kernel [k, k, Cin, Cout], symmetric zero padding -> [B, H', W', Cout]."""
  if kernel.shape[0] == kernel.shape[1] == 1 and pad == 0:
    return _pointwise(x[:, ::stride, ::stride], kernel[0, 0])
  return _conv_kxk(x, kernel, stride, pad)


class Dense(nn.Module):
  """`nn.Dense` (same variables 'kernel' [Cin, Cout] and 'bias', same initialisers) computed with
  the 1x1 convolution's GEMMs, whose kernel gradient transposes the narrower operand."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., Cin] -> [..., features]."""
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    y = _pointwise(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Conv(nn.Module):
  """`nn.Conv` with square kernel, symmetric padding k // 2 and the same variables ('kernel' HWIO,
  'bias'), computed with `conv2d`."""
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, Cin] -> [B, H/stride, W/stride, features]."""
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, k // 2)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
