"""Run as `python -m tests.support.tpu_programs OUT.json KEY=VALUE...` with libtpu on PYTHONPATH
and JAX_PLATFORMS=cpu: compiles the tiny train step for v5e 2x2 with jax's own API (not through
minvis_jax.plan), data parallel and FSDP, and writes what the compiler says: memory_analysis(),
the parameters' bytes and each collective opcode's count and result bytes of the HLO."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from minvis_jax import config_lib
from minvis_jax import train

_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 'pred': 1, 'u8': 1, 's8': 1}


def _collectives(text: str) -> dict:
  out = {}
  for line in text.splitlines():
    found = re.search(r' = (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|'
                      r'collective-permute)(-start)?\(', line)
    if not found:
      continue
    shape, kind, start = found.groups()
    arrays = re.findall(r'(\w+)\[([\d,]*)\]', shape)
    if start and kind != 'all-reduce':
      arrays = arrays[-1:]
    size = sum(_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(',') if d]))
               for t, dims in arrays)
    entry = out.setdefault(kind, [0, 0])
    entry[0] += 1
    entry[1] += size
  return out


def main(out_path: str, sets: list[str]) -> None:
  devices = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices
  results = {}
  for fsdp in (False, True):
    config = config_lib.apply_overrides(config_lib.load_config('tiny'), sets)
    config.mesh.fsdp = fsdp
    trainer = train.Trainer(config, train.make_mesh(config.mesh, devices))
    b, (h, w), n = config.batch_size, config.data.canvas, config.data.max_instances
    s = trainer.batch_sharding
    batch = {'image': jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=s),
             'image_size': jax.ShapeDtypeStruct((b, 2), jnp.int32, sharding=s),
             'labels': jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=s),
             'masks': jax.ShapeDtypeStruct((b, n, h, w), jnp.uint8, sharding=s),
             'valid': jax.ShapeDtypeStruct((b, n), jnp.bool_, sharding=s)}
    compiled = trainer.step.lower(trainer.abstract_state, batch).compile()
    m = compiled.memory_analysis()
    results['fsdp' if fsdp else 'dp'] = {
        'memory': {k: int(getattr(m, k)) for k in (
            'argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'alias_size_in_bytes', 'generated_code_size_in_bytes')},
        'param_bytes': int(sum(x.size * x.dtype.itemsize
                               for x in jax.tree.leaves(trainer.abstract_state.params))),
        'collectives': _collectives(compiled.as_text()),
        'platform': devices[0].platform,
    }
  with open(out_path, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
