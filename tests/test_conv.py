"""minvis_jax.models.conv against XLA's convolution and flax's Dense and max-pool: values and
every gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax.models.conv import Dense
from minvis_jax.models.conv import conv2d
from minvis_jax.models.conv import max_pool_3x3_s2


# 1x1 with more input than output channels too: its kernel gradient transposes the other operand.
# The last map is large enough (64 x 65 x 512) for the kernel gradient one image at a time.
@pytest.mark.parametrize('k,stride,size,cin,cout', [
    (1, 1, 9, 5, 6), (1, 2, 9, 5, 6), (1, 1, 9, 7, 3), (1, 2, 9, 7, 3), (3, 1, 8, 5, 6),
    (3, 2, 9, 5, 6), (7, 2, 10, 5, 6), (3, 1, 64, 2, 512)])
def test_conv2d_and_its_gradients_equal_xla_conv(k, stride, size, cin, cout):
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
  pad = k // 2

  def xla(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  ours = conv2d(x, kernel, stride, pad)
  ref = xla(x, kernel)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # A loss that weights every output differently, so each gradient entry is checked.
  w = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  grads = [jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) * w), argnums=(0, 1))(x, kernel)
           for f in (lambda a, b: conv2d(a, b, stride, pad), xla)]
  for g_ours, g_ref in zip(*grads):
    # Sums over up to 8320 products: rounding grows with the gradient's scale.
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=max(1e-4, 2e-6 * scale))


@pytest.mark.parametrize('cin,cout', [(5, 7), (7, 3)])
def test_dense_equals_flax_dense_with_gradients(cin, cout):
  rng = np.random.default_rng(cin)
  x = jnp.asarray(rng.normal(size=(2, 11, cin)), jnp.float32)
  ours, ref = Dense(cout), nn.Dense(cout)
  variables = ref.init(jax.random.PRNGKey(0), x)
  # Same variables (names, shapes) as nn.Dense, so checkpoints and converters are unchanged.
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(
      jnp.shape, variables)
  variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype), variables)
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-6, atol=1e-6)
  w = jnp.asarray(rng.normal(size=(2, 11, cout)), jnp.float32)
  grads = [jax.grad(lambda v, a, m=m: jnp.sum(m.apply(v, a) * w), argnums=(0, 1))(variables, x)
           for m in (ours, ref)]
  for g_ours, g_ref in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 12, 12, 4), (1, 7, 10, 3), (2, 9, 5, 2)])
def test_max_pool_and_its_gradient_equal_flax_max_pool(shape):
  rng = np.random.default_rng(sum(shape))
  # ReLU'd inputs (zeros tie in most windows) plus a channel of equal values: ties must go to the
  # same input (the window's first maximum) as in XLA's pool, or gradients differ by whole entries.
  x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
  x[..., 0] = 1.0
  x = jnp.asarray(x)

  def ref(a):
    return nn.max_pool(a, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  np.testing.assert_array_equal(max_pool_3x3_s2(x), ref(x))
  w = jnp.asarray(rng.normal(size=ref(x).shape), jnp.float32)
  grads = [jax.grad(lambda a, f=f: jnp.sum(f(a) * w))(x) for f in (max_pool_3x3_s2, ref)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)
  assert float(jnp.sum(grads[0] != 0)) > 0
