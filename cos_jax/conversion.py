"""Converting a trained QCFS ANN to an IF SNN and measuring it on a dataset.

:func:`convert_and_evaluate` is what ``convert.py`` runs: for every batch of the
split it computes the ANN's accuracy, the SNN's accuracy at every time-step for
each initialisation (COS and the comparison ones), and the per-layer offset-
spike statistics before and after calibration. :func:`write_results` turns the
result into ``results.json``, ``results.csv`` and PNG figures.

Batches are sharded over all devices (padded to a multiple of the device count
and masked), so memory is bounded by the batch size, not the split size.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import tempfile
import time
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cos_jax import analysis, neuron, snn

# Initialisations that calibrate from a ρ-step probe (reported at T) and those
# that do not (reported at T and, for a fair comparison, at T + ρ).
CALIBRATED = ('cos', 'lightweight')
METHOD_LABELS = {
    'cos': 'COS (calibrated offset spikes)',
    'half': 'QCFS baseline v0=θ/2',
    'lightweight': 'lightweight v0=v(ρ)',
    'zero': 'v0=0',
    'random': 'v0~U[0,θ)',
}


@dataclasses.dataclass(frozen=True)
class ConversionSettings:
  """What to measure (validated by :meth:`validate`)."""
  rho: int = 8
  T: int = 32
  iterations: int = 1
  schedule: str = 'layerwise'
  inits: tuple[str, ...] = ('cos', 'half', 'lightweight')
  epsilon: float = neuron.DEFAULT_EPSILON
  analysis_T: int | None = None   # None: the model's L (the paper's T = L)
  seed: int = 0
  # Steps simulated at a time (potentials carried over); None = one block.
  time_chunk: int | None = snn.DEFAULT_TIME_CHUNK

  def validate(self) -> None:
    for name in ('rho', 'T', 'iterations'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'--{name} must be a positive integer, got {value!r}')
    if self.schedule not in snn.SCHEDULES:
      raise ValueError(f'--schedule must be one of {", ".join(snn.SCHEDULES)}'
                       f', got {self.schedule!r}')
    unknown = [i for i in self.inits if i not in snn.INITS]
    if unknown or not self.inits:
      raise ValueError(f'--init takes a comma-separated subset of '
                       f'{",".join(snn.INITS)}; got {",".join(self.inits)!r}')
    if not 0 < self.epsilon < 1:
      raise ValueError(f'--epsilon is a fraction of θ in (0, 1), got '
                       f'{self.epsilon}')
    if self.analysis_T is not None and self.analysis_T < 1:
      raise ValueError(f'--analysis_T must be a positive integer, got '
                       f'{self.analysis_T}')
    if self.time_chunk is not None and self.time_chunk < 1:
      raise ValueError(f'--time_chunk must be >= 1 (0 on the command line '
                       f'for one block), got {self.time_chunk}')


def report_steps(T: int) -> list[int]:
  """1, 2, 4, ... up to T (T itself included)."""
  steps = [2**k for k in range(int(math.log2(T)) + 1)]
  return steps if steps[-1] == T else steps + [T]


def _method_steps(init: str, settings: ConversionSettings) -> int:
  return settings.T if init in CALIBRATED else settings.T + settings.rho


def _correct_per_step(outputs, labels, mask):
  """Correct predictions at each t from the running mean of outputs[:t]."""
  predictions = jnp.cumsum(outputs, axis=0).argmax(-1)   # [T, B]
  return jnp.sum((predictions == labels) * mask, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'init', 'steps', 'rho',
                                             'iterations', 'schedule',
                                             'epsilon', 'time_chunk'))
def _snn_correct(model, variables, images, labels, mask, key, *, init, steps,
                 rho, iterations, schedule, epsilon, time_chunk):
  run = snn.evaluate_snn(model, variables, images, T=steps, init=init,
                         rho=rho if init in CALIBRATED else None,
                         iterations=iterations, schedule=schedule,
                         epsilon=epsilon, key=key, time_chunk=time_chunk)
  return _correct_per_step(run.outputs, labels, mask)


@functools.partial(jax.jit, static_argnames=('model',))
def _ann_correct(model, variables, images, labels, mask):
  logits = model.apply(variables, images, train=False)
  return jnp.sum((logits.argmax(-1) == labels) * mask).astype(jnp.int32)


def _pad_to(batch: dict, size: int) -> tuple[dict, np.ndarray]:
  n = len(batch['label'])
  mask = np.zeros(size, np.float32)
  mask[:n] = 1
  if n == size:
    return batch, mask
  pad = lambda x: np.concatenate([x, np.zeros((size - n,) + x.shape[1:],
                                              x.dtype)])
  return {k: pad(np.asarray(v)) for k, v in batch.items()}, mask


def convert_and_evaluate(model, variables, batches: Iterable[dict],
                         settings: ConversionSettings, *,
                         batch_size: int, mesh: Mesh | None = None,
                         progress: Any = None) -> dict[str, Any]:
  """Runs the ANN and the SNN variants over ``batches``.

  Args:
    model, variables: a zoo model and its ``{'params', 'batch_stats'}``.
    batches: iterable of ``{'image': [b, H, W, C], 'label': [b]}`` with
      b ≤ ``batch_size`` (a short last batch is padded and masked).
    settings: see :class:`ConversionSettings`.
    batch_size: the padded batch size (a multiple of the mesh size).
    mesh: 1-D mesh with axis 'data' (default: all devices).
    progress: optional tqdm-like object with ``update(n)``.

  Returns:
    ``{'examples', 'ann_accuracy', 'curves': {init: [accuracy at t=1..]},
    'layers': {'before': per-layer stats, 'after': per-layer stats},
    'seconds': {...}}``.
  """
  settings.validate()
  mesh = mesh or Mesh(np.array(jax.devices()), ('data',))
  if batch_size % mesh.size:
    raise ValueError(f'--batch_size {batch_size} must be a multiple of the '
                     f'{mesh.size} devices')
  data_sharding = NamedSharding(mesh, P('data'))
  variables = jax.device_put(
      {k: variables[k] for k in ('params', 'batch_stats')},
      NamedSharding(mesh, P()))
  analysis_T = settings.analysis_T or model.levels
  key = jax.random.key(settings.seed)

  ann_correct = 0
  correct = {init: np.zeros(_method_steps(init, settings), np.int64)
             for init in settings.inits}
  layer_totals = {'before': None, 'after': None}
  seconds = {'ann': 0.0, **{init: 0.0 for init in settings.inits},
             'analysis': 0.0}
  examples = 0

  def timed(name, fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    seconds[name] += time.perf_counter() - start
    return out

  for batch in batches:
    n = len(batch['label'])
    batch, mask = _pad_to(batch, batch_size)
    images, labels, mask = jax.device_put(
        (batch['image'], batch['label'], mask), data_sharding)
    key, batch_key = jax.random.split(key)
    ann_correct += int(timed('ann', lambda: _ann_correct(
        model, variables, images, labels, mask)))
    for init in settings.inits:
      correct[init] += np.asarray(timed(init, lambda init=init: _snn_correct(
          model, variables, images, labels, mask, batch_key, init=init,
          steps=_method_steps(init, settings), rho=settings.rho,
          iterations=settings.iterations, schedule=settings.schedule,
          epsilon=settings.epsilon, time_chunk=settings.time_chunk)))
    # Offset spikes in the theorems' setting ρ = T = L (paper Fig. 3,
    # Table 3), before and after COS; the probe here spans the analysis
    # window, whatever --rho the accuracy runs use.
    for when, init in (('before', 'half'), ('after', 'cos')):
      stats, _ = timed('analysis', lambda init=init: analysis.layer_statistics(
          model, variables, images, T=analysis_T, init=init, rho=analysis_T,
          iterations=settings.iterations, schedule=settings.schedule,
          epsilon=settings.epsilon, mask=mask))
      layer_totals[when] = analysis.accumulate(layer_totals[when], stats)
    examples += n
    if progress is not None:
      progress.update(n)

  if not examples:
    raise ValueError('the split has no examples: check --split/--num_examples')
  return {
      'examples': examples,
      'ann_accuracy': ann_correct / examples,
      'curves': {init: (c / examples).tolist() for init, c in correct.items()},
      'layers': {when: analysis.finalize(total, analysis_T)
                 for when, total in layer_totals.items()},
      'analysis_T': analysis_T,
      'seconds': seconds,
  }


def summary_rows(result: dict, settings: ConversionSettings
                 ) -> tuple[list[str], list[list[str]]]:
  """The paper's Table-1 layout: one row per method, columns T = 1, 2, 4, …"""
  steps = report_steps(settings.T)
  header = ['method'] + [f'T={t}' for t in steps]
  pct = lambda x: f'{100 * x:.2f}%'
  rows = [['ANN (QCFS)'] + [pct(result['ann_accuracy'])] * len(steps)]
  for init in settings.inits:
    curve = result['curves'][init]
    label = METHOD_LABELS[init]
    if init in CALIBRATED:
      rows.append([f'{label}, rho={settings.rho}'] +
                  [pct(curve[t - 1]) for t in steps])
    else:
      rows.append([f'{label} at T'] + [pct(curve[t - 1]) for t in steps])
      rows.append([f'{label} at T+rho'] +
                  [pct(curve[t + settings.rho - 1]) for t in steps])
  return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in [header] + rows) for i in
            range(len(header))]
  line = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  rule = '-' * len(line(header))
  return '\n'.join([line(header), rule] + [line(r) for r in rows])


def format_layers(result: dict) -> str:
  """Per-layer Ratio / MSE / firing rate before and after calibration."""
  before, after = result['layers']['before'], result['layers']['after']
  out = [f'per-layer offset spikes with rho = T = {result["analysis_T"]} '
         f'(Ratio = share with psi=0; constrained = layer fed the SNN\'s '
         f'actual input)',
         f'{"layer":28s} {"Ratio before":>12s} {"after":>8s} '
         f'{"MSE before":>10s} {"after":>8s} {"constr. after":>13s} '
         f'{"rate":>6s}']
  for name in before:
    b, a = before[name], after[name]
    out.append(f'{name:28s} {100 * b["ratio"]:11.2f}% {100 * a["ratio"]:7.2f}%'
               f' {b["mse"]:10.4f} {a["mse"]:8.4f} '
               f'{100 * a["ratio_constrained"]:12.2f}% '
               f'{a["firing_rate"]:6.3f}')
  return '\n'.join(out)


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what users expect
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_results(output_dir: str, result: dict, settings: ConversionSettings,
                  meta: dict) -> list[str]:
  """Writes results.json, results.csv, accuracy.png, offset_spikes.png.

  Each file is written to a temporary name and renamed into place, so an
  interrupted run never leaves a half-written result.
  """
  from cos_jax import plots  # pylint: disable=g-import-not-at-top (matplotlib)
  os.makedirs(output_dir, exist_ok=True)
  header, rows = summary_rows(result, settings)
  document = {**meta, 'settings': dataclasses.asdict(settings),
              'table': {'header': header, 'rows': rows}, **result}
  written = []

  def put(name, data):
    path = os.path.join(output_dir, name)
    _atomic_write(path, data)
    written.append(path)

  put('results.json', json.dumps(document, indent=2).encode())
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(['method', 'T', 'accuracy'])
  writer.writerow(['ann', '', f'{result["ann_accuracy"]:.6f}'])
  for init, curve in result['curves'].items():
    for t, acc in enumerate(curve, start=1):
      writer.writerow([init, t, f'{acc:.6f}'])
  put('results.csv', buf.getvalue().encode())
  put('accuracy.png', plots.accuracy_vs_time(result, settings))
  put('offset_spikes.png', plots.offset_spike_histograms(result))
  return written
