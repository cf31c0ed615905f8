"""A model exported by `minvis-jax export` (docs/export.md): the artifact's format, and running it
with JAX alone. Nothing here imports the Flax model code, the configs or orbax.

The artifact is one zip file: manifest.json (everything a caller needs besides the computation:
input size rule, normalisation, classes, score rule, inference settings, versions), weights.npz
(the model's variables, flattened) and one serialized `jax.export` module per frame-size bucket,
each the per-frame forward with a symbolic frame batch, lowered for the CPU, CUDA and TPU platforms.
"""

import io
import json
import types
import zipfile

import jax
import numpy as np

from minvis_jax import online
from minvis_jax import paths
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax.data import transforms

FORMAT = 'minvis-jax exported model'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
WEIGHTS = 'weights.npz'
OUTPUTS = ('pred_logits', 'pred_masks', 'pred_embds')


def module_name(bucket: tuple[int, int]) -> str:
  """The archive member of the forward of padded input size `bucket` (Hp, Wp)."""
  return f'forward_{bucket[0]}x{bucket[1]}.bin'


def padded_size(height: int, width: int, data) -> tuple[int, int]:
  """The model's input size (Hp, Wp) for frames of `height` x `width` (docs/method.md §1): resized
  to short side `data.min_size_test` (long side at most `max_size_test`), then zero padded up to a
  multiple of `size_divisibility`. Each exported module serves one such size: a bucket."""
  h, w = transforms.resize_shape(height, width, data.min_size_test, data.max_size_test)
  return transforms.padded_size(h, w, data.size_divisibility)


class _Modules:
  """The modules of an artifact by padded input size; calling it is `Model.apply`. Apart from the
  model (which holds the weights), so the predictor's cache of compiled steps keeps no weights."""

  def __init__(self, path: str, modules: dict):
    self.path, self.modules = path, modules   # (Hp, Wp) -> jax.export.Exported

  def __call__(self, weights: list, images: jax.Array) -> dict:
    size = tuple(int(s) for s in images.shape[1:3])
    if size not in self.modules:
      raise ValueError(f'{self.path}: no module for input size {size[0]}x{size[1]}; it holds '
                       f'{_sizes(sorted(self.modules))} (export again with --frame_sizes)')
    return self.modules[size].call(weights, images)


class Model:
  """An exported model, loaded (`load`): its per-frame forward and what it needs around it.

  manifest: the artifact's manifest.json (a dict).
  weights: the model's variables as a list of arrays (the modules' first argument).
  data: the input settings (min_size_test, max_size_test, size_divisibility, mean, std), as
    `predictor.preprocess` and `predictor.valid_size` read them.
  modules: {(Hp, Wp): jax.export.Exported}, one per bucket (padded input size).
  buckets: their sizes, sorted.
  """

  def __init__(self, path: str, manifest: dict, modules: dict, weights: list):
    self.path, self.manifest = path, manifest
    self.modules = modules
    self._modules = _Modules(path, modules)
    self.weights = [jax.device_put(w) for w in weights]
    self.data = types.SimpleNamespace(**manifest['input'])
    self.buckets = sorted(modules)
    self.category_ids = list(manifest['category_ids'])
    self.category_names = list(manifest['category_names'])
    self._forward = jax.jit(self._modules)

  def apply(self, weights: list, images: jax.Array) -> dict:
    """images float32 [N, Hp, Wp, 3] (normalised, zero padded: `preprocess`), N any, (Hp, Wp) one
    of `buckets` -> {'pred_logits' [N, Q, K+1], 'pred_masks' [N, Q, Hp/4, Wp/4], 'pred_embds'
    [N, Q, C]} (float32). Traceable: runs inside jit and shard_map."""
    return self._modules(weights, images)

  def forward(self, images) -> dict:
    """`apply` with this model's weights, jitted: the per-frame forward [N, Hp, Wp, 3] -> dict."""
    return self._forward(self.weights, images)

  def predictor_forward(self) -> predictor.Forward:
    """The forward as `predictor.VideoPredictor` takes it."""
    m = self.manifest
    return predictor.Forward(self._modules, int(m['num_queries']), int(m['hidden_dim']),
                             int(m.get('reid_dim', 0)))

  def tracker(self) -> tracking.Tracker:
    return tracking.from_manifest(self.manifest['inference']['tracker'])

  def video_predictor(self, window: int | str | None = None, top_k: int | None = None,
                      devices=None) -> predictor.VideoPredictor:
    """The offline predictor of this model; window and top_k default to the manifest's."""
    inf = self.manifest['inference']
    return predictor.VideoPredictor(
        self.predictor_forward(), self.weights, inf['window'] if window is None else window,
        inf['top_k'] if top_k is None else top_k, self.tracker(), devices)

  def online_tracker(self, top_k: int | None = None, summary: bool = False) -> online.OnlineTracker:
    """The online tracker of this model (docs/online.md): the manifest's input settings, tracker
    and report/retire rules (the defaults where an older artifact has none); top_k: the summary's
    tracks (default: the manifest's)."""
    inf, d = self.manifest['inference'], self.data
    spec = online.InputSpec(int(d.min_size_test), int(d.max_size_test), tuple(d.mean), tuple(d.std),
                            int(d.size_divisibility))
    rules = online.Rules(**inf.get('online', {}))
    return online.OnlineTracker(self.forward, self.tracker(), spec, rules,
                                inf['top_k'] if top_k is None else top_k, summary)

  def check_frame_size(self, height: int, width: int, where: str) -> None:
    """Raises a one-line error naming `where` when frames of this size have no module."""
    hp, wp = padded_size(height, width, self.data)
    if (hp, wp) not in self.modules:
      raise ValueError(
          f'{where}: frames of {height}x{width} run at {hp}x{wp}, which {self.path} has no module '
          f'for (it holds {_sizes(self.buckets)}); export again with --frame_sizes '
          f'{height}x{width}')


def _sizes(sizes) -> str:
  return ', '.join(f'{h}x{w}' for h, w in sizes)


def _not_artifact(path: str, why: str) -> ValueError:
  return ValueError(f'{path}: not a minvis-jax exported model (write one with `minvis-jax '
                    f'export`): {why}')


def _check_versions(path: str, manifest: dict) -> None:
  """The artifact's format and serialization version against what this code and jax read."""
  version = manifest.get('format_version')
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ValueError(f'{path}: format version {version!r} of a newer minvis-jax; this one reads '
                     f'versions up to {FORMAT_VERSION}')
  theirs, serial = manifest.get('jax_version'), manifest.get('serialization_version')
  lo = jax.export.minimum_supported_calling_convention_version
  hi = jax.export.maximum_supported_calling_convention_version
  if not isinstance(serial, int) or not lo <= serial <= hi:
    raise ValueError(f'{path}: exported by jax {theirs} with serialization version {serial}; this '
                     f'jax {jax.__version__} runs serialization versions {lo} to {hi}: export the '
                     f'model again with this jax, or run it with jax {theirs}')
  platform = jax.export.default_export_platform()
  if platform not in manifest.get('platforms', ()):
    raise ValueError(f'{path}: exported for {", ".join(manifest.get("platforms", ()))}, not for '
                     f'this {platform} device: export it again with --platforms {platform}')


def _deserialize(path: str, name: str, data: bytes, manifest: dict):
  try:
    return jax.export.deserialize(bytearray(data))
  except Exception as e:   # a format this jax cannot read: say which versions meet
    raise ValueError(
        f'{path}: {name}: jax {jax.__version__} cannot read this module, exported by jax '
        f'{manifest.get("jax_version")} with serialization version '
        f'{manifest.get("serialization_version")} ({type(e).__name__}: {" ".join(str(e).split())})'
    ) from e


def _read_weights(path: str, data: bytes) -> list[np.ndarray]:
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return [npz[f'arr_{i}'] for i in range(len(npz.files))]
  except (ValueError, OSError, zipfile.BadZipFile) as e:   # truncated or not an npz
    raise ValueError(f'{path}: {WEIGHTS} is unreadable ({" ".join(str(e).split())}); export the '
                     'model again') from e


def read_manifest(path: str, archive: zipfile.ZipFile) -> dict:
  """The manifest of an open artifact, checked to be ours and runnable by this jax."""
  if MANIFEST not in archive.namelist():
    raise _not_artifact(path, f'no {MANIFEST} inside')
  try:
    manifest = json.loads(archive.read(MANIFEST))
  except ValueError as e:
    raise _not_artifact(path, f'{MANIFEST} is not JSON ({e})') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise _not_artifact(path, f'{MANIFEST} has no "format": "{FORMAT}"')
  _check_versions(path, manifest)
  return manifest


def load(path: str) -> Model:
  """The exported model in file `path` (written by `minvis-jax export`), ready to run.

  Raises ValueError (one line naming the file) for a file that is not such an artifact, or one
  this jax cannot run (naming the artifact's jax and serialization versions and this jax's).
  """
  try:   # a URL through the path layer (a seekable file object), a local file directly
    archive = zipfile.ZipFile(paths.open(path, 'rb') if paths.is_remote(path) else path)
  except zipfile.BadZipFile as e:
    raise _not_artifact(path, 'not a zip archive') from e
  with archive:
    manifest = read_manifest(path, archive)
    try:
      modules = {tuple(b): _deserialize(path, module_name(b), archive.read(module_name(b)),
                                        manifest) for b in manifest['buckets']}
      weights = _read_weights(path, archive.read(WEIGHTS))
    except KeyError as e:
      raise _not_artifact(path, f'missing {e}') from e
  return Model(path, manifest, modules, weights)
