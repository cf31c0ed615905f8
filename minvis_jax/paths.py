"""The one path layer: every path a user gives (work directory, checkpoint, output, data) is a
local path or a URL (gs://bucket/run1, s3://...), read and written through etils.epath here.

Callers pass and get plain strings. Local paths keep their exact behaviour (os.path, atomic rename);
URLs keep their scheme (never `os.path.abspath`, which would make a local folder named `gs:`).
On an object store a rename is a copy plus a delete, not atomic, but one object upload is: a reader
sees the old object or the whole new one. So files that must be atomic are written in one upload,
and a file that grows (a JSON-lines log) is rewritten whole under a generation precondition.
"""

import builtins
import functools
import importlib.util
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import IO

import fsspec
from etils import epath

_URL = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
# URL scheme -> (fsspec module epath needs, the pip extra that installs it).
_EXTRAS = {'gs': ('gcsfs', 'gcs'), 's3': ('s3fs', 's3'), 'az': ('adlfs', 'az')}


class MissingExtraError(ImportError):
  """A URL whose scheme needs a client library that is not installed."""


def scheme(path: str) -> str | None:
  """'gs' for gs://bucket/x, None for a local path."""
  m = _URL.match(os.fspath(path))
  return m.group(1).lower() if m else None


def is_remote(path: str) -> bool:
  return scheme(path) is not None


def check(path: str) -> str:
  """`path` unchanged, or MissingExtraError / ValueError (one line naming the URL) when its scheme
  is unsupported or its client library is missing. Writes nothing."""
  path = os.fspath(path)
  s = scheme(path)
  if s is None:
    return path
  if s not in _EXTRAS:
    raise ValueError(f'{path}: unsupported URL scheme {s}:// (supported: local paths, '
                     + ', '.join(f'{k}://' for k in _EXTRAS) + ')')
  _use_emulator()
  module, extra = _EXTRAS[s]
  if importlib.util.find_spec(module) is None:
    raise MissingExtraError(f'{path}: {s}:// paths need the {module} client library: '
                            f'pip install "minvis-jax[{extra}]"')
  return path


def check_urls(values, outputs=()) -> None:
  """`check_bucket` of every URL among `values` (flag values, and `key=value` config overrides),
  and `check_writable` of those among `outputs` (the locations the command writes): a missing
  client library or bucket, or a refused permission, is one line before a command reads or writes
  anything."""
  for value in values:
    if isinstance(value, str):
      value = value if is_remote(value) else value.split('=', 1)[-1]
      if is_remote(value):
        check_bucket(value)
  for value in outputs:
    if isinstance(value, str) and is_remote(value):
      check_writable(value)


def bucket(path: str) -> str:
  """The bucket of a URL: 'b' for gs://b/run1."""
  return _URL.sub('', os.fspath(path)).split('/', 1)[0]


@functools.lru_cache(maxsize=64)
def _bucket_exists(root: str) -> bool:
  return epath.Path(root).exists()


def _refusal(e: BaseException) -> str | None:
  """The store's message when `e` is a refused permission (HTTP 403) of a client library, else
  None. gcsfs raises OSError('Forbidden: PATH\nMESSAGE'), google-cloud-storage a Forbidden."""
  text = str(e)
  if type(e).__name__ == 'Forbidden':
    errors = getattr(e, 'errors', None) or [{}]
    message = errors[0].get('message') if isinstance(errors[0], dict) else None
    return (message or getattr(e, 'message', '') or text).splitlines()[0]
  if isinstance(e, PermissionError):
    return text.splitlines()[0] if text else 'permission denied'
  if isinstance(e, OSError) and text.startswith('Forbidden'):
    lines = text.splitlines()
    return lines[1] if len(lines) > 1 and lines[1] else lines[0]
  return None


class _QuietClients:
  """The clients log each failed retry with a traceback; the one line raised says it all."""

  def __enter__(self):
    self._logs = [logging.getLogger(name) for name in ('gcsfs', 's3fs', 'fsspec')]
    self._levels = [log.level for log in self._logs]
    for log in self._logs:
      log.setLevel(logging.CRITICAL)

  def __exit__(self, *exc):
    for log, level in zip(self._logs, self._levels):
      log.setLevel(level)


def check_bucket(path: str) -> str:
  """`check(path)`, and for a URL a FileNotFoundError naming it when its bucket does not exist (or
  this account cannot see it), a PermissionError when the store refuses to list it (the read
  probe: one listing request, cached per bucket). Writes nothing."""
  path = check(path)
  if is_remote(path):
    root = f'{scheme(path)}://{bucket(path)}'
    try:
      with _QuietClients():
        exists = _bucket_exists(root)
    except FileNotFoundError:
      raise
    except Exception as e:   # network, DNS, credential or permission failures of the client
      if (refused := _refusal(e)) is not None:
        raise PermissionError(f'{path}: permission refused: cannot read bucket {root} '
                              f'({refused})') from None
      message = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise OSError(f'{path}: cannot reach bucket {root} ({message})') from None
    if not exists:
      raise FileNotFoundError(f'{path}: bucket {root} does not exist (or these credentials cannot '
                              'see it)')
  return path


WRITE_PROBE = '.minvis-write-probe'


def check_writable(path: str) -> str:
  """`check_bucket(path)`, and for a URL the write probe: an empty object WRITE_PROBE-HOST-PID
  uploaded beside `path` (in its parent, so never inside an output file's name; one name per
  process, as every worker of a pod probes at once) and deleted; a refused upload is a
  PermissionError naming `path`. Locally nothing (the commands check their folders)."""
  path = check_bucket(path)
  if is_remote(path):
    parent = dirname(path) if '/' in _URL.sub('', path).rstrip('/') else path.rstrip('/')
    probe = join(parent, f'{WRITE_PROBE}-{socket.gethostname()}-{os.getpid()}')
    try:
      with _QuietClients():
        _p(probe).write_bytes(b'')
    except Exception as e:
      if (refused := _refusal(e)) is None:
        raise
      raise PermissionError(f'{path}: permission refused: cannot write there ({refused})') from None
    try:
      with _QuietClients():
        _p(probe).unlink()
    except FileNotFoundError:
      pass
    except Exception as e:   # create without delete permission: the empty probe object stays
      if _refusal(e) is None:
        raise
  return path


def _p(path: str) -> epath.Path:
  return epath.Path(check(path))


def emulator_settings() -> dict[str, str]:
  """With STORAGE_EMULATOR_HOST set (a local storage emulator, which google-cloud-storage, gcsfs and
  tensorboardX read), the variables that point TensorStore (orbax's arrays) at it too and keep
  gcsfs from asking the emulator for a bucket layout over gRPC; {} without it."""
  host = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if not host:
    return {}
  url = host if '://' in host else f'http://{host}'
  return {'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'FSSPEC_GCS_TOKEN': 'anon'}


def _use_emulator() -> None:
  """Applies `emulator_settings` (never overriding a variable already set); fsspec read its
  FSSPEC_* variables on import, so its config gets the anonymous token directly."""
  for key, value in emulator_settings().items():
    os.environ.setdefault(key, value)
    if key == 'FSSPEC_GCS_TOKEN':
      fsspec.config.conf.setdefault('gcs', {}).setdefault('token', os.environ[key])


_use_emulator()
# A listing must show what other processes wrote since (the watcher polls for new steps, a resumed
# run looks for the last one): no cached directory listings.
for _protocol in ('gcs', 's3'):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)


# --- names (no I/O) ------------------------------------------------------------------------------

def abspath(path: str) -> str:
  """An absolute local path; a URL as it is (without a trailing slash)."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip('/')) if is_remote(path) else os.path.dirname(path)


def split(path: str) -> tuple[str, str]:
  return (dirname(path), os.fspath(path).rstrip('/').rsplit('/', 1)[-1]) if is_remote(path) \
      else os.path.split(path)


def splitext(path: str) -> tuple[str, str]:
  return posixpath.splitext(path) if is_remote(path) else os.path.splitext(path)


def relpath(path: str, start: str) -> str:
  return posixpath.relpath(path, start) if is_remote(path) else os.path.relpath(path, start)


# --- queries -------------------------------------------------------------------------------------

def exists(path: str) -> bool:
  return os.path.exists(path) if not is_remote(path) else _p(path).exists()


def isdir(path: str) -> bool:
  return os.path.isdir(path) if not is_remote(path) else _p(path).is_dir()


def isfile(path: str) -> bool:
  return os.path.isfile(path) if not is_remote(path) else _p(path).is_file()


def getsize(path: str) -> int:
  return os.path.getsize(path) if not is_remote(path) else _p(path).stat().length


def read_range(path: str, start: int, end: int) -> bytes:
  """Bytes [start, end) of a file: one ranged request on an object store (no read-ahead)."""
  if not is_remote(path):
    with builtins.open(path, 'rb') as f:
      f.seek(start)
      return f.read(end - start)
  fs, name = fsspec.core.url_to_fs(check(path))
  return fs.cat_file(name, start=start, end=end)


def listdir(path: str) -> list[str]:
  """Names in a directory (one listing request on an object store); FileNotFoundError if none."""
  if not is_remote(path):
    return os.listdir(path)
  names = [p.name for p in _p(path).iterdir()]
  if not names and not _p(path).is_dir():
    raise FileNotFoundError(f'{path}: no such directory')
  return names


def walk_files(path: str) -> Iterator[str]:
  """Every file under `path`, recursively (relative names)."""
  root = _p(path)
  for p in root.rglob('*'):
    if p.is_file():
      yield os.fspath(p.relative_to(root))


# --- writing -------------------------------------------------------------------------------------

def makedirs(path: str) -> None:
  """Creates a local directory (and its parents). On an object store there are no directories:
  only the URL's scheme and bucket are checked."""
  if is_remote(path):
    check_bucket(path)
  else:
    os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = 'r') -> IO:  # noqa: A001  (the layer's own open)
  """A file object for `path`; for a URL, writing ends in one upload when it is closed."""
  if not is_remote(path):
    return builtins.open(path, mode)
  if 'w' in mode or 'a' in mode:
    check_bucket(path)
  return _p(path).open(mode)


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `path` so a reader (or a worker killed meanwhile) sees the old file or the whole new
  one: locally a temporary file, fsync, rename; on an object store one upload."""
  raw = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    check_bucket(path)
    _p(path).write_bytes(raw)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with builtins.open(tmp, 'wb') as f:
    f.write(raw)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_via_local(path: str, write: Callable[[str], str]) -> str:
  """For writers that need a local file (ffmpeg, matplotlib): `write(local_path) -> written path`
  (it may change the suffix), called with `path` itself when local; for a URL with a temporary
  file of the same name, uploaded in one piece beside `path`. Returns the path written."""
  if not is_remote(path):
    return write(path)
  check_bucket(path)
  with tempfile.TemporaryDirectory() as tmp:
    written = write(os.path.join(tmp, split(path)[1]))
    target = join(dirname(path), os.path.basename(written))
    with builtins.open(written, 'rb') as src, _p(target).open('wb') as dst:
      shutil.copyfileobj(src, dst)
  return target


def create_exclusive(path: str, data: bytes) -> bool:
  """Writes `path` only if it does not exist; False when it does (another writer was first).
  On gs:// one upload with the precondition 'no live generation', locally O_EXCL."""
  if scheme(path) == 'gs':
    from google.api_core import exceptions  # noqa: PLC0415  (the gcs extra)
    try:
      _gcs_blob(path).upload_from_string(data, if_generation_match=0)
    except exceptions.PreconditionFailed:
      return False
    return True
  if is_remote(path):   # stores without preconditions: check, then write (not race-free)
    if _p(path).exists():
      return False
    _p(path).write_bytes(data)
    return True
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  return True


def remove(path: str) -> None:
  if is_remote(path):
    _p(path).unlink()
  else:
    os.remove(path)


class Appender:
  """A growing text file (JSON lines) that readers see whole: locally an append (fsync on request),
  on an object store the whole object rewritten on each `append`, with a generation precondition
  (gs://) so a second writer fails instead of silently dropping the other's rows."""

  def __init__(self, path: str):
    self.path = path
    self._remote = is_remote(path)
    if not self._remote:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = builtins.open(path, 'a')
      return
    check_bucket(path)
    self._text, self._generation = _read_with_generation(path)

  def append(self, text: str, fsync: bool = False) -> None:
    if not self._remote:
      self._file.write(text)
      self._file.flush()
      if fsync:
        os.fsync(self._file.fileno())
      return
    self._text += text
    self._generation = _write_if_generation(self.path, self._text.encode(), self._generation)

  def close(self) -> None:
    if not self._remote:
      self._file.close()


def _gcs_blob(path: str):
  from google.cloud import storage  # noqa: PLC0415  (the gcs extra, gs:// URLs only)
  client = _gcs_client(storage)
  name = _URL.sub('', path).split('/', 1)[1]
  return client.bucket(bucket(path)).blob(name)


@functools.cache
def _gcs_client(storage):
  # With STORAGE_EMULATOR_HOST set the client talks to the emulator, anonymously.
  return storage.Client()


def _read_with_generation(path: str) -> tuple[str, int | None]:
  """(text, generation) of an object; ('', 0) when it does not exist (0 = 'must not exist')."""
  if scheme(path) != 'gs':
    return (_p(path).read_text() if _p(path).exists() else ''), None
  blob = _gcs_blob(path)
  if not blob.exists():
    return '', 0
  blob.reload()
  return blob.download_as_bytes(if_generation_match=blob.generation).decode(), blob.generation


def _write_if_generation(path: str, data: bytes, generation: int | None) -> int | None:
  """Uploads `data` if the object is still at `generation`; the new generation."""
  if scheme(path) != 'gs' or generation is None:
    _p(path).write_bytes(data)
    return None
  from google.api_core import exceptions  # noqa: PLC0415  (the gcs extra)
  blob = _gcs_blob(path)
  try:
    blob.upload_from_string(data, if_generation_match=generation)
  except exceptions.PreconditionFailed:
    raise OSError(f'{path}: changed by another writer since this process read it (one writer '
                  'per run: process 0)') from None
  return blob.generation
