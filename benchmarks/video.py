"""End-to-end MinVIS inference of a generated video: ours vs the original pipeline, same weights.

Both start from the same uint8 frames (default 30 frames of 720x1280, resized to short side 360 by
the same test transform) and end with the top-k tracks as per-frame RLEs at the original size.
  ours      `predictor.VideoPredictor` (jitted windows of frames, on-device association) and
            `predictor.results_for_video`
  original  HF transformers Mask2Former frame by frame (PyTorch), NVlabs MinVIS's per-frame
            association loop (cosine cost, scipy linear_sum_assignment against the previous
            reordered frame), its post-processing (mean logits, softmax, top-k over queries x
            classes, bilinear resize to the padded size, crop, resize to the frame size, > 0) and
            pycocotools RLEs of every mask, as the YouTube-VIS evaluator writes them.

  python benchmarks/video.py [--frames 30] [--window auto] [--repeats 2] [--torch_device cuda]
  python benchmarks/video.py --dry-run   # tiny model, 4 frames of 72x128 at short side 64
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import converted  # noqa: E402
from timing import result_line  # noqa: E402

from minvis_jax import host_memory  # noqa: E402
from minvis_jax import cli, config_lib, model_forward, predictor, tracking  # noqa: E402
from minvis_jax.models import ModelConfig  # noqa: E402


def generated_video(frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
  """uint8 [H, W, 3] frames: a textured background with a few moving coloured boxes."""
  rng = np.random.default_rng(seed)
  background = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
  background = np.kron(background, np.ones((8, 8, 1), np.uint8))
  background = np.pad(background, ((0, height - background.shape[0]),
                                   (0, width - background.shape[1]), (0, 0)), mode='edge')
  boxes = [(rng.uniform(0, 0.7, 2), rng.uniform(-0.01, 0.01, 2), rng.uniform(0.1, 0.3, 2),
            rng.integers(0, 256, 3)) for _ in range(4)]
  out = []
  for t in range(frames):
    frame = background.copy()
    for pos, vel, size, colour in boxes:
      y, x = np.clip(pos + t * vel, 0, 1 - size)
      frame[int(y * height):int((y + size[0]) * height),
            int(x * width):int((x + size[1]) * width)] = colour
    out.append(frame)
  return out


def data_config(min_size: int, max_size: int):
  config = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                               'configs', 'minvis.py'))
  config.data.min_size_test = min_size
  config.data.max_size_test = max_size
  return config.data


def ours(video_predictor, frames, data) -> list[dict]:
  height, width = frames[0].shape[:2]
  tracks = video_predictor(predictor.preprocess(frames, data),
                           predictor.valid_size(height, width, data), (height, width))
  return predictor.results_for_video(tracks, 0, list(range(1, 1 + 1000)))


def match_from_embds(tgt_embds, cur_embds):
  """NVlabs MinVIS (minvis/video_maskformer_model.py), verbatim in substance."""
  cur_embds = cur_embds / cur_embds.norm(dim=1)[:, None]
  tgt_embds = tgt_embds / tgt_embds.norm(dim=1)[:, None]
  cost_embd = 1 - torch.mm(cur_embds, tgt_embds.transpose(0, 1))
  indices = linear_sum_assignment(cost_embd.cpu().transpose(0, 1))
  return indices[1]


def original(model, frames, data, top_k: int, device) -> list[dict]:
  height, width = frames[0].shape[:2]
  logits, masks, embds = [], [], []
  norm = model.model.transformer_module.decoder.layernorm
  padded = None
  with torch.no_grad():
    for image in predictor.preprocess(frames, data):
      padded = image.shape[:2]
      x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
      out = model(pixel_values=x)
      logits.append(out.class_queries_logits[0])
      masks.append(out.masks_queries_logits[0])
      embds.append(norm(out.transformer_decoder_last_hidden_state)[0])
    # MinVIS post_processing: associate each frame with the previous reordered one.
    out_logits, out_masks, out_embds = [logits[0]], [masks[0]], [embds[0]]
    for i in range(1, len(logits)):
      indices = match_from_embds(out_embds[-1], embds[i])
      out_logits.append(logits[i][indices])
      out_masks.append(masks[i][indices])
      out_embds.append(embds[i][indices])
    pred_cls = torch.stack(out_logits).mean(0)                     # [Q, K+1]
    pred_masks = torch.stack(out_masks, dim=1)                     # [Q, T, h, w]
    # MinVIS inference_video.
    scores = F.softmax(pred_cls, dim=-1)[:, :-1]
    num_queries, num_classes = scores.shape
    labels = torch.arange(num_classes, device=scores.device).repeat(num_queries)
    scores_per_video, topk = scores.flatten(0, 1).topk(top_k, sorted=False)
    labels_per_video = labels[topk]
    pred_masks = pred_masks[topk // num_classes]
    pred_masks = F.interpolate(pred_masks, size=padded, mode='bilinear', align_corners=False)
    vh, vw = predictor.valid_size(height, width, data)
    pred_masks = F.interpolate(pred_masks[:, :, :vh, :vw], size=(height, width), mode='bilinear',
                               align_corners=False)
    binary = (pred_masks > 0).cpu().numpy()                       # [k, T, H, W]
  results = []
  for score, label, track in zip(scores_per_video.tolist(), labels_per_video.tolist(), binary):
    segs = []
    for m in track:   # the YTVIS evaluator's instances_to_coco_json_video
      rle = mask_utils.encode(np.array(m[:, :, None], order='F', dtype='uint8'))[0]
      rle['counts'] = rle['counts'].decode('utf-8')
      segs.append(rle)
    results.append({'video_id': 0, 'score': score, 'category_id': label + 1,
                    'segmentations': segs})
  return results


def _sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='r50', choices=['r50', 'tiny'])
  parser.add_argument('--frames', type=int, default=30)
  parser.add_argument('--height', type=int, default=720)
  parser.add_argument('--width', type=int, default=1280)
  parser.add_argument('--short', type=int, default=360, help='test short side (YouTube-VIS)')
  parser.add_argument('--window', type=cli.parse_window, default='auto',
                      help="frames per device per forward, or 'auto' (1 a device on CPU)")
  parser.add_argument('--top_k', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--torch_device', default='cpu', help="'cuda' to run HF on the GPU")
  parser.add_argument('--name', default='')
  parser.add_argument('--dry-run', action='store_true',
                      help='tiny model, 4 small frames, one repeat (tests)')
  args = parser.parse_args(argv)
  if args.dry_run:
    args.model, args.frames, args.height, args.width = 'tiny', 4, 72, 128
    args.short, args.window, args.repeats = 64, 2, 1
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model, model_config, variables = converted(args.model)
  device = torch.device(args.torch_device)
  model.to(device)
  data = data_config(args.short, max(args.short * 1333 // 800, args.short))
  frames = generated_video(args.frames, args.height, args.width)
  video_predictor = predictor.VideoPredictor(
      model_forward.forward(ModelConfig.from_config(model_config)), jax.device_put(variables),
      args.window, args.top_k, tracking.Tracker('minvis', 0.0, 0.0))

  def run_ours():
    return ours(video_predictor, frames, data)

  def run_original():
    results = original(model, frames, data, args.top_k, device)
    _sync(device)
    return results

  # Warm-up (compilation, allocator), then interleaved timed runs.
  mine, theirs = run_ours(), run_original()
  times = {'ours': [], 'original': []}
  for _ in range(args.repeats):
    for name, fn in (('ours', run_ours), ('original', run_original)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  t_ours, t_ref = float(np.median(times['ours'])), float(np.median(times['original']))
  by_score = lambda results: sorted(results, key=lambda r: -r['score'])
  same = sum(a['category_id'] == b['category_id'] for a, b in zip(by_score(mine), by_score(theirs)))
  window = video_predictor.frames_per_window(
      np.shape(next(predictor.preprocess(frames[:1], data)))[:2])
  print(f'{args.frames} frames {args.height}x{args.width} -> short side {args.short}, '
        f'window {args.window} ({window} frame{"s" * (window != 1)} a forward), top {args.top_k}')
  print(f'ours {t_ours:.2f} s ({args.frames / t_ours:.2f} frames/s, {jax.default_backend()}), '
        f'original {t_ref:.2f} s ({args.frames / t_ref:.2f} frames/s, torch {device}); '
        f'runs: ours {["%.2f" % t for t in times["ours"]]}, '
        f'original {["%.2f" % t for t in times["original"]]}')
  print(f'top-{args.top_k} categories in score order agree on {same} of {len(mine)}')
  name = args.name or f'video_{args.model}_{args.frames}f_{args.short}p_{jax.default_backend()}'
  print(result_line(name, t_ours, t_ref))
  return t_ours, t_ref


if __name__ == '__main__':
  # Keep freed memory mapped on CPU (minvis_jax/host_memory.py); PyTorch in this process too.
  host_memory.reexec_keeping_freed_memory()
  main()
