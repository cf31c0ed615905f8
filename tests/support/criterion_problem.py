"""A random set-criterion problem (predictions with aux sets, padded targets) and its loss config,
shared by the criterion tests and the HF comparison."""

import numpy as np

from minvis_jax import criterion

B, Q, K, N, H, W = 3, 10, 6, 5, 32, 48
NUM_VALID = (3, 5, 1)  # real instances per image (N = 5 slots)
NUM_AUX = 2


def loss_config(num_points: int = 96) -> criterion.LossConfig:
  """Mask2Former's loss weights and point sampling with `num_points` points."""
  return criterion.LossConfig(class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
                              no_object_weight=0.1, num_points=num_points, oversample_ratio=3.0,
                              importance_sample_ratio=0.75)


def problem(seed: int = 0, num_valid=NUM_VALID) -> tuple[dict, dict]:
  """Random predictions (final + NUM_AUX aux sets) and padded targets.

  Returns:
    outputs: 'pred_logits' [B, Q, K+1], 'pred_masks' [B, Q, H/4, W/4] and 'aux_outputs' (NUM_AUX
      such dicts); targets: 'labels' int32 [B, N], 'masks' uint8 [B, N, H, W], 'valid' bool [B, N].
  """
  rng = np.random.default_rng(seed)
  sets = [{'pred_logits': rng.normal(size=(B, Q, K + 1)).astype(np.float32) * 2.0,
           'pred_masks': rng.normal(size=(B, Q, H // 4, W // 4)).astype(np.float32) * 3.0}
          for _ in range(NUM_AUX + 1)]
  labels = rng.integers(0, K, size=(B, N)).astype(np.int32)
  # Blobby target masks: a random rectangle per instance.
  masks = np.zeros((B, N, H, W), np.uint8)
  for b in range(B):
    for n in range(N):
      y0, x0 = rng.integers(0, H - 8), rng.integers(0, W - 8)
      masks[b, n, y0:y0 + rng.integers(4, H - y0), x0:x0 + rng.integers(4, W - x0)] = 1
  valid = np.arange(N)[None, :] < np.asarray(num_valid)[:, None]
  masks = masks * valid[..., None, None]
  labels = labels * valid
  outputs = dict(sets[-1], aux_outputs=sets[:-1])
  targets = {'labels': labels, 'masks': masks, 'valid': valid}
  return outputs, targets
