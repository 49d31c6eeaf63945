"""Measuring a converted network: ANN and SNN accuracy per T, offset spikes.

:func:`convert_and_evaluate` runs, for every batch of a split, the ANN, the SNN
under each v0 method at every time-step, and the per-layer offset-spike
statistics before and after calibration. It only measures; ``cos_jax.report``
turns the result into tables, files and figures.

Batches are sharded over all devices (padded to a multiple of the device count
and masked), so memory is bounded by the batch size, not the split size.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cos_jax import analysis, correction, cost, data, methods, runtime, snn
from cos_jax.activation import model_variables
from cos_jax.blocks import block_steps, memory_bound
from cos_jax.conversion_settings import (ConversionSettings, reported_steps,
                                         run_key)
from cos_jax.settings import SettingsError

def longest_block(settings: ConversionSettings, analysis_T: int
                  ) -> tuple[int, str]:
  """(steps, the setting that sets them) of the longest time-folded block
  among the method runs and the offset-spike analysis."""
  chunk = settings.time_chunk
  blocks = [(analysis_T, 'analysis_T')]
  for method, T in settings.runs().values():
    # Pre passes (global probes, SRP's τ) run as one block each.
    probe = max(method.probe_steps, method.pre_steps)
    steps = block_steps(method.steps(T), probe, chunk)
    if chunk is None:
      blocks.append((steps, 'time_chunk'))
    elif probe > chunk:
      blocks.append((steps, 'rho'))
    else:
      blocks.append((steps, 'batch_size'))
  return max(blocks)


def check_memory(model, variables, image_shape, settings: ConversionSettings,
                 batch_size: int, analysis_T: int) -> None:
  """Refuses a run whose longest block cannot fit in the devices' memory.

  Uses :func:`cos_jax.blocks.memory_bound` (from shapes, before compiling) and
  :func:`cos_jax.runtime.memory_budget`; raises SettingsError naming the
  setting that made the block long.
  """
  budget = runtime.memory_budget()
  if budget is None:
    return
  steps, field = longest_block(settings, analysis_T)
  need = memory_bound(model, variables, image_shape, batch=batch_size,
                      steps=steps)
  if need > 0.9 * budget:
    value = {'analysis_T': analysis_T, 'rho': settings.calibration.rho,
             'time_chunk': 0, 'batch_size': batch_size}[field]
    fix = {'time_chunk': 'set --time_chunk (e.g. 8)',
           'batch_size': 'lower --batch_size'}.get(
               field, f'lower --{field} or --batch_size')
    raise SettingsError(
        field, f'{value} makes a block of {steps} time-steps × {batch_size} '
        f'images that needs up to {need / 2**30:.1f} GiB, more than the '
        f'{budget / 2**30:.1f} GiB available: {fix}')


def image_steps(settings: ConversionSettings, analysis_T: int) -> int:
  """Time-steps simulated per image by one conversion run (all methods, the
  probes and the analysis), to size the work before it starts."""
  return 2 * analysis_T + sum(sum(method.counted(T)) for method, T in
                              settings.runs().values())


@jax.jit
def correct_per_step(outputs, labels, mask):
  """Correct predictions at each t = 1..T from the running mean of
  outputs[:t]: ``[T, B, C]`` outputs, ``[B]`` labels and 0/1 mask -> int32 [T]."""
  predictions = jnp.cumsum(outputs, axis=0).argmax(-1)   # [T, B]
  return jnp.sum((predictions == labels) * mask, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    'model', 'method', 'T', 'time_chunk', 'keep_v0', 'readout_from'))
def _snn_correct(model, variables, images, labels, mask, key, onehots,
                 corrections=None, *, method, T, time_chunk, keep_v0=False,
                 readout_from=0):
  """(correct per step [method.steps(T)], spike counts per step and fan-out
  class per IF layer, ``cos_jax.cost.class_counts``, or {} when ``onehots``
  is None; the run's v0 if ``keep_v0``, else None)."""
  run = snn.run_method(model, variables, images, key, T=T, method=method,
                       time_chunk=time_chunk, count_steps=onehots is not None,
                       corrections=corrections)
  counts = ({} if onehots is None
            else cost.class_counts(run.intermediates, onehots, mask))
  return (correct_per_step(run.outputs[readout_from:], labels, mask), counts,
          run.v0 if keep_v0 else None)


@functools.partial(jax.jit, static_argnames=('model', 'steps', 'time_chunk'))
def _counts_from_v0(model, variables, images, mask, v0, onehots, *, steps,
                    time_chunk):
  """``cos_jax.cost.class_counts`` of a ``steps``-step run from ``v0``
  (``snn.step_spikes_from``): one program counts every method that runs from
  its own v0, where a counting variant of each method's program would take
  as long to compile as the method's own (docs/cost.md)."""
  return cost.class_counts(snn.step_spikes_from(
      model, variables, images, v0, steps=steps, time_chunk=time_chunk),
      onehots, mask)


@jax.jit
def _batch_facts(images, mask):
  """(whether every image is finite, real rows): the whole global batch's."""
  return jnp.all(jnp.isfinite(images)), jnp.sum(mask).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model',))
def ann_correct(model, variables, images, labels, mask):
  """Correct ANN predictions among the rows with ``mask`` = 1 (int32)."""
  logits = model.apply(variables, images, train=False)
  return jnp.sum((logits.argmax(-1) == labels) * mask).astype(jnp.int32)


def convert_and_evaluate(model, variables, batches: Iterable[dict],
                         settings: ConversionSettings, *,
                         mesh: Mesh | None = None, progress: Any = None,
                         calibration_images: Any = None) -> dict[str, Any]:
  """Runs the ANN and the SNN variants over ``batches``.

  Args:
    model, variables: a zoo model and its ``{'params', 'batch_stats'}``.
    batches: this process's rows of each batch, ``{'image': [b, H, W, C],
      'label': [b]}``; each is padded (and masked) to a multiple of its
      devices only. With several processes, every one must yield as many
      batches, with a ``'mask'`` ([b] 0/1) and the same b
      (:func:`cos_jax.runtime.aligned_batches`).
    settings: see :class:`ConversionSettings`.
    mesh: 1-D mesh with axis 'data' (default: all devices).
    progress: optional tqdm-like object with ``update(n)``.
    calibration_images: ``[N, H, W, C]`` training images, needed when a
      method is corrected per T ('pc', 'bc'); never the evaluated split.

  Returns:
    ``{'examples', 'ann_accuracy', 'ann' ('QCFS', or 'ReLU' for a
    plain-ReLU network), 'curves': {method: [accuracy at t=1..]
    (None at a t a per-T method was not run for)}, 'layers': {'before',
    'after'}, 'analysis_T', 'seconds'}``, and ``'cost'`` (:class:`cos_jax.cost.Counter`'s summary)
    unless ``settings.cost_model`` is None.

  Raises:
    cos_jax.data.DatasetUnavailableError: a batch holds non-finite pixels
      (the IF neurons would silently ignore them; see docs/semantics.md).
  """
  mesh = mesh or runtime.make_mesh()
  replicated, batch_sharding = runtime.shardings(mesh)
  variables = runtime.to_global(runtime.to_host(
      model_variables(variables)), replicated)
  analysis_T = settings.analysis_T or model.levels
  runs, timer = settings.runs(), _Timer(('ann', *settings.names, 'analysis',
                                         'cost', 'correction'))
  corrections = timer('correction', lambda: _corrections(
      model, variables, runs, calibration_images, settings, replicated))
  key, ann_hits, examples = jax.random.key(settings.seed), 0, 0
  correct = {k: np.zeros(m.steps(T) - settings.readout_from, np.int64)
             for k, (m, T) in runs.items()}
  layers, counter = _Layers(settings, analysis_T), None
  for batch in batches:
    images, labels, mask, n = _global_batch(batch, mesh, batch_sharding,
                                            examples)
    if settings.cost_model and counter is None:
      counter = timer('cost', lambda: _counter(
          model, variables, images.shape[1:], len(mask), replicated,
          settings, runs))
    key, batch_key = jax.random.split(key)
    ann_hits += int(runtime.to_host(timer('ann', lambda: ann_correct(
        model, variables, images, labels, mask))))
    counting = counter is not None and counter.wants_more()
    batch_counts = {}
    for run, (method, T) in runs.items():
      hits, batch_counts[run] = _run_batch(
          model, variables, images, labels, mask, batch_key, method, T,
          settings.time_chunk, corrections.get(run),
          counter if counting else None, batch_sharding, timer,
          settings.readout_from)
      correct[run] += runtime.to_host(hits)
    if counting:
      counter.add(n, batch_counts)
    layers.add(timer, model, variables, images, mask)
    examples += n
    if progress is not None:
      progress.update(n)
    runtime.raise_if_stopped()
  if not examples:
    raise ValueError('the split has no examples: check split/num_examples')
  costs = {} if counter is None else {'cost': counter.summary(
      cost.COST_MODELS[settings.cost_model])}
  return {'examples': examples,
          'ann_accuracy': ann_hits / examples,
          'ann': 'ReLU' if getattr(model, 'plain_relu', False) else 'QCFS',
          'curves': _curves(settings, correct, examples),
          'layers': layers.finalize(),
          'analysis_T': analysis_T,
          'seconds': timer.seconds,
          **costs}


class _Timer:
  """Seconds spent per part of the run (the result's ``'seconds'``)."""

  def __init__(self, parts):
    self.seconds = dict.fromkeys(parts, 0.0)

  def __call__(self, part, fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    self.seconds[part] += time.perf_counter() - start
    return out


def _global_batch(batch, mesh, batch_sharding, seen: int):
  """(images, labels, mask, real rows) of one batch on the devices; refuses
  non-finite pixels (``seen``: rows before it, for the message)."""
  if 'mask' not in batch:
    n = len(batch['label'])
    local = mesh.local_mesh.size
    batch = runtime.pad_batch(batch, -(-n // local) * local)
  batch = runtime.to_global(batch, batch_sharding)
  images, labels, mask = batch['image'], batch['label'], batch['mask']
  finite, n = (runtime.to_host(x) for x in _batch_facts(images, mask))
  n = int(n)
  if not finite:
    raise data.DatasetUnavailableError(
        f'images {seen}..{seen + n - 1} of the split hold non-finite '
        'values: the dataset is damaged; prepare it again')
  return images, labels, mask, n


def _run_batch(model, variables, images, labels, mask, key, method, T,
               time_chunk, corrections, counter, batch_sharding, timer,
               readout_from=0):
  """One method's run on one batch: (correct per step, its spike counts on
  the host, or None when ``counter`` is None). A counted method that
  replays from its v0 is counted by ``counter``'s shared program."""
  rerun = counter is not None and counter.reruns(method)
  by_rule = rerun and counter.by_rule(method)
  hits, counts, v0 = timer(method.name, lambda: _snn_correct(
      model, variables, images, labels, mask, key,
      counter.onehots if counter is not None and not rerun else None,
      corrections, method=method, T=T, time_chunk=time_chunk,
      keep_v0=rerun and not by_rule, readout_from=readout_from))
  if counter is None:
    return hits, None
  if rerun:
    if by_rule:  # sharded like the runs' v0: one count program
      v0 = jax.device_put(snn.rule_v0(model, variables, images,
                                      method=method), batch_sharding)
    counts = timer(method.name, lambda: _counts_from_v0(
        model, variables, images, mask, v0, counter.onehots,
        steps=counter.rerun_steps, time_chunk=time_chunk))
  return hits, runtime.to_host(counts)


def _curves(settings, correct, examples) -> dict[str, list]:
  """Accuracy per method and t; a per-T method has a value at its reported
  T only (None elsewhere)."""
  curves = {}
  for method in settings.methods:
    if not method.corrected:
      curves[method.name] = (correct[method.name] / examples).tolist()
      continue
    curve = [None] * settings.T
    for t in reported_steps(settings.T):
      curve[t - 1] = float(correct[run_key(method.name, t)][-1] / examples)
    curves[method.name] = curve
  return curves


class _Layers:
  """The offset-spike analysis, accumulated over batches. In the theorems'
  setting ρ = T = L (paper Fig. 3, Table 3), before and after COS: the
  probe spans the analysis window, whatever ρ the accuracy runs use."""

  def __init__(self, settings, analysis_T):
    self.T = analysis_T
    self.methods = {
        'before': methods.METHODS['half'],
        'after': methods.METHODS['cos'].bind(dataclasses.replace(
            settings.calibration, rho=analysis_T))}
    self.totals = dict.fromkeys(self.methods)

  def add(self, timer, model, variables, images, mask):
    for when, method in self.methods.items():
      stats, _ = timer('analysis', lambda: analysis.statistics(
          model, variables, images, mask, None, T=self.T, method=method))
      self.totals[when] = analysis.accumulate(self.totals[when], stats)

  def finalize(self):
    return {when: analysis.finalize(total, self.T)
            for when, total in self.totals.items()}


def _corrections(model, variables, runs, images, settings, replicated):
  """Per run of a corrected method, its correction tree (on the devices,
  replicated), measured on ``images`` (training images)."""
  if not settings.corrected:
    return {}
  if images is None:
    raise SettingsError('init', 'pc and bc need training images to '
                        'calibrate on (calibration_images)')
  images = jnp.asarray(images[:settings.calibration_examples])
  return {key: runtime.to_global(runtime.to_host(correction.measure(
      model, variables, images, method=method, T=T,
      time_chunk=settings.time_chunk)), replicated)
          for key, (method, T) in runs.items() if method.corrected}


def _counter(model, variables, image_shape, batch, replicated, settings,
             runs) -> cost.Counter:
  """The cost accumulator of this run, its fan-out classes on the devices."""
  network = cost.analyse(model, variables, image_shape)
  cost.check_batch(network, batch)
  return cost.Counter(
      network, runs, settings.cost_examples,
      place=lambda x: runtime.to_global(x, replicated))
