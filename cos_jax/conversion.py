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

from cos_jax import analysis, cost, data, methods, runtime, snn
from cos_jax.settings import (Calibration, SettingsError, check_positive_int,
                              check_time_chunk)


@dataclasses.dataclass(frozen=True)
class ConversionSettings:
  """What to measure. Build it with :meth:`from_config` (which validates).

  Attributes:
    calibration: ρ, rounds, schedule and ε of the calibrated methods.
    T: the longest simulation reported (accuracy at every t ≤ T).
    methods: v0 methods to compare (keys of ``cos_jax.methods.METHODS``).
    analysis_T: window of the offset-spike analysis (None: the model's L).
    seed: seed of the random v0 method.
    time_chunk: steps simulated at a time (None: one block).
    cost_model: a key of ``cos_jax.cost.COST_MODELS``, or None to count no
      spikes (docs/cost.md).
    cost_examples: images whose spikes are counted, the first ones of the
      split in whole batches (None: all of them).
    readout_from: steps at the start of every run that the readout skips
      (Bu et al.'s delayed readout): accuracy at T is over the outputs of
      steps ``readout_from + 1 .. readout_from + T``, so each method runs
      ``readout_from`` steps more. 0: the usual readout from step 1.
  """
  calibration: Calibration
  T: int
  methods: tuple[str, ...]
  analysis_T: int | None = None
  seed: int = 0
  time_chunk: int | None = None
  cost_model: str | None = cost.DEFAULT_COST_MODEL
  cost_examples: int | None = cost.DEFAULT_COST_EXAMPLES
  readout_from: int = 0

  @classmethod
  def from_config(cls, config) -> 'ConversionSettings':
    """From a ``configs/convert.py`` config; SettingsError names the field."""
    names = tuple(n.strip() for n in str(config.init).split(',') if n.strip())
    if not names:
      raise SettingsError('init', 'needs at least one v0 method')
    for name in names:
      methods.get(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise SettingsError('init', f'names {", ".join(repeated)} more than '
                          'once; list each method once')
    analysis_T = config.get('analysis_T')
    readout_from = config.get('readout_from', 0)
    if (isinstance(readout_from, bool) or not isinstance(readout_from, int)
        or readout_from < 0):
      raise SettingsError('readout_from', 'must be an integer >= 0, got '
                          f'{readout_from!r}')
    cost_model = _cost_model_name(config.get('cost_model',
                                             cost.DEFAULT_COST_MODEL))
    if readout_from and cost_model:
      raise SettingsError('readout_from', 'is not counted by the cost model '
                          '(its spikes are those of a run read from step 1): '
                          'pass --cost_model none with it')
    return cls(
        calibration=Calibration(config.rho, config.iterations,
                                config.schedule, config.epsilon,
                                config.saturated),
        T=check_positive_int('T', config.T),
        methods=names,
        analysis_T=(None if analysis_T is None
                    else check_positive_int('analysis_T', analysis_T)),
        seed=config.seed,
        time_chunk=check_time_chunk(config.time_chunk or None),
        cost_model=cost_model,
        cost_examples=_cost_examples(config.get('cost_examples',
                                                cost.DEFAULT_COST_EXAMPLES)),
        readout_from=readout_from)

  def time_steps(self, name: str) -> int:
    """Steps simulated for ``name``: T, or T + ρ for uncalibrated methods
    (the paper compares COS at T with the others at T + ρ), plus the
    ``readout_from`` steps the readout skips."""
    if methods.get(name).calibrated:
      return self.T + self.readout_from
    return self.T + self.calibration.rho + self.readout_from

  def calibration_of(self, name: str) -> Calibration | None:
    return self.calibration if methods.get(name).calibrated else None


def _cost_examples(value) -> int | None:
  """The cost_examples setting: 0 (or None) means every image."""
  if value is not None and (isinstance(value, bool)
                            or not isinstance(value, int) or value < 0):
    raise SettingsError('cost_examples', 'must be a positive integer, or 0 '
                        f'to count every image, got {value!r}')
  return value or None


def _cost_model_name(name) -> str | None:
  model = cost.cost_model(name)
  return None if model is None else model.name


def longest_block(settings: ConversionSettings, analysis_T: int
                  ) -> tuple[int, str]:
  """(steps, the setting that sets them) of the longest time-folded block
  among the method runs and the offset-spike analysis."""
  chunk = settings.time_chunk
  blocks = [(analysis_T, 'analysis_T')]
  for name in settings.methods:
    calibration = settings.calibration_of(name)
    probe = calibration.rho if calibration else 1
    steps = snn.block_steps(settings.time_steps(name), probe, chunk)
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

  Uses :func:`cos_jax.snn.memory_bound` (from shapes, before compiling) and
  :func:`cos_jax.runtime.memory_budget`; raises SettingsError naming the
  setting that made the block long.
  """
  budget = runtime.memory_budget()
  if budget is None:
    return
  steps, field = longest_block(settings, analysis_T)
  need = snn.memory_bound(model, variables, image_shape, batch=batch_size,
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
  total = 2 * analysis_T
  for name in settings.methods:
    calibration = settings.calibration_of(name)
    total += max(settings.time_steps(name), calibration.rho if calibration
                 else 0)
  return total


@jax.jit
def correct_per_step(outputs, labels, mask):
  """Correct predictions at each t = 1..T from the running mean of
  outputs[:t]: ``[T, B, C]`` outputs, ``[B]`` labels and 0/1 mask -> int32 [T]."""
  predictions = jnp.cumsum(outputs, axis=0).argmax(-1)   # [T, B]
  return jnp.sum((predictions == labels) * mask, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    'model', 'method', 'T', 'calibration', 'time_chunk', 'keep_v0',
    'readout_from'))
def _snn_correct(model, variables, images, labels, mask, key, onehots, *,
                 method, T, calibration, time_chunk, keep_v0=False,
                 readout_from=0):
  """(correct per step [T], spike counts per step and fan-out class per IF
  layer, ``cos_jax.cost.class_counts``, or {} when ``onehots`` is None; the
  run's v0 if ``keep_v0``, else None)."""
  run = snn.run_method(model, variables, images, key, T=T, method=method,
                       calibration=calibration, time_chunk=time_chunk,
                       count_steps=onehots is not None)
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
                         mesh: Mesh | None = None,
                         progress: Any = None) -> dict[str, Any]:
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

  Returns:
    ``{'examples', 'ann_accuracy', 'curves': {method: [accuracy at t=1..]},
    'layers': {'before': per-layer stats, 'after': per-layer stats},
    'analysis_T', 'seconds': {...}}``, and ``'cost'``
    (``cos_jax.cost.summarize``: SOPs, energy and rates per method and t,
    per-layer rates and SOPs, over the first ``settings.cost_examples``
    samples in whole batches) unless ``settings.cost_model`` is None.

  Raises:
    cos_jax.data.DatasetUnavailableError: a batch holds non-finite pixels
      (the IF neurons would silently ignore them; see docs/semantics.md).
  """
  mesh = mesh or runtime.make_mesh()
  replicated, batch_sharding = runtime.shardings(mesh)
  variables = runtime.to_global(runtime.to_host(
      {k: variables[k] for k in ('params', 'batch_stats') if k in variables}), replicated)
  analysis_T = settings.analysis_T or model.levels
  # Offset spikes in the theorems' setting ρ = T = L (paper Fig. 3, Table 3),
  # before and after COS: the probe spans the analysis window, whatever ρ the
  # accuracy runs use.
  analysed = {'before': ('half', None),
              'after': ('cos', dataclasses.replace(settings.calibration,
                                                   rho=analysis_T))}
  key = jax.random.key(settings.seed)
  ann_hits, examples = 0, 0
  correct = {name: np.zeros(settings.time_steps(name)
                           - settings.readout_from, np.int64)
             for name in settings.methods}
  layer_totals = dict.fromkeys(analysed)
  seconds = dict.fromkeys(('ann', *settings.methods, 'analysis', 'cost'), 0.0)
  network = onehots = None
  # Per counted batch and method: its real rows and class counts (the totals,
  # and the standard error over batches).
  counted_batches = []
  # (probe-pass steps, main-run steps) of each method's counted spikes. A
  # sample of the batches is rerun from each method's v0 by one program that
  # serves every run without probe passes (the longest one's steps); when all
  # are counted, or the global schedule probes, each method's own program
  # counts as it runs, which costs less per batch but a compile per method.
  layouts = {name: cost.run_layout(settings.time_steps(name),
                                   settings.calibration_of(name))
             for name in settings.methods}
  # Per rerun method, whether its v0 is rebuilt from its rule: as an output
  # of the run, a v0 set by rule alone would be written out on every batch.
  sampled = settings.cost_model and settings.cost_examples is not None
  reruns = {
      name: not (methods.get(name).calibrated or methods.get(name).needs_key)
      for name, (probed, _) in layouts.items() if sampled and not probed}
  counted_steps = max((layouts[name][1] for name in reruns), default=None)

  def timed(name, fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    seconds[name] += time.perf_counter() - start
    return out

  local_devices = mesh.local_mesh.size
  for batch in batches:
    if 'mask' not in batch:
      n = len(batch['label'])
      batch = runtime.pad_batch(batch, -(-n // local_devices) * local_devices)
    batch = runtime.to_global(batch, batch_sharding)
    images, labels, mask = batch['image'], batch['label'], batch['mask']
    finite, n = (runtime.to_host(x) for x in _batch_facts(images, mask))
    n = int(n)
    if not finite:
      raise data.DatasetUnavailableError(
          f'images {examples}..{examples + n - 1} of the split hold non-finite '
          'values: the dataset is damaged; prepare it again')
    if settings.cost_model and network is None:
      network, onehots = timed('cost', lambda: _cost_network(
          model, variables, images.shape[1:], len(mask), replicated))
    key, batch_key = jax.random.split(key)
    ann_hits += int(runtime.to_host(timed('ann', lambda: ann_correct(
        model, variables, images, labels, mask))))
    counting = network is not None and (
        settings.cost_examples is None
        or sum(n for n, _ in counted_batches) < settings.cost_examples)
    batch_counts = {}
    for name in settings.methods:
      rerun, by_rule = name in reruns, reruns.get(name, False)
      hits, counts, v0 = timed(name, lambda name=name: _snn_correct(
          model, variables, images, labels, mask, batch_key,
          onehots if counting and not rerun else None, method=name,
          T=settings.time_steps(name),
          calibration=settings.calibration_of(name),
          time_chunk=settings.time_chunk, keep_v0=rerun and not by_rule,
          readout_from=settings.readout_from))
      correct[name] += runtime.to_host(hits)
      if counting and rerun:
        if by_rule:  # sharded like the runs' v0: one count program
          v0 = jax.device_put(snn.rule_v0(model, variables, images,
                                          method=name), batch_sharding)
        counts = timed(name, lambda: _counts_from_v0(
            model, variables, images, mask, v0, onehots,
            steps=counted_steps, time_chunk=settings.time_chunk))
      if counting:
        kept = sum(layouts[name])  # a rerun spans the longest run's steps
        batch_counts[name] = {layer: c[:kept] for layer, c in
                              runtime.to_host(counts).items()}
    if counting and n:
      counted_batches.append((n, batch_counts))
    for when, (name, calibration) in analysed.items():
      stats, _ = timed('analysis', lambda: analysis.statistics(
          model, variables, images, mask, None, T=analysis_T, method=name,
          calibration=calibration))
      layer_totals[when] = analysis.accumulate(layer_totals[when], stats)
    examples += n
    if progress is not None:
      progress.update(n)

  if not examples:
    raise ValueError('the split has no examples: check split/num_examples')
  costs = {} if network is None else {'cost': cost.summarize(
      network, counted_batches,
      {name: (settings.time_steps(name), settings.calibration_of(name))
       for name in settings.methods},
      cost.COST_MODELS[settings.cost_model])}
  return {
      'examples': examples,
      'ann_accuracy': ann_hits / examples,
      'curves': {name: (c / examples).tolist() for name, c in correct.items()},
      'layers': {when: analysis.finalize(total, analysis_T)
                 for when, total in layer_totals.items()},
      'analysis_T': analysis_T,
      'seconds': seconds,
      **costs,
  }


def _cost_network(model, variables, image_shape, batch, replicated):
  """The network's cost structure and its fan-out classes on the devices."""
  network = cost.analyse(model, variables, image_shape)
  cost.check_batch(network, batch)
  onehots = {layer: runtime.to_global(onehot, replicated)
             for layer, (onehot, _) in cost.fanout_classes(network).items()}
  return network, onehots
