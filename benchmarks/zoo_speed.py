r"""Zoo speed and memory, each figure a ratio measured in the same run.

For every selected model (CIFAR 32x32 and ImageNet 224x224 layouts):

* the machine's limit: a large float32 matmul's GFLOP/s, on all devices
  (rows sharded) and on one; the faster of the two is the limit;
* the ANN forward's GFLOP/s and its fraction of that limit. FLOPs are counted
  analytically from the jaxpr of the model with ``conv_impl='lax'``: 2 x the
  multiply-adds of every convolution (padded taps included, as usual MAC
  tables count them) and every dot; element-wise work is not counted;
* the ANN with every conv on ``lax.conv_general_dilated`` (``conv_impl='lax'``,
  the state before :mod:`cos_jax.conv`) against the default per-shape choice;
* ``SNN / (max(ρ,T) x ANN)`` for fused COS (``cos_jax.evaluate_snn``) and for
  ``calibrate`` + ``simulate`` (whose floor is ``(ρ+T)/max(ρ,T)``);
* fused COS of the same network through ``cos_jax.trace``
  (``trace_zoo_model``: the zoo's forward with each slot read as
  ``jax.nn.relu``) against the zoo path, in time and in memory per image;
* on a CPU host, 1 host device against all of them: the 1-device run is a
  subprocess (the XLA CPU device count is fixed when JAX starts). On a GPU or
  TPU the comparison is skipped (host devices do not run the models there);
* memory, from XLA's compiled memory analysis (compiled, never run): fused
  COS with ρ, T and time chunks of the ImageNet configuration on one device,
  bytes per image (the slope between two batch sizes) and the largest batch
  that fits a device of ``--device_gib``; and the extra memory of calibration
  over ``simulate`` for several ρ at fixed T (it should not grow with ρ).

``--layer_table MODELS`` also times every distinct conv layer shape of those
models at the SNN batch, lax against the matmul form, with the form
:mod:`cos_jax.conv` chooses (the evidence for its rules).

Timings alternate the compared functions in one process and report medians;
other processes on the machine slow every figure down (load averages are
printed at the start and the end).

  python benchmarks/zoo_speed.py
  python benchmarks/zoo_speed.py --models vgg16 --batch 128 --memory_models=
  python benchmarks/zoo_speed.py --models= --memory_models= \
      --layer_table resnet20,vgg16,resnet18
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # pylint: disable=g-import-not-at-top


class ModelSpec(NamedTuple):
  arch: str
  kwargs: dict
  image_shape: tuple[int, int, int]
  batch: int  # default global batch of the speed runs


MODELS = {
    'resnet20': ModelSpec('resnet20', {}, (32, 32, 3), 64),
    'vgg16': ModelSpec('vgg16', {}, (32, 32, 3), 32),
    'resnet18': ModelSpec('resnet18', {}, (32, 32, 3), 16),
    'resnet34': ModelSpec('resnet34', {}, (32, 32, 3), 16),
    'resnet34_imagenet': ModelSpec('resnet34', {'stem': 'imagenet'},
                                   (224, 224, 3), 2),
    'vgg16_imagenet': ModelSpec('vgg16', {}, (224, 224, 3), 2),
}

flags.DEFINE_list('models', ['resnet20', 'vgg16', 'resnet18', 'resnet34',
                             'resnet34_imagenet'],
                  f'Models timed, of: {", ".join(MODELS)}.')
flags.DEFINE_integer('batch', 0, 'Global batch of every timed model (0: each '
                     "model's default: ResNet-20 64, VGG-16 32, ResNet-18/34 "
                     '16 on CIFAR, 2 on ImageNet).')
flags.DEFINE_integer('rho', 4, 'Probe steps of the timed SNN runs.')
flags.DEFINE_integer('T', 8, 'Simulation steps of the timed SNN runs.')
flags.DEFINE_integer('levels', 4, 'QCFS levels.')
flags.DEFINE_integer('repeats', 3, 'Timed repetitions of each function.')
flags.DEFINE_list('single_device_models', ['resnet20', 'vgg16'],
                  'Models also timed on 1 host device (CPU only; empty: none).')
flags.DEFINE_integer('matmul_size', 0, 'Side of the per-device square '
                     'matmul that measures the machine limit (0: 2048 on '
                     'CPU, 8192 on accelerators).')
flags.DEFINE_list('memory_models', ['resnet34_imagenet', 'vgg16_imagenet'],
                  'Models whose memory is analysed (empty: none).')
flags.DEFINE_integer('memory_rho', 8, 'ρ of the memory analysis.')
flags.DEFINE_integer('memory_T', 32, 'T of the memory analysis.')
flags.DEFINE_integer('memory_time_chunk', 8, 'time_chunk of the memory '
                     'analysis.')
flags.DEFINE_list('memory_batches', ['1', '2'], 'Two per-device batches; '
                  'bytes per image is the slope between them.')
flags.DEFINE_list('memory_rhos', ['1', '2', '4', '8'], 'ρ values of the '
                  'calibration-memory sweep (first memory model only).')
flags.DEFINE_float('device_gib', 16.0, 'Device memory for the largest-batch '
                   'figure (16: one TPU v3 core, a T4).')
flags.DEFINE_list('layer_table', [], 'Models whose distinct conv shapes are '
                  'each timed, lax vs the matmul form (empty: none).')
flags.DEFINE_integer('worker', None, 'Internal: time the models in this '
                     'process with N host devices and print JSON.')
FLAGS = flags.FLAGS


_START = time.perf_counter()


def load() -> str:
  return 'load average %.2f %.2f %.2f' % os.getloadavg()


def progress(what: str):
  print(f'  [{time.perf_counter() - _START:5.0f} s] {what} ({load()})',
        file=sys.stderr, flush=True)


def median_seconds(fns: dict, args: tuple, repeats: int,
                   cpu: dict | None = None) -> dict:
  """Median wall time of each ``fn(*args)``; runs alternate between fns.

  If ``cpu`` is a dict, it receives each fn's median process CPU time (all
  threads): CPU / wall is the number of cores a run kept busy.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  cpu_times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
      cpu_times[name].append(time.process_time() - start_cpu)
  if cpu is not None:
    cpu.update({name: statistics.median(t) for name, t in cpu_times.items()})
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_side() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return FLAGS.matmul_size or (2048 if jax.default_backend() == 'cpu'
                               else 8192)


def matmul_gflops() -> dict:
  """GFLOP/s of float32 matmuls, timed in alternation: ``'all'``, an
  [n·d, n] x [n, n] product over all d devices, rows sharded (n³ per device,
  n = matmul_side()), and ``'one'``, n³ on one device."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from cos_jax import runtime  # pylint: disable=g-import-not-at-top
  size, gflops = matmul_side(), {}
  for name, devices in (('all', jax.devices()), ('one', jax.devices()[:1])):
    mesh = runtime.make_mesh(devices)
    a = jax.device_put(
        jax.random.normal(jax.random.key(0), (size * len(devices), size)),
        NamedSharding(mesh, P(runtime.DATA_AXIS)))
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size)),
                       NamedSharding(mesh, P()))
    gflops[name] = (jax.jit(lambda a, b: a @ b), (a, b), 2 * size**3 * len(
        devices) / 1e9)
  seconds = median_seconds(
      {name: lambda _, f=f, args=args: f(*args)
       for name, (f, args, _) in gflops.items()}, (None,),
      max(FLAGS.repeats, 5))
  return {name: work / seconds[name]
          for name, (_, _, work) in gflops.items()}


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if hasattr(item, 'eqns'):
        yield item
      elif hasattr(getattr(item, 'jaxpr', None), 'eqns'):
        yield item.jaxpr


def conv_and_dot_eqns(jaxpr):
  """Every conv_general_dilated / dot_general equation, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
      yield eqn
    for sub in _sub_jaxprs(eqn):
      yield from conv_and_dot_eqns(sub)


def eqn_flops(eqn) -> int:
  """2 x multiply-adds of a conv (padded taps included) or dot equation."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = int(np.prod(eqn.outvars[0].aval.shape))
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  if eqn.primitive.name == 'dot_general':
    (contracting, _), _ = eqn.params['dimension_numbers']
    return 2 * out * int(np.prod([lhs[d] for d in contracting]))
  out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
  return 2 * out * int(np.prod(rhs)) // out_features


def build(name: str, batch: int, conv_impl: str = 'auto'):
  """(model, abstract variables, image shape-dtype) of a MODELS entry."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import cos_jax  # pylint: disable=g-import-not-at-top
  spec = MODELS[name]
  model = cos_jax.models.get(spec.arch, num_classes=10, levels=FLAGS.levels,
                             threshold_init=2.0, conv_impl=conv_impl,
                             **spec.kwargs)
  images = jax.ShapeDtypeStruct((batch,) + spec.image_shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return model, variables, images


def ann_flops(name: str, batch: int) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  model, variables, images = build(name, batch, 'lax')
  jaxpr = jax.make_jaxpr(model.apply)(variables, images).jaxpr
  return sum(eqn_flops(e) for e in conv_and_dot_eqns(jaxpr))


def time_model(name: str, batch: int) -> dict:
  """Seconds of the ANN (auto and lax convs), fused COS, calibrate+simulate."""
  import jax  # pylint: disable=g-import-not-at-top
  from cos_jax import runtime  # pylint: disable=g-import-not-at-top
  import cos_jax  # pylint: disable=g-import-not-at-top
  from cos_jax.zoo_trace import trace_zoo_model  # pylint: disable=g-import-not-at-top
  replicated, sharded = runtime.shardings(runtime.make_mesh())
  model, _, images = build(name, batch)
  images = jax.device_put(
      jax.random.normal(jax.random.key(0), images.shape), sharded)
  variables = jax.device_put(
      jax.jit(model.init)(jax.random.key(1), images[:1]), replicated)
  lax_model = model.clone(conv_impl='lax')
  rho, T = FLAGS.rho, FLAGS.T
  cpu = {}
  ann = median_seconds({
      'ann': jax.jit(model.apply),
      'ann_lax': jax.jit(lax_model.apply)}, (variables, images),
                       FLAGS.repeats, cpu)
  traced, traced_vars = trace_zoo_model(model, variables, images)
  snn = median_seconds({
      'cos': lambda v, x: cos_jax.evaluate_snn(
          model, v, x, T=T, rho=rho).outputs,
      'cos_traced': lambda v, x: cos_jax.evaluate_snn(
          traced, traced_vars, x, T=T, rho=rho).outputs,
      'calibrate_simulate': lambda v, x: cos_jax.simulate(
          model, v, x, cos_jax.calibrate(model, v, x, rho=rho), T=T)},
                       (variables, images), FLAGS.repeats, cpu)
  return {**ann, **snn, 'cpu': cpu}


def measure(names: list[str]) -> dict:
  """This process's figures: matmul limit and every model's seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  result = {'devices': jax.device_count(), 'platform': jax.default_backend(),
            'matmul_gflops': matmul_gflops(),
            'models': {}}
  for name in names:
    # A batch that splits evenly over the devices (the default, rounded up).
    batch = -(-(FLAGS.batch or MODELS[name].batch) // jax.device_count())
    batch *= jax.device_count()
    result['models'][name] = {'batch': batch, **time_model(name, batch)}
    progress(f'timed {name} on {jax.device_count()} device(s)')
  return result


def single_device_run(names: list[str]) -> dict:
  """:func:`measure` in a subprocess with one XLA host device."""
  passed = [a for a in sys.argv[1:] if not a.startswith(('--models',
                                                         '--worker'))]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--worker=1',
       f'--models={",".join(names)}', *passed],
      capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    sys.exit(f'1-device worker failed:\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def report_speed(result: dict, single: dict | None):
  matmul = result['matmul_gflops']
  # One XLA CPU device may already use every core for a dot: the limit is
  # the faster of the two.
  limit = max(matmul.values())
  steps = max(FLAGS.rho, FLAGS.T)
  print(f'\nmachine limit: float32 matmul {matmul["all"]:.0f} GFLOP/s on '
        f'{result["devices"]} device(s), {matmul["one"]:.0f} GFLOP/s on one '
        f'({matmul_side()}^3 per device); limit = {limit:.0f} GFLOP/s')
  print(f'SNN runs: rho={FLAGS.rho} T={FLAGS.T}; ratios are to '
        f'max(rho,T)={steps} ANN forwards (calibrate+simulate floor: '
        f'{(FLAGS.rho + FLAGS.T) / steps:.2f})')
  header = ('model', 'batch', 'GFLOP/img', 'ANN ms', 'GFLOP/s', '% limit',
            'lax ANN ms', 'lax/auto', 'COS ms', 'COS ratio', 'traced COS',
            'traced/zoo', 'cal+sim ms', 'cal+sim ratio')
  print(' '.join(f'{h:>13}' for h in header))
  for name, m in result['models'].items():
    flops = ann_flops(name, m['batch'])
    gflops = flops / m['ann'] / 1e9
    row = (name, m['batch'], f'{flops / m["batch"] / 1e9:.3f}',
           f'{m["ann"] * 1e3:.1f}', f'{gflops:.0f}',
           f'{100 * gflops / limit:.0f}%', f'{m["ann_lax"] * 1e3:.1f}',
           f'{m["ann_lax"] / m["ann"]:.2f}x', f'{m["cos"] * 1e3:.1f}',
           f'{m["cos"] / (steps * m["ann"]):.2f}',
           f'{m["cos_traced"] * 1e3:.1f}',
           f'{m["cos_traced"] / m["cos"]:.2f}x',
           f'{m["calibrate_simulate"] * 1e3:.1f}',
           f'{m["calibrate_simulate"] / (steps * m["ann"]):.2f}')
    print(' '.join(f'{str(c):>13}' for c in row))
  if not single:
    return
  n = result['devices']
  print(f'\n1 host device vs {n} (speed-up = 1-device time / {n}-device '
        f'time); matmul {single["matmul_gflops"]["all"]:.0f} vs '
        f'{matmul["all"]:.0f} GFLOP/s = '
        f'{matmul["all"] / single["matmul_gflops"]["all"]:.2f}x')
  print('  (CPU: process CPU-ms per image, all threads; cores: CPU / wall. '
        'Speed-up = CPU-work ratio x busy-core ratio, and the second factor '
        'is at most cores / (cores the 1-device run keeps busy))')
  for name, one in single['models'].items():
    many = result['models'][name]
    for k in ('ann', 'cos'):
      wall = [m[k] / m['batch'] for m in (one, many)]
      cpu = [m['cpu'][k] / m['batch'] for m in (one, many)]
      print(f'  {name:18s} {k:4s} {wall[0] * 1e3:7.2f} vs {wall[1] * 1e3:7.2f} '
            f'ms/image ({wall[0] / wall[1]:.2f}x); CPU {cpu[0] * 1e3:7.2f} vs '
            f'{cpu[1] * 1e3:7.2f} ms/image ({cpu[0] / cpu[1]:.2f}x), cores '
            f'{cpu[0] / wall[0]:.2f} vs {cpu[1] / wall[1]:.2f}')


def layer_table(names: list[str]):
  """Times each distinct conv shape of ``names``: lax vs the matmul form."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from cos_jax import conv, runtime  # pylint: disable=g-import-not-at-top
  replicated, sharded = runtime.shardings(runtime.make_mesh())
  print(f'\nconv layers at the SNN batch (B x max(rho,T)), lax vs matmul '
        f'form, {jax.device_count()} device(s):')
  seen = set()
  for name in names:
    batch = (FLAGS.batch or MODELS[name].batch) * max(FLAGS.rho, FLAGS.T)
    model, variables, images = build(name, batch, 'lax')
    jaxpr = jax.make_jaxpr(model.apply)(variables, images).jaxpr
    for eqn in conv_and_dot_eqns(jaxpr):
      if eqn.primitive.name != 'conv_general_dilated':
        continue
      lhs, rhs = (v.aval for v in eqn.invars[:2])
      p = eqn.params
      geometry = conv.geometry_of(
          lhs.shape, rhs.shape, p['window_strides'], p['padding'],
          p['lhs_dilation'], p['rhs_dilation'], p['dimension_numbers'],
          p['feature_group_count'], p['batch_group_count'])
      if (lhs.shape, geometry) in seen or geometry is None:
        continue
      seen.add((lhs.shape, geometry))
      x = jax.device_put(jax.random.normal(jax.random.key(0), lhs.shape),
                         sharded)
      w = jax.device_put(jax.random.normal(jax.random.key(1), rhs.shape),
                         replicated)
      reference = lambda x, w, p=p: lax.conv_general_dilated(
          x, w, p['window_strides'], p['padding'],
          dimension_numbers=p['dimension_numbers'])
      matmul = lambda x, w, g=geometry: conv.conv_as_matmul(x, w, g)
      s = median_seconds({'lax': jax.jit(reference),
                          'matmul': jax.jit(matmul)}, (x, w), FLAGS.repeats)
      (h, _), (k, _) = geometry.in_spatial, geometry.kernel_spatial
      print(f'  {name:18s} N={lhs.shape[0]:<5d} {h:3d}px k{k} '
            f's{geometry.strides[0]} {geometry.in_features:4d}->'
            f'{geometry.out_features:<4d} lax {s["lax"] * 1e3:8.2f} ms  '
            f'matmul {s["matmul"] * 1e3:8.2f} ms  lax/matmul '
            f'{s["lax"] / s["matmul"]:6.2f}  chosen: '
            f'{conv.choose(geometry, "cpu")}', flush=True)


def compiled_bytes(fn, *args) -> dict:
  """XLA's memory analysis of ``jit(fn)`` on one device (compiled only)."""
  import jax  # pylint: disable=g-import-not-at-top
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return {'temp': analysis.temp_size_in_bytes,
          'total': (analysis.temp_size_in_bytes
                    + analysis.argument_size_in_bytes
                    + analysis.output_size_in_bytes
                    - analysis.alias_size_in_bytes)}


def report_memory(names: list[str]):
  import cos_jax  # pylint: disable=g-import-not-at-top
  from cos_jax.zoo_trace import trace_zoo_model  # pylint: disable=g-import-not-at-top
  rho, T, chunk = FLAGS.memory_rho, FLAGS.memory_T, FLAGS.memory_time_chunk
  b1, b2 = (int(b) for b in FLAGS.memory_batches)
  gib, mib, budget = 2**30, 2**20, FLAGS.device_gib * 2**30
  cache = {}

  def cos_bytes(name, batch, probe_steps, traced=False):
    key = (name, batch, probe_steps, traced)
    if key not in cache:
      model, variables, images = build(name, batch)
      if traced:  # the same network through cos_jax.trace
        model, variables = trace_zoo_model(model, variables, images)
      cache[key] = compiled_bytes(
          lambda v, x: cos_jax.evaluate_snn(
              model, v, x, T=T, rho=probe_steps, time_chunk=chunk).outputs,
          variables, images)
    return cache[key]

  print(f'\nmemory (XLA compiled memory analysis, one device, compiled '
        f'only): fused COS rho={rho} T={T} time_chunk={chunk}')
  for name in names:
    small, large = cos_bytes(name, b1, rho), cos_bytes(name, b2, rho)
    per_image = {k: (large[k] - small[k]) / (b2 - b1) for k in small}
    fixed = small['total'] - b1 * per_image['total']
    fits = int((budget - fixed) // per_image['total'])
    progress(f'compiled {name} at batches {b1}, {b2}')
    print(f'  {name:18s} temp {per_image["temp"] / gib:.3f} GiB/image, '
          f'all buffers {per_image["total"] / gib:.3f} GiB/image + '
          f'{fixed / gib:.3f} GiB fixed -> largest batch in '
          f'{FLAGS.device_gib:g} GiB: {fits}', flush=True)
    traced = [cos_bytes(name, b, rho, traced=True)['total'] for b in (b1, b2)]
    print(f'  {"":18s} traced: all buffers '
          f'{(traced[1] - traced[0]) / (b2 - b1) / gib:.3f} GiB/image',
          flush=True)
  name = names[0]
  model, variables, images = build(name, b1)
  base = compiled_bytes(lambda v, x: cos_jax.simulate(
      model, v, x, T=T, time_chunk=chunk), variables, images)['temp']
  print(f'  calibration memory, {name}, batch {b1}: simulate(T={T}) temp '
        f'{base / mib:.0f} MiB')
  for r in (int(r) for r in FLAGS.memory_rhos):
    temp = cos_bytes(name, b1, r)['temp']
    print(f'    fused COS rho={r:<2d} temp {temp / mib:8.0f} MiB, extra '
          f'over simulate {(temp - base) / mib:+7.0f} MiB '
          f'(x{temp / base:.3f})', flush=True)


def main(argv):
  del argv
  from cos_jax import runtime  # pylint: disable=g-import-not-at-top
  unknown = set(FLAGS.models + FLAGS.memory_models + FLAGS.layer_table
                ) - set(MODELS)
  if unknown:
    raise app.UsageError(f'unknown model(s) {sorted(unknown)}; choose from '
                         f'{", ".join(MODELS)}')
  if FLAGS.worker is not None:
    runtime.use_all_host_cores(FLAGS.worker)
    print('RESULT ' + json.dumps(measure(FLAGS.models)))
    return
  runtime.use_all_host_cores()
  import jax  # pylint: disable=g-import-not-at-top
  print(f'{jax.default_backend()}: {jax.device_count()} device(s), '
        f'{runtime.usable_cores()} cores; {load()}', flush=True)
  if FLAGS.models:
    result = measure(FLAGS.models)
    single_names = [m for m in FLAGS.single_device_models if m in FLAGS.models]
    single = None
    if single_names and jax.default_backend() == 'cpu':
      single = single_device_run(single_names)
    elif single_names:
      print('1-device comparison skipped: host devices do not run the models '
            f'on {jax.default_backend()}')
    report_speed(result, single)
  if FLAGS.layer_table:
    layer_table(FLAGS.layer_table)
  if FLAGS.memory_models:
    report_memory(FLAGS.memory_models)
  print(f'\n{load()}')


if __name__ == '__main__':
  app.run(main)
