"""Seeded procedural VIS videos (textured shapes that move, scale, enter/leave and occlude), written
in the exact YouTube-VIS 2019 layout: OUT/<split>/JPEGImages/<video>/<t>.jpg and OUT/<split>.json.

  minvis-jax data synthetic --out DIR --videos 40 --frames 12 --valid_videos 8
  minvis-jax data synthetic --out DIR --videos 0 --frames 24 --valid_videos 30 --occlusion

(`python -m minvis_jax.data.synthetic ...` is the same as `minvis-jax data synthetic ...`.)
"""

import json
import zlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from minvis_jax import paths
from minvis_jax.data import categories

# Dataset category ids 1..4 (categories.SYNTHETIC); each category has its own shape AND its own
# texture/colours so that a tiny model can tell them apart after a few hundred steps.
CATEGORIES = categories.SYNTHETIC
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
                 num_instances: int | None = None, occlusion: bool = False) -> dict:
  """Simulates one video (`occlusion`: the occlusion-heavy scenes of `_occlusion_scene`).

  Returns dict(frames uint8 [T, H, W, 3], visible bool [N, T, H, W] (after occlusion, front shape
  wins), amodal bool [N, T, H, W] (whole shape, clipped to the frame), categories int [N] (1..4),
  depth int [N] (0 = front)). Instances invisible in every frame are kept here (callers drop them).
  """
  t_count, h, w = num_frames, height, width
  if occlusion:
    cats, tracks = _occlusion_scene(rng, t_count, h, w)
  else:
    cats, tracks = _standard_scene(rng, t_count, h, w, num_instances)
  return _render(rng, cats, tracks, t_count, h, w)


def _standard_scene(rng, t_count, h, w, num_instances):
  """Instances that move linearly between two points (inside, or just outside a side: enter, leave,
  cross) and grow or shrink. -> (categories [N] 0-based, [(path, angle0, spin, colors)]) where
  path(t) -> (cx, cy, s) is the centre and half size at frame t."""
  n = int(rng.integers(1, 5)) if num_instances is None else num_instances
  cats = rng.integers(0, len(CATEGORIES), size=n)
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

    def path(t, start=start, end=end, s0=s0, s1=s1):
      (x0, y0), (x1, y1) = start, end
      a = t / max(t_count - 1, 1)
      return x0 + a * (x1 - x0), y0 + a * (y1 - y0), s0 * (s1 / s0) ** a
    tracks.append((path, angle0, spin, colors))
  return cats, tracks


def _waypoints(times, points, size):
  """Piecewise-linear path through (time, (x, y)) waypoints, constant half size."""
  times = np.asarray(times, np.float64)
  xs, ys = np.asarray(points, np.float64).T
  return lambda t: (float(np.interp(t, times, xs)), float(np.interp(t, times, ys)), size)


# Radius of a circle around the centre that contains every shape (unit = half size; the largest
# extent is a rotated square's corner, 0.85 * sqrt(2)): a shape is fully hidden when this circle is.
_EXTENT = 1.3
# Radius of the largest centred circle inside a disc / square occluder (unit = its half size).
_INNER = (1.0, 0.85)


def _occlusion_scene(rng, t_count, h, w):
  """Occlusion-heavy scene (`--occlusion`), same return as `_standard_scene`. Depth order:

  0. an occluder: a large disc or square drifting slowly near the centre, in front of everything;
  1. a hider that passes straight behind it and is fully hidden for at least 2k+1 consecutive
     frames (k = 1, 2) in the middle of the video;
  2., 3. two look-alikes: the same category, colours and size within a few percent, whose straight
     paths cross at the same point at the same frame (the back one is hidden there for a frame or
     two);
  4. with probability 1/2, an object that leaves the frame through one side, stays out for 3-6
     frames and comes back in through the same side.
  """
  if t_count < 12:
    raise ValueError(f'occlusion videos need at least 12 frames, got {t_count}')
  m = min(h, w)
  last = t_count - 1

  def colors_of(cat, spread):
    return np.clip(_COLORS[cat] * rng.uniform(1 - spread, 1 + spread, size=(2, 3)), 0, 255)

  def angle_of(cat):
    return rng.uniform(0, 2 * np.pi) if cat != 2 else rng.uniform(-0.3, 0.3)

  cats, tracks = [], []
  # 0. The occluder, sized so that the hider (1) moving at `speed` relative to it is fully hidden
  # while |t - mid| <= k, i.e. for 2k + 1 frames: its extent circle must fit in the occluder's inner
  # circle for a distance of reach = (k + 0.5) * speed either side of the centre.
  occ_cat = int(rng.integers(0, 2))
  small = rng.uniform(0.1, 0.13) * m
  speed = rng.uniform(0.035, 0.05) * m
  k = int(rng.integers(1, 3))
  big = ((k + 0.5) * speed + _EXTENT * small) / _INNER[occ_cat]
  o0 = np.array([rng.uniform(0.35, 0.65) * w, rng.uniform(0.4, 0.6) * h])
  o1 = o0 + rng.uniform(-0.05, 0.05, size=2) * m
  cats.append(occ_cat)
  tracks.append((_waypoints([0, last], [o0, o1], big), angle_of(occ_cat),
                 rng.uniform(-0.05, 0.05), colors_of(occ_cat, 0.15)))
  occluder_at = lambda t: o0 + t / last * (o1 - o0)  # noqa: E731

  # 1. The hider: straight behind the occluder, mostly horizontally.
  cat = int(rng.integers(0, len(CATEGORIES)))
  mid = int(rng.integers(t_count // 3, 2 * t_count // 3 + 1))
  heading = rng.uniform(-0.5, 0.5) + np.pi * rng.integers(0, 2)
  step = speed * np.array([np.cos(heading), np.sin(heading)])
  cats.append(cat)
  tracks.append((_waypoints([0, last], [occluder_at(0) - mid * step,
                                        occluder_at(last) + (last - mid) * step], small),
                 angle_of(cat), rng.uniform(-0.15, 0.15), colors_of(cat, 0.15)))

  # 2., 3. Look-alikes crossing at `meet` at frame `cross` (opposite-ish directions).
  cat = int(rng.integers(0, len(CATEGORIES)))
  size = rng.uniform(0.13, 0.2) * m
  base = _COLORS[cat] * rng.uniform(0.9, 1.1, size=(2, 3))
  cross = int(rng.integers(t_count // 3, 2 * t_count // 3 + 1))
  meet = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
  heading = rng.uniform(0, 2 * np.pi)
  angle, spin = angle_of(cat), rng.uniform(-0.1, 0.1)
  for turn in (0.0, np.pi + rng.uniform(-0.7, 0.7)):
    v = rng.uniform(0.025, 0.045) * w * np.array([np.cos(heading + turn), np.sin(heading + turn)])
    cats.append(cat)
    tracks.append((_waypoints([0, last], [meet - cross * v, meet + (last - cross) * v],
                              size * rng.uniform(0.95, 1.05)),
                   angle + rng.uniform(-0.2, 0.2), spin,
                   np.clip(base * rng.uniform(0.97, 1.03, size=(2, 3)), 0, 255)))

  # 4. Leaves and re-enters through one side: outside (fully) from frame `out` to `back`.
  if rng.uniform() < 0.5:
    cat = int(rng.integers(0, len(CATEGORIES)))
    size = rng.uniform(0.12, 0.2) * m
    side = int(rng.integers(0, 4))
    out = int(rng.integers(t_count // 4, t_count // 2 + 1))
    back = out + int(rng.integers(2, 6))          # 3-6 frames out
    exit_at, enter_at = _point(rng, 'out', side, size, h, w), _point(rng, 'out', side, size, h, w)
    cats.append(cat)
    tracks.append((_waypoints([0, out, back, last],
                              [_point(rng, 'inside', 0, size, h, w), exit_at, enter_at,
                               _point(rng, 'inside', 0, size, h, w)], size),
                   angle_of(cat), rng.uniform(-0.15, 0.15), colors_of(cat, 0.15)))
  return np.asarray(cats), tracks


def _render(rng, cats, tracks, t_count, h, w) -> dict:
  """Draws the background and the instances (index order = depth order) frame by frame."""
  n = len(cats)
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
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
    img = bg + rng.normal(0, 3, size=(h, w, 3))
    occupied = np.zeros((h, w), bool)
    for i in range(n):  # index order = depth order: instance 0 is in front
      path, angle0, spin, colors = tracks[i]
      cx, cy, s = path(t)
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
  """bool [T, H, W] -> per-frame (compressed RLE, str counts | None, area | None, bbox | None)."""
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
             width: int = 224, seed: int = 0, occlusion: bool = False) -> str:
  """Writes `num_videos` videos of `num_frames` frames; returns the path of OUT/<split>.json.

  occlusion: occlusion-heavy scenes (`_occlusion_scene`); hidden frames are null in the JSON.
  """
  if num_videos < 1 or num_frames < 1:
    raise ValueError(f'need at least one video and one frame, got {num_videos} x {num_frames}')
  videos, annotations = [], []
  for i in range(num_videos):
    rng = video_rng(seed, split, i)
    while True:
      sim = render_video(rng, num_frames, height, width, occlusion=occlusion)
      keep = [k for k in range(len(sim['categories'])) if sim['visible'][k].any()]
      if keep:
        break
    name = f'{split}_{i:05d}'
    folder = paths.join(out_dir, split, 'JPEGImages', name)
    paths.makedirs(folder)
    file_names = []
    for t in range(num_frames):
      file_names.append(f'{name}/{t:05d}.jpg')
      Image.fromarray(sim['frames'][t]).save(paths.join(folder, f'{t:05d}.jpg'),
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
      'info': {'description': f'minvis-jax synthetic VIS ({split}, seed {seed}'
                       f'{", occlusion" if occlusion else ""})'},
      'licenses': [],
      'videos': videos,
      'annotations': annotations,
      'categories': [{'supercategory': 'shape', 'id': cid, 'name': name}
                     for cid, name in CATEGORIES],
  }
  json_path = paths.join(out_dir, f'{split}.json')
  paths.makedirs(out_dir)
  with paths.open(json_path, 'w') as f:
    json.dump(data, f)
  return json_path


if __name__ == '__main__':
  import sys

  from minvis_jax import cli
  sys.exit(cli.main(['data', 'synthetic'] + sys.argv[1:]))
