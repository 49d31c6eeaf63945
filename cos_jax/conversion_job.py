"""The convert.py job: load a checkpoint, read the split, measure, report.

:func:`convert` takes a ``configs/convert.py`` config. It checks every
setting, the checkpoint, the data and the output directory before the first
measurement, then runs :func:`cos_jax.conversion.convert_and_evaluate` with a
progress bar, prints the tables and writes the files of ``cos_jax.report``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time

import jax
import numpy as np
import tqdm

from cos_jax import (balance, checkpoints, checks, conversion, data,
                     interop, ownership, report, runtime, user_model)
from cos_jax.conversion_settings import ConversionSettings
from cos_jax.data import pipeline
from cos_jax.settings import SettingsError, check_positive_int


def output_dir(config) -> str:
  """The config's output directory, checked before any work: a new path, an
  empty directory or one convert.py wrote (:func:`cos_jax.ownership.
  check_output_dir`; the results replace it as a whole, so nothing else may
  be there), and writable."""
  path = config.output_dir
  if not path:
    source = config.model or config.torch_checkpoint or config.workdir
    name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    name = name or 'run'
    path = os.path.join('results', f'{name}_rho{config.rho}_T{config.T}')
  protected = [config.torch_checkpoint or config.workdir, config.data_dir]
  if config.model:  # a user's network file and its folder
    protected.append(user_model.split_spec(config.model)[0])
  path = ownership.check_output_dir(path, report.FILES, protected)
  workdir = checkpoints.enclosing_workdir(path)
  if workdir:
    raise SettingsError('output_dir', f'{path} is inside the train.py '
                        f'workdir {workdir}, which holds only train.py\'s '
                        'files: pass a directory outside it')
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(
      path if os.path.isdir(path) else parent, os.W_OK):
    raise SettingsError('output_dir', f'{path} is not writable: pass another '
                        '--output_dir')
  return path


def check_length(settings: ConversionSettings, analysis_T: int) -> None:
  """Refuses a run whose simulated time-steps per image (every method's
  run and its ρ·iterations probe steps, the analysis) exceed
  :func:`cos_jax.checks.max_steps`, naming the longest setting."""
  calibration = settings.calibration
  candidates = [('T', settings.T), ('analysis_T', analysis_T),
                ('iterations' if calibration.iterations > 1 else 'rho',
                 calibration.rho * calibration.iterations)]
  field, _ = max(candidates, key=lambda item: item[1])
  value = {'T': settings.T, 'analysis_T': analysis_T, 'rho': calibration.rho,
           'iterations': calibration.iterations}[field]
  # Probe rounds run on the same ρ inputs: work that image_steps (the
  # network passes) does not count.
  probes = sum(m.calibration.rho * m.calibration.iterations
               for m in settings.methods if m.calibration is not None)
  checks.check_steps(field, value,
                     conversion.image_steps(settings, analysis_T) + probes)


def _batches(config, dataset: str, split: str, rows: int, image_shape):
  """This process's rows of the split's batches (:func:`runtime.aligned_batches`:
  ``rows`` each, padded and masked), the first one read (errors surface
  here)."""
  try:
    batches = pipeline.make_dataset(
        dataset, split, batch_size=rows, train=False,
        data_dir=config.data_dir, num_examples=config.num_examples,
        interleaved=True)
    first = next(batches, None)
  except data.DatasetUnavailableError:
    raise
  except (ValueError, KeyError) as e:  # e.g. an unknown split name
    raise SettingsError('split', f'{split!r} cannot be read from {dataset} '
                        f'({str(e).splitlines()[0] if str(e) else repr(e)})'
                        ) from None
  if not runtime.any_process(first is not None):
    raise SettingsError('split', f'{split!r} of {dataset} is empty: check '
                        '--split and --num_examples')
  empty = {'image': np.zeros((0, *image_shape), np.float32),
           'label': np.zeros(0, np.int32)}
  return runtime.aligned_batches(
      itertools.chain([] if first is None else [first], batches), rows, empty)


def convert(config) -> dict:
  """Runs the conversion that ``config`` describes; returns results.json's dict.

  Raises:
    SettingsError / CheckpointError / DatasetUnavailableError / BusyError
    (one line), before any measurement and before anything is written.
  """
  settings = ConversionSettings.from_config(config)
  check_positive_int('batch_size', config.batch_size)
  if config.num_examples is not None:
    check_positive_int('num_examples', config.num_examples)
  if config.checkpoint not in ('best', 'latest'):
    raise SettingsError('checkpoint', f"must be 'best' or 'latest', got "
                        f'{config.checkpoint!r}')
  check_length(settings, settings.analysis_T or 1)
  out = output_dir(config)
  restored = load(config)
  train_config, model = restored.config, restored.model
  check_length(settings, settings.analysis_T or model.levels)
  spec = data.dataset_info(train_config.dataset)
  split = config.split or spec.test_split
  restored = balanced(config, restored, spec, split)
  model = restored.model
  total = spec.split_sizes.get(split)
  if config.num_examples:
    total = min(total or config.num_examples, config.num_examples)
  devices, processes = jax.device_count(), jax.process_count()
  # Every batch (the last one too: one compiled shape) is padded to the batch
  # size rounded up to a device multiple; a batch size above the split's size
  # costs nothing. Each process holds its rows of it.
  batch_size = min(config.batch_size, total or config.batch_size)
  rows = -(-batch_size // devices) * devices // processes
  analysis_T = settings.analysis_T or model.levels
  calibration_images = _calibration_images(config, settings, spec, split)
  conversion.check_memory(model, restored.variables, spec.image_shape,
                          settings, rows, analysis_T)
  lead = jax.process_index() == 0  # only process 0 prints, locks and writes
  with (runtime.exclusive_lock(_lock_path(out), f'--output_dir {out}') if lead
        else contextlib.nullcontext()):
    batches = _batches(config, train_config.dataset, split, rows,
                       spec.image_shape)
    calibration = settings.calibration
    say = print if lead else lambda *args, **kwargs: None
    say(f'Converting {source(config)} ({train_config.model}, '
          f'L={train_config.levels}, {train_config.dataset}:{split}) on '
          f'{devices} {jax.devices()[0].platform} device(s) in {processes} '
          f'process(es): '
          f'rho={calibration.rho}, T<={settings.T}, '
          f'iterations={calibration.iterations}, '
          f'schedule={calibration.schedule}, '
          f'init={",".join(settings.names)}; '
          f'{conversion.image_steps(settings, analysis_T)} simulated '
          'time-steps per image', flush=True)
    start = time.time()
    with tqdm.tqdm(total=total, unit='img', desc='convert',
                   dynamic_ncols=True, disable=not lead) as bar:
      result = conversion.convert_and_evaluate(
          model, restored.variables, batches, settings, progress=bar,
          calibration_images=calibration_images)
    wall = time.time() - start
    say()
    say(report.format_table(*report.summary_rows(result, settings)))
    say()
    say(report.format_layers(result))
    if 'cost' in result:
      say()
      say(report.format_costs(result, settings))
      say()
      say(report.format_cost_layers(result, settings))
    meta = {'source': os.path.abspath(source(config)),
            'workdir': (None if config.torch_checkpoint or config.model
                        else os.path.abspath(config.workdir)),
            'checkpoint': config.checkpoint,
            'checkpoint_step': restored.step,
            'checkpoint_digest': restored.digest,
            'checkpoint_verified': restored.verified,
            'model': train_config.model, 'levels': train_config.levels,
            'dataset': train_config.dataset, 'split': split,
            'devices': devices, 'processes': processes,
            'platform': jax.devices()[0].platform,
            'wall_seconds': wall, 'config': config.to_dict()}
    if not lead:
      return {**meta, **result}
    written = report.write_results(out, result, settings, meta)
  print(f'\n{result["examples"]} examples in {wall:.0f} s; wrote '
        f'{", ".join(os.path.basename(p) for p in written)} to {out}')
  return {**meta, **result}


def balanced(config, restored: checkpoints.Restored, spec, split: str
             ) -> checkpoints.Restored:
  """``restored`` with the model's firing rule (``config.strict``) and, for
  a plain-ReLU network, thresholds balanced per channel on the first
  ``balance_batches`` batches of the training split (the same on every
  process). Refused in one line when there is no training split apart from
  the evaluated one."""
  model = restored.model.clone(strict=bool(config.get('strict', False)))
  restored = restored._replace(model=model)
  if not getattr(model, 'plain_relu', False):
    return restored
  train = spec.train_split
  refuse = lambda why: SettingsError(
      'workdir' if not config.model else 'model',
      f'is a plain-ReLU network, whose thresholds are balanced on training '
      f'images, and {why}')
  if not train or train == split or not spec.split_sizes.get(train):
    raise refuse(f'{spec.name} has no training split apart from {split!r}')
  check_positive_int('balance_batch_size', config.balance_batch_size)
  check_positive_int('balance_batches', config.balance_batches)
  if (isinstance(config.balance_rate, bool)
      or not isinstance(config.balance_rate, (int, float))
      or not 0 < config.balance_rate < float('inf')):
    raise SettingsError('balance_rate', 'must be a finite number > 0, got '
                        f'{config.balance_rate!r}')
  try:
    images = (batch['image'] for batch in pipeline.make_dataset(
        spec.name, train, batch_size=config.balance_batch_size, train=False,
        data_dir=config.data_dir, shard_index=0, num_shards=1,
        drop_remainder=False))
    variables = balance.balance_thresholds(
        model, restored.variables, images,
        num_batches=config.balance_batches, rate=config.balance_rate)
  except (data.DatasetUnavailableError, ValueError, KeyError) as e:
    if isinstance(e, SettingsError):
      raise
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise refuse(f'the training split {train!r} of {spec.name} cannot be '
                 f'read ({first})') from None
  return restored._replace(variables=variables)


def _calibration_images(config, settings, spec, split):
  """The first ``calibration_examples`` images of the training split, which
  'pc' and 'bc' calibrate on (the same on every process); None when no
  method needs them. Refused in one line when there is no training split
  apart from the evaluated one."""
  if not settings.corrected:
    return None
  train = spec.train_split
  refuse = lambda why: SettingsError(
      'init', f'pc and bc calibrate on training images, and {why}: drop '
      'them from --init')
  if not train or train == split or not spec.split_sizes.get(train):
    raise refuse(f'{spec.name} has no training split apart from {split!r}')
  n = settings.calibration_examples
  try:
    batch = next(pipeline.make_dataset(
        spec.name, train, batch_size=n, train=False, data_dir=config.data_dir,
        num_examples=n, shard_index=0, num_shards=1, drop_remainder=False))
  except (data.DatasetUnavailableError, ValueError, KeyError,
          StopIteration) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise refuse(f'the training split {train!r} of {spec.name} cannot be '
                 f'read ({first})') from None
  return batch['image']


def source(config) -> str:
  """What ``config`` converts: its PyTorch checkpoint, or its workdir's
  best/latest checkpoint."""
  if config.model:
    return config.model
  if config.torch_checkpoint:
    return config.torch_checkpoint
  return os.path.join(config.workdir, config.checkpoint)


def load(config) -> checkpoints.Restored:
  """The network ``config`` converts (:func:`source`)."""
  if config.model:
    if config.torch_checkpoint:
      raise SettingsError('model', 'and --torch_checkpoint name two networks: '
                          'pass one')
    return user_model.restore(config.model, dataset=config.dataset)
  if config.torch_checkpoint:
    return interop.restore(config.torch_checkpoint, arch=config.arch,
                           num_classes=config.num_classes,
                           levels=config.levels, dataset=config.dataset)
  return checkpoints.restore(config.workdir, which=config.checkpoint)


def _lock_path(out: str) -> str:
  """The lock of an output directory: a hidden file beside it."""
  out = os.path.abspath(out)
  return os.path.join(os.path.dirname(out), f'.{os.path.basename(out)}.lock')
