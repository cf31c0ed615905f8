"""Pieces shared by the experiment configs: model presets and the MinVIS training recipe
(docs/method.md §2-4). Every default of the project lives here."""

import ml_collections

from minvis_jax.data import categories
from minvis_jax.models import resnet
from minvis_jax.models import swin

IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


def resnet_backbone(depth: int = 50) -> ml_collections.ConfigDict:
  """detectron2-layout ResNet (`resnet.VARIANTS`): stride in the 3x3 conv, frozen BN."""
  return ml_collections.ConfigDict(dict(name='resnet', **resnet.VARIANTS[depth]))


def swin_backbone(size: str = 'L') -> ml_collections.ConfigDict:
  """Swin-T/S/B/L (`swin.VARIANTS`) with detectron2 semantics."""
  return ml_collections.ConfigDict(dict(name='swin', **swin.VARIANTS[size], patch_size=4,
                                        mlp_ratio=4.0, drop_path_rate=0.3))


def mask2former_model(backbone: ml_collections.ConfigDict, num_classes: int = 40,
                      num_queries: int = 100) -> ml_collections.ConfigDict:
  """Mask2Former instance-segmentation head on top of `backbone` (docs/method.md §2); the fields of
  `minvis_jax.models.ModelConfig`."""
  return ml_collections.ConfigDict(dict(
      backbone=backbone,
      num_classes=num_classes,           # K; the class head outputs K + 1 (last = no object)
      num_queries=num_queries,
      hidden_dim=256,                    # C of pixel decoder and transformer decoder
      mask_dim=256,
      # Pixel decoder (MSDeformAttn encoder).
      enc_layers=6,
      enc_heads=8,
      enc_ffn_dim=1024,
      enc_points=4,
      num_feature_levels=3,
      # Transformer decoder.
      dec_layers=9,                      # masked-attention layers (10 prediction sets)
      dec_heads=8,
      dec_ffn_dim=2048,
      # 'float32' or 'bfloat16' compute; parameters stay float32.
      dtype='float32',
      # Re-identification head (docs/reid.md): an MLP on the last decoder layer's normalised
      # output -> 'pred_reid' [B, Q, reid_dim]. Off: the model is exactly MinVIS's.
      reid=False,
      reid_dim=256,
      reid_detach=False,                 # train only the head: masks and classes stay as loaded
      reid_input='mask',                 # head input: 'mask' (pooled pixels), 'query', 'query+mask'
      # Rematerialisation: 'none' | 'backbone' | 'decoder' | 'all' (backbone blocks, pixel- and
      # transformer-decoder layers recompute their activations in the backward pass: less memory,
      # more compute; the same parameters and outputs).
      remat='none',
  ))


def tiny_model(num_classes: int = 40) -> ml_collections.ConfigDict:
  """A small model with the full architecture, for tests and the CPU demo."""
  backbone = ml_collections.ConfigDict(dict(
      name='resnet', depths=(1, 1, 1, 1), stem_width=16, widths=(32, 64, 128, 256)))
  model = mask2former_model(backbone, num_classes=num_classes, num_queries=20)
  model.update(dict(hidden_dim=64, mask_dim=64, enc_layers=2, enc_heads=4, enc_ffn_dim=128,
                    enc_points=4, dec_layers=3, dec_heads=4, dec_ffn_dim=128, reid_dim=64))
  return model


def loss_config() -> ml_collections.ConfigDict:
  """Set criterion weights and point sampling (docs/method.md §3)."""
  return ml_collections.ConfigDict(dict(
      class_weight=2.0,
      mask_weight=5.0,
      dice_weight=5.0,
      no_object_weight=0.1,
      num_points=12544,
      oversample_ratio=3.0,
      importance_sample_ratio=0.75,
  ))


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Everything but the dataset: recipe of the original R50 YouTube-VIS 2019 run."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model
  c.loss = loss_config()

  c.data = ml_collections.ConfigDict(dict(
      dataset='synthetic',         # synthetic | ytvis_2019 | ytvis_2021 | ytvis_2022 | ovis | coco
      manual_dir='',               # the raw dataset folder (train.json / valid.json / JPEGImages)
      tfds_dir='',                 # read TFDS records built from manual_dir here ('' = the folder)
      workers=4,                   # input threads per process
      train_split='train',
      eval_split='valid',
      annotation_fraction=1.0,     # MinVIS sub-sampled annotations: 1.0, 0.1, 0.05, 0.01
      min_size_train=(360, 480),   # random choice of the short side
      max_size_train=1333,
      canvas=(480, 864),           # fixed padded training shape [H, W] (static shapes under jit)
      flip=True,
      crop=False,
      max_instances=25,            # padded instances per frame
      # Each step's target slots are cut to the batch's largest instance count rounded up to this
      # (the loss costs per slot; one compile per distinct count); 0: always max_instances.
      slot_multiple=4,
      min_size_test=360,
      max_size_test=1333,
      size_divisibility=32,
      mean=IMAGE_MEAN,
      std=IMAGE_STD,
      # (dataset id, name) of class index 0..K-1, checked against the annotation file's categories
      # when a split is loaded; empty: take them from the file (a custom dataset).
      category_ids=(),
      category_names=(),
  ))
  c.batch_size = 32                # global, frames (= videos: one frame each)

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4,
      weight_decay=0.05,
      backbone_lr_mult=0.1,
      clip_norm=0.01,
      b1=0.9,
      b2=0.999,
      warmup_steps=0,
      decay_steps=(4000,),
      decay_factor=0.1,
      # Gradient accumulation: each step's global batch runs as this many interleaved microbatches
      # (the same update up to float rounding, less memory; minvis_jax/optim.py).
      accumulate_steps=1,
  ))
  c.total_steps = 6000

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
  c.log_every = 20
  # Initialisation: an orbax checkpoint written by `python -m minvis_jax.convert`.
  c.init = ml_collections.ConfigDict(dict(checkpoint='', reinit_class_head=True))

  # window: frames per device per forward; 'auto' sizes it from the device (1 a device on CPU).
  # tracker: 'minvis' (docs/method.md §1), 'memory' (per-track EMA memory; minvis_jax/tracking.py;
  # memory_momentum / memory_min_score chosen with benchmarks/tracking.py) or 'ctvis' (below).
  c.inference = ml_collections.ConfigDict(dict(window='auto', top_k=10, tracker='minvis',
                                               memory_momentum=0.7, memory_min_score=0.0,
                                               embedding='decoder'))
  # embedding: what the tracker matches: 'decoder' (MinVIS: the last decoder layer's normalised
  # output) or 'reid' (the re-identification head's output; needs model.reid).
  # tracker='ctvis' (tracks that begin and end; minvis_jax/tracking.py, docs/tracking_study.md).
  # match 0.3, 20 frames and a cache of 10 are CTVIS's released configs; the score was swept on
  # data seed 0 (benchmarks/tracking.py --sweep, docs/tracking_study.md): CTVIS keeps > 0.01 but
  # also suppresses duplicate masks, which this tracker does not see. Tune on data seed 0 only.
  c.inference.ctvis_score = 0.5          # foreground score of a query that may match / start one
  c.inference.ctvis_match = 0.3          # bi-softmax similarity a match must exceed
  c.inference.ctvis_retire_frames = 20   # unmatched frames in a row that end a track
  c.inference.ctvis_cache = 10           # last embeddings a track keeps for its fusion weight
  c.inference.ctvis_max_tracks = 0       # live tracks at most (0: twice model.num_queries)
  # Online tracking (minvis_jax/online.py, `infer --online`, docs/online.md): which tracks each
  # frame reports. Defaults measured on the synthetic splits (docs/online.md).
  c.inference.online_report_score = 0.9   # a slot's running score needed to report its track
  c.inference.online_retire_frames = 2    # unseen frames in a row that retire a track (its id ends)
  # Re-identification training (docs/reid.md), read only with model.reid: a step's batch_size
  # images are batch_size / 2 annotated frames seen twice (views A and B, rows 2i and 2i + 1),
  # and the contrastive loss between the views is added to the detection loss.
  c.reid = ml_collections.ConfigDict(dict(
      con_weight=2.0,              # cross-entropy over the dot products (anchor vs other view)
      aux_weight=3.0,              # squared (cosine - label) over the other view's queries
      move_prob=1.0,               # chance that view B moves one instance elsewhere
      cover_prob=1.0,              # chance that another instance is then pasted over its old place
      move_count=3,                # instances view B moves (at most those present)
  ))
  # Evaluation inside `train` on the training mesh, logged as eval/* at its step (metrics.jsonl,
  # TensorBoard). Off by default: `minvis-jax evaluate --watch WORKDIR` does it beside the run.
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=0,               # 0: never; else at every multiple of it
      split='',                    # '' = data.eval_split (needs annotations)
      max_videos=0,                # the first N videos of the split; 0 = all
  ))
  return c


def with_dataset(c: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """Number of classes, category table and schedule of each dataset (docs/method.md §4)."""
  classes, steps, decay = {
      'ytvis_2019': (40, 6000, 4000),
      'ytvis_2021': (40, 8000, 5500),
      'ytvis_2022': (40, 8000, 5500),
      'ovis': (25, 10000, 7000),
      'synthetic': (4, 300, 200),
      'coco': (80, 368750, 327778),
  }[dataset]
  c.data.dataset = dataset
  c.data.category_ids, c.data.category_names = categories.table(dataset)
  c.model.num_classes = classes
  c.total_steps = steps
  c.optim.decay_steps = (decay,)
  return c


# The original model zoo (docs/method.md §4): (dataset, backbone) -> {annotation fraction: its AP}.
ZOO = {
    ('ytvis_2019', 'r50'): {1.0: 47.3},
    ('ytvis_2019', 'swin_l'): {1.0: 62.0, 0.1: 60.9, 0.05: 59.7, 0.01: 58.9},
    ('ytvis_2021', 'r50'): {1.0: 43.9},
    ('ytvis_2021', 'swin_l'): {1.0: 55.4, 0.1: 54.8, 0.05: 54.5, 0.01: 52.6},
    ('ovis', 'r50'): {1.0: 26.7},
    ('ovis', 'swin_l'): {1.0: 41.7, 0.1: 37.1, 0.05: 35.7, 0.01: 31.8},
}


def parse_arg(arg, config: str, **defaults) -> dict:
  """'a=1,b=x' -> {'a': '1', 'b': 'x'} over `defaults` (big_vision-style config arguments).

  `config` names the config file in errors. A config without `defaults` takes no argument: one
  given anyway is an error, never silently ignored.
  """
  out = dict(defaults)
  seen = set()
  for item in (arg or '').split(','):
    if not item:
      continue
    key, sep, value = item.partition('=')
    if not defaults:
      raise ValueError(f'{config} takes no argument, got {arg!r} (change values with --set '
                       'key=value)')
    if not sep or key not in defaults:
      raise ValueError(f'{config}: argument {item!r}: expected key=value with key in '
                       f'{sorted(defaults)}')
    if key in seen:
      raise ValueError(f'{config}: argument {key!r} given twice in {arg!r}')
    seen.add(key)
    out[key] = value
  return out


def zoo_config(dataset: str, backbone: str, fraction: float) -> ml_collections.ConfigDict:
  """A model-zoo row of the original MinVIS: recipe, sizes, classes and initialisation
  (docs/method.md §4)."""
  if (dataset, backbone) not in ZOO:
    raise ValueError(f'configs/minvis.py: no model-zoo row for dataset={dataset!r} '
                     f'backbone={backbone!r}; choose from {sorted(ZOO)}')
  if backbone == 'r50':
    model = mask2former_model(resnet_backbone(50), num_queries=100)
  else:
    model = mask2former_model(swin_backbone('L'), num_queries=200)
  c = with_dataset(base_config(model), dataset)
  c.data.annotation_fraction = fraction
  # Swin-L on YouTube-VIS 2019 and OVIS is tested at short side 480 (docs/method.md §1).
  if backbone == 'swin_l' and dataset in ('ytvis_2019', 'ovis'):
    c.data.min_size_test = 480
  # Initialised from the COCO instance Mask2Former checkpoint, converted with
  #   python -m minvis_jax.convert --source detectron2 --input model_final_3c8ec9.pkl \
  #       --config coco:backbone=r50 --output pretrained/coco_r50
  c.init.checkpoint = f'pretrained/coco_{backbone}'
  c.init.reinit_class_head = True
  return c


# Pod plans: how the recipe of a backbone runs on a named TPU slice, the global batch kept.
# chips: the slice's chips (mesh.data); accumulate_steps, remat, fsdp: the memory settings, found
# with `minvis-jax plan --search` and checked by compiling the train step for the slice's topology
# (docs/tpu.md, "Compiled plans", has each row's memory and roofline bound).
PODS = {
    # pod: (libtpu topology for `minvis-jax plan --topology`, chips)
    'v5e-8': ('v5e:2x4', 8),
    'v5e-16': ('v5e:4x4', 16),
}
POD_PLANS = {
    # (backbone, pod): settings
    ('r50', 'v5e-16'): dict(accumulate_steps=1, remat='none', fsdp=False),
    ('r50', 'v5e-8'): dict(accumulate_steps=2, remat='none', fsdp=False),
}


def with_pod(c: ml_collections.ConfigDict, backbone: str, pod: str,
             config: str = 'configs/minvis.py') -> ml_collections.ConfigDict:
  """The recipe `c` (of `backbone`) on the named slice `pod` (`POD_PLANS`): its mesh size and
  memory settings; the global batch is unchanged (per chip: batch / chips / accumulate_steps)."""
  known = sorted(p for b, p in POD_PLANS if b == backbone)
  if (backbone, pod) not in POD_PLANS:
    raise ValueError(f'{config}: pod={pod!r}: no pod plan for backbone={backbone!r}; known: '
                     f'{", ".join(known) or "none"}')
  plan = POD_PLANS[(backbone, pod)]
  c.mesh.data = PODS[pod][1]
  c.mesh.fsdp = plan['fsdp']
  c.model.remat = plan['remat']
  c.optim.accumulate_steps = plan['accumulate_steps']
  return c

