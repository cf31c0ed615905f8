"""Every benchmark's --dry-run (tiny sizes, seconds) runs end to end and prints RESULT lines with
the expected names and positive times of ours and of the reference, so no benchmark can rot.

benchmarks/device.sh --dry-run runs the accelerator script's code on CPU: forward.py,
train_step.py and video.py, each with its own --dry-run."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def _device_checks(results: list[dict], stdout: str) -> None:
  for r in results[2:4]:
    assert 0 < r['utilisation'] < 1.5
  # The video benchmark's two pipelines agree on what they found (same weights, same frames).
  assert 'top-10 categories in score order agree on 10 of 10' in stdout, stdout[-2000:]
  # The dry run is the same code as the GPU run, which refuses to start without a GPU.
  assert 'device.sh: done in' in stdout


# (command after the interpreter or bash, expected RESULT names, extra checks(results, stdout))
CASES = {
    'association': (['association.py'], ['association_T4_Q10_Q20'], None),
    'matching': (['matching.py'], ['linear_sum_assignment_4x10x10'], None),
    'evaluate': (['evaluate.py'], ['evaluate_20_single_frame'], None),
    'criterion': (['criterion.py'], ['set_criterion_loss_and_grad_dry_run'], None),
    'deform_attn': (['deform_attn.py'], ['deform_attn_fwd_bwd_b1_s64_levels4_8'], None),
    'tracking': (['tracking.py'], ['tracking_memory_vs_minvis_dry_run'], None),
    'input_pipeline': (['input_pipeline.py'], ['input_pipeline_vs_tiny_train_step_frames'], None),
    'export': (['export.py'], ['exported_video_tiny_2f_64x96'], None),
    'long_video': (['long_video.py'], ['long_video_tiny_64x96_dry_run'], None),
    'storage': (['storage.py'], ['input_s_per_frame_emulator_vs_local_72x128',
                                 'tfds_input_s_per_frame_emulator_vs_local_72x128',
                                 'tiny_checkpoint_save_emulator_vs_local',
                                 'tiny_checkpoint_restore_emulator_vs_local'], None),
    'long_video_eval_fps': (['long_video.py', '--eval_fps'],
                            ['evaluate_fps_tiny_cpu_devices_dry_run'], None),
    'device': (['device.sh'], ['forward_tiny_64_b1_cpu', 'forward_tiny_64_b1_cpu_bfloat16',
                               'train_step_tiny_64_b2_cpu', 'train_step_tiny_64_b2_cpu_bfloat16',
                               'video_tiny_4f_64p_cpu'], _device_checks),
}
CASES['online'] = (['online.py'], ['online_vs_offline_per_frame_tiny_64x96_dry_run'], None)
# Over about a minute each on two CPU cores (compiling a train step or several processes).
SLOW = {'input_pipeline', 'long_video', 'long_video_eval_fps', 'device', 'storage', 'export'}


@pytest.mark.parametrize('case', [pytest.param(name, marks=pytest.mark.slow) if name in SLOW
                                  else name for name in CASES])
def test_benchmark_dry_run(case):
  command, names, checks = CASES[case]
  script = os.path.join(ROOT, 'benchmarks', command[0])
  runner = ['bash'] if script.endswith('.sh') else [sys.executable]
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)        # one CPU device, as on a one-GPU machine
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  proc = subprocess.run([*runner, script, *command[1:], '--dry-run'], capture_output=True,
                        text=True, timeout=900, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = [json.loads(line[len('RESULT '):]) for line in proc.stdout.splitlines()
             if line.startswith('RESULT ')]
  assert [r['name'] for r in results] == names, proc.stdout[-3000:]
  for r in results:
    assert r['ours_s'] > 0 and r['ref_s'] > 0, r
    assert math.isclose(r['ratio'], r['ours_s'] / r['ref_s'], rel_tol=0.01, abs_tol=1e-3), r
  if checks:
    checks(results, proc.stdout)
