"""`minvis-jax demo`: the offline main job.

Generates a short video of moving shapes, runs the tiny Mask2Former on every frame, associates the
queries across frames by bipartite matching of their embeddings (MinVIS), and prints the video-level
instances it found. No download; random weights unless --checkpoint is given.
"""

import argparse
import time

import jax
import numpy as np

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import tracking
from minvis_jax.models import Mask2Former


def moving_shapes_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
  """uint8 [T, H, W, 3]: a few coloured discs and boxes drifting over a noisy background."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width]
  shapes = [dict(pos=rng.uniform([0.2 * height, 0.2 * width], [0.8 * height, 0.8 * width]),
                 vel=rng.uniform(-4, 4, 2), size=rng.uniform(10, 25), disc=bool(i % 2),
                 colour=rng.integers(40, 255, 3)) for i in range(3)]
  frames = []
  for _ in range(num_frames):
    frame = rng.integers(0, 60, (height, width, 3))
    for s in shapes:
      s['pos'] = s['pos'] + s['vel']
      dy, dx = yy - s['pos'][0], xx - s['pos'][1]
      inside = (dy ** 2 + dx ** 2 < s['size'] ** 2) if s['disc'] else (
          (np.abs(dy) < s['size']) & (np.abs(dx) < s['size']))
      frame[inside] = s['colour']
    frames.append(frame.astype(np.uint8))
  return np.stack(frames)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=(argv or ['minvis-jax demo'])[0],
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--frames', type=int, default=12)
  parser.add_argument('--height', type=int, default=128)
  parser.add_argument('--width', type=int, default=224)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--checkpoint', default='', help='model checkpoint (random init if empty)')
  args = parser.parse_args((argv or [None])[1:])

  t0 = time.time()
  model_config = config_lib.tiny_model(num_classes=4)
  video = moving_shapes_video(args.frames, args.height, args.width, args.seed)
  mean = np.array(config_lib.IMAGE_MEAN, np.float32)
  std = np.array(config_lib.IMAGE_STD, np.float32)
  ph, pw = -(-args.height // 32) * 32, -(-args.width // 32) * 32
  images = np.zeros((args.frames, ph, pw, 3), np.float32)  # zero padding after normalisation
  images[:, :args.height, :args.width] = (video - mean) / std
  model = Mask2Former(model_config)
  if args.checkpoint:
    variables = checkpoints.load_variables(args.checkpoint)
  else:
    variables = jax.jit(model.init)(jax.random.PRNGKey(args.seed), images[:1])
  out = jax.jit(model.apply)(variables, images)
  perm = tracking.associate(out['pred_embds'])
  logits = tracking.reorder(out['pred_logits'], perm)   # [T, Q, K+1] in track order
  masks = tracking.reorder(out['pred_masks'], perm)     # [T, Q, H/4, W/4]
  probs = jax.nn.softmax(logits.mean(axis=0), axis=-1)[:, :-1]   # [Q, K]
  scores, flat = jax.lax.top_k(probs.reshape(-1), args.top_k)
  k = probs.shape[1]
  print(f'video: {args.frames} frames of {args.height}x{args.width}; model: tiny Mask2Former '
        f'({"checkpoint " + args.checkpoint if args.checkpoint else "random init"})')
  print(f'{"track":>5} {"class":>5} {"score":>6}  mask pixels per frame (stride 4)')
  for score, idx in zip(np.asarray(scores), np.asarray(flat)):
    q, c = divmod(int(idx), k)
    areas = (np.asarray(masks[:, q]) > 0).sum(axis=(1, 2))
    print(f'{q:>5} {c:>5} {score:6.3f}  {" ".join(str(a) for a in areas)}')
  switches = int((np.asarray(perm) != np.arange(perm.shape[1])).any(axis=1).sum())
  print(f'association reordered queries in {switches} of {args.frames - 1} frame transitions; '
        f'done in {time.time() - t0:.1f} s')
  return 0
