"""Seeded procedural VIS videos (textured shapes that move, scale, enter/leave and occlude), written
in the exact YouTube-VIS 2019 layout: OUT/<split>/JPEGImages/<video>/<t>.jpg and OUT/<split>.json.

  python -m minvis_jax.data.synthetic --out DIR --videos 40 --frames 12 --valid_videos 8
"""

import argparse
import json
import os
import zlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Dataset category ids 1..4; each category has its own shape AND its own texture/colours so that a
# tiny model can tell them apart after a few hundred steps.
CATEGORIES = ((1, 'disc'), (2, 'square'), (3, 'triangle'), (4, 'cross'))
# Two RGB colours per category: (foreground pattern colour, second colour).
_COLORS = np.array([
    [[225, 45, 40], [110, 15, 15]],     # disc: red / dark red horizontal stripes
    [[40, 75, 225], [235, 235, 245]],   # square: blue / white checkerboard
    [[45, 195, 65], [10, 70, 20]],      # triangle: green with dark dots
    [[245, 215, 40], [195, 40, 200]],   # cross: yellow / magenta diagonal stripes
], np.float32)
_JPEG_QUALITY = 90


def _shape_mask(cat: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Object-local coordinates (unit = half size) -> bool mask of the category's shape."""
  if cat == 0:
    return u * u + v * v <= 1.0
  if cat == 1:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85
  if cat == 2:  # pointing up, base at v = 0.8
    return (v <= 0.8) & (v >= -1.0) & (np.abs(u) <= (v + 1.0) * 0.55)
  return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))


def _texture(cat: int, u: np.ndarray, v: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """Object-local coordinates [H, W] -> float32 RGB [H, W, 3]; the pattern moves with the object."""
  if cat == 0:
    second = np.floor(v * 3.0) % 2 == 1
  elif cat == 1:
    second = (np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 1
  elif cat == 2:
    fu, fv = u * 3.0 % 1.0 - 0.5, v * 3.0 % 1.0 - 0.5
    second = fu * fu + fv * fv < 0.06
  else:
    second = np.floor((u + v) * 2.5) % 2 == 1
  return np.where(second[..., None], colors[1], colors[0])


def _point(rng: np.random.Generator, where: str, side: int, s: float, h: int, w: int):
  """A centre inside the frame, or just outside one side (so that the shape is fully invisible)."""
  if where == 'inside':
    return rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
  off = 1.3 * s  # > the largest extent of any shape (rotated square corner: 0.85 * sqrt(2))
  along = rng.uniform(0.2, 0.8)
  return [(-off, along * h), (w + off, along * h), (along * w, -off), (along * w, h + off)][side]


def render_video(rng: np.random.Generator, num_frames: int, height: int, width: int,
                 num_instances: int | None = None) -> dict:
  """Simulates one video.

  Returns dict(frames uint8 [T, H, W, 3], visible bool [N, T, H, W] (after occlusion, front shape
  wins), amodal bool [N, T, H, W] (whole shape, clipped to the frame), categories int [N] (1..4),
  depth int [N] (0 = front)). Instances invisible in every frame are kept here (callers drop them).
  """
  t_count, h, w = num_frames, height, width
  n = int(rng.integers(1, 5)) if num_instances is None else num_instances
  cats = rng.integers(0, len(CATEGORIES), size=n)
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5

  tracks = []
  for i in range(n):
    s0 = rng.uniform(0.12, 0.3) * min(h, w)
    s1 = s0 * np.exp(rng.uniform(-0.5, 0.5))  # grows or shrinks over the video
    # The first instance stays in view so that every video has something to segment.
    mode = 'inside' if i == 0 else rng.choice(['inside', 'enter', 'leave', 'cross'],
                                              p=[0.3, 0.25, 0.25, 0.2])
    side = int(rng.integers(0, 4))
    start = _point(rng, 'inside' if mode in ('inside', 'leave') else 'out', side, s0, h, w)
    # A crossing object leaves through the opposite side.
    end_side = side ^ 1 if mode == 'cross' else int(rng.integers(0, 4))
    end = _point(rng, 'inside' if mode in ('inside', 'enter') else 'out', end_side, s1, h, w)
    angle0 = rng.uniform(0, 2 * np.pi) if cats[i] != 2 else rng.uniform(-0.3, 0.3)
    spin = rng.uniform(-0.15, 0.15)
    colors = np.clip(_COLORS[cats[i]] * rng.uniform(0.85, 1.15, size=(2, 3)), 0, 255)
    tracks.append((start, end, s0, s1, angle0, spin, colors))

  # Mildly noisy, low-saturation background with a gradient, different for every video.
  grey = rng.uniform(80, 170)
  tint = rng.uniform(-15, 15, size=3)
  grad = rng.uniform(-25, 25, size=2)
  bg = (grey + tint + grad[0] * (ys / h - 0.5)[..., None] + grad[1] * (xs / w - 0.5)[..., None]
        + rng.normal(0, 6, size=(h, w, 3)))

  frames = np.empty((t_count, h, w, 3), np.uint8)
  visible = np.zeros((n, t_count, h, w), bool)
  amodal = np.zeros((n, t_count, h, w), bool)
  for t in range(t_count):
    a = t / max(t_count - 1, 1)
    img = bg + rng.normal(0, 3, size=(h, w, 3))
    occupied = np.zeros((h, w), bool)
    for i in range(n):  # index order = depth order: instance 0 is in front
      (x0, y0), (x1, y1), s0, s1, angle0, spin, colors = tracks[i]
      cx, cy, s = x0 + a * (x1 - x0), y0 + a * (y1 - y0), s0 * (s1 / s0) ** a
      c, sn = np.cos(angle0 + spin * t), np.sin(angle0 + spin * t)
      dx, dy = (xs - cx) / s, (ys - cy) / s
      u, v = c * dx + sn * dy, -sn * dx + c * dy
      m = _shape_mask(int(cats[i]), u, v)
      amodal[i, t] = m
      vis = m & ~occupied
      visible[i, t] = vis
      img[vis] = _texture(int(cats[i]), u[vis], v[vis], colors)
      occupied |= m
    frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return {'frames': frames, 'visible': visible, 'amodal': amodal,
          'categories': np.asarray([CATEGORIES[c][0] for c in cats]), 'depth': np.arange(n)}


def video_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of video `index` of a split: independent of how many videos are written."""
  return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _annotation(visible: np.ndarray) -> tuple[list, list, list]:
  """bool [T, H, W] -> per-frame (compressed RLE with str counts | None, area | None, bbox | None)."""
  segs, areas, boxes = [], [], []
  for m in visible:
    if not m.any():
      segs.append(None), areas.append(None), boxes.append(None)
      continue
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    segs.append({'size': [int(x) for x in rle['size']], 'counts': rle['counts'].decode('ascii')})
    areas.append(int(mask_utils.area(rle)))
    boxes.append([float(x) for x in mask_utils.toBbox(rle)])
  return segs, areas, boxes


def generate(out_dir: str, split: str, num_videos: int, num_frames: int, height: int = 128,
             width: int = 224, seed: int = 0) -> str:
  """Writes `num_videos` videos of `num_frames` frames; returns the path of OUT/<split>.json."""
  if num_videos < 1 or num_frames < 1:
    raise ValueError(f'need at least one video and one frame, got {num_videos} x {num_frames}')
  videos, annotations = [], []
  for i in range(num_videos):
    rng = video_rng(seed, split, i)
    while True:
      sim = render_video(rng, num_frames, height, width)
      keep = [k for k in range(len(sim['categories'])) if sim['visible'][k].any()]
      if keep:
        break
    name = f'{split}_{i:05d}'
    folder = os.path.join(out_dir, split, 'JPEGImages', name)
    os.makedirs(folder, exist_ok=True)
    file_names = []
    for t in range(num_frames):
      file_names.append(f'{name}/{t:05d}.jpg')
      Image.fromarray(sim['frames'][t]).save(os.path.join(folder, f'{t:05d}.jpg'),
                                             quality=_JPEG_QUALITY)
    vid = i + 1
    videos.append({'id': vid, 'width': width, 'height': height, 'length': num_frames,
                   'file_names': file_names})
    for k in keep:
      segs, areas, boxes = _annotation(sim['visible'][k])
      annotations.append({'id': len(annotations) + 1, 'video_id': vid,
                          'category_id': int(sim['categories'][k]), 'iscrowd': 0,
                          'width': width, 'height': height, 'length': num_frames,
                          'segmentations': segs, 'areas': areas, 'bboxes': boxes})
  data = {
      'info': {'description': f'minvis-jax synthetic VIS ({split}, seed {seed})'},
      'licenses': [],
      'videos': videos,
      'annotations': annotations,
      'categories': [{'supercategory': 'shape', 'id': cid, 'name': name}
                     for cid, name in CATEGORIES],
  }
  json_path = os.path.join(out_dir, f'{split}.json')
  os.makedirs(out_dir, exist_ok=True)
  with open(json_path, 'w') as f:
    json.dump(data, f)
  return json_path


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True, help='dataset root (manual_dir)')
  p.add_argument('--videos', type=int, required=True, help='training videos')
  p.add_argument('--frames', type=int, required=True, help='frames per video')
  p.add_argument('--valid_videos', type=int, default=0, help='validation videos (with GT)')
  p.add_argument('--height', type=int, default=128)
  p.add_argument('--width', type=int, default=224)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  splits = [('train', args.videos)] + ([('valid', args.valid_videos)] if args.valid_videos else [])
  for split, n in splits:
    path = generate(args.out, split, n, args.frames, args.height, args.width, args.seed)
    print(f'wrote {n} videos x {args.frames} frames: {path}')


if __name__ == '__main__':
  main()
