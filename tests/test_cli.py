"""The `minvis-jax` command: dispatch, help, renamed flags, docs/cli.md, python -m, and the demo
main job at a reduced length."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from minvis_jax import cli
from minvis_jax import config_lib
from minvis_jax import demo
from minvis_jax import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_subcommands(capsys):
  assert cli.main(['--help']) == 0
  assert 'minvis-jax demo' in capsys.readouterr().out


def test_unknown_subcommand_fails_with_usage(capsys):
  assert cli.main(['fly']) == 2
  assert "unknown subcommand 'fly'" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_to_well_above_untrained(tmp_path, capsys):
  workdir = tmp_path / 'demo'
  assert cli.main(['demo', '--workdir', str(workdir), '--total_steps', '100', '--train_videos',
                   '12', '--valid_videos', '3', '--frames', '6']) == 0
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


@pytest.mark.parametrize('argv, message', [
    (['infer', '--checkpoint', 'c', '--video', 'v', '--out', 'o', '--tracker', 'memory'],
     '--tracker was renamed: use --set inference.tracker=memory|minvis|ctvis'),
    (['convert', '--source', 'hf', '--input', 'x', '--output', 'o'],
     '--output was renamed: use --out'),
    (['demo', '--steps=10'], '--steps was renamed: use --total_steps'),
])
def test_renamed_flags_are_a_one_line_error_naming_the_new_one(argv, message, capsys):
  assert cli.main(argv) == 2
  assert capsys.readouterr().err == f'minvis-jax {argv[0]}: error: {message}\n'


def test_every_command_takes_config_and_set():
  for name in cli.COMMANDS:
    if name == 'data':   # dataset tools: no experiment config
      continue
    flags = {o for a in cli.make_parser(name)._actions for o in a.option_strings}
    assert {'--config', '--set'} <= flags, name


def test_shorthands_are_set_overrides():
  args = cli.make_parser('infer').parse_args(
      ['--checkpoint', 'c', '--video', 'v', '--out', 'o', '--window', 'auto', '--top_k', '3',
       '--set', 'inference.tracker=memory'])
  assert flags.overrides(args) == ['inference.tracker=memory', 'inference.top_k=3',
                                 'inference.window=auto']
  args = cli.make_parser('demo').parse_args(['--total_steps', '7', '--seed', '2'])
  assert flags.overrides(args) == ['total_steps=7', 'seed=2'] and args.config == ''
  with pytest.raises(SystemExit):
    cli.make_parser('infer').parse_args(['--checkpoint', 'c', '--video', 'v', '--out', 'o',
                                         '--window', '0'])


def test_parse_window():
  assert flags.parse_window('auto') == 'auto' and flags.parse_window('12') == 12
  for bad in ('0', '-1', 'x', '1.5'):
    with pytest.raises(argparse.ArgumentTypeError):
      flags.parse_window(bad)


def test_committed_cli_md_is_generated_from_the_parsers():
  """Regenerate with `python -m minvis_jax.cli --markdown > docs/cli.md` when this fails."""
  with open(os.path.join(REPO, 'docs', 'cli.md')) as f:
    committed = f.read()
  assert committed == cli.markdown(), 'docs/cli.md is stale: python -m minvis_jax.cli --markdown'


def test_markdown_does_not_depend_on_the_terminal_width():
  env = dict(os.environ, COLUMNS='40')
  proc = subprocess.run([sys.executable, '-m', 'minvis_jax', '--markdown'], capture_output=True,
                        text=True, timeout=300, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == cli.markdown()


_INFER = ['infer', '--checkpoint', 'c', '--video', 'v', '--out', 'o']


@pytest.mark.parametrize('argv, message', [
    (_INFER + ['--top_k', '0'], "argument --top_k: expected an integer >= 1, got '0'"),
    (_INFER + ['--fps', '0'], "argument --fps: expected a number > 0, got '0'"),
    (_INFER + ['--fps', '-5'], "argument --fps: expected a number > 0, got '-5'"),
    (_INFER + ['--fps', 'inf'], "argument --fps: expected a number > 0 (finite), got 'inf'"),
    (_INFER + ['--score_threshold', 'nan'],
     "argument --score_threshold: expected a number in [0, 1] (finite), got 'nan'"),
    (_INFER + ['--score_threshold', '1.5'],
     "argument --score_threshold: expected a number in [0, 1], got '1.5'"),
    (['evaluate', '--checkpoint', 'c', '--max_videos', '-1'],
     "argument --max_videos: expected an integer >= 1, got '-1'"),
    (['evaluate', '--checkpoint', 'c', '--max_videos', '0'],
     "argument --max_videos: expected an integer >= 1, got '0'"),
    (['evaluate', '--watch', 'w', '--timeout', '-1'],
     "argument --timeout: expected a number > 0, got '-1'"),
    (['evaluate', '--checkpoint', 'c', '--timeout', '5'], '--timeout applies only with --watch'),
    (['train', '--config', 'tiny', '--workdir', 'w', '--process_id', '1'],
     '--process_id applies only with --distributed'),
    (['demo', '--frames', '2.5'], "argument --frames: expected an integer >= 1, got '2.5'"),
    (['demo', '--total_steps', '-3'], "argument --total_steps: expected an integer >= 0, got '-3'"),
    (['data', 'synthetic', '--out', 'o', '--videos', '1', '--frames', '0'],
     "argument --frames: expected an integer >= 1, got '0'"),
])
def test_numeric_flags_are_range_checked_at_parse_time(argv, message, capsys):
  """0 never falls back to a default, nan/inf/negatives are refused, and a flag that needs another
  names both: exit status 2 before any work, the flag in the message."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  prog = ' '.join(argv[:2]) if argv[0] == 'data' else argv[0]
  assert capsys.readouterr().err.splitlines()[-1] == f'minvis-jax {prog}: error: {message}'


def test_flag_types_keep_the_values_in_range():
  assert flags.positive_int('3') == 3 and flags.nonneg_int('0') == 0
  assert flags.probability('0') == 0.0 and flags.probability('1') == 1.0
  assert flags.positive_float('0.5') == 0.5 and flags.nonneg_float('0') == 0.0
  assert flags.finite_float('-2.5') == -2.5
  for parse, text in ((flags.positive_int, '0'), (flags.nonneg_int, '-1'),
                      (flags.finite_float, 'inf'), (flags.nonneg_float, '-0.1'),
                      (flags.positive_float, 'x')):
    with pytest.raises(argparse.ArgumentTypeError):
      parse(text)


def test_a_command_process_enables_faulthandler(tmp_path):
  """A native crash (SIGSEGV, SIGABRT) of a command's own process leaves the Python stacks."""
  code = ('import faulthandler, sys\nfrom minvis_jax import cli\n'
          f"sys.argv = ['minvis-jax', 'evaluate', '--checkpoint', {str(tmp_path / 'none')!r}]\n"
          'status = cli.main()\nprint(status, faulthandler.is_enabled())\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.stdout.split() == ['2', 'True'], proc.stderr[-2000:]
  assert proc.stderr.endswith(f'{tmp_path / "none"}: no such checkpoint directory\n')


def test_demo_reid_fine_tunes_the_head_of_the_demo_checkpoint_and_tracks_with_it(monkeypatch):
  config = config_lib.load_config('tiny')
  c = config_lib.validate(demo.reid_config(config, '/w/train', 300))
  assert (c.model.reid, c.model.reid_detach, c.init.reinit_class_head) == (True, True, False)
  assert c.init.checkpoint == f'/w/train/checkpoints/{config.total_steps}/variables'
  assert (c.inference.tracker, c.inference.embedding) == ('memory', 'reid')
  assert config.model.reid is False and config.inference.embedding == 'decoder'   # not modified
  # --reid reaches demo.run; without it the demo is unchanged.
  calls = []
  monkeypatch.setattr(demo, 'run', lambda *a: calls.append(a) or 0)
  assert cli.main(['demo', '--workdir', '/tmp/x', '--reid']) == 0
  assert cli.main(['demo', '--workdir', '/tmp/x']) == 0
  assert [a[-1] for a in calls] == [True, False]
