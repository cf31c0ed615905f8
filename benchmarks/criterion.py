"""Benchmark: set_criterion loss + gradient (10 prediction sets) vs HF Mask2FormerLoss forward +
backward.

Shapes of the R50 384x384 training step: batch 2, 100 queries, 40 classes, 25 padded target slots
(configs/common.py max_instances) of which 7 and 12 are real, predictions at 96x96. HF gets only the
real instances (its natural input); ours computes all 25 slots (static shapes) and masks the
padding.

  python benchmarks/criterion.py [--dry-run]   # dry run: 64x64, 16 queries, 12 slots, 2 sets
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from transformers.models.mask2former import modeling_mask2former

from timing import median_time, result_line

from minvis_jax import config_lib  # noqa: F401  (registers minvis_jax.configs)
from minvis_jax import criterion
from minvis_jax import host_memory
from minvis_jax.configs import common

B = 2
NUM_REAL = (7, 12)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dry-run', action='store_true', help='tiny sizes, one repeat (tests)')
  args = parser.parse_args(argv)
  if args.dry_run:
    Q, N, K, H, W, NUM_SETS, repeats, points = 16, 12, 8, 64, 64, 2, 1, 256
  else:
    Q, N, K, H, W, NUM_SETS, repeats, points = 100, 25, 40, 384, 384, 10, 10, None
  rng = np.random.default_rng(0)
  sets = [(rng.normal(size=(B, Q, H // 4, W // 4)).astype(np.float32),
           rng.normal(size=(B, Q, K + 1)).astype(np.float32)) for _ in range(NUM_SETS)]
  masks = np.zeros((B, N, H, W), np.uint8)
  for b in range(B):
    for n in range(N):
      box = min(64, H // 3)
      y, x = rng.integers(0, H - box, 2)
      masks[b, n, y:y + rng.integers(box // 4, box), x:x + rng.integers(box // 4, box)] = 1
  labels = rng.integers(0, K, (B, N)).astype(np.int32)
  valid = np.arange(N)[None] < np.asarray(NUM_REAL)[:, None]

  loss_config = common.loss_config()
  if points:
    loss_config.num_points = points
  loss_config = criterion.LossConfig.from_config(loss_config)
  outputs = {'pred_masks': sets[-1][0], 'pred_logits': sets[-1][1],
             'aux_outputs': [{'pred_masks': m, 'pred_logits': l} for m, l in sets[:-1]]}
  outputs = jax.tree.map(jnp.asarray, outputs)
  targets = {'labels': jnp.asarray(labels), 'masks': jnp.asarray(masks),
             'valid': jnp.asarray(valid)}
  step = jax.jit(jax.value_and_grad(
      lambda o, k: criterion.set_criterion(o, targets, k, loss_config)[0]))
  ours = median_time(lambda: jax.block_until_ready(step(outputs, jax.random.key(0))), repeats)

  hf_config = transformers.Mask2FormerConfig(num_labels=K)
  if points:
    hf_config.train_num_points = points
  hf_loss = modeling_mask2former.Mask2FormerLoss(hf_config, weight_dict={})
  torch_sets = [(torch.tensor(m, requires_grad=True), torch.tensor(l, requires_grad=True))
                for m, l in sets]
  mask_labels = [torch.from_numpy(masks[b, :NUM_REAL[b]].astype(np.float32)) for b in range(B)]
  class_labels = [torch.from_numpy(labels[b, :NUM_REAL[b]].astype(np.int64)) for b in range(B)]
  weights = {'loss_cross_entropy': 2.0, 'loss_mask': 5.0, 'loss_dice': 5.0}

  def hf_step():
    aux = [{'masks_queries_logits': m, 'class_queries_logits': l} for m, l in torch_sets[:-1]]
    losses = hf_loss(torch_sets[-1][0], torch_sets[-1][1], mask_labels, class_labels,
                     auxiliary_predictions=aux)
    total = sum(weights[name.rsplit('_', 1)[0] if name not in weights else name] * value
                for name, value in losses.items())
    total.backward()

  ref = median_time(hf_step, repeats)
  print(f'ours (jit, loss+grad, {NUM_SETS} sets): {ours * 1e3:.1f} ms')
  print(f'HF Mask2FormerLoss forward+backward:    {ref * 1e3:.1f} ms '
        f'(torch threads: {torch.get_num_threads()})')
  name = 'set_criterion_loss_and_grad' + ('_dry_run' if args.dry_run else '')
  print(result_line(name, ours, ref))


if __name__ == '__main__':
  # Keep freed memory mapped on CPU (minvis_jax/host_memory.py); PyTorch in this process too.
  host_memory.reexec_keeping_freed_memory()
  main()
