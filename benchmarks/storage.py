"""Cloud Storage (a local fake-gcs-server emulator) against local disk: training-input frames/s
read from the bucket (frames streamed object by object; TFDS records streamed record by record, no
local copy) and save/restore times of a model checkpoint (orbax arrays through TensorStore's gcs
driver, manifest and config through gcsfs).

  python benchmarks/storage.py [--model tiny|minvis] [--videos 8] [--batches 10]
  python benchmarks/storage.py --dry-run   # 2 small videos, 2 batches, the tiny model

Two runs of each, medians; ours = the emulator, ref = local disk. The emulator runs on this machine,
so the numbers are the clients' and the protocol's overhead, not a network's latency or bandwidth.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax

from timing import result_line

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))   # the emulator launcher the tests use
from minvis_jax import checkpoints  # noqa: E402
from minvis_jax import config_lib  # noqa: E402
from minvis_jax import train  # noqa: E402
from minvis_jax.data import input_pipeline  # noqa: E402
from minvis_jax.data import synthetic  # noqa: E402
from minvis_jax.data import tfds_builders  # noqa: E402
from support import gcs_emulator  # noqa: E402

RUNS = 2


def _frames_per_s(config, data_dir: str, batches: int, tfds_dir: str = '') -> float:
  config.data.manual_dir, config.data.tfds_dir = data_dir, tfds_dir
  stream = input_pipeline.train_iterator(config, 0)
  next(stream)   # thread start-up, first JSON parse
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * config.batch_size / (time.perf_counter() - start)


def _save_restore(variables, path: str) -> tuple[float, float]:
  start = time.perf_counter()
  checkpoints.save_variables(path, variables)
  saved = time.perf_counter()
  checkpoints.load_variables(path)
  return saved - start, time.perf_counter() - saved


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='tiny', help='config of the checkpoint: tiny or minvis')
  parser.add_argument('--videos', type=int, default=8)
  parser.add_argument('--batches', type=int, default=10, help='batches of the input to time')
  parser.add_argument('--dry-run', action='store_true', help='2 videos of 72x128, 2 batches')
  args = parser.parse_args(argv)
  height, width = (72, 128) if args.dry_run else (720, 1280)
  if args.dry_run:
    args.videos, args.batches, args.model = 2, 2, 'tiny'
  config = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  config.data.dataset, config.model.num_classes = 'synthetic', 4
  model_config = config_lib.load_config(os.path.join(ROOT, 'configs', f'{args.model}.py'))
  variables = jax.jit(lambda k: train.init_variables(model_config, k))(jax.random.PRNGKey(0))
  size_mb = sum(x.nbytes for x in jax.tree.leaves(variables)) / 2**20
  with tempfile.TemporaryDirectory() as tmp, gcs_emulator.running() as url:
    bucket = gcs_emulator.create_bucket(url, 'bench')
    local_data = os.path.join(tmp, 'data')
    synthetic.generate(local_data, 'train', args.videos, 6, height=height, width=width, seed=0)
    gcs_data = gcs_emulator.upload_tree(local_data, f'{bucket}/data')
    local_tfds = os.path.join(tmp, 'tfds')
    tfds_builders.build('synthetic', local_data, local_tfds)
    gcs_tfds = gcs_emulator.upload_tree(local_tfds, f'{bucket}/tfds')
    rates = {'local': [], 'gcs': [], 'local_tfds': [], 'gcs_tfds': []}
    times = {('local', 'save'): [], ('local', 'restore'): [], ('gcs', 'save'): [],
             ('gcs', 'restore'): []}
    for run in range(RUNS):
      rates['local'].append(_frames_per_s(config, local_data, args.batches))
      rates['gcs'].append(_frames_per_s(config, gcs_data, args.batches))
      rates['local_tfds'].append(_frames_per_s(config, '', args.batches, local_tfds))
      rates['gcs_tfds'].append(_frames_per_s(config, '', args.batches, gcs_tfds))
      for where, root in (('local', tmp), ('gcs', bucket)):
        s, r = _save_restore(variables, f'{root}/ckpt{run}')
        times[where, 'save'].append(s)
        times[where, 'restore'].append(r)
    for where in ('local', 'gcs'):
      print(f'{where}: input {", ".join(f"{r:.1f}" for r in rates[where])} frames/s ({height}x'
            f'{width} JPEGs, batch {config.batch_size}); {args.model} checkpoint ({size_mb:.1f} '
            'MiB) save ' + ', '.join(f'{t:.2f}' for t in times[where, 'save']) + ' s, restore '
            + ', '.join(f'{t:.2f}' for t in times[where, 'restore']) + ' s; TFDS records '
            + ', '.join(f'{r:.1f}' for r in rates[f'{where}_tfds']) + ' frames/s')
  med = {k: statistics.median(v) for k, v in times.items()}
  print(result_line(f'input_s_per_frame_emulator_vs_local_{height}x{width}',
                    1 / statistics.median(rates['gcs']), 1 / statistics.median(rates['local'])))
  print(result_line(f'tfds_input_s_per_frame_emulator_vs_local_{height}x{width}',
                    1 / statistics.median(rates['gcs_tfds']),
                    1 / statistics.median(rates['local_tfds'])))
  for op in ('save', 'restore'):
    print(result_line(f'{args.model}_checkpoint_{op}_emulator_vs_local', med['gcs', op],
                      med['local', op]))


if __name__ == '__main__':
  main()
