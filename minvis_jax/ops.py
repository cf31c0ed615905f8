"""Shared array math: bilinear sampling and resizing (align_corners=False, zero padding) and the
on-device image normalisation.

One bilinear convention for the whole package, torch's `grid_sample`/`interpolate` with
align_corners=False: pixel i of a side of length n has its centre at (i + 0.5) / n in normalised
coordinates. Point sampling (`bilinear_corners`) reads 0 outside the raster; resizing
(`resize_bilinear`, `bilinear_matrix`) clamps at the edges, as torch's interpolate does.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def per_platform(tuned: Callable, plain: Callable, *args):
  """`tuned(*args)` in a program compiled for CPU or TPU, `plain(*args)` elsewhere: the one switch
  of the tuned forms (conv gradients, the criterion's top-k). Chosen when the program is lowered
  for its devices (`jax.lax.platform_dependent`), never by the host's default backend; only the
  chosen branch is compiled. TPU keeps the tuned forms by measurement (docs/tpu.md: the tiny train
  step on v5e compiled with the plain forms had 6% more temporaries and 0.1% more HBM bytes, for
  1.3% fewer flops)."""
  return jax.lax.platform_dependent(*args, cpu=tuned, tpu=tuned, default=plain)


def on_tpu(tpu: Callable, other: Callable, *args):
  """`tpu(*args)` in a program compiled for TPU, `other(*args)` elsewhere (CPU and GPU keep their
  forms bit for bit). For the criterion's point sampling: XLA:TPU counts about one (8, 128) tile
  of HBM traffic for every index a gather reads, so a gather of single values or of 2-float rows
  costs thousands of bytes a value there (docs/tpu.md); the TPU forms compute the same numbers
  without those gathers. Chosen when the program is lowered, like `per_platform`."""
  return jax.lax.platform_dependent(*args, tpu=tpu, default=other)


# Corner offsets (dx, dy) in the order every caller sums them: the sums' rounding depends on it.
CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def bilinear_corners(coords: jax.Array, height: int,
                     width: int) -> list[tuple[jax.Array, jax.Array]]:
  """The four bilinear corners of points on an [H, W] raster (align_corners=False, zero padding).

  Args:
    coords: [..., 2] points (x, y) in normalised coordinates ([0, 1] covers the raster; x runs
      along W); points outside read zeros.
    height, width: the raster's H and W.

  Returns:
    Four (position, weight) pairs in `CORNERS` order, each [...]: position int32 in the row-major
    H * W raster, clipped into it; weight float32, 0 where the corner lies outside the raster.
  """
  # align_corners=False: pixel centres sit at (i + 0.5) / size.
  x = coords[..., 0] * width - 0.5
  y = coords[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  corners = []
  for dx, dy in CORNERS:
    xi = x0 + dx
    yi = y0 + dy
    weight = (1.0 - jnp.abs(x - xi)) * (1.0 - jnp.abs(y - yi))
    inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
    position = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).astype(jnp.int32)
    corners.append((position, jnp.where(inside, weight, 0.0)))
  return corners


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize like torch interpolate(align_corners=False), no antialias.

  Args:
    x: [..., H, W, C].

  Returns:
    [..., height, width, C] in x's dtype.
  """
  shape = x.shape[:-3] + (height, width, x.shape[-1])
  return jax.image.resize(x, shape, method='bilinear', antialias=False)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """The weights of a 1-D bilinear resize from n_in to n_out samples as a matrix (torch interpolate,
  align_corners=False, no antialias: half-pixel centres, clamped at the edges).

  Returns:
    float64 [n_out, n_in]; `bilinear_matrix(n_in, n_out) @ v` resizes v [n_in].
  """
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  a = np.zeros((n_out, n_in))
  np.add.at(a, (np.arange(n_out), lo), 1 - frac)
  np.add.at(a, (np.arange(n_out), hi), frac)
  return a


def normalize(images: jax.Array, image_size: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """(x - mean) / std on the device, zero outside each image's valid region.

  Args:
    images: uint8 [B, H, W, 3], each image at the top left of a zero-padded canvas.
    image_size: int [B, 2], the valid (h, w) of each image.
    mean, std: [3] per-channel statistics in the 0-255 scale.

  Returns:
    float32 [B, H, W, 3]. Within an ulp of `data.transforms.normalize_and_pad` on the host, not
    equal to it: XLA divides by multiplying with the reciprocal.
  """
  h, w = images.shape[1:3]
  inside = ((jnp.arange(h)[None, :, None] < image_size[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < image_size[:, 1, None, None]))
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return jnp.where(inside[..., None], x, 0.0)
