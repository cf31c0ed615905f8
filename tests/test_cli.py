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


def test_run_turns_user_errors_into_one_line_and_exit_2(capsys):
  def fails(exc):
    def main(argv):
      assert argv[0] == 'minvis-jax x' and '--debug' not in argv
      raise exc
    return main
  for exc in (ValueError('a.json: video 3: missing field "id"\n(details)'),
              FileNotFoundError('ckpt: no such checkpoint directory'),
              ImportError('reading torch checkpoints needs torch')):
    assert cli.run('minvis-jax x', fails(exc), ['--flag']) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    assert captured.err == f'minvis-jax x: error: {" ".join(str(exc).split())}\n'
  # --debug (anywhere) lets the exception through; a bug is never turned into one line.
  with pytest.raises(ValueError, match='bad'):
    cli.run('minvis-jax x', fails(ValueError('bad')), ['--a', '--debug'])
  with pytest.raises(ZeroDivisionError):
    cli.run('minvis-jax x', fails(ZeroDivisionError()), [])
  assert cli.run('minvis-jax x', lambda argv: None, []) == 0


def test_subcommand_errors_go_through_run(tmp_path, capsys):
  assert cli.main(['evaluate', '--checkpoint', str(tmp_path / 'none')]) == 2
  err = capsys.readouterr().err
  assert err == f'minvis-jax evaluate: error: {tmp_path / "none"}: no such checkpoint directory\n'
