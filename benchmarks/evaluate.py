"""The YouTube-VIS evaluator on 500 single-frame videos vs pycocotools COCOeval (segm)."""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from test_ytvis_eval import _cocoeval, _random_case  # noqa: E402

from timing import result_line  # noqa: E402

from minvis_jax.ytvis_eval import evaluate_dicts  # noqa: E402


def dataset(n_videos):
  gt = dict(videos=[], annotations=[], categories=[dict(id=c, name=f'c{c}') for c in (1, 2, 3)])
  results = []
  seed = 0
  while len(gt['videos']) < n_videos:
    g, r = _random_case(seed)
    seed += 1
    offset = len(gt['videos'])
    for v in g['videos']:
      gt['videos'].append(dict(v, id=v['id'] + offset))
    for a in g['annotations']:
      gt['annotations'].append(dict(a, id=len(gt['annotations']) + 1,
                                    video_id=a['video_id'] + offset))
    results += [dict(x, video_id=x['video_id'] + offset) for x in r]
  return gt, results


def main():
  gt, results = dataset(500)
  times = {'ours': [], 'ref': []}
  for _ in range(3):
    t = time.perf_counter()
    ours = evaluate_dicts(gt, results)
    times['ours'].append(time.perf_counter() - t)
    t = time.perf_counter()
    ref = _cocoeval(gt, results)
    times['ref'].append(time.perf_counter() - t)
  assert all(abs(ours[k] - ref[k]) < 1e-9 for k in ref), (ours, ref)
  o, r = statistics.median(times['ours']), statistics.median(times['ref'])
  print(f'{len(gt["videos"])} videos, {len(gt["annotations"])} tracks, {len(results)} results: '
        f'ours {o:.3f} s, COCOeval {r:.3f} s (AP {ours["AP"]:.4f} both)')
  print(result_line('evaluate_500_single_frame', o, r))


if __name__ == '__main__':
  main()
