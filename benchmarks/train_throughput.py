r"""Training throughput (images/s) on 1 host device vs. all host devices.

  python benchmarks/train_throughput.py                       # default config
  python benchmarks/train_throughput.py --config configs/cifar10_resnet20.py \
      --config.batch_size=64 --seconds 20

Each measurement runs in its own subprocess (the XLA CPU device count is fixed
when JAX starts): the config's model and optimizer, the jitted, sharded
`cos_jax.training.train_step` on a synthetic global batch of
`config.batch_size` images (the input pipeline is not included), timed after
compilation and a warm-up. Prints both rates and their ratio. Other processes
on the machine slow it down: compare runs made under the same load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(ROOT, 'configs', 'default.py'),
    'Training config whose model / batch size / optimizer are measured.')
_SECONDS = flags.DEFINE_float('seconds', 15.0, 'Timed seconds per setting.')
_DEVICES = flags.DEFINE_list(
    'devices', None, 'Host device counts to compare (default: 1 and the '
    'number of cores).')
_WORKER = flags.DEFINE_integer(
    'worker', None, 'Internal: measure in this process with N host devices.')


def measure(config, seconds: float) -> dict:
  """Images/s of the sharded train step on synthetic data (this process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from cos_jax import data, runtime, train_config, training  # pylint: disable=g-import-not-at-top

  info = data.dataset_info(config.dataset)
  train_config.validate_config(config)
  train_config.check_devices(config)
  model = train_config.create_model(config, info.num_classes)
  mesh = runtime.make_mesh()
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  tx = training.create_optimizer(config, steps_per_epoch=1000)
  state = jax.jit(lambda key: training.create_train_state(
      model, key, info.image_shape, tx))(jax.random.key(0, impl='rbg'))
  state = jax.device_put(state, replicated)
  step = jax.jit(training.train_step, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.standard_normal((config.batch_size,) + info.image_shape,
                                   np.float32),
      'label': rng.integers(0, info.num_classes, config.batch_size, np.int32)}
  batch = jax.device_put(batch, sharded)
  t = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - t
  for _ in range(3):  # warm-up
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  steps, cpu, t = 0, time.process_time(), time.perf_counter()
  while time.perf_counter() - t < seconds:
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    steps += 1
  wall = time.perf_counter() - t
  cpu = time.process_time() - cpu
  return {'devices': jax.device_count(), 'batch_size': config.batch_size,
          'steps': steps, 'images_per_second': steps * config.batch_size / wall,
          'cpu_utilisation': cpu / wall, 'compile_seconds': compile_seconds}


def main(argv):
  del argv
  from cos_jax import runtime  # pylint: disable=g-import-not-at-top
  if _WORKER.value is not None:
    runtime.use_all_host_cores(_WORKER.value)
    print('RESULT ' + json.dumps(measure(_CONFIG.value, _SECONDS.value)))
    return
  counts = [int(c) for c in (_DEVICES.value or ['1', str(runtime.usable_cores())])]
  overrides = [a for a in sys.argv[1:] if a.startswith('--config')]
  c = _CONFIG.value
  print(f'{c.model} (L={c.levels}, {dict(c.model_kwargs)}) on {c.dataset}-sized '
        f'inputs, global batch {c.batch_size}, {runtime.usable_cores()} cores, '
        f'{_SECONDS.value:.0f} s per setting')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  rates = {}
  for n in counts:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f'--worker={n}',
         f'--seconds={_SECONDS.value}', *overrides],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      sys.exit(f'worker with {n} devices failed:\n{proc.stderr[-3000:]}')
    result = json.loads(lines[-1][len('RESULT '):])
    rates[n] = result['images_per_second']
    print(f'{n:3d} host device(s): {result["images_per_second"]:8.1f} images/s '
          f'(CPU use {result["cpu_utilisation"]:.2f} cores, compile '
          f'{result["compile_seconds"]:.1f} s, {result["steps"]} steps)',
          flush=True)
  if len(counts) >= 2:
    a, b = counts[0], counts[-1]
    print(f'ratio {b} vs {a} device(s): {rates[b] / rates[a]:.2f}x')


if __name__ == '__main__':
  app.run(main)
