"""2-D convolution (NHWC, HWIO), dense layer and the ResNet stem's max-pool, with custom gradients
for XLA:CPU; the same numbers as XLA's own forms up to float rounding.

Why: XLA:CPU computes a kernel gradient as another convolution, many times slower than the forward,
and its max-pool gradient as a scatter. Tuned and measured on CPU only (benchmarks/ has the
timings). The tuned parts of the gradients (materialising barriers, per-image kernel gradients)
sit behind `ops.per_platform`, chosen by the platform the program is compiled for (also when a
TPU program is compiled on a CPU host, `minvis-jax plan`); other platforms get XLA's plain forms.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from minvis_jax.ops import per_platform


def _xla_conv(x, kernel, stride, pad):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_kxk(x, kernel, stride, pad):
  return _xla_conv(x, kernel, stride, pad)


def _conv_kxk_fwd(x, kernel, stride, pad):
  return _xla_conv(x, kernel, stride, pad), (x, kernel)


def _conv_kxk_grads(x, kernel, dy, stride, pad, per_image: bool):
  _, input_vjp = jax.vjp(lambda a: _xla_conv(a, kernel, stride, pad), x)
  (dx,) = input_vjp(dy)

  def kernel_grad(xb, dyb):
    return jax.vjp(lambda k: _xla_conv(xb, k, stride, pad), kernel)[1](dyb)[0]

  if per_image:
    return dx, sum(kernel_grad(x[b:b + 1], dy[b:b + 1]) for b in range(dy.shape[0]))
  return dx, kernel_grad(x, dy)


def _conv_kxk_bwd(stride, pad, res, dy):
  x, kernel = res
  grads = lambda per_image: lambda *a: _conv_kxk_grads(*a, stride, pad, per_image)  # noqa: E731

  def tuned(x, kernel, dy):
    # Both materialised first: fused into the gradient convolutions, their producers (the FPN's
    # upsample-and-add, a norm's gradient) were recomputed at every read.
    x, dy = jax.lax.optimization_barrier((x, dy))
    # XLA:CPU's kernel gradient of a large map is slower for a batch than for its images one by
    # one, so large maps go one image at a time there; small maps (and other platforms) batched.
    if dy.shape[0] > 1 and math.prod(dy.shape[1:]) >= 1 << 21:
      return jax.lax.platform_dependent(x, kernel, dy, cpu=grads(True), default=grads(False))
    return grads(False)(x, kernel, dy)
  return per_platform(tuned, grads(False), x, kernel, dy)


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
  # scale) fused in, recomputed at a strided read per element. Transposing the narrower one,
  # materialised first, is a plain copy. The barriers sit after the transposes (and on the product
  # before its own transpose): otherwise XLA folds them into the dot's dimension numbers, and a dot
  # contracting over its operands' leading dimension runs on XLA:CPU's generic GEMM instead of
  # YNNPACK's.
  x2, dy2 = x.reshape(-1, cin), dy.reshape(-1, cout)

  def tuned(x2, dy2):
    if cin <= cout:
      return jnp.dot(jax.lax.optimization_barrier(x2.T), dy2, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(
        jnp.dot(jax.lax.optimization_barrier(dy2.T), x2, preferred_element_type=jnp.float32)).T

  def plain(x2, dy2):   # XLA's own choice of layout
    return jnp.einsum('nc,nd->cd', x2, dy2, preferred_element_type=jnp.float32)
  dkernel = per_platform(tuned, plain, x2, dy2)
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


def _pool_taps(x: jax.Array):
  """The 9 strided taps [B, Ho, Wo, C] of a 3x3, stride-2 window over x padded by 1 with -inf."""
  h, w = x.shape[1:3]
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)]


def _max_pool_fwd(x):
  taps = _pool_taps(x)
  best, which = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for t, tap in enumerate(taps[1:], 1):
    # Strictly greater: ties go to the first tap in window order, as torch's and XLA's own pools.
    larger = tap > best
    best = jnp.where(larger, tap, best)
    which = jnp.where(larger, jnp.int8(t), which)
  return best, (which, x.shape)


def _max_pool_bwd(res, dy):
  which, shape = res
  h, w = shape[1:3]
  ho, wo = dy.shape[1:3]
  zero = jnp.zeros((), dy.dtype)
  dx = 0
  for t in range(9):
    i, j = divmod(t, 3)
    # The tap's gradient back at its input positions: stride 2 by interior padding.
    dx = dx + jax.lax.pad(jnp.where(which == t, dy, zero), zero,
                          ((0, 0, 0), (i, h + 2 - i - (2 * ho - 1), 1),
                           (j, w + 2 - j - (2 * wo - 1), 1), (0, 0, 0)))
  return (dx[:, 1:h + 1, 1:w + 1],)


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))`, the ResNet stem's pool:
  x [B, H, W, C] -> [B, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C], same values and gradients (ties to
  the first maximum in window order). Its gradient keeps the winning tap (int8) from the forward
  and spreads the output gradient back by 9 strided pads, where XLA:CPU's own max-pool gradient (a
  reduce-window carrying four index arrays, then a scatter) is slow."""
  return _max_pool_fwd(x)[0]


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
