#!/usr/bin/env bash
# One command for an accelerator machine: ours (JAX on its default device) against HF transformers
# PyTorch on CUDA with the same weights, nothing downloaded (random weights, generated inputs).
# Prints RESULT lines (JSON) for
#   the R50 forward (384x384, batch 1),
#   the R50 train step (384x384, batch 2) in float32 and in bfloat16 compute, with model FLOP
#     utilisation against the measured matmul peak and the device's nominal (data-sheet) peak,
#   MinVIS video inference of a generated 30-frame 720p video at short side 360.
# About 5 minutes on one H100 (mostly compilation and building the HF model).
#
#   bash benchmarks/device.sh            # needs a GPU visible to both JAX and PyTorch
#   bash benchmarks/device.sh --dry-run  # the same code on CPU with tiny shapes (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX and PyTorch share the GPU in one process: JAX must not grab 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export HF_HUB_OFFLINE=1  # nothing is downloaded; fail rather than try
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1; export JAX_PLATFORMS=cpu ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
export DRY_RUN
# python -c (not stdin) so that the program can re-execute itself with glibc's malloc tunables on
# CPU (the dry run; see minvis_jax/host_memory.py).
PROGRAM=$(cat <<'PY'
import os
import sys
import time

from minvis_jax import host_memory

host_memory.reexec_keeping_freed_memory()
sys.path.insert(0, 'benchmarks')
import jax  # noqa: E402
import torch  # noqa: E402

import forward  # noqa: E402
import train_step  # noqa: E402
import video  # noqa: E402

start = time.perf_counter()
if os.environ['DRY_RUN'] == '1':
  dev = 'cpu'
  # Each script's own dry run: the tiny model at 64x64 (video: 4 frames of 72x128), one repeat.
  fwd = step = vid = ['--dry-run']
else:
  gpus = [d for d in jax.devices() if d.platform == 'gpu']
  if not gpus or not torch.cuda.is_available():
    sys.exit(f'device.sh: needs a GPU for JAX (got {jax.devices()}) and for PyTorch '
             f'(torch.cuda.is_available() = {torch.cuda.is_available()}); try --dry-run')
  dev = 'cuda'
  # XLA computes float32 dots and convolutions with TF32 on these GPUs by default; let PyTorch
  # do the same (its convolutions already do), so float32 compares like with like.
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  print(f'JAX {jax.__version__} on {gpus[0].device_kind}; torch {torch.__version__} on '
        f'{torch.cuda.get_device_name()}', flush=True)
  fwd = ['--repeats', '20']
  step = ['--repeats', '10']
  vid = ['--window', '10', '--repeats', '3']
for args in ([*fwd], [*fwd, '--dtype', 'bfloat16']):
  forward.main(args + ['--torch_device', dev])
for dtype in ('float32', 'bfloat16'):
  train_step.main(step + ['--dtype', dtype, '--torch_device', dev])
video.main(vid + ['--torch_device', dev])
print(f'device.sh: done in {time.perf_counter() - start:.0f} s', flush=True)
PY
)
exec python -c "$PROGRAM"
