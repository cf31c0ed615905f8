"""The path layer: local paths behave as before, URLs keep their scheme, a missing client library or
bucket is one line before anything is written, and writes to a bucket (storage emulator) are whole
objects, a growing JSON-lines file guarded by its generation."""

import json
import os
import subprocess
import sys
import time

import pytest

from minvis_jax import metrics_writer
from minvis_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m minvis_jax.cli` in a process where gcsfs cannot be imported (the gcs extra missing).
_WITHOUT_GCSFS = ("import sys; sys.modules['gcsfs'] = None; from minvis_jax import cli; "
                  "sys.exit(cli.main(sys.argv[1:]))")


def test_names_of_local_paths_and_urls(tmp_path):
  assert paths.abspath('gs://b/run1/') == 'gs://b/run1'
  assert paths.abspath('rel') == os.path.join(os.getcwd(), 'rel')
  assert paths.join('gs://b/run1', 'checkpoints', '3') == 'gs://b/run1/checkpoints/3'
  assert paths.dirname('gs://b/run1/config.json') == 'gs://b/run1'
  assert paths.split('gs://b/run1/variables') == ('gs://b/run1', 'variables')
  assert paths.splitext('gs://b/x/overlay.mp4') == ('gs://b/x/overlay', '.mp4')
  assert paths.join(str(tmp_path), 'a') == os.path.join(str(tmp_path), 'a')
  assert (paths.scheme('gs://b'), paths.scheme('S3://b'), paths.scheme('/gs:/b')) == (
      'gs', 's3', None)


def test_local_writes_are_atomic_renames_and_appends(tmp_path):
  path = str(tmp_path / 'sub' / 'best.json')
  metrics_writer.write_json(path, {'a': 1})
  metrics_writer.write_json(path, {'a': 2})
  assert open(path).read() == '{"a": 2}'
  assert os.listdir(tmp_path / 'sub') == ['best.json']   # the temporary file was renamed
  log = paths.Appender(str(tmp_path / 'm.jsonl'))
  log.append('1\n', fsync=True)
  log.append('2\n')
  log.close()
  assert paths.Appender(str(tmp_path / 'm.jsonl')).append('3\n') is None
  assert open(tmp_path / 'm.jsonl').read() == '1\n2\n3\n'


def test_an_unknown_scheme_or_a_missing_library_is_one_line(monkeypatch):
  with pytest.raises(ValueError, match=r'^ftp://h/x: unsupported URL scheme ftp://'):
    paths.check('ftp://h/x')
  real = paths.importlib.util.find_spec
  monkeypatch.setattr(paths.importlib.util, 'find_spec',
                      lambda name: None if name == 'gcsfs' else real(name))
  with pytest.raises(paths.MissingExtraError) as e:
    paths.exists('gs://bucket/run1/config.json')
  assert str(e.value) == ('gs://bucket/run1/config.json: gs:// paths need the gcsfs client '
                          'library: pip install "minvis-jax[gcs]"')
  assert paths.check('/tmp/x') == '/tmp/x'


@pytest.mark.parametrize('flags', [
    ['train', '--config', 'tiny', '--workdir', 'gs://some-bucket/run1'],
    ['evaluate', '--checkpoint', 'gs://some-bucket/run1'],
    ['infer', '--checkpoint', 'ckpt', '--video', 'v.mp4', '--out', 'gs://some-bucket/out']])
def test_without_the_gcs_extra_a_url_flag_fails_before_writing_anything(tmp_path, flags):
  proc = subprocess.run([sys.executable, '-c', _WITHOUT_GCSFS, *flags], cwd=tmp_path,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=300)
  url = next(f for f in flags if f.startswith('gs://'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f'minvis-jax {flags[0]}: error: {url}: gs:// paths need the gcsfs client library: '
      'pip install "minvis-jax[gcs]"']
  assert os.listdir(tmp_path) == []   # no local folder named gs:


def test_bucket_writes_reads_and_listing(gcs_bucket, gcs_emulator):
  from support import gcs_emulator as emulator  # noqa: PLC0415
  run = paths.join(gcs_bucket, 'run1')
  paths.makedirs(run)   # no directories on a bucket: nothing is created
  assert emulator.list_objects(gcs_emulator, paths.bucket(run)) == []
  metrics_writer.write_json(paths.join(run, 'eval', 'best.json'), {'step': 3})
  metrics_writer.write_json(paths.join(run, 'eval', 'best.json'), {'step': 6})
  with paths.open(paths.join(run, 'eval', 'best.json')) as f:
    assert f.read() == '{"step": 6}'
  # One object, written in one upload each time: no temporary object, no rename.
  assert emulator.list_objects(gcs_emulator, paths.bucket(run)) == ['run1/eval/best.json']
  assert paths.isdir(paths.join(run, 'eval')) and paths.isfile(paths.join(run, 'eval/best.json'))
  assert paths.listdir(run) == ['eval']
  with pytest.raises(FileNotFoundError):
    paths.listdir(paths.join(run, 'nothing'))


def test_a_bucket_jsonl_is_rewritten_whole_under_its_generation(gcs_bucket):
  path = paths.join(gcs_bucket, 'run1', 'eval.jsonl')
  first = paths.Appender(path)
  first.append('{"step": 1}\n')
  second = paths.Appender(path)   # a restarted writer continues the file ...
  second.append('{"step": 2}\n')
  with paths.open(path) as f:
    assert f.read() == '{"step": 1}\n{"step": 2}\n'
  # ... and a stale one fails instead of dropping the other's rows.
  with pytest.raises(OSError, match=r'eval.jsonl: changed by another writer'):
    first.append('{"step": 3}\n')
  with paths.open(path) as f:
    assert f.read() == '{"step": 1}\n{"step": 2}\n'


def test_a_missing_bucket_is_one_line_and_nothing_is_written(gcs_emulator, tmp_path):
  with pytest.raises(FileNotFoundError, match=r'^gs://no-such-bucket/run1/x.json: bucket '
                     r'gs://no-such-bucket does not exist'):
    metrics_writer.write_json('gs://no-such-bucket/run1/x.json', {})
  proc = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', 'train', '--config', 'tiny',
                         '--workdir', 'gs://no-such-bucket/run1'], cwd=tmp_path,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'minvis-jax train: error: gs://no-such-bucket/run1: bucket gs://no-such-bucket does not '
      'exist (or these credentials cannot see it)')
  assert os.listdir(tmp_path) == []


def test_an_unreachable_store_is_one_line_naming_the_url(monkeypatch, caplog):
  """No network or no credentials: the client's own error, once, after the URL and bucket; the
  client's per-retry tracebacks stay out of the log."""
  import logging

  def unreachable(root):
    logging.getLogger('gcsfs').error('_request out of retries (a traceback follows)')
    raise ConnectionError('Cannot connect to host storage.googleapis.com:443\nmore detail')
  monkeypatch.setattr(paths, '_bucket_exists', unreachable)
  monkeypatch.setattr(paths, 'check', lambda path: path)   # as if the gcs extra were installed
  with caplog.at_level(logging.INFO):
    with pytest.raises(OSError, match=r'^gs://far/run1: cannot reach bucket gs://far \(Cannot '
                       r'connect to host storage\.googleapis\.com:443\)$'):
      paths.check_bucket('gs://far/run1')
  assert 'out of retries' not in caplog.text
  assert logging.getLogger('gcsfs').level == logging.NOTSET   # restored


# Runs `cli.main` on each JSON argv read from stdin, in one process; prints {"rc", "err"} per line.
_EACH_COMMAND = """
import contextlib, io, json, sys
from minvis_jax import cli
for line in sys.stdin:
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = cli.main(json.loads(line))
  print(json.dumps({'rc': rc, 'err': err.getvalue()}), flush=True)
"""


def test_a_refused_permission_is_one_line_naming_the_url_before_anything_is_written(
    gcs_refusing, gcs_emulator, tiny_checkpoint, synthetic_split, tmp_path):
  """Every user path on a bucket whose permission is refused (a proxy in front of the emulator
  answers 403 as Cloud Storage does): one line naming the URL and the refusal, exit status 2,
  nothing written locally or in the bucket; a read-only bucket still serves a checkpoint."""
  from support import gcs_emulator as emulator  # noqa: PLC0415
  none, ro = f'gs://{emulator.REFUSED_ALL}', f'gs://{emulator.REFUSED_WRITES}'
  ckpt = emulator.upload_tree(tiny_checkpoint[0], f'{ro}/model')   # set up past the proxy
  before = emulator.list_objects(gcs_emulator, emulator.REFUSED_WRITES)
  data = synthetic_split('valid', 1, 3)
  frames = os.path.join(data, 'valid', 'JPEGImages', os.listdir(f'{data}/valid/JPEGImages')[0])
  weights = os.path.join(data, 'valid.json')   # any existing file: refused before it is read
  read, write = 'cannot read bucket', 'cannot write there'
  cases = [
      (['train', '--config', 'tiny', '--workdir', f'{ro}/run1'], f'{ro}/run1', write),
      (['train', '--config', 'tiny', '--workdir', f'{none}/run1'], f'{none}/run1', read),
      (['train', '--config', 'tiny', '--workdir', 'run2', '--set', f'data.manual_dir={none}/raw'],
       f'{none}/raw', read),
      (['train', '--config', 'tiny', '--workdir', 'run3', '--set', f'data.tfds_dir={none}/tfds'],
       f'{none}/tfds', read),
      (['evaluate', '--checkpoint', f'{none}/model'], f'{none}/model', read),
      (['evaluate', '--checkpoint', ckpt], ckpt, write),   # OUT defaults to the checkpoint's
      (['evaluate', '--checkpoint', ckpt, '--out', f'{ro}/eval'], f'{ro}/eval', write),
      (['evaluate', '--watch', f'{ro}/run1'], f'{ro}/run1', write),
      (['infer', '--checkpoint', ckpt, '--video', frames, '--out', f'{ro}/out'], f'{ro}/out',
       write),
      (['export', '--checkpoint', ckpt, '--out', f'{ro}/model.jax'], f'{ro}/model.jax', write),
      (['convert', '--source', 'hf', '--input', weights, '--out', f'{ro}/converted'],
       f'{ro}/converted', write),
      (['data', 'build', '--dataset', 'synthetic', '--manual_dir', data, '--data_dir',
        f'{ro}/tfds'], f'{ro}/tfds', write),
      (['data', 'build', '--dataset', 'synthetic', '--manual_dir', f'{none}/raw', '--data_dir',
        'tfds'], f'{none}/raw', read),
  ]
  # The read-only bucket serves its checkpoint (no write probe of an input).
  ok = ['evaluate', '--checkpoint', ckpt, '--manual_dir', data, '--out', str(tmp_path / 'eval'),
        '--top_k', '5', '--window', '1']
  work = tmp_path / 'cwd'
  work.mkdir()
  env = dict(os.environ, PYTHONPATH=REPO, STORAGE_EMULATOR_HOST=gcs_refusing,
             TENSORSTORE_GCS_HTTP_URL=gcs_refusing)
  proc = subprocess.run([sys.executable, '-c', _EACH_COMMAND], cwd=work, env=env, text=True,
                        input='\n'.join(json.dumps(c) for c, _, _ in cases + [(ok, '', '')]),
                        capture_output=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert len(answers) == len(cases) + 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  for (argv, url, what), answer in zip(cases, answers):
    bucket = paths.bucket(url)
    refused = ('storage.objects.create' if what == write else 'storage.objects.list')
    assert answer['rc'] == 2, (argv, answer)
    assert answer['err'].splitlines() == [
        f'minvis-jax {argv[0]}: error: {url}: permission refused: {what}'
        + (f' gs://{bucket}' if what == read else '') + f' (anonymous caller does not have '
        f'{refused} access to the Google Cloud Storage bucket {bucket}. Permission '
        f"'{refused}' denied on resource (or it may not exist).)"], (argv, answer)
  assert answers[-1] == {'rc': 0, 'err': answers[-1]['err']}, answers[-1]
  assert sorted(os.listdir(work)) == []   # no local folder named gs:, no run2/run3 work dirs
  assert emulator.list_objects(gcs_emulator, emulator.REFUSED_WRITES) == before
  assert emulator.list_objects(gcs_emulator, emulator.REFUSED_ALL) == []

  # `minvis-jax train` in a process of its own: exit status 2 at once, before any training.
  start = time.monotonic()
  train = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', 'train', '--config', 'tiny',
                          '--workdir', f'{ro}/run1'], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
  assert train.returncode == 2, train.stderr[-3000:]
  assert train.stderr.strip().splitlines()[-1] == answers[0]['err'].strip()
  assert 'step' not in train.stdout and os.listdir(work) == []
  assert time.monotonic() - start < 120


def test_a_refusal_of_either_client_library_is_recognised():
  """gcsfs says OSError('Forbidden: PATH\\nMESSAGE'), google-cloud-storage raises Forbidden with
  the store's errors; other failures are not refusals."""
  from google.api_core import exceptions  # noqa: PLC0415
  message = 'caller does not have storage.objects.create access to the bucket b.'
  assert paths._refusal(exceptions.Forbidden('POST http://h/upload: {...}',
                                             errors=[{'message': message}])) == message
  assert paths._refusal(OSError(f'Forbidden: b/b/o\n{message}')) == message
  assert paths._refusal(PermissionError('denied')) == 'denied'
  assert paths._refusal(OSError('Cannot connect to host')) is None
  assert paths._refusal(FileNotFoundError('b/x')) is None
