r"""ANN forward vs fused COS SNN: time, the dense-simulation ratio, and memory.

The time-folded SNN runs every linear layer once on ``max(ρ, T)·B`` inputs (the
probe reuses currents computed anyway), so its floor is ``max(ρ, T)`` ANN
forwards; the reported ratio ``SNN / (max(ρ, T) × ANN)`` says how much the
neuron scans and calibration add on top of that. Timings alternate ANN and SNN
runs in one process (this machine is noisy) and report medians.

Memory comes from XLA's compiled memory analysis (temporary buffers): the
extra memory of calibration is ``fused COS(ρ, T) - simulate(T)`` for several
ρ ≤ T; it should be O(neurons × batch) and not grow with ρ.

Time chunks: ``simulate(T=--chunk_T)`` run as one time-folded block and in
chunks of each ``--time_chunks`` size (membrane potentials carried between
chunks; identical spikes), timed in alternation, with their compiled temp
memory, as ratios to the one-block run.

  python benchmarks/snn_speed.py --model small --batch 256 --rho 8 --T 8
  python benchmarks/snn_speed.py --batch 64 --chunk_T 32 --time_chunks none,4,8,16
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

flags.DEFINE_string('model', 'small', 'Zoo architecture.')
flags.DEFINE_integer('batch', 256, 'Global batch (sharded over devices).')
flags.DEFINE_integer('rho', 8, 'Probe steps.')
flags.DEFINE_integer('T', 8, 'Simulation steps.')
flags.DEFINE_integer('levels', 4, 'QCFS levels.')
flags.DEFINE_integer('repeats', 7, 'Timed repetitions of each function.')
flags.DEFINE_integer('host_devices', 0, 'XLA host devices (0 = all cores).')
flags.DEFINE_integer('chunk_T', 32, 'Simulation length of the time-chunk '
                     'comparison.')
flags.DEFINE_list('time_chunks', ['none', '8'], 'Chunk sizes to compare '
                  '("none" = one block); empty to skip.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from cos_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.use_all_host_cores(FLAGS.host_devices)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import cos_jax  # pylint: disable=g-import-not-at-top

  shape = (28, 28, 1) if FLAGS.model == 'small' else (32, 32, 3)
  model = cos_jax.models.get(FLAGS.model, num_classes=10, levels=FLAGS.levels,
                             threshold_init=2.0)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  images = jax.device_put(
      jax.random.normal(jax.random.key(0), (FLAGS.batch,) + shape),
      NamedSharding(mesh, P('data')))
  variables = jax.device_put(model.init(jax.random.key(1), images[:2]),
                             NamedSharding(mesh, P()))
  rho, T = FLAGS.rho, FLAGS.T

  ann = jax.jit(lambda v, x: model.apply(v, x))
  cos = lambda v, x: cos_jax.evaluate_snn(model, v, x, T=T, rho=rho).outputs
  def median_seconds(fns):
    """Median time of each fn(variables, images), runs alternating."""
    for fn in fns.values():  # compile + warm up
      jax.block_until_ready(fn(variables, images))
    times = {name: [] for name in fns}
    for _ in range(FLAGS.repeats):
      for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(variables, images))
        times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

  seconds = median_seconds({'ann': ann, 'snn_cos': cos})
  ann_s, snn_s = seconds['ann'], seconds['snn_cos']
  steps = max(rho, T)
  print(f'devices={jax.device_count()} model={FLAGS.model} '
        f'batch={FLAGS.batch} rho={rho} T={T}')
  print(f'ANN forward      {ann_s * 1e3:9.1f} ms  '
        f'({FLAGS.batch / ann_s:,.0f} images/s)')
  print(f'SNN fused COS    {snn_s * 1e3:9.1f} ms  '
        f'({FLAGS.batch / snn_s:,.0f} images/s)')
  print(f'SNN / (max(rho,T) x ANN) = {snn_s / (steps * ann_s):.2f}')

  def temp_mib(fn):
    compiled = jax.jit(fn).lower(variables, images).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis else float('nan')

  simulate_mib = temp_mib(
      lambda v, x: cos_jax.simulate(model, v, x, T=T))
  neurons = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(
      jax.eval_shape(cos_jax.init_v0, model, variables, images)))
  print(f'\ntemp memory (per XLA, all devices): simulate(T={T}) '
        f'{simulate_mib:.1f} MiB; v0 pytree (neurons x batch x 4 B) '
        f'{neurons * 4 / 2**20:.1f} MiB')
  for probe_steps in sorted({1, 2, 4, T} & set(range(1, T + 1))):
    fused = temp_mib(lambda v, x, r=probe_steps: cos_jax.evaluate_snn(
        model, v, x, T=T, rho=r).outputs)
    print(f'  fused COS rho={probe_steps:<3d} {fused:8.1f} MiB  '
          f'extra over simulate: {fused - simulate_mib:+8.1f} MiB')

  if not FLAGS.time_chunks:
    return
  chunks = [None if c == 'none' else int(c) for c in FLAGS.time_chunks]
  long_T = FLAGS.chunk_T
  runs = {c: jax.jit(lambda v, x, c=c: cos_jax.simulate(
      model, v, x, T=long_T, time_chunk=c)) for c in chunks}
  reference = np.asarray(runs[chunks[0]](variables, images))
  for c, fn in runs.items():
    if not np.array_equal(np.asarray(fn(variables, images)), reference):
      print(f'  WARNING: time_chunk={c} output differs from the first run')
  chunk_seconds = median_seconds(runs)
  base = chunk_seconds[chunks[0]]
  print(f'\nsimulate(T={long_T}) by time chunk (ratios to '
        f'time_chunk={chunks[0]}):')
  base_mib = temp_mib(lambda v, x: cos_jax.simulate(
      model, v, x, T=long_T, time_chunk=chunks[0]))
  for c in chunks:
    t = chunk_seconds[c]
    mib = temp_mib(lambda v, x, c=c: cos_jax.simulate(
        model, v, x, T=long_T, time_chunk=c))
    print(f'  time_chunk={str(c):<5} {t * 1e3:9.1f} ms  time x{t / base:5.2f}'
          f'  temp {mib:8.1f} MiB  x{mib / base_mib:5.2f}')


if __name__ == '__main__':
  app.run(main)
