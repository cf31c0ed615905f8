"""The offline end-to-end demo: generate videos, train, track, evaluate.

Generates a synthetic VIS dataset in the YouTube-VIS layout (train and held-out valid videos),
trains the tiny Mask2Former on single frames with the real trainer (scoring the held-out videos
every `config.eval.every_steps`), runs MinVIS inference with query association on the held-out
videos, scores them with the YouTube-VIS evaluator, and writes an overlay video of one held-out
video and a PNG of the loss and eval AP curves. Everything runs on CPU, with no download.

  minvis-jax demo                          # the tiny config's steps, minutes on a laptop CPU
  minvis-jax demo --total_steps 1000 --workdir /tmp/demo_long
  minvis-jax demo --reid                   # then a reid head (docs/reid.md), both reported
"""

import resource
import time

import jax
import ml_collections

from minvis_jax import checkpoints
from minvis_jax import evaluate
from minvis_jax import metrics_writer
from minvis_jax import paths
from minvis_jax import train
from minvis_jax import video_io
from minvis_jax import visualize
from minvis_jax import ytvis_eval
from minvis_jax.data import synthetic
from minvis_jax.data import ytvis

def make_data(data_dir: str, train_videos: int, valid_videos: int, frames: int, height: int,
              width: int, seed: int) -> None:
  """Writes the synthetic train and valid splits, unless they are already there."""
  for split, n in (('train', train_videos), ('valid', valid_videos)):
    if not paths.exists(paths.join(data_dir, f'{split}.json')):
      synthetic.generate(data_dir, split, n, frames, height=height, width=width, seed=seed)


def write_overlay(path: str, dataset, results: list[dict], threshold: float = 0.3) -> str:
  """An overlay video of the first held-out video's tracks with score >= threshold."""
  video = dataset.videos[0]
  tracks = [r for r in results if r['video_id'] == video.id]
  names = dict(zip(dataset.category_ids, dataset.category_names))
  return visualize.overlay_video(path, (ytvis.read_frame(p) for p in video.frame_paths), tracks,
                                 [names[r['category_id']] for r in tracks], threshold, fps=4.0)


def reid_config(config: ml_collections.ConfigDict, train_dir: str, steps: int
                ) -> ml_collections.ConfigDict:
  """The reid fine-tune of the demo's checkpoint (docs/reid.md): the head alone
  (model.reid_detach) on view pairs of the same data for `steps` steps, tracked by the memory
  tracker on reid embeddings."""
  c = config.copy_and_resolve_references()
  c.model.reid, c.model.reid_detach = True, True
  c.init.checkpoint = paths.join(train_dir, 'checkpoints', str(config.total_steps), 'variables')
  c.init.reinit_class_head = False
  c.eval.every_steps = 0
  c.inference.update(tracker='memory', embedding='reid', memory_min_score=0.5)
  return c


def run_reid(config: ml_collections.ConfigDict, workdir: str, valid, before: dict) -> dict:
  """Fine-tunes the reid head from WORKDIR/train into WORKDIR/reid and scores the held-out
  videos with it; prints MinVIS's and its AP side by side. Returns its metrics."""
  c = reid_config(config, paths.join(workdir, 'train'), config.total_steps)
  reid_dir = paths.join(workdir, 'reid')
  train.train(c, reid_dir, total_steps=config.total_steps)
  _, variables = checkpoints.load_for_inference(reid_dir)
  results, metrics = evaluate.score(c, variables, valid, progress=True)
  metrics_writer.write_json(paths.join(workdir, 'results_reid.json'), results)
  print(f'\nheld-out AP: MinVIS {100 * before["AP"]:.2f}, reid head + memory tracker '
        f'{100 * metrics["AP"]:.2f} (docs/reid.md)')
  print(ytvis_eval.format_table(metrics))
  return metrics


def run(config: ml_collections.ConfigDict, workdir: str, train_videos: int, valid_videos: int,
        frames: int, reid: bool = False) -> int:
  """The demo with `config` (the tiny one by default; `seed`, `batch_size`, `total_steps` from it):
  `train_videos` + `valid_videos` generated videos of `frames` frames under WORKDIR/data, training
  under WORKDIR/train, the held-out results, metrics, overlay and loss curve in WORKDIR. With
  `reid`, then `run_reid` (metrics.json gains 'reid')."""
  t0 = time.time()
  steps = config.total_steps
  # The step decay of the recipe at 2/3 of the run, whatever its length.
  config.optim.decay_steps = (max(1, 2 * steps // 3),)
  config.data.manual_dir = data_dir = paths.abspath(paths.join(workdir, 'data'))
  height, width = config.data.canvas
  make_data(data_dir, train_videos, valid_videos, frames, height, width, config.seed)
  valid = ytvis.load_split('synthetic', data_dir, 'valid')
  print(f'data: {train_videos} train + {valid_videos} held-out videos of {frames} '
        f'frames ({height}x{width}) in {data_dir}')

  untrained = jax.jit(lambda key: train.init_variables(config, key))(
      jax.random.PRNGKey(config.seed))
  _, before = evaluate.score(config, untrained, valid, progress=True)
  print(f'untrained model: AP {100 * before["AP"]:.2f}')

  train_dir = paths.join(workdir, 'train')
  # config.eval (configs/tiny.py) scores the held-out videos during training: the AP curve of
  # loss.png.
  train.train(config, train_dir, total_steps=steps)
  _, variables = checkpoints.load_for_inference(train_dir)
  results, metrics = evaluate.score(config, variables, valid, progress=True)
  metrics_writer.write_json(paths.join(workdir, 'results.json'), results)
  summary = {'untrained': before, 'trained': metrics, 'steps': steps}
  if reid:
    summary['reid'] = run_reid(config, workdir, valid, metrics)
  metrics_writer.write_json(paths.join(workdir, 'metrics.json'), summary)
  with video_io.ffmpeg_without_preexec():   # no os.fork() warning of JAX for ffmpeg's start
    overlay = write_overlay(paths.join(workdir, 'overlay.mp4'), valid, results)
  curve = visualize.plot_losses(paths.join(train_dir, 'metrics.jsonl'),
                                paths.join(workdir, 'loss.png'))
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  print(f'\nheld-out videos after {steps} steps (untrained AP {100 * before["AP"]:.2f}):')
  print(ytvis_eval.format_table(metrics))
  print(f'\nwrote {overlay}, {curve}, {paths.join(workdir, "metrics.json")}')
  print(f'demo finished in {time.time() - t0:.0f} s, peak memory {peak_gib:.2f} GiB')
  return 0
