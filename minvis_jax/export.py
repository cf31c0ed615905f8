"""Writes a model as one file that runs with JAX alone (`minvis-jax export`; docs/export.md).

The file holds the per-frame forward (images -> class logits, mask logits, query embeddings) as
`jax.export` modules, not the association: the association is a few small pure-JAX functions
(matching.py, tracking.py) that import no model code and that the reader jits around the forward
itself, so the online API and the offline predictor run the same artifact, and a change of tracker
or its settings needs no new export. The frame batch is symbolic; the frame size is bucketed: one
module per padded input size (docs/export.md says why and how sizes map to buckets).
"""

import io
import json
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from minvis_jax import exported
from minvis_jax import model_forward
from minvis_jax import online
from minvis_jax import paths
from minvis_jax import tracking
from minvis_jax.data import categories
from minvis_jax.models import ModelConfig

PLATFORMS = ('cpu', 'cuda', 'tpu')
# Frame sizes served when none are given: 16:9, 4:3 and 1:1 landscape, 3:4 and 9:16 portrait.
DEFAULT_FRAME_SIZES = ((720, 1280), (480, 640), (480, 480), (640, 480), (1280, 720))


def parse_frame_sizes(text: str) -> list[tuple[int, int]]:
  """'720x1280,480x640' -> [(720, 1280), (480, 640)] (height x width of the source frames);
  '' -> DEFAULT_FRAME_SIZES."""
  if not text:
    return list(DEFAULT_FRAME_SIZES)
  sizes = []
  for item in text.split(','):
    h, _, w = item.strip().partition('x')
    if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
      raise ValueError(f'--frame_sizes: expected HEIGHTxWIDTH[,HEIGHTxWIDTH...] with positive '
                       f'integers, got {item.strip()!r}')
    sizes.append((int(h), int(w)))
  return sizes


def buckets(frame_sizes, data) -> list[tuple[int, int]]:
  """The padded input sizes (Hp, Wp) that frames of `frame_sizes` run at, sorted, once each."""
  return sorted({exported.padded_size(h, w, data) for h, w in frame_sizes})


def export_forward(model_config: ModelConfig, variables, bucket: tuple[int, int],
                   platforms=PLATFORMS) -> jax.export.Exported:
  """The forward of `model_config` at padded input size `bucket` for `platforms`: (weights, a
  list of arrays: the leaves of `variables`; images float32 [N, Hp, Wp, 3], N symbolic) ->
  {'pred_logits' [N, Q, K+1], 'pred_masks' [N, Q, Hp/4, Wp/4], 'pred_embds' [N, Q, C]}."""
  apply = model_forward.forward(model_config).apply
  leaves, treedef = jax.tree.flatten(variables)

  def forward(weights, images):
    out = apply(jax.tree.unflatten(treedef, weights), images)
    return {k: out[k] for k in exported.OUTPUTS + ('pred_reid',) * model_config.reid}

  specs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'n, {bucket[0]}, {bucket[1]}, 3'),
                                jnp.float32)
  return jax.export.export(jax.jit(forward), platforms=tuple(platforms))(specs, images)


def manifest(config: ml_collections.ConfigDict, sizes, platforms, version: int) -> dict:
  """What a reader needs besides the modules (docs/export.md lists the fields)."""
  data, inf, model = config.data, config.inference, config.model
  ids, names = categories.of_config(config)
  tracker = tracking.tracker_from_config(config)
  return {
      'format': exported.FORMAT, 'format_version': exported.FORMAT_VERSION,
      'jax_version': jax.__version__, 'serialization_version': version,
      'platforms': list(platforms),
      'buckets': [list(b) for b in sizes],
      'input': {'min_size_test': int(data.min_size_test), 'max_size_test': int(data.max_size_test),
                'size_divisibility': int(data.size_divisibility),
                'mean': [float(v) for v in data.mean], 'std': [float(v) for v in data.std]},
      'input_rule': 'RGB uint8 frame [H, W, 3] -> resize (bilinear) to short side min_size_test, '
                    'long side at most max_size_test -> (x - mean) / std -> zero pad bottom/right '
                    'to a multiple of size_divisibility: [Hp, Wp, 3] float32, one of buckets',
      'num_classes': int(model.num_classes), 'num_queries': int(model.num_queries),
      'hidden_dim': int(model.hidden_dim),
      'reid_dim': int(model.get('reid_dim', 0)) * bool(model.get('reid', False)),
      'category_ids': [int(i) for i in ids], 'category_names': [str(n) for n in names],
      'score_rule': 'a track (query after association) scores softmax(mean over the video\'s '
                    'frames of its class logits)[:K]; the top_k (query, class) pairs are kept'
                    if tracker.kind in tracking.PERMUTING else
                    'a track (tracker \'ctvis\') scores softmax(mean over the frames where it has '
                    'a query of its class logits)[:K], its mask empty elsewhere; the top_k '
                    '(track, class) pairs are kept',
      'inference': {'window': inf.window, 'top_k': int(inf.top_k),
                    'tracker': tracking.to_manifest(tracker),
                    'online': online.rules_from_config(config)._asdict()},
  }


def write(path: str, config: ml_collections.ConfigDict, variables, frame_sizes,
          platforms=PLATFORMS) -> dict:
  """Exports the model of `config`/`variables` for frames of `frame_sizes` [(H, W)] to the file
  `path`, a local path or a URL (written whole at once: paths.write_atomic, never half a file).
  Returns the manifest."""
  unknown = [p for p in platforms if p not in ('cpu', 'cuda', 'rocm', 'tpu')]
  if unknown or not platforms:
    raise ValueError(f'--platforms: expected some of cpu, cuda, rocm, tpu; got {list(platforms)}')
  model_config = ModelConfig.from_config(config.model)
  sizes = buckets(frame_sizes, config.data)
  modules = {b: export_forward(model_config, variables, b, platforms) for b in sizes}
  version = next(iter(modules.values())).calling_convention_version
  info = manifest(config, sizes, platforms, version)
  weights = io.BytesIO()
  np.savez(weights, *[np.asarray(x) for x in jax.tree.leaves(variables)])
  data = io.BytesIO()
  with zipfile.ZipFile(data, 'w') as archive:
    archive.writestr(exported.MANIFEST, json.dumps(info, indent=1), zipfile.ZIP_DEFLATED)
    for b, module in modules.items():
      archive.writestr(exported.module_name(b), bytes(module.serialize()), zipfile.ZIP_DEFLATED)
    archive.writestr(exported.WEIGHTS, weights.getvalue())   # floats: stored, not compressed
  paths.write_atomic(path, data.getvalue())
  return info
