"""The `minvis-jax` command: dispatch, help, and the demo main job at a reduced length."""

import json

import pytest

from minvis_jax import cli


def test_help_lists_subcommands(capsys):
  assert cli.main(['--help']) == 0
  assert 'minvis-jax demo' in capsys.readouterr().out


def test_unknown_subcommand_fails_with_usage(capsys):
  assert cli.main(['fly']) == 2
  assert "unknown subcommand 'fly'" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_to_well_above_untrained(tmp_path, capsys):
  workdir = tmp_path / 'demo'
  assert cli.main(['demo', '--workdir', str(workdir), '--steps', '100', '--train_videos', '12',
                   '--valid_videos', '3', '--frames', '6']) == 0
  out = capsys.readouterr().out
  metrics = json.loads((workdir / 'metrics.json').read_text())
  before, after = metrics['untrained']['AP'], metrics['trained']['AP']
  assert after >= before + 0.1, (before, after)
  assert 'AP50' in out and 'demo finished' in out
  assert (workdir / 'loss.png').stat().st_size > 1000
  # configs/tiny.py evaluates during training (every 100 steps): the final model's score.
  lines = (workdir / 'train' / 'metrics.jsonl').read_text().splitlines()
  evals = [json.loads(line) for line in lines if 'eval/AP' in line]
  assert [r['step'] for r in evals] == [100] and evals[0]['eval/AP'] == after
  assert any(p.name.startswith('overlay') for p in workdir.iterdir())
  results = json.loads((workdir / 'results.json').read_text())
  assert all(len(r['segmentations']) == 6 for r in results)
