r"""cos_jax.calibrate + simulate on a global batch, in one process or several.

The library path of a pod slice: every process holds its rows of the batch,
``jax.make_array_from_process_local_data`` assembles the global array, and
the same jitted calls run on the global mesh. Process 0 writes v0 and the
outputs (gathered) to --out as .npz, so runs over different process layouts
can be compared:

  python benchmarks/global_calibration.py --host_devices 4 --out one.npz
  python -m cos_jax.launch --processes 2 --devices_per_process 2 -- \
      benchmarks/global_calibration.py --out two.npz
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from cos_jax import cli  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', None, 'Where process 0 writes the .npz.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Global batch.')
_RHO = flags.DEFINE_integer('rho', 4, 'Probe steps.')
_T = flags.DEFINE_integer('T', 6, 'Simulated steps.')
_HOST_DEVICES = flags.DEFINE_integer('host_devices', 0, 'XLA CPU devices per '
                                     'process (0 = one per core).')
_PROCESS_FLAGS = cli.define_process_flags()


def main(argv):
  del argv
  cli.start(_HOST_DEVICES.value, _PROCESS_FLAGS)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import cos_jax  # pylint: disable=g-import-not-at-top
  from cos_jax import runtime  # pylint: disable=g-import-not-at-top

  model = cos_jax.models.get('small', num_classes=10, levels=4,
                             stages=((8,), (16,)), hidden=32,
                             threshold_init=2.0)
  images = np.random.default_rng(0).normal(
      size=(_BATCH.value, 28, 28, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), images[:1])
  replicated, batch_sharding = runtime.shardings(runtime.make_mesh())
  rows = _BATCH.value // jax.process_count()
  local = images[jax.process_index() * rows:(jax.process_index() + 1) * rows]
  global_images = runtime.to_global(local, batch_sharding)
  variables = runtime.to_global(jax.device_get(variables), replicated)
  v0 = cos_jax.calibrate(model, variables, global_images, rho=_RHO.value)
  outputs = cos_jax.simulate(model, variables, global_images, v0,
                             T=_T.value)
  flat_v0 = {jax.tree_util.keystr(path): leaf for path, leaf in
             jax.tree_util.tree_flatten_with_path(v0)[0]}
  gathered = multihost_utils.process_allgather(
      {'outputs': outputs, **flat_v0}, tiled=True)
  if jax.process_index() == 0:
    np.savez(_OUT.value, **jax.device_get(gathered))
    print(f'{jax.process_count()} process(es) x {jax.local_device_count()} '
          f'devices: wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('global_calibration.py'))
