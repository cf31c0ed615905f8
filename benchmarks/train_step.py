"""R50 Mask2Former train step at 384x384, batch 2, CPU: our jitted step vs HF PyTorch's.

Same weights (HF's random R50 model converted), same images and targets (7 and 12 instances in
25 padded slots, as the input pipeline delivers them; `Trainer.global_batch` cuts the slots to the
batch's largest count rounded up to data.slot_multiple, 12 here). Ours is the whole `train_step`
(forward, set criterion on all 10 prediction sets with 12544 points, backward, clipping, AdamW
update); HF's is the same step as detectron2 runs it: forward with labels, `loss.backward()`,
full-model gradient clipping and AdamW with the same parameter groups. Its forward+loss+backward
alone is printed too (`ref_forward_backward_s`; earlier figures compared against that).
The three are timed in turns (ours, HF step, HF forward+backward, ours, ...), so that the drifting
load of a shared machine weighs on each alike, in one process that runs with glibc's malloc keeping
freed memory (minvis_jax/host_memory.py), for PyTorch as for us.
Also reports our step's FLOP utilisation: XLA's cost analysis of the compiled step over the measured
peak of a jitted f32 matmul on the same machine.

  python benchmarks/train_step.py [--repeats 5] [--dtype bfloat16] [--torch_device cuda]

`--dtype bfloat16` computes in bfloat16 (parameters float32) on our side and under torch.autocast on
HF's; the peak is then a bfloat16 matmul's. On a GPU the utilisation is also given against the
device's nominal dense peak where the device is known. `--dry-run` (= `--model tiny --size 64
--repeats 1 --points 1024`) is the dry run of benchmarks/device.sh and of the tests.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import converted  # noqa: E402
from timing import matmul_peak_flops, median_times, nominal_peak_flops, result_line  # noqa: E402

from minvis_jax import host_memory  # noqa: E402
from minvis_jax import config_lib  # noqa: E402
from minvis_jax import ops  # noqa: E402
from minvis_jax import train  # noqa: E402

B, N = 2, 25
NUM_REAL = (7, 12)


def make_batch(rng, num_classes: int, size: int, slots: int = N) -> dict:
  """`slots` target slots per image (at least the real instances; the tiny model has 12 queries)."""
  masks = np.zeros((B, slots, size, size), np.uint8)
  box = max(size // 3, 8)
  for b in range(B):
    for n in range(NUM_REAL[b]):
      y, x = rng.integers(0, size - box, 2)
      masks[b, n, y:y + rng.integers(box // 5, box), x:x + rng.integers(box // 5, box)] = 1
  return {'image': rng.integers(0, 256, (B, size, size, 3), dtype=np.uint8),
          'image_size': np.full((B, 2), size, np.int32),
          'labels': rng.integers(0, num_classes, (B, slots)).astype(np.int32),
          'masks': masks,
          'valid': np.arange(slots)[None] < np.asarray(NUM_REAL)[:, None]}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--size', type=int, default=384)
  parser.add_argument('--model', default='r50', choices=['r50', 'tiny'])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--torch_device', default='cpu', help="'cuda' to time HF on the GPU")
  parser.add_argument('--points', type=int, default=0, help='criterion points (0: the config)')
  parser.add_argument('--dry-run', action='store_true',
                      help='tiny model at 64x64, one repeat (tests)')
  args = parser.parse_args(argv)
  if args.dry_run:
    args.model, args.size, args.repeats, args.points = 'tiny', 64, 1, 1024
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model, model_config, variables = converted(args.model)
  model_config.dtype = args.dtype
  size = args.size

  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                               'minvis.py'))
  config.model = model_config
  config.data.canvas = (size, size)
  slots = min(N, model_config.num_queries)
  config.data.max_instances = slots
  config.batch_size = B
  config.mesh.data = 1
  config.init.checkpoint = ''   # weights set below / random: no pretrained files needed
  if args.points:
    config.loss.num_points = args.points
  batch = make_batch(np.random.default_rng(0), model_config.num_classes, size, slots)

  trainer = train.Trainer(config, mesh=train.make_mesh(config.mesh, jax.devices()[:1]))
  state = trainer.init_state()
  state = state.replace(params=jax.device_put(variables['params']),
                        frozen=jax.device_put(variables['frozen']))
  global_batch = trainer.global_batch(batch)
  t0 = time.perf_counter()
  compiled = trainer.step.lower(state, global_batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

  holder = [state]

  def ours_step():
    holder[0], metrics = compiled(holder[0], global_batch)
    jax.block_until_ready(metrics)

  # HF: the same images (normalised as ours) and the real instances only (its natural input).
  images = np.asarray(ops.normalize(batch['image'], batch['image_size'], config.data.mean,
                                    config.data.std))
  pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  mask_labels = [torch.from_numpy(batch['masks'][b, :NUM_REAL[b]].astype(np.float32))
                 for b in range(B)]
  class_labels = [torch.from_numpy(batch['labels'][b, :NUM_REAL[b]].astype(np.int64))
                  for b in range(B)]

  device = torch.device(args.torch_device)
  model.to(device)
  pixel_values = pixel_values.to(device)
  mask_labels = [m.to(device) for m in mask_labels]
  class_labels = [c.to(device) for c in class_labels]

  # The reference train step as detectron2 runs it for Mask2Former: forward with labels, backward,
  # full-model gradient clipping, AdamW with the backbone at lr * backbone_lr_mult and weight decay
  # on conv / linear weights only (ours: the same groups, see train.make_optimizer). Its weights
  # are restored afterwards (device.sh reuses the model).
  optim = config.optim
  saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
  groups = {(backbone, decay): [] for backbone in (True, False) for decay in (True, False)}
  embeddings = ('level_embed', 'queries_embedder', 'queries_features')
  for name, param in model.named_parameters():
    backbone = name.startswith('model.pixel_level_module.encoder.')
    decay = param.ndim > 1 and not any(e in name for e in embeddings)
    groups[backbone, decay].append(param)
  optimizer = torch.optim.AdamW(
      [{'params': params, 'weight_decay': optim.weight_decay if decay else 0.0,
        'lr': optim.lr * (optim.backbone_lr_mult if backbone else 1.0)}
       for (backbone, decay), params in groups.items() if params],
      betas=(optim.b1, optim.b2))

  def hf_step(update: bool = True):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == 'bfloat16'):
      out = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    out.loss.backward()
    if update:
      torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
      optimizer.step()
    if device.type == 'cuda':
      torch.cuda.synchronize()
  # In turns, so that drifting load on a shared machine weighs on both alike.
  ours, theirs, theirs_no_update = median_times(
      [ours_step, hf_step, lambda: hf_step(update=False)], args.repeats)
  model.load_state_dict(saved)

  peak = matmul_peak_flops(dtype=args.dtype)
  utilisation = flops / ours / peak
  print(f'ours: jitted train step {ours:.3f} s (compile {compile_s:.0f} s, {args.dtype}), '
        f'{flops / 1e9:.1f} GFLOP -> {flops / ours / 1e9:.1f} GFLOP/s')
  print(f'HF PyTorch train step {theirs:.3f} s, of which forward+loss+backward '
        f'{theirs_no_update:.3f} s ({device}, torch threads {torch.get_num_threads()})')
  print(f'{args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s (measured) -> FLOP utilisation '
        f'{100 * utilisation:.1f}%')
  nominal = nominal_peak_flops(jax.devices()[0], args.dtype)
  if nominal:
    print(f'{jax.devices()[0].device_kind} nominal dense {args.dtype} peak {nominal / 1e12:.0f} '
          f'TFLOP/s -> model FLOP utilisation {100 * flops / ours / nominal:.2f}%')
  suffix = '' if args.dtype == 'float32' else f'_{args.dtype}'
  print(result_line(f'train_step_{args.model}_{size}_b{B}_{jax.default_backend()}{suffix}', ours,
                    theirs, utilisation=round(utilisation, 4),
                    ref_forward_backward_s=round(theirs_no_update, 5),
                    **({'mfu_nominal': round(flops / ours / nominal, 4)} if nominal else {})))
  return ours, theirs


if __name__ == '__main__':
  # Keep freed memory mapped on CPU (minvis_jax/host_memory.py); PyTorch in this process too.
  host_memory.reexec_keeping_freed_memory()
  main()
