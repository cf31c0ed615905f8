"""Pictures of what the model does: per-track overlays on frames, overlay videos, loss curves.

Videos are written as mp4 when imageio-ffmpeg is installed, else as GIF (Pillow only).
"""

import colorsys
import json
import logging
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from minvis_jax import paths


def track_colors(n: int) -> np.ndarray:
  """uint8 [n, 3]: distinct, saturated colours (golden-ratio steps around the hue circle)."""
  hues = (0.05 + np.arange(n) * 0.6180339887) % 1.0
  rgb = [colorsys.hsv_to_rgb(h, 0.85, 0.95 if i % 2 == 0 else 0.75) for i, h in enumerate(hues)]
  return np.round(np.array(rgb, np.float64).reshape(n, 3) * 255).astype(np.uint8)


def _contour(mask: np.ndarray) -> np.ndarray:
  """bool [H, W] -> the mask pixels with a 4-neighbour outside the mask (or the image)."""
  p = np.pad(mask, 1, constant_values=False)
  interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~interior


def overlay(frame: np.ndarray, masks: np.ndarray, labels: Sequence[str],
            scores: Sequence[float] | None = None, colors: np.ndarray | None = None,
            alpha: float = 0.5) -> np.ndarray:
  """Blends each instance's colour into its mask, draws its contour and a 'label score' tag.

  frame: uint8 [H, W, 3]; masks: bool [N, H, W]; labels: N strings; scores: N floats or None;
  colors: uint8 [N, 3] (default `track_colors(N)`). Returns uint8 [H, W, 3]; later instances are
  drawn over earlier ones.
  """
  frame = np.asarray(frame)
  masks = np.asarray(masks, bool)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f'overlay: frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}')
  if masks.ndim != 3 or masks.shape[1:] != frame.shape[:2]:
    raise ValueError(f'overlay: masks must be [N, {frame.shape[0]}, {frame.shape[1]}], '
                     f'got {masks.shape}')
  n = masks.shape[0]
  if len(labels) != n or (scores is not None and len(scores) != n):
    raise ValueError(f'overlay: {n} masks but {len(labels)} labels and '
                     f'{"no" if scores is None else len(scores)} scores')
  colors = track_colors(n) if colors is None else np.asarray(colors, np.uint8).reshape(n, 3)
  out = frame.astype(np.float32)
  for m, c in zip(masks, colors):
    out[m] = (1 - alpha) * out[m] + alpha * c.astype(np.float32)
    out[_contour(m)] = c
  image = Image.fromarray(np.round(out).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  for i, (m, c) in enumerate(zip(masks, colors)):
    if not m.any():
      continue
    ys, xs = np.nonzero(m)
    text = labels[i] if scores is None else f'{labels[i]} {float(scores[i]):.2f}'
    x0, y0 = int(xs.min()), int(ys.min())
    left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
    # Keep the tag inside the frame; dark text on light colours, white on dark ones.
    dx = min(0, frame.shape[1] - right)
    dy = min(0, frame.shape[0] - bottom)
    draw.rectangle((left + dx - 1, top + dy - 1, right + dx, bottom + dy),
                   fill=tuple(int(v) for v in c))
    ink = (0, 0, 0) if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 else (255, 255, 255)
    draw.text((x0 + dx, y0 + dy), text, fill=ink, font=font)
  return np.asarray(image)


def mp4_available() -> bool:
  """Whether mp4 can be read and written (imageio's ffmpeg plugin needs imageio-ffmpeg)."""
  try:
    import imageio_ffmpeg  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def write_video(path: str, frames: Iterable[np.ndarray], fps: float = 10.0) -> str:
  """Writes uint8 [H, W, 3] frames (any iterable, consumed once) as a video; returns the path.

  `.mp4` is written with H.264 when imageio-ffmpeg is installed; otherwise, and for `.gif`, the
  frames go to a GIF at the same path with the suffix `.gif` (Pillow merges identical
  consecutive frames of a GIF into one longer frame). A URL is written locally, then uploaded.
  """
  return paths.write_via_local(path, lambda local: _write_video(local, frames, fps))


def _write_video(path: str, frames: Iterable[np.ndarray], fps: float) -> str:
  root, ext = paths.splitext(path)
  paths.makedirs(paths.dirname(paths.abspath(path)))
  if ext.lower() == '.mp4' and mp4_available():
    import imageio.v2 as imageio  # noqa: PLC0415
    # macro_block_size=1: no resizing by the plugin; we pad to the even size yuv420p needs.
    with imageio.get_writer(path, fps=fps, codec='libx264', quality=8, macro_block_size=1,
                            ffmpeg_log_level='error') as writer:
      for frame in frames:
        frame = np.asarray(frame, np.uint8)
        h, w = frame.shape[:2]
        writer.append_data(np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode='edge'))
    return path
  if ext.lower() != '.gif':
    if ext.lower() == '.mp4':
      logging.warning('%s: imageio-ffmpeg is not installed; writing a GIF instead', path)
    path = root + '.gif'
  images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
  if not images:
    raise ValueError(f'{path}: no frames to write')
  images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps),
                 loop=0)
  return path


def overlay_video(path: str, frames: Iterable[np.ndarray], tracks: Sequence[dict],
                  labels: Sequence[str], score_threshold: float = 0.3, fps: float = 10.0) -> str:
  """Writes the overlay video of one video's tracks; returns the path written (see write_video).

  frames: uint8 [H, W, 3] in order; tracks: results-file entries or `VideoPredictor` tracks
  ({'score', 'segmentations': one RLE or None per frame}); labels: a class name per track. Tracks
  scoring below `score_threshold` are left out; each kept track has its own colour.
  """
  keep = [i for i, t in enumerate(tracks) if t['score'] >= score_threshold]
  colors = track_colors(len(keep))

  def frames_with_overlay():
    for t, frame in enumerate(frames):
      masks = np.zeros((len(keep), *frame.shape[:2]), bool)
      for j, i in enumerate(keep):
        seg = tracks[i]['segmentations'][t]
        if seg is not None:
          counts = seg['counts']
          masks[j] = mask_utils.decode(dict(seg, counts=counts.encode() if isinstance(counts, str)
                                            else counts)).astype(bool)
      yield overlay(frame, masks, [labels[i] for i in keep], [tracks[i]['score'] for i in keep],
                    colors)
  return write_video(path, frames_with_overlay(), fps)


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with paths.open(path) as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: line {i + 1} is not JSON ({e})') from None
  return rows


def plot_losses(metrics_jsonl_path: str, png_path: str, keys: Sequence[str] | None = None) -> str:
  """Plots the training curves of a trainer's metrics file (one JSON object per logged step,
  with 'step' and 'loss') to `png_path`: 'loss' and, when given, `keys` that are present. Eval AP
  (lines with 'eval/AP': in-training evaluation in the same file, and the watcher's `eval.jsonl`
  beside it) is drawn in percent against a second axis on the right."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  if not paths.isfile(metrics_jsonl_path):
    raise FileNotFoundError(f'{metrics_jsonl_path}: no such metrics file')
  lines = _read_jsonl(metrics_jsonl_path)
  rows = [r for r in lines if 'step' in r and 'loss' in r]
  if not rows:
    raise ValueError(f'{metrics_jsonl_path}: no line with both "step" and "loss"')
  watcher = paths.join(paths.dirname(paths.abspath(metrics_jsonl_path)), 'eval.jsonl')
  if paths.isfile(watcher):
    lines += _read_jsonl(watcher)
  ap = sorted({r['step']: r['eval/AP'] for r in lines
               if 'step' in r and r.get('eval/AP', -1) >= 0}.items())   # -1: undefined
  names = ['loss'] + [k for k in (keys or ()) if k != 'loss' and any(k in r for r in rows)]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name in names:
    pts = [(r['step'], r[name]) for r in rows if name in r]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  if all(r['loss'] > 0 for r in rows):
    ax.set_yscale('log')
  ax.grid(True, alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  if ap:
    ax2 = ax.twinx()
    ax2.plot([s for s, _ in ap], [100 * v for _, v in ap], 'o-', color='tab:red', label='eval AP')
    ax2.set_ylabel('eval AP (%)')
    ax2.set_ylim(bottom=0)
    more = ax2.get_legend_handles_labels()
    handles, labels = handles + more[0], labels + more[1]
  ax.legend(handles, labels)
  fig.tight_layout()
  paths.makedirs(paths.dirname(paths.abspath(png_path)))
  with paths.open(png_path, 'wb') as f:
    fig.savefig(f, format=paths.splitext(png_path)[1][1:] or 'png')
  plt.close(fig)
  return png_path
