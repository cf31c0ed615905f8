"""One level of deformable-attention sampling in the head-major layout of the references (tests and
benchmarks/deform_attn.py)."""

import jax

from minvis_jax.models import deform_attn


def sample_level(value: jax.Array, height: int, width: int, loc: jax.Array,
                 weight: jax.Array) -> jax.Array:
  """`deform_attn.multi_scale_sample` of one level in head-major layout.

  value: [B, M, H*W, D]; loc: [B, M, S, P, 2]; weight: [B, M, S, P] -> [B, M, S, D].
  """
  out = deform_attn.multi_scale_sample(value.transpose(0, 2, 1, 3), [(height, width)],
                                       loc.transpose(0, 2, 1, 3, 4)[:, :, :, None],
                                       weight.transpose(0, 2, 1, 3)[:, :, :, None])
  return out.transpose(0, 2, 1, 3)
