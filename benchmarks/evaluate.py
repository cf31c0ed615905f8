"""The YouTube-VIS evaluator on 500 single-frame videos vs pycocotools COCOeval (segm).

  python benchmarks/evaluate.py [--dry-run]   # --dry-run: 20 videos, one round
"""

import argparse
import os
import statistics
import sys
import time

from timing import result_line


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support.references import cocoeval, single_frame_case  # noqa: E402

from minvis_jax.ytvis_eval import evaluate_dicts


def dataset(n_videos: int) -> tuple[dict, list[dict]]:
  """Ground truth and results of at least `n_videos` single-frame videos (seeds 0, 1, ...)."""
  gt = dict(videos=[], annotations=[], categories=[dict(id=c, name=f'c{c}') for c in (1, 2, 3)])
  results = []
  seed = 0
  while len(gt['videos']) < n_videos:
    g, r = single_frame_case(seed)
    seed += 1
    offset = len(gt['videos'])
    for v in g['videos']:
      gt['videos'].append(dict(v, id=v['id'] + offset))
    for a in g['annotations']:
      gt['annotations'].append(dict(a, id=len(gt['annotations']) + 1,
                                    video_id=a['video_id'] + offset))
    results += [dict(x, video_id=x['video_id'] + offset) for x in r]
  return gt, results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dry-run', action='store_true', help='20 videos, one round (tests)')
  args = parser.parse_args(argv)
  n_videos, rounds = (20, 1) if args.dry_run else (500, 3)
  gt, results = dataset(n_videos)
  times = {'ours': [], 'ref': []}
  for _ in range(rounds):
    t = time.perf_counter()
    ours = evaluate_dicts(gt, results)
    times['ours'].append(time.perf_counter() - t)
    t = time.perf_counter()
    ref = cocoeval(gt, results)
    times['ref'].append(time.perf_counter() - t)
  assert all(abs(ours[k] - ref[k]) < 1e-9 for k in ref), (ours, ref)
  o, r = statistics.median(times['ours']), statistics.median(times['ref'])
  print(f'{len(gt["videos"])} videos, {len(gt["annotations"])} tracks, {len(results)} results: '
        f'ours {o:.3f} s, COCOeval {r:.3f} s (AP {ours["AP"]:.4f} both)')
  print(result_line(f'evaluate_{n_videos}_single_frame', o, r))


if __name__ == '__main__':
  main()
