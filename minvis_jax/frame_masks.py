"""The model's per-frame mask logits -> masks at the original frame size and their RLEs
(docs/method.md §1), and the disk store of every frame's logits; shared by the offline predictor
and the online tracker, without the model code."""

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils

from minvis_jax import ops

P = jax.sharding.PartitionSpec


def mask_logits_t(m: jnp.ndarray, padded_size, valid_size, out_size) -> jnp.ndarray:
  """Mask logits [Q, Hp/4, Wp/4] -> [Q, W, H] (transposed: pycocotools' column-major order) at the
  original size: to the padded input size, crop the valid image, to the original size (bilinear,
  no antialias; docs/method.md §1).

  The three steps are linear along each axis, so they are applied as one product per axis with the
  composed [H, Hp/4] and [W, Wp/4] matrices (computed in float64): the same values as resizing
  twice up to float32 rounding, with far fewer flops.
  """
  (hp, wp), (h, w) = padded_size, valid_size
  rows = ops.bilinear_matrix(h, out_size[0]) @ ops.bilinear_matrix(m.shape[1], hp)[:h]  # [H, Hp/4]
  cols = ops.bilinear_matrix(w, out_size[1]) @ ops.bilinear_matrix(m.shape[2], wp)[:w]  # [W, Wp/4]
  # float16 first: the logits the earlier host-side implementation kept, so results are unchanged.
  m = m.astype(jnp.float16).astype(jnp.float32)
  highest = jax.lax.Precision.HIGHEST   # as jax.image.resize: no bfloat16 passes on TPU
  m = jnp.einsum('qhx,Xx->qXh', m, jnp.asarray(cols, jnp.float32), precision=highest)
  return jnp.einsum('qXh,Yh->qXY', m, jnp.asarray(rows, jnp.float32), precision=highest)


@functools.lru_cache(maxsize=16)
def masks_fn(mesh: jax.sharding.Mesh, padded_size, valid_size, out_size):
  """Jitted: float16 logits [W, k, Hp/4, Wp/4] -> masks (docs/method.md §1) packed 8 pixels to a
  byte, column major (pycocotools' order) [W, k, ceil(H*W/8)] uint8, sharded over the frames."""
  def to_bits(masks):                # on each device: its own frames, one frame at a time
    def one(m):
      binary = mask_logits_t(m, padded_size, valid_size, out_size) > 0    # [k, W, H]
      return jnp.packbits(binary.reshape(binary.shape[0], -1), axis=-1)
    return jax.lax.map(one, masks)
  frames = P('frames')
  return jax.jit(jax.shard_map(to_bits, mesh=mesh, in_specs=frames, out_specs=frames))


def encode(bits: np.ndarray, out_size) -> list[bytes]:
  """Packed masks [k, ceil(H*W/8)] of one frame -> the RLE counts of each."""
  h, w = out_size
  masks = np.unpackbits(bits, axis=-1, count=h * w).reshape(-1, w, h)
  rles = mask_utils.encode(masks.transpose(2, 1, 0))   # [H, W, k] Fortran order, no copy
  return [r['counts'] for r in rles]


# The mask logit of "no mask": negative everywhere after any resize, so the mask is empty.
EMPTY = np.finfo(np.float16).min


class LogitStore:
  """Every frame's float16 mask logits [Q, h, w] in an anonymous temporary file: the host keeps
  nothing per frame (dense logits in memory would grow with the video)."""

  def __init__(self):
    self._file = tempfile.TemporaryFile()
    self.shape, self.frames = None, 0

  def add(self, masks: np.ndarray) -> None:
    """masks: float16 [Q, h, w] of the next frame."""
    if self.shape is None:
      self.shape = masks.shape
    data = np.ascontiguousarray(masks, np.float16).tobytes()
    try:
      self._file.write(data)
    except OSError as e:   # e.g. a full disk: say where and how much, not a bare errno
      raise OSError(e.errno, f'cannot write the mask logits of frame {self.frames} to a temporary '
                    f'file in {tempfile.gettempdir()} ({e.strerror}); the video needs '
                    f'{len(data) / 2**20:.1f} MiB of it a frame: point TMPDIR at a disk with '
                    'room') from e
    self.frames += 1

  def read(self, frame: int, queries) -> np.ndarray:
    """float16 [len(queries), h, w]: the logits of `queries` in `frame`; a query -1 reads EMPTY
    (a track without a mask in that frame)."""
    self._file.flush()
    q, h, w = self.shape
    size = h * w * 2
    fd = self._file.fileno()
    out = np.empty((len(queries), h, w), np.float16)
    for i, query in enumerate(queries):
      if query < 0:
        out[i] = EMPTY
        continue
      out[i] = np.frombuffer(os.pread(fd, size, (frame * q + int(query)) * size),
                             np.float16).reshape(h, w)
    return out

  def close(self) -> None:
    self._file.close()
