"""The `minvis-jax` command: dispatch, help, and the demo main job at a small size."""

import re

from minvis_jax import cli


def test_help_and_unknown_subcommand(capsys):
  assert cli.main(['--help']) == 0
  assert 'minvis-jax demo' in capsys.readouterr().out
  assert cli.main(['nope']) == 2
  assert "unknown subcommand 'nope'" in capsys.readouterr().out


def test_demo_runs_and_reports_tracks(capsys):
  assert cli.main(['demo', '--frames', '4', '--height', '64', '--width', '96', '--top_k', '3']) == 0
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if re.match(r'\s+\d+\s+\d+\s+\d\.\d{3}\s', l)]
  assert len(rows) == 3
  for row in rows:
    track, cls, score, *areas = row.split()
    assert 0 <= int(cls) < 4 and 0.0 < float(score) <= 1.0
    assert len(areas) == 4 and all(0 <= int(a) <= 16 * 24 for a in areas)
  assert 'frame transitions' in out
