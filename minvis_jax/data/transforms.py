"""Image geometry and normalisation shared by the training input and video inference
(docs/method.md §1, §2)."""

from typing import Sequence

import numpy as np
from PIL import Image


def resize_shape(height: int, width: int, short: int, max_size: int,
                 keys: tuple[str, str] = ('short', 'max_size')) -> tuple[int, int]:
  """detectron2's ResizeShortestEdge: short side to `short`, long side at most `max_size`.

  Returns the new (height, width), rounded half up as the original. A frame so elongated that a
  side would become 0 raises ValueError naming its size and `keys` (the config keys of `short`,
  `max_size`).
  """
  scale = short / min(height, width)
  new_h, new_w = height * scale, width * scale
  if max(new_h, new_w) > max_size:
    rescale = max_size / max(new_h, new_w)
    new_h, new_w = new_h * rescale, new_w * rescale
  size = int(new_h + 0.5), int(new_w + 0.5)
  if min(size) < 1:
    raise ValueError(f'a {height}x{width} frame resizes to {size[0]}x{size[1]} with '
                     f'{keys[0]}={short} and {keys[1]}={max_size}: its aspect ratio is too '
                     f'extreme; crop it or raise {keys[1]}')
  return size


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3], bilinear (PIL, as detectron2)."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [N, H, W] -> uint8 [N, h, w], nearest neighbour (as detectron2 for masks)."""
  if masks.shape[1:] == tuple(size):
    return masks
  h, w = masks.shape[1:]
  # Nearest source pixel of each target pixel centre, as PIL's NEAREST.
  rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
  return masks[:, rows][:, :, cols]


def normalize_and_pad(image: np.ndarray, mean: Sequence[float], std: Sequence[float],
                      padded_size: tuple[int, int]) -> np.ndarray:
  """uint8 [h, w, 3] -> float32 [Hp, Wp, 3]: (x - mean) / std, zero padding bottom/right.

  Inference normalises here, on the host: the device form (`ops.normalize`, used in training)
  differs by an ulp, which would change the rounding of inference's masks.
  """
  h, w = image.shape[:2]
  if h > padded_size[0] or w > padded_size[1]:
    raise ValueError(f'image {h}x{w} does not fit the padded size {padded_size}')
  out = np.zeros((*padded_size, 3), np.float32)
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  out[:h, :w] = (image.astype(np.float32) - mean) / std
  return out


def padded_size(height: int, width: int, divisibility: int) -> tuple[int, int]:
  """The size padded up to a multiple of `divisibility`."""
  return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility


def test_frame(image: np.ndarray, min_size: int, max_size: int, mean: Sequence[float],
               std: Sequence[float], divisibility: int = 32) -> tuple[np.ndarray, tuple[int, int]]:
  """Test-time input of one frame (docs/method.md §1): resized, normalised, padded to
  `divisibility`.

  Returns (float32 [Hp, Wp, 3], (h, w) of the resized image inside the padding).
  """
  size = resize_shape(*image.shape[:2], min_size, max_size)
  return normalize_and_pad(resize_image(image, size), mean, std,
                           padded_size(*size, divisibility)), size
