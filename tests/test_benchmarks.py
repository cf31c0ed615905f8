"""benchmarks/device.sh --dry-run: the accelerator benchmark's code runs end to end on CPU (tiny
model, tiny shapes) and prints every RESULT line, so the GPU script does not rot."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


@pytest.mark.slow
def test_device_script_dry_run():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)        # one CPU device, as on a one-GPU machine
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'device.sh'), '--dry-run'],
                        capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = [json.loads(line[len('RESULT '):]) for line in proc.stdout.splitlines()
             if line.startswith('RESULT ')]
  names = [r['name'] for r in results]
  assert names == ['forward_tiny_64_b1_cpu', 'forward_tiny_64_b1_cpu_bfloat16',
                   'train_step_tiny_64_b2_cpu', 'train_step_tiny_64_b2_cpu_bfloat16',
                   'video_tiny_4f_64p_cpu'], names
  for r in results:
    assert r['ours_s'] > 0 and r['ref_s'] > 0
    assert math.isclose(r['ratio'], r['ours_s'] / r['ref_s'], rel_tol=0.01, abs_tol=1e-3)
  for r in results[2:4]:
    assert 0 < r['utilisation'] < 1.5
  # The video benchmark's two pipelines agree on what they found (same weights, same frames).
  assert 'top-10 categories in score order agree on 10 of 10' in proc.stdout, proc.stdout[-2000:]
  # The dry run is the same code as the GPU run, which refuses to start without a GPU.
  assert 'device.sh: done in' in proc.stdout
