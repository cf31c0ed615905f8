"""Data-sheet figures of the TPU chips `minvis-jax plan` plans for (per chip, one direction where a
link is meant), and the rooflines computed from them.

Sources (Cloud TPU system architecture pages, read 2026-12):
  v4:  https://cloud.google.com/tpu/docs/v4   (275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s);
       ICI 2400 Gbps from the v5p launch comparison (https://cloud.google.com/tpu/docs/v5p).
  v5e: https://cloud.google.com/tpu/docs/v5e  (197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s,
       ICI 1600 Gbps = 400 GB/s bidirectional).
  v5p: https://cloud.google.com/tpu/docs/v5p  (459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s,
       ICI 4800 Gbps).
  v6e: https://cloud.google.com/tpu/docs/v6e  (918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s,
       ICI 800 GB/s bidirectional).
"""

import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str              # the topology prefix: v5e in 'v5e:4x4'
  peak_flops: float      # bf16 dense FLOP/s
  hbm_bytes: int         # HBM capacity
  hbm_bandwidth: float   # bytes/s
  ici_bandwidth: float   # bytes/s out of one chip, one direction (all links)
  source: str


CHIPS = {c.name: c for c in (
    Chip('v4', 275e12, 32 * GIB, 1200e9, 2400e9 / 8, 'https://cloud.google.com/tpu/docs/v4'),
    Chip('v5e', 197e12, 16 * GIB, 819e9, 1600e9 / 8, 'https://cloud.google.com/tpu/docs/v5e'),
    Chip('v5p', 459e12, 95 * 10 ** 9, 2765e9, 4800e9 / 8, 'https://cloud.google.com/tpu/docs/v5p'),
    Chip('v6e', 918e12, 32 * 10 ** 9, 1638e9, 800e9 / 2, 'https://cloud.google.com/tpu/docs/v6e'),
)}


def chip_of(topology: str) -> Chip:
  """'v5e:4x4' -> the v5e row; ValueError naming the known chips otherwise."""
  name = topology.partition(':')[0]
  if name not in CHIPS:
    raise ValueError(f'--topology {topology!r}: unknown chip {name!r}; expected one of '
                     f'{sorted(CHIPS)} followed by :AxB[xC] (e.g. v5e:4x4)')
  return CHIPS[name]


def roofline(chip: Chip, flops: float, hbm_bytes: float, collective_bytes: float) -> dict:
  """Lower bounds of one step's time on `chip` (seconds) from its per-chip work: compute at peak,
  HBM traffic at full bandwidth, collectives at full ICI bandwidth; the bound is the largest."""
  times = {'compute_s': flops / chip.peak_flops, 'hbm_s': hbm_bytes / chip.hbm_bandwidth,
           'ici_s': collective_bytes / chip.ici_bandwidth}
  bound = max(times.values())
  limit = max(times, key=times.get).removesuffix('_s')
  return dict(times, step_s=bound, limited_by=limit)
